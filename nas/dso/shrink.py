"""Physical removal: what reached zero leaves the graph, and the weights shrink with it.

Two steps, both exact (the smaller graph computes what the larger one computed with its dead
gates at zero; tests check it numerically):

1. *Branches.* A residual add whose operand is identically zero is replaced by its other
   operand; any other tensor that is identically zero is replaced by a cheap zeros tensor.
   Dead-code elimination then deletes the branch and the modules only it used (DSO-NAS,
   Zhang et al. 2018, section 3.4: pruned edges and the ops they leave without input go).
2. *Channels.* The channel-dependency analysis (:mod:`nas.dso.channels`) finds the classes of
   channels that can go; every Conv, grouped/depthwise Conv, BatchNorm, gate and Linear that
   holds such a channel loses its slice of weights (Sparse Structure Selection, Huang & Wang
   2018, section 3: a zero scale removes the structure it scales).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.channels import ChannelAnalysis, analyze, fully_zero, input_dependent, node_inputs


def zeros_batch(ref: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of ``(batch, *shape)`` with ``ref``'s batch size, dtype and device."""
    return ref.new_zeros((ref.shape[0], *shape))


torch.fx.wrap("zeros_batch")


@dataclass
class ShrinkReport:
    """What one shrink removed."""

    branches: int = 0
    zeroed_tensors: int = 0
    nodes_removed: int = 0
    channels_removed: int = 0
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0

    def merge(self, other: ShrinkReport) -> None:
        self.branches += other.branches
        self.zeroed_tensors += other.zeroed_tensors
        self.nodes_removed += other.nodes_removed
        self.channels_removed += other.channels_removed
        self.params_after, self.macs_after = other.params_after, other.macs_after


def _first_placeholder(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder")


def _cleanup(ir: IR) -> int:
    """Dead-code elimination and removal of modules no node calls any more; returns nodes removed."""
    before = len(ir.gm.graph.nodes)
    ir.gm.graph.eliminate_dead_code()
    ir.gm.delete_all_unused_submodules()
    ir.gm.recompile()
    ir.propagate()
    return before - len(ir.gm.graph.nodes)


def remove_zero_branches(ir: IR) -> ShrinkReport:
    """Step 1: bypass adds of identically-zero operands, replace other zero tensors, then DCE."""
    report = ShrinkReport()
    ana = analyze(ir)
    graph = ir.gm.graph
    from_input = input_dependent(graph)
    for node in list(graph.nodes):
        if ana.kinds.get(node) != "add" or not ana.has_channels(node):
            continue
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        if len(operands) != len(node.args) or len(node.args) != 2 or node.kwargs:
            continue
        shape = ana.channels[node]
        zero_ops = [o for o in operands if fully_zero(ana, o)]
        live = [o for o in operands if o not in zero_ops]
        if (
            zero_ops
            and len(live) == 1
            and live[0] in from_input  # a parameter alone would drop the batch dimension
            and ana.channels.get(live[0]) == shape
            and _same_shape(live[0], node)
        ):
            node.replace_all_uses_with(live[0])
            report.branches += 1
    placeholder = _first_placeholder(ir.gm)
    for node in list(graph.nodes):
        if node.op in ("placeholder", "output", "get_attr") or not node.users:
            continue
        if ana.kinds.get(node) == "zeros" or not fully_zero(ana, node):
            continue
        zshape = getattr(node.meta.get("sculpt"), "shape", None)
        if zshape is None or len(zshape) < 2:
            continue
        if all(ana.kinds.get(u) == "zeros" for u in node.users):
            continue
        with graph.inserting_after(node):
            zeros = graph.call_function(zeros_batch, (placeholder, tuple(int(d) for d in zshape[1:])))
        node.replace_all_uses_with(zeros, delete_user_cb=rewire_all_but(zeros))
        zeros.meta = dict(node.meta)
        report.zeroed_tensors += 1
    report.nodes_removed = _cleanup(ir)
    return report


def rewire_all_but(keep: fx.Node) -> Callable[[fx.Node], bool]:
    """A ``delete_user_cb`` that rewires every user except ``keep`` itself."""
    return lambda user: user is not keep


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa = getattr(a.meta.get("sculpt"), "shape", None)
    sb = getattr(b.meta.get("sculpt"), "shape", None)
    return sa is not None and sa == sb


def removable_classes(ana: ChannelAnalysis) -> set[int]:
    """The channel classes whose removal leaves every output unchanged.

    A class is blocked when it holds a pinned atom, or when a cut (Conv with one group, Linear)
    reads one of its channels while that channel is not zero and the cut's weights for it are
    not zero either. A tensor never loses all its channels: where it would, the class of its
    first channel is kept.
    """
    blocked = ana.pinned_classes()
    gm = ana.ir.gm
    for node, count in ana.channels.items():
        for user in node.users:
            if ana.kinds[user] not in ("conv", "linear") or not user.args or user.args[0] is not node:
                continue
            module = gm.get_submodule(str(user.target))
            assert isinstance(module.weight, torch.Tensor)
            weight = module.weight.detach()
            dims = [0, *range(2, weight.dim())]
            unused = (weight.abs().amax(dim=dims) == 0).cpu() if weight.shape[1] == count else None
            zero = ana.zero.get(node)
            for c in range(count):
                if (zero is not None and bool(zero[c])) or (unused is not None and bool(unused[c])):
                    continue
                blocked.add(ana.class_of(node, c))
    classes = {ana.find(a) for a in range(len(ana.parent))}
    removable = classes - blocked
    for node, count in ana.channels.items():
        vector = ana.class_vector(node)
        if count and all(k in removable for k in vector):
            removable.discard(vector[0])
    return removable


def _kept(ana: ChannelAnalysis, node: fx.Node, removed: set[int]) -> list[int]:
    return [c for c, k in enumerate(ana.class_vector(node)) if k not in removed]


def _index(t: torch.Tensor, dim: int, keep: list[int]) -> torch.Tensor:
    return t.detach().index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device)).clone()


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


def shrink_module(module: nn.Module, in_keep: list[int] | None, out_keep: list[int]) -> None:
    """Slice ``module``'s weights in place to the kept input and output channels."""
    if isinstance(module, nn.modules.conv._ConvNd):
        weight = _index(module.weight, 0, out_keep)
        if module.groups == 1:
            assert in_keep is not None
            weight = _index(weight, 1, in_keep)
            module.in_channels = len(in_keep)
        else:
            per_in = module.in_channels // module.groups
            assert in_keep is not None and len(in_keep) % per_in == 0
            module.groups = len(in_keep) // per_in
            module.in_channels = len(in_keep)
        module.out_channels = len(out_keep)
        _set_param(module, "weight", weight)
        if module.bias is not None:
            _set_param(module, "bias", _index(module.bias, 0, out_keep))
    elif isinstance(module, nn.Linear):
        assert in_keep is not None
        _set_param(module, "weight", _index(_index(module.weight, 0, out_keep), 1, in_keep))
        if module.bias is not None:
            _set_param(module, "bias", _index(module.bias, 0, out_keep))
        module.in_features, module.out_features = len(in_keep), len(out_keep)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = len(out_keep)
        for name in ("weight", "bias"):
            if getattr(module, name) is not None:
                _set_param(module, name, _index(getattr(module, name), 0, out_keep))
        for name in ("running_mean", "running_var"):
            if getattr(module, name) is not None:
                setattr(module, name, _index(getattr(module, name), 0, out_keep))
    elif isinstance(module, Gate):
        if not module.groups:
            return
        assert module.channels is not None
        size = module.channels // module.groups
        whole_groups = len(out_keep) % size == 0 and all(
            out_keep[i] == out_keep[i - i % size] + i % size and out_keep[i - i % size] % size == 0
            for i in range(len(out_keep))
        )
        if whole_groups:
            lam = _index(module.lam, 0, [out_keep[i] // size for i in range(0, len(out_keep), size)])
        else:
            lam = _index(module.channel_scale(), 0, out_keep)
            size = 1
        module.lam = nn.Parameter(lam, requires_grad=module.lam.requires_grad)
        module.groups, module.channels = len(out_keep) // size, len(out_keep)


def remove_channels(ir: IR) -> ShrinkReport:
    """Step 2: remove every removable channel class from every layer that holds it."""
    report = ShrinkReport()
    ana = analyze(ir)
    removed = removable_classes(ana)
    if not removed:
        return report
    gm = ir.gm
    done: set[str] = set()
    for node in gm.graph.nodes:
        if not ana.has_channels(node):
            continue
        out_keep = _kept(ana, node, removed)
        if len(out_keep) == ana.channels[node]:
            continue
        report.channels_removed += ana.channels[node] - len(out_keep)
        if node.op == "call_module" and str(node.target) not in done:
            done.add(str(node.target))
            first = node.args[0] if node.args else None
            in_keep = (
                _kept(ana, first, removed) if isinstance(first, fx.Node) and ana.has_channels(first) else None
            )
            shrink_module(gm.get_submodule(str(node.target)), in_keep, out_keep)
        elif ana.kinds[node] == "zeros":
            shape = list(node.args[1])  # type: ignore[arg-type]
            shape[0] = len(out_keep)
            node.args = (node.args[0], tuple(shape))
    # Cut layers whose output keeps every channel may still lose input channels.
    for node in gm.graph.nodes:
        if ana.kinds.get(node) not in ("conv", "linear") or str(node.target) in done:
            continue
        first = node.args[0]
        if not isinstance(first, fx.Node) or not ana.has_channels(first):
            continue
        in_keep = _kept(ana, first, removed)
        if len(in_keep) != ana.channels[first]:
            done.add(str(node.target))
            module = gm.get_submodule(str(node.target))
            assert isinstance(module.weight, torch.Tensor)
            count = ana.channels[node] if ana.has_channels(node) else int(module.weight.shape[0])
            shrink_module(module, in_keep, list(range(count)))
    gm.recompile()
    ir.propagate()
    return report


def shrink(ir: IR) -> ShrinkReport:
    """Both steps until nothing changes; the IR is edited in place and re-propagated."""
    ir.propagate()
    total = ShrinkReport(params_before=ir.param_count(), macs_before=ir.mac_count())
    for _ in range(4):
        step = remove_zero_branches(ir)
        step.merge(remove_channels(ir))
        total.merge(step)
        if not (step.branches or step.zeroed_tensors or step.channels_removed or step.nodes_removed):
            break
    total.params_after, total.macs_after = ir.param_count(), ir.mac_count()
    return total


__all__ = ["ShrinkReport", "node_inputs", "remove_channels", "remove_zero_branches", "shrink", "zeros_batch"]
