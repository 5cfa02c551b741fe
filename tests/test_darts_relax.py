"""Edge relaxation + search + discretization of ordinary models, checked against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.ir.constructs import Choice
from fxsculpt.ir.graph import IR
from fxsculpt.nas.darts.discretize import discretize
from fxsculpt.nas.darts.mixed import MixedOp
from fxsculpt.nas.darts.ops import PRIMITIVES
from fxsculpt.nas.darts.relax import NODE_KINDS, relax
from fxsculpt.nas.darts.search import SearchSettings, search
from fxsculpt.passes.darts import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


class DepthwiseNet(nn.Module):
    """A MobileNet-style net of our own: depthwise 3x3 + pointwise blocks, one residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw1 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.pw2 = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = x + torch.relu(self.bn1(self.pw1(self.dw1(x))))  # residual: dw1 may become none
        x = torch.relu(self.bn2(self.pw2(self.dw2(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _random_data(n: int, shape: tuple[int, ...], classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))


def _search_discretize_export(ir: IR, classes: int, tmp_path) -> dict[str, str]:
    from fxsculpt.passes.export import export_onnx, ort_session, run_onnx

    shape = ir.input_shape[1:]
    alphas = list({id(a): a for a in ir.arch_parameters()}.values())
    arch = {id(a) for a in alphas}
    weights = [p for p in ir.gm.parameters() if id(p) not in arch]
    before = [a.detach().clone() for a in alphas]
    search(
        ir.gm,
        weights,
        alphas,
        _random_data(32, shape, classes, 1),
        _random_data(32, shape, classes, 2),
        SearchSettings(epochs=1, batch_size=16, order=2),
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
    )
    assert any(not torch.equal(a, b) for a, b in zip(alphas, before))  # α moved
    decisions = discretize(ir)
    assert not ir.construct_nodes(Choice)
    assert all(v != "none" for v in decisions.values())
    ir.gm.eval()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = ir.gm(x).numpy()
    path = tmp_path / "model.onnx"
    export_onnx(ir.gm, x, path)
    got = run_onnx(ort_session(path, threads=1), x.numpy())
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) < 1e-4 * max(1.0, float(np.abs(expected).max()))
    return decisions


def test_relax_search_discretize_resnet(tmp_path) -> None:
    from fxsculpt.ir.load import LoadOptions, load_ir

    torch.manual_seed(0)
    ir = load_ir(
        "builtin:resnet",
        LoadOptions(input_shape=(1, 3, 8, 8), num_classes=4, model_options={"blocks": "1", "width": "4"}),
    )
    relaxed = relax(ir, "conv", PRIMITIVES, generator=torch.Generator().manual_seed(0), kinds=NODE_KINDS)
    # the paper's eight ops on every conv, hand-derived from the architecture: the stem is the only path (no none) and widens 3->4
    # channels (no pool/skip); block convs sit on residual branches (none allowed); stride-2
    # convs that widen channels get the factorized-reduce skip but no pooling.
    assert relaxed["stem_0"] == ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    assert relaxed["layer1_0_conv1"][0] == "none" and len(relaxed["layer1_0_conv1"]) == 8
    assert relaxed["layer2_0_conv1"] == [
        "none",
        "skip_connect",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    ]
    assert len(ir.construct_nodes(MixedOp)) == len(relaxed)
    decisions = _search_discretize_export(ir, 4, tmp_path)
    assert set(decisions) == set(relaxed)


def test_relax_search_discretize_depthwise_model(tmp_path) -> None:
    torch.manual_seed(0)
    ir = IR.from_module(DepthwiseNet(), (1, 3, 8, 8), 5)
    relaxed = relax(ir, "conv", PRIMITIVES, generator=torch.Generator().manual_seed(0), kinds=NODE_KINDS)
    assert "none" not in relaxed["stem"] and "none" not in relaxed["dw2"]
    assert relaxed["pw1"][0] == "none"  # the residual branch
    assert "max_pool_3x3" not in relaxed["pw2"]  # 8 -> 16 channels
    # depthwise nodes stay depthwise: pools and the identity, no separable/dilated conv (their
    # pointwise convs are dense) and no factorized-reduce skip at stride 2 (two dense 1x1 convs)
    assert relaxed["dw1"] == ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect"]
    assert relaxed["dw2"] == ["max_pool_3x3", "avg_pool_3x3"]
    _search_discretize_export(ir, 5, tmp_path)


def test_pattern_selects_nodes_by_name() -> None:
    ir = IR.from_module(DepthwiseNet(), (1, 3, 8, 8), 5)
    relaxed = relax(ir, "dw1|pw2", PRIMITIVES, kinds=NODE_KINDS)
    assert sorted(relaxed) == ["dw1", "pw2"]
