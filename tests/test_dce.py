"""dce: dead nodes, Identity calls and unreachable state go; outputs and in-place effects stay."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.passes import Context, Pipeline
from fxsculpt.passes.dce import eliminate_dead_code


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def ops(ir: IR) -> list[str]:
    """The graph's compute nodes, spelled as module class names or function names."""
    names = []
    for n in ir.gm.graph.nodes:
        if n.op == "call_module":
            names.append(type(ir.gm.get_submodule(str(n.target))).__name__)
        elif n.op in ("call_function", "call_method"):
            names.append(getattr(n.target, "__name__", str(n.target)))
    return names


class WithIdentities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.skip = nn.Identity()
        self.body = nn.Sequential(nn.Identity(), nn.ReLU(), nn.Identity())

    def forward(self, x):
        return self.body(self.conv(x)) + self.skip(x).mean(1, keepdim=True)


class WithDeadBranch(nn.Module):
    """A branch whose result nobody reads: branch conv, relu, add, and a dead use of a param/buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.branch = nn.Conv2d(3, 4, 1)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("offset", torch.ones(1))

    def forward(self, x):
        y = self.conv(x)
        _dead = torch.relu(self.branch(x)) + y  # 3 nodes: branch, relu, add
        _also_dead = x * self.scale + self.offset  # 4 nodes: get_attr x2, mul, add
        return y


class InPlace(nn.Module):
    """In-place updates whose results are unused but whose effect is what the model returns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        z = y * 1.0
        z.mul_(3.0)
        self.act(z)
        w = y - 0.5
        torch.relu_(w)
        return z + w


class TiedWeights(nn.Module):
    """``b`` shares ``a``'s weight; only ``a`` is used for the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        _dead = self.b(x)
        return self.a(x)


def test_identity_calls_are_rewired_and_removed():
    model = WithIdentities().eval()
    x = torch.randn(2, 3, 5, 5)
    expected = run(model, x)
    ir = IR.from_module(copy.deepcopy(model), (1, 3, 5, 5))
    assert ops(ir).count("Identity") == 3
    stats = eliminate_dead_code(ir.gm)
    assert stats.identity_nodes == 3 and stats.dead_nodes == 0
    assert "Identity" not in ops(ir)
    assert stats.submodules == 3  # the three Identity objects
    assert torch.equal(run(ir.gm, x), expected)


def test_dead_branch_and_its_state_are_removed():
    model = WithDeadBranch().eval()
    x = torch.randn(2, 3, 5, 5)
    expected = run(model, x)
    ir = IR.from_module(copy.deepcopy(model), (1, 3, 5, 5))
    nodes_before = len(ir.gm.graph.nodes)
    stats = eliminate_dead_code(ir.gm)
    assert stats.dead_nodes == 7  # branch, relu, add; get_attr scale, get_attr offset, mul, add
    assert len(ir.gm.graph.nodes) == nodes_before - 7
    assert stats.submodules == 1  # branch
    assert stats.parameters == 3  # branch.weight, branch.bias, scale
    assert stats.param_elements == 4 * 3 * 1 * 1 + 4 + 1
    assert stats.buffers == 1  # offset
    names = {n for n, _ in ir.gm.named_parameters()} | {n for n, _ in ir.gm.named_buffers()}
    assert names == {"conv.weight", "conv.bias"}
    assert torch.equal(run(ir.gm, x), expected)


def test_in_place_updates_survive():
    model = InPlace().eval()
    x = torch.randn(2, 3, 5, 5)
    expected = run(model, x)
    ir = IR.from_module(copy.deepcopy(model), (1, 3, 5, 5))
    stats = eliminate_dead_code(ir.gm)
    assert stats.dead_nodes == 0
    assert ops(ir).count("mul_") == 1 and ops(ir).count("relu_") == 1 and "ReLU" in ops(ir)
    assert torch.equal(run(ir.gm, x), expected)
    # The reference really depends on the in-place ops: without them the result differs.
    y = model.conv(x)
    assert not torch.allclose(y * 1.0 + (y - 0.5), expected)


def test_shared_weight_of_a_removed_module_is_not_counted():
    model = TiedWeights().eval()
    x = torch.randn(3, 4)
    expected = run(model, x)
    ir = IR.from_module(copy.deepcopy(model), (1, 4))
    stats = eliminate_dead_code(ir.gm)
    assert stats.dead_nodes == 1 and stats.submodules == 1
    assert stats.parameters == 1 and stats.param_elements == 4  # b.bias only; the weight lives on in a
    assert ir.param_count() == 4 * 4 + 4
    assert torch.equal(run(ir.gm, x), expected)


def test_state_orphaned_by_a_graph_edit_is_removed():
    """After an edit bypasses a layer, dce deletes the layer that no node calls any more."""
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    ir = IR.from_module(copy.deepcopy(model), (1, 6))
    first = next(n for n in ir.gm.graph.nodes if n.op == "call_module" and n.target == "0")
    first.replace_all_uses_with(first.args[0])
    ir.gm.recompile()
    stats = eliminate_dead_code(ir.gm)
    assert stats.dead_nodes == 1 and stats.submodules == 1 and stats.parameters == 2
    assert stats.param_elements == 6 * 6 + 6
    x = torch.randn(2, 6)
    assert torch.equal(run(ir.gm, x), run(model[2], run(model[1], x)))


def test_pass_records_counts_and_verifies(tmp_path: Path):
    ir = IR.from_module(WithDeadBranch().eval(), (1, 3, 5, 5))
    stage = tmp_path / "stage"
    stage.mkdir()
    result = Pipeline(["dce"], export=False).run(ir, Context(out_dir=tmp_path, stage_dir=stage))
    record = result.records[0]
    assert record.summary["dead_nodes"] == 7 and record.summary["parameters"] == 3
    assert record.verified_max_abs_diff == 0.0
    assert record.before["params"] - record.after["params"] == 4 * 3 + 4 + 1
