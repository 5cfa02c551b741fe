"""Put scales λ on a user's traced model: on residual branches and on channel groups.

- *Branches* (DSO-NAS, Zhang et al. 2018, section 3.1, applied to an existing network as
  Sparse Structure Selection does for residual blocks, Huang & Wang 2018, section 3.2): a
  scalar :class:`~ir.constructs.Gate` multiplies every residual branch before its add, so
  ``y = x + λ F(x)``; λ = 0 removes ``F``. Of an add's operands, every one except the cheapest
  (the identity or projection shortcut) counts as a branch.
- *Channels* (SSS, section 3.2, "neuron" scales): a channel Gate after each convolution
  (after its BatchNorm when the conv feeds only one). Channels tied together (by residual
  adds, depthwise convs, concatenations) share one Gate module called at every conv that
  produces them, so their λ reach zero together and the channels can really be removed.
  Convolutions whose channels can never be removed (they reach the model's output or an op
  the analysis does not understand) get no gate.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch
from torch import fx, nn

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.channels import analyze, input_dependent, node_inputs
from fxsculpt.nas.dso.shrink import rewire_all_but

GATE_ROOT = "dso_gates"


def _add_gate_module(gm: fx.GraphModule, name: str, gate: Gate) -> str:
    if not hasattr(gm, GATE_ROOT):
        gm.add_submodule(GATE_ROOT, nn.Module())
    root = gm.get_submodule(GATE_ROOT)
    root.add_module(
        name, gate.to(next(gm.parameters()).device) if any(True for _ in gm.parameters()) else gate
    )
    return f"{GATE_ROOT}.{name}"


def _exclusive_cone(node: fx.Node, stop: fx.Node) -> set[fx.Node]:
    """``node`` and its ancestors used only through ``node`` (what a zero there makes dead)."""
    cone = {node}
    frontier = list(node_inputs(node))
    while frontier:
        cand = frontier.pop()
        if cand in cone or cand.op in ("placeholder", "get_attr"):
            continue
        if all(u in cone for u in cand.users):
            cone.add(cand)
            frontier.extend(node_inputs(cand))
    return cone


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def gate_branches(ir: IR) -> list[str]:
    """Insert a scalar Gate on every residual branch; returns the gate module names."""
    gm = ir.gm
    names: list[str] = []
    adds = [n for n in gm.graph.nodes if _is_add(n)]
    from_input = input_dependent(gm.graph)
    for add in adds:
        operands = [a for a in add.args if isinstance(a, fx.Node)]
        if len(operands) < 2 or sum(o in from_input for o in operands) < 2:
            continue  # a residual adds a branch to a skip, both computed from the input
        shapes = {getattr(o.meta.get("sculpt"), "shape", None) for o in operands}
        if len(shapes) != 1 or None in shapes:
            continue
        costs = []
        for operand in operands:
            cone = _exclusive_cone(operand, add)
            costs.append(sum(ir.meta(n).macs for n in cone if n.op != "placeholder"))
        cheapest = min(range(len(operands)), key=lambda i: costs[i])
        for i, operand in enumerate(operands):
            if i == cheapest or costs[i] == 0 or _is_gate(gm, operand):
                continue
            target = _add_gate_module(gm, f"branch{len(names)}", Gate())
            with gm.graph.inserting_after(operand):
                gate_node = gm.graph.call_module(target, (operand,))
            add.replace_input_with(operand, gate_node)
            names.append(target)
    gm.recompile()
    ir.propagate()
    return names


def _is_gate(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), Gate)


def _is_channel_gate(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = gm.get_submodule(str(node.target))
    return isinstance(module, Gate) and module.groups > 0


def _gate_groups(vector: tuple[int, ...], group_size: int) -> int:
    """How many λ a gate over channels with class ``vector`` gets: one per run of a class,
    merged to ``group_size`` channels where runs are shorter, when the runs are uniform."""
    runs: list[int] = []
    for i, k in enumerate(vector):
        if i and vector[i - 1] == k:
            runs[-1] += 1
        else:
            runs.append(1)
    channels = len(vector)
    if len(set(runs)) != 1 or len(set(vector)) != len(runs):
        return channels  # irregular ties: one λ per channel
    size = math.lcm(runs[0], max(group_size, 1))
    return channels // size if channels % size == 0 else channels // runs[0]


def gate_channels(ir: IR, group_size: int = 1, skip: Iterable[str] = ()) -> list[str]:
    """Insert channel Gates after every prunable convolution; returns the gate module names."""
    gm = ir.gm
    ana = analyze(ir, with_zeros=False)
    pinned = ana.pinned_classes()
    skip = set(skip)
    points: dict[tuple[int, ...], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if ana.kinds.get(node) not in ("conv", "grouped_conv") or str(node.target) in skip:
            continue
        point = node
        users = list(node.users)
        if len(users) == 1 and ana.kinds.get(users[0]) == "bn":
            point = users[0]
        if any(_is_channel_gate(gm, u) for u in point.users) or not ana.has_channels(point):
            continue
        vector = ana.class_vector(point)
        if any(k in pinned for k in vector):
            continue
        points.setdefault(vector, []).append(point)
    names: list[str] = []
    for vector, where in points.items():
        channels = len(vector)
        gate = Gate(groups=_gate_groups(vector, group_size), channels=channels)
        target = _add_gate_module(gm, f"channels{len(names)}", gate)
        for point in where:
            with gm.graph.inserting_after(point):
                gate_node = gm.graph.call_module(target, (point,))
            point.replace_all_uses_with(gate_node, delete_user_cb=rewire_all_but(gate_node))
        names.append(target)
    gm.recompile()
    ir.propagate()
    return names


def fold_gates(ir: IR) -> int:
    """Fold each gate into the BatchNorm or Conv just before it (when it alone reads that layer)
    and delete it; returns how many gate calls were folded. Exact: ``λ·(γx̂ + β) = (λγ)x̂ + λβ``."""
    gm = ir.gm
    folded = 0
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in list(gm.graph.nodes):
        if not _is_gate(gm, node):
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls.get(str(source.target), 0) != 1:
            continue
        layer = gm.get_submodule(str(source.target))
        gate = gm.get_submodule(str(node.target))
        assert isinstance(gate, Gate)
        scale = gate.channel_scale().detach()
        with torch.no_grad():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine:
                layer.weight.mul_(scale)
                layer.bias.mul_(scale)
            elif isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
                shape = [-1] + [1] * (layer.weight.dim() - 1)
                layer.weight.mul_(scale.reshape(shape) if scale.dim() else scale)
                if layer.bias is not None:
                    layer.bias.mul_(scale)
            else:
                continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    ir.propagate()
    return folded
