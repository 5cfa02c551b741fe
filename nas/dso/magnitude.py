"""The baseline users reach for first: L1-norm filter pruning (Li et al., ICLR 2017).

"Pruning Filters for Efficient ConvNets" ranks the filters of each convolution by
``s_j = Σ |F_j|`` (section 3.1) and removes the smallest, with the feature maps they produce
and the kernels that read them. Here the ranking is global across layers, on the mean
absolute weight so layers of different fan-in compare, and the removal reuses the exact
shrink machinery: the channel gates of :func:`nas.dso.gating.gate_channels` are set to 0 for
the lowest-ranked filters (a tied residual stream is ranked by the mean over its producers)
and :func:`nas.dso.shrink.shrink` does the rest, so both methods end in the same kind of graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.gating import gate_channels
from fxsculpt.nas.dso.shrink import shrink


@dataclass(frozen=True)
class FilterScore:
    """The L1 score of one λ entry (a channel group) of one channel gate."""

    gate: str
    index: int
    score: float


def _producer(gm: fx.GraphModule, gate_call: fx.Node) -> nn.modules.conv._ConvNd | None:
    source = gate_call.args[0]
    if isinstance(source, fx.Node) and source.op == "call_module":
        module = gm.get_submodule(str(source.target))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            source = source.args[0]
            if not (isinstance(source, fx.Node) and source.op == "call_module"):
                return None
            module = gm.get_submodule(str(source.target))
        if isinstance(module, nn.modules.conv._ConvNd):
            return module
    return None


def l1_filter_scores(ir: IR) -> list[FilterScore]:
    """Mean |W| of the filters behind each λ entry of each channel gate, lowest first."""
    gm = ir.gm
    sums: dict[tuple[str, int], list[float]] = {}
    for node in ir.construct_nodes(Gate):
        gate = gm.get_submodule(str(node.target))
        assert isinstance(gate, Gate)
        conv = _producer(gm, node)
        if not gate.groups or conv is None or gate.channels is None:
            continue
        per = gate.channels // gate.groups
        mean_abs = conv.weight.detach().abs().flatten(1).mean(dim=1)  # one per output channel
        for g in range(gate.groups):
            sums.setdefault((str(node.target), g), []).append(float(mean_abs[g * per : (g + 1) * per].mean()))
    raw = {key: sum(v) / len(v) for key, v in sums.items()}
    # Filters compare within a layer (Li et al. rank per layer); to rank across layers, each
    # score is taken relative to the mean score of its gate, or layers with a larger fan-in
    # (smaller weights at initialization) would be emptied first.
    layer_mean: dict[str, list[float]] = {}
    for (name, _), value in raw.items():
        layer_mean.setdefault(name, []).append(value)
    means = {name: sum(v) / len(v) for name, v in layer_mean.items()}
    scores = [FilterScore(name, g, value / max(means[name], 1e-12)) for (name, g), value in raw.items()]
    return sorted(scores, key=lambda s: (s.score, s.gate, s.index))


def protect_layers(ir: IR, scores: list[FilterScore], keep_fraction: float = 0.1) -> list[FilterScore]:
    """``scores`` without the highest-scored ``keep_fraction`` (at least one) of every channel
    gate: ranking a whole layer out would cut the network in two, which no budget asks for."""
    by_gate: dict[str, list[FilterScore]] = {}
    for s in scores:
        by_gate.setdefault(s.gate, []).append(s)
    protected: set[FilterScore] = set()
    for name, entries in by_gate.items():
        gate = ir.gm.get_submodule(name)
        if isinstance(gate, Gate) and gate.groups:
            keep = max(1, math.ceil(keep_fraction * gate.groups))
            protected.update(sorted(entries, key=lambda s: -s.score)[:keep])
    return [s for s in scores if s not in protected]


def lambda_scores(ir: IR) -> list[FilterScore]:
    """Every λ entry of every gate scored by its value, lowest first (the ranking Network
    Slimming, Liu et al. ICCV 2017, section 3.2, applies to L1-trained scales)."""
    scores = []
    for name, module in ir.gm.named_modules():
        if isinstance(module, Gate):
            for index, value in enumerate(module.lam.detach().flatten().tolist()):
                scores.append(FilterScore(name, index, float(value)))
    return sorted(scores, key=lambda s: (s.score, s.gate, s.index))


def prune_lowest(ir: IR, scores: list[FilterScore], count: int) -> IR:
    """A shrunk clone of ``ir`` with the ``count`` lowest-scored λ entries at zero."""
    from fxsculpt.nas.dso.dead import apply_dead_structure

    pruned = ir.clone()
    with torch.no_grad():
        for s in scores[:count]:
            gate = pruned.gm.get_submodule(s.gate)
            assert isinstance(gate, Gate)
            gate.lam.view(-1)[s.index] = 0.0
    apply_dead_structure(pruned)
    shrink(pruned)
    return pruned


def bisect_prune(ir: IR, scores: list[FilterScore], target_macs: int) -> tuple[IR, int]:
    """Remove the fewest lowest-scored λ entries that bring ``ir`` to at most ``target_macs``
    MACs (bisection on the count; the smallest reachable model if the target is too low).
    Returns the shrunk clone and how many entries were zeroed."""
    lo, hi = 0, len(scores)
    best = prune_lowest(ir, scores, hi)
    if best.mac_count() > target_macs:
        return best, hi
    if ir.mac_count() <= target_macs:
        return prune_lowest(ir, scores, 0), 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = prune_lowest(ir, scores, mid)
        if candidate.mac_count() <= target_macs:
            hi, best = mid, candidate
        else:
            lo = mid
    return best, hi


def magnitude_prune_to_macs(ir: IR, target_macs: int) -> IR:
    """L1-norm filter pruning of ``ir`` (ungated) down to at most ``target_macs`` MACs.

    Gates every prunable convolution, then bisects on how many of the lowest-ranked filters
    to remove (every layer keeps its best 10%, see :func:`protect_layers`); returns the shrunk IR whose MACs are the largest not above the target (or the
    smallest reachable). The gates (all λ = 1 or 0) remain; fold them before training.
    """
    gated = ir.clone()
    gate_channels(gated)
    return bisect_prune(gated, protect_layers(gated, l1_filter_scores(gated)), target_macs)[0]
