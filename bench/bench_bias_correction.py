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
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_zoo as zoo  # noqa: E402
from bench_quantize import onnx_predictions  # noqa: E402

from examples.third_party import ZOO, missing_package  # noqa: E402
from fxsculpt.training.data import load_data  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(ZOO), help="these models only")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs before quantizing")
    parser.add_argument("--merge", action="store_true", help="replace these models' rows in the last results")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def model_row(name: str, tmp: Path, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    path, row["train_s"] = zoo.trained_and_saved(name, tmp, data, args.epochs, args.seed)
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
    if not zoo.DATA.is_file():
        sys.exit(f"the real CIFAR-10 subset is needed at {zoo.DATA}")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(2)
    data = load_data(f"npz:{zoo.DATA}", seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_bias_correction_") as tmp:
        for name in args.only or DEFAULT_MODELS:
            reason = missing_package(ZOO[name])
            if reason:
                print(f"{name}: skipped, {reason}", flush=True)
                continue
            rows.append(model_row(name, Path(tmp), data, args))
            print(json.dumps(rows[-1]), flush=True)
    import onnxruntime

    result = {
        "rows": rows,
        "epochs": args.epochs,
        "ort": onnxruntime.__version__,
        "command": "python " + " ".join(["bench/bench_bias_correction.py", *sys.argv[1:]]),
        "numpy": np.__version__,
    }
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    if args.merge:
        result = zoo.merged(results / "bias_correction.json", result, settings=("epochs",))
    (results / "bias_correction.json").write_text(json.dumps(result, indent=2))
    (results / "bias_correction.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
