"""The ``quantize`` pass: uniform or DFQ mixed-precision fake quantization, as IR nodes.

Weights are quantized through :class:`quant.modules.WeightQuantizer` constructs that wrap each
Conv/Linear node (same node, same name); activations through :class:`quant.modules.ActQuantizer`
nodes after the input and every conv/linear, ReLU, add and average pool (see
:mod:`quant.insert`). BatchNorms are folded into their convolutions first, as integer inference
does. The model leaves the pass frozen: weights on their grids, scales as constants, which the
``export`` pass writes as QuantizeLinear/DequantizeLinear (ONNX Runtime then runs 8-bit layers as
QLinearConv/QGemm); 4-bit weights as opset-21 INT4, other widths in an 8-bit container.

The DFQ search and the fine-tunes checkpoint after every epoch, each phase in its own folder
(``checkpoints/quantize/dfq-search``, ``.../<method>-finetune``), so ``--resume OUT`` continues
where a killed run stopped; under torchrun they train data-parallel (:mod:`training.distributed`).
HAQ checkpoints after every episode (``haq-search``) and its final fine-tune every epoch
(``haq-finetune``), and evaluates its warm-up episodes on ``--workers`` Ray workers
(:mod:`quant.haq.run`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fxsculpt.hardware.int8_arithmetic import resolve_reduce_range
from fxsculpt.hardware.targets import get_target
from fxsculpt.ir.errors import BadInputError, BudgetError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, Pass, TrainSettings
from fxsculpt.passes.options import option
from fxsculpt.quant import dfq
from fxsculpt.quant import insert as qi
from fxsculpt.quant.haq.options import HaqOptions
from fxsculpt.quant.modules import WeightQuantizer
from fxsculpt.training.checkpoint import pass_checkpointer

ROUNDS_FLOAT_MAY_WIN = 1
"""Of the whole-model timing's interleaved rounds, how many the float file may win against a
quantized file that is still handed over in its place (:meth:`Quantize._time_candidates`)."""


@dataclass
class QuantizeOptions(HaqOptions):
    method: Literal["uniform", "dfq", "haq"] = option(
        "uniform",
        "uniform: every layer at `bits`; dfq: differentiable search over `candidates` (Cheng et al. 2018); "
        "haq: RL search under a hardware budget (Wang et al. 2019; options episodes, *_ratio, haq_*)",
    )
    bits: int = option(8, "weight bit-width (2..8) of the uniform method")
    act_bits: int = option(8, "activation bit-width (2..8); sub-8-bit activations buy no speed on ORT CPU")
    first_last_bits: int = option(8, "bit-width of the first and last layer (0: treat them like the others)")
    reduce_range: Literal["auto", "on", "off"] = option(
        "auto",
        "8-bit weights on 7-bit codes (±63), so int8 kernels that add product pairs in saturating 16 bits "
        "(x86 without VNNI) compute exactly the quantized model; auto: where --target has such kernels",
    )
    weight_granularity: Literal["channel", "tensor"] = option(
        "channel", "weight scales per output channel or per tensor"
    )
    calibration: Literal["auto", "minmax", "percentile", "kl", "mse"] = option(
        "auto",
        "activation calibration; auto = KL divergence below 5 bits (as HAQ), min/max otherwise; mse: the "
        "fraction of the observed range with the least squared quantization error",
    )
    quantize_output: bool = option(
        False, "also quantize the model's output (lets ORT use QGemm for the last Linear; rounds the logits)"
    )
    integer_elementwise: bool = option(
        True,
        "8-bit activations: also quantize sigmoid outputs and products of two activations (a SiLU becomes "
        "x*sigmoid(x), a squeeze-excite gate stays a product), so that ONNX Runtime runs them as "
        "QLinearSigmoid/QLinearMul instead of converting to float and back around each",
    )
    activation_range: Literal["affine", "symmetric"] = option(
        "affine",
        "signed 8-bit activations calibrated by min/max or mse: affine codes over [min, max] with a calibrated "
        "zero point (as quantize_static; a SiLU or hard-swish output keeps nearly 8 bits), or symmetric "
        "codes around zero (zero point 128); other calibrations and narrower activations are symmetric",
    )
    bias_correction: Literal["auto", "on", "off"] = option(
        "auto",
        "without fine-tuning: shift each quantized layer's bias so that its mean output per channel on "
        "the calibration images is the float model's (empirical bias correction, Nagel et al. 2019); "
        "auto: on where a layer has weights below 8 bits (8-bit per-channel weights leave no mean shift "
        "worth the pass: bench/results/bias_correction.md)",
    )
    percentile: float = option(99.99, "percentile of |x| used by calibration=percentile")
    calib_batches: int = option(8, "training batches used to calibrate activation scales")
    keep_float: list[str] = option(
        None, "layers left in float (node names or module paths, comma-separated)", default_factory=list
    )
    float_fallback: Literal["measured", "table", "off"] = option(
        "measured",
        "uniform 8-bit on ort-cpu: keep float the layers whose int8 kernel (with its float/int8 conversions) "
        "the measured latency table predicts slower; measured: also time the placed model, the model with "
        "every layer int8 and the float model as exported files on the target (at ORT_ENABLE_ALL, as "
        "deployed) and hand over the fastest (a quantized file only if faster than float in all but one "
        "round); off: quantize every layer",
    )
    finetune_epochs: int = option(
        -1, "quantization-aware fine-tuning epochs (STE); -1: 0 for uniform, 1 for dfq"
    )
    finetune_lr: float = option(0.0, "fine-tuning learning rate (0: a tenth of --lr)")
    candidates: list[int] = option(
        None, "dfq: candidate weight bit-widths", default_factory=lambda: [2, 4, 8]
    )
    groups: int = option(1, "dfq: channel groups per layer with their own bit-width (1: per layer)")
    tolerance: float = option(0.1, "dfq: θ = float validation loss + tolerance (nats)")
    avg_bits: float = option(
        0.0, "dfq: size budget as average weight bits over the searched layers (0: no budget)"
    )
    budget_search: bool = option(
        True,
        "dfq with avg_bits: search for the lowest validation loss within the budget (a multiplier on "
        "the size); false: the paper's smallest size within θ, then fit the budget when discretizing",
    )
    search_epochs: int = option(-1, "dfq: search epochs (-1: --epochs)")
    search_weight_lr: float = option(
        -1.0,
        "dfq: learning rate of the weights during the search (-1: the fine-tune rate, weights and α "
        "alternate as in the paper; 0: α alone, searched on the trained weights, then one fine-tune)",
    )
    arch_lr: float = option(0.05, "dfq: Adam learning rate of the bit logits α")
    dual_lr: float = option(1.0, "dfq: step size of the Lagrange multiplier's dual ascent")
    initial_multiplier: float = option(1.0, "dfq: initial Lagrange multiplier λ")

    def __post_init__(self) -> None:
        checks = [("bits", self.bits), ("act_bits", self.act_bits)]
        if self.first_last_bits:
            checks.append(("first_last_bits", self.first_last_bits))
        checks += [("candidates", b) for b in self.candidates]
        for name, value in checks:
            if not 2 <= int(value) <= 8:
                raise ValueError(f"{name} must be between 2 and 8, got {value}")
        if not self.candidates:
            raise ValueError("candidates must name at least one bit-width")
        if self.groups < 1:
            raise ValueError("groups must be at least 1")
        if self.calib_batches < 1:
            raise ValueError("calib_batches must be at least 1")
        ratios: dict[str, float | None] = {
            "latency_ratio": self.latency_ratio,
            "size_ratio": self.size_ratio,
            "bitops_ratio": self.bitops_ratio,
        }
        for name, ratio in ratios.items():
            if ratio is not None and self.method != "haq":
                raise ValueError(f"{name} is a budget of method=haq, not of method={self.method}")
            if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
                raise ValueError(f"{name} must be a positive number, got {ratio}")


class Quantize(Pass):
    """Mixed-precision fake quantization (uniform or DFQ) as graph nodes, calibrated and fine-tuned."""

    name: ClassVar[str] = "quantize"
    Options: ClassVar[type] = QuantizeOptions
    preserves_semantics: ClassVar[bool] = False
    placement: ClassVar[Literal["user"]] = "user"

    def run(self, ir: IR, ctx: Context) -> IR:
        opts: QuantizeOptions = self.options
        reduce_range = resolve_reduce_range(opts.reduce_range, get_target(ctx.target, ctx.threads))
        if opts.method == "haq":
            from fxsculpt.quant.haq.run import run_haq

            return run_haq(ir, ctx, opts, reduce_range=reduce_range)
        if opts.method == "dfq" and ctx.data is None:
            raise BadInputError(
                "quantize.method=dfq needs data (--data): it searches on the validation split"
            )
        float_size_bits = qi.model_size_bits(ir)
        _fold_batchnorms(ir)
        float_val_loss = _val_loss(ir, ctx) if ctx.data is not None else None

        layers = [n.name for n in qi.layer_nodes(ir)]
        if not layers:
            raise BadInputError("quantize found no Conv or Linear layer to quantize")
        try:
            keep = qi.resolve_layer_names(ir, opts.keep_float)
        except KeyError as exc:
            raise BadInputError(
                f"quantize.keep_float names '{exc.args[0]}', which is not a Conv/Linear layer "
                f"(layers: {', '.join(layers)})"
            ) from None
        quantized = [n for n in layers if n not in keep]
        edge = {quantized[0], quantized[-1]} if opts.first_last_bits and quantized else set()
        weight_bits = {n: (opts.first_last_bits if n in edge else opts.bits) for n in quantized}
        placing = self._places_float_layers(ctx)
        float_ir = ir.clone() if placing and opts.float_fallback == "measured" else None
        epochs = opts.finetune_epochs if opts.finetune_epochs >= 0 else (1 if opts.method == "dfq" else 0)
        correcting = opts.bias_correction != "off" and not epochs and ctx.data is not None
        float_reference = (float_ir or ir.clone()) if correcting else None
        self._insert_quantizers(ir, weight_bits, keep, reduce_range)
        placement = self._place(ir, ctx, keep) if placing else None

        history: list[dict[str, float]] = []
        multiplier_info: dict[str, Any] = {}
        if opts.method == "dfq":
            assert ctx.data is not None and float_val_loss is not None
            searched = {n: m for n, m in qi.weight_quantizers(ir).items() if n not in edge}
            if not searched:
                raise BadInputError(
                    "quantize.method=dfq has no layer to search (all are first/last or float)"
                )
            for module in searched.values():
                module.enable_search(tuple(opts.candidates), opts.groups)
            self._calibrate(ir, ctx)
            theta = float_val_loss + opts.tolerance
            budget = None
            if opts.avg_bits > 0:
                budget = opts.avg_bits * sum(
                    m.weight_numel_per_channel() * m.out_channels for m in searched.values()
                )
            settings = dfq.DFQSettings(
                epochs=opts.search_epochs if opts.search_epochs >= 0 else ctx.train.epochs,
                batch_size=ctx.train.batch_size,
                weight_lr=opts.search_weight_lr if opts.search_weight_lr >= 0 else self._finetune_lr(ctx),
                arch_lr=opts.arch_lr,
                dual_lr=opts.dual_lr,
                initial_multiplier=opts.initial_multiplier,
                theta=theta,
                size_budget_bits=budget if opts.budget_search else None,
                progress=ctx.train.progress,
            )
            result = dfq.search(
                ir.gm,
                searched,
                ctx.data.train,
                ctx.data.val,
                settings,
                ctx.generator("quantize.dfq"),
                ctx.device,
                checkpoint=pass_checkpointer(ctx, "dfq-search"),
            )
            history = result.epochs
            chosen = dfq.choose_bits(searched, budget)
            for name, bits in chosen.items():
                searched[name].set_group_bits(bits)
            if budget is not None:
                used = sum(
                    m.weight_numel_per_channel() * sum(m.channel_bits() or []) for m in searched.values()
                )
                if used > budget:
                    raise BudgetError(
                        f"quantize.avg_bits={opts.avg_bits} cannot be met: even the narrowest candidate "
                        f"({min(opts.candidates)} bits) averages {used / budget * opts.avg_bits:.2f} bits"
                    )
            multiplier_info = {
                "theta": round(theta, 4),
                "float_val_loss": round(float_val_loss, 4),
                "objective": "min L_val s.t. size <= budget"
                if settings.size_budget_bits is not None
                else "min size s.t. L_val <= theta",
            }
            qi.update_meta(ir)

        self._calibrate(ir, ctx)
        corrections = self._correct_biases(ir, float_reference, ctx)
        if epochs and ctx.data is not None:
            from fxsculpt.training.loop import train_model

            settings_ft = TrainSettings(
                epochs=epochs,
                batch_size=ctx.train.batch_size,
                lr=self._finetune_lr(ctx),
                progress=ctx.train.progress,
            )
            train_model(
                ir.gm,
                ctx.data.train,
                settings_ft,
                ctx.device,
                ctx.generator("quantize.finetune"),
                desc="quantize fine-tune",
                checkpoint=pass_checkpointer(ctx, f"{opts.method}-finetune"),
            )
            ir.gm.eval()
        qi.freeze(ir)
        ir.gm.recompile()
        ir.propagate()
        qi.update_meta(ir)
        whole_model: dict[str, Any] | None = None
        if float_ir is not None:
            candidates = {"placed": ir, "float": float_ir}
            if placement is not None and placement["float_layers"] and not epochs:
                candidates["all_int8"] = self._quantize_every_layer(
                    float_ir, weight_bits, keep, reduce_range, ctx, correct=correcting
                )
            whole_model = self._time_candidates(candidates, ctx)
            chosen = whole_model["chosen"]
            if chosen != "placed":
                ctx.logger.warning(
                    "quantize: measured %s: keeping the %s model",
                    ", ".join(f"{k} {v:.3f} ms" for k, v in whole_model["ms"].items()),
                    chosen.replace("_", " "),
                )
            ir = candidates[chosen]
            if chosen == "float":
                quantized = []

        size_bits = qi.model_size_bits(ir)
        table = qi.bits_table(ir)
        chosen_bits = {row["layer"]: row["weight_bits"] for row in table}
        ctx.record(
            method=opts.method,
            size_kb=round(size_bits / 8 / 1024, 2),
            compression=round(float_size_bits / max(size_bits, 1), 2),
            layers_quantized=len(quantized),
            layers_float=len(keep),
            finetune_epochs=epochs,
        )
        section: dict[str, Any] = {
            "method": opts.method,
            "size_kb": round(size_bits / 8 / 1024, 3),
            "float_size_kb": round(float_size_bits / 8 / 1024, 3),
            "compression": round(float_size_bits / max(size_bits, 1), 3),
            "act_bits": opts.act_bits,
            "reduce_range": reduce_range,
            "layers": table,
        }
        float_layers = [{"layer": name, "reason": "quantize.keep_float"} for name in sorted(keep)]
        if placement is not None:
            section["placement"] = placement
            float_layers += placement["float_layers"]
        if whole_model is not None:
            section["placement"]["whole_model"] = whole_model
            if whole_model["chosen"] == "float":
                float_layers = [
                    {"layer": name, "reason": "whole model: the float file measured fastest"}
                    for name in layers
                ]
            elif whole_model["chosen"] == "all_int8":
                float_layers = [row for row in float_layers if row["reason"] == "quantize.keep_float"]
        section["float_layers"] = float_layers
        if corrections is not None:
            section["bias_correction"] = corrections
        if opts.method == "dfq":
            section["dfq"] = {**multiplier_info, "history": history, "chosen_bits": chosen_bits}
        ctx.section("quantization", section)
        ctx.logger.info("quantize: per-layer bits\n%s", format_bits_table(table))
        return ir

    # -- helpers --------------------------------------------------------------------------------
    def _places_float_layers(self, ctx: Context) -> bool:
        """Whether the measured placement applies: uniform 8-bit weights and activations on ort-cpu."""
        opts: QuantizeOptions = self.options
        return (
            opts.float_fallback != "off"
            and opts.method == "uniform"
            and opts.bits == 8
            and opts.act_bits == 8
            and opts.first_last_bits in (0, 8)
            and ctx.target == "ort-cpu"
        )

    def _place(self, ir: IR, ctx: Context, keep: set[str]) -> dict[str, Any]:
        """Keep float the layers the target's measured latency table says int8 does not pay for."""
        from fxsculpt.quant.haq.run import default_latency_table
        from fxsculpt.quant.placement import place_float_layers

        layers = [n for n in qi.layer_nodes(ir) if n.name not in keep]
        start = time.perf_counter()
        placement = place_float_layers(ir, layers, default_latency_table(ctx.target, ctx.threads))
        summary = placement.summary(layers)
        summary["seconds"] = round(time.perf_counter() - start, 2)
        if summary["float_layers"]:
            ctx.logger.info(
                "quantize: %d layer(s) stay float (measured faster): %s",
                len(summary["float_layers"]),
                ", ".join(row["layer"] for row in summary["float_layers"]),
            )
        return summary

    def _insert_quantizers(
        self, ir: IR, weight_bits: dict[str, int], keep: set[str], reduce_range: bool
    ) -> None:
        """Fake quantizers on the layers of ``weight_bits`` and their inputs, as the options say."""
        opts: QuantizeOptions = self.options
        qi.insert_quantizers(
            ir,
            weight_bits,
            opts.act_bits,
            per_channel=opts.weight_granularity == "channel",
            keep_float=keep,
            quantize_output=opts.quantize_output,
            reduce_range=reduce_range,
            elementwise=opts.integer_elementwise and opts.act_bits == 8,
            affine=opts.activation_range == "affine",
        )

    def _quantize_every_layer(
        self,
        float_ir: IR,
        weight_bits: dict[str, int],
        keep: set[str],
        reduce_range: bool,
        ctx: Context,
        correct: bool,
    ) -> IR:
        """``float_ir`` with every layer but ``keep`` quantized and calibrated (and its biases
        corrected when ``correct``): the placement's rival."""
        candidate = float_ir.clone()
        self._insert_quantizers(candidate, weight_bits, keep, reduce_range)
        self._calibrate(candidate, ctx)
        if correct:
            self._correct_biases(candidate, float_ir, ctx)
        qi.freeze(candidate)
        candidate.gm.recompile()
        candidate.propagate()
        qi.update_meta(candidate)
        return candidate

    def _time_candidates(self, candidates: dict[str, IR], ctx: Context) -> dict[str, Any]:
        """Export every candidate model to a scratch folder, time them in interleaved rounds on the
        target (at the optimization level a deployed session runs) and name the fastest: the lowest
        median of its per-round time ÷ the float file's (:func:`hardware.runtime.paired_ratios`).

        A quantized file displaces the float one only where it is faster in all but
        :data:`ROUNDS_FLOAT_MAY_WIN` of the rounds: a median ratio just under 1 on a sub-millisecond
        model is within the machine's noise (tv mobilenet_v3_small won 7 rounds at a median below 1,
        then timed 1.06x float in a benchmark of 9), and the promise is a file never slower than float.
        """
        import tempfile

        from fxsculpt.hardware.runtime import median_of_rounds, paired_ratios, rounds_faster
        from fxsculpt.quant.export import export_quantized
        from fxsculpt.quant.haq.run import measured_target

        target = measured_target(ctx)  # ort-cpu: _places_float_layers checked it
        example = next(iter(candidates.values())).example_input(batch=1, seed=ctx.seed).cpu()
        rounds = 7
        with tempfile.TemporaryDirectory(prefix="fxsculpt-quantize-") as tmp:
            paths = {
                key: export_quantized(c.gm, example, Path(tmp) / f"{key}.onnx", dynamic_batch=False)
                for key, c in candidates.items()
            }
            timings = target.time_interleaved(paths, batch=1, rounds=rounds)
        ms = median_of_rounds(timings)
        ratio = paired_ratios(timings, "float")
        faster = rounds_faster(timings, "float")
        excluded = _over_static_budget(candidates, ctx.budget)
        section: dict[str, Any] = {
            "ms": {key: round(value, 4) for key, value in ms.items()},
            "over_float": {key: round(value, 4) for key, value in ratio.items()},
            "rounds_faster_than_float": {key: n for key, n in faster.items() if key != "float"},
            "rounds": rounds,
            "chosen": choose_candidate(ratio, faster, rounds, excluded),
        }
        if excluded:
            section["excluded"] = excluded
        return section

    def _finetune_lr(self, ctx: Context) -> float:
        opts: QuantizeOptions = self.options
        return opts.finetune_lr if opts.finetune_lr > 0 else ctx.train.lr / 10

    def _correct_biases(self, ir: IR, float_reference: IR | None, ctx: Context) -> dict[str, Any] | None:
        """Empirical bias correction of ``ir`` against ``float_reference`` on the calibration images
        (:mod:`quant.bias_correction`); None where it does not apply: no reference (the option is
        off, the pass fine-tunes, which learns the biases, or there is no data), or ``auto`` with no
        layer below 8 bits (after a DFQ search: the bits it chose)."""
        opts: QuantizeOptions = self.options
        if float_reference is None:
            return None
        if opts.bias_correction == "auto" and all(
            min(m.channel_bits() or [8]) >= 8 for m in qi.weight_quantizers(ir).values()
        ):
            return None
        from fxsculpt.quant.bias_correction import correct_biases

        start = time.perf_counter()
        shifts = correct_biases(float_reference, ir, self._calibration_batches(ir, ctx))
        largest = max(shifts.items(), key=lambda item: item[1]["max_abs_shift"], default=None)
        return {
            "layers": len(shifts),
            "largest_shift": None if largest is None else {"layer": largest[0], **largest[1]},
            "seconds": round(time.perf_counter() - start, 2),
        }

    def _calibrate(self, ir: IR, ctx: Context) -> None:
        opts: QuantizeOptions = self.options
        qi.calibrate(ir, self._calibration_batches(ir, ctx), opts.calibration, opts.percentile)

    def _calibration_batches(self, ir: IR, ctx: Context) -> list[torch.Tensor]:
        """``calib_batches`` shuffled training batches (the same ones on every call), or seeded
        random inputs where there is no data."""
        opts: QuantizeOptions = self.options
        batches: list[torch.Tensor]
        if ctx.data is not None:
            from fxsculpt.training.loop import make_loader

            loader = make_loader(
                ctx.data.train, ctx.train.batch_size, True, ctx.generator("quantize.calibrate")
            )
            batches = [x for x, _ in itertools.islice(loader, opts.calib_batches)]
        else:  # no data: calibrate on seeded random inputs (documented as a poor substitute)
            ctx.logger.warning("quantize: no --data given; calibrating activations on random inputs")
            batches = [ir.example_input(batch=16, seed=ctx.seed + i) for i in range(opts.calib_batches)]
        return batches


def choose_candidate(
    over_float: dict[str, float], rounds_faster: dict[str, int], rounds: int, excluded: Mapping[str, str]
) -> str:
    """The candidate handed over, from its per-round timings against the float file's.

    Of the candidates not ``excluded`` (over a static budget), the lowest median ratio to float,
    where a quantized one is eligible only if its ratio is below 1 and it was faster than float
    in all but :data:`ROUNDS_FLOAT_MAY_WIN` of ``rounds``; a tie keeps float. When float itself is
    excluded, the fastest of the others, however close. With nothing left, the placed model.
    """
    eligible = [key for key in over_float if key not in excluded] or ["placed"]
    if "float" in eligible:
        eligible = [
            key
            for key in eligible
            if key == "float"
            or (over_float[key] < 1.0 and rounds_faster[key] >= rounds - ROUNDS_FLOAT_MAY_WIN)
        ]
    return min(eligible, key=lambda key: (over_float[key], key != "float"))


def _over_static_budget(candidates: dict[str, IR], budget: Any) -> dict[str, str]:
    """The candidates that miss a size or BitOps limit of ``budget`` (counted on the IR and checked
    by :meth:`hardware.budget.Budget.check`, as the hardware pass does), with the reason: the
    whole-model choice may not hand them over, however fast they run."""
    static = ("size", "bitops")
    if budget is None or not any(key in static for key in budget.limits()):
        return {}
    from fxsculpt.hardware.counts import count_model

    excluded: dict[str, str] = {}
    for key, candidate in candidates.items():
        counts = count_model(candidate)
        checked = budget.check({"size": float(counts.size_bytes), "bitops": float(counts.bitops)})
        over = [f"{c.name} {c.measured:g} > {c.limit:g}" for c in checked if c.name in static and not c.met]
        if over:
            excluded[key] = "misses the budget: " + ", ".join(over)
    return excluded


def format_bits_table(rows: list[dict[str, Any]]) -> str:
    """The per-layer bits table as text (tabulate)."""
    from tabulate import tabulate

    return tabulate(rows, headers="keys", tablefmt="github")


def _fold_batchnorms(ir: IR) -> None:
    """Fold BatchNorm into the preceding conv (the form integer kernels run)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ir.gm.modules()):
        return
    from fxsculpt.passes.fold_bn import fold_batchnorms

    fold_batchnorms(ir)
    ir.gm.recompile()
    ir.propagate()


def _val_loss(ir: IR, ctx: Context) -> float:
    from fxsculpt.training.loop import evaluate

    assert ctx.data is not None
    loss, _ = evaluate(ir.gm, ctx.data.val, batch_size=256, device=ctx.device)
    if not math.isfinite(loss):
        raise BadInputError("the float model's validation loss is not finite")
    return loss


# Exported for HAQ and tests: the weight quantizer type a layer gets.
__all__ = ["Quantize", "QuantizeOptions", "WeightQuantizer", "format_bits_table"]
