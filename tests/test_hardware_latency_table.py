"""Latency tables: the on-disk cache key, measuring once, int8 kernels, and the bitserial formula."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxsculpt.hardware.runtime as runtime
from fxsculpt.hardware.bitserial import BitserialTarget
from fxsculpt.hardware.latency_table import CACHE_ENV, LatencyTable, default_cache_dir, predict_model
from fxsculpt.hardware.layers import LayerSignature, layer_groups
from fxsculpt.hardware.ort_cpu import OrtCpuTarget
from fxsculpt.hardware.runtime import measurement_session
from fxsculpt.hardware.single_layer import build_single_layer
from fxsculpt.ir.constructs import Quantizer
from fxsculpt.ir.graph import IR

CONV = LayerSignature(
    op="conv",
    in_shape=(1, 8, 8, 8),
    out_shape=(1, 8, 8, 8),
    kernel=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    bias=True,
    act="relu",
)


def _fast(threads: int = 1) -> OrtCpuTarget:
    return OrtCpuTarget(threads=threads, warmup=1, layer_max_seconds=0.02, max_seconds=0.05)


def test_second_lookup_does_not_measure_again_even_in_a_new_process_view(tmp_path: Path) -> None:
    table = LatencyTable(_fast(), tmp_path)
    first = table.lookup(CONV)
    assert table.measurements == 1
    assert table.lookup(CONV) == first
    assert table.measurements == 1
    reopened = LatencyTable(_fast(), tmp_path)  # a fresh table reads the file written above
    assert reopened.lookup(CONV) == first
    assert reopened.measurements == 0


def test_thread_count_cpu_and_runtime_are_part_of_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = LatencyTable(_fast(1), tmp_path)
    one.lookup(CONV)
    two = LatencyTable(_fast(2), tmp_path)
    assert two.path != one.path
    two.lookup(CONV)
    assert two.measurements == 1  # a changed thread count is a different entry
    assert one.identity["cpu"] == runtime.cpu_name()
    assert one.identity["onnxruntime"] == ort.__version__
    runtime.cpu_name.cache_clear()
    monkeypatch.setattr(runtime, "cpu_name", lambda: "Some Other CPU")
    monkeypatch.setattr("fxsculpt.hardware.ort_cpu.cpu_name", lambda: "Some Other CPU")
    other = LatencyTable(_fast(1), tmp_path)
    assert other.path != one.path
    other.lookup(CONV)
    assert other.measurements == 1


def test_bits_are_part_of_the_signature(tmp_path: Path) -> None:
    table = LatencyTable(_fast(), tmp_path)
    table.lookup(CONV)
    table.lookup(CONV.with_bits(8, 8))
    assert table.measurements == 2
    assert len(table) == 2


def test_cache_folder_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    table = LatencyTable(BitserialTarget())
    table.lookup(CONV)
    assert table.path.parent == tmp_path / "cache" and table.path.is_file()


@pytest.mark.parametrize(
    ("sig", "kernel"),
    [
        (CONV.with_bits(8, 8), "QLinearConv"),
        (
            LayerSignature(op="linear", in_shape=(1, 32), out_shape=(1, 10), bias=True).with_bits(8, 8),
            "QGemm",
        ),
        (
            LayerSignature(
                op="add", in_shape=(1, 8, 8, 8), out_shape=(1, 8, 8, 8), act="relu", extra="1x8x8x8"
            ).with_bits(None, 8),
            "QLinearAdd",
        ),
    ],
)
def test_int8_single_layers_run_on_integer_kernels(sig: LayerSignature, kernel: str) -> None:
    model = build_single_layer(sig)
    onnx.checker.check_model(onnx.load_from_string(model))
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "opt.onnx"
        measurement_session(model, 1, optimized_model_path=optimized)
        ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert kernel in ops, ops
    assert "DequantizeLinear" not in ops and "QuantizeLinear" not in ops


def test_bitserial_roofline_by_hand() -> None:
    sig = LayerSignature(
        op="conv",
        in_shape=(1, 8, 4, 4),
        out_shape=(1, 16, 4, 4),
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        weight_bits=4,
        act_bits=4,
    )
    target = BitserialTarget(bricks=8192, freq_mhz=500.0, bandwidth_gbs=25.6)
    compute, memory = target.terms_ms(sig)
    macs = 16 * 4 * 4 * 8 * 9  # 18,432
    assert compute == pytest.approx(macs * (2 * 2) / (8192 * 500e6) * 1e3)
    weight_bytes = 16 * 8 * 9 * 4 / 8
    act_bytes = (8 * 16 + 16 * 16) * 4 / 8
    assert memory == pytest.approx((weight_bytes + act_bytes) / 25.6e9 * 1e3)
    assert target.layer_latency_ms(sig) == pytest.approx(max(compute, memory))
    # compute-bound: 8x8-bit MACs take 16 bricks, 4x4-bit 4, 2x2-bit 1 (Bit Fusion); 3 bits round up to 4
    fast_memory = BitserialTarget(bandwidth_gbs=1e9)
    t8 = fast_memory.layer_latency_ms(sig.with_bits(8, 8))
    assert t8 / fast_memory.layer_latency_ms(sig.with_bits(4, 4)) == pytest.approx(4.0, rel=1e-3)
    assert t8 / fast_memory.layer_latency_ms(sig.with_bits(2, 2)) == pytest.approx(16.0, rel=1e-3)
    assert fast_memory.layer_latency_ms(sig.with_bits(3, 3)) == pytest.approx(
        fast_memory.layer_latency_ms(sig.with_bits(4, 4))
    )
    summed = BitserialTarget(combine="sum")
    assert summed.layer_latency_ms(sig) == pytest.approx(compute + memory)


def test_prediction_sums_every_layer_group(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)
    )
    ir = IR.from_module(model.eval(), (1, 3, 8, 8), 4)
    groups = layer_groups(ir)
    assert [g.names for g in groups] == [["_0", "_1", "_2"], ["_3"], ["_4"]]
    target = BitserialTarget()
    prediction = predict_model(ir, LatencyTable(target, tmp_path))
    expected = sum(target.layer_latency_ms(g.signature) for g in groups if g.signature is not None)
    assert prediction.overhead_ms == 0.0
    assert prediction.total_ms == pytest.approx(expected)
    assert prediction.unpredicted == []


class _WrappedWeights(Quantizer):
    """Stands in for the quantization pass's weight quantizer: a Quantizer that wraps a layer."""

    role = "weight"

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(8)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _ActQ(Quantizer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_wrapped_layers_are_layers_and_activation_quantizers_are_free() -> None:
    model = nn.Sequential(_ActQ(8), _WrappedWeights(nn.Conv2d(3, 4, 3)), nn.ReLU(), _ActQ(8))
    ir = IR.from_module(model.eval(), (1, 3, 6, 6))
    nodes = {n.name: n for n in ir.gm.graph.nodes}
    ir.meta(nodes["_1"]).weight_bits, ir.meta(nodes["_1"]).act_bits = 8, 8
    groups = layer_groups(ir)
    assert [g.names for g in groups] == [["_1", "_2"]]  # conv + ReLU; quantizers are Q/DQ pairs that fuse
    sig = groups[0].signature
    assert sig is not None and sig.op == "conv" and sig.kernel == (3, 3) and sig.act == "relu"
    assert (sig.weight_bits, sig.act_bits) == (8, 8) and sig.out_shape == (1, 4, 4, 4)


def test_a_table_entry_is_the_lowest_of_repeated_medians(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Other processes only add time: of three timing runs (medians 3, 1, 2 ms) the entry keeps 1 ms,
    and the repeat count is part of the table's identity (entries made otherwise are not reused)."""
    target = OrtCpuTarget(threads=1, layer_repeats=3)
    medians = iter([3.0, 1.0, 2.0])

    def fake_time_model(
        model: object, batch: int = 1, max_seconds: float | None = None, **_: object
    ) -> object:
        return runtime.Timing(next(medians), 0.0, 0.0, 0.0, 10, True, 1.0, True)

    monkeypatch.setattr(target, "time_model", fake_time_model)
    assert target.layer_latency_ms(CONV) == 1.0
    once = LatencyTable(OrtCpuTarget(threads=1, layer_repeats=1), tmp_path)
    assert LatencyTable(target, tmp_path).path != once.path
