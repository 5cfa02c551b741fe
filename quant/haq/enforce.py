"""Make the agent's policy meet the resource constraint (HAQ, Wang et al., CVPR 2019, §3.3).

The agent acts without looking at the budget; afterwards, as in the official code, the
layers are walked from the last to the first and their bit-widths lowered one level at a
time — the activations before the weights of each layer (latency and BitOps modes) — and
the walk repeats until the cost fits. Size mode lowers only weights (activations do not
count towards model size). A budget below the cost of the all-lowest policy is impossible:
that is a :class:`~ir.errors.BudgetError` (exit code 3) before any walking starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fxsculpt.ir.errors import BudgetError
from fxsculpt.quant.haq.actions import BitLevels, Bits

#: One (weight bits, activation bits) pair per layer.
Policy = list[tuple[Bits, Bits]]


def lowest_policy(
    n_layers: int, levels: BitLevels, lower_activations: bool, start: Policy | None = None
) -> Policy:
    """The cheapest policy enforcement can reach: every weight (and activation) at the lowest level."""
    low = levels.levels[0]
    if lower_activations or start is None:
        return [(low, low) for _ in range(n_layers)]
    return [(low, a) for _, a in start]


def enforce(
    policy: Sequence[tuple[Bits, Bits]],
    cost: Callable[[Policy], float],
    budget: float,
    levels: BitLevels,
    lower_activations: bool = True,
    what: str = "cost",
    unit: str = "",
) -> tuple[Policy, int]:
    """Lower bits, last layer first, until ``cost(policy) <= budget``; returns (policy, steps taken).

    ``lower_activations`` is the latency/BitOps mode: in each layer the activation is lowered
    one level, the cost checked, then the weight. Raises ``BudgetError`` when even the
    lowest policy costs more than ``budget``.
    """
    current: Policy = [(w, a) for w, a in policy]
    floor = lowest_policy(len(current), levels, lower_activations, current)
    floor_cost = cost(floor)
    if floor_cost > budget:
        raise BudgetError(
            f"HAQ: the {what} budget {budget:.4g}{unit} is impossible: even every layer at "
            f"{levels.levels[0]} bits costs {floor_cost:.4g}{unit}"
        )
    steps = 0
    if cost(current) <= budget:
        return current, steps
    while True:
        changed = False
        for i in reversed(range(len(current))):
            w, a = current[i]
            if lower_activations and not levels.is_lowest(a):
                a = levels.lower(a)
                current[i] = (w, a)
                steps += 1
                changed = True
                if cost(current) <= budget:
                    return current, steps
            if not levels.is_lowest(w):
                w = levels.lower(w)
                current[i] = (w, a)
                steps += 1
                changed = True
                if cost(current) <= budget:
                    return current, steps
        if not changed:  # unreachable when the floor fits; kept so the loop always ends
            raise BudgetError(
                f"HAQ: could not meet the {what} budget {budget:.4g}{unit} "
                f"(lowest reachable {cost(current):.4g}{unit})"
            )
