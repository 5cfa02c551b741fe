"""export: ONNX Runtime reproduces PyTorch on residual, depthwise+SE and concat models.

The reference is always computed here, independently of the pass: PyTorch's own outputs
and an ``onnxruntime.InferenceSession`` opened directly on the written file.
"""

from __future__ import annotations

import copy
import os
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.ir.errors import BadInputError, RunFailedError
from fxsculpt.ir.graph import IR
from fxsculpt.passes import Context, Pipeline
from fxsculpt.passes import export as export_module
from fxsculpt.passes.export import Export, export_onnx


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


class ResidualNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class DepthwiseSE(nn.Module):
    """MobileNetV2-style inverted residual with a squeeze-and-excite gate."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.bn = nn.BatchNorm2d(12)
        self.se_reduce = nn.Linear(12, 4)
        self.se_expand = nn.Linear(4, 12)
        self.project = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        y = nn.functional.relu6(self.expand(x))
        y = nn.functional.relu6(self.bn(self.dw(y)))
        s = y.mean(dim=(2, 3))
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(s))))
        y = y * s[:, :, None, None]
        y = self.project(y)
        return self.fc(y.mean(dim=(2, 3)))


class ConcatNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 16 * 16, classes)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return self.fc(self.pool(y).flatten(1))


MODELS = {"residual": ResidualNet, "depthwise_se": DepthwiseSE, "concat": ConcatNet}
SHAPE = (1, 3, 32, 32)


def make_ctx(tmp_path: Path, data=None) -> Context:
    stage = tmp_path / ".staging"
    stage.mkdir(parents=True, exist_ok=True)
    return Context(out_dir=tmp_path, stage_dir=stage, data=data, seed=3)


def make_ir(name: str) -> tuple[IR, nn.Module]:
    torch.manual_seed(0)
    model = randomize_bn(MODELS[name]())
    return IR.from_module(copy.deepcopy(model), SHAPE, num_classes=10), model


def torch_out(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """Each model exported once by the pass (default options), shared by the parity tests."""
    tmp = tmp_path_factory.mktemp(request.param)
    ir, model = make_ir(request.param)
    ctx = make_ctx(tmp)
    Export(compare_samples=16).run(ir, ctx)
    return request.param, model, ctx


def test_parity_checker_and_section(exported):
    name, model, ctx = exported
    path = ctx.stage_dir / "model.onnx"
    assert path.is_file() and not (ctx.out_dir / "model.onnx").exists()  # staged, not published
    onnx.checker.check_model(str(path), full_check=True)
    section = ctx.sections["onnx"]
    assert section["path"] == "model.onnx" and section["opset"] == 18
    assert section["samples_compared"] == 16 and section["inputs"] == "random"
    assert section["file_bytes"] == path.stat().st_size
    assert section["max_abs_diff"] <= 1e-4
    assert section["top1_agreement"] == 1.0
    loaded = onnx.load(str(path))
    assert section["nodes"] == len(loaded.graph.node)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert section["op_counts"].get("Conv") == convs
    if name == "concat":
        assert section["op_counts"].get("Concat") == 1


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_runs_in_onnxruntime(exported, batch):
    _, model, ctx = exported
    session = ort.InferenceSession(str(ctx.stage_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    expected = torch_out(model, x)
    assert got.shape == (batch, 10)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_real_test_images_are_compared(tmp_path, cifar_npz):
    arrays = np.load(cifar_npz)
    images = torch.from_numpy(arrays["x_test"][:40].astype(np.float32) / 255.0 - 0.5)
    labels = torch.from_numpy(arrays["y_test"][:40])
    data = types.SimpleNamespace(test=TensorDataset(images, labels))
    ir, model = make_ir("depthwise_se")
    ctx = make_ctx(tmp_path, data=data)
    Export(compare_samples=32).run(ir, ctx)
    section = ctx.sections["onnx"]
    assert section["inputs"] == "test split" and section["samples_compared"] == 32
    assert section["batch_sizes"] == [1, 5, 26]
    session = ort.InferenceSession(str(ctx.stage_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = images[:32].numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    expected = torch_out(model, x)
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    assert section["top1_agreement"] == agreement
    assert section["max_abs_diff"] == pytest.approx(float(np.abs(got - expected).max()), abs=1e-6)


def test_perturbed_runtime_outputs_fail_the_run_and_leave_no_file(tmp_path, monkeypatch):
    real = export_module.run_onnx_outputs

    def perturbed(session, x):
        return [out + 0.01 for out in real(session, x)]

    monkeypatch.setattr(export_module, "run_onnx_outputs", perturbed)
    ir, _ = make_ir("concat")
    ctx = make_ctx(tmp_path)
    with pytest.raises(RunFailedError, match=r"differ from PyTorch's by 0\.01") as info:
        Export(compare_samples=8).run(ir, ctx)
    assert "\n" not in str(info.value)
    assert not (ctx.stage_dir / "model.onnx").exists() and not (tmp_path / "model.onnx").exists()


def test_fixed_batch_and_forwarded_exporter_arguments(tmp_path):
    ir, model = make_ir("residual")
    ir.input_shape = (4, 3, 32, 32)
    path = tmp_path / "fixed.onnx"
    export_onnx(ir.gm.eval(), ir.example_input(), path, dynamic_batch=False, input_names=["image"])
    loaded = onnx.load(str(path))
    (graph_input,) = loaded.graph.input
    assert graph_input.name == "image"  # extra keyword arguments reach torch.onnx.export
    assert graph_input.type.tensor_type.shape.dim[0].dim_value == 4
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.onnx"]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp file
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x})
    assert np.abs(got - torch_out(model, x)).max() <= 1e-4


class Unexportable(nn.Module):
    def forward(self, x):
        return torch.special.zeta(x, x)


def test_export_failure_is_one_line_and_writes_nothing(tmp_path):
    ir = IR.from_module(Unexportable(), (2, 3))
    with pytest.raises(RunFailedError, match=r"^ONNX export failed: .*zeta") as info:
        export_onnx(ir.gm, torch.rand(2, 3) + 2, tmp_path / "bad.onnx")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_opset_outside_the_supported_range_is_bad_input():
    with pytest.raises(BadInputError, match=r"18\.\.23"):
        Export(opset=17)
    with pytest.raises(BadInputError, match="no option"):
        Export(opset_version=18)


def test_pipeline_runs_export_last_and_fills_the_onnx_section(tmp_path):
    ir, model = make_ir("residual")
    ctx = make_ctx(tmp_path)
    result = Pipeline(["fold_bn", "dce"], options={"export": {"compare_samples": "12"}}).run(ir, ctx)
    assert [r.name for r in result.records] == ["fold_bn", "dce", "export"]
    assert result.records[0].summary["folded"] == 3
    section = ctx.sections["onnx"]
    assert ctx.artifacts["model.onnx"] == ctx.stage_dir / "model.onnx"
    assert section["samples_compared"] == 12 and section["max_abs_diff"] <= 1e-4
    assert "BatchNormalization" not in section["op_counts"]
    assert section["op_counts"]["Conv"] == 3
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(ctx.artifacts["model.onnx"]), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    assert np.abs(got - torch_out(model, x)).max() <= 1e-4  # the folded file still computes the original


class FixedBatch(nn.Module):
    """Adds a (2, 3) buffer: only batch size 2 broadcasts, so the batch cannot be symbolic."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.arange(6.0).reshape(2, 3))

    def forward(self, x):
        return x + self.offset


def test_fixed_batch_model_gets_a_hint_then_exports_without_dynamic_batch(tmp_path):
    ir = IR.from_module(FixedBatch(), (2, 3))
    ctx = make_ctx(tmp_path)
    with pytest.raises(RunFailedError, match=r"set export\.dynamic_batch=false"):
        Export().run(ir, ctx)
    Export(dynamic_batch=False, compare_samples=6).run(ir, ctx)
    section = ctx.sections["onnx"]
    assert section["batch_sizes"] == [2] and section["samples_compared"] == 6
    assert section["op_counts"] == {"Add": 1} and section["max_abs_diff"] == 0.0
