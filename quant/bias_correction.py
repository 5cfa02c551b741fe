"""Empirical bias correction: each quantized layer's bias absorbs the mean shift quantization adds.

Rounding weights and activations to their grids moves each layer's output off the float model's,
and not only by noise: the error has a mean per output channel (a depthwise kernel of nine
weights rounded together; a clipped activation range; a ReLU that cuts one side of the noise
upstream). A shift survives into the next layers where noise averages out, and int8 accuracy
pays for it. Nagel et al. 2019 ("Data-Free Quantization Through Weight Equalization and Bias
Correction", §4.2, empirical variant) remove it by matching each layer's mean output to the float
model's on sample data:

    b_q = b + E[y_float] − E[y_quant]      (per output channel; over images and positions)

Layers are corrected in graph order, each measured with every earlier layer already corrected,
so a layer absorbs only what is still wrong when its input arrives. A forward stops at the layer
being measured. The bias is a float in the model and an int32 in the exported integer kernel, so
the correction costs nothing at run time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.quant import insert as qi
from fxsculpt.quant.modules import WeightQuantizer


class _Reached(Exception):
    """Raised by a hook to end a forward once the layer being measured has produced its output."""


def _channel_means(output: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Mean over everything but the output-channel axis (1 for a conv, last for a Linear), float64."""
    channel_axis = output.dim() - 1 if isinstance(layer, nn.Linear) else 1
    moved = output.detach().double().movedim(channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1]).sum(dim=0)


def _mean_outputs(
    gm: nn.Module, modules: dict[str, nn.Module], batches: Sequence[torch.Tensor], stop_at: str | None = None
) -> dict[str, torch.Tensor]:
    """Per-channel mean output of each of ``modules`` over ``batches`` (stop after ``stop_at``)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str, layer: nn.Module) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            total = _channel_means(output, layer)
            sums[name] = sums.get(name, torch.zeros_like(total)) + total
            counts[name] = counts.get(name, 0) + output.numel() // total.numel()
            if name == stop_at:
                raise _Reached

        return hook

    for name, module in modules.items():
        layer = module.layer if isinstance(module, WeightQuantizer) else module
        handles.append(module.register_forward_hook(hook_for(name, layer)))
    try:
        with torch.no_grad():
            for x in batches:
                with contextlib.suppress(_Reached):
                    gm(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def correct_biases(
    float_ir: IR, quant_ir: IR, batches: Sequence[torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Shift the bias of every quantized layer of ``quant_ir`` so that its mean output per channel
    on ``batches`` is ``float_ir``'s (module docstring); a layer without a bias gets one.

    ``float_ir`` is the same model before quantizers were inserted (same node names). Returns, per
    corrected layer, the largest and the mean absolute shift (in the layer's output units).
    """
    quantizers = {n: m for n, m in qi.weight_quantizers(quant_ir).items() if m.bits is not None}
    if not quantizers or not batches:
        return {}
    float_nodes = {node.name: node for node in float_ir.gm.graph.nodes}
    float_layers = {
        name: float_ir.gm.get_submodule(str(float_nodes[name].target))
        for name in quantizers
        if name in float_nodes
    }
    device = quant_ir.device
    batches = [x.to(device) for x in batches]
    quant_ir.gm.eval()
    float_ir.gm.eval()
    float_means = _mean_outputs(float_ir.gm, float_layers, batches)
    shifts: dict[str, dict[str, float]] = {}
    for name, module in quantizers.items():
        if name not in float_means:
            continue
        quant_mean = _mean_outputs(quant_ir.gm, {name: module}, batches, stop_at=name).get(name)
        if quant_mean is None:  # the layer is not on the path from the input to the output
            continue
        shift = float_means[name] - quant_mean
        layer = module.layer
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(module.out_channels, device=device))
        with torch.no_grad():
            layer.bias.add_(shift.to(layer.bias.dtype))
        shifts[name] = {
            "max_abs_shift": float(shift.abs().max()),
            "mean_abs_shift": float(shift.abs().mean()),
        }
    return shifts
