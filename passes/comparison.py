"""The before/after comparison: the float reference against the exported model, measured alike.

The *float reference* is the model after the leading passes that only train it or keep its
function (``train``, ``fold_bn``, ``dce``; :attr:`passes.base.Context.reference_ir`), that is
the model a user would ship without fxsculpt's compression. The hardware pass exports it to a
temporary ONNX file and measures it exactly as it measures the exported model: latency on the
same target with the same threads and clock, exact counts (size at the real bit-widths,
parameters, MACs, BitOps), top-1 accuracy of the ONNX file on the test split with ONNX
Runtime, and the same budget check. The ``comparison`` section of ``report.json`` holds both
columns; ``report.md`` and the console show them as one table.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fxsculpt.hardware.budget import Budget
from fxsculpt.hardware.counts import count_model
from fxsculpt.hardware.targets import ModelLatency, Target
from fxsculpt.ir.graph import IR


@dataclass
class Measured:
    """One column of the comparison: what the target measured and what was counted."""

    latency_ms: float
    latency_ms_p90: float
    spread_ok: bool
    size_bytes: int
    params: int
    macs: int
    bitops: int
    onnx_file_bytes: int | None = None
    accuracy: float | None = None
    budget_met: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["latency_ms"] = round(self.latency_ms, 5)
        out["latency_ms_p90"] = round(self.latency_ms_p90, 5)
        return out

    def budget_values(self, accuracy_before: float | None) -> dict[str, float | None]:
        """The values a :class:`~hardware.budget.Budget` checks, in its keys and units."""
        drop = None
        if self.accuracy is not None and accuracy_before is not None:
            drop = accuracy_before - self.accuracy
        return {
            "latency": self.latency_ms,
            "size": float(self.size_bytes),
            "bitops": float(self.bitops),
            "params": float(self.params),
            "accuracy_drop": drop,
        }


def measured_column(
    ir: IR,
    latency: ModelLatency,
    onnx_path: Path | None,
    accuracy: float | None,
    budget: Budget | None,
    accuracy_before: float | None,
) -> Measured:
    """A :class:`Measured` from a latency measurement and the IR's exact counts."""
    counts = count_model(ir)
    column = Measured(
        latency_ms=latency.median_ms,
        latency_ms_p90=latency.p90_ms,
        spread_ok=latency.spread_ok,
        size_bytes=counts.size_bytes,
        params=counts.params,
        macs=counts.macs,
        bitops=counts.bitops,
        onnx_file_bytes=onnx_path.stat().st_size if onnx_path is not None and onnx_path.exists() else None,
        accuracy=accuracy,
    )
    if budget is not None:
        column.budget_met = all(c.met for c in budget.check(column.budget_values(accuracy_before)))
    return column


def measure_reference(
    reference: IR,
    target: Target,
    seed: int,
    budget: Budget | None,
    accuracy_before: float | None,
    accuracy_of: Any = None,
) -> Measured:
    """Export the float reference to a temporary file and measure it as the exported model is.

    ``accuracy_of(path)`` returns the ONNX file's test accuracy (None: not measured).
    """
    from fxsculpt.passes.export import export_onnx

    ir = reference.clone()
    ir.gm = ir.gm.cpu().eval()
    with tempfile.TemporaryDirectory(prefix="fxsculpt-reference-") as tmp:
        path = Path(tmp) / "reference.onnx"
        gm = copy.deepcopy(ir.gm)
        export_onnx(gm, ir.example_input(batch=2, seed=seed).cpu(), path, dynamic_batch=True)
        latency = target.model_latency(ir, path, batch=1)
        accuracy = accuracy_of(path) if accuracy_of is not None else None
        return measured_column(ir, latency, path, accuracy, budget, accuracy_before)


def comparison_section(reference: Measured, final: Measured, target: str, label: str) -> dict[str, Any]:
    """The ``comparison`` block of ``report.json``: both columns and the ratios between them."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    return {
        "target": target,
        "label": label,
        "reference": "float model after the passes that only train it (before compression)",
        "float_reference": reference.as_dict(),
        "exported": final.as_dict(),
        "size_reduction": ratio(reference.size_bytes, final.size_bytes),
        "speedup": ratio(reference.latency_ms, final.latency_ms),
        "accuracy_change": None
        if reference.accuracy is None or final.accuracy is None
        else round(final.accuracy - reference.accuracy, 6),
    }
