"""On a synthetic problem whose best policy is known, the HAQ agent beats random policies.

Twelve layers alternate MobileNet-style: cheap, sensitive depthwise layers (288 weights,
sensitivity 2) and large, robust pointwise layers (4,096 weights, sensitivity 0.1). The
"accuracy" of a policy is ``1 − Σ s_i · 2^(−b_i)`` (quantization noise halves per bit), the
constraint is model size at half the 8-bit size. The known optimum gives depthwise layers
many bits and pointwise layers few (found by the exchange argument: a bit on a depthwise
layer costs 14× less and buys 20× more). Random policies with the same enforcement and
budget are the baseline; the agent has the same number of episodes.
"""

from __future__ import annotations

import numpy as np
import torch

from fxsculpt.quant.haq.actions import BitLevels
from fxsculpt.quant.haq.cost import resolve_budget, size_cost
from fxsculpt.quant.haq.ddpg import DDPGConfig
from fxsculpt.quant.haq.enforce import enforce
from fxsculpt.quant.haq.search import Evaluation, greedy_policy, haq_search
from fxsculpt.quant.haq.state import LayerInfo, StateSpace

EPISODES = 100
SEEDS = (0, 1, 2)


def problem() -> tuple[list[LayerInfo], np.ndarray, list[int]]:
    layers, sens, params = [], [], []
    for i in range(12):
        dw = i % 2 == 0
        p = 288 if dw else 4096
        layers.append(
            LayerInfo(f"l{i}", "conv", 32, 32 if dw else 128, 3 if dw else 1, 1, 256, p, p * 256, dw)
        )
        sens.append(2.0 if dw else 0.1)
        params.append(p)
    return layers, np.array(sens), params


def test_agent_beats_random_policies_under_the_same_budget() -> None:
    torch.set_num_threads(1)
    layers, sens, params = problem()
    levels = BitLevels(2, 8)
    cost = size_cost(params, levels)
    budget = resolve_budget(cost, levels, "synthetic", ratio=0.5)

    def accuracy(policy: list[tuple[int | None, int | None]]) -> float:
        return 1.0 - float(sum(s * 2.0 ** (-w) for s, (w, _) in zip(sens, policy, strict=True)))

    wins, margins = 0, []
    for seed in SEEDS:
        space = StateSpace(layers, two_steps=False)
        result = haq_search(
            space,
            levels,
            cost,
            budget,
            lambda p: Evaluation(accuracy(p)),
            1.0,
            EPISODES,
            DDPGConfig(),
            seed=seed,
        )
        assert all(r.cost <= budget.limit + 1e-9 for r in result.curve)  # every episode met the budget
        rng = np.random.default_rng(1000 + seed)
        random_acc = []
        for _ in range(EPISODES):
            raw = [(levels.to_bits(a), 8) for a in rng.random(len(layers))]
            random_acc.append(accuracy(enforce(raw, cost, budget.limit, levels, lower_activations=False)[0]))
        final, _ = enforce(greedy_policy(result.agent, space, levels), cost, budget.limit, levels, False)
        # the trained actor's own policy beats at least 95% of the random ones ...
        wins += np.mean(np.array(random_acc) < accuracy(final)) >= 0.95
        margins.append(result.best_accuracy - max(random_acc))
        # ... and has learnt the known structure of the optimum: depthwise layers get more bits
        dw_bits = np.mean([w for (w, _), layer in zip(final, layers, strict=True) if layer.depthwise])
        pw_bits = np.mean([w for (w, _), layer in zip(final, layers, strict=True) if not layer.depthwise])
        assert dw_bits > pw_bits + 2, (seed, final)
    assert wins == len(SEEDS)
    assert np.mean(margins) > 0  # and its best episode beats the best random policy, on average
