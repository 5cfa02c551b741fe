"""Exact counts checked by hand: packed size, BitOps and peak activation memory."""

from __future__ import annotations

import torch
from torch import nn

from fxsculpt.hardware.counts import count_model, peak_activation_bytes
from fxsculpt.ir.graph import IR


def _small() -> IR:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3)
    ).eval()
    return IR.from_module(model, (1, 2, 5, 5), 3)


def _node(ir: IR, name: str) -> torch.fx.Node:
    return next(n for n in ir.gm.graph.nodes if n.name == name)


def test_float_counts_by_hand() -> None:
    counts = count_model(_small())
    # conv 4*2*9 + 4, BN 4 + 4, linear 3*100 + 3
    assert counts.params == 72 + 4 + 8 + 300 + 3
    # conv: 4*5*5 outputs x 2*9 MACs each; linear: 3 x 100
    assert counts.macs == 100 * 18 + 300
    assert counts.bitops == (100 * 18 + 300) * 32 * 32
    assert counts.size_bytes == 4 * (72 + 4 + 8 + 300 + 3)


def test_mixed_precision_size_and_bitops_by_hand() -> None:
    ir = _small()
    conv, linear = _node(ir, "_0"), _node(ir, "_4")
    ir.meta(conv).weight_bits, ir.meta(conv).act_bits = 4, 8
    ir.meta(linear).weight_bits, ir.meta(linear).act_bits = 2, 6
    counts = count_model(ir)
    assert counts.bitops == 1800 * 4 * 8 + 300 * 2 * 6
    # conv kernel 72 x 4 bits = 36 B, conv bias 4 x 4 B, BN 8 x 4 B,
    # linear kernel 300 x 2 bits = 75 B, linear bias 3 x 4 B
    assert counts.size_bytes == 36 + 16 + 32 + 75 + 12
    rows = {row.name: row for row in counts.layers}
    assert rows["_0"].size_bytes == 36 + 16
    assert rows["_4"].size_bytes == 75 + 12
    assert rows["_0"].bitops == 1800 * 32


def test_odd_bit_counts_round_up_per_tensor() -> None:
    ir = _small()
    ir.meta(_node(ir, "_4")).weight_bits = 3  # 300 x 3 bits = 900 bits = 112.5 -> 113 B
    assert count_model(ir).size_bytes == 4 * (72 + 4 + 8) + 113 + 12


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1)
        self.conv2 = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        b = self.conv2(a)
        return torch.relu(a + b)


def test_peak_activation_memory_by_hand() -> None:
    ir = IR.from_module(_Residual().eval(), (1, 1, 4, 4))
    # x 16 floats = 64 B; a, b, a+b, relu 32 floats = 128 B each.
    # conv1: x + a = 192, x freed; conv2: a + b = 256; add: a + b + sum = 384 (a, b freed after);
    # relu: sum + out = 256.  Peak = 384.
    assert peak_activation_bytes(ir) == 384
    ir.meta(_node(ir, "conv1")).act_bits = 8  # a stored as 8-bit: 32 B
    # conv1: 64 + 32; conv2: 32 + 128; add: 32 + 128 + 128 = 288
    assert peak_activation_bytes(ir) == 288


def test_peak_of_a_chain_is_two_neighbours() -> None:
    ir = _small()
    # x 50 floats = 200 B, every conv/BN/ReLU/flatten output 100 floats = 400 B: two alive at once
    assert peak_activation_bytes(ir) == 800
