"""The fidelity bench's statistics, against scipy and counts done by hand.

``bench/bench_zoo_fidelity.py`` judges ours against ``quantize_static`` with an exact sign test and
counts the predictions an 8-bit output leaves to class order; ``bench/zoo_fidelity_seeds.py``
pools those counts over training seeds; ``bench/bench_zoo_rounding.py`` perturbs a frozen int8
model below one code. All feed the README's claims, so they are checked here: against scipy,
counts done by hand, and the int32 bias grid recomputed from the layers' scales.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("examples.third_party")  # the bench modules import the zoo
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_zoo_fidelity as fidelity
import bench_zoo_rounding as rounding
import zoo_fidelity_seeds as seeds


@pytest.mark.parametrize(("wins", "losses"), [(0, 0), (3, 10), (22, 23), (11, 25), (78, 42), (5, 0)])
def test_sign_test_matches_scipys_exact_binomial_test(wins: int, losses: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    expected = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
    assert fidelity.sign_test_p(wins, losses) == pytest.approx(expected, rel=1e-12)


def test_exact_top1_ties_counts_rows_whose_two_largest_logits_are_equal() -> None:
    logits = np.array(
        [
            [0.5, 0.5, 0.1],  # tie at the top
            [0.5, 0.2, 0.5],  # tie at the top, not adjacent
            [0.9, 0.5, 0.5],  # tie below the top: decided
            [0.1, 0.2, 0.3],  # no tie
        ],
        dtype=np.float32,
    )
    assert fidelity.exact_top1_ties(logits) == 2


def seed_row(model: str, only_ours: int, only_qs: int, shipped: float, qs: float, ties: int | None) -> dict:
    row = {
        "model": model,
        "accuracy": {"float": 0.40, "shipped": shipped, "qs": qs, "all_int8": 0.39},
        "agreement_with_float": {"shipped": 0.95, "qs": 0.93, "all_int8": 0.9},
        "shipped_is_float_file": model == "b",
        "ours_vs_qs": {"only_ours": only_ours, "only_qs": only_qs, "p": 0.0},
        "test_images": 846,
    }
    if ties is not None:
        row["exact_top1_ties"] = {"shipped": 0, "qs": ties}
    return row


def test_pooling_sums_the_discordant_counts_and_averages_the_accuracies() -> None:
    results = {
        0: {"rows": [seed_row("a", 12, 15, 0.462, 0.466, None), seed_row("b", 3, 10, 0.397, 0.405, 2)]},
        1: {
            "rows": [
                seed_row("b", 8, 15, 0.385, 0.394, 6),
                seed_row("a", 10, 8, 0.453, 0.450, 1),
                seed_row("c", 1, 4, 0.3, 0.3, 0),  # only at seed 1: pooled over that seed alone
            ]
        },
    }
    rows = {r["model"]: r for r in seeds.pooled(results)}
    assert list(rows) == ["a", "b", "c"]
    assert (rows["c"]["seeds"], rows["c"]["only_ours"], rows["c"]["only_qs"]) == (1, 1, 4)
    assert (rows["a"]["seeds"], rows["b"]["seeds"]) == (2, 2)
    a, b = rows["a"], rows["b"]
    assert (a["only_ours"], a["only_qs"]) == (22, 23)
    assert (b["only_ours"], b["only_qs"]) == (11, 25)
    assert a["accuracy"]["shipped"] == pytest.approx((0.462 + 0.453) / 2, abs=1e-4)
    assert b["accuracy"]["qs"] == pytest.approx((0.405 + 0.394) / 2, abs=1e-4)
    assert b["p"] == pytest.approx(fidelity.sign_test_p(11, 25), abs=1e-3)
    assert a["qs_exact_top1_ties"] is None  # seed 0 did not count them
    assert b["qs_exact_top1_ties"] == 8
    assert b["shipped_is_float_file"] == [True, True]


def frozen_int8_conv_stack() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A calibrated, frozen 8-bit conv → ReLU → conv stack (eval mode) and its calibration batches."""
    from fxsculpt.ir.graph import IR
    from fxsculpt.quant import insert as qi

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()
    ir = IR.from_module(model, (1, 3, 8, 8), 5)
    qi.insert_quantizers(ir, {n.name: 8 for n in qi.layer_nodes(ir)}, act_bits=8)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    qi.calibrate(ir, batches)
    qi.freeze(ir)
    return ir.gm.eval(), batches


def test_bias_perturbation_moves_each_integer_layer_bias_one_int32_step() -> None:
    from fxsculpt.quant import fake_quant as fq
    from fxsculpt.quant.modules import WeightQuantizer

    quantized, _ = frozen_int8_conv_stack()
    before = {
        n: m.layer.bias.detach().clone()
        for n, m in quantized.named_modules()
        if isinstance(m, WeightQuantizer)
    }
    perturbed = rounding.bias_perturbed(quantized, torch.Generator().manual_seed(0))
    moved = 0
    for name, module in perturbed.named_modules():
        if not isinstance(module, WeightQuantizer):
            continue
        original = dict(quantized.named_modules())[name]
        assert torch.equal(original.layer.bias, before[name])  # the model handed in is left alone
        delta = module.layer.bias.detach() - before[name]
        if original.computes_on_codes():
            step = fq.bias_step(original.input_scale, original.scale)
            assert torch.allclose(delta.abs(), step, rtol=1e-3)
            moved += 1
        else:
            assert torch.equal(delta, torch.zeros_like(delta))
    assert moved == 2  # both convs read a quantized input (the model input's quantizer, the ReLU's)


def test_bias_step_in_output_codes_is_the_step_over_the_next_quantizers_scale() -> None:
    from fxsculpt.quant import fake_quant as fq
    from fxsculpt.quant.modules import ActQuantizer, WeightQuantizer

    quantized, _ = frozen_int8_conv_stack()
    modules = dict(quantized.named_modules())
    first = next(m for m in modules.values() if isinstance(m, WeightQuantizer))
    after_relu = [
        n
        for n in quantized.graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], ActQuantizer)
    ]
    relu_quantizer = modules[
        next(
            n.target
            for n in after_relu
            if n.args[0].op == "call_module" and isinstance(modules[n.args[0].target], nn.ReLU)
        )
    ]
    by_hand = (
        fq.bias_step(first.input_scale, first.scale) / relu_quantizer.scale
    )  # the last conv feeds the float logits
    found = rounding.bias_step_in_output_codes(quantized)
    assert found["max"] == pytest.approx(float(by_hand.max()), rel=1e-6)
    assert found["median"] == pytest.approx(float(by_hand.median()), rel=1e-6)


def test_the_float32_form_computes_the_same_codes_without_integer_sums() -> None:
    quantized, batches = frozen_int8_conv_stack()
    in_float32 = rounding.computed_in_float32(quantized)
    x = batches[0]
    with torch.no_grad():
        exact, approximate = quantized(x), in_float32(x)
    assert torch.allclose(exact, approximate, atol=1e-4)
    from fxsculpt.quant.modules import WeightQuantizer

    assert all(not m.computes_on_codes() for m in in_float32.modules() if isinstance(m, WeightQuantizer))
    assert any(m.computes_on_codes() for m in quantized.modules() if isinstance(m, WeightQuantizer))
