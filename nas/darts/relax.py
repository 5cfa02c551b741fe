"""Edge relaxation of a user's traced model: chosen nodes become DARTS mixed ops.

Each selected ``call_module`` node (2-D convolutions by default) is replaced in place by a
:class:`~nas.darts.mixed.MixedOp` whose candidates are the DARTS ops that can stand in for it:
built for the node's input and output channels and stride, then kept only if, run on the
node's recorded input shape, they produce exactly the node's recorded output shape. ``none``
is offered only where the graph stays connected without the node (some other path still
leads from the input to the output, e.g. a residual branch beside a shortcut).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import fx, nn

from fxsculpt.ir.constructs import SearchConstruct
from fxsculpt.ir.graph import IR
from fxsculpt.nas.darts.mixed import MixedOp
from fxsculpt.nas.darts.ops import PRIMITIVES, build_op


def connected_without(graph: fx.Graph, removed: fx.Node) -> bool:
    """Whether the output still depends on some graph input once ``removed`` carries nothing."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    seen: set[fx.Node] = set()
    stack = list(inputs)
    while stack:
        node = stack.pop()
        if node in seen or node is removed:
            continue
        seen.add(node)
        if node.op == "output":
            return True
        stack.extend(node.users)
    return False


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def selected_nodes(ir: IR, pattern: str) -> list[fx.Node]:
    """call_module nodes whose module class name or qualified name matches ``pattern`` (regex)."""
    regex = re.compile(pattern, re.IGNORECASE)
    chosen = []
    for node in ir.gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = ir.gm.get_submodule(str(node.target))
        if isinstance(module, SearchConstruct):
            continue
        if regex.search(type(module).__name__) or regex.fullmatch(str(node.target)):
            chosen.append(node)
    return chosen


def candidates_for(
    module: nn.Module,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    primitives: Sequence[str],
    allow_none: bool,
) -> tuple[list[nn.Module], list[str]]:
    """The candidate ops (search variants) that map ``in_shape`` to exactly ``out_shape``."""
    if len(in_shape) != 4 or len(out_shape) != 4:
        return [], []
    c_in, c_out = int(in_shape[1]), int(out_shape[1])
    stride = getattr(module, "stride", (1, 1))
    stride = int(stride[0]) if isinstance(stride, tuple | list) else int(stride)
    if stride not in (1, 2):
        # Any spatial reduction is realized at the ops' own stride, checked on shapes below.
        stride = 2 if int(out_shape[2]) < int(in_shape[2]) else 1
    ops: list[nn.Module] = []
    names: list[str] = []
    probe = torch.zeros(2, *[int(d) for d in in_shape[1:]])
    for name in primitives:
        if name == "none" and not allow_none:
            continue
        op = build_op(name, c_in, c_out, stride, search=True)
        if op is None:
            continue
        if name != "none":
            op.eval()
            try:
                with torch.no_grad():
                    shape = tuple(op(probe).shape[1:])
            except RuntimeError:
                continue
            if shape != tuple(int(d) for d in out_shape[1:]):
                continue
        ops.append(op)
        names.append(name)
    if not any(n != "none" for n in names):
        return [], []
    return ops, names


def relax(
    ir: IR,
    pattern: str = "conv",
    primitives: Sequence[str] = PRIMITIVES,
    generator: torch.Generator | None = None,
    lean: bool = True,
) -> dict[str, list[str]]:
    """Replace every matching node by a mixed op; returns node name → candidate names.

    Nodes for which no candidate fits stay as they are. The IR's metadata is re-propagated.
    """
    ir.propagate()
    device = ir.device
    relaxed: dict[str, list[str]] = {}
    for node in selected_nodes(ir, pattern):
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if len(args) != 1 or node.kwargs:
            continue
        in_shape, out_shape = ir.meta(args[0]).shape, ir.meta(node).shape
        if in_shape is None or out_shape is None:
            continue
        module = ir.gm.get_submodule(str(node.target))
        allow_none = connected_without(ir.gm.graph, node)
        ops, names = candidates_for(module, in_shape, out_shape, primitives, allow_none)
        if not ops:
            continue
        mixed = MixedOp(ops, names, generator=generator, lean=lean).to(device)
        _set_submodule(ir.gm, str(node.target), mixed)
        relaxed[node.name] = names
    ir.gm.recompile()
    ir.propagate()
    return relaxed
