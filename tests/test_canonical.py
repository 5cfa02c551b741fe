"""ir.canonical: third-party forms become the module-level form, computing the same outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.passes.fold_bn import fold_batchnorms
from tests.test_fold_bn import bn_nodes, randomize_bn


class NormAct(nn.BatchNorm2d):
    """A BatchNorm subclass with its activation, written as timm's BatchNormAct2d is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )
        return F.relu(x)


class NormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = NormAct(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = NormAct(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def _functional_bns(ir: IR) -> int:
    return sum(1 for n in ir.gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm)


def _asserts(ir: IR) -> int:
    return sum(1 for n in ir.gm.graph.nodes if n.target is torch._assert)


def test_functional_batch_norms_become_modules_with_the_same_output() -> None:
    model = randomize_bn(NormActNet())
    ir = IR.from_module(model, (1, 3, 16, 16))
    assert _functional_bns(ir) == 0
    assert _asserts(ir) == 0
    assert bn_nodes(ir) == 2  # bn1, bn2: counted by hand
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ir.gm(x), model(x))


def test_the_new_modules_share_the_owners_parameters() -> None:
    model = randomize_bn(NormActNet())
    ir = IR.from_module(model, (1, 3, 16, 16))
    bn = ir.gm.get_submodule("bn1.bn")
    assert bn.weight is ir.gm.get_submodule("bn1").weight
    assert bn.running_var is ir.gm.get_submodule("bn1").running_var


def test_training_mode_updates_running_statistics_again() -> None:
    # traced in train mode the branch froze to batch statistics; the module form honours .train()
    model = randomize_bn(NormActNet()).train()
    ir = IR.from_module(model, (1, 3, 16, 16))
    ir.gm.train()
    before = ir.gm.get_submodule("bn1.bn").running_mean.clone()
    ir.gm(torch.randn(8, 3, 16, 16))
    assert not torch.equal(before, ir.gm.get_submodule("bn1.bn").running_mean)
    ir.gm.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ir.gm(x), model.eval()(x))


def test_fold_bn_folds_the_converted_norms() -> None:
    model = randomize_bn(NormActNet())
    ir = IR.from_module(model, (1, 3, 16, 16))
    stats = fold_batchnorms(ir)
    assert bn_nodes(ir) == 0, stats
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ir.gm(x), model(x), atol=1e-5, rtol=1e-4)


def test_folding_leaves_no_copy_of_the_norm_parameters_behind() -> None:
    # bn1.bn shares bn1's tensors; once it is folded, bn1 must not keep them as dead weight
    model = randomize_bn(NormActNet()).eval()
    ir = IR.from_module(model, (1, 3, 16, 16))
    ir.gm.eval()
    x = torch.randn(4, 3, 16, 16)
    fold_batchnorms(ir)
    torch.testing.assert_close(ir.gm(x), model(x), rtol=1e-5, atol=1e-5)
    # by hand: conv1 3·8·9 + 8 folded biases, conv2 8·9 + 8, head 8·10 + 10
    assert ir.param_count() == 216 + 8 + 72 + 8 + 80 + 10
    assert sum(b.numel() for b in ir.gm.buffers()) == 0  # the running statistics went with them
