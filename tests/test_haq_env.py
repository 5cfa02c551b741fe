"""Applying a policy: input quantizers follow their layers, output quantizers follow the layer writing them."""

from __future__ import annotations

import torch
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.quant.haq.env import apply_policy
from fxsculpt.quant.insert import act_quantizers, insert_quantizers, layer_nodes


class Block(nn.Module):
    """conv1-ReLU, then conv2 (no activation) added to the block input, ReLU, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.relu1(self.conv1(x)))
        h = self.relu2(h + x)
        return self.fc(torch.flatten(self.pool(h), 1))


def _ir() -> IR:
    torch.manual_seed(0)
    ir = IR.from_module(Block().eval(), (1, 4, 6, 6), 10)
    insert_quantizers(ir, {n.name: 8 for n in layer_nodes(ir)}, act_bits=8)
    return ir


def _bits(ir: IR) -> dict[str, int | None]:
    return {name: q.bits for name, q in act_quantizers(ir).items()}


def test_quantizers_as_inserted() -> None:
    # by hand: the input, relu1 (conv2's input), conv2's output (read by the add only), relu2
    # (read by the pool), the pool (fc's input, through flatten)
    assert sorted(_bits(_ir())) == ["conv2_aq", "pool_aq", "relu1_aq", "relu2_aq", "x_aq"]


def test_output_quantizer_follows_the_layer_that_writes_it() -> None:
    ir = _ir()
    layers = layer_nodes(ir)  # conv1, conv2, fc
    apply_policy(ir, layers, [(8, 8), (None, None), (8, 8)])
    bits = _bits(ir)
    # conv2 is float: the quantizer on its output would only add a Q/DQ pair to a float path
    assert bits["conv2_aq"] is None and bits["relu1_aq"] is None
    # the input feeds conv1 (int8) and the add; relu2's quantizer is no layer's input (the pool's
    # output is fc's) and no layer writes it: it stays as it was
    assert bits["x_aq"] == 8 and bits["relu2_aq"] == 8 and bits["pool_aq"] == 8
    apply_policy(ir, layers, [(8, 8), (8, 8), (8, 8)])
    assert _bits(ir)["conv2_aq"] == 8  # and back when conv2 is quantized again
    apply_policy(ir, layers, [(8, 8), (8, None), (6, 4)])
    bits = _bits(ir)
    assert bits["conv2_aq"] is None and bits["relu1_aq"] is None and bits["pool_aq"] == 4


def test_bit_widths_without_float_leave_output_quantizers_at_8() -> None:
    ir = _ir()
    apply_policy(ir, layer_nodes(ir), [(3, 5), (2, 6), (4, 4)])
    assert _bits(ir) == {"x_aq": 5, "relu1_aq": 6, "conv2_aq": 8, "relu2_aq": 8, "pool_aq": 4}
