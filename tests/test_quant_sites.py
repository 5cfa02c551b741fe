"""Where activation quantizers go on third-party shapes of graph, checked against ONNX Runtime.

The reference is the graph ONNX Runtime runs: a layer whose input and weights are quantized
becomes one integer kernel (QLinearConv), so every conv of these models must appear as one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.quant import insert as qi
from fxsculpt.quant.export import export_quantized, optimized_op_counts, parity


class DenseBlock(nn.Module):
    """Concatenation of ReLU outputs (DenseNet), an identity between a conv and its ReLU (timm's
    ``drop``), a sigmoid gate (squeeze-excite) and a channel shuffle (transpose) before convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grow = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Identity()
        self.se = nn.Conv2d(16, 16, 1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.stem(x))
        b = F.relu(self.drop(self.grow(a)))
        y = torch.cat([a, b], 1)  # both inputs non-negative: an unsigned quantizer
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))  # no integer kernel
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        y = F.relu(self.mix(y))
        return self.head(y.mean((2, 3)))


def _quantized() -> IR:
    torch.manual_seed(0)
    ir = IR.from_module(DenseBlock().eval(), (1, 3, 16, 16), 10)
    qi.insert_quantizers(ir, dict.fromkeys((n.name for n in qi.layer_nodes(ir)), 8), act_bits=8)
    qi.calibrate(ir, [torch.randn(16, 3, 16, 16)])
    qi.freeze(ir)
    return ir


def test_every_conv_reads_a_quantized_input() -> None:
    ir = _quantized()
    assert len(qi.weight_quantizers(ir)) == 5  # stem, grow, se, mix, head
    missing = [n.name for n in qi.layer_nodes(ir) if qi.input_quantizer(ir, n) is None]
    assert missing == []


def test_the_concat_of_relus_is_unsigned_and_the_identity_is_looked_through() -> None:
    ir = _quantized()
    cat = next(n for n in ir.gm.graph.nodes if qi.is_concat(n))
    (user,) = cat.users
    quantizer = ir.gm.get_submodule(str(user.target))
    assert isinstance(quantizer, qi.ActQuantizer) and not quantizer.signed
    # the conv before the identity is not quantized on its own: its ReLU is (they fuse)
    grow = next(n for n in ir.gm.graph.nodes if n.name == "grow")
    assert not any(isinstance(qi._module(ir.gm, u), qi.ActQuantizer) for u in grow.users)


def test_onnx_runtime_runs_every_conv_on_an_integer_kernel(tmp_path: Path) -> None:
    ir = _quantized()
    path = export_quantized(ir.gm, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    ops = optimized_op_counts(path)
    assert ops["QLinearConv"] == 4, ops  # stem, grow, se, mix; counted by hand
    assert ops["Conv"] + ops["FusedConv"] == 0, ops
    result = parity(ir.gm, path, [torch.randn(32, 3, 16, 16)])
    assert result["agreement"] >= 0.9, result


class SiluBlock(nn.Module):
    """EfficientNet's shapes: SiLU as a module and as a function, a squeeze-excite gate, and a
    product with a parameter (a layer scale) that is not an activation product."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.scale = nn.Parameter(torch.full((1, 8, 1, 1), 0.5))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.stem(x))
        gate = torch.sigmoid(self.expand(F.silu(self.reduce(y.mean((2, 3), keepdim=True)))))
        y = self.mix(y * gate) * self.scale
        return self.head(y.mean((2, 3)))


def _elementwise(elementwise: bool) -> tuple[IR, nn.Module]:
    torch.manual_seed(0)
    model = SiluBlock().eval()
    ir = IR.from_module(model, (1, 3, 16, 16), 10)
    bits = dict.fromkeys((n.name for n in qi.layer_nodes(ir)), 8)
    qi.insert_quantizers(ir, bits, act_bits=8, elementwise=elementwise)
    qi.calibrate(ir, [torch.randn(16, 3, 16, 16)])
    qi.freeze(ir)
    return ir, model


def test_split_silu_computes_what_silu_computes() -> None:
    torch.manual_seed(0)
    model = SiluBlock().eval()
    ir = IR.from_module(model, (1, 3, 16, 16), 10)
    assert qi.split_silu(ir) == 2  # the module and the function
    assert not any(isinstance(m, nn.SiLU) for m in ir.gm.modules())
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ir.gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_sigmoids_and_activation_products_run_on_integer_kernels(tmp_path: Path) -> None:
    ir, _ = _elementwise(True)
    sigmoid_quantizers = [
        ir.gm.get_submodule(str(u.target))
        for n in ir.gm.graph.nodes
        if qi.is_sigmoid(ir.gm, n)
        for u in n.users
        if isinstance(qi._module(ir.gm, u), qi.ActQuantizer)
    ]
    assert len(sigmoid_quantizers) == 3 and not any(q.signed for q in sigmoid_quantizers)
    path = export_quantized(ir.gm, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    ops = optimized_op_counts(path)
    # counted by hand: two SiLUs and the gate's sigmoid; the SiLUs' products and the gate's product.
    # The layer scale multiplies by a parameter: it stays a float Mul.
    assert ops["QLinearSigmoid"] == 3 and ops["Sigmoid"] == 0, ops
    assert ops["QLinearMul"] == 3 and ops["Mul"] == 1, ops
    result = parity(ir.gm, path, [torch.randn(32, 3, 16, 16)])
    assert result["agreement"] >= 0.9, result


def test_without_elementwise_sigmoids_stay_float(tmp_path: Path) -> None:
    ir, _ = _elementwise(False)
    path = export_quantized(ir.gm, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    ops = optimized_op_counts(path)
    assert ops["QLinearSigmoid"] + ops["QLinearMul"] == 0, ops
