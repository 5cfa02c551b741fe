"""``python cli.py profile MODEL``: where a model's time goes on a hardware target.

MODEL is an ``.onnx`` file (measured as it is), or a ``.pt``/``.pt2`` file or
``builtin:NAME`` (loaded into the IR, exported to a temporary ONNX file and measured; layer
rows then carry MACs and bit-widths from the IR). Prints a table of layers (measured time,
share of the total, MACs, bits) and the totals: whole-model median and p90 latency, the
spread flag, parameters, MACs, BitOps, packed size and peak activation memory. On the
``bitserial`` target every number is an analytical estimate and is labelled so.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from tabulate import tabulate

from fxsculpt.hardware.counts import count_model
from fxsculpt.hardware.profiler import profile_onnx
from fxsculpt.hardware.runtime import cpu_name
from fxsculpt.hardware.targets import TARGET_NAMES, get_target
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``profile`` subcommand's arguments (the CLI owns the parser, this module its contents)."""
    parser.add_argument("model", help="a .onnx, .pt/.pth or .pt2 file, or builtin:NAME")
    parser.add_argument("--target", default="ort-cpu", choices=TARGET_NAMES, help="hardware target (ort-cpu)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (1)")
    parser.add_argument("--per-layer", action="store_true", help="list every layer, not only the 10 slowest")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--clock",
        default="auto",
        choices=("auto", "cpu", "wall"),
        help="ort-cpu latency clock: cpu (thread CPU time; the default at 1 thread, robust on a busy machine) or wall",
    )
    parser.add_argument("--runs", type=int, default=20, help="profiled runs for per-layer times (20)")
    parser.add_argument(
        "--trust-model",
        action="store_true",
        help="allow loading a fully pickled model (unpickling runs code)",
    )
    parser.add_argument("--model-class", help="package.module:ClassName to load a state dict into")
    parser.add_argument("--input-shape", help="input shape with batch, e.g. 1,3,32,32")
    parser.add_argument("--num-classes", type=int, help="classes of a built-in model (10)")
    parser.add_argument("--in-channels", type=int, help="input channels of a built-in model (3)")
    parser.add_argument(
        "--model-opt", action="append", default=[], metavar="KEY=VALUE", help="a built-in model's option"
    )
    parser.add_argument(
        "--leaf-modules", default="", help="comma-separated module names tracing keeps opaque"
    )


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise BadInputError(f"bad --input-shape {text!r}: expected integers like 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise BadInputError(f"bad --input-shape {text!r}: expected positive integers like 1,3,32,32")
    return shape


def _load(args: argparse.Namespace) -> IR:
    from fxsculpt.ir.load import LoadOptions, load_ir

    options: dict[str, Any] = {}
    for item in getattr(args, "model_opt", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"bad --model-opt {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    shape = _parse_shape(args.input_shape) if getattr(args, "input_shape", None) else None
    load = LoadOptions(
        trust_model=bool(getattr(args, "trust_model", False)),
        model_class=getattr(args, "model_class", None),
        input_shape=shape,
        num_classes=getattr(args, "num_classes", None),
        model_options=options,
        leaf_modules=tuple(s for s in (getattr(args, "leaf_modules", "") or "").split(",") if s.strip()),
    )
    if getattr(args, "in_channels", None):
        load.in_channels = int(args.in_channels)
    if shape is not None and len(shape) == 4:
        load.in_channels, load.image_size = shape[1], shape[2]
    return load_ir(args.model, load)


def profile_model(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and profile ``args.model``; the result ``run_profile`` prints."""
    if args.threads < 1:
        raise BadInputError("--threads must be >= 1")
    source = str(args.model)
    is_onnx = source.lower().endswith(".onnx")
    if is_onnx and not Path(source).is_file():
        raise BadInputError(f"ONNX file {source} does not exist")
    ir = None if is_onnx else _load(args)
    clock = getattr(args, "clock", "auto")
    options: dict[str, Any] = {} if args.target != "ort-cpu" or clock == "auto" else {"clock": clock}
    target = get_target(args.target, args.threads, **options)
    result: dict[str, Any] = {
        "model": source,
        "target": target.name,
        "label": target.label,
        "threads": args.threads,
        "cpu": cpu_name(),
    }
    with tempfile.TemporaryDirectory(prefix="fxsculpt-profile-") as tmp:
        onnx_path: Path | None = Path(source) if is_onnx else None
        if ir is not None and not target.analytical:
            from fxsculpt.passes.export import export_onnx

            onnx_path = Path(tmp) / "model.onnx"
            gm = ir.gm.eval()
            export_onnx(gm, ir.example_input(batch=ir.input_shape[0]).cpu(), onnx_path, dynamic_batch=False)
        batch = ir.input_shape[0] if ir is not None else 1
        latency = target.model_latency(ir, onnx_path, batch=batch)
        result.update(
            latency_ms_median=latency.median_ms,
            latency_ms_p90=latency.p90_ms,
            spread_ok=latency.spread_ok,
            clock=latency.details.get("clock", "model"),
            wall_ms_median=latency.details.get("wall_median_ms"),
            batch=batch,
        )
        layers: list[dict[str, Any]] = []
        counts = count_model(ir) if ir is not None else None
        by_name = {row.name: row for row in counts.layers} if counts is not None else {}
        if target.analytical:
            for r in latency.details.get("per_layer", []):
                row = by_name.get(r["node"])
                layers.append(_row(r["node"], row.op if row else "", r["ms"], row, []))
        else:
            assert onnx_path is not None
            profile = profile_onnx(onnx_path, ir, threads=args.threads, runs=max(1, args.runs), batch=batch)
            for k in profile.kernels:
                row = by_name.get(k.primary or "")
                fused = [n for n in k.ir_nodes if n != k.primary]
                layers.append(_row(k.primary or k.onnx_node, k.op_type, k.ms, row, fused))
            result["profiled_run_ms"] = profile.run_ms
    total = sum(r["ms"] for r in layers) or 1.0
    for r in layers:
        r["share"] = r["ms"] / total
    result["layers"] = layers
    result["layers_total_ms"] = sum(r["ms"] for r in layers)
    if counts is not None:
        result["counts"] = counts.as_dict()
    return result


def _row(name: str, op: str, ms: float, layer: Any, fused: list[str]) -> dict[str, Any]:
    return {
        "layer": name,
        "op": op,
        "fused": fused,
        "ms": ms,
        "macs": layer.macs if layer is not None else None,
        "weight_bits": layer.weight_bits if layer is not None else None,
        "act_bits": layer.act_bits if layer is not None else None,
    }


def render(result: dict[str, Any], per_layer: bool) -> str:
    """The human-readable tables of :func:`profile_model`'s result."""
    layers = result["layers"]
    shown = layers if per_layer else sorted(layers, key=lambda r: -r["ms"])[:10]
    rows = [
        [
            r["layer"] + (f" (+{len(r['fused'])} fused)" if r["fused"] else ""),
            r["op"],
            f"{r['ms']:.4f}",
            f"{100 * r['share']:.1f}%",
            f"{r['macs']:,}" if r["macs"] is not None else "-",
            _bits(r) if r["macs"] is not None else "-",
        ]
        for r in shown
    ]
    title = (
        "every layer" if per_layer else f"the {len(shown)} slowest of {len(layers)} layers (--per-layer: all)"
    )
    lines = [f"{result['model']} on {result['target']}: {result['label']}; {title}", ""]
    lines.append(tabulate(rows, headers=["layer", "op", "ms", "share", "MACs", "bits"], tablefmt="simple"))
    lines.append("")
    spread = "" if result["spread_ok"] else "  (spread too wide: the machine is busy, do not trust)"
    lines.append(
        f"latency: median {result['latency_ms_median']:.4f} ms, p90 {result['latency_ms_p90']:.4f} ms "
        f"({result['clock']} clock) at batch {result['batch']}, {result['threads']} thread(s){spread}"
    )
    lines.append(f"sum of layers: {result['layers_total_ms']:.4f} ms")
    counts = result.get("counts")
    if counts:
        lines.append(
            f"params {counts['params']:,}, MACs {counts['macs']:,}, BitOps {counts['bitops']:,}, "
            f"size {counts['size_bytes']:,} B (packed), peak activations {counts['peak_activation_bytes']:,} B"
        )
    return "\n".join(lines)


def _bits(r: dict[str, Any]) -> str:
    w, a = r["weight_bits"], r["act_bits"]
    return "fp32" if w is None and a is None else f"w{w or 32}/a{a or 32}"


def run_profile(args: argparse.Namespace) -> int:
    """Entry point of ``cli.py profile``: print tables (or JSON with ``--json``); returns the exit code."""
    result = profile_model(args)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(render(result, args.per_layer))
    return 0
