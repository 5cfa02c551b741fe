"""Budget enforcement (HAQ §3.3): last layer first, activations before weights, and it always ends."""

from __future__ import annotations

import pytest

from fxsculpt.ir.errors import BudgetError
from fxsculpt.quant.haq.actions import BitLevels
from fxsculpt.quant.haq.cost import bitops_cost, resolve_budget, size_cost
from fxsculpt.quant.haq.enforce import enforce


def test_lowering_order_last_layer_first_activation_before_weight() -> None:
    levels = BitLevels(2, 8)
    calls: list[list[tuple[int | None, int | None]]] = []

    def cost(policy: list[tuple[int | None, int | None]]) -> float:
        calls.append(list(policy))
        return float(sum(w + a for w, a in policy))  # every bit costs 1

    start = [(8, 8), (8, 8), (8, 8)]
    policy, steps = enforce(start, cost, budget=44, levels=levels, lower_activations=True)
    # 48 → 44 takes four single-level steps: l2.a, l2.w, l1.a, l1.w, in that order
    assert policy == [(8, 8), (7, 7), (7, 7)]
    assert steps == 4
    trail = calls[2:]  # after the floor check and the first check of the start policy
    assert trail[0] == [(8, 8), (8, 8), (8, 7)]
    assert trail[1] == [(8, 8), (8, 8), (7, 7)]
    assert trail[2] == [(8, 8), (8, 7), (7, 7)]


def test_sweeps_repeat_until_the_budget_holds() -> None:
    levels = BitLevels(2, 8)
    cost = size_cost([800, 800], levels)  # bytes = 800·bits/8 = 100·bits per layer, whole at every width
    policy, _ = enforce([(8, 8), (8, 8)], cost, budget=100 * 9, levels=levels, lower_activations=False)
    # 9 bits in all: lowering alternates from the last layer, so (5, 4)
    assert [w for w, _ in policy] == [5, 4]
    assert cost(policy) <= 100 * 9
    assert [a for _, a in policy] == [8, 8]  # size mode never touches activations


def test_size_packs_each_kernel_into_whole_bytes() -> None:
    """As hardware.counts counts the exported model: ceil(n·b/8) per kernel, the rest at 32 bits."""
    cost = size_cost([100, 3], BitLevels(2, 8), other_params=10)
    assert cost([(5, 8), (3, 8)]) == 63 + 2 + 40  # ceil(62.5), ceil(1.125), 10 float32


def test_float_level_is_lowered_to_b_max_first() -> None:
    levels = BitLevels(2, 8, with_float=True)
    cost = bitops_cost([10, 10], levels)
    budget = 10 * 8 * 8 * 2  # uniform 8-bit
    policy, _ = enforce([(None, None), (None, None)], cost, budget, levels, lower_activations=True)
    assert policy == [(8, 8), (8, 8)]


def test_a_fitting_policy_is_left_alone() -> None:
    levels = BitLevels(2, 8)
    cost = size_cost([10, 10], levels)
    policy, steps = enforce([(3, 8), (2, 8)], cost, budget=1e9, levels=levels)
    assert policy == [(3, 8), (2, 8)] and steps == 0


def test_impossible_budget_is_a_budget_error_with_exit_code_3() -> None:
    levels = BitLevels(2, 8)
    cost = size_cost([1000], levels)
    with pytest.raises(BudgetError) as info:
        enforce([(8, 8)], cost, budget=200.0, levels=levels, lower_activations=False)
    assert info.value.exit_code == 3
    assert "impossible" in str(info.value) and "\n" not in str(info.value)


def test_budget_resolution_from_ratio_and_refusals() -> None:
    levels = BitLevels(2, 8)
    cost = size_cost([800, 200], levels, other_params=10)
    spec = resolve_budget(cost, levels, "bitserial", ratio=0.5)
    assert spec.reference_8bit == pytest.approx(1000 + 40)
    assert spec.limit == pytest.approx(0.5 * 1040)
    with pytest.raises(BudgetError):
        resolve_budget(cost, levels, "bitserial", ratio=0.2)  # 2-bit floor is 250 + 40 B
    lat = bitops_cost([100], BitLevels(2, 8, with_float=True))
    lat.metric = "latency"
    with pytest.raises(BudgetError, match="infeasible on ort-cpu"):
        resolve_budget(lat, BitLevels(2, 8, with_float=True), "ort-cpu", ratio=0.9, int8_is_fastest=True)
