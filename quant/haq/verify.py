"""Check the chosen policy on its exported file, and keep lowering bits until the file meets the budget.

HAQ's enforcement (§3.3, the official code) walks the layers from last to first lowering bits
until the *predicted* cost fits. On a measured target the prediction is a model of the
runtime, so after the search the policy is exported and timed (:class:`quant.haq.meter.
PolicyMeter`); while the file measures over the budget's target, the walk continues where it
stopped, on the prediction rescaled by the measured/predicted ratio of the last file (one
step at least each time), and the new policy is exported and timed again. The cheapest policy
(every layer at the lowest level) is the last resort; if even its file is over, the budget
cannot be met on this machine and that is a :class:`~ir.errors.BudgetError` (exit code 3).

A ratio budget is judged against the uniform 8-bit file timed in the same interleaved rounds
as the candidate, so a machine that got busier or quieter since the search does not move it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fxsculpt.ir.errors import BudgetError
from fxsculpt.quant.haq.actions import BitLevels
from fxsculpt.quant.haq.cost import BudgetSpec
from fxsculpt.quant.haq.enforce import Policy, enforce, lowest_policy
from fxsculpt.quant.haq.meter import PolicyMeter


@dataclass
class Check:
    """One exported candidate: what the prediction said, what the file measured, against what limit."""

    policy: list[list[Any]]
    predicted_ms: float
    measured_ms: float
    limit_ms: float
    target_ms: float
    reference_ms: float | None
    met: bool
    phase: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 6)
        return out


def verify_on_export(
    policy: Policy,
    predict: Callable[[Policy], float],
    meter: PolicyMeter,
    budget: BudgetSpec,
    levels: BitLevels,
    project: Callable[[Policy], Policy] | None = None,
    max_checks: int = 8,
    phase: str = "",
) -> tuple[Policy, list[Check]]:
    """The first policy on the enforcement walk from ``policy`` whose exported file measures
    within ``budget.target``, and every check made (module docstring).

    The walk's cost between checks is the prediction anchored at the measured cheapest file:
    ``m_floor + f · (predict(p) − predict(floor))`` with ``f`` fitted to the last candidate's
    measurement, so the cheapest policy costs what its file measured and the candidate what
    its file measured.
    """
    proj: Callable[[Policy], Policy] = project if project is not None else (lambda p: p)
    n = len(policy)
    floor = proj(lowest_policy(n, levels, True))
    uniform8 = proj([(8, 8)] * n)
    anchors = {"floor": meter.export(floor, "floor")}
    if budget.ratio is not None:
        anchors["reference"] = (
            anchors["floor"] if uniform8 == floor else meter.export(uniform8, "reference-8bit")
        )
    checks: list[Check] = []
    current = proj(list(policy))
    while True:
        files = {"policy": meter.export(current, f"check-{len(checks)}"), **anchors}
        measured = meter.measure(files)
        ref_ms = measured.get("reference")
        limit = budget.limit_for(ref_ms)
        target = limit * (1.0 - budget.margin)
        predicted = predict(current)
        met = measured["policy"] <= target
        checks.append(
            Check(
                [[w, a] for w, a in current], predicted, measured["policy"], limit, target, ref_ms, met, phase
            )
        )
        if met:
            return current, checks
        floor_ms, floor_pred = measured["floor"], predict(floor)
        if current == floor or floor_ms > target or len(checks) >= max_checks:
            raise BudgetError(
                f"HAQ: the exported model measures {measured['policy']:.4g} ms, over the latency budget "
                f"{target:.4g} ms (every layer at {levels.levels[0]} bits measures {floor_ms:.4g} ms; "
                f"{len(checks)} candidate(s) checked)"
            )
        span = predicted - floor_pred
        if span <= 0:  # the prediction cannot tell this candidate from the cheapest: take that
            current = floor
            continue
        slope = (measured["policy"] - floor_ms) / span

        def anchored(
            p: Policy, slope: float = slope, floor_ms: float = floor_ms, floor_pred: float = floor_pred
        ) -> float:
            return floor_ms + slope * (predict(proj(p)) - floor_pred)

        lowered, _ = enforce(
            current, anchored, target, levels, lower_activations=True, what="latency", unit=" ms"
        )
        current = proj(lowered)
