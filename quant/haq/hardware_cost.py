"""Cost tables for HAQ from the IR: exact size and BitOps counts, and per-layer latency look-ups.

Latency comes from the hardware target (HAQ's "hardware in the loop", §3.3): every searched
layer is described by the signature of the kernel it runs as (conv → BatchNorm → activation,
:mod:`hardware.layers`), and the target's latency table answers for that signature at any
(weight bits, activation bits). Groups the search does not touch (adds, pools, reshapes)
are a fixed part of the cost, taken at 8-bit activations.

That additive table prices each layer on its own bits only. On ort-cpu a mixed float/int8
model also pays for what lies between layers (a layer is an integer kernel only when its
output is quantized too; every float/int8 boundary runs a standalone QuantizeLinear or
DequantizeLinear, :mod:`hardware.qdq`), which is why the quick benchmark's policies measured
over budget; :class:`ExactLatency` prices the whole model that way, and
:mod:`quant.haq.calibration` scales it to whole-model measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import fx, nn

from fxsculpt.ir.graph import IR
from fxsculpt.quant.haq.actions import BitLevels, Bits
from fxsculpt.quant.haq.cost import CostModel, bitops_cost, latency_cost, size_cost
from fxsculpt.quant.haq.state import LayerInfo


class LatencySource(Protocol):
    """What HAQ needs of a latency table (:class:`hardware.latency_table.LatencyTable`)."""

    def lookup(self, sig: Any, module: nn.Module | None = None, save: bool = True) -> float: ...

    def overhead_ms(self) -> float: ...


def size_model(ir: IR, layers: Sequence[LayerInfo], levels: BitLevels) -> CostModel:
    """Bytes: searched layers' weights at their bits, every other parameter in float32."""
    searched = sum(layer.params for layer in layers)
    return size_cost(
        [layer.params for layer in layers], levels, other_params=max(ir.param_count() - searched, 0)
    )


def bitops_model(layers: Sequence[LayerInfo], levels: BitLevels) -> CostModel:
    return bitops_cost([layer.macs for layer in layers], levels)


def latency_model(
    q_ir: IR,
    layer_names: Sequence[str],
    levels: BitLevels,
    table: LatencySource,
    canonical: Callable[[Any], Any] | None = None,
) -> CostModel:
    """Per-layer latency from ``table`` on the float IR's kernel groups (HAQ §3.3, "hardware in the loop").

    ``layer_names`` are the searched Conv/Linear node names of ``q_ir``, the IR with its
    quantizers in place, grouped exactly as the target sees the final model (so the bits of
    the groups the search does not touch — adds, pools — are the ones the target will use). A whole model pays the runtime's per-call overhead ``o``
    once while each single-layer measurement includes it, so (as in
    :func:`hardware.latency_table.predict_model`) a layer costs ``max(t − o, 0)`` and the
    fixed part is ``o`` plus every other group as it stands. ``canonical`` maps a
    signature to the one the target actually measures (on ort-cpu every non-int8 pair runs
    the float kernel), so equivalent pairs share one table entry.
    """
    from fxsculpt.hardware.layers import layer_groups

    canon = canonical or (lambda sig: sig)
    overhead = float(table.overhead_ms())
    groups = layer_groups(q_ir)
    by_main: dict[str, Any] = {}
    fixed = overhead
    wanted = set(layer_names)
    for group in groups:
        if group.signature is None:
            continue
        if group.main.name in wanted:
            by_main[group.main.name] = group.signature
        else:
            sig = canon(group.signature)
            fixed += max(float(table.lookup(sig, group.module, save=False)) - overhead, 0.0)
    missing = [n for n in layer_names if n not in by_main]
    if missing:
        raise ValueError(f"no latency signature for layer(s) {', '.join(missing)}")

    def layer_latency(i: int, w: Bits, a: Bits) -> float:
        sig = canon(by_main[layer_names[i]].with_bits(w, a))
        return max(float(table.lookup(sig, None, save=False)) - overhead, 0.0)

    model = latency_cost(len(layer_names), levels, layer_latency, fixed_ms=fixed)
    save = getattr(table, "_save", None)
    if callable(save):
        save()
    return model


@dataclass
class LatencyParts:
    """A policy's predicted latency split the way :class:`ExactLatency` calibrates it (ms)."""

    overhead: float  # the runtime's per-call cost, paid once
    integer: float  # groups that run integer kernels, each net of the per-call cost
    other: float  # float kernels and the standalone float/int8 conversions


class ExactLatency:
    """A policy's latency as the target sees the final model: set the bits on the IR, regroup, look up.

    The additive table of :func:`latency_model` keeps the groups the search does not touch
    fixed, but some of them depend on the policy too (a residual add runs on integer kernels
    only when all its inputs share one bit-width, :func:`hardware.layers.layer_groups`). This
    evaluation is exact for the table (about 10 ms for a MobileNet), so the search uses it to
    finish the enforcement walk and to report every policy's cost.

    ``runtime_plan`` (ort-cpu) prices what ONNX Runtime runs for a mixed float/int8 model
    (:func:`hardware.qdq.kernel_plan`): a layer runs the integer kernel only when its output is
    quantized too, and every float/int8 boundary costs a standalone QuantizeLinear or
    DequantizeLinear, each a table entry of its own. ``scales`` (integer, other) calibrate the
    table against whole-model measurements (:mod:`quant.haq.calibration`); 1 by default.
    """

    def __init__(
        self,
        q_ir: IR,
        layers: Sequence[fx.Node],
        table: LatencySource,
        canonical: Callable[[Any], Any] | None = None,
        runtime_plan: bool = False,
    ) -> None:
        self.q_ir, self.layers, self.table = q_ir, list(layers), table
        self.canon = canonical or (lambda sig: sig)
        self.runtime_plan = runtime_plan
        self.scales = (1.0, 1.0)
        self.lookups = 0
        self._memo: dict[tuple[tuple[Bits, Bits], ...], LatencyParts] = {}

    def _net(self, sig: Any, module: nn.Module | None, overhead: float) -> float:
        self.lookups += 1
        return max(float(self.table.lookup(sig, module)) - overhead, 0.0)

    def parts(self, policy: Sequence[tuple[Bits, Bits]]) -> LatencyParts:
        """Set ``policy`` on the IR and add up its groups (and conversions) from the table.

        Remembered per policy (the search meets the same policies again as the agent
        converges); a remembered policy is not set on the IR again.
        """
        key = tuple((w, a) for w, a in policy)
        known = self._memo.get(key)
        if known is not None:
            self.lookups += 1
            return known
        parts = self._evaluate(key)
        if len(self._memo) < 200_000:
            self._memo[key] = parts
        return parts

    def _evaluate(self, policy: Sequence[tuple[Bits, Bits]]) -> LatencyParts:
        from fxsculpt.hardware.layers import layer_groups
        from fxsculpt.hardware.qdq import kernel_plan
        from fxsculpt.quant.haq.env import apply_policy

        apply_policy(self.q_ir, self.layers, list(policy))
        overhead = float(self.table.overhead_ms())
        integer = other = 0.0
        if self.runtime_plan:
            plan = kernel_plan(self.q_ir)
            for group, sig, fast in zip(plan.groups, plan.kernels, plan.integer, strict=True):
                if sig is None:
                    continue
                ms = self._net(sig, group.module, overhead)
                integer, other = (integer + ms, other) if fast else (integer, other + ms)
            other += sum(self._net(sig, None, overhead) for sig in plan.conversions)
            return LatencyParts(overhead, integer, other)
        for group in layer_groups(self.q_ir):
            if group.signature is not None:
                other += self._net(self.canon(group.signature), group.module, overhead)
        return LatencyParts(overhead, integer, other)

    def combine(self, parts: LatencyParts) -> float:
        """Milliseconds from ``parts`` with the calibration scales applied."""
        return parts.overhead + self.scales[0] * parts.integer + self.scales[1] * parts.other

    def __call__(self, policy: Sequence[tuple[Bits, Bits]]) -> float:
        return self.combine(self.parts(policy))


def int8_or_float(policy: Sequence[tuple[Bits, Bits]]) -> list[tuple[Bits, Bits]]:
    """On ort-cpu a layer is either int8 or float: the activation choice decides (HAQ's latency
    mode searches both, but ONNX Runtime has no use for a mixed pair).

    An 8-bit input with float weights buys nothing: ONNX Runtime either quantizes those weights
    itself (per tensor, coarser than our per-channel 8 bits) and runs the integer kernel, or, behind
    the :class:`~quant.modules.FloatBoundary` that :func:`quant.insert.freeze` puts there, runs the
    float kernel after a DequantizeLinear (:mod:`hardware.qdq`). So ``(float, 8)`` becomes
    ``(8, 8)``. A float input with 8-bit weights runs the float kernel behind a weight
    DequantizeLinear, slower and less accurate than float weights, so ``(8, float)`` becomes
    ``(float, float)``.
    """
    return [(8, 8) if a == 8 else (None, None) for _, a in policy]


def ort_cpu_canonical(sig: Any) -> Any:
    """On ort-cpu a layer runs an integer kernel only at 8-bit weights and activations
    (:func:`hardware.single_layer.is_int8`); every other pair runs the float kernel."""
    from fxsculpt.hardware.single_layer import is_int8

    return sig if is_int8(sig) else sig.with_bits(None, None)


def undominated_levels(model: CostModel, levels: BitLevels) -> BitLevels:
    """Raise ``b_min`` past integer levels that a higher level matches or beats on every layer.

    "The measured tables decide what bits are worth" (issue 5): on ort-cpu a sub-8-bit layer
    runs the float kernel, so a higher level (float, or int8) is never slower and is more
    accurate; such a level is dropped from the action space instead of misleading the
    enforcement walk, which assumes that lower bits are cheaper.
    """
    b_min = levels.b_min
    while b_min < levels.b_max:
        higher = [b for b in levels.levels if b is None or b > b_min]
        dominated = all(any(row[(h, h)] <= row[(b_min, b_min)] for h in higher) for row in model.table)
        if not dominated:
            break
        b_min += 1
    if b_min == levels.b_min:
        return levels
    kept = BitLevels(b_min, levels.b_max, levels.with_float)
    model.table = [
        {k: v for k, v in row.items() if k[0] in kept.levels and k[1] in kept.levels} for row in model.table
    ]
    return kept


def layer_input_shape(ir: IR, node: fx.Node) -> tuple[int, ...]:
    """Shape of the first tensor input of ``node`` (with batch), from the IR's metadata."""
    first = node.all_input_nodes[0]
    shape = ir.meta(first).shape
    return tuple(shape) if shape is not None else ()
