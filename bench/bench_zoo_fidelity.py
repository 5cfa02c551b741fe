"""Third-party models trained longer: int8 parity and accuracy, ours beside ``quantize_static``.

``bench_zoo.py`` trains each model for 2 epochs: enough to time the files, not to judge their
accuracy or parity. At ~20% top-1 most test images lie near a tie between two classes, so one
rounding step flips them and a few images decide both figures. Here every model of
:data:`examples.third_party.ZOO` trains for ``--epochs`` (10) on the real CIFAR-10 subset, is
saved with ``torch.save``, and the CLI quantizes it twice, as a user would —

- as shipped: ``--passes fold_bn,quantize --set quantize.method=uniform --set quantize.bits=8``;
- every layer int8: the same with ``--set quantize.float_fallback=off`` (the strict parity case:
  no layer is left float, so every integer kernel is in the comparison);

with the export check comparing ONNX Runtime against the quantized PyTorch model on every test
image (``export.compare_samples``). ``quantize_static`` quantizes the float file as in
``bench_zoo.py`` (QDQ, per-channel int8 weights, uint8 activations, the same 512 training images).

Per model, on the test split, all computed by ONNX Runtime: top-1 accuracy of the float file,
ours (as shipped), ours (every layer int8) and quantize_static; each one's top-1 agreement with
the float file; and, ours (as shipped) against quantize_static, the images only one of them gets
right with the two-sided exact sign test on those counts (McNemar's exact test): a large p says
the accuracy difference is within the luck of which images flipped. No latency is measured here.

    python bench/bench_zoo_fidelity.py                   # every model
    python bench/bench_zoo_fidelity.py --only timm_repvgg_a0 --merge

Writes ``bench/results/zoo_fidelity.json`` and ``bench/results/zoo_fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(ZOO), help="these models only")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs before quantizing")
    parser.add_argument("--merge", action="store_true", help="replace these models' rows in the last results")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of ``wins`` against ``losses`` at p = 1/2 (1.0 when both are 0)."""
    n, k = wins + losses, min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def quantized_run(path: Path, out: Path, samples: int, *extra: str) -> dict[str, Any]:
    """The CLI's int8 run on ``path``: exit code, error line, ONNX Runtime ÷ PyTorch parity."""
    argv = zoo.optimize(
        path, out, "fold_bn,quantize", *zoo.INT8, "--set", f"export.compare_samples={samples}"
    )
    rc, seconds, report, err = zoo.run_cli([*argv, *extra])
    onnx = (report or {}).get("onnx", {})
    return {
        "rc": rc,
        "s": round(seconds, 1),
        "error": err if rc else "",
        "agreement": onnx.get("top1_agreement"),
        "samples": onnx.get("samples_compared"),
        "max_abs_diff": onnx.get("max_abs_diff"),
    }


def model_row(name: str, tmp: Path, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "features": ZOO[name].features}
    path, row["train_s"] = zoo.trained_and_saved(name, tmp, data, args.epochs, args.seed)
    x, y = data.test.tensors

    rc, _, _, err = zoo.run_cli(zoo.optimize(path, tmp / f"{name}_float", "fold_bn"))
    if rc:
        row["float"] = {"rc": rc, "error": err}
        return row
    files = {"float": tmp / f"{name}_float" / "model.onnx"}
    row["shipped"] = quantized_run(path, tmp / f"{name}_int8", len(x))
    row["all_int8"] = quantized_run(path, tmp / f"{name}_all", len(x), "--set", "quantize.float_fallback=off")
    for key, folder in (("shipped", "int8"), ("all_int8", "all")):
        if row[key]["rc"] == 0:
            files[key] = tmp / f"{name}_{folder}" / "model.onnx"
    row["shipped_is_float_file"] = (
        "shipped" in files and files["shipped"].read_bytes() == files["float"].read_bytes()
    )
    files["qs"] = zoo.quantize_static_file(files["float"], tmp / f"{name}_qs.onnx", data)

    predicted = {key: onnx_predictions(p, x) for key, p in files.items()}
    truth = y.numpy()
    row["accuracy"] = {key: round(float((p == truth).mean()), 4) for key, p in predicted.items()}
    row["agreement_with_float"] = {
        key: round(float((p == predicted["float"]).mean()), 4)
        for key, p in predicted.items()
        if key != "float"
    }
    if "shipped" in predicted:
        ours_right, qs_right = predicted["shipped"] == truth, predicted["qs"] == truth
        wins, losses = int((ours_right & ~qs_right).sum()), int((qs_right & ~ours_right).sum())
        row["ours_vs_qs"] = {"only_ours": wins, "only_qs": losses, "p": round(sign_test_p(wins, losses), 3)}
    row["test_images"] = len(x)
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | int8 rc (shipped / all int8) | ORT÷PyTorch agreement (shipped / all int8) "
        "| acc float / ours / all int8 / qs | agreement with float (ours / all int8 / qs) "
        "| only ours / only qs right | sign-test p |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        shipped, all_int8 = r.get("shipped", {}), r.get("all_int8", {})
        acc, fid = r.get("accuracy", {}), r.get("agreement_with_float", {})
        versus = r.get("ours_vs_qs", {})

        def agreement(run: dict[str, Any]) -> str:
            return f"{run['agreement']:.3f}" if run.get("agreement") is not None else "–"

        shipped_cell = "float file" if r.get("shipped_is_float_file") else agreement(shipped)
        lines.append(
            f"| {r['model']} | {shipped.get('rc', '–')} / {all_int8.get('rc', '–')} "
            f"| {shipped_cell} / {agreement(all_int8)} "
            f"| {' / '.join(f'{100 * acc[k]:.1f}' if k in acc else '–' for k in ('float', 'shipped', 'all_int8', 'qs'))} "
            f"| {' / '.join(f'{fid[k]:.3f}' if k in fid else '–' for k in ('shipped', 'all_int8', 'qs'))} "
            f"| {versus.get('only_ours', '–')} / {versus.get('only_qs', '–')} | {versus.get('p', '–')} |"
        )
    images = next((r["test_images"] for r in result["rows"] if "test_images" in r), "all")
    lines += [
        "",
        f"CIFAR-10 subset, {result['epochs']} training epochs from random weights, {images} test images "
        f"(accuracy and agreement by ONNX Runtime {result['ort']}; ORT÷PyTorch agreement is the export "
        'check\'s, against the quantized PyTorch model). "float file": the pass measured the float model '
        f"fastest and handed it over. Command: `{result['command']}`",
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
    with tempfile.TemporaryDirectory(prefix="bench_zoo_fidelity_") as tmp:
        for name in args.only or list(ZOO):
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
        "command": "python " + " ".join(["bench/bench_zoo_fidelity.py", *sys.argv[1:]]),
        "numpy": np.__version__,
    }
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    if args.merge:
        result = zoo.merged(results / "zoo_fidelity.json", result, settings=("epochs",))
    (results / "zoo_fidelity.json").write_text(json.dumps(result, indent=2))
    (results / "zoo_fidelity.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
