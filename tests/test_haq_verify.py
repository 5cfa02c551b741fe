"""The check of the exported file: calibration scales, and lowering bits until the file fits.

A stand-in meter plays the hardware: its "measured" latency of a policy is a formula chosen
here (float layers cost twice what the prediction says), so the policy the check must end on
is worked out by hand along the official enforcement walk (last layer first).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fxsculpt.ir.errors import BudgetError
from fxsculpt.quant.haq.actions import BitLevels, Bits
from fxsculpt.quant.haq.calibration import solve_scales
from fxsculpt.quant.haq.cost import BudgetSpec
from fxsculpt.quant.haq.hardware_cost import LatencyParts, int8_or_float
from fxsculpt.quant.haq.verify import verify_on_export

FP = None
LEVELS = BitLevels(8, 8, with_float=True)  # ort-cpu after dominated levels are dropped: int8, float
FLOAT_COST = [0.1, 0.2, 0.3, 0.4]  # predicted extra ms of each layer in float


def predict(policy: list[tuple[Bits, Bits]]) -> float:
    return 1.0 + sum(c for c, (_, a) in zip(FLOAT_COST, policy, strict=True) if a is None)


class FakeMeter:
    """Files are names; a file measures ``speed · (1 + factor · Σ float costs)``."""

    def __init__(self, factor: float, speeds: list[float] | None = None) -> None:
        self.factor = factor
        self.speeds = speeds or [1.0]
        self.policies: dict[Path, list[tuple[Bits, Bits]]] = {}
        self.calls = 0

    def export(self, policy: list[tuple[Bits, Bits]], name: str) -> Path:
        path = Path(name)
        self.policies[path] = list(policy)
        return path

    def measure(self, files: dict[str, Path]) -> dict[str, float]:
        speed = self.speeds[min(self.calls, len(self.speeds) - 1)]
        self.calls += 1
        return {k: speed * (1.0 + self.factor * (predict(self.policies[p]) - 1.0)) for k, p in files.items()}


def _ratio_budget(ratio: float = 1.5) -> BudgetSpec:
    return BudgetSpec("latency", ratio * 1.0, 1.0, f"latency_ratio={ratio}", margin=0.0, ratio=ratio)


def test_lowering_continues_until_the_file_fits() -> None:
    # The search enforced on the prediction: [fp, fp, 8, 8] predicts 1.3 <= 1.5. Its file measures
    # 1 + 2 * 0.3 = 1.6 > 1.5 (reference int8 file: 1.0). Walking on from the last layer, layers 3
    # and 2 are int8 already; layer 1 to int8 leaves 1 + 2 * 0.1 = 1.2 <= 1.5.
    meter = FakeMeter(factor=2.0)
    start = [(FP, FP), (FP, FP), (8, 8), (8, 8)]
    policy, checks = verify_on_export(start, predict, meter, _ratio_budget(), LEVELS, int8_or_float)  # type: ignore[arg-type]
    assert policy == [(FP, FP), (8, 8), (8, 8), (8, 8)]
    assert [c.met for c in checks] == [False, True]
    assert checks[0].measured_ms == pytest.approx(1.6) and checks[0].predicted_ms == pytest.approx(1.3)
    assert checks[1].measured_ms == pytest.approx(1.2)


def test_a_file_that_fits_is_handed_over_unchanged() -> None:
    meter = FakeMeter(factor=1.0)
    start = [(FP, FP), (FP, FP), (8, 8), (8, 8)]
    policy, checks = verify_on_export(start, predict, meter, _ratio_budget(), LEVELS, int8_or_float)  # type: ignore[arg-type]
    assert policy == start and len(checks) == 1 and checks[0].met


def test_ratio_budget_is_judged_against_the_reference_timed_alongside() -> None:
    # the machine is twice as slow at the second measurement: the candidate and the reference
    # both measure twice as long, so the candidate (1.2 at full speed) still fits 1.5x the reference
    meter = FakeMeter(factor=2.0, speeds=[1.0, 2.0])
    start = [(FP, FP), (FP, FP), (8, 8), (8, 8)]
    _, checks = verify_on_export(start, predict, meter, _ratio_budget(), LEVELS, int8_or_float)  # type: ignore[arg-type]
    assert checks[1].reference_ms == pytest.approx(2.0) and checks[1].limit_ms == pytest.approx(3.0)
    assert checks[1].measured_ms == pytest.approx(2.4) and checks[1].met


def test_margin_tightens_the_target() -> None:
    budget = _ratio_budget()
    budget.margin = 0.25  # target 1.125: only the all-int8 file (1.0) fits
    meter = FakeMeter(factor=2.0)
    policy, checks = verify_on_export(
        [(FP, FP), (FP, FP), (8, 8), (8, 8)],
        predict,
        meter,  # type: ignore[arg-type]
        budget,
        LEVELS,
        int8_or_float,
    )
    assert policy == [(8, 8)] * 4
    assert checks[-1].target_ms == pytest.approx(1.125) and checks[-1].met


def test_a_budget_below_the_cheapest_file_is_a_budget_error() -> None:
    budget = BudgetSpec("latency", 0.9, 1.0, "--budget")  # absolute, below the int8 file's 1.0
    with pytest.raises(BudgetError) as info:
        verify_on_export([(FP, FP)] * 4, predict, FakeMeter(2.0), budget, LEVELS, int8_or_float)  # type: ignore[arg-type]
    assert info.value.exit_code == 3 and "\n" not in str(info.value)


def test_int8_or_float_lets_the_activation_decide() -> None:
    assert int8_or_float([(8, 8), (FP, 8), (8, FP), (FP, FP)]) == [(8, 8), (8, 8), (FP, FP), (FP, FP)]


def test_calibration_scales_reproduce_both_anchors() -> None:
    int8 = LatencyParts(overhead=0.01, integer=0.3, other=0.05)
    flt = LatencyParts(overhead=0.01, integer=0.0, other=0.8)
    s_int, s_other = solve_scales(int8, flt, int8_ms=0.26, float_ms=0.95)
    # by hand: s_other = (0.95 - 0.01) / 0.8; s_int = (0.26 - 0.01 - 0.05 s_other) / 0.3
    assert s_other == pytest.approx(1.175)
    assert s_int == pytest.approx((0.25 - 0.05 * 1.175) / 0.3)


def test_calibration_falls_back_to_one_scale_when_the_anchors_disagree() -> None:
    # proportional parts: the system is singular, one common scale fits the pair in total
    int8 = LatencyParts(0.0, 1.0, 1.0)
    flt = LatencyParts(0.0, 2.0, 2.0)
    assert solve_scales(int8, flt, 3.0, 6.0) == pytest.approx((1.5, 1.5))
