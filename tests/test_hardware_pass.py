"""The hardware pass: an impossible budget exits 3 and keeps the file only as model.over-budget.onnx."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.hardware.budget import parse_budget
from fxsculpt.ir.errors import BadInputError, BudgetError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context
from fxsculpt.passes.hardware import Hardware, onnx_accuracy
from fxsculpt.passes.outputs import OutputFolder
from fxsculpt.passes.pipeline import Pipeline
from fxsculpt.training.data import DataSplits


def _ir() -> IR:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    return IR.from_module(model.eval(), (1, 1, 8, 8), 10)


def _context(
    tmp_path: Path, budget: str | None, data: DataSplits | None = None
) -> tuple[Context, OutputFolder]:
    out = OutputFolder(tmp_path / "out")
    ctx = Context(
        out_dir=out.out_dir,
        stage_dir=out.stage_dir,
        budget=parse_budget(budget) if budget else None,
        data=data,
        logger=logging.getLogger("test-hardware"),
    )
    return ctx, out


def test_impossible_budget_exits_3_and_renames_the_file(tmp_path: Path) -> None:
    ctx, out = _context(tmp_path, "latency=1us,params=10,size=1MB")
    result = Pipeline([]).run(_ir(), ctx)  # export, then the hardware check (wanted: a budget is set)
    error = result.budget_error
    assert isinstance(error, BudgetError) and error.exit_code == 3
    message = str(error)
    assert "latency" in message and "params" in message and "size" not in message
    assert "\n" not in message
    assert "model.onnx" not in ctx.artifacts
    staged = ctx.artifacts["model.over-budget.onnx"]
    assert staged.is_file() and not (ctx.stage_dir / "model.onnx").exists()
    budget = ctx.sections["budget"]
    assert budget["latency"]["met"] is False and budget["params"]["met"] is False
    assert budget["size"]["met"] is True
    assert budget["params"]["measured"] == 4 * 9 + 4 + 8 + 10 * 256 + 10  # counted by hand
    hardware = ctx.sections["hardware"]
    assert hardware["target"] == "ort-cpu" and hardware["threads"] == 1
    assert {"latency_ms_median", "latency_ms_p90", "spread_ok", "cpu", "per_layer", "label"} <= set(hardware)
    assert {row["node"] for row in hardware["per_layer"]} >= {"_0", "_4"}  # the conv and the linear
    assert "layer" in hardware["over_budget_table"]
    written = out.publish(ctx.artifacts, {})
    out.discard()
    assert [p.name for p in written] == ["model.over-budget.onnx"]
    assert not (out.out_dir / "model.onnx").exists()


def test_generous_budget_keeps_model_onnx(tmp_path: Path) -> None:
    ctx, out = _context(tmp_path, "latency=10s,size=10MiB,bitops=1T,params=1M")
    result = Pipeline([]).run(_ir(), ctx)
    out.discard()
    assert result.budget_error is None
    assert "model.onnx" in ctx.artifacts and "model.over-budget.onnx" not in ctx.artifacts
    assert all(c["met"] for c in ctx.sections["budget"].values())


def test_pass_raises_budget_error_itself_and_bitserial_is_labelled(tmp_path: Path) -> None:
    ctx, out = _context(tmp_path, "bitops=1K")
    ctx.target = "bitserial"
    with pytest.raises(BudgetError) as info:
        Hardware().run(_ir(), ctx)
    out.discard()
    assert info.value.exit_code == 3 and "bitops" in str(info.value)
    assert ctx.sections["hardware"]["label"].startswith("analytical model, not a measurement")
    # BitOps of the float model: (conv 256*9 + linear 2560 MACs) x 32 x 32
    assert ctx.sections["budget"]["bitops"]["measured"] == (256 * 9 + 2560) * 32 * 32


def _data(ir: IR, n: int = 40) -> DataSplits:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    with torch.no_grad():
        predicted = ir.gm(x).argmax(dim=1)
    y = predicted.clone()
    y[: n // 4] = (y[: n // 4] + 1) % 10  # a quarter wrong: accuracy 0.75 by construction
    split = TensorDataset(x, y)
    return DataSplits(train=split, val=split, test=split, num_classes=10, input_shape=(1, 8, 8), name="t")


def test_accuracy_drop_uses_the_onnx_model_on_the_test_split(tmp_path: Path) -> None:
    ir = _ir()
    data = _data(ir)
    ctx, out = _context(tmp_path, "accuracy_drop=1%", data)
    Pipeline([]).run(ir, ctx)
    out.discard()
    assert ctx.accuracy_before == pytest.approx(0.75)
    assert ctx.sections["hardware"]["accuracy_after_onnx"] == pytest.approx(0.75)
    assert ctx.sections["budget"]["accuracy_drop"]["met"] is True


def test_accuracy_drop_without_data_is_bad_input(tmp_path: Path) -> None:
    ctx, out = _context(tmp_path, "accuracy_drop=1%")
    with pytest.raises(BadInputError, match="--data"):
        Pipeline([]).run(_ir(), ctx)
    out.discard()


def test_onnx_accuracy_pads_a_fixed_batch(tmp_path: Path) -> None:
    from fxsculpt.passes.export import export_onnx

    ir = _ir()
    path = tmp_path / "fixed.onnx"
    export_onnx(ir.gm.eval(), ir.example_input(batch=4), path, dynamic_batch=False)
    data = _data(ir, n=10)  # 10 samples in batches of 4: the last one padded
    x, y = data.test.tensors[0].numpy(), data.test.tensors[1].numpy()
    assert onnx_accuracy(path, x, y) == pytest.approx(
        float((y == ir.gm(torch.from_numpy(x)).argmax(1).numpy()).mean())
    )
    assert np.isfinite(onnx_accuracy(path, x, y))


def test_without_an_export_pass_the_check_exports_for_itself(tmp_path: Path) -> None:
    ctx, out = _context(tmp_path, "latency=1us")
    result = Pipeline([], export=False).run(_ir(), ctx)
    out.discard()
    assert isinstance(result.budget_error, BudgetError)
    assert "exported by the hardware pass" in ctx.sections["hardware"]["measured_file"]
    assert ctx.artifacts == {}  # nothing staged, so nothing handed over
