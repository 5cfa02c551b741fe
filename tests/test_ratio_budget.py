"""A ratio budget is a budget: ``quantize.size_ratio`` / ``latency_ratio`` resolve into absolute limits
that the hardware pass checks on the exported file, exactly as ``--budget``'s.

References are independent of the code under test: the uniform 8-bit size is counted by hand from
the model's tensors, the uniform 8-bit file the latency limit multiplies is compared op by op with
a separately quantized and exported model, and the over-budget contract is the one
``tests/test_hardware_pass.py`` checks for ``--budget``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fxsculpt import cli
from fxsculpt.hardware.budget import Budget, parse_budget
from fxsculpt.ir.errors import BudgetError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.outputs import OutputFolder
from fxsculpt.passes.pipeline import Pipeline
from fxsculpt.quant.modules import WeightQuantizer
from fxsculpt.training.data import DataSplits, load_data
from fxsculpt.training.loop import train_model

HAQ_QUICK = {"method": "haq", "episodes": "3", "haq_warmup": "2", "haq_search_samples": "128"}


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )


@pytest.fixture(scope="module")
def trained() -> tuple[IR, DataSplits]:
    torch.manual_seed(0)
    data = load_data("digits", seed=0)
    ir = IR.from_module(_model(), (1, 1, 8, 8), 10)
    settings = TrainSettings(epochs=2, batch_size=64, lr=0.05, progress=False)
    train_model(ir.gm, data.train, settings, "cpu", torch.Generator().manual_seed(0))
    return ir, data


def _context(
    tmp_path: Path, data: DataSplits | None, budget: Budget | None = None
) -> tuple[Context, OutputFolder]:
    out = OutputFolder(tmp_path / "out")
    ctx = Context(
        out_dir=out.out_dir,
        stage_dir=out.stage_dir,
        data=data,
        budget=budget,
        train=TrainSettings(epochs=1, batch_size=64, lr=0.05, progress=False),
        logger=logging.getLogger("test-ratio-budget"),
    )
    return ctx, out


def _uniform_8bit_bytes(model: nn.Module) -> int:
    """By hand: every Conv/Linear kernel at 8 bits, every bias at 32."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return sum(m.weight.numel() + 4 * m.bias.numel() for m in layers)  # type: ignore[operator]


def _packed_bytes(ir: IR) -> int:
    """By hand: the exported model's kernels at their chosen bits (packed), biases at 32."""
    total = 0
    for module in ir.gm.modules():
        if isinstance(module, WeightQuantizer):
            bits = module.bits or 32
            total += -(-module.layer.weight.numel() * bits // 8) + 4 * module.layer.bias.numel()
    return total


def test_size_ratio_is_checked_on_the_exported_model(tmp_path: Path, trained: tuple[IR, DataSplits]) -> None:
    ir, data = trained
    ctx, out = _context(tmp_path, data)
    options = {"quantize": {**HAQ_QUICK, "size_ratio": "0.5"}}
    result = Pipeline(["quantize"], options=options).run(ir, ctx)
    out.discard()
    assert result.budget_error is None
    assert [r.name for r in result.records] == ["quantize", "export", "hardware"]  # the check came in
    by_hand = _uniform_8bit_bytes(_model())
    assert by_hand == 72 + 1152 + 2560 + 4 * (8 + 16 + 10)
    size = ctx.sections["budget"]["size"]
    assert size["limit"] == pytest.approx(0.5 * by_hand)
    assert size["source"] == "quantize.size_ratio=0.5"
    assert size["measured"] == _packed_bytes(result.ir)
    assert size["met"] is (size["measured"] <= size["limit"]) and size["met"] is True
    assert "model.onnx" in ctx.artifacts


def _quantized_signature(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """A file's op types in order and its integer initializers (name-free: shape and dtype)."""
    import onnx

    graph = onnx.load(str(path)).graph
    ints = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32)
    weights = sorted((str(list(t.dims)), t.data_type) for t in graph.initializer if t.data_type in ints)
    return [n.op_type for n in graph.node], weights  # type: ignore[return-value]


def test_latency_ratio_limit_is_the_ratio_of_the_measured_8bit_file(
    tmp_path: Path, trained: tuple[IR, DataSplits], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timing is compared (two timings of a 0.02 ms model differ by 2x on a shared machine):
    the limit must be exactly 1.5 x what the timer returned for the reference file, and that file
    must be the uniform 8-bit model, compared op by op with one quantized and exported separately."""
    from fxsculpt.passes.export import export_onnx
    from fxsculpt.passes.quantize import Quantize
    from fxsculpt.quant.haq.meter import PolicyMeter

    measured_files: list[tuple[dict[str, Any], dict[str, float]]] = []
    real_measure = PolicyMeter.measure

    def spy(self: PolicyMeter, files: dict[str, Path]) -> dict[str, float]:
        result = real_measure(self, files)
        measured_files.append(({k: _quantized_signature(p) for k, p in files.items()}, result))
        return result

    monkeypatch.setattr(PolicyMeter, "measure", spy)
    ir, data = trained
    ctx, out = _context(tmp_path, data)
    options = {"quantize": {**HAQ_QUICK, "episodes": "2", "latency_ratio": "1.5", "haq_measure_rounds": "2"}}
    Pipeline(["quantize"], options=options).run(ir, ctx)
    out.discard()
    latency = ctx.sections["budget"]["latency"]
    assert latency["source"] == "quantize.latency_ratio=1.5"
    assert measured_files, "the search measured no exported file"
    signatures, timings = measured_files[-1]
    assert latency["limit"] == pytest.approx(1.5 * timings["reference"], rel=1e-9)
    # the independent reference: a uniform 8-bit model quantized and exported on its own
    uniform_ctx, uniform_out = _context(tmp_path / "uniform", data)
    uniform = Quantize(method="uniform", bits=8, act_bits=8, float_fallback="off").run(
        ir.clone(), uniform_ctx
    )
    uniform_out.discard()
    path = tmp_path / "uniform8.onnx"
    export_onnx(uniform.gm.eval(), uniform.example_input(batch=2, seed=0), path)
    ops, weights = _quantized_signature(path)
    kernels = sorted(dims for dims, dtype in weights if dtype == 3 and "," in dims)  # 3: INT8, rank >= 2
    assert kernels == ["[10, 256]", "[16, 8, 3, 3]", "[8, 1, 3, 3]"]  # every Conv/Linear kernel int8
    assert signatures["reference"] == (ops, weights)
    # the budget's value is the hardware pass's own measurement of the exported file
    assert latency["measured"] == pytest.approx(ctx.sections["hardware"]["latency_ms_median"], rel=1e-3)
    assert latency["met"] is (latency["measured"] <= latency["limit"])


def test_the_tighter_of_budget_and_ratio_wins_and_both_are_named(
    tmp_path: Path, trained: tuple[IR, DataSplits]
) -> None:
    ir, data = trained
    ratio_limit = 0.6 * _uniform_8bit_bytes(_model())
    ctx, out = _context(tmp_path, data, parse_budget("size=1500B"))  # below 0.6 x 8-bit (2352 B)
    options = {"quantize": {**HAQ_QUICK, "size_ratio": "0.6"}}
    result = Pipeline(["quantize"], options=options).run(ir, ctx)
    out.discard()
    size = ctx.sections["budget"]["size"]
    assert size["limit"] == 1500 and size["source"] == "--budget"
    candidates = {c["source"]: c["limit"] for c in size["candidates"]}
    assert candidates == {"--budget": 1500, "quantize.size_ratio=0.6": pytest.approx(ratio_limit)}
    assert ctx.sections["haq"]["budget"]["source"] == "--budget"  # the search aimed at the tighter too
    assert size["measured"] == _packed_bytes(result.ir) <= 1500 and size["met"] is True

    looser, out2 = _context(tmp_path / "loose", data, parse_budget("size=1MB"))
    Pipeline(["quantize"], options=options).run(ir, looser)
    out2.discard()
    assert looser.sections["budget"]["size"]["source"] == "quantize.size_ratio=0.6"
    assert looser.sections["budget"]["size"]["limit"] == pytest.approx(ratio_limit)


def test_a_missed_ratio_limit_is_handled_like_a_missed_budget(tmp_path: Path) -> None:
    """A limit a pass added goes through the --budget contract: exit 3, model.over-budget.onnx only."""
    torch.manual_seed(0)
    ir = IR.from_module(_model().eval(), (1, 1, 8, 8), 10)
    budget = Budget().with_limit("size", 100.0, "quantize.size_ratio=0.025", "0.025 x uniform 8-bit 3920 B")
    ctx, out = _context(tmp_path, None, budget)
    result = Pipeline([]).run(ir, ctx)
    assert isinstance(result.budget_error, BudgetError) and result.budget_error.exit_code == 3
    assert "size" in str(result.budget_error) and "\n" not in str(result.budget_error)
    size = ctx.sections["budget"]["size"]
    assert size["met"] is False and size["limit"] == 100.0 and size["source"] == "quantize.size_ratio=0.025"
    assert size["measured"] == 4 * sum(p.numel() for p in _model().parameters())  # float32, by hand
    written = out.publish(ctx.artifacts, {})
    out.discard()
    assert [p.name for p in written] == ["model.over-budget.onnx"]
    assert not (out.out_dir / "model.onnx").exists()


def test_impossible_ratio_exits_3_with_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = [
        "optimize",
        "builtin:resnet",
        "--passes",
        "quantize",
        "--data-limit",
        "300",
        "--epochs",
        "1",
        "--set",
        "quantize.method=haq",
        "--set",
        "quantize.size_ratio=0.1",  # below every kernel at 2 bits (a quarter of 8-bit, plus biases)
        "--set",
        "quantize.episodes=2",
        "--out",
        str(out),
        "--quiet",
    ]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 3
    assert len(lines) == 1 and lines[0].startswith("error: ") and "impossible" in lines[0], lines
    assert not (out / "model.onnx").exists() and not (out / "report.json").exists()


def test_a_ratio_without_haq_is_bad_input(tmp_path: Path, capsys) -> None:
    argv = ["optimize", "builtin:resnet", "--passes", "quantize", "--set", "quantize.size_ratio=0.5"]
    code = cli.main([*argv, "--out", str(tmp_path / "out"), "--quiet", "--data", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "size_ratio is a budget of method=haq" in err and len(err.splitlines()) == 1
