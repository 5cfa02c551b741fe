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


def test_bias_perturbation_moves_the_fine_channels_of_layers_with_an_output_quantizer() -> None:
    from fxsculpt.quant import fake_quant as fq
    from fxsculpt.quant.modules import ActQuantizer, WeightQuantizer

    quantized, _ = frozen_int8_conv_stack()
    modules = dict(quantized.named_modules())
    layers = [
        (n.target, modules[n.target])
        for n in quantized.graph.nodes
        if isinstance(modules.get(n.target), WeightQuantizer)
    ]
    (first_name, first), (last_name, last) = layers
    # by hand: the first conv feeds ReLU → its quantizer; the last conv feeds the float logits
    relu = next(n for n in quantized.graph.nodes if isinstance(modules.get(n.target), nn.ReLU))
    relu_quantizer = modules[next(iter(relu.users)).target]
    assert isinstance(relu_quantizer, ActQuantizer)
    step = fq.bias_step(first.input_scale, first.scale).flatten()
    in_codes = step / relu_quantizer.scale
    fine = in_codes <= rounding.LARGEST_STEP_IN_CODES
    assert fine.any()

    [(name, codes, mask)] = rounding.perturbable_channels(quantized)
    assert name == first_name
    assert torch.allclose(codes, in_codes) and torch.equal(mask, fine)

    before = {n: m.layer.bias.detach().clone() for n, m in layers}
    perturbed = rounding.bias_perturbed(quantized, torch.Generator().manual_seed(0))
    assert all(torch.equal(m.layer.bias, before[n]) for n, m in layers)  # the model handed in is left alone
    delta = perturbed.get_submodule(first_name).layer.bias.detach() - before[first_name]
    assert torch.allclose(delta.abs()[fine], step[fine], rtol=1e-3)
    assert torch.equal(delta[~fine], torch.zeros_like(delta[~fine]))
    assert torch.equal(perturbed.get_submodule(last_name).layer.bias, before[last_name])

    size = rounding.perturbation_size(quantized)
    assert size["share_of_channels"] == pytest.approx(
        int(fine.sum()) / (first.out_channels + last.out_channels), abs=1e-4
    )
    assert size["max_codes"] == pytest.approx(float(in_codes[fine].max()), rel=1e-6)


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


@pytest.mark.parametrize(
    ("qs", "where"), [(0.40, "inside"), (0.415, "above"), (0.385, "below"), (0.41, "inside")]
)
def test_quantize_static_is_placed_against_every_accuracy_of_our_versions(qs: float, where: str) -> None:
    row = {
        "accuracy": {"exact": 0.395},
        "bias_perturbed": {"accuracies": [0.39, 0.41]},  # the range's ends come from different kinds
        "recalibrated": {"accuracies": [0.40]},
        "fidelity_accuracy": {"qs": qs},
    }
    assert rounding.our_range(row) == (0.39, 0.41)
    assert rounding.qs_against_our_range(row) == where
    assert rounding.qs_against_our_range({**row, "fidelity_accuracy": {}}) is None
