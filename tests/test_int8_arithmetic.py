"""The integer arithmetic ONNX Runtime's int8 kernels use on this CPU, and 7-bit weight codes.

The reference for saturation is ONNX Runtime itself: a one-layer QDQ MatMul whose every product is
255 × 127 gives the exact sum on a CPU with a VNNI dot product, and the sum of pairs clipped to
int16 (32767 per pair) on one without (``VPMADDUBSW``). :func:`u8s8_saturates` must predict which.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fxsculpt.hardware.int8_arithmetic import cpu_flags, resolve_reduce_range, u8s8_saturates
from fxsculpt.hardware.targets import get_target
from fxsculpt.quant import fake_quant as fq
from fxsculpt.quant.modules import WeightQuantizer

K = 16  # products per output: K / 2 pairs


def _ort_sum_of_products(weight_code: int) -> float:
    """ONNX Runtime's y = Σ_k 255 · weight_code over K inputs, through QDQ (fused to an integer MatMul)."""
    out_scale = 255 * 127 * K / 255 * 1.01  # the exact sum fits the uint8 output
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zu"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "zu"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "one", "zs"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "so", "zu"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "so", "zu"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0, np.uint8), "zu"),
        numpy_helper.from_array(np.array(0, np.int8), "zs"),
        numpy_helper.from_array(np.full((K, 4), weight_code, np.int8), "w"),
        numpy_helper.from_array(np.array(out_scale, np.float32), "so"),
    ]
    graph = helper.make_graph(
        nodes,
        "pairs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.full((1, K), 255.0, np.float32)
    return float(session.run(None, {"x": x})[0][0, 0]), out_scale


def test_saturation_prediction_matches_onnx_runtime() -> None:
    exact = 255 * 127 * K
    saturated = 32767 * K // 2  # each pair 255·127·2 = 64770 clips to 32767
    got, step = _ort_sum_of_products(127)
    expected = saturated if u8s8_saturates() else exact
    assert abs(got - expected) <= step, (got, expected)


def test_seven_bit_codes_are_exact_on_every_cpu() -> None:
    got, step = _ort_sum_of_products(fq.REDUCED_8BIT_WEIGHT_LEVELS)
    assert abs(got - 255 * 63 * K) <= step


@pytest.mark.parametrize(
    ("flags", "machine", "saturates"),
    [
        (frozenset({"avx2", "fma"}), "x86_64", True),
        (frozenset({"avx2", "avx512bw"}), "x86_64", True),  # AVX-512 without VNNI still uses VPMADDUBSW
        (frozenset({"avx2", "avx512_vnni"}), "x86_64", False),
        (frozenset({"avx2", "avx_vnni"}), "AMD64", False),
        (frozenset({"asimd", "asimddp"}), "aarch64", False),
    ],
)
def test_u8s8_saturates_from_flags(flags: frozenset[str], machine: str, saturates: bool) -> None:
    assert u8s8_saturates(flags, machine) is saturates


def test_cpu_flags_reads_the_first_processor(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_vnni"})
    assert cpu_flags(tmp_path / "missing") is None


def test_reduce_range_setting() -> None:
    target = get_target("ort-cpu")
    assert resolve_reduce_range("on", target) is True
    assert resolve_reduce_range("off", target) is False
    assert resolve_reduce_range("auto", target) is u8s8_saturates()
    assert resolve_reduce_range("auto", get_target("bitserial")) is False  # analytical: no kernels


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_reduced_range_codes(bits: int) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 6, 3)
    wq = WeightQuantizer(layer, bits, per_channel=True, reduce_range=True)
    w = layer.weight.detach()
    scale = wq.frozen_scales()
    codes = torch.round(wq.quantized_weight().detach() / scale.reshape(-1, 1, 1, 1))
    # by hand: 8-bit codes stop at 63; narrower widths keep their full symmetric range 2^(b-1)-1
    top = 63 if bits == 8 else 2 ** (bits - 1) - 1
    assert codes.abs().amax().item() == top
    assert torch.allclose(scale, w.abs().flatten(1).amax(1) / top)
