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
the accuracy difference is within the luck of which images flipped. Beside them, the every-layer
int8 PyTorch model against itself computed in float64 (no export at all): the share of
predictions that do not turn on a half-code tie, a ceiling for ORT÷PyTorch agreement. No latency
is measured here.

    python bench/bench_zoo_fidelity.py                   # every model
    python bench/bench_zoo_fidelity.py --only timm_repvgg_a0 --merge
    python bench/bench_zoo_fidelity.py --calibration mse  # both int8 runs calibrated by mse

Writes ``bench/results/zoo_fidelity.json`` and ``bench/results/zoo_fidelity.md``
(``zoo_fidelity_<calibration>.*`` for a calibration other than the CLI's default,
``…_seed<N>.*`` for a training seed other than 0).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_zoo as zoo  # noqa: E402
from bench_quantize import onnx_logits  # noqa: E402

from examples.third_party import ZOO  # noqa: E402
from fxsculpt.quant.calibrate import METHODS  # noqa: E402

#: What the CLI's default calibration (``auto``) is at 8 bits; its results keep the plain name.
DEFAULT_CALIBRATION = "minmax"


def parse_args() -> argparse.Namespace:
    parser = zoo.trained_zoo_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--calibration",
        choices=METHODS,
        default=DEFAULT_CALIBRATION,
        help="the activation calibration of both int8 runs (quantize.calibration)",
    )
    return parser.parse_args()


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of ``wins`` against ``losses`` at p = 1/2 (1.0 when both are 0)."""
    n, k = wins + losses, min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def exact_top1_ties(logits: np.ndarray) -> int:
    """How many rows of ``logits`` have their two largest values exactly equal.

    A file whose logits leave through an 8-bit QuantizeLinear (``quantize_static`` quantizes the
    output) has only 256 levels for them; on a tie ``argmax`` takes the lower class index, so
    those predictions are decided by the class order, not by the model.
    """
    top2 = np.sort(logits, axis=1)[:, -2:]
    return int((top2[:, 0] == top2[:, 1]).sum())


def quantized_run(path: Path, out: Path, samples: int, calibration: str, *extra: str) -> dict[str, Any]:
    """The CLI's int8 run on ``path``: exit code, error line, ONNX Runtime ÷ PyTorch parity."""
    argv = zoo.optimize(
        path,
        out,
        "fold_bn,quantize",
        *zoo.INT8,
        "--set",
        f"export.compare_samples={samples}",
        "--set",
        f"quantize.calibration={calibration}",
    )
    rc, seconds, report, err = zoo.run_cli([*argv, *extra])
    onnx = (report or {}).get("onnx", {})
    return {
        "rc": rc,
        "s": round(seconds, 1),
        "error": err if rc else "",
        "agreement": onnx.get("top1_agreement"),
        "reference": onnx.get("reference"),
        "agreement_float32": onnx.get("top1_agreement_float32"),
        "samples": onnx.get("samples_compared"),
        "max_abs_diff": onnx.get("max_abs_diff"),
    }


def every_layer_int8(
    path: Path, tmp: Path, data: Any, calibration: str, seed: int = 0
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The saved model at ``path`` loaded as the CLI loads it, and its every-layer int8 form (the
    quantize pass run in-process with the CLI's options and batch size), both in eval mode.

    ``seed`` is the CLI's ``--seed``: it picks the shuffled training batches that calibrate."""
    from fxsculpt.ir.load import LoadOptions, load_ir
    from fxsculpt.passes.base import Context, TrainSettings
    from fxsculpt.passes.quantize import Quantize

    ir = load_ir(str(path), LoadOptions(trust_model=True, input_shape=(1, 3, 32, 32)))
    float_model = copy.deepcopy(ir.gm).eval()
    out = tmp / "every_layer_int8"
    settings = TrainSettings(epochs=1, batch_size=64, lr=0.02, progress=False)  # the CLI's batch size
    ctx = Context(out_dir=out, stage_dir=out / "stage", data=data, train=settings, seed=seed)
    ctx.current_pass = "quantize"
    quantize = Quantize(method="uniform", bits=8, float_fallback="off", calibration=calibration)
    return float_model, quantize.run(ir, ctx).gm.eval()


def float64_self_agreement(path: Path, tmp: Path, data: Any, calibration: str) -> float:
    """Top-1 agreement, on the test images, of the every-layer-int8 PyTorch model
    (:func:`every_layer_int8`) with the same model computed in float64.

    No export is involved: this is how often the quantized model's own prediction turns on float
    rounding at a half-code boundary somewhere in the network, the ceiling an ONNX Runtime file
    (other kernels, the same ties) can be expected to reach in ORT÷PyTorch agreement.
    """
    _, quantized = every_layer_int8(path, tmp, data, calibration)
    x = data.test.tensors[0]
    single = torch_predictions(quantized, x)
    double = torch_predictions(copy.deepcopy(quantized).double(), x.double())
    return round(float((single == double).float().mean()), 4)


def torch_predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's top-1 class of every image of ``x`` (batches of 128, no gradients)."""
    with torch.no_grad():
        return torch.cat([model(b).argmax(1) for b in x.split(128)])


def model_row(name: str, tmp: Path, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "features": ZOO[name].features}
    path, row["train_s"] = zoo.trained_and_saved(name, tmp, data, args.epochs, args.seed, args.keep_models)
    x, y = data.test.tensors

    rc, _, _, err = zoo.run_cli(zoo.optimize(path, tmp / f"{name}_float", "fold_bn"))
    if rc:
        row["float"] = {"rc": rc, "error": err}
        return row
    files = {"float": tmp / f"{name}_float" / "model.onnx"}
    calibration = args.calibration
    row["shipped"] = quantized_run(path, tmp / f"{name}_int8", len(x), calibration)
    row["all_int8"] = quantized_run(
        path, tmp / f"{name}_all", len(x), calibration, "--set", "quantize.float_fallback=off"
    )
    for key, folder in (("shipped", "int8"), ("all_int8", "all")):
        if row[key]["rc"] == 0:
            files[key] = tmp / f"{name}_{folder}" / "model.onnx"
    row["shipped_is_float_file"] = (
        "shipped" in files and files["shipped"].read_bytes() == files["float"].read_bytes()
    )
    files["qs"] = zoo.quantize_static_file(files["float"], tmp / f"{name}_qs.onnx", data)

    logits = {key: onnx_logits(p, x) for key, p in files.items()}
    predicted = {key: out.argmax(1) for key, out in logits.items()}
    row["exact_top1_ties"] = {key: exact_top1_ties(out) for key, out in logits.items()}
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
    row["float64_self_agreement"] = float64_self_agreement(path, tmp, data, calibration)
    row["test_images"] = len(x)
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | int8 rc (shipped / all int8) | ORT÷PyTorch agreement (shipped / all int8) "
        "| acc float / ours / all int8 / qs | agreement with float (ours / all int8 / qs) "
        "| only ours / only qs right | sign-test p | exact top-1 ties (ours / qs) | PyTorch int8 fp32÷fp64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        shipped, all_int8 = r.get("shipped", {}), r.get("all_int8", {})
        acc, fid = r.get("accuracy", {}), r.get("agreement_with_float", {})
        versus, ties = r.get("ours_vs_qs", {}), r.get("exact_top1_ties", {})

        def agreement(run: dict[str, Any]) -> str:
            if run.get("agreement") is None:
                return "–"
            if run.get("agreement_float32") is None:  # a row from before the float64 reference
                return f"{run['agreement']:.3f}¹"
            return f"{run['agreement']:.3f} ({run['agreement_float32']:.3f})"

        shipped_cell = "float file" if r.get("shipped_is_float_file") else agreement(shipped)
        lines.append(
            f"| {r['model']} | {shipped.get('rc', '–')} / {all_int8.get('rc', '–')} "
            f"| {shipped_cell} / {agreement(all_int8)} "
            f"| {' / '.join(f'{100 * acc[k]:.1f}' if k in acc else '–' for k in ('float', 'shipped', 'all_int8', 'qs'))} "
            f"| {' / '.join(f'{fid[k]:.3f}' if k in fid else '–' for k in ('shipped', 'all_int8', 'qs'))} "
            f"| {versus.get('only_ours', '–')} / {versus.get('only_qs', '–')} | {versus.get('p', '–')} "
            f"| {ties.get('shipped', '–')} / {ties.get('qs', '–')} "
            f"| {r.get('float64_self_agreement', '–')} |"
        )
    images = next((r["test_images"] for r in result["rows"] if "test_images" in r), "all")
    compared = [r["ours_vs_qs"] for r in result["rows"] if "ours_vs_qs" in r]
    wins, losses = sum(v["only_ours"] for v in compared), sum(v["only_qs"] for v in compared)
    lines += [
        "",
        f"All {len(compared)} rows together: only ours right {wins} times, only quantize_static {losses} "
        f"(sign test p = {sign_test_p(wins, losses):.3f}; the rows share the test images, so this "
        "pools the rows' counts rather than adding independent evidence).",
        "",
        f"CIFAR-10 subset, {result['epochs']} training epochs from random weights (seed "
        f"{result.get('seed', 0)}), {images} test images, "
        f"activations calibrated by {result.get('calibration', DEFAULT_CALIBRATION)} "
        f"(accuracy and agreement by ONNX Runtime {result['ort']}; ORT÷PyTorch agreement is the export "
        "check's: against the quantized PyTorch model computed in float64, in brackets against its "
        "float32 run; ¹: a row from before the float64 reference and exact integer accumulation, "
        'against float32 PyTorch). "float file": the pass measured the float model '
        "fastest and handed it over. PyTorch int8 fp32÷fp64: the every-layer-int8 PyTorch model's top-1 "
        "agreement with itself computed in float64, no export involved (how many predictions turn on a "
        "half-code tie; –: a row from before this column). Exact top-1 ties: test images whose two "
        "largest logits are equal in the file's output (quantize_static quantizes the logits to 8 bits; "
        "argmax then takes the lower class index; –: a row from before this column). "
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def results_stem(calibration: str, seed: int, bench: str = "zoo_fidelity") -> str:
    """The results' file name: ``bench``, with the calibration and the seed where they are not
    the defaults, so a variant never overwrites the main table."""
    stem = bench if calibration == DEFAULT_CALIBRATION else f"{bench}_{calibration}"
    return stem if seed == 0 else f"{stem}_seed{seed}"


def main() -> None:
    args = parse_args()
    data = zoo.cifar_subset(args.seed)
    calibration = args.calibration
    zoo.rows_written(
        results_stem(calibration, args.seed),
        args.only or list(ZOO),
        lambda name, tmp: model_row(name, tmp, data, args),
        markdown,
        args.merge,
        {"epochs": args.epochs, "calibration": calibration, "seed": args.seed},
    )


if __name__ == "__main__":
    main()
