"""Calibrate the latency table against two whole exported models (uniform int8 and all float).

Single-layer measurements do not add up to a whole model exactly: each single layer runs
with its weights and activations hot in cache and, for int8, with its input already uint8
(measured on this CPU: MobileNet's int8 layers sum to ~1.3x the int8 model, its float layers
to ~0.85x the float model). The errors differ in sign between integer and float kernels,
so one factor would not do; two do. With the predicted parts of the two anchor policies,
``o + s_int·I + s_other·F`` (:class:`quant.haq.hardware_cost.LatencyParts`), and their measured
latencies ``M_8`` and ``M_fp``, the two scales solve

    [I_8   F_8 ] [s_int  ]   [M_8  − o]
    [I_fp  F_fp] [s_other] = [M_fp − o]

so the calibrated model reproduces both anchors and interpolates between them; the uniform
8-bit reference of a ratio budget is then the measured one, not the table's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fxsculpt.quant.haq.hardware_cost import ExactLatency, LatencyParts
from fxsculpt.quant.haq.meter import PolicyMeter

#: Scales outside this range mean a broken measurement, not a table that is off.
SCALE_RANGE = (0.2, 5.0)


@dataclass
class Calibration:
    """The anchors' table predictions (before calibration) and measured latencies (ms), and the
    scales fitted to them."""

    int8_predicted: float
    float_predicted: float
    int8_measured: float
    float_measured: float
    scale_integer: float
    scale_other: float

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def _clamp(value: float) -> float:
    return min(max(value, SCALE_RANGE[0]), SCALE_RANGE[1])


def solve_scales(
    int8: LatencyParts, flt: LatencyParts, int8_ms: float, float_ms: float
) -> tuple[float, float]:
    """(s_int, s_other) reproducing both measured anchors (module docstring); a degenerate or
    unphysical solution falls back to one common scale fitted to the pair."""
    a, b = int8.integer, int8.other
    c, d = flt.integer, flt.other
    y1, y2 = int8_ms - int8.overhead, float_ms - flt.overhead
    det = a * d - b * c
    if abs(det) > 1e-12:
        s_int, s_other = (y1 * d - b * y2) / det, (a * y2 - c * y1) / det
        if SCALE_RANGE[0] <= s_int <= SCALE_RANGE[1] and SCALE_RANGE[0] <= s_other <= SCALE_RANGE[1]:
            return s_int, s_other
    total = a + b + c + d
    common = _clamp((y1 + y2) / total) if total > 0 else 1.0
    return common, common


def calibrate_latency(exact: ExactLatency, meter: PolicyMeter, n_layers: int) -> Calibration:
    """Export and measure the uniform int8 and all-float policies, fit ``exact.scales`` to them."""
    int8: list[tuple[int | None, int | None]] = [(8, 8)] * n_layers
    flt: list[tuple[int | None, int | None]] = [(None, None)] * n_layers
    exact.scales = (1.0, 1.0)
    parts8, partsf = exact.parts(int8), exact.parts(flt)
    files = {"int8": meter.export(int8, "anchor-int8"), "float": meter.export(flt, "anchor-float")}
    measured = meter.measure(files)
    exact.scales = solve_scales(parts8, partsf, measured["int8"], measured["float"])
    return Calibration(
        int8_predicted=parts8.overhead + parts8.integer + parts8.other,
        float_predicted=partsf.overhead + partsf.integer + partsf.other,
        int8_measured=measured["int8"],
        float_measured=measured["float"],
        scale_integer=exact.scales[0],
        scale_other=exact.scales[1],
    )
