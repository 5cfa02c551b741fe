"""Which layers of an 8-bit model stay float: decided from measured per-layer latency on the target.

An integer kernel does not pay everywhere. On ONNX Runtime's CPU kernels a depthwise or
tiny-channel convolution, or an op with no integer kernel between two that have one, can run
slower as int8 than as float once the QuantizeLinear/DequantizeLinear around it are counted.
Rather than a fixed rule (no depthwise, no first layer), the placement here prices every
candidate assignment with the target's latency table — each kernel measured alone on the
runtime, at int8 and at float, and each standalone float/int8 conversion measured as its own
kernel (:mod:`hardware.qdq`, :class:`quant.haq.hardware_cost.ExactLatency`) — and keeps a layer
float when that makes the whole model faster:

1. start from every layer at int8;
2. sweep the layers, flipping one layer, or a run of up to ``max_run`` consecutive layers, to
   float when the predicted model latency drops by more than ``min_gain`` (relative); repeat the
   sweeps until none helps (a local optimum; each evaluation is a table look-up, milliseconds);
3. compare with the all-float model, so the chosen assignment is never predicted slower than float;
4. put back to int8 every float layer whose return does not slow the prediction (int8 weights are
   4× smaller; a run flipped together may hold layers that did not need to be float).

Each float layer is reported with the predicted latency of the model with that layer at int8
against float (its reason). The whole-model check of the exported files is the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from fxsculpt.ir.graph import IR

Bits = int | None
INT8: tuple[Bits, Bits] = (8, 8)
FLOAT: tuple[Bits, Bits] = (None, None)


@dataclass
class Placement:
    """The outcome of :func:`place_float_layers`: per layer int8 or float, with predicted latencies (ms)."""

    policy: list[tuple[Bits, Bits]]
    int8_ms: float  # every layer int8
    float_ms: float  # every layer float
    chosen_ms: float
    reasons: dict[str, str] = field(default_factory=dict)  # float layer → why
    table_lookups: int = 0  # latency-table look-ups the search made (remembered policies included)

    def float_layers(self, layers: Sequence[fx.Node]) -> list[str]:
        return [node.name for node, p in zip(layers, self.policy, strict=True) if p == FLOAT]

    def summary(self, layers: Sequence[fx.Node]) -> dict[str, Any]:
        return {
            "method": "measured per-layer latency table (int8 and float kernels, float/int8 conversions)",
            "predicted_ms": {
                "all_int8": round(self.int8_ms, 4),
                "all_float": round(self.float_ms, 4),
                "chosen": round(self.chosen_ms, 4),
            },
            "float_layers": [
                {"layer": name, "reason": self.reasons.get(name, "")} for name in self.float_layers(layers)
            ],
            "table_lookups": self.table_lookups,
        }


def place_float_layers(
    q_ir: IR,
    layers: Sequence[fx.Node],
    table: Any,
    max_run: int = 3,
    min_gain: float = 0.005,
    max_sweeps: int = 4,
) -> Placement:
    """Choose int8 or float per layer of ``q_ir`` (quantizers in place, every layer 8-bit) from ``table``.

    ``table`` is a :class:`hardware.latency_table.LatencyTable` of the target (ort-cpu).
    Leaves ``q_ir`` with the chosen bits set (:func:`quant.haq.env.apply_policy`).
    """
    from fxsculpt.quant.haq.env import apply_policy
    from fxsculpt.quant.haq.hardware_cost import ExactLatency, ort_cpu_canonical

    exact = ExactLatency(q_ir, layers, table, ort_cpu_canonical, runtime_plan=True)
    n = len(layers)
    policy = [INT8] * n
    int8_ms = exact(policy)
    float_ms = exact([FLOAT] * n)
    best = int8_ms
    for _ in range(max_sweeps):
        improved = False
        for start in range(n):
            if policy[start] == FLOAT:
                continue
            for length in range(1, max_run + 1):
                stop = start + length
                if stop > n:
                    break
                trial = policy[:start] + [FLOAT] * length + policy[stop:]
                ms = exact(trial)
                if ms < best * (1 - min_gain):
                    policy, best, improved = trial, ms, True
                    break
        if not improved:
            break
    if float_ms < best * (1 - min_gain):
        policy, best = [FLOAT] * n, float_ms
    # A layer flipped with its neighbours goes back to int8 (4x smaller) where that is no slower.
    for i in range(n):
        if policy[i] == FLOAT:
            trial = [*policy[:i], INT8, *policy[i + 1 :]]
            ms = exact(trial)
            if ms <= best:
                policy, best = trial, ms
    reasons = _reasons(exact, policy, layers, best)
    apply_policy(q_ir, list(layers), policy)
    return Placement(policy, int8_ms, float_ms, best, reasons, exact.lookups)


def _reasons(
    exact: Any, policy: list[tuple[Bits, Bits]], layers: Sequence[fx.Node], best: float
) -> dict[str, str]:
    """Why each float layer is float: the model predicted with that layer back at int8."""
    reasons = {}
    for i, node in enumerate(layers):
        if policy[i] != FLOAT:
            continue
        with_int8 = exact([*policy[:i], INT8, *policy[i + 1 :]])
        reasons[node.name] = (
            f"int8 here predicts {with_int8:.4f} ms for the model, float {best:.4f} ms "
            "(kernel and float/int8 conversions from the measured latency table)"
        )
    return reasons
