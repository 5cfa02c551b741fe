"""Dead-structure propagation (DSO-NAS, Zhang et al. 2018, section 3.4).

After the sparse search some scales λ are exactly zero. An op is *dead* when everything that
flows into it is zero (all its incoming λ are zero, or come from dead ops), or when nothing it
produces is used (its own output scale and every outgoing λ are zero, or lead to dead ops).
Removing a dead op zeroes the scales of the edges only it fed or only it drew from, which can
kill further ops: the rules are applied until nothing changes.

The propagation works on a plain DAG (:class:`DeadGraph`): nodes are ops; a node with a
``scale`` is a gate (the scale λ it multiplies by). :func:`gate_graph` builds that DAG from an
IR (every fx node an op, every scalar :class:`~ir.constructs.Gate` a gated node) and
:func:`apply_dead_structure` writes the result back by zeroing the gates of dead structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.channels import node_inputs


@dataclass
class DeadGraph:
    """A DAG of ops. ``scale[n]`` is set for gates; ``sources``/``sinks`` never die."""

    succ: dict[str, list[str]] = field(default_factory=dict)
    pred: dict[str, list[str]] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    sources: set[str] = field(default_factory=set)
    sinks: set[str] = field(default_factory=set)

    def add_node(self, name: str, scale: float | None = None) -> None:
        self.succ.setdefault(name, [])
        self.pred.setdefault(name, [])
        if scale is not None:
            self.scale[name] = scale

    def add_edge(self, src: str, dst: str) -> None:
        self.add_node(src)
        self.add_node(dst)
        self.succ[src].append(dst)
        self.pred[dst].append(src)


def propagate_dead(graph: DeadGraph) -> set[str]:
    """The dead nodes of ``graph`` under the two rules above, iterated to a fixed point.

    Forward: a gate whose scale is 0 is dead; a non-source node with at least one input is
    dead when all its inputs are dead. Backward: a non-sink node is dead when all of its
    consumers are dead (a node nobody consumes is dead).
    """
    dead = {n for n, s in graph.scale.items() if s == 0 and n not in graph.sources}
    changed = True
    while changed:
        changed = False
        for node in graph.succ:
            if node in dead:
                continue
            preds, succs = graph.pred[node], graph.succ[node]
            forward = node not in graph.sources and bool(preds) and all(p in dead for p in preds)
            backward = node not in graph.sinks and all(s in dead for s in succs)
            if forward or backward:
                dead.add(node)
                changed = True
    return dead


def gate_graph(ir: IR) -> tuple[DeadGraph, dict[str, str]]:
    """The IR as a :class:`DeadGraph`; also node name → gate module name for scalar gates.

    A channel gate (``groups > 0``) counts as a gate with scale ``max(λ)``: it is dead only
    when all its channels are, channel-level removal being the shrink step's business.
    Constants (``get_attr``) and inputs are sources, the output is the sink.
    """
    graph = DeadGraph()
    gates: dict[str, str] = {}
    for node in ir.gm.graph.nodes:
        scale = None
        if node.op == "call_module":
            module = ir.gm.get_submodule(str(node.target))
            if isinstance(module, Gate):
                scale = float(module.lam.detach().abs().max())
                gates[node.name] = str(node.target)
        graph.add_node(node.name, scale)
        if node.op in ("placeholder", "get_attr"):
            graph.sources.add(node.name)
        if node.op == "output":
            graph.sinks.add(node.name)
        for arg in node_inputs(node):
            graph.add_edge(arg.name, node.name)
    return graph, gates


@dataclass
class DeadReport:
    """Which ops died and which gates were zeroed because of it."""

    dead_nodes: list[str]
    zeroed_gates: list[str]


def apply_dead_structure(ir: IR) -> DeadReport:
    """Propagate dead structure on ``ir`` and set the λ of every dead gate to zero.

    A gate module called at several nodes is zeroed only when all its calls are dead.
    """
    graph, gates = gate_graph(ir)
    dead = propagate_dead(graph)
    calls: dict[str, list[str]] = {}
    for node_name, target in gates.items():
        calls.setdefault(target, []).append(node_name)
    zeroed: list[str] = []
    for target, nodes in calls.items():
        if all(n in dead for n in nodes):
            module = ir.gm.get_submodule(target)
            assert isinstance(module, Gate)
            if bool((module.lam.detach() != 0).any()):
                with torch.no_grad():
                    module.lam.zero_()
                zeroed.append(target)
    names = {n.name for n in ir.gm.graph.nodes if isinstance(n, fx.Node)}
    return DeadReport(sorted(n for n in dead if n in names), sorted(zeroed))
