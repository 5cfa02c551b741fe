"""A HAQ ratio option as a budget: ``quantize.latency_ratio=1.5`` becomes a limit the hardware pass checks.

A ratio ``r`` on a metric means ``limit = r × cost of the uniform 8-bit model`` on ``--target``
(:class:`quant.haq.options.HaqOptions`). After the search the ratio is resolved into that absolute
limit and added to ``ctx.budget`` (:meth:`hardware.budget.Budget.with_limit`), so that the exported
file is re-measured and checked against it exactly as against ``--budget``: the ``budget`` section
of ``report.json``, exit code 3 and ``model.over-budget.onnx`` when the file misses it. Where
``--budget`` limits the same metric, the budget keeps both and the tighter applies.

The reference is the best figure at hand: on a measured target with ``haq_measure`` the uniform
8-bit file exported and timed in the same rounds as the last checked candidate; else the exact
count (size, BitOps) or the latency model's whole-model prediction.
"""

from __future__ import annotations

from typing import Any

from fxsculpt.hardware.budget import Budget
from fxsculpt.passes.base import Context
from fxsculpt.quant.haq.cost import UNITS, BudgetSpec
from fxsculpt.quant.haq.verify import Check


def ratio_reference(spec: BudgetSpec, checks: list[Check], target: str) -> tuple[float, str]:
    """The uniform 8-bit cost the ratio multiplies, and a phrase saying where it came from."""
    if spec.metric == "latency" and checks and checks[-1].reference_ms is not None:
        return checks[-1].reference_ms, f"its exported file measured on {target}"
    if spec.metric == "latency":
        return spec.reference_8bit, f"predicted by the latency model of {target}"
    return spec.reference_8bit, "exact count"


def publish_ratio_limit(ctx: Context, spec: BudgetSpec, checks: list[Check]) -> dict[str, Any] | None:
    """Add the resolved ratio limit to ``ctx.budget``; returns what was added (None: no ratio)."""
    if spec.ratio is None:
        return None
    reference, how = ratio_reference(spec, checks, ctx.target)
    value = spec.ratio * reference
    unit = UNITS.get(spec.metric, "")
    source = f"quantize.{spec.metric}_ratio={spec.ratio:g}"
    detail = f"{spec.ratio:g} x uniform 8-bit {reference:.6g}{unit} ({how})"
    budget = ctx.budget if isinstance(ctx.budget, Budget) else Budget()
    ctx.budget = budget.with_limit(spec.metric, value, source, detail)
    return {
        "metric": spec.metric,
        "limit": value,
        "reference_8bit": reference,
        "source": source,
        "detail": detail,
    }
