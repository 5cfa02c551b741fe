"""What ONNX Runtime runs for a mixed float/int8 model, predicted from the IR and counted in ORT's graph.

The reference is ONNX Runtime itself: each policy's model is exported and loaded, and the
optimized graph ORT saves is counted (QLinearConv, QLinearAdd, standalone QuantizeLinear and
DequantizeLinear). :func:`hardware.qdq.kernel_plan` must predict those counts from the IR alone.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from fxsculpt.hardware.layers import layer_groups
from fxsculpt.hardware.qdq import kernel_plan
from fxsculpt.hardware.runtime import measurement_session
from fxsculpt.hardware.single_layer import CONVERSION_OPS, build_single_layer, conversion_signature
from fxsculpt.ir.graph import IR
from fxsculpt.passes.export import export_onnx
from fxsculpt.quant.export import export_settings
from fxsculpt.quant.haq.env import apply_policy
from fxsculpt.quant.insert import calibrate, freeze, insert_quantizers, layer_nodes


class Residual(nn.Module):
    """conv-ReLU, conv, + identity shortcut, ReLU, conv-ReLU, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.conv1(x))
        h = self.relu2(self.conv2(h) + self.shortcut(h))
        h = self.relu3(self.conv3(h))
        return self.fc(torch.flatten(h, 1))


def _quantized_ir() -> IR:
    torch.manual_seed(0)
    ir = IR.from_module(Residual().eval(), (1, 3, 8, 8), 10)
    insert_quantizers(ir, {n.name: 8 for n in layer_nodes(ir)}, act_bits=8)
    return ir


def _ort_counts(ir: IR, tmp: Path) -> Counter[str]:
    model = ir.clone()
    freeze(model)
    model.gm.eval()
    opset, extra = export_settings(model.gm)
    path = tmp / "model.onnx"
    export_onnx(model.gm, model.example_input(batch=2), path, opset=opset, dynamic_batch=True, **extra)
    optimized = tmp / "optimized.onnx"
    measurement_session(path, 1, optimized_model_path=optimized)
    return Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


POLICIES = {
    "int8": [(8, 8)] * 4,
    "float": [(None, None)] * 4,
    "float-middle": [(8, 8), (None, None), (8, 8), (8, 8)],
    "float-input-int8-weights": [(8, None), (8, 8), (8, 8), (None, None)],
    "float-last-conv": [(8, 8), (8, 8), (None, None), (8, 8)],
}
# (float weights, 8-bit input) is left out: freeze puts a Max(x, x) boundary in front of such a
# layer, which ONNX Runtime feeds from two DequantizeLinear copies; HAQ never exports that pair.


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_kernel_plan_predicts_what_onnx_runtime_runs(name: str) -> None:
    ir = _quantized_ir()
    layers = layer_nodes(ir)
    apply_policy(ir, layers, POLICIES[name])
    calibrate(ir, [torch.randn(4, 3, 8, 8) for _ in range(2)])
    plan = kernel_plan(ir)
    integer = Counter(
        g.signature.op for g, fast in zip(plan.groups, plan.integer, strict=True) if fast and g.signature
    )
    conversions = Counter(c.op for c in plan.conversions)
    with tempfile.TemporaryDirectory() as tmp:
        ort = _ort_counts(ir, Path(tmp))
    assert ort["QLinearConv"] == integer["conv"], (name, ort)
    assert ort["QLinearAdd"] == integer["add"], (name, ort)
    assert ort["QuantizeLinear"] == conversions["quantize"], (name, ort)
    assert ort["DequantizeLinear"] == conversions["dequantize"] + conversions["dequantize_weight"], (
        name,
        ort,
    )


def test_hand_counted_boundaries_of_a_float_middle_layer() -> None:
    """conv2 in float between int8 layers, counted by hand from ONNX Runtime's fusion rules."""
    ir = _quantized_ir()
    apply_policy(ir, layer_nodes(ir), [(8, 8), (None, None), (8, 8), (8, 8)])
    plan = kernel_plan(ir)
    kinds = {g.main.name: fast for g, fast in zip(plan.groups, plan.integer, strict=True) if g.signature}
    # conv1's output feeds a float conv: its quantizer is float, so conv1 has no output Q -> float kernel
    # (conv2's float input decides the quantizer conv1 writes, shared with the shortcut)
    assert kinds["conv1"] is False and kinds["conv2"] is False
    assert kinds["conv3"] is True  # 8-bit input (after relu2's quantizer) and 8-bit output
    assert kinds["fc"] is False  # the logits are not quantized: no integer Gemm
    ops = Counter(c.op for c in plan.conversions)
    # Q: the network input (no kernel before it) and relu2's output (the add runs float) -> 2
    # DQ: the input into float conv1, relu3's output into the float flatten/Gemm -> 2
    # weight DQ: conv1 and fc run float kernels on int8 weights from the file -> 2
    assert ops == Counter({"quantize": 2, "dequantize": 2, "dequantize_weight": 2})


def test_identity_shortcut_does_not_hide_the_add_quantizer() -> None:
    """A residual add whose one input comes through nn.Identity is still fed by two quantizers."""
    ir = _quantized_ir()
    adds = [g for g in layer_groups(ir) if g.signature is not None and g.signature.op == "add"]
    assert len(adds) == 1 and adds[0].signature is not None and adds[0].signature.act_bits == 8


@pytest.mark.parametrize("op", CONVERSION_OPS)
def test_conversion_models_run_one_conversion_node(op: str) -> None:
    sig = conversion_signature(op, (1, 4, 5, 5) if op != "dequantize_weight" else (4, 3, 3, 3))
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "o.onnx"
        session = measurement_session(build_single_layer(sig), 1, optimized_model_path=optimized)
        nodes = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert nodes == ["QuantizeLinear" if op == "quantize" else "DequantizeLinear"]  # not folded away
    out = session.get_outputs()[0]
    assert out.type == ("tensor(uint8)" if op == "quantize" else "tensor(float)")
    assert out.shape == list(sig.out_shape)
