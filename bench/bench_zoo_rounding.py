"""How far equally valid int8 versions of one model spread in accuracy: the noise floor of ours ÷ qs.

``bench_zoo_fidelity.py`` compares two 8-bit quantizations of one trained model, ours and
``quantize_static``, by top-1 accuracy on 846 test images. Two quantizations differ in where
values fall against half-code boundaries, and a network trained briefly amplifies such
differences: on shufflenet_v2_x0_5 one-code changes at 1e-4 of the first layer's outputs grow
to differences at 30% of the last block's. This bench measures that spread on the same
trained models (``--keep-models`` reuses the fidelity bench's) with our quantizer alone. The
every-layer int8 model (the CLI's options, ``quantize.float_fallback=off``), all in PyTorch:

- exact: each frozen layer adds its integer code products exactly, as ONNX Runtime's integer
  kernels do (the model the export check holds the file to);
- float32: the same codes and scales, each layer a float32 convolution of the dequantized
  values (partial sums rounded, errors ~1e-6 of a value);
- bias ±1: ``--perturbations`` copies of the exact model, each bias moved by one step of its
  int32 grid ``s_x · s_w`` up or down at random per channel, on the channels where that step is
  at most a hundredth of a code of the layer's output quantizer (the table gives the share of
  channels and the steps): before rounding, each layer's output moves by a hundredth of a code
  or less, where the export check allows an integer kernel one code;
- recalibrated: ``--recalibrations`` quantizations calibrated on other shuffled training
  batches (the CLI's ``--seed`` 1, 2, …; as many images as ``quantize_static`` is given), the
  ranges then differ by a few codes: as valid a quantization as the first.

Per model: the float model's accuracy, the exact model's, its agreement with the float32 form,
and the range and standard deviation of accuracy over the bias perturbations and over the
recalibrations. Beside them, from the fidelity results of the same seed where present,
``quantize_static``'s accuracy (by ONNX Runtime) and whether it falls inside, above or below the
range of our int8 versions.

    python bench/bench_zoo_rounding.py --keep-models DIR            # seed 0, every model
    python bench/bench_zoo_rounding.py --seed 1 --keep-models DIR

Writes ``bench/results/zoo_rounding.json`` and ``.md`` (``zoo_rounding_seed<N>.*`` for a seed
other than 0).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_zoo as zoo  # noqa: E402
from bench_zoo_fidelity import (  # noqa: E402
    DEFAULT_CALIBRATION,
    every_layer_int8,
    results_stem,
    torch_predictions,
)

from examples.third_party import ZOO  # noqa: E402
from fxsculpt.quant import fake_quant as fq  # noqa: E402
from fxsculpt.quant.modules import ActQuantizer, WeightQuantizer  # noqa: E402


def parse_args() -> Any:
    parser = zoo.trained_zoo_parser(__doc__.splitlines()[0])
    parser.add_argument("--perturbations", type=int, default=6, help="bias ±1 copies of the exact model")
    parser.add_argument(
        "--recalibrations", type=int, default=4, help="quantizations calibrated on other training batches"
    )
    args = parser.parse_args()
    if args.perturbations < 1 or args.recalibrations < 1:
        parser.error("--perturbations and --recalibrations need at least 1")
    return args


def computed_in_float32(quantized: torch.nn.Module) -> torch.nn.Module:
    """A copy whose frozen layers convolve the dequantized values in float32 (the same codes)."""
    copied = copy.deepcopy(quantized)
    for module in copied.modules():
        if isinstance(module, WeightQuantizer) and module.frozen:
            module.input_scale = None  # the layer then runs its float form on the snapped weight
    return copied


#: The largest bias step perturbed, in codes of the layer's output quantizer: a channel whose
#: int32 step is coarser (a BatchNorm with a vanishing variance folds into weights of 10^3 and
#: more, so ``s_w`` and the step are large) is left as it is.
LARGEST_STEP_IN_CODES = 0.01


def output_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node, hops: int = 4) -> ActQuantizer | None:
    """The activation quantizer that next rounds ``node``'s value, following a chain of single
    consumers (identity modules, a ReLU-like op) for up to ``hops`` nodes; ``None`` where the
    value branches first or reaches the output."""
    modules = dict(gm.named_modules())
    for _ in range(hops):
        users = list(node.users)
        module = (
            modules.get(str(users[0].target)) if len(users) == 1 and users[0].op == "call_module" else None
        )
        if isinstance(module, ActQuantizer) and module.bits is not None:
            return module
        if len(users) != 1:
            return None
        node = users[0]
    return None


def perturbable_channels(gm: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per integer-kernel layer with a bias and an output quantizer: its name, its int32 bias step
    per channel in codes of that quantizer, and which channels :func:`bias_perturbed` moves."""
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, WeightQuantizer) or not module.computes_on_codes():
            continue
        after = output_quantizer(gm, node)
        if after is None or getattr(module.layer, "bias", None) is None:
            continue
        assert module.input_scale is not None and module.scale is not None
        in_codes = fq.bias_step(module.input_scale, module.scale).flatten() / after.scale
        found.append((str(node.target), in_codes, in_codes <= LARGEST_STEP_IN_CODES))
    return found


def bias_perturbed(quantized: torch.fx.GraphModule, generator: torch.Generator) -> torch.fx.GraphModule:
    """A copy in which each channel of :func:`perturbable_channels` has its bias one int32 step
    up or down at random (it stays on the grid the integer kernel adds)."""
    copied = copy.deepcopy(quantized)
    for name, _, moved in perturbable_channels(quantized):
        module = copied.get_submodule(name)
        assert isinstance(module, WeightQuantizer) and module.input_scale is not None
        bias = module.layer.bias
        step = fq.bias_step(module.input_scale, module.scale).to(bias.dtype).reshape(bias.shape)
        signs = torch.randint(0, 2, bias.shape, generator=generator).to(bias.dtype) * 2 - 1
        with torch.no_grad():
            bias.add_(signs * step * moved.reshape(bias.shape).to(bias.dtype))
    return copied


def perturbation_size(quantized: torch.fx.GraphModule) -> dict[str, float]:
    """How much :func:`bias_perturbed` moves: the share of all channels of the model's quantized
    layers it perturbs, and the median and largest of their steps in output codes."""
    channels = perturbable_channels(quantized)
    moved = torch.cat([codes[mask] for _, codes, mask in channels]) if channels else torch.zeros(0)
    total = sum(m.out_channels for m in quantized.modules() if isinstance(m, WeightQuantizer) and m.frozen)
    return {
        "share_of_channels": round(len(moved) / max(total, 1), 4),
        "median_codes": float(moved.median()) if len(moved) else 0.0,
        "max_codes": float(moved.max()) if len(moved) else 0.0,
    }


def spread(accuracies: list[float]) -> dict[str, Any]:
    return {
        "accuracies": accuracies,
        "min": min(accuracies),
        "max": max(accuracies),
        "std": round(statistics.pstdev(accuracies), 4),
    }


def accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return round(float((predicted == truth).float().mean()), 4)


def fidelity_rows(seed: int) -> dict[str, dict[str, Any]]:
    """The fidelity bench's rows at ``seed`` (default calibration) by model; none if it was not run."""
    path = HERE / "results" / f"{results_stem(DEFAULT_CALIBRATION, seed)}.json"
    if not path.is_file():
        return {}
    return {r["model"]: r for r in json.loads(path.read_text())["rows"]}


def model_row(
    name: str, tmp: Path, data: Any, args: Any, fidelity: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``name``'s row; ``fidelity`` holds the fidelity bench's rows at the same seed (:func:`fidelity_rows`)."""
    row: dict[str, Any] = {"model": name, "features": ZOO[name].features}
    path, row["train_s"] = zoo.trained_and_saved(name, tmp, data, args.epochs, args.seed, args.keep_models)
    float_model, quantized = every_layer_int8(path, tmp, data, DEFAULT_CALIBRATION)
    x, y = data.test.tensors
    reference = torch_predictions(float_model, x)
    exact = torch_predictions(quantized, x)
    in_float32 = torch_predictions(computed_in_float32(quantized), x)
    recalibrated = [
        accuracy(torch_predictions(every_layer_int8(path, tmp, data, DEFAULT_CALIBRATION, seed)[1], x), y)
        for seed in range(1, args.recalibrations + 1)
    ]
    generator = torch.Generator().manual_seed(args.seed)
    perturbed = [
        accuracy(torch_predictions(bias_perturbed(quantized, generator), x), y)
        for _ in range(args.perturbations)
    ]
    row.update(
        accuracy={
            "float": accuracy(reference, y),
            "exact": accuracy(exact, y),
            "float32": accuracy(in_float32, y),
        },
        exact_vs_float32_agreement=accuracy(exact, in_float32),
        exact_vs_float_agreement=accuracy(exact, reference),
        bias_perturbed=spread(perturbed),
        perturbation=perturbation_size(quantized),
        recalibrated=spread(recalibrated),
        test_images=len(x),
    )
    if "accuracy" in fidelity.get(name, {}):
        row["fidelity_accuracy"] = fidelity[name]["accuracy"]
    return row


def our_range(row: dict[str, Any]) -> tuple[float, float]:
    """The lowest and highest accuracy of our int8 versions of the row's model: exact, the bias
    perturbations and the recalibrations."""
    found = [
        row["accuracy"]["exact"],
        *row["bias_perturbed"]["accuracies"],
        *row["recalibrated"]["accuracies"],
    ]
    return min(found), max(found)


def qs_against_our_range(row: dict[str, Any]) -> str | None:
    """Where ``quantize_static``'s accuracy (fidelity bench, same seed) falls against :func:`our_range`:
    ``inside``, ``above`` or ``below`` (``None`` without a fidelity row)."""
    qs = row.get("fidelity_accuracy", {}).get("qs")
    if qs is None:
        return None
    low, high = our_range(row)
    return "above" if qs > high else "below" if qs < low else "inside"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | acc float / int8 exact | exact ÷ float32 form agreement "
        "| bias ±1: channels moved, step in output codes (median / max) | bias ±1: acc min–max (std) "
        "| recalibrated: acc min–max (std) | qs acc (fidelity bench): against our range |",
        "|---|---|---|---|---|---|---|",
    ]

    def spread_cell(found: dict[str, Any]) -> str:
        return f"{100 * found['min']:.1f}–{100 * found['max']:.1f} ({100 * found['std']:.2f})"

    for r in result["rows"]:
        acc, size = r["accuracy"], r["perturbation"]
        qs, where = r.get("fidelity_accuracy", {}).get("qs"), qs_against_our_range(r)
        lines.append(
            f"| {r['model']} | {100 * acc['float']:.1f} / {100 * acc['exact']:.1f} "
            f"| {r['exact_vs_float32_agreement']:.3f} "
            f"| {100 * size['share_of_channels']:.0f}%, {size['median_codes']:.0e} / {size['max_codes']:.0e} "
            f"| {spread_cell(r['bias_perturbed'])} | {spread_cell(r['recalibrated'])} "
            f"| {'–' if qs is None else f'{100 * qs:.1f}: {where}'} |"
        )
    images = next((r["test_images"] for r in result["rows"]), "all")
    placed = {r["model"]: qs_against_our_range(r) for r in result["rows"]}
    judged = [m for m, where in placed.items() if where is not None]
    above = [m for m in judged if placed[m] == "above"]
    lines += [
        "",
        f"quantize_static's accuracy lies inside the range of our int8 versions on "
        f"{sum(placed[m] == 'inside' for m in judged)} of {len(judged)} models, below it on "
        f"{sum(placed[m] == 'below' for m in judged)}, above it on {len(above)}"
        f"{' (' + ', '.join(above) + ')' if above else ''}.",
        "",
        f"CIFAR-10 subset, {result['epochs']} training epochs from random weights (seed {result['seed']}), "
        f"{images} test images; every layer int8 with the CLI's options, computed in PyTorch; accuracies "
        "in %. int8 exact: the model the export check holds the ONNX file to (exact integer sums). float32 "
        "form: the same codes, each layer a float32 convolution of dequantized values. bias ±1: "
        f"{result['perturbations']} copies, each bias one int32 step up or down at random per channel, on "
        "the channels where that step is at most 0.01 of an output code. recalibrated: "
        f"{result['recalibrations']} quantizations calibrated on other shuffled training batches. qs acc: "
        "quantize_static's accuracy by ONNX Runtime in the fidelity bench at this seed, against the lowest "
        "and highest accuracy of our int8 versions (exact, bias ±1, recalibrated; –: no fidelity row). "
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    data = zoo.cifar_subset(args.seed)
    fidelity = fidelity_rows(args.seed)
    zoo.rows_written(
        results_stem(DEFAULT_CALIBRATION, args.seed, bench="zoo_rounding"),
        args.only or list(ZOO),
        lambda name, tmp: model_row(name, tmp, data, args, fidelity),
        markdown,
        args.merge,
        {
            "epochs": args.epochs,
            "seed": args.seed,
            "perturbations": args.perturbations,
            "recalibrations": args.recalibrations,
        },
    )


if __name__ == "__main__":
    main()
