"""The resource HAQ constrains: latency, model size or BitOps of a policy (HAQ §3.3).

A :class:`CostModel` is a per-layer table of costs for every (weight level, activation
level) pair plus a fixed part for everything the search does not touch, so the cost of a
policy is a sum of look-ups: the agent and the enforcement loop can ask for it thousands of
times an episode. The tables come from the hardware target (measured or modelled per-layer
latency) or from exact counts (size in bytes, BitOps = MACs · b_w · b_a).

The budget is absolute (``--budget latency=5ms``) or a ratio of the uniform 8-bit policy's
cost on the same target (``quantize.latency_ratio=0.6``). On a target whose fastest kernel
is int8 (ort-cpu), no policy is cheaper than uniform int8, so a latency ratio below 1 is
impossible and says so (exit code 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fxsculpt.ir.errors import BadInputError, BudgetError
from fxsculpt.quant.haq.actions import BitLevels, Bits
from fxsculpt.quant.haq.enforce import lowest_policy

FLOAT_BITS = 32
METRICS = ("latency", "size", "bitops")
UNITS = {"latency": " ms", "size": " B", "bitops": " BitOps"}


def as_bits(bits: Bits) -> int:
    """Bits for counting: float is 32."""
    return FLOAT_BITS if bits is None else bits


@dataclass
class CostModel:
    """Policy cost as a sum of per-layer table look-ups plus a fixed remainder.

    ``table[i][(w, a)]`` is layer ``i``'s cost at weight bits ``w`` and activation bits
    ``a``; ``two_steps`` says whether activations are searched (latency and BitOps).
    """

    metric: str
    table: list[dict[tuple[Bits, Bits], float]]
    fixed: float = 0.0
    lookups: int = 0

    @property
    def unit(self) -> str:
        return UNITS.get(self.metric, "")

    @property
    def two_steps(self) -> bool:
        return self.metric != "size"

    def __call__(self, policy: Sequence[tuple[Bits, Bits]]) -> float:
        self.lookups += len(policy)
        return self.fixed + sum(row[(w, a)] for row, (w, a) in zip(self.table, policy, strict=True))

    def per_layer(self, policy: Sequence[tuple[Bits, Bits]]) -> list[float]:
        return [row[(w, a)] for row, (w, a) in zip(self.table, policy, strict=True)]

    def uniform(self, bits: Bits) -> float:
        """Cost of every layer at ``bits`` for weights and activations."""
        return self([(bits, bits)] * len(self.table))


def build_table(
    n_layers: int, levels: BitLevels, layer_cost: Callable[[int, Bits, Bits], float]
) -> list[dict[tuple[Bits, Bits], float]]:
    """Evaluate ``layer_cost(i, w, a)`` once for every layer and every pair of levels."""
    return [
        {(w, a): float(layer_cost(i, w, a)) for w in levels.levels for a in levels.levels}
        for i in range(n_layers)
    ]


def size_cost(params: Sequence[int], levels: BitLevels, other_params: int = 0) -> CostModel:
    """Model size in bytes: each layer's kernel packed at its weight bits (``ceil(n·b/8)``, as
    :mod:`hardware.counts` counts the exported model), the rest in float32."""
    table = build_table(len(params), levels, lambda i, w, _a: math.ceil(params[i] * as_bits(w) / 8))
    return CostModel("size", table, fixed=other_params * FLOAT_BITS / 8.0)


def bitops_cost(macs: Sequence[int], levels: BitLevels) -> CostModel:
    """BitOps: MACs · b_w · b_a per layer (float counts as 32 bits)."""
    table = build_table(len(macs), levels, lambda i, w, a: float(macs[i]) * as_bits(w) * as_bits(a))
    return CostModel("bitops", table)


def latency_cost(
    n_layers: int, levels: BitLevels, layer_latency: Callable[[int, Bits, Bits], float], fixed_ms: float = 0.0
) -> CostModel:
    """Latency in ms from a per-layer look-up (the hardware target's latency table)."""
    return CostModel("latency", build_table(n_layers, levels, layer_latency), fixed=fixed_ms)


@dataclass
class BudgetSpec:
    """The resolved constraint: the metric, the absolute limit and where it came from.

    ``margin`` is headroom: the search (and the check of the exported file) aim at
    ``target = limit · (1 − margin)``, so that a re-measurement of the file still finds it
    within ``limit``. ``ratio`` is set when the limit is a ratio of the uniform 8-bit cost, and
    ``absolute`` when ``--budget`` also limits the metric: the tighter of the two applies, also
    when a measured check re-resolves the ratio on a fresh timing of the uniform 8-bit file.
    """

    metric: str
    limit: float
    reference_8bit: float
    source: str  # "--budget" or "<metric>_ratio=<r>"
    margin: float = 0.0
    ratio: float | None = None
    absolute: float | None = None

    def limit_for(self, reference: float | None) -> float:
        """The limit with the ratio applied to ``reference`` (a re-measured uniform 8-bit cost)."""
        if self.ratio is None or reference is None:
            return self.limit
        by_ratio = self.ratio * reference
        return by_ratio if self.absolute is None else min(by_ratio, self.absolute)

    @property
    def target(self) -> float:
        return self.limit * (1.0 - self.margin)

    def as_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "limit": self.limit,
            "uniform_8bit_cost": self.reference_8bit,
            "ratio_of_8bit": self.limit / self.reference_8bit if self.reference_8bit else None,
            "source": self.source,
            "ratio": self.ratio,
            "absolute": self.absolute,
            "margin": self.margin,
            "search_target": self.target,
        }


def resolve_budget(
    model: CostModel,
    levels: BitLevels,
    target: str,
    absolute: float | None = None,
    ratio: float | None = None,
    int8_is_fastest: bool = False,
    reference: float | None = None,
    floor: float | None = None,
) -> BudgetSpec:
    """Turn ``--budget`` and/or a ``*_ratio`` option into a limit on ``model``'s metric.

    A ratio ``r`` means ``limit = r × reference`` (the uniform 8-bit policy's cost on ``target``);
    with both given the tighter limit applies and ``source`` names it.

    ``int8_is_fastest`` marks a target (ort-cpu) where lower bits do not lower latency: a
    latency ratio below 1 can never be met there, which is a ``BudgetError`` naming the target.
    An absolute or ratio budget below the cheapest reachable policy is a ``BudgetError`` too.
    ``reference`` (the uniform 8-bit cost) and ``floor`` (the cheapest policy's cost) replace
    the table's own sums when a better evaluation is at hand (a calibrated, whole-model one).
    """
    if absolute is None and ratio is None:
        raise BadInputError(
            f"HAQ needs a {model.metric} budget: --budget {model.metric}=... or quantize.{model.metric}_ratio"
        )
    reference = model.uniform(8) if reference is None else reference
    if ratio is not None:
        if ratio <= 0:
            raise BadInputError(f"quantize.{model.metric}_ratio must be positive, got {ratio}")
        if model.metric == "latency" and int8_is_fastest and ratio < 1.0:
            raise BudgetError(
                f"HAQ: latency_ratio={ratio:g} is infeasible on {target}: int8 is its fastest kernel "
                "and lower bits are not faster, so no policy beats uniform 8-bit (use a ratio >= 1)"
            )
        limit, source = ratio * reference, f"{model.metric}_ratio={ratio:g}"
        if absolute is not None and float(absolute) < limit:
            limit, source = float(absolute), "--budget"
    else:
        assert absolute is not None
        limit, source = float(absolute), "--budget"
    if floor is None:
        floor = model(lowest_policy(len(model.table), levels, model.two_steps, [(8, 8)] * len(model.table)))
    if model.metric == "latency" and int8_is_fastest:
        floor = min(floor, reference)
    if limit < floor:
        raise BudgetError(
            f"HAQ: the {model.metric} budget {limit:.4g}{model.unit} is impossible on {target}: "
            f"the cheapest policy costs {floor:.4g}{model.unit} (uniform 8-bit: {reference:.4g}{model.unit})"
        )
    return BudgetSpec(
        model.metric,
        limit,
        reference,
        source,
        ratio=ratio,
        absolute=None if absolute is None else float(absolute),
    )
