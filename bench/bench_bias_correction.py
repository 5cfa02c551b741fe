"""Empirical bias correction on third-party models: what it buys at 8-bit and at 4-bit weights.

Each model of ``--only`` (a default set of six zoo models) trains for ``--epochs`` (10) on the
real CIFAR-10 subset and is saved with ``torch.save``; the CLI then quantizes it every layer
(``quantize.float_fallback=off``: no float file can stand in) with 8-bit and with 4-bit weights
(first and last layer 8-bit, activations 8-bit, no fine-tuning), each with
``quantize.bias_correction`` on and off. Per run, by ONNX Runtime on the test split: top-1 accuracy
and top-1 agreement with the float file, and the pass's seconds. The default of the option
(``auto``: on below 8-bit weights) is read off this table. No latency is measured here.

    python bench/bench_bias_correction.py
    python bench/bench_bias_correction.py --only hf_resnet --merge

Writes ``bench/results/bias_correction.json`` and ``bench/results/bias_correction.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_zoo as zoo  # noqa: E402
from bench_quantize import onnx_predictions  # noqa: E402

DEFAULT_MODELS = (
    "tv_resnet18",
    "hf_resnet",
    "timm_repvgg_a0",
    "timm_mobilenetv3_small_050",
    "timm_convnext_atto",
    "hf_vit",
)
RUNS = {f"w{bits}_{flag}": (bits, flag) for bits in (8, 4) for flag in ("off", "on")}


def parse_args() -> argparse.Namespace:
    return zoo.trained_zoo_arguments(__doc__.splitlines()[0])


def model_row(name: str, tmp: Path, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    path, row["train_s"] = zoo.trained_and_saved(name, tmp, data, args.epochs, args.seed, args.keep_models)
    x, y = data.test.tensors
    rc, _, _, err = zoo.run_cli(zoo.optimize(path, tmp / f"{name}_float", "fold_bn"))
    if rc:
        row["float"] = {"rc": rc, "error": err}
        return row
    float_predicted = onnx_predictions(tmp / f"{name}_float" / "model.onnx", x)
    truth = y.numpy()
    row["float_accuracy"] = round(float((float_predicted == truth).mean()), 4)
    for key, (bits, flag) in RUNS.items():
        out = tmp / f"{name}_{key}"
        settings = {"method": "uniform", "bits": bits, "float_fallback": "off", "bias_correction": flag}
        extra = [a for k, v in settings.items() for a in ("--set", f"quantize.{k}={v}")]
        rc, _, report, err = zoo.run_cli(zoo.optimize(path, out, "fold_bn,quantize", *extra))
        run: dict[str, Any] = {"rc": rc, "error": err if rc else ""}
        if rc == 0:
            predicted = onnx_predictions(out / "model.onnx", x)
            run["accuracy"] = round(float((predicted == truth).mean()), 4)
            run["agreement_with_float"] = round(float((predicted == float_predicted).mean()), 4)
            run["quantize_s"] = zoo.pass_seconds(report).get("quantize")
            run["correction"] = (report or {}).get("quantization", {}).get("bias_correction")
        row[key] = run
    row["test_images"] = len(x)
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | float acc | 8-bit acc (off → on) | 8-bit agreement with float (off → on) "
        "| 4-bit acc (off → on) | 4-bit agreement with float (off → on) | quantize s 4-bit (off → on) |",
        "|---|---|---|---|---|---|---|",
    ]

    def pair(r: dict[str, Any], bits: int, field: str, fmt: str, scale: float = 1.0) -> str:
        cells = [r.get(f"w{bits}_{flag}", {}).get(field) for flag in ("off", "on")]
        return " → ".join("–" if c is None else format(scale * c, fmt) for c in cells)

    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {100 * r.get('float_accuracy', float('nan')):.1f} "
            f"| {pair(r, 8, 'accuracy', '.1f', 100)} | {pair(r, 8, 'agreement_with_float', '.3f')} "
            f"| {pair(r, 4, 'accuracy', '.1f', 100)} | {pair(r, 4, 'agreement_with_float', '.3f')} "
            f"| {pair(r, 4, 'quantize_s', '.1f')} |"
        )
    images = next((r["test_images"] for r in result["rows"] if "test_images" in r), "all")
    lines += [
        "",
        f"CIFAR-10 subset, {result['epochs']} training epochs from random weights, {images} test images, "
        "every layer quantized (float_fallback=off), first and last layer 8-bit, 8-bit activations, no "
        f"fine-tuning; accuracy and agreement by ONNX Runtime {result['ort']}. Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    data = zoo.cifar_subset(args.seed)
    zoo.rows_written(
        "bias_correction",
        args.only or list(DEFAULT_MODELS),
        lambda name, tmp: model_row(name, tmp, data, args),
        markdown,
        args.merge,
        {"epochs": args.epochs},
    )


if __name__ == "__main__":
    main()
