"""The prune pass as the CLI runs it: Pipeline + Context on real CIFAR-10 images."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR
from fxsculpt.passes import Context, Pipeline
from fxsculpt.passes.base import TrainSettings
from fxsculpt.training.data import load_data
from fxsculpt.zoo import BuiltinSpec, build_builtin


def make_ctx(tmp_path: Path, data, epochs: int = 1) -> Context:
    stage = tmp_path / "stage"
    stage.mkdir(exist_ok=True)
    return Context(
        out_dir=tmp_path,
        stage_dir=stage,
        data=data,
        seed=0,
        train=TrainSettings(epochs=epochs, batch_size=32, lr=0.05, progress=False),
    )


def builtin_ir(name: str, **options: str) -> IR:
    torch.manual_seed(0)
    model = build_builtin(name, BuiltinSpec(options=dict(options))).eval()
    return IR.from_module(model, (1, 3, 32, 32), num_classes=10, source=f"builtin:{name}")


def test_prune_on_builtin_resnet_reports_before_after_and_exports_the_smaller_model(tmp_path, cifar_npz):
    torch.set_num_threads(1)
    data = load_data(f"npz:{cifar_npz}", seed=0, limit=320)
    ir = builtin_ir("resnet", blocks="1")
    original = ir.clone()
    ctx = make_ctx(tmp_path, data)
    options = {
        "prune": {
            "gamma": "0.5",
            "macs_target": "0",
            "pretrain_epochs": "0",
            "search_epochs": "2",
            "retrain_epochs": "1",
        }
    }
    result = Pipeline(["prune"], options=options).run(ir, ctx)
    summary = result.records[0].summary
    assert summary["params_after"] < summary["params_before"] == original.param_count()
    assert summary["macs_after"] < summary["macs_before"] == original.mac_count()
    assert summary["latency_ms_before"] > 0 and summary["latency_ms_after"] > 0
    # The IR after the pass is the small graph (no gates left to fold) and the export is of it.
    assert result.ir.param_count() == summary["params_after"]
    assert not result.ir.construct_nodes(Gate)
    staged = ctx.artifacts["model.onnx"]
    weights = onnx.load(str(staged)).graph.initializer
    onnx_params = sum(int(torch.tensor(t.dims).prod()) if t.dims else 1 for t in weights)
    assert onnx_params < original.param_count()
    assert ctx.sections["onnx"]["max_abs_diff"] < 1e-3
    assert 0.0 <= result.accuracy_after <= 1.0


def test_prune_on_the_dso_supernet_removes_edges(tmp_path, cifar_npz):
    """Adaptive-FLOPs γ and retraining from scratch, under the default MAC budget."""
    torch.set_num_threads(1)
    data = load_data(f"npz:{cifar_npz}", seed=0, limit=320)
    ir = builtin_ir("dso-supernet", width="8", stages="1", levels="2")
    gates_before = len(ir.construct_nodes(Gate))
    ctx = make_ctx(tmp_path, data)
    options = {
        "prune": {
            "target": "edges",
            "gamma": "1.0",
            "pretrain_epochs": "0",
            "search_epochs": "3",
            "retrain_epochs": "0",
            "measure": "false",
            "adaptive_flops": "true",
            "retrain": "scratch",
        }
    }
    result = Pipeline(["prune"], options=options, export=False).run(ir, ctx)
    summary = result.records[0].summary
    # The default budget keeps at most half of the MACs.
    assert summary["macs_after"] <= 0.5 * summary["macs_before"]
    assert len(result.ir.construct_nodes(Gate)) < gates_before
    assert all(bool((g.lam >= 0).all()) for g in result.ir.gm.modules() if isinstance(g, Gate))


def test_prune_refuses_bad_options_and_missing_data(tmp_path):
    ir = builtin_ir("resnet", blocks="1")
    with pytest.raises(BadInputError, match=r"prune\.gamma"):
        Pipeline(["prune"], options={"prune": {"gamma": "-1"}}, export=False).run(
            ir, make_ctx(tmp_path, None)
        )
    with pytest.raises(BadInputError, match="--data"):
        Pipeline(["prune"], export=False).run(ir, make_ctx(tmp_path, None))


def test_joint_batches_and_a_gradual_budget_through_the_pipeline(tmp_path, cifar_npz):
    torch.set_num_threads(1)
    data = load_data(f"npz:{cifar_npz}", seed=0, limit=320)
    ir = builtin_ir("resnet", blocks="1")
    options = {
        "prune": {
            "gamma": "0.001",
            "macs_target": "0.5",
            "scale_batches": "joint",
            "budget_points": "2",
            "cut_score": "relative",
            "pretrain_epochs": "0",
            "search_epochs": "2",
            "retrain_epochs": "1",
            "retrain_lr": "0.01",
            "measure": "false",
        }
    }
    ctx = make_ctx(tmp_path, data)
    result = Pipeline(["prune"], options=options, export=False).run(ir, ctx)
    summary = result.records[0].summary
    # γ this small zeroes nothing in two epochs: the budget is met by the gradual cuts, and the
    # search is not stopped when they reach it.
    assert summary["macs_after"] <= 0.5 * summary["macs_before"]
    assert summary["ranked_out"] > 0
    section = ctx.sections["prune"]
    assert not section["search_stopped_early"]
    assert len(section["history"]["search"]) == 2
    assert section["options"]["scale_batches"] == "joint" and section["options"]["retrain_lr"] == 0.01


def test_prune_refuses_a_negative_budget_point_count(tmp_path):
    ir = builtin_ir("resnet", blocks="1")
    with pytest.raises(BadInputError, match=r"prune\.budget_points"):
        Pipeline(["prune"], options={"prune": {"budget_points": "-1"}}, export=False).run(
            ir, make_ctx(tmp_path, None)
        )
