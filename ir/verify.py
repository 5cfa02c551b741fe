"""The verifier that runs between passes (MLIR-style): a broken pass is caught where it broke."""

from __future__ import annotations

import torch
from torch import fx

from fxsculpt.ir.errors import RunFailedError
from fxsculpt.ir.graph import IR


def outputs_of(gm: fx.GraphModule, x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``gm`` in eval mode without gradients and flatten its outputs to a tensor list."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            out = gm(x)
    finally:
        gm.train(was_training)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, list | tuple):
        return [t for t in out if isinstance(t, torch.Tensor)]
    if isinstance(out, dict):
        return [t for t in out.values() if isinstance(t, torch.Tensor)]
    raise TypeError(f"model returned {type(out).__name__}, expected tensors")


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute elementwise difference between two output lists of equal structure."""
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
    return worst


def verify(ir: IR, reference: IR | None = None, atol: float = 1e-4, pass_name: str = "?") -> float | None:
    """Lint the graph, re-propagate shapes and, given ``reference``, compare outputs.

    The comparison runs both graphs on one deterministic input; the tolerance is
    ``atol * max(1, max|reference output|)`` so it scales with the logits' magnitude.
    Returns the max abs difference when a reference was given.
    """
    try:
        ir.gm.graph.lint()
    except Exception as exc:  # lint raises RuntimeError or AssertionError depending on the flaw
        raise RunFailedError(f"pass '{pass_name}' left a malformed graph: {exc}") from exc
    ir.gm.recompile()
    ir.propagate()
    if reference is None:
        return None
    x = ir.example_input(batch=2, seed=1234)
    expected = outputs_of(reference.gm, x.to(reference.device))
    got = outputs_of(ir.gm, x)
    diff = max_abs_diff([e.cpu() for e in expected], [g.cpu() for g in got])
    scale = max([1.0] + [float(e.abs().max()) for e in expected if e.numel()])
    if diff > atol * scale:
        raise RunFailedError(
            f"pass '{pass_name}' claims to preserve the model's outputs but changed them by {diff:.3g} "
            f"(tolerance {atol * scale:.3g})"
        )
    return diff
