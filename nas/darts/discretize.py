"""Discretization (Liu et al., ICLR 2019, sec. 2.4): mixed ops become their strongest op.

Each mixed op in the graph is replaced by its strongest candidate other than ``none`` (by
softmax(α)). In the cell space, each intermediate node keeps only its two strongest incoming
edges (:func:`~nas.darts.genotype.derive_cell`); the other edges are cut out of the graph: the
``add`` that summed a dropped edge into its node is replaced by its other operand. The result
is a plain graph of ordinary modules that runs and exports like any model.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from fxsculpt.ir.constructs import Choice
from fxsculpt.ir.graph import IR
from fxsculpt.nas.darts.genotype import Genotype, derive_genotype
from fxsculpt.nas.darts.mixed import EdgeInfo, MixedOp
from fxsculpt.nas.darts.relax import _set_submodule


def cell_alphas(ir: IR) -> dict[str, list[torch.Tensor]] | None:
    """Per cell kind, the α of each edge position (tied α: one per position), or ``None``.

    ``None`` when the graph has no cell-space mixed ops.
    """
    by_kind: dict[str, dict[tuple[int, int], torch.Tensor]] = defaultdict(dict)
    for node in ir.construct_nodes(MixedOp):
        module = ir.gm.get_submodule(str(node.target))
        assert isinstance(module, MixedOp)
        if module.edge is not None:
            by_kind[module.edge.cell_type].setdefault(
                (module.edge.node, module.edge.source), module.alpha.detach()
            )
    if not by_kind:
        return None
    out: dict[str, list[torch.Tensor]] = {}
    for kind, edges in by_kind.items():
        out[kind] = [edges[key] for key in sorted(edges)]
    return out


def cell_steps(ir: IR) -> int:
    """Intermediate nodes per cell in the graph's cell-space mixed ops."""
    nodes = [
        m.edge.node
        for m in (ir.gm.get_submodule(str(n.target)) for n in ir.construct_nodes(MixedOp))
        if isinstance(m, MixedOp) and m.edge is not None
    ]
    return max(nodes) + 1 if nodes else 0


def genotype_of(ir: IR) -> Genotype | None:
    """The genotype of a searched cell space in the graph (``None`` without cell mixed ops)."""
    alphas = cell_alphas(ir)
    if alphas is None:
        return None
    first = next(
        m
        for m in (ir.gm.get_submodule(str(n.target)) for n in ir.construct_nodes(MixedOp))
        if isinstance(m, MixedOp) and m.edge is not None
    )
    assert first.edge is not None
    primitives, multiplier = first.candidate_names, first.edge.multiplier
    steps = cell_steps(ir)
    empty = [torch.zeros(len(primitives)) for _ in range(sum(2 + k for k in range(steps)))]
    return derive_genotype(
        alphas.get("normal", empty), alphas.get("reduce", empty), steps, multiplier, primitives
    )


def _cut_edge(graph: fx.Graph, node: fx.Node) -> None:
    """Remove a dropped edge: its ``add`` user is replaced by the add's other operand."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not operator.add or len(users[0].args) != 2:
        raise RuntimeError(f"cannot cut edge {node.name}: it does not feed exactly one add")
    add = users[0]
    a, b = add.args
    other = b if a is node else a
    assert isinstance(other, fx.Node)
    add.replace_all_uses_with(other)
    graph.erase_node(add)
    graph.erase_node(node)


def discretize(ir: IR) -> dict[str, str]:
    """Replace every :class:`Choice` by its strongest non-``none`` op, cutting dropped cell edges.

    Returns node name → the op kept (``"cut"`` for a dropped cell edge).
    """
    genotype = genotype_of(ir)
    kept_edges: dict[str, set[tuple[int, int]]] = {}
    if genotype is not None:
        for kind, pairs in (("normal", genotype.normal), ("reduce", genotype.reduce)):
            kept_edges[kind] = {(k // 2, j) for k, (_, j) in enumerate(pairs)}
    decisions: dict[str, str] = {}
    for node in list(ir.construct_nodes(Choice)):
        module = ir.gm.get_submodule(str(node.target))
        assert isinstance(module, Choice)
        edge: EdgeInfo | None = getattr(module, "edge", None)
        if edge is not None and (edge.node, edge.source) not in kept_edges[edge.cell_type]:
            decisions[node.name] = "cut"
            _cut_edge(ir.gm.graph, node)
            continue
        index = module.strongest(exclude=("none",))
        decisions[node.name] = module.candidate_names[index]
        _set_submodule(ir.gm, str(node.target), module.candidates[index])
    ir.gm.graph.eliminate_dead_code()
    ir.gm.delete_all_unused_submodules()
    ir.gm.recompile()
    ir.propagate()
    return decisions
