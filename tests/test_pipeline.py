"""The pipeline: order of passes, per-pass records, the verifier between passes."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from fxsculpt.ir.errors import BadInputError, BudgetError, RunFailedError
from fxsculpt.ir.graph import IR
from fxsculpt.passes import Context, Pass, PassRegistry, Pipeline

PLUGIN = Path(__file__).with_name("plugin_example.py")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.mean(dim=(2, 3)))


def make_ir() -> IR:
    torch.manual_seed(0)
    return IR.from_module(TinyNet().eval(), (1, 3, 8, 8), num_classes=5, source="tiny")


def make_ctx(tmp_path: Path) -> Context:
    stage = tmp_path / "stage"
    stage.mkdir()
    return Context(out_dir=tmp_path, stage_dir=stage)


class Noting(Pass):
    """Appends its name to a shared list (records the order passes ran in)."""

    name = "noting"
    order: ClassVar[list[str]] = []

    def run(self, ir, ctx):
        self.order.append(self.name)
        ctx.record(ran=True)
        return ir


class FakeExport(Noting):
    """Stands in for the exporter."""

    name = "fake_export"
    placement = "export"


class FakeCheck(Noting):
    """Stands in for a check that runs after export."""

    name = "fake_check"
    placement = "check"


class Lying(Pass):
    """Claims to preserve outputs but doubles the first conv's weights."""

    name = "lying"
    preserves_semantics = True

    def run(self, ir, ctx):
        with torch.no_grad():
            ir.gm.get_submodule("conv").weight.mul_(2)
        return ir


class OverBudget(Pass):
    """A check that reports the model over budget."""

    name = "over_budget"
    placement = "check"

    def run(self, ir, ctx):
        raise BudgetError("latency 9 ms > 4 ms")


def registry_with(*classes: type[Pass]) -> PassRegistry:
    registry = PassRegistry()
    for cls in classes:
        registry.register(cls)
    return registry


def test_export_and_check_passes_move_to_the_end(tmp_path):
    order: ClassVar[list[str]] = []
    for cls in (Noting, FakeExport, FakeCheck):
        cls.order = order
    registry = registry_with(Noting, FakeExport, FakeCheck)
    pipeline = Pipeline(["fake_check", "fake_export", "noting"], registry=registry, export=False)
    result = pipeline.run(make_ir(), make_ctx(tmp_path))
    assert order == ["noting", "fake_export", "fake_check"]
    assert [r.name for r in result.records] == order
    assert all(r.summary == {"ran": True} and r.seconds >= 0 for r in result.records)


def test_plugin_pass_runs_and_records_hand_counted_ops(tmp_path):
    registry = PassRegistry()
    registry.load_plugin(PLUGIN)
    result = Pipeline(["count_ops"], registry=registry, export=False).run(make_ir(), make_ctx(tmp_path))
    summary = result.records[0].summary
    # TinyNet by hand: one Conv2d, one Linear, relu and mean calls.
    assert summary["Conv2d"] == 1 and summary["Linear"] == 1 and summary["relu"] == 1 and summary["mean"] == 1
    assert result.records[0].verified_max_abs_diff == 0.0


def test_verifier_catches_a_pass_that_breaks_its_promise(tmp_path):
    pipeline = Pipeline(["lying"], registry=registry_with(Lying), export=False)
    with pytest.raises(RunFailedError, match="pass 'lying' claims to preserve"):
        pipeline.run(make_ir(), make_ctx(tmp_path))


def test_options_for_a_pass_not_in_the_list_are_refused():
    registry = registry_with(Noting)
    with pytest.raises(BadInputError, match="not in --passes"):
        Pipeline([], registry=registry, options={"noting": {}}, export=False)


def test_budget_error_from_a_check_is_reported_not_raised(tmp_path):
    pipeline = Pipeline(["over_budget"], registry=registry_with(OverBudget), export=False)
    result = pipeline.run(make_ir(), make_ctx(tmp_path))
    assert isinstance(result.budget_error, BudgetError)
    assert [r.name for r in result.records] == ["over_budget"]


def test_ir_counts_match_a_hand_count():
    ir = make_ir()
    # conv: 4*3*3*3 + 4 = 112 params; output 4x8x8 = 256 elements x (3*3*3) = 6912 MACs.
    # fc: 4*5 + 5 = 25 params; 5 outputs x 4 inputs = 20 MACs.
    assert ir.param_count() == 137
    assert ir.mac_count() == 6912 + 20
    assert ir.size_bytes() == 137 * 4
    conv = next(n for n in ir.gm.graph.nodes if n.target == "conv")
    assert ir.meta(conv).shape == (1, 4, 8, 8)
