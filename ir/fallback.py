"""Load models torch.fx cannot trace through ``torch.export`` instead, as a user would by hand.

Hugging Face vision models are the common case: their ``forward`` takes the image as
``pixel_values`` and returns a ``ModelOutput`` (a dict-like object with ``logits``), and their
code branches on configuration in ways torch.fx's symbolic tracing rejects. ``torch.export``
runs the code on real example values instead, so it gets through; the program is then lifted
to the same module-level IR (:mod:`ir.lift`) that a ``.pt2`` file gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from fxsculpt.ir.errors import BadInputError, first_line
from fxsculpt.ir.lift import lift_exported


def logits_of(output: Any) -> torch.Tensor:
    """The prediction tensor of a model's output: itself, ``.logits``, or the first tensor.

    ``ModelOutput`` objects (Hugging Face) have ``logits``; tuples and dicts give their first
    tensor, as the first output of a classifier is its prediction.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = output.values() if isinstance(output, Mapping) else output
    if isinstance(values, tuple | list) or isinstance(output, Mapping):
        for value in values:
            if isinstance(value, torch.Tensor):
                return value
    raise BadInputError(f"the model returns {type(output).__name__}, which holds no prediction tensor")


class ImageClassifier(nn.Module):
    """``forward(x)`` → prediction tensor, for a model that takes the image as its first argument
    (``pixel_values=`` included) and may return a ``ModelOutput``, tuple or dict."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def export_graph(module: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """``module`` exported with ``torch.export`` for inputs of ``input_shape``, any batch, lifted.

    Raises :class:`BadInputError` (one line) when export fails too.
    """
    wrapped = ImageClassifier(module).eval()
    # batch 2, as batch 1 would be specialized into the graph (expands, views): any batch runs
    example = torch.randn(2, *input_shape[1:])
    batch = {0: torch.export.Dim("batch")}
    try:
        with torch.no_grad():
            program = torch.export.export(wrapped, (example,), dynamic_shapes=(batch,))
    except BadInputError:
        raise
    except Exception as exc:  # export's failures come from anywhere in the user's code
        raise BadInputError(f"torch.export failed too: {first_line(exc).strip()}") from exc
    return lift_exported(program)
