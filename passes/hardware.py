"""The ``hardware`` pass: measure the exported model on the target and check the budget.

It runs after the export pass (placement ``"check"``; added unasked whenever ``--budget``
is given) on the staged ``model.onnx`` itself, so the number checked is the number of the
file handed over. It re-measures the whole model at batch 1 on ``ctx.target`` with
``ctx.threads`` (median, p90, a spread flag), profiles it per node and maps kernels back to
IR nodes (:mod:`hardware.profiler`), counts parameters, MACs, BitOps and packed size on the
final IR (:mod:`hardware.counts`) and, for ``accuracy_drop``, evaluates the ONNX model on
the test split with ONNX Runtime.

With ``compare`` (the default) it also exports and measures the float reference the pipeline
kept (:mod:`passes.comparison`), the same way, for the report's before/after table. The
budget is ``--budget`` plus any limit a pass resolved (``quantize.latency_ratio``, ...), each
constraint naming its source.

A model over budget is never left as ``model.onnx``: the staged file is renamed
``model.over-budget.onnx``, the per-layer table of where the time and bytes go is logged and
put in the ``hardware`` section, and :class:`~ir.errors.BudgetError` (exit code 3) names the
constraints missed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tabulate import tabulate

from fxsculpt.hardware.budget import Budget, Constraint
from fxsculpt.hardware.counts import ModelCounts, count_model
from fxsculpt.hardware.profiler import attach_latencies, profile_onnx
from fxsculpt.hardware.runtime import batch_of, cpu_name, measurement_session
from fxsculpt.hardware.targets import ModelLatency, Target, get_target
from fxsculpt.ir.errors import BadInputError, BudgetError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, Pass
from fxsculpt.passes.comparison import comparison_section, measure_reference, measured_column
from fxsculpt.passes.options import option

OVER_BUDGET_NAME = "model.over-budget.onnx"


@dataclass
class HardwareOptions:
    profile_runs: int = option(20, "profiled runs for the per-layer times (after 5 warm-up runs)")
    max_seconds: float = option(2.0, "time cap of the whole-model latency measurement, seconds")
    max_spread: float = option(1.5, "p90/median above this flags the latency as too noisy to trust")
    per_layer: bool = option(True, "profile per layer (ort-cpu) and report where the time goes")
    compare: bool = option(
        True,
        "also export and measure the float reference (the model after train/fold_bn/dce) the same way, "
        "for the report's before/after table (report.json 'comparison')",
    )
    clock: Literal["auto", "cpu", "wall"] = option(
        "auto",
        "ort-cpu latency clock: 'cpu' (thread CPU time, robust on a busy machine), 'wall', or 'auto' (cpu at 1 thread)",
    )
    bitserial_bricks: int = option(8192, "bitserial: 2-bit BitBricks in the array")
    bitserial_freq_mhz: float = option(500.0, "bitserial: clock frequency, MHz")
    bitserial_bandwidth_gbs: float = option(25.6, "bitserial: DRAM bandwidth, GB/s")
    bitserial_combine: Literal["max", "sum"] = option(
        "max", "bitserial: 'max' (roofline, overlapped) or 'sum' of compute and memory"
    )

    def __post_init__(self) -> None:
        if self.profile_runs < 1 or self.max_seconds <= 0 or self.max_spread < 1:
            raise ValueError("hardware.profile_runs >= 1, max_seconds > 0 and max_spread >= 1 are required")


def make_target(name: str, threads: int, opts: HardwareOptions) -> Target:
    """The target ``name`` configured from the pass options."""
    if name == "bitserial":
        return get_target(
            name,
            threads,
            bricks=opts.bitserial_bricks,
            freq_mhz=opts.bitserial_freq_mhz,
            bandwidth_gbs=opts.bitserial_bandwidth_gbs,
            combine=opts.bitserial_combine,
        )
    if name == "ort-cpu":
        clock = None if opts.clock == "auto" else opts.clock
        return get_target(
            name, threads, max_seconds=opts.max_seconds, max_spread=opts.max_spread, clock=clock
        )
    return get_target(name, threads)


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray, threads: int = 1) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on inputs ``x`` and labels ``y`` (ONNX Runtime)."""
    session = measurement_session(path, threads)
    name = session.get_inputs()[0].name
    fixed = batch_of(session)
    step = fixed or 256
    correct = 0
    for start in range(0, len(x), step):
        chunk = np.ascontiguousarray(x[start : start + step], dtype=np.float32)
        n = len(chunk)
        if fixed is not None and n < fixed:  # a fixed-batch model: pad the last chunk
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), np.float32)])
        logits = np.asarray(session.run(None, {name: chunk})[0])[:n]
        correct += int((logits.reshape(n, -1).argmax(axis=1) == y[start : start + n]).sum())
    return correct / max(len(x), 1)


def per_layer_rows(
    ir: IR, counts: ModelCounts, latency: ModelLatency, kernels: list[Any]
) -> list[dict[str, Any]]:
    """One row per kernel (ort-cpu) or layer (bitserial): time, share, MACs, bytes and bits."""
    by_name = {row.name: row for row in counts.layers}
    rows: list[dict[str, Any]] = []
    if kernels:
        total = sum(k.ms for k in kernels) or 1.0
        for k in kernels:
            layer = by_name.get(k.primary or "")
            rows.append(
                {
                    "node": k.primary or k.onnx_node,
                    "fused": [n for n in k.ir_nodes if n != k.primary],
                    "onnx_node": k.onnx_node,
                    "op": k.op_type,
                    "ms": round(k.ms, 5),
                    "share": round(k.ms / total, 4),
                    "macs": layer.macs if layer else 0,
                    "size_bytes": layer.size_bytes if layer else 0,
                    "weight_bits": layer.weight_bits if layer else None,
                    "act_bits": layer.act_bits if layer else None,
                }
            )
        return rows
    analytic = latency.details.get("per_layer", [])
    total = sum(r["ms"] for r in analytic) or 1.0
    for r in analytic:
        layer = by_name.get(r["node"])
        rows.append(
            {
                "node": r["node"],
                "op": layer.op if layer else "",
                "ms": r["ms"],
                "share": round(r["ms"] / total, 4),
                "compute_ms": r["compute_ms"],
                "memory_ms": r["memory_ms"],
                "macs": layer.macs if layer else 0,
                "size_bytes": layer.size_bytes if layer else 0,
                "weight_bits": layer.weight_bits if layer else None,
                "act_bits": layer.act_bits if layer else None,
            }
        )
    return rows


def where_table(rows: list[dict[str, Any]], counts: ModelCounts, limit: int = 15) -> str:
    """The layers that cost the most time, then the most bytes, as one text table."""
    by_time = sorted(rows, key=lambda r: -r["ms"])[:limit]
    table = [
        [
            r["node"],
            r["op"],
            f"{r['ms']:.4f}",
            f"{100 * r['share']:.1f}%",
            f"{r['macs']:,}",
            f"{r['size_bytes']:,}",
            f"w{r['weight_bits'] or 32}/a{r['act_bits'] or 32}",
        ]
        for r in by_time
    ]
    text = tabulate(table, headers=["layer", "op", "ms", "time", "MACs", "bytes", "bits"], tablefmt="simple")
    by_size = sorted(counts.layers, key=lambda r: -r.size_bytes)[:limit]
    total = counts.size_bytes or 1
    size_table = [
        [
            r.name,
            r.op,
            f"{r.size_bytes:,}",
            f"{100 * r.size_bytes / total:.1f}%",
            f"{r.params:,}",
            f"w{r.weight_bits or 32}",
        ]
        for r in by_size
    ]
    text += "\n\n" + tabulate(
        size_table, headers=["layer", "op", "bytes", "size", "params", "bits"], tablefmt="simple"
    )
    return text


class Hardware(Pass):
    """Measure the exported model on the target (latency, per-layer times, exact counts) and check --budget."""

    name = "hardware"
    Options = HardwareOptions
    placement = "check"

    @classmethod
    def wanted(cls, ctx: Context) -> bool:
        return ctx.budget is not None

    def run(self, ir: IR, ctx: Context) -> IR:
        opts: HardwareOptions = self.options
        target = make_target(ctx.target, ctx.threads, opts)
        budget: Budget | None = ctx.budget
        if budget is not None and budget.accuracy_drop is not None:
            self._check_accuracy_inputs(ctx)  # before spending seconds on measurements
        staged = ctx.artifacts.get("model.onnx")
        compare = opts.compare and ctx.reference_ir is not None
        compare_accuracy = compare and ctx.data is not None and ir.num_classes is not None
        with tempfile.TemporaryDirectory(prefix="fxsculpt-hardware-") as tmp:
            onnx_path = staged if staged is not None and staged.exists() else None
            exported_here = False
            needs_file = (budget is not None and budget.accuracy_drop is not None) or compare_accuracy
            if onnx_path is None and (not target.analytical or needs_file):
                onnx_path = Path(tmp) / "model.onnx"
                _export_for_measurement(ir, onnx_path, ctx.seed)
                exported_here = True
            latency = target.model_latency(ir, onnx_path, batch=1)
            kernels: list[Any] = []
            if opts.per_layer and not target.analytical and onnx_path is not None:
                profile = profile_onnx(onnx_path, ir, threads=ctx.threads, runs=opts.profile_runs)
                attach_latencies(ir, profile)
                kernels = profile.kernels
            counts = count_model(ir)
            onnx_bytes = onnx_path.stat().st_size if onnx_path is not None else None
            accuracy_after = None
            if budget is not None and budget.accuracy_drop is not None:
                assert onnx_path is not None
                accuracy_after = self._accuracy(onnx_path, ctx)
            elif compare_accuracy:
                assert onnx_path is not None
                accuracy_after = self._test_accuracy(onnx_path, ctx)
            final_column = measured_column(
                ir, latency, onnx_path, accuracy_after, budget, ctx.accuracy_before
            )
        if compare:
            assert ctx.reference_ir is not None
            reference = measure_reference(
                ctx.reference_ir,
                target,
                ctx.seed,
                budget,
                ctx.accuracy_before,
                accuracy_of=(lambda path: self._test_accuracy(path, ctx)) if compare_accuracy else None,
            )
            ctx.section("comparison", comparison_section(reference, final_column, target.name, latency.label))
        rows = per_layer_rows(ir, counts, latency, kernels)
        section: dict[str, Any] = {
            "target": target.name,
            "threads": ctx.threads,
            "cpu": cpu_name(),
            "label": latency.label,
            "analytical": latency.analytical,
            "latency_ms_median": round(latency.median_ms, 5),
            "latency_ms_p90": round(latency.p90_ms, 5),
            "spread_ok": latency.spread_ok,
            "clock": latency.details.get("clock", "model"),
            "wall_ms_median": latency.details.get("wall_median_ms"),
            "wall_ms_p90": latency.details.get("wall_p90_ms"),
            "runs": latency.runs,
            "batch": 1,
            "measured_file": "model.onnx"
            if not exported_here
            else "(exported by the hardware pass for measurement)",
            "onnx_file_bytes": onnx_bytes,
            "counts": counts.as_dict(),
            "per_layer": rows,
        }
        if not target.analytical:
            section["target_identity"] = target.identity()
        if not latency.spread_ok:
            ctx.logger.warning(
                "latency spread p90/median = %.2f: the machine is busy, treat %.3f ms with care",
                latency.p90_ms / max(latency.median_ms, 1e-12),
                latency.median_ms,
            )
        ctx.record(
            latency_ms=round(latency.median_ms, 4),
            p90_ms=round(latency.p90_ms, 4),
            spread_ok=latency.spread_ok,
            bitops=counts.bitops,
            size_bytes=counts.size_bytes,
        )
        if budget is None:
            ctx.section("hardware", section)
            return ir
        drop = None
        if accuracy_after is not None and ctx.accuracy_before is not None:
            drop = ctx.accuracy_before - accuracy_after
        measured: dict[str, float | None] = {
            "latency": latency.median_ms,
            "size": float(counts.size_bytes),
            "bitops": float(counts.bitops),
            "params": float(counts.params),
            "accuracy_drop": drop,
        }
        results = budget.check(measured)
        ctx.section("budget", {c.name: c.as_dict() for c in results})
        if accuracy_after is not None:
            section["accuracy_before"] = ctx.accuracy_before
            section["accuracy_after_onnx"] = accuracy_after
        missed = [c for c in results if not c.met]
        ctx.record(budget_met=not missed)
        if not missed:
            ctx.section("hardware", section)
            return ir
        table = where_table(rows, counts)
        section["over_budget_table"] = table
        ctx.section("hardware", section)
        ctx.logger.warning("model over budget; where the time and bytes go:\n%s", table)
        if staged is not None and staged.exists():
            ctx.artifacts.pop("model.onnx", None)
            renamed = ctx.stage(OVER_BUDGET_NAME)
            os.replace(staged, renamed)
            section["kept_as"] = OVER_BUDGET_NAME
        raise BudgetError("model over budget: " + "; ".join(_describe(c) for c in missed))

    def _accuracy(self, onnx_path: Path, ctx: Context) -> float:
        self._check_accuracy_inputs(ctx)
        return self._test_accuracy(onnx_path, ctx)

    @staticmethod
    def _test_accuracy(onnx_path: Path, ctx: Context) -> float:
        """Top-1 accuracy of the ONNX file on the test split (ONNX Runtime)."""
        assert ctx.data is not None
        x, y = ctx.data.test.tensors[0].cpu().numpy(), ctx.data.test.tensors[1].cpu().numpy()
        return onnx_accuracy(onnx_path, x, y, ctx.threads)

    @staticmethod
    def _check_accuracy_inputs(ctx: Context) -> None:
        if ctx.data is None:
            raise BadInputError("an accuracy_drop budget needs test data: give --data")
        if ctx.accuracy_before is None:
            raise BadInputError(
                "an accuracy_drop budget needs the accuracy before the passes (a classifier and --data)"
            )


def _describe(c: Constraint) -> str:
    if c.measured is None:
        return f"{c.name} not measured (limit {_fmt(c.name, c.limit)})"
    return f"{c.name} {_fmt(c.name, c.measured)} > {_fmt(c.name, c.limit)}"


def _fmt(name: str, value: float) -> str:
    if name == "latency":
        return f"{value:.3g} ms"
    if name == "size":
        return f"{value:,.0f} B"
    if name == "accuracy_drop":
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def _export_for_measurement(ir: IR, path: Path, seed: int) -> None:
    """Export ``ir`` when no export pass staged a file (``Pipeline(..., export=False)``)."""
    import copy

    from fxsculpt.passes.export import export_onnx

    gm = copy.deepcopy(ir.gm).cpu().eval()
    export_onnx(gm, ir.example_input(batch=2, seed=seed).cpu(), path, dynamic_batch=True)
