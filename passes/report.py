"""``report.json`` and ``report.md``: what a run did, in the fields the README documents.

Fields are only ever added, never renamed: ``passes``, ``metrics``, ``onnx``, ``layers`` are
the foundation's; other sections (``hardware``, ``budget``, a search pass's own) come from
``ctx.section``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tabulate import tabulate

from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context
from fxsculpt.passes.pipeline import PipelineResult

REPORT_VERSION = 1


def build_report(
    ir: IR,
    result: PipelineResult,
    ctx: Context,
    *,
    before: dict[str, int],
    data_spec: str | None,
    status: str = "ok",
) -> dict[str, Any]:
    """Collect the run's report from the final IR, the pass records and the context's sections."""
    after = ir.summary()
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "status": status,
        "model": {"source": ir.source, "input_shape": list(ir.input_shape), "num_classes": ir.num_classes},
        "seed": ctx.seed,
        "data": data_spec,
        "passes": [record.as_dict() for record in result.records],
        "metrics": {
            "accuracy_before": result.accuracy_before,
            "accuracy_after": result.accuracy_after,
            "params": after["params"],
            "macs": after["macs"],
            "size_bytes": after["size_bytes"],
            "params_before": before["params"],
            "macs_before": before["macs"],
            "size_bytes_before": before["size_bytes"],
        },
        "layers": [row.as_dict() for row in ir.layers()],
    }
    for name, content in ctx.sections.items():
        report.setdefault(name, content)
    report.setdefault("onnx", None)
    return _json_safe(report)


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (invalid JSON) with None and tuples with lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


def _fmt_count(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{int(value)}" if value.is_integer() else f"{value:.3g}"


def _fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{100 * a:.2f}%"


def _bits(b: int | None) -> str:
    return "fp32" if b is None else str(b)


def layer_table(report: dict[str, Any], fmt: str) -> str:
    rows = [
        [
            layer["name"],
            layer["op"],
            "x".join(map(str, layer["shape"] or [])),
            _fmt_count(layer["params"]),
            _fmt_count(layer["macs"]),
            _bits(layer.get("weight_bits")),
            _bits(layer.get("act_bits")),
        ]
        for layer in report["layers"]
    ]
    headers = ["layer", "op", "output shape", "params", "MACs", "w bits", "a bits"]
    return tabulate(rows, headers=headers, tablefmt=fmt)


def pass_table(report: dict[str, Any], fmt: str) -> str:
    rows = []
    for record in report["passes"]:
        summary = ", ".join(f"{k}={_short(v)}" for k, v in record["summary"].items())
        rows.append(
            [
                record["name"],
                f"{record['seconds']:.2f}",
                _fmt_count(record["before"]["params"]),
                _fmt_count(record["after"]["params"]),
                _fmt_count(record["after"]["macs"]),
                summary[:100],
            ]
        )
    return tabulate(
        rows, headers=["pass", "seconds", "params before", "params after", "MACs", "summary"], tablefmt=fmt
    )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def totals_table(report: dict[str, Any], fmt: str) -> str:
    m = report["metrics"]
    rows = [
        ["accuracy (test)", _fmt_acc(m["accuracy_before"]), _fmt_acc(m["accuracy_after"])],
        ["params", _fmt_count(m["params_before"]), _fmt_count(m["params"])],
        ["MACs", _fmt_count(m["macs_before"]), _fmt_count(m["macs"])],
        ["size (bytes)", _fmt_count(m["size_bytes_before"]), _fmt_count(m["size_bytes"])],
    ]
    onnx = report.get("onnx")
    if onnx:
        rows.append(["ONNX max |diff| vs PyTorch", "", f"{onnx.get('max_abs_diff', float('nan')):.2e}"])
    return tabulate(rows, headers=["", "before", "after"], tablefmt=fmt)


def _exact(value: Any) -> str:
    """A budget figure with the digits a limit needs (66,643 B must not print as 6.664e+04)."""
    return f"{value:.6g}" if isinstance(value, float) else _short(value)


def budget_table(report: dict[str, Any], fmt: str) -> str:
    """One row per budget constraint: limit, measured value, met or not."""
    rows = [
        [
            name,
            _exact(c.get("limit")),
            _exact(c.get("measured")),
            c.get("unit", ""),
            "yes" if c.get("met") else "NO",
            c.get("source", "--budget"),
        ]
        for name, c in (report.get("budget") or {}).items()
        if isinstance(c, dict)
    ]
    return tabulate(rows, headers=["budget", "limit", "measured", "unit", "met", "source"], tablefmt=fmt)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _fmt_met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def comparison_table(report: dict[str, Any], fmt: str) -> str:
    """The before/after table: the float reference against the exported model, both measured
    on the target (``comparison`` section, written by the hardware pass); empty when absent."""
    comparison = report.get("comparison")
    if not comparison:
        return ""
    ref, out = comparison["float_reference"], comparison["exported"]

    def change(a: float | None, b: float | None, less: str, more: str) -> str:
        if a is None or b is None or not a or not b:
            return "-"
        return f"{a / b:.2f}x {less}" if a >= b else f"{b / a:.2f}x {more}"

    acc_change = comparison.get("accuracy_change")
    rows = [
        [
            "model size (real bits)",
            _fmt_bytes(ref["size_bytes"]),
            _fmt_bytes(out["size_bytes"]),
            change(ref["size_bytes"], out["size_bytes"], "smaller", "larger"),
        ],
        [
            f"latency ({comparison['target']}, batch 1)",
            f"{ref['latency_ms']:.4f} ms",
            f"{out['latency_ms']:.4f} ms",
            change(ref["latency_ms"], out["latency_ms"], "faster", "slower"),
        ],
        [
            "accuracy (test, ONNX Runtime)",
            _fmt_acc(ref.get("accuracy")),
            _fmt_acc(out.get("accuracy")),
            "-" if acc_change is None else f"{100 * acc_change:+.2f} pts",
        ],
        ["params", _fmt_count(ref["params"]), _fmt_count(out["params"]), ""],
        ["MACs", _fmt_count(ref["macs"]), _fmt_count(out["macs"]), ""],
        ["budget met", _fmt_met(ref.get("budget_met")), _fmt_met(out.get("budget_met")), ""],
    ]
    return tabulate(rows, headers=["", "float reference", "exported", "change"], tablefmt=fmt)


def hardware_lines(report: dict[str, Any]) -> list[str]:
    """The hardware section in a sentence: target, threads, latency median and p90."""
    hw = report.get("hardware")
    if not hw:
        return []
    label = f" ({hw['label']})" if hw.get("label") else ""
    median, p90 = hw.get("latency_ms_median"), hw.get("latency_ms_p90")
    timing = (
        f"latency median {median:.3f} ms, p90 {p90:.3f} ms" if median is not None and p90 is not None else ""
    )
    return [f"Target {hw.get('target')}{label}, {hw.get('threads')} thread(s): {timing}."]


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: totals, passes and layers as GitHub tables."""
    parts = [
        f"# fxsculpt report: {report['model']['source']}",
        "",
        f"Status: **{report['status']}**; input shape {report['model']['input_shape']}; seed {report['seed']}; "
        f"data {report['data']}.",
        "",
        "## Totals",
        "",
        totals_table(report, "github"),
        "",
        "## Passes",
        "",
        pass_table(report, "github"),
        "",
    ]
    if report.get("comparison"):
        parts += [
            "## Before and after",
            "",
            "The float reference (the model after the passes that only train it) and the exported "
            "model, measured alike on the target.",
            "",
            comparison_table(report, "github"),
            "",
        ]
    if report.get("hardware") or report.get("budget"):
        parts += ["## Hardware and budget", "", *hardware_lines(report), ""]
        if report.get("budget"):
            parts += [budget_table(report, "github"), ""]
    parts += [
        "## Layers",
        "",
        layer_table(report, "github"),
        "",
    ]
    return "\n".join(parts)


def render_console(report: dict[str, Any], max_layers: int = 60) -> str:
    """What ``cli.py optimize`` prints at the end: the layer table, passes and totals."""
    shown = dict(report)
    layers = report["layers"]
    if len(layers) > max_layers:
        shown["layers"] = layers[:max_layers]
    text = [layer_table(shown, "simple")]
    if len(layers) > max_layers:
        text.append(f"... {len(layers) - max_layers} more layers in report.md")
    text += ["", pass_table(report, "simple"), "", totals_table(report, "simple")]
    if report.get("hardware"):
        text += ["", *hardware_lines(report)]
    if report.get("budget"):
        text += ["", budget_table(report, "simple")]
    if report.get("comparison"):
        text += [
            "",
            "before / after (float reference vs exported model):",
            comparison_table(report, "simple"),
        ]
    return "\n".join(text)
