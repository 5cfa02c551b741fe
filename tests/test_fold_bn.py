"""fold_bn: folded graphs compute what the unfolded model computes, and the counts are right."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from fxsculpt.ir.errors import RunFailedError
from fxsculpt.ir.graph import IR
from fxsculpt.passes import Context, Pipeline
from fxsculpt.passes import fold_bn as fold_module
from fxsculpt.passes.fold_bn import fold_batchnorms, fold_conv_bn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones are identity-like)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def bn_nodes(ir: IR) -> int:
    return sum(
        1
        for n in ir.gm.graph.nodes
        if n.op == "call_module"
        and isinstance(ir.gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm)
    )


def assert_same_outputs(reference: nn.Module, ir: IR, shape: tuple[int, ...], seed: int = 7) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference.eval()(x)
        got = ir.gm.eval()(x)
    scale = max(1.0, float(expected.abs().max()))
    assert torch.allclose(got, expected, atol=1e-5 * scale, rtol=0), float((got - expected).abs().max())


class Residual(nn.Module):
    """conv-bn-relu, conv(no bias)-bn, + skip, then a BN on the sum (which must stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn_after_add = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.bn_after_add(x + y)


class DepthwiseGrouped(nn.Module):
    """Depthwise conv with stride/dilation/padding, grouped no-bias conv, 1-D conv branch."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=6)
        self.bn_dw = nn.BatchNorm2d(6)
        self.grouped = nn.Conv2d(6, 8, 1, groups=2, bias=False)
        self.bn_grouped = nn.BatchNorm2d(8, affine=False)
        self.conv1d = nn.Conv1d(8, 5, 3, padding=1, padding_mode="reflect")
        self.bn1d = nn.BatchNorm1d(5)

    def forward(self, x):
        y = torch.relu(self.bn_dw(self.dw(x)))
        y = self.bn_grouped(self.grouped(y))
        y = y.flatten(2)
        return self.bn1d(self.conv1d(y))


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 9)
        self.bn1 = nn.BatchNorm1d(9)
        self.fc2 = nn.Linear(9, 3, bias=False)
        self.bn2 = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


class Unfoldable(nn.Module):
    """Three BNs that must stay: conv output read twice, a Linear on (N, L, F), no running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_shared_input = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 6)
        self.bn_seq = nn.BatchNorm1d(4)  # normalizes dimension 1 (L = 4), not the features
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_batch_stats = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        c = self.conv(x)
        y = self.bn_shared_input(c) + c
        z = self.bn_seq(self.fc(y.flatten(2)[:, :, :8]))
        return z.sum() + self.bn_batch_stats(self.conv2(y)).mean()


class SharedConv(nn.Module):
    """One conv object called twice, each call followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_b(self.conv(torch.relu(self.bn_a(self.conv(x)))))


@pytest.mark.parametrize(
    ("conv", "bn", "shape"),
    [
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), nn.BatchNorm2d(6), (2, 4, 9, 9)),
        (nn.Conv2d(6, 6, 5, padding=4, dilation=2, groups=6, bias=False), nn.BatchNorm2d(6), (2, 6, 8, 8)),
        (nn.Conv2d(6, 9, 1, groups=3), nn.BatchNorm2d(9, affine=False), (2, 6, 5, 5)),
        (nn.Conv1d(3, 4, 3, stride=2, bias=False), nn.BatchNorm1d(4), (2, 3, 11)),
        (nn.Linear(7, 5), nn.BatchNorm1d(5), (4, 7)),
    ],
)
def test_fold_conv_bn_matches_conv_then_bn(conv, bn, shape):
    torch.manual_seed(0)
    randomize_bn(bn, seed=1)
    conv.eval()
    original_weight = conv.weight.detach().clone()
    folded = fold_conv_bn(conv, bn)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = bn(conv(x))
        got = folded(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert folded.bias is not None
    assert torch.equal(conv.weight, original_weight)  # the input layer is left untouched
    assert folded is not conv


def test_fold_conv_bn_bias_follows_the_formula():
    """b' = (b - μ) γ / sqrt(σ² + ε) + β, checked element by element in plain Python."""
    conv = nn.Conv2d(1, 2, 1)
    bn = randomize_bn(nn.BatchNorm2d(2), seed=3)
    folded = fold_conv_bn(conv, bn)
    conv, bn, folded = (m.requires_grad_(False) for m in (conv, bn, folded))
    for c in range(2):
        b, mu, var = float(conv.bias[c]), float(bn.running_mean[c]), float(bn.running_var[c])
        gamma, beta = float(bn.weight[c]), float(bn.bias[c])
        s = gamma / (var + bn.eps) ** 0.5
        assert float(folded.bias[c]) == pytest.approx((b - mu) * s + beta, rel=1e-6)
        assert float(folded.weight[c, 0, 0, 0]) == pytest.approx(float(conv.weight[c, 0, 0, 0]) * s, rel=1e-6)


def test_fold_conv_bn_refuses_mismatched_channels():
    with pytest.raises(ValueError, match="channels"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))


@pytest.mark.parametrize(
    ("model_cls", "shape", "folded", "skipped"),
    [
        (Residual, (2, 4, 6, 6), 2, 1),  # bn1, bn2 fold; the BN on the residual sum stays
        (DepthwiseGrouped, (2, 6, 9, 9), 3, 0),
        (LinearBN, (5, 12), 2, 0),
        (Unfoldable, (2, 3, 4, 4), 0, 3),
        (SharedConv, (2, 3, 5, 5), 2, 0),
    ],
)
def test_folded_graph_matches_the_unfolded_model(model_cls, shape, folded, skipped):
    torch.manual_seed(0)
    model = randomize_bn(model_cls())
    reference = copy.deepcopy(model)
    ir = IR.from_module(model, shape)
    before = bn_nodes(ir)
    stats = fold_batchnorms(ir)
    assert (stats.folded, stats.skipped) == (folded, skipped)
    assert bn_nodes(ir) == before - folded
    assert_same_outputs(reference, ir, shape)
    ir.gm.graph.lint()


def test_folded_bn_modules_are_gone_and_params_shrink():
    model = randomize_bn(Residual())
    ir = IR.from_module(model, (1, 4, 6, 6))
    fold_batchnorms(ir)
    names = {name for name, _ in ir.gm.named_modules()}
    assert "bn1" not in names and "bn2" not in names and "bn_after_add" in names
    # By hand: conv1 36*4+4, conv2 36*4 (+4 new bias), bn_after_add 8.
    assert ir.param_count() == (144 + 4) + (144 + 4) + 8


def test_shared_conv_keeps_one_copy_per_call():
    model = randomize_bn(SharedConv())
    ir = IR.from_module(model, (1, 3, 5, 5))
    fold_batchnorms(ir)
    targets = [n.target for n in ir.gm.graph.nodes if n.op == "call_module"]
    assert len(targets) == 2 and len(set(targets)) == 2


def test_pass_records_counts_and_passes_the_verifier(tmp_path: Path):
    model = randomize_bn(Residual())
    reference = copy.deepcopy(model)
    ir = IR.from_module(model, (1, 4, 6, 6))
    stage = tmp_path / "stage"
    stage.mkdir()
    ctx = Context(out_dir=tmp_path, stage_dir=stage)
    result = Pipeline(["fold_bn"], export=False).run(ir, ctx)
    record = result.records[0]
    assert record.summary["folded"] == 2 and record.summary["skipped"] == 1
    assert record.verified_max_abs_diff is not None and record.verified_max_abs_diff < 1e-5
    assert record.before["nodes"] - record.after["nodes"] == 2
    assert_same_outputs(reference, result.ir, (3, 4, 6, 6))


def test_verifier_catches_a_wrong_fold(tmp_path: Path, monkeypatch):
    """A fold that forgets β claims to preserve semantics but does not: the pipeline fails."""
    real = fold_module.fold_conv_bn

    def forgets_beta(layer, bn):
        folded = real(layer, bn)
        with torch.no_grad():
            folded.bias -= bn.bias
        return folded

    monkeypatch.setattr(fold_module, "fold_conv_bn", forgets_beta)
    ir = IR.from_module(randomize_bn(Residual()), (1, 4, 6, 6))
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(RunFailedError, match="pass 'fold_bn' claims to preserve"):
        Pipeline(["fold_bn"], export=False).run(ir, Context(out_dir=tmp_path, stage_dir=stage))
