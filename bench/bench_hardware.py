"""Hardware benchmark: int8 vs float32 on ONNX Runtime, and how well latency tables predict.

For each built-in model (``builtin:resnet``, ``builtin:mobilenet``, CIFAR-sized input):

- float32 and int8 (``quantize_static``: QDQ, uint8 activations, int8 per-channel weights)
  whole-model latency on ``ort-cpu`` at batch 1 and 32, 1 thread, and the speed-up;
- the latency predicted from per-layer tables (sum of single-layer measurements, minus the
  per-call overhead each includes, plus one overhead) against the measured latency, with the
  relative error, for float32 and int8 at batch 1 and 32;
- the time to build the tables from a cold cache (a temporary folder) and a warm lookup;
- the analytical ``bitserial`` latency at uniform 8/6/4/2 bits (labelled as a model).

The machine's speed drifts within a run (a shared VM), and a prediction made from tables built
at one moment is compared with a model measured at another; so the whole benchmark repeats
``--repeats`` times (default 3), each from a cold cache, and the table reports the median of
each number over the runs next to every run's error.

Run: ``python bench/bench_hardware.py`` (about two minutes on two cores). Writes
``bench/results/hardware.json`` and ``bench/results/hardware.md``. The machine is shared and
noisy: every ratio compares numbers taken in the same run, and each measurement carries its
p90/median spread.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fxsculpt.hardware.bitserial import BitserialTarget  # noqa: E402
from fxsculpt.hardware.latency_table import LatencyTable, ir_at_batch, predict_model  # noqa: E402
from fxsculpt.hardware.layers import layer_groups  # noqa: E402
from fxsculpt.hardware.ort_cpu import OrtCpuTarget  # noqa: E402
from fxsculpt.hardware.paired_prediction import paired_prediction  # noqa: E402
from fxsculpt.hardware.runtime import cpu_name, measurement_session, ort_version  # noqa: E402
from fxsculpt.ir.graph import IR  # noqa: E402
from fxsculpt.ir.load import LoadOptions, load_ir  # noqa: E402
from fxsculpt.passes.export import export_onnx  # noqa: E402

MODELS = ("resnet", "mobilenet")
BATCHES = (1, 32)


def quantize_int8(float_path: Path, int8_path: Path, input_shape: tuple[int, ...]) -> None:
    """ONNX Runtime's static QDQ quantization with the fast-path types (TOOLCHAIN.md)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.items = [
                {"x": rng.standard_normal((1, *input_shape[1:])).astype(np.float32)} for _ in range(8)
            ]

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.items.pop() if self.items else None

    quantize_static(
        str(float_path),
        str(int8_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )


def integer_kernels(path: Path, workdir: Path) -> dict[str, int]:
    """Counts of integer kernels in the graph ONNX Runtime actually runs."""
    optimized = workdir / f"{path.stem}.optimized.onnx"
    measurement_session(path, 1, optimized_model_path=optimized)
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    return {op: ops.count(op) for op in sorted(set(ops)) if op.startswith(("QLinear", "QGemm"))}


def with_uniform_bits(ir: IR, weight_bits: int | None, act_bits: int | None) -> IR:
    """A copy of ``ir`` whose every node carries the given bit-widths (weights only where MACs are)."""
    copy = ir.clone()
    copy.propagate()
    for node in copy.gm.graph.nodes:
        meta = copy.meta(node)
        meta.act_bits = act_bits
        meta.weight_bits = weight_bits if meta.macs else None
    return copy


def measure(target: OrtCpuTarget, path: Path, batch: int) -> dict[str, Any]:
    # the level the latency table is measured at, so that prediction and measurement compare
    timing = target.time_model(
        path, batch=batch, max_seconds=4.0 if batch > 1 else 2.0, optimization="extended"
    )
    return {
        "median_ms": timing.median_ms,
        "p90_ms": timing.p90_ms,
        "clock": timing.clock,
        "wall_median_ms": timing.wall_median_ms,
        "runs": timing.runs,
        "spread_ok": timing.spread_ok,
    }


def bench_model(name: str, workdir: Path, cache: Path, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    ir = load_ir(f"builtin:{name}", LoadOptions(input_shape=shape, num_classes=10))
    float_path, int8_path = workdir / f"{name}.fp32.onnx", workdir / f"{name}.int8.onnx"
    export_onnx(ir.gm.eval(), ir.example_input(batch=2), float_path, dynamic_batch=True)
    quantize_int8(float_path, int8_path, shape)
    target = OrtCpuTarget(threads=1)
    ir8 = with_uniform_bits(ir, 8, 8)
    out: dict[str, Any] = {
        "model": f"builtin:{name}",
        "input_shape": list(shape),
        "params": ir.param_count(),
        "macs": ir.mac_count(),
        "int8_kernels": integer_kernels(int8_path, workdir),
        "batches": {},
    }
    table_fp32 = LatencyTable(target, cache / "fp32")
    table_int8 = LatencyTable(target, cache / "int8")
    build_seconds = 0.0
    for batch in BATCHES:
        fp32 = measure(target, float_path, batch)
        int8 = measure(target, int8_path, batch)
        start = time.perf_counter()
        pred_fp32 = predict_model(ir, table_fp32, batch=batch)
        pred_int8 = predict_model(ir8, table_int8, batch=batch)
        build_seconds += time.perf_counter() - start
        paired = {
            kind: paired_prediction(model_ir, path, target, batch=batch, rounds=rounds)
            for kind, model_ir, path in (("fp32", ir, float_path), ("int8", ir8, int8_path))
        }
        out["batches"][str(batch)] = {
            "fp32": fp32,
            "int8": int8,
            "int8_speedup": fp32["median_ms"] / int8["median_ms"],
            "fp32_predicted_ms": pred_fp32.total_ms,
            "int8_predicted_ms": pred_int8.total_ms,
            "fp32_error": pred_fp32.total_ms / fp32["median_ms"] - 1.0,
            "int8_error": pred_int8.total_ms / int8["median_ms"] - 1.0,
            "overhead_ms": pred_fp32.overhead_ms,
            "unpredicted_nodes": pred_fp32.unpredicted,
            "fp32_paired_error": paired["fp32"].error,
            "int8_paired_error": paired["int8"].error,
            "paired": {kind: p.as_dict() for kind, p in paired.items()},
        }
    # warm: a new table object reads the cache written above, then answers from memory
    start = time.perf_counter()
    warm = LatencyTable(target, cache / "fp32")
    predict_model(ir, warm, batch=1)
    warm_predict_s = time.perf_counter() - start
    signatures = [g.signature for g in layer_groups(ir) if g.signature is not None]
    start = time.perf_counter()
    repeats = 200
    for _ in range(repeats):
        for sig in signatures:
            warm.lookup(sig)
    lookup_us = (time.perf_counter() - start) / (repeats * len(signatures)) * 1e6
    out["table"] = {
        "entries_fp32": len(table_fp32),
        "entries_int8": len(table_int8),
        "cold_build_seconds": build_seconds,
        "warm_new_table_predict_seconds": warm_predict_s,
        "warm_measurements": warm.measurements,
        "warm_lookup_us": lookup_us,
    }
    bitserial = BitserialTarget()
    out["bitserial_ms"] = {
        str(bits): bitserial.model_latency(with_uniform_bits(ir, bits, bits), None).median_ms
        for bits in (8, 6, 4, 2)
    }
    out["bitserial_ms"]["fp32"] = bitserial.model_latency(ir_at_batch(ir, 1), None).median_ms
    return out


_MEDIAN_KEYS = (
    "fp32_predicted_ms",
    "int8_predicted_ms",
    "fp32_error",
    "int8_error",
    "int8_speedup",
    "fp32_paired_error",
    "int8_paired_error",
)


def median_over_runs(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The first run's records with every latency, prediction, error and speed-up replaced by its
    median over the runs, and each run's errors kept alongside (``errors_by_run``,
    ``paired_errors_by_run``)."""
    merged = copy.deepcopy(runs[0])
    for m, model in enumerate(merged):
        for batch, row in model["batches"].items():
            rows = [run[m]["batches"][batch] for run in runs]
            for key in _MEDIAN_KEYS:
                row[key] = statistics.median(r[key] for r in rows)
            for kind in ("fp32", "int8"):
                row[kind]["median_ms"] = statistics.median(r[kind]["median_ms"] for r in rows)
                row[kind]["spread_ok"] = all(r[kind]["spread_ok"] for r in rows)
            for stem in ("error", "paired_error"):
                row[f"{stem}s_by_run"] = {k: [r[f"{k}_{stem}"] for r in rows] for k in ("fp32", "int8")}
    return merged


def _errors(values: list[float]) -> str:
    return " ".join(f"{100 * v:+.0f}" for v in values)


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Hardware benchmark",
        "",
        f"ONNX Runtime {results['onnxruntime']} on {results['cpu']}, {results['threads']} thread, "
        f"sequential, ORT_ENABLE_EXTENDED. Command: `python bench/bench_hardware.py`.",
        f"Latency in ms: median of timed runs after warm-up, on the `{results['clock']}` clock "
        "(CPU time of the one inference thread: the machine is shared, load average "
        f"{results['load_before']:.1f} before / {results['load_after']:.1f} after the run on "
        f"{results['cores']} cores; wall-clock medians are in hardware.json). "
        f"Each number is the median over {len(results['runs'])} whole runs, each from a cold table cache.",
        "int8 = `quantize_static` QDQ, uint8 activations, int8 per-channel weights.",
        "",
        "| model | batch | fp32 ms | int8 ms | int8 speed-up | spread ok (fp32/int8) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in results["models"]:
        for batch, row in model["batches"].items():
            lines.append(
                f"| {model['model']} | {batch} | {row['fp32']['median_ms']:.3f} | {row['int8']['median_ms']:.3f} "
                f"| {row['int8_speedup']:.2f}x | {row['fp32']['spread_ok']}/{row['int8']['spread_ok']} |"
            )
    lines += [
        "",
        "## Predicted against measured",
        "",
        "Error = predicted / measured − 1, where predicted = Σ single-layer latencies − the per-call "
        "overhead each includes + one overhead. Two ways to measure the same model:",
        "",
        "- **table as built**: the latency table is measured once (cold cache, each entry the lowest of "
        "3 medians), the whole model minutes apart. On this shared VM the machine's speed drifts "
        "between the two moments, so this error mixes the additive model's error with the drift.",
        f"- **paired**: the same single-layer models, the overhead model and the whole model timed in "
        f"{results['rounds']} interleaved rounds (`hardware/paired_prediction.py`); each round's "
        "prediction is compared with the same round's measurement, so drift cancels. The column is the "
        "median of the rounds' errors.",
        "",
        "'by run' lists every whole run's error in %.",
        "",
        "| model | batch | fp32 predicted | fp32 error, table as built (by run) | fp32 error, paired (by run) "
        "| int8 predicted | int8 error, table as built (by run) | int8 error, paired (by run) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in results["models"]:
        for batch, row in model["batches"].items():
            cells = []
            for kind in ("fp32", "int8"):
                table = row["errors_by_run"][kind]
                paired = row["paired_errors_by_run"][kind]
                cells += [
                    f"{row[f'{kind}_predicted_ms']:.3f}",
                    f"{100 * row[f'{kind}_error']:+.1f}% ({_errors(table)})",
                    f"**{100 * row[f'{kind}_paired_error']:+.1f}%** ({_errors(paired)})",
                ]
            lines.append(f"| {model['model']} | {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Latency tables",
        "",
        "| model | fp32 entries | int8 entries | cold build (s, both tables, both batches) | new table from disk + predict (s) | measurements when warm | warm lookup (µs) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in results["models"]:
        t = model["table"]
        lines.append(
            f"| {model['model']} | {t['entries_fp32']} | {t['entries_int8']} | {t['cold_build_seconds']:.2f} "
            f"| {t['warm_new_table_predict_seconds']:.4f} | {t['warm_measurements']} | {t['warm_lookup_us']:.2f} |"
        )
    lines += [
        "",
        "## bitserial (analytical model, not a measurement), batch 1, ms",
        "",
        "| model | fp32 (as 32-bit) | 8 bit | 6 bit | 4 bit | 2 bit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in results["models"]:
        b = model["bitserial_ms"]
        lines.append(
            f"| {model['model']} | {b['fp32']:.4f} | {b['8']:.4f} | {b['6']:.4f} | {b['4']:.4f} | {b['2']:.4f} |"
        )
    lines += ["", "int8 integer kernels in the optimized graphs:", ""]
    for model in results["models"]:
        lines.append(f"- {model['model']}: {model['int8_kernels']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated built-in models")
    parser.add_argument("--repeats", type=int, default=3, help="whole runs, each from a cold table cache")
    parser.add_argument(
        "--rounds", type=int, default=7, help="interleaved rounds of the paired (drift-cancelled) prediction"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "cpu": cpu_name(),
        "onnxruntime": ort_version(),
        "torch": torch.__version__,
        "threads": 1,
        "rounds": args.rounds,
        "clock": OrtCpuTarget(threads=1).clock,
        "cores": os.cpu_count(),
        "load_before": os.getloadavg()[0],
        "models": [],
    }
    runs: list[list[dict[str, Any]]] = []
    for repeat in range(max(1, args.repeats)):
        with tempfile.TemporaryDirectory(prefix="fxsculpt-bench-hw-") as tmp:
            work, cache = Path(tmp) / "work", Path(tmp) / "cache"
            work.mkdir()
            models = []
            for name in args.models.split(","):
                start = time.perf_counter()
                models.append(bench_model(name.strip(), work, cache, args.rounds))
                print(
                    f"run {repeat + 1}: {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr
                )
            runs.append(models)
    results["models"] = median_over_runs(runs)
    results["runs"] = runs
    results["load_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hardware.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    markdown = render(results)
    (out / "hardware.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
