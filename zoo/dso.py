"""``builtin:dso-supernet``: the DSO-NAS search space (Zhang et al. 2018, section 3.1).

Completely connected blocks of M levels × N ops (sep_conv_3x3, sep_conv_5x5, max_pool_3x3,
avg_pool_3x3) with a scale λ = 1 on every edge, and fixed stride-2 reduction blocks between
stages (see :mod:`nas.dso.blocks`). Run ``--passes prune`` on it to search: the L1 penalty on
λ prunes edges and the ops left without input.

Options (``--model-opt``): ``width`` of the first stage (default 16), ``stages`` (3),
``blocks`` searched blocks per stage (1), ``levels`` M (4). Defaults are small so the search
runs on a CPU; the paper's CIFAR network is far wider and deeper.
"""

from __future__ import annotations

from torch import nn

from fxsculpt.nas.dso.blocks import DSOSupernet
from fxsculpt.zoo import BuiltinSpec
from fxsculpt.zoo._options import check_known, check_spec, int_option


def build_dso_supernet(spec: BuiltinSpec) -> nn.Module:
    """``builtin:dso-supernet`` for ``spec.num_classes`` classes and ``spec.in_channels`` channels."""
    check_spec(spec, "dso-supernet")
    check_known(spec, "dso-supernet", ("width", "stages", "blocks", "levels"))
    return DSOSupernet(
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        width=int_option(spec, "dso-supernet", "width", 16),
        stages=int_option(spec, "dso-supernet", "stages", 3),
        blocks=int_option(spec, "dso-supernet", "blocks", 1),
        levels=int_option(spec, "dso-supernet", "levels", 4),
    )


BUILTINS = {"dso-supernet": build_dso_supernet}
