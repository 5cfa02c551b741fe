"""HAQ end to end on a tiny model and the digits data: budget met by exact counts, report, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fxsculpt.ir.errors import BadInputError, BudgetError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.quant.haq.options import HaqOptions
from fxsculpt.quant.haq.run import run_haq
from fxsculpt.quant.modules import WeightQuantizer
from fxsculpt.training.data import DataSplits, load_data
from fxsculpt.training.loop import train_model


class _Forbidden(Dataset):
    """A test split that fails the moment anyone reads it: the search must not."""

    def __len__(self) -> int:
        raise AssertionError("HAQ touched the test split")

    def __getitem__(self, i: int) -> None:
        raise AssertionError("HAQ touched the test split")


@pytest.fixture(scope="module")
def trained() -> tuple[IR, DataSplits]:
    torch.manual_seed(0)
    data = load_data("digits", seed=0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )
    ir = IR.from_module(model, (1, 1, 8, 8), 10)
    settings = TrainSettings(epochs=2, batch_size=64, lr=0.05, progress=False)
    train_model(ir.gm, data.train, settings, "cpu", torch.Generator().manual_seed(0))
    return ir, data


def _ctx(tmp_path: Path, data: DataSplits, **kw: object) -> Context:
    guarded = DataSplits(data.train, data.val, _Forbidden(), data.num_classes, data.input_shape, data.name)  # type: ignore[arg-type]
    settings = TrainSettings(epochs=1, batch_size=64, lr=0.05, progress=False)
    return Context(out_dir=tmp_path, stage_dir=tmp_path / "stage", data=guarded, train=settings, **kw)  # type: ignore[arg-type]


def test_size_budget_is_met_by_exact_count(tmp_path: Path, trained: tuple[IR, DataSplits]) -> None:
    ir, data = trained
    ctx = _ctx(tmp_path, data)
    before = [p.detach().clone() for p in ir.gm.parameters()]
    out = run_haq(ir, ctx, HaqOptions(episodes=6, size_ratio=0.5, haq_warmup=3, haq_search_samples=256))
    # the input IR is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, ir.gm.parameters(), strict=True))
    # count the size by hand: every kernel at its bits, biases in float32
    bits_total = 0
    eight_bit_total = 0
    for module in out.gm.modules():
        if isinstance(module, WeightQuantizer):
            assert module.frozen and module.bits is not None
            bits_total += module.layer.weight.numel() * module.bits + 32 * module.layer.bias.numel()
            eight_bit_total += module.layer.weight.numel() * 8 + 32 * module.layer.bias.numel()
    assert bits_total / 8 <= 0.5 * eight_bit_total / 8 + 1e-6
    section = ctx.sections["haq"]
    assert section["meets_budget"] and section["metric"] == "size"
    assert section["cost"] == pytest.approx(bits_total / 8)
    assert len(section["policy"]) == 3
    curve = json.loads((tmp_path / "stage" / "haq_curve.json").read_text())
    assert len(curve["episodes"]) == 6
    assert all(e["cost"] <= section["budget"]["limit"] + 1e-9 for e in curve["episodes"])
    assert (tmp_path / "stage" / "haq_curve.png").stat().st_size > 1000
    timing = section["timing_per_episode_s"]
    assert timing["total"] >= timing["finetune"] + timing["evaluate"] - 1e-6


def test_bitops_policy_searches_activations_too(tmp_path: Path, trained: tuple[IR, DataSplits]) -> None:
    ir, data = trained
    ctx = _ctx(tmp_path, data)
    run_haq(ir, ctx, HaqOptions(episodes=3, bitops_ratio=0.3, haq_warmup=3, haq_search_samples=128))
    section = ctx.sections["haq"]
    macs = [ir.meta(n).macs for n in ir.gm.graph.nodes if n.op == "call_module" and ir.meta(n).macs]
    by_hand = sum(m * p["weight_bits"] * p["act_bits"] for m, p in zip(macs, section["policy"], strict=True))
    assert by_hand == pytest.approx(section["cost"])
    assert by_hand <= 0.3 * sum(m * 64 for m in macs) + 1e-6


def test_impossible_and_missing_budgets(tmp_path: Path, trained: tuple[IR, DataSplits]) -> None:
    ir, data = trained
    with pytest.raises(BudgetError) as info:  # 2-bit weights are a quarter of 8-bit: 0.1 is out of reach
        run_haq(ir, _ctx(tmp_path, data), HaqOptions(episodes=2, size_ratio=0.1))
    assert info.value.exit_code == 3 and "impossible" in str(info.value)
    with pytest.raises(BudgetError, match="infeasible on ort-cpu") as info:
        run_haq(ir, _ctx(tmp_path, data, target="ort-cpu"), HaqOptions(episodes=2, latency_ratio=0.6))
    assert info.value.exit_code == 3
    with pytest.raises(BadInputError, match="needs a resource budget"):
        run_haq(ir, _ctx(tmp_path, data), HaqOptions(episodes=2))
    with pytest.raises(BadInputError, match="one resource"):
        run_haq(ir, _ctx(tmp_path, data), HaqOptions(episodes=2, size_ratio=0.5, bitops_ratio=0.5))


def test_latency_budget_below_the_measured_int8_model_is_impossible_on_ort_cpu(
    tmp_path: Path, trained: tuple[IR, DataSplits]
) -> None:
    """1 µs is below any ONNX Runtime call (its per-call overhead alone is several µs): the budget is
    refused before the search, with the measured uniform-int8 file named as the cheapest policy."""
    from fxsculpt.hardware.budget import parse_budget

    ir, data = trained
    ctx = _ctx(tmp_path, data, target="ort-cpu", budget=parse_budget("latency=1us"))
    with pytest.raises(BudgetError, match="impossible on ort-cpu") as info:
        run_haq(ir, ctx, HaqOptions(episodes=2, haq_measure_rounds=1))
    assert info.value.exit_code == 3 and "\n" not in str(info.value)
    assert "haq" not in ctx.sections
