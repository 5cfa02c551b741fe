"""Per-node times from ONNX Runtime's profiler, mapped back to the IR nodes of a known model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fxsculpt.hardware.profiler import attach_latencies, profile_onnx
from fxsculpt.ir.graph import IR
from fxsculpt.passes.export import export_onnx


class Known(nn.Module):
    """conv-BN-ReLU, conv-BN, residual add, ReLU, pool, flatten, linear: every name is known."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = torch.relu(y + self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[IR, Path]:
    torch.manual_seed(0)
    ir = IR.from_module(Known().eval(), (1, 3, 12, 12), 5)
    path = tmp_path_factory.mktemp("prof") / "model.onnx"
    export_onnx(ir.gm.eval(), ir.example_input(batch=2), path, dynamic_batch=True)
    return ir, path


def test_every_conv_and_linear_gets_a_time_under_its_own_name(exported: tuple[IR, Path]) -> None:
    ir, path = exported
    profile = profile_onnx(path, ir, runs=3, warmup=1)
    times = profile.by_ir_node()
    for name in ("conv1", "conv2", "fc"):  # the IR's call_module nodes, named by fx after the modules
        assert name in times, (
            f"{name} got no time; kernels: {[(k.onnx_node, k.ir_nodes) for k in profile.kernels]}"
        )
        assert times[name] >= 0.0
    kernel_of = {n: k for k in profile.kernels for n in k.ir_nodes}
    # BN is folded into its conv, and ReLU fused into the first one: one kernel each
    assert kernel_of["bn1"] is kernel_of["conv1"] and kernel_of["relu1"] is kernel_of["conv1"]
    assert kernel_of["bn2"] is kernel_of["conv2"]
    assert kernel_of["conv1"].primary == "conv1" and kernel_of["conv2"].primary == "conv2"
    # functional ops are matched by dataflow: the residual add and the ReLU after it
    assert kernel_of["add"].op_type == "Add"
    assert kernel_of["relu"].op_type == "Relu"
    assert kernel_of["pool"].op_type == "ReduceMean"
    assert kernel_of["fc"].op_type == "Gemm"
    attach_latencies(ir, profile)
    node = {n.name: n for n in ir.gm.graph.nodes}
    assert ir.meta(node["conv1"]).latency_ms == pytest.approx(times["conv1"])
    assert ir.meta(node["bn1"]).latency_ms == 0.0


def test_profile_kernels_are_the_optimized_graph(exported: tuple[IR, Path]) -> None:
    _, path = exported
    profile = profile_onnx(path, None, runs=2, warmup=1)
    ops = sorted(k.op_type for k in profile.kernels)
    # reference: the exported file has two Conv nodes and one Gemm; ORT fuses conv1+ReLU
    model = onnx.load(str(path))
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 2
    assert ops.count("FusedConv") + ops.count("Conv") == 2
    assert ops.count("Gemm") == 1
    assert all(k.primary is None for k in profile.kernels)  # no IR given: nothing mapped


def test_int8_qdq_kernels_map_to_their_convs(exported: tuple[IR, Path], tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    ir, path = exported

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.items = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(2)]

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.items.pop() if self.items else None

    qpath = tmp_path / "int8.onnx"
    quantize_static(
        str(path),
        str(qpath),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    profile = profile_onnx(qpath, ir, runs=2, warmup=1)
    by_primary = {k.primary: k for k in profile.kernels if k.primary}
    assert by_primary["conv1"].op_type == "QLinearConv"
    assert by_primary["conv2"].op_type == "QLinearConv"
    assert by_primary["fc"].op_type == "QGemm"
