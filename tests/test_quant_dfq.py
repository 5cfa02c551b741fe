"""DFQ: the size objective's gradient, the dual-ascent multiplier, discretization under a budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.quant import dfq
from fxsculpt.quant.modules import WeightQuantizer


def _searching(out_channels: int = 6, groups: int = 2, seed: int = 0) -> WeightQuantizer:
    conv = nn.Conv2d(3, out_channels, 3, bias=True)
    wq = WeightQuantizer(conv, bits=8)
    wq.enable_search((2, 4, 8), groups=groups)
    with torch.no_grad():
        wq.bit_logits.copy_(torch.randn(groups, 3, generator=torch.Generator().manual_seed(seed)))
    return wq


def test_expected_size_gradient_matches_the_closed_form() -> None:
    """∂G/∂α_{g,k} = N_g · p_{g,k} · (b_k − Σ_j p_{g,j} b_j), N_g = weights in group g."""
    wq = _searching()
    size = dfq.expected_size_bits({"conv": wq})
    size.backward()
    p = torch.softmax(wq.bit_logits.detach(), dim=-1)
    widths = torch.tensor([2.0, 4.0, 8.0])
    n_group = torch.tensor([3.0, 3.0]) * 27  # 6 channels in 2 groups, 3·3·3 weights per channel
    mean = p @ widths
    expected = n_group[:, None] * p * (widths[None, :] - mean[:, None])
    torch.testing.assert_close(wq.bit_logits.grad, expected, rtol=1e-5, atol=1e-4)


def test_expected_size_gradient_matches_finite_differences() -> None:
    wq = _searching(groups=3, seed=1)
    base = wq.bit_logits.detach().clone()
    dfq.expected_size_bits({"c": wq}).backward()
    eps = 1e-2
    for g in range(3):
        for k in range(3):
            with torch.no_grad():
                wq.bit_logits.copy_(base)
                wq.bit_logits[g, k] += eps
                up = float(dfq.expected_size_bits({"c": wq}))
                wq.bit_logits[g, k] -= 2 * eps
                down = float(dfq.expected_size_bits({"c": wq}))
            assert wq.bit_logits.grad[g, k] == pytest.approx((up - down) / (2 * eps), rel=2e-3, abs=0.05)


def test_expected_size_is_the_hand_count_when_one_hot() -> None:
    wq = _searching(groups=2)
    with torch.no_grad():
        wq.bit_logits.copy_(torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]]))  # group 0: 2 bits, 1: 8
    expected = 3 * 27 * 2 + 3 * 27 * 8 + 32 * 6 + 32 * 6  # weights, bias, per-channel scales
    assert float(dfq.expected_size_bits({"c": wq}).detach()) == pytest.approx(expected, rel=1e-5)
    wq.discretize()
    assert wq.group_bits == [2, 8]
    assert wq.size_bits() == expected


def test_multiplier_rises_while_violated_and_falls_to_zero_with_slack() -> None:
    lam = dfq.DualAscent(lr=0.5, initial=1.0)
    assert lam.update(0.4) == pytest.approx(1.2)  # L_val − θ = 0.4 > 0: λ + η·0.4
    assert lam.update(0.4) == pytest.approx(1.4)
    assert lam.update(-1.0) == pytest.approx(0.9)
    assert lam.update(-10.0) == 0.0  # projected onto λ ≥ 0
    with pytest.raises(ValueError):
        dfq.DualAscent(lr=0.0)


def _tiny_problem(
    seed: int = 0,
) -> tuple[nn.Module, dict[str, WeightQuantizer], TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long()
    first = WeightQuantizer(nn.Linear(8, 16), bits=8)
    second = WeightQuantizer(nn.Linear(16, 2), bits=8)
    first.enable_search((2, 4, 8))
    second.enable_search((2, 4, 8))
    model = nn.Sequential(first, nn.ReLU(), second)
    return (
        model,
        {"first": first, "second": second},
        TensorDataset(x[:64], y[:64]),
        TensorDataset(x[64:], y[64:]),
    )


def test_search_multiplier_grows_under_an_unreachable_constraint() -> None:
    torch.manual_seed(0)
    model, searched, train, val = _tiny_problem()
    settings = dfq.DFQSettings(epochs=3, batch_size=16, theta=-1.0, initial_multiplier=0.5, progress=False)
    history = dfq.search(
        model, searched, train, val, settings, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    lams = [e["multiplier"] for e in history.epochs]
    assert lams[0] > 0.5 and lams[-1] > lams[0]  # loss can never reach θ < 0: λ keeps rising


def test_search_with_slack_drops_the_multiplier_and_shrinks_bits() -> None:
    model, searched, train, val = _tiny_problem(1)
    settings = dfq.DFQSettings(epochs=3, batch_size=16, theta=100.0, initial_multiplier=0.5, progress=False)
    history = dfq.search(
        model, searched, train, val, settings, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert history.epochs[-1]["multiplier"] == 0.0
    # with no accuracy pressure, G alone pulls every group towards the narrowest width
    assert history.epochs[-1]["avg_bits"] < history.epochs[0]["avg_bits"] < 14 / 3
    assert dfq.choose_bits(searched) == {"first": [2], "second": [2]}


def test_expected_weight_bits_are_the_size_without_bias_and_scales() -> None:
    wq = _searching(groups=2)
    with torch.no_grad():
        wq.bit_logits.copy_(torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]]))  # group 0: 2 bits, 1: 8
    assert float(dfq.expected_weight_bits({"c": wq}).detach()) == pytest.approx(3 * 27 * 2 + 3 * 27 * 8)
    wq2 = _searching(groups=2, seed=3)
    dfq.expected_weight_bits({"c": wq2}).backward()  # differentiable: the budget search steps on it
    grad_w = wq2.bit_logits.grad.clone()
    wq2.bit_logits.grad = None
    dfq.expected_size_bits({"c": wq2}).backward()  # bias and scales are constants in α
    torch.testing.assert_close(grad_w, wq2.bit_logits.grad)


def _budget_search(avg_bits: float, seed: int = 0) -> tuple[dfq.DFQHistory, dict[str, WeightQuantizer]]:
    model, searched, train, val = _tiny_problem(seed)
    n = sum(m.weight_numel_per_channel() * m.out_channels for m in searched.values())
    settings = dfq.DFQSettings(
        epochs=3, batch_size=16, theta=100.0, size_budget_bits=avg_bits * n, progress=False
    )
    history = dfq.search(
        model, searched, train, val, settings, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    return history, searched


def test_budget_search_raises_mu_while_over_budget_and_pulls_bits_down() -> None:
    """Uniform logits over {2, 4, 8} start at 14/3 bits per weight, above a 2.5-bit budget: μ rises
    from 0 and the expected width falls towards the budget (θ = 100 plays no part here)."""
    history, searched = _budget_search(2.5)
    assert history.epochs[0]["multiplier"] > 0.0
    assert history.epochs[-1]["avg_bits"] < history.epochs[0]["avg_bits"] < 14 / 3
    n = sum(m.weight_numel_per_channel() * m.out_channels for m in searched.values())
    assert float(dfq.expected_weight_bits(searched).detach()) / n < 14 / 3


def test_budget_search_with_room_for_the_widest_never_prices_size() -> None:
    history, _ = _budget_search(8.0)  # every candidate fits: the size constraint is never violated
    assert [e["multiplier"] for e in history.epochs] == [0.0, 0.0, 0.0]


def test_a_zero_weight_rate_searches_alpha_alone_on_the_trained_weights() -> None:
    model, searched, train, val = _tiny_problem(2)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    settings = dfq.DFQSettings(epochs=2, batch_size=16, weight_lr=0.0, theta=100.0, progress=False)
    dfq.search(model, searched, train, val, settings, torch.Generator().manual_seed(0), torch.device("cpu"))
    after = model.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert moved == {"0.bit_logits", "2.bit_logits"}


def test_choose_bits_fits_the_budget() -> None:
    big = WeightQuantizer(nn.Linear(10, 10, bias=False), bits=8)  # 100 weights
    small = WeightQuantizer(nn.Linear(10, 2, bias=False), bits=8)  # 20 weights
    for wq, logits in ((big, [0.0, 0.0, 3.0]), (small, [0.0, 0.0, 3.0])):
        wq.enable_search((2, 4, 8))
        with torch.no_grad():
            wq.bit_logits.copy_(torch.tensor([logits]))
    layers = {"big": big, "small": small}
    assert dfq.choose_bits(layers) == {"big": [8], "small": [8]}  # argmax without a budget
    budget = 4.0 * 120  # average 4 bits
    chosen = dfq.choose_bits(layers, budget)
    used = 100 * chosen["big"][0] + 20 * chosen["small"][0]
    assert used <= budget
    # lowering the big layer saves the most bits per unit of log-probability
    assert chosen["big"][0] < 8
