"""How well the sum of single-layer latencies predicts a whole model, with machine drift taken out.

A latency table is built at one moment and a model is measured at another; on a shared machine
whose speed drifts by tens of percent over minutes, the error between the two then measures the
drift as much as the table. :func:`paired_prediction` asks the table's question with the drift
cancelled: it builds the same single-layer models a :class:`~hardware.latency_table.LatencyTable`
measures, the per-call overhead model and the whole model, and times all of them in interleaved
rounds (:meth:`hardware.ort_cpu.OrtCpuTarget.time_interleaved`). Each round gives a prediction,
``o + Σ_layers max(t_layer − o, 0)`` computed as a table's is
(:func:`hardware.latency_table.additive_latency_ms`), and a measurement taken within the same
second or two, so a slow spell slows both.

The per-round errors are reported with their median: their spread says how far one moment's
timing can be trusted, the median how good the additive model is.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fxsculpt.hardware.latency_table import additive_latency_ms, ir_at_batch
from fxsculpt.hardware.layers import layer_groups
from fxsculpt.hardware.ort_cpu import OrtCpuTarget, overhead_model
from fxsculpt.hardware.single_layer import build_single_layer
from fxsculpt.ir.graph import IR

_OVERHEAD = "overhead"
_MODEL = "model"


@dataclass
class PairedPrediction:
    """Predicted and measured latency (ms) of one model, median over interleaved rounds."""

    predicted_ms: float
    measured_ms: float
    error: float  # median over rounds of predicted / measured − 1
    round_errors: list[float]
    round_predicted_ms: list[float]
    round_measured_ms: list[float]
    overhead_ms: float
    single_layer_models: int  # distinct signatures timed
    spread_ok: bool  # every timing of the whole model had an acceptable p90 / median

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_prediction(
    ir: IR,
    model: str | Path | bytes,
    target: OrtCpuTarget,
    batch: int = 1,
    rounds: int = 7,
    max_seconds: float = 0.3,
) -> PairedPrediction:
    """Predict ``model`` (the ONNX file of ``ir`` at the bit-widths its metadata carries) from its
    layers and measure it, in the same ``rounds`` interleaved rounds, at ``batch``."""
    at_batch = ir_at_batch(ir, batch)
    layers = [(g.signature, g.module) for g in layer_groups(at_batch) if g.signature is not None]
    keys = [signature.key() for signature, _ in layers]
    singles: dict[str, bytes] = {}
    for (signature, module), key in zip(layers, keys):
        if key not in singles:
            singles[key] = build_single_layer(signature, module)
    files: dict[str, str | Path | bytes] = {f"layer:{k}": v for k, v in singles.items()}
    files[_OVERHEAD] = overhead_model()
    files[_MODEL] = model
    timings = target.time_interleaved(
        files,
        batch=batch,
        rounds=rounds,
        max_seconds=max_seconds,
        fallback_shape=tuple(ir.input_shape),
        optimization="extended",  # the level the latency table's single layers are measured at
    )
    n = len(timings[_MODEL])
    predicted: list[float] = []
    measured: list[float] = []
    for r in range(n):
        overhead = timings[_OVERHEAD][r].median_ms
        predicted.append(additive_latency_ms([timings[f"layer:{k}"][r].median_ms for k in keys], overhead))
        measured.append(timings[_MODEL][r].median_ms)
    errors = [p / m - 1.0 for p, m in zip(predicted, measured)]
    return PairedPrediction(
        predicted_ms=statistics.median(predicted),
        measured_ms=statistics.median(measured),
        error=statistics.median(errors),
        round_errors=errors,
        round_predicted_ms=predicted,
        round_measured_ms=measured,
        overhead_ms=statistics.median(t.median_ms for t in timings[_OVERHEAD]),
        single_layer_models=len(singles),
        spread_ok=all(t.spread_ok for t in timings[_MODEL]),
    )
