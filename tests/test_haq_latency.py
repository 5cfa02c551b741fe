"""HAQ's latency cost from a target's table: overhead counted once, dominated levels dropped.

A stub table stands in for the measured one (no timing in tests): a layer costs the per-call
overhead plus MACs × a factor that depends on its bits like ort-cpu (int8 fast, anything else
runs the float kernel) or like a bit-serial array (cost ∝ bits).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fxsculpt.hardware.layers import layer_groups
from fxsculpt.ir.graph import IR
from fxsculpt.quant.haq.actions import BitLevels
from fxsculpt.quant.haq.hardware_cost import latency_model, ort_cpu_canonical, undominated_levels

OVERHEAD = 0.5


def _macs(sig) -> int:
    if sig.op == "conv":
        return math.prod(sig.out_shape) * (sig.in_shape[1] // sig.groups) * math.prod(sig.kernel)
    if sig.op == "linear":
        return math.prod(sig.out_shape) * sig.in_shape[-1]
    return math.prod(sig.out_shape)


class StubTable:
    def __init__(self, per_bit: bool) -> None:
        self.per_bit = per_bit
        self.asked: list[object] = []

    def factor(self, sig) -> float:
        w, a = sig.weight_bits, sig.act_bits
        if self.per_bit:
            return (32 if w is None else w) * (32 if a is None else a) / 64
        int8 = (w == 8 and a == 8) if sig.op in ("conv", "linear") else a == 8
        return 0.25 if int8 else 1.0

    def lookup(self, sig, module=None, save=True) -> float:
        self.asked.append(sig)
        return OVERHEAD + 1e-6 * _macs(sig) * self.factor(sig)

    def overhead_ms(self) -> float:
        return OVERHEAD


def _ir() -> IR:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    return IR.from_module(model, (1, 3, 16, 16), 10)


def test_ort_cpu_like_table_keeps_int8_and_float_only() -> None:
    ir = _ir()
    names = ["_0", "_2", "_6"]
    table = StubTable(per_bit=False)
    levels = BitLevels(2, 8, with_float=True)
    model = latency_model(ir, names, levels, table, canonical=ort_cpu_canonical)
    kept = undominated_levels(model, levels)
    assert kept.levels == [8, None]
    # by hand: overhead once, every group at its int8 or float factor
    groups = layer_groups(ir)
    searched = [g for g in groups if g.main.name in names]
    others = [g for g in groups if g.main.name not in names and g.signature is not None]
    # groups the search does not touch keep the bits they have: float here (no quantizers)
    other_ms = sum(1e-6 * _macs(g.signature) * 1.0 for g in others)
    int8 = OVERHEAD + other_ms + sum(1e-6 * _macs(g.signature) * 0.25 for g in searched)
    flt = OVERHEAD + other_ms + sum(1e-6 * _macs(g.signature) * 1.0 for g in searched)
    assert model.uniform(8) == pytest.approx(int8)
    assert model.uniform(None) == pytest.approx(flt)
    # a mixed pair runs the float kernel on ort-cpu
    assert model([(8, None), (8, 8), (8, 8)]) == pytest.approx(
        int8 + 1e-6 * _macs(searched[0].signature) * 0.75
    )


def test_bitserial_like_table_keeps_every_level() -> None:
    ir = _ir()
    table = StubTable(per_bit=True)
    levels = BitLevels(2, 8)
    model = latency_model(ir, ["_0", "_2", "_6"], levels, table)
    assert undominated_levels(model, levels).levels == list(range(2, 9))
    assert model.uniform(4) < model.uniform(8)


def test_exact_latency_matches_the_bitserial_model_of_the_final_ir(tmp_path) -> None:
    """Residual adds run quantized only when their inputs agree: the exact cost sees that, as the target does."""
    import random

    from fxsculpt.hardware.bitserial import BitserialTarget
    from fxsculpt.hardware.latency_table import LatencyTable
    from fxsculpt.quant.haq.hardware_cost import ExactLatency
    from fxsculpt.quant.insert import insert_quantizers, layer_nodes
    from fxsculpt.zoo import BuiltinSpec, build_builtin

    ir = IR.from_module(build_builtin("resnet", BuiltinSpec(in_channels=1, image_size=8)), (1, 1, 8, 8), 10)
    insert_quantizers(ir, {n.name: 8 for n in layer_nodes(ir)}, act_bits=8)
    layers = layer_nodes(ir)
    exact = ExactLatency(ir, layers, LatencyTable(BitserialTarget(), cache_dir=tmp_path))
    rng = random.Random(0)
    for _ in range(3):
        policy = [(rng.randint(2, 8), rng.randint(2, 8)) for _ in layers]
        ms = exact(policy)
        assert ms == pytest.approx(BitserialTarget().model_latency(ir, None).median_ms)
