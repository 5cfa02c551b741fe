"""Measured float placement (:mod:`quant.placement`) on a stand-in latency table with known costs.

The table prices a kernel by hand: every int8 kernel 1 ms, every float kernel 3 ms, and each
standalone float/int8 conversion 0.5 ms, except that the int8 kernel of the middle convolution (16
output channels) costs 20 ms. The reference is the exhaustive search over all 2^4 assignments of
the four-layer model below, priced the same way: the sweep must reach its optimum, with the slow
convolution float. With int8 kernels far cheaper no convolution stays float; with int8 never
paying every layer does.
"""

from __future__ import annotations

from torch import nn

from fxsculpt.hardware.layers import LayerSignature
from fxsculpt.ir.graph import IR
from fxsculpt.quant import insert as qi
from fxsculpt.quant.placement import place_float_layers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()
        return self.fc(x.mean((2, 3)))


class HandTable:
    """int8 kernels ``int8_ms`` (``slow_int8_ms`` for 16-channel outputs), float kernels ``float_ms``."""

    def __init__(self, int8_ms: float = 1.0, float_ms: float = 3.0, slow_int8_ms: float = 20.0) -> None:
        self.int8_ms, self.float_ms, self.slow_int8_ms = int8_ms, float_ms, slow_int8_ms

    def overhead_ms(self) -> float:
        return 0.0

    def lookup(self, sig: LayerSignature, module: object = None, save: bool = True) -> float:
        if sig.op in ("quantize", "dequantize", "dequantize_weight"):
            return 0.5
        if sig.weight_bits == 8 and sig.act_bits == 8:
            return self.slow_int8_ms if len(sig.out_shape) == 4 and sig.out_shape[1] == 16 else self.int8_ms
        return self.float_ms


def quantized_ir() -> tuple[IR, list]:
    ir = IR.from_module(Net().eval(), (1, 3, 8, 8), 10)
    layers = qi.layer_nodes(ir)
    qi.insert_quantizers(ir, {n.name: 8 for n in layers}, act_bits=8)
    return ir, qi.layer_nodes(ir)


def brute_force_ms(ir: IR, layers: list, table: HandTable) -> float:
    """The best predicted latency over all 2^n int8/float assignments (the reference)."""
    from fxsculpt.quant.haq.hardware_cost import ExactLatency, ort_cpu_canonical

    exact = ExactLatency(ir, layers, table, ort_cpu_canonical, runtime_plan=True)
    return min(
        exact([(8, 8) if (mask >> i) & 1 else (None, None) for i in range(len(layers))])
        for mask in range(2 ** len(layers))
    )


def test_the_slow_int8_layer_goes_float_and_the_choice_is_the_exhaustive_optimum() -> None:
    ir, layers = quantized_ir()
    table = HandTable()
    reference = brute_force_ms(*quantized_ir(), table)
    placement = place_float_layers(ir, layers, table)
    assert "conv2" in placement.float_layers(layers)
    assert placement.chosen_ms == reference
    assert placement.chosen_ms < min(placement.int8_ms, placement.float_ms)
    assert set(placement.reasons) == set(placement.float_layers(layers))
    # The IR carries the choice: the float layers' weights are float, the others 8-bit.
    bits = {row["layer"]: row["weight_bits"] for row in qi.bits_table(ir)}
    assert {name for name, b in bits.items() if b == "float"} == set(placement.float_layers(layers))


def test_no_conv_stays_float_when_int8_kernels_are_much_faster() -> None:
    ir, layers = quantized_ir()
    placement = place_float_layers(ir, layers, HandTable(int8_ms=0.1, slow_int8_ms=0.1))
    assert [n for n in placement.float_layers(layers) if n.startswith("conv")] == []
    assert placement.chosen_ms == brute_force_ms(*quantized_ir(), HandTable(int8_ms=0.1, slow_int8_ms=0.1))


def test_float_everywhere_when_int8_never_pays() -> None:
    ir, layers = quantized_ir()
    placement = place_float_layers(ir, layers, HandTable(int8_ms=5.0, slow_int8_ms=5.0))
    assert placement.float_layers(layers) == [n.name for n in layers]
    assert placement.chosen_ms == placement.float_ms
