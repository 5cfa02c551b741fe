"""Which scales to rank out when the L1 search has not reached a MAC budget on its own.

The soft threshold lowers λ by ηγ per step (about ηγ/(1 − μ) with APG's momentum), so with the
paper's γ few scales reach exactly zero within a CPU budget; the pass then removes the smallest ones, as Network Slimming
(Liu et al., ICCV 2017, section 3.2) does with L1-trained scales. How they are compared matters:

- ``"lambda"``: every λ entry by its raw value, globally (Network Slimming's rule).
- ``"relative"`` (default): every λ entry relative to its peers. A channel gate usually sits
  right after a BatchNorm and before another Conv + BatchNorm, so the function of the network
  does not change when all λ of one gate are scaled together (the next BatchNorm normalizes the
  scale away) and BatchNorm's own weight can take over any channel's scale. The L1 term then
  lowers every λ of a gate at the same rate and only differences inside a gate carry
  information (Ye et al., ICLR 2018, "Rethinking the smaller-norm-less-informative assumption",
  make the same point for BatchNorm scales). So a channel group is scored by its effective
  scale, λ times the mean ``|weight|`` of the BatchNorm(s) just before the gate, divided by the
  mean effective scale of its gate. A scalar (edge or branch) gate has no common scale with
  channel groups: when the graph has channel gates, scalar gates are not ranked (a branch goes
  only when the L1 term itself brings its λ to zero); in a graph of scalar gates only (the
  DSO supernet's edges) each is scored by its λ over the mean λ of all of them.

Every channel gate keeps its best 10% (:func:`nas.dso.magnitude.protect_layers`), as the
L1-norm baseline does; a scalar gate may go whole.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import fx, nn

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.magnitude import FilterScore, bisect_prune, lambda_scores, protect_layers

CutScore = Literal["lambda", "relative"]


def input_bn_scale(ir: IR, gate_name: str) -> torch.Tensor | None:
    """Mean ``|weight|`` per channel of the affine BatchNorms that feed the calls of gate
    ``gate_name`` (None when no call reads a BatchNorm directly)."""
    gm = ir.gm
    weights = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) != gate_name:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        layer = gm.get_submodule(str(source.target))
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine:
            weights.append(layer.weight.detach().abs())
    if not weights:
        return None
    return torch.stack(weights).mean(dim=0)


def effective_scales(ir: IR, gate_name: str) -> torch.Tensor:
    """λ of one gate times the BatchNorm weight before it, one value per λ entry."""
    gate = ir.gm.get_submodule(gate_name)
    assert isinstance(gate, Gate)
    lam = gate.lam.detach().flatten().clone()
    if not gate.groups:
        return lam
    bn = input_bn_scale(ir, gate_name)
    if bn is not None and gate.channels is not None and bn.numel() == gate.channels:
        lam = lam * bn.reshape(gate.groups, -1).mean(dim=1)
    return lam


def relative_scores(ir: IR) -> list[FilterScore]:
    """Every λ entry scored relative to its peers (see the module docstring), lowest first."""
    channel: list[FilterScore] = []
    scalar: list[tuple[str, float]] = []
    for name, module in ir.gm.named_modules():
        if not isinstance(module, Gate):
            continue
        values = effective_scales(ir, name)
        if not module.groups:
            scalar.append((name, float(values.sum())))
            continue
        mean = float(values.mean())
        for index, value in enumerate(values.tolist()):
            channel.append(FilterScore(name, index, value / mean if mean > 0 else 0.0))
    if channel:
        return sorted(channel, key=lambda s: (s.score, s.gate, s.index))
    scalar_mean = sum(v for _, v in scalar) / max(len(scalar), 1)
    scores = [FilterScore(name, 0, value / scalar_mean if scalar_mean > 0 else 0.0) for name, value in scalar]
    return sorted(scores, key=lambda s: (s.score, s.gate, s.index))


def cut_scores(ir: IR, kind: CutScore) -> list[FilterScore]:
    """The λ entries that may be ranked out, lowest first: exact zeros (already gone) and each
    channel gate's best 10% are left out."""
    scores = lambda_scores(ir) if kind == "lambda" else relative_scores(ir)
    live = [s for s in scores if s.score > 0]
    return protect_layers(ir, live)


def meet_macs_target(ir: IR, macs_target: int, kind: CutScore = "relative") -> int:
    """Zero the lowest-scored λ until the shrunk graph has at most ``macs_target`` MACs and
    shrink ``ir`` in place to it; returns how many λ entries were zeroed."""
    if ir.mac_count() <= macs_target:
        return 0
    pruned, count = bisect_prune(ir, cut_scores(ir, kind), macs_target)
    ir.gm = pruned.gm
    ir.propagate()
    return count


def budget_steps(total_steps: int, points: int) -> dict[int, float]:
    """The gradual schedule: after which optimizer step (1-based) the budget tightens, and to
    what fraction of the way from the starting MACs to the target. ``points`` cuts are spread
    evenly over the first ``points / (points + 1)`` of the search, so the weights still train
    for the last ``1 / (points + 1)`` of it with the final structure."""
    if points <= 0 or total_steps <= 0:
        return {}
    schedule: dict[int, float] = {}
    for i in range(1, points + 1):
        step = max(1, round(total_steps * i / (points + 1)))
        schedule[step] = max(schedule.get(step, 0.0), i / points)
    return schedule
