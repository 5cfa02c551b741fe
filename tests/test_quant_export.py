"""Quantized export: ONNX Runtime's fused op counts and parity, 8-bit and mixed (INT4, 2-bit), keep_float."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.hardware.int8_arithmetic import u8s8_saturates
from fxsculpt.ir.graph import IR
from fxsculpt.quant import export as qe
from fxsculpt.quant import insert as qi
from fxsculpt.quant.modules import FloatBoundary, WeightQuantizer
from fxsculpt.training.loop import torch_threads


class TinyNet(nn.Module):
    """conv-relu, conv + residual add, relu, a 1x1 projection conv, pool, linear: every fused pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.conv1(x))
        b = self.relu2(self.conv2(a) + a)
        c = self.relu3(self.conv3(b))
        return self.fc(torch.flatten(self.pool(c), 1))


def _cifar(path: Path, n_train: int = 2000, n_test: int | None = None) -> tuple[TensorDataset, torch.Tensor]:
    data = np.load(path)
    mean = np.array([0.49, 0.48, 0.45], dtype=np.float32)[None, :, None, None]
    std = np.array([0.25, 0.24, 0.26], dtype=np.float32)[None, :, None, None]

    def prep(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x.astype(np.float32) / 255 - mean) / std)

    train = TensorDataset(prep(data["x_train"][:n_train]), torch.from_numpy(data["y_train"][:n_train]))
    return train, prep(data["x_test"][:n_test])


def _trained(train: TensorDataset) -> nn.Module:
    """A small CIFAR model, trained single-threaded so it is the same model under pytest-xdist."""
    with torch_threads(1):
        return _train_tiny(train)


def _train_tiny(train: TensorDataset) -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(5):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(request: pytest.FixtureRequest) -> tuple[nn.Module, TensorDataset, torch.Tensor]:
    path = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-subset.npz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {path} (../shared/data is absent)")
    train, test = _cifar(path)
    return _trained(train), train, test


def _quantized(model: nn.Module, train: TensorDataset, bits: dict[str, int | None]) -> IR:
    # A traced IR shares its parameters with ``model`` and freezing writes them, so quantize a copy:
    # otherwise each test would quantize what the tests before it left behind.
    ir = IR.from_module(copy.deepcopy(model), (1, 3, 32, 32), 10)
    # the fc runs as QGemm; 7-bit weight codes where this CPU's int8 kernels saturate (see
    # test_8bit_parity_needs_reduced_range_where_kernels_saturate for what happens without them)
    qi.insert_quantizers(ir, bits, act_bits=8, quantize_output=True, reduce_range=u8s8_saturates())
    qi.calibrate(ir, [train.tensors[0][i : i + 128] for i in range(0, 512, 128)])
    qi.freeze(ir)
    return ir


@pytest.mark.skipif(not u8s8_saturates(), reason="this CPU's int8 kernels accumulate in 32 bits (VNNI)")
def test_8bit_parity_needs_reduced_range_where_kernels_saturate(trained, tmp_path: Path) -> None:
    """On a CPU without VNNI, full-range 8-bit weights make ONNX Runtime compute another model."""
    model, train, test = trained
    ir = IR.from_module(copy.deepcopy(model), (1, 3, 32, 32), 10)
    qi.insert_quantizers(ir, {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 8}, act_bits=8, quantize_output=True)
    qi.calibrate(ir, [train.tensors[0][i : i + 128] for i in range(0, 512, 128)])
    qi.freeze(ir)
    path = qe.export_quantized(ir.gm, test[:2], tmp_path / "int8-full-range.onnx")
    result = qe.parity(ir.gm, path, [test[i : i + 100] for i in range(0, len(test), 100)])
    assert result["agreement"] < 0.99  # measured 77.9% on an AVX2-only EPYC


def test_8bit_export_runs_on_integer_kernels_with_parity(trained, tmp_path: Path) -> None:
    model, train, test = trained
    ir = _quantized(model, train, {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 8})
    path = qe.export_quantized(ir.gm, test[:2], tmp_path / "int8.onnx")
    counts = qe.optimized_op_counts(path)
    assert counts["QLinearConv"] == 3  # every conv on the integer kernel ...
    assert counts["Conv"] == 0  # ... and no float conv left
    assert counts["QGemm"] + counts["MatMulInteger"] + counts["QLinearMatMul"] >= 1
    assert counts["QLinearAdd"] == 1
    result = qe.parity(ir.gm, path, [test[i : i + 100] for i in range(0, len(test), 100)])
    print(f"int8 parity: agreement {result['agreement']:.4f}, max abs diff {result['max_abs_diff']:.3g}")
    assert result["agreement"] >= 0.99
    assert result["max_abs_diff"] < 0.5


def test_mixed_export_int4_and_container_bits(trained, tmp_path: Path) -> None:
    model, train, test = trained
    ir = _quantized(model, train, {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8})
    wq = qi.weight_quantizers(ir)
    assert wq["conv2"].uses_int4() and not wq["conv3"].uses_int4()
    # a 2-bit layer's frozen weights take at most 4 levels per channel
    w3 = wq["conv3"].layer.weight.detach() / wq["conv3"].scale.reshape(-1, 1, 1, 1)
    assert all(len(torch.unique(torch.round(row))) <= 4 for row in w3)
    assert torch.allclose(w3, torch.round(w3), atol=1e-4)  # on the grid
    path = qe.export_quantized(ir.gm, test[:2], tmp_path / "mixed.onnx")
    model_proto = onnx.load(str(path))
    assert max(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
    int4 = [
        n
        for n in model_proto.graph.node
        if n.op_type == "QuantizeLinear"
        and any(a.name == "output_dtype" and a.i == onnx.TensorProto.INT4 for a in n.attribute)
    ]
    assert len(int4) == 1  # conv2's weights
    counts = qe.optimized_op_counts(path)
    assert counts["QLinearConv"] == 2  # conv1 (8-bit) and conv3 (2-bit in the int8 container)
    assert counts["Conv"] == 1  # conv2: ONNX Runtime has no int4 conv, it dequantizes
    result = qe.parity(ir.gm, path, [test[i : i + 100] for i in range(0, len(test), 100)])
    print(f"mixed parity: agreement {result['agreement']:.4f}, max abs diff {result['max_abs_diff']:.3g}")
    # Measured 100% (max abs diff 0) on the whole split since freezing puts each bias on the int32
    # grid ONNX Runtime rounds it to; before, 99.3% (98.5% on the model an earlier test had frozen in
    # place): ONNX Runtime's rounding of the bias flipped near-ties.
    assert result["agreement"] >= 0.99
    # the size counts the real bits: hand count of weights, bias and scales
    expected_bits = (
        8 * 16 * 27
        + 32 * 16
        + 32 * 16  # conv1: weights at 8 bits, bias and scales at 32
        + 4 * 16 * 144
        + 32 * 16
        + 32 * 16  # conv2
        + 2 * 32 * 144
        + 32 * 32
        + 32 * 32  # conv3
        + 8 * 10 * 32
        + 32 * 10
        + 32 * 10  # fc
    )
    assert qi.model_size_bits(ir) == expected_bits
    assert ir.meta(next(n for n in ir.gm.graph.nodes if n.name == "conv2")).weight_bits == 4


def test_keep_float_leaves_the_layer_in_float(trained, tmp_path: Path) -> None:
    model, train, test = trained
    ir = IR.from_module(copy.deepcopy(model), (1, 3, 32, 32), 10)
    keep = qi.resolve_layer_names(ir, ["conv3"])
    qi.insert_quantizers(
        ir, {"conv1": 8, "conv2": 8, "fc": 8}, keep_float=keep, reduce_range=u8s8_saturates()
    )
    assert isinstance(ir.gm.get_submodule("conv3"), nn.Conv2d)
    assert not isinstance(ir.gm.get_submodule("conv3"), WeightQuantizer)
    node = next(n for n in ir.gm.graph.nodes if n.name == "conv3")
    assert ir.meta(node).weight_bits is None
    qi.calibrate(ir, [train.tensors[0][:128]])
    qi.freeze(ir)
    path = qe.export_quantized(ir.gm, test[:2], tmp_path / "keep.onnx")
    counts = qe.optimized_op_counts(path)
    assert counts["Conv"] == 1 and counts["QLinearConv"] == 2
    result = qe.parity(ir.gm, path, [test[:200]])
    assert result["agreement"] >= 0.99
    with pytest.raises(KeyError):
        qi.resolve_layer_names(ir, ["no_such_layer"])


def test_mixed_export_reaches_the_issue_parity_target(trained, tmp_path: Path) -> None:
    """Issue 4: ≥ 99% top-1 agreement between PyTorch and ONNX Runtime, 8/4/2-bit, whole test split."""
    model, train, test = trained
    ir = _quantized(model, train, {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8})
    path = qe.export_quantized(ir.gm, test[:2], tmp_path / "mixed.onnx")
    result = qe.parity(ir.gm, path, [test[i : i + 100] for i in range(0, len(test), 100)])
    print(f"mixed parity: agreement {result['agreement']:.4f}, max abs diff {result['max_abs_diff']:.3g}")
    assert result["samples"] == len(test)
    assert result["agreement"] >= 0.99
    # Measured 100%; before the biases were snapped this model agreed 99.3% (98.5% when it was the
    # model the earlier tests had frozen in place). What can still differ is the float rounding of
    # values within ~1e-5 of a tie, a few codes in millions, far from 0.5% of the samples.
    assert result["agreement"] >= 0.995


def _ort_biases(path: Path) -> list[np.ndarray]:
    """The float bias of every Conv/Gemm in the graph ONNX Runtime runs, from its own int32 rewrite.

    ONNX Runtime quantizes a float bias to int32 at ``input_scale · weight_scale``; the fused kernels
    keep the int32 codes and the two scales, a float Conv a ``DequantizeLinear`` of the codes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        qe.session(path, 1, out)
        graph = onnx.load(str(out)).graph
    init = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    biases = []
    for node in graph.node:
        ins = list(node.input)
        if node.op_type == "QLinearConv" and len(ins) == 9:  # x, xs, xz, w, ws, wz, ys, yz, bias
            scale = init[ins[1]].astype(np.float32) * init[ins[4]].astype(np.float32)
            biases.append(init[ins[8]].astype(np.float32) * scale)
        elif node.op_type == "QGemm" and len(ins) >= 7 and ins[6]:  # a, as, az, b, bs, bz, c, ...
            scale = init[ins[1]].astype(np.float32) * init[ins[4]].astype(np.float32)
            biases.append(init[ins[6]].astype(np.float32) * scale)
        elif node.op_type == "DequantizeLinear" and init.get(ins[0], np.zeros(0, np.int8)).dtype == np.int32:
            biases.append(init[ins[0]].astype(np.float32) * init[ins[1]].astype(np.float32))
    return biases


def test_frozen_bias_is_the_int32_bias_onnx_runtime_adds(trained, tmp_path: Path) -> None:
    """The cause of the mixed-precision gap: ONNX Runtime rounds each bias to int32 at s_x · s_w.

    At 2 and 4 bits s_w is coarse, so that rounding moved outputs by up to ~2% of a step and flipped
    near-ties. After freezing, every PyTorch bias is on that grid (checked in NumPy) and equals,
    bit for bit, one of the biases in ONNX Runtime's optimized graph.
    """
    model, train, test = trained
    ir = _quantized(model, train, {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8})
    path = qe.export_quantized(ir.gm, test[:2], tmp_path / "mixed.onnx")
    ort_biases = _ort_biases(path)
    assert len(ort_biases) == 4  # QLinearConv ×2, the INT4 conv's DequantizeLinear, QGemm
    for node in qi.layer_nodes(ir):
        wq = ir.gm.get_submodule(str(node.target))
        source = qi.input_quantizer(ir, node)
        assert isinstance(wq, WeightQuantizer) and source is not None
        bias = wq.layer.bias.detach().numpy()
        codes = bias / (np.float32(source.scale) * wq.scale.numpy().astype(np.float32))
        np.testing.assert_allclose(codes, np.round(codes), rtol=0, atol=1e-3)
        assert sum(b.shape == bias.shape and np.array_equal(b, bias) for b in ort_biases) == 1, node.name


class DeadChannelNet(nn.Module):
    """conv (channel 0: zero weights, bias 0.5) → relu → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def test_a_dead_channel_keeps_its_bias_in_onnx_runtime(tmp_path: Path) -> None:
    """With the minimal weight scale (1e-12) ONNX Runtime's int32 bias code overflowed: 39% agreement."""
    torch.manual_seed(0)
    model = DeadChannelNet().eval()
    with torch.no_grad():
        model.conv.weight[0] = 0.0
        model.conv.bias[0] = 0.5
    ir = IR.from_module(model, (1, 3, 8, 8), 5)
    qi.insert_quantizers(ir, {"conv": 8, "fc": 8}, act_bits=8, reduce_range=u8s8_saturates())
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qi.calibrate(ir, [x])
    qi.freeze(ir)
    assert float(ir.gm.get_submodule("conv").layer.bias[0].detach()) == pytest.approx(0.5, rel=1e-6)
    path = qe.export_quantized(ir.gm, x[:2], tmp_path / "dead.onnx")
    sess = qe.session(path)
    with torch.no_grad():
        expected = ir.gm(x).numpy()
    diff = np.abs(qe.run_session(sess, x) - expected)
    # The overflowing bias moved every output (39% agreement). What may remain is a rounding tie:
    # an fc input code that PyTorch's float conv and ONNX Runtime's integer requantization round
    # to neighbouring codes, which moves one sample's outputs by one step × the fc weight.
    fc_input = next(m for m in qi.act_quantizers(ir).values() if not m.signed)
    one_code = float(fc_input.scale) * float(ir.gm.get_submodule("fc").layer.weight.abs().max())
    assert diff.max() <= one_code * 1.001
    assert int((diff > 1e-4).any(axis=1).sum()) <= 1


def test_a_float_layer_that_reads_a_quantized_activation_stays_float_in_onnx_runtime(
    trained, tmp_path: Path
) -> None:
    """conv2 in float (bits None), the rest 8-bit: the configuration that ONNX Runtime quantized itself.

    conv2's input is quantized (it also feeds the residual add) and its output too, so ONNX Runtime's
    WeightBiasQuantization gave it int8 per-tensor weights and ran it as a fourth QLinearConv:
    97.9% top-1 agreement with PyTorch on the whole test split (max |diff| 0.099). With the float
    boundary in front of it, it stays a float Conv on its float weights, and the two agree.
    """
    model, train, test = trained
    ir = _quantized(model, train, {"conv1": 8, "conv2": None, "conv3": 8, "fc": 8})
    node = next(n for n in ir.gm.graph.nodes if n.name == "conv2")
    assert isinstance(ir.gm.get_submodule(str(node.args[0].target)), FloatBoundary)
    assert ir.meta(node).weight_bits is None and ir.meta(node).act_bits is None  # float in, float weights
    path = qe.export_quantized(ir.gm, test[:2], tmp_path / "float_conv2.onnx")
    counts = qe.optimized_op_counts(path)
    assert counts["QLinearConv"] == 2  # conv1 and conv3 on the integer kernel ...
    assert counts["Conv"] == 1 and len(qe.float_weight_kernels(path)) == 1  # ... conv2 on float weights
    assert counts["QLinearAdd"] == 1 and counts["QGemm"] == 1  # the neighbours' fusions are intact
    result = qe.parity(ir.gm, path, [test[i : i + 100] for i in range(0, len(test), 100)])
    print(
        f"float conv2 parity: agreement {result['agreement']:.4f}, max abs diff {result['max_abs_diff']:.3g}"
    )
    assert result["samples"] == len(test)
    assert result["agreement"] >= 0.995  # measured 1.0, max abs diff 0.0

    # The cause, kept as evidence: the same frozen model without the boundary runs conv2 on int8.
    bypassed = ir.clone()
    graph = bypassed.gm.graph
    boundary = next(n for n in graph.nodes if n.name == "conv2").args[0]
    boundary.replace_all_uses_with(boundary.args[0])
    graph.erase_node(boundary)
    bypassed.gm.recompile()
    path = qe.export_quantized(bypassed.gm, test[:2], tmp_path / "bypassed.onnx")
    assert qe.optimized_op_counts(path)["QLinearConv"] == 3 and qe.float_weight_kernels(path) == []


def test_the_float_boundary_is_an_exact_identity_and_follows_the_bits(trained) -> None:
    x = torch.tensor([0.0, -0.0, 1.5e-45, -3.4e38, float("inf"), float("-inf"), float("nan")])
    y = FloatBoundary()(x)
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))  # bit for bit, NaN and -0 included
    model, train, _ = trained
    ir = _quantized(model, train, {"conv1": 8, "conv2": None, "conv3": 8, "fc": 8})
    assert qi.isolate_float_layers(ir) == ["conv2"]  # idempotent: already in place after freeze
    assert sum(isinstance(m, FloatBoundary) for m in ir.gm.modules()) == 1
    qi.set_bits(ir, {"conv2": 8})  # quantized again: the boundary would stop its fusion, so it goes
    assert qi.isolate_float_layers(ir) == []
    assert not any(isinstance(m, FloatBoundary) for m in ir.gm.modules())
    node = next(n for n in ir.gm.graph.nodes if n.name == "conv2")
    assert qi.input_quantizer(ir, node) is not None


class HardSwishNet(nn.Module):
    """conv → hard-swish twice, pool, linear: signed activations whose minimum is about −0.375."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.act1 = nn.Hardswish()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.act2 = nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))), 1))


def test_affine_activations_export_their_zero_points_and_run_the_quantized_model(tmp_path: Path) -> None:
    """The calibrated zero points reach the file, and ONNX Runtime's kernels compute the same model."""
    from fxsculpt.quant.kernel_parity import _zero_point, activation_quantize_nodes, kernel_parity

    torch.manual_seed(0)
    ir = IR.from_module(HardSwishNet().eval(), (1, 3, 8, 8), 10)
    qi.insert_quantizers(ir, {"conv1": 8, "conv2": 8, "fc": 8}, act_bits=8, affine=True)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qi.calibrate(ir, [x], "minmax")
    qi.freeze(ir)
    quantizers = qi.act_quantizers(ir)
    moved = {name: q.zero_point for name, q in quantizers.items() if q.signed and q.zero_point != 128}
    assert len(moved) >= 2  # the hard-swish outputs (and the input) got their own zero points
    path = qe.export_quantized(ir.gm, x[:2], tmp_path / "affine.onnx")
    model = onnx.load(str(path))
    in_file = {
        name: _zero_point(model, node)[1]
        for name, node in activation_quantize_nodes(model, set(moved)).items()
    }
    assert in_file == moved
    assert qe.optimized_op_counts(path)["QLinearConv"] == 2
    parity = kernel_parity(ir.gm, path, [x], atol=1e-4)
    assert parity is not None and parity.holds, parity.summary()
