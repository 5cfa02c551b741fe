"""Empirical bias correction (:mod:`quant.bias_correction`) against its formula and its promise.

References: for one Linear the shift is ``W·E[x] − W_q·E[x_q]``, computed here in float64 from the
layer's quantized weight and input; for a stack of layers, the quantized model's mean output per
channel at every layer equals the float model's, measured with plain hooks in one forward (which
only holds when each layer was corrected after the ones before it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.quantize import Quantize
from fxsculpt.quant import insert as qi
from fxsculpt.quant.bias_correction import correct_biases
from fxsculpt.quant.modules import WeightQuantizer
from fxsculpt.training.data import load_data
from fxsculpt.training.loop import train_model


def _quantized(model: nn.Module, shape: tuple[int, ...], batches: list[torch.Tensor]) -> tuple[IR, IR]:
    """(float IR, the same with 4-bit weights and 8-bit activations, calibrated on ``batches``)."""
    float_ir = IR.from_module(model.eval(), shape, 4)
    quant_ir = float_ir.clone()
    qi.insert_quantizers(quant_ir, {n.name: 4 for n in qi.layer_nodes(quant_ir)}, act_bits=8)
    qi.calibrate(quant_ir, batches)
    return float_ir, quant_ir


def test_a_linear_layer_absorbs_the_mean_error_of_its_quantized_weight_and_input() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(32, 6) * 2 + 0.5 for _ in range(3)]
    float_ir, quant_ir = _quantized(nn.Sequential(nn.Linear(6, 4)), (1, 6), batches)
    ((name, wq),) = qi.weight_quantizers(quant_ir).items()
    input_quantizer = next(iter(qi.act_quantizers(quant_ir).values()))
    x = torch.cat(batches).double()
    with torch.no_grad():
        x_q = input_quantizer(torch.cat(batches)).double()
        w, w_q = wq.layer.weight.double(), wq.quantized_weight().double()
    expected = w @ x.mean(0) - w_q @ x_q.mean(0)  # the bias itself cancels
    assert expected.abs().max() > 1e-3  # 4-bit weights leave a shift to correct
    before = wq.layer.bias.detach().clone()

    shifts = correct_biases(float_ir, quant_ir, batches)

    assert torch.allclose((wq.layer.bias.detach() - before).double(), expected, atol=1e-5)
    assert shifts[name]["max_abs_shift"] == pytest.approx(float(expected.abs().max()), rel=1e-4)
    assert torch.equal(float_ir.gm.get_submodule("0").bias, before)  # the reference is untouched


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise, no bias
        self.conv3 = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def _means_per_layer(ir: IR, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean output per channel of every Conv/Linear (wrapped or not), all in one forward."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for node in qi.layer_nodes(ir):
        module = ir.gm.get_submodule(str(node.target))
        layer = module.layer if isinstance(module, WeightQuantizer) else module
        axis = -1 if isinstance(layer, nn.Linear) else 1

        def hook(
            _m: nn.Module, _i: object, out: torch.Tensor, name: str = node.name, axis: int = axis
        ) -> None:
            flat = out.detach().double().movedim(axis, -1).reshape(-1, out.shape[axis])
            sums[name] = sums.get(name, 0) + flat.mean(0) / len(batches)

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for x in batches:
            ir.gm(x)
    for handle in handles:
        handle.remove()
    return sums


def test_every_layer_of_a_stack_matches_the_float_means_once_corrected_in_order() -> None:
    torch.manual_seed(1)
    batches = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    float_ir, quant_ir = _quantized(_Stack(), (1, 3, 8, 8), batches)
    float_means = _means_per_layer(float_ir, batches)
    uncorrected = _means_per_layer(quant_ir, batches)
    assert max(float((uncorrected[n] - float_means[n]).abs().max()) for n in float_means) > 1e-3

    shifts = correct_biases(float_ir, quant_ir, batches)

    assert set(shifts) == set(float_means) == {"conv1", "conv2", "conv3", "fc"}
    corrected = _means_per_layer(quant_ir, batches)
    for name, reference in float_means.items():
        assert torch.allclose(corrected[name], reference, atol=1e-5), name
    assert quant_ir.gm.get_submodule("conv2").layer.bias is not None  # the bias-free layer got one


def test_the_pass_corrects_without_fine_tuning_and_reports_it(tmp_path: Path) -> None:
    data = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = _Stack()
    model.conv1, model.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(12, 10)
    train_model(
        model,
        data.train,
        TrainSettings(epochs=2, batch_size=32, lr=0.05, progress=False),
        "cpu",
        torch.Generator().manual_seed(0),
    )
    biases = {}
    for bits, option, corrected in [
        ("8", "on", True),
        ("8", "off", False),
        ("8", "auto", False),
        ("4", "auto", True),
    ]:
        ctx = Context(
            out_dir=tmp_path,
            stage_dir=tmp_path / "stage",
            data=data,
            train=TrainSettings(epochs=1, batch_size=32, lr=0.05, progress=False),
        )
        ctx.current_pass = "quantize"
        ir = IR.from_module(copy.deepcopy(model).eval(), (1, 1, 8, 8), 10)  # the pass edits in place
        quantize = Quantize(method="uniform", bits=bits, float_fallback="off", bias_correction=option)
        out = quantize.run(ir, ctx)
        biases[bits, option] = out.gm.get_submodule("conv1").layer.bias.detach().clone()
        section = ctx.sections["quantization"]
        assert ("bias_correction" in section) is corrected, (bits, option)
        if corrected:
            assert section["bias_correction"]["layers"] == 4
    float_bias = model.conv1.bias.detach()
    off, on = (float((biases["8", key] - float_bias).abs().max()) for key in ("off", "on"))
    assert off < 1e-4  # off: the float bias, up to the exported int32 bias grid
    assert on > 10 * off
    assert torch.equal(biases["8", "auto"], biases["8", "off"])
