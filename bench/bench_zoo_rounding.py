"""How far rounding far below one code moves an int8 model's accuracy: the noise floor of ours ÷ qs.

``bench_zoo_fidelity.py`` compares two 8-bit quantizations of one trained model, ours and
``quantize_static``, by top-1 accuracy on 846 test images. Two quantizations differ in where
each value falls against a half-code boundary, and a network trained briefly amplifies such
differences: on shufflenet_v2_x0_5 one-code changes at 1e-4 of the first layer's outputs grow
to differences at 30% of the last block's. This bench measures that amplification on the
same trained models (``--keep-models`` reuses the fidelity bench's), with no second quantizer
involved. The every-layer int8 model (the CLI's options, ``quantize.float_fallback=off``) is
computed three ways, all in PyTorch:

- exact: each frozen layer adds its integer code products exactly, as ONNX Runtime's integer
  kernels do (the model the export check holds the file to);
- float32: the same codes and scales, each layer a float32 convolution of the dequantized
  values (partial sums rounded, errors ~1e-6 of a value);
- bias ±1: ``--perturbations`` copies of the exact model, each bias moved by one step of its
  int32 grid ``s_x · s_w`` up or down at random per channel (the table gives that step in codes
  of the layer's output quantizer), each a model no export check could tell from the first.

Per model: the float model's accuracy, the exact model's, its top-1 agreement with the float32
form and that form's accuracy, and the range and standard deviation of accuracy over the bias
perturbations. Beside them, from the fidelity results of the same seed where present, how far
``quantize_static``'s accuracy is from ours (every layer int8, by ONNX Runtime).

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
from bench_zoo_fidelity import DEFAULT_CALIBRATION, every_layer_int8, results_stem  # noqa: E402

from examples.third_party import ZOO  # noqa: E402
from fxsculpt.quant import fake_quant as fq  # noqa: E402
from fxsculpt.quant.modules import ActQuantizer, WeightQuantizer  # noqa: E402


def parse_args() -> Any:
    parser = zoo.trained_zoo_parser(__doc__.splitlines()[0])
    parser.add_argument("--perturbations", type=int, default=8, help="bias ±1 copies of the exact model")
    return parser.parse_args()


def predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b).argmax(1) for b in x.split(128)])


def computed_in_float32(quantized: torch.nn.Module) -> torch.nn.Module:
    """A copy whose frozen layers convolve the dequantized values in float32 (the same codes)."""
    copied = copy.deepcopy(quantized)
    for module in copied.modules():
        if isinstance(module, WeightQuantizer) and module.frozen:
            module.input_scale = None  # the layer then runs its float form on the snapped weight
    return copied


def bias_perturbed(quantized: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """A copy with every integer-kernel layer's bias one int32 step up or down per channel."""
    copied = copy.deepcopy(quantized)
    for module in copied.modules():
        bias = getattr(getattr(module, "layer", None), "bias", None)
        if not isinstance(module, WeightQuantizer) or not module.computes_on_codes() or bias is None:
            continue
        assert module.input_scale is not None and module.scale is not None
        step = fq.bias_step(module.input_scale, module.scale).to(bias.dtype)
        signs = torch.randint(0, 2, bias.shape, generator=generator).to(bias.dtype) * 2 - 1
        with torch.no_grad():
            bias.add_(signs * step)
    return copied


def bias_step_in_output_codes(quantized: torch.fx.GraphModule) -> dict[str, float]:
    """The bias ±1 perturbation's size: each layer's int32 bias step ``s_x · s_w[c]`` over the
    scale of the activation quantizer right after it (through one ReLU-like op), median and
    largest over the channels of every such layer."""
    modules = dict(quantized.named_modules())

    def output_quantizer(node: torch.fx.Node, hops: int = 2) -> ActQuantizer | None:
        for user in node.users:
            module = modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(module, ActQuantizer) and module.bits is not None:
                return module
            if hops > 1 and len(node.users) == 1:
                return output_quantizer(user, hops - 1)
        return None

    ratios = []
    for node in quantized.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, WeightQuantizer) or not module.computes_on_codes():
            continue
        after = output_quantizer(node)
        if after is None:
            continue
        assert module.input_scale is not None and module.scale is not None
        ratios.append(fq.bias_step(module.input_scale, module.scale) / after.scale)
    every = torch.cat(ratios) if ratios else torch.zeros(1)
    return {"median": float(every.median()), "max": float(every.max())}


def accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return round(float((predicted == truth).float().mean()), 4)


def fidelity_row(name: str, seed: int) -> dict[str, Any] | None:
    """The fidelity bench's row of ``name`` at ``seed`` (default calibration), if it was run."""
    path = HERE / "results" / f"{results_stem(DEFAULT_CALIBRATION, seed)}.json"
    if not path.is_file():
        return None
    return next((r for r in json.loads(path.read_text())["rows"] if r["model"] == name), None)


def model_row(name: str, tmp: Path, data: Any, args: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "features": ZOO[name].features}
    path, row["train_s"] = zoo.trained_and_saved(name, tmp, data, args.epochs, args.seed, args.keep_models)
    float_model, quantized = every_layer_int8(path, tmp, data, DEFAULT_CALIBRATION)
    x, y = data.test.tensors
    reference = predictions(float_model, x)
    exact = predictions(quantized, x)
    in_float32 = predictions(computed_in_float32(quantized), x)
    generator = torch.Generator().manual_seed(args.seed)
    perturbed = [
        accuracy(predictions(bias_perturbed(quantized, generator), x), y) for _ in range(args.perturbations)
    ]
    row.update(
        accuracy={
            "float": accuracy(reference, y),
            "exact": accuracy(exact, y),
            "float32": accuracy(in_float32, y),
        },
        exact_vs_float32_agreement=accuracy(exact, in_float32),
        exact_vs_float_agreement=accuracy(exact, reference),
        bias_perturbed={
            "accuracies": perturbed,
            "min": min(perturbed),
            "max": max(perturbed),
            "std": round(statistics.pstdev(perturbed), 4),
        },
        bias_step_codes=bias_step_in_output_codes(quantized),
        test_images=len(x),
    )
    fidelity = fidelity_row(name, args.seed)
    if fidelity and {"all_int8", "qs"} <= set(fidelity.get("accuracy", {})):
        row["fidelity_all_int8_minus_qs"] = round(
            fidelity["accuracy"]["all_int8"] - fidelity["accuracy"]["qs"], 4
        )
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | acc float / int8 exact | int8 exact ÷ float32 form: agreement, acc | "
        "bias ±1: step in output codes (median / max), acc min–max (std) | int8 − qs (fidelity bench) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        acc, spread, codes = r["accuracy"], r["bias_perturbed"], r["bias_step_codes"]
        gap = r.get("fidelity_all_int8_minus_qs")
        lines.append(
            f"| {r['model']} | {100 * acc['float']:.1f} / {100 * acc['exact']:.1f} "
            f"| {r['exact_vs_float32_agreement']:.3f}, {100 * acc['float32']:.1f} "
            f"| {codes['median']:.1e} / {codes['max']:.1e}, "
            f"{100 * spread['min']:.1f}–{100 * spread['max']:.1f} ({100 * spread['std']:.2f}) "
            f"| {'–' if gap is None else f'{100 * gap:+.1f}'} |"
        )
    images = next((r["test_images"] for r in result["rows"]), "all")
    lines += [
        "",
        f"CIFAR-10 subset, {result['epochs']} training epochs from random weights (seed {result['seed']}), "
        f"{images} test images; every layer int8 with the CLI's options, computed in PyTorch. int8 exact: "
        "the model the export check holds the ONNX file to (exact integer sums). float32 form: the same "
        "codes, each layer a float32 convolution of dequantized values. bias ±1: "
        f"{result['perturbations']} copies, each bias one int32 step up or down at random per channel. "
        "int8 − qs: the fidelity bench's every-layer int8 accuracy minus quantize_static's, by ONNX Runtime "
        f"(–: no fidelity row at this seed). All accuracies in %. Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    data = zoo.cifar_subset(args.seed)
    stem = "zoo_rounding" if args.seed == 0 else f"zoo_rounding_seed{args.seed}"
    zoo.rows_written(
        stem,
        args.only or list(ZOO),
        lambda name, tmp: model_row(name, tmp, data, args),
        markdown,
        args.merge,
        {"epochs": args.epochs, "seed": args.seed, "perturbations": args.perturbations},
    )


if __name__ == "__main__":
    main()
