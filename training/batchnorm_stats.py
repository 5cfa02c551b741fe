"""Re-estimate BatchNorm running statistics of a model whose layers changed under them.

After a search discretizes a relaxed graph, each kept operation's output no longer carries its
mixture weight (DARTS's softmax(α), about 1/4 with four candidates), yet the BatchNorms after it
still hold the statistics of the weighted mixture. Every such layer then scales its output up,
and over a deep network the error compounds (timm ghostnet_050 after one DARTS epoch: logits of
3.5e7, where the model before the search stayed below 14). Recomputing the statistics on a few
training batches, weights untouched, puts every BatchNorm back on the data it now sees.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> int:
    """Replace the running mean/var of every BatchNorm of ``model`` with their exact averages over
    ``batches`` (inputs only; no gradient, no weight changes, every other layer in eval mode).

    Returns the batches used; the model is left in eval mode and each BatchNorm's momentum as it was.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches seen
    model.eval()  # dropout and the like stay off: only the norms collect statistics
    for m in norms:
        m.train()
    used = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return used
