"""``dce``: dead-code elimination on the fx graph and the module tree behind it.

Three clean-ups, in this order, each counted for the report:

1. ``nn.Identity`` calls are removed and their users rewired to the identity's input
   (pruning and choice discretization leave many of them).
2. Dead nodes go: a node with no users whose evaluation has no side effect. In-place
   operations (``x.relu_()``, ``inplace=True`` modules and calls) and fx's own impure nodes
   are kept, because their effect is on a tensor someone else reads.
3. Submodules, parameters and buffers that no remaining node reaches are deleted, so the
   parameter count and the exported file shrink with the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, Pass


@dataclass
class DceStats:
    """Counts of what one run removed."""

    identity_nodes: int = 0
    dead_nodes: int = 0
    submodules: int = 0
    parameters: int = 0
    buffers: int = 0
    param_elements: int = 0


def _is_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs (so it matters even without users)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):  # torch's in-place naming: add_, relu_
            return True
        if name.startswith("__i") and name.endswith("__"):  # __iadd__ and friends
            return True
        if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
            return name.startswith("i") and name[1:] in _BINARY_OPERATORS
    return False


_BINARY_OPERATORS = {
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "matmul",
    "and_",
    "or_",
    "xor",
    "lshift",
    "rshift",
    "concat",
}


def is_removable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node with no users, no side effect and no in-place write: removing it changes nothing."""
    if node.users or node.op in ("placeholder", "output"):
        return False
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "_is_impure", False):
            return False
    elif node.is_impure():
        return False
    return not _is_in_place(gm, node)


def remove_identities(gm: fx.GraphModule) -> int:
    """Rewire users of every ``nn.Identity`` call to its input and erase the call."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), nn.Identity):
            continue
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        removed += 1
    return removed


def remove_dead_nodes(gm: fx.GraphModule) -> int:
    """Erase dead nodes; walking backwards frees a whole dead chain in one sweep."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if is_removable(gm, node):
                gm.graph.erase_node(node)
                removed += 1
                changed = True
    return removed


def _covered(path: str, roots: set[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or lies inside one of them."""
    return any(path == r or path.startswith(r + ".") for r in roots)


def remove_unused_state(gm: fx.GraphModule, stats: DceStats) -> None:
    """Delete submodules, parameters and buffers that no call_module or get_attr node reaches.

    A called module keeps everything inside it; a ``get_attr`` target keeps that attribute
    (and everything inside it, when it is a module); the modules on the path to anything
    kept stay as containers, but their own unused parameters and buffers go. Counts are of
    distinct objects that became unreachable, so a weight shared with a kept layer is not
    counted as removed.
    """
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            used.add(str(node.target))

    def keeps_module(path: str) -> bool:
        return path == "" or _covered(path, used) or any(u.startswith(path + ".") for u in used)

    modules_before = {id(m) for m in gm.modules()}
    params_before = {id(p): p.numel() for p in gm.parameters()}
    buffers_before = {id(b) for b in gm.buffers()}

    for name, _ in list(gm.named_modules(remove_duplicate=False)):
        parent = name.rpartition(".")[0]
        if name and not keeps_module(name) and keeps_module(parent):
            gm.delete_submodule(name)
    for kind in ("_parameters", "_buffers"):
        named = gm.named_parameters if kind == "_parameters" else gm.named_buffers
        for name, _ in list(named(remove_duplicate=False)):
            if _covered(name, used):
                continue
            owner_path, _, attr = name.rpartition(".")
            getattr(gm.get_submodule(owner_path), kind).pop(attr, None)

    params_after = {id(p) for p in gm.parameters()}
    stats.submodules = len(modules_before - {id(m) for m in gm.modules()})
    stats.parameters = sum(1 for i in params_before if i not in params_after)
    stats.param_elements = sum(n for i, n in params_before.items() if i not in params_after)
    stats.buffers = len(buffers_before - {id(b) for b in gm.buffers()})


def eliminate_dead_code(gm: fx.GraphModule) -> DceStats:
    """Run the three clean-ups on ``gm`` in place and return what they removed."""
    stats = DceStats()
    stats.identity_nodes = remove_identities(gm)
    stats.dead_nodes = remove_dead_nodes(gm)
    remove_unused_state(gm, stats)
    gm.graph.lint()
    gm.recompile()
    return stats


class DeadCodeElimination(Pass):
    """Remove dead nodes, nn.Identity calls and submodules/parameters no node uses."""

    name = "dce"
    preserves_semantics = True

    def run(self, ir: IR, ctx: Context) -> IR:
        stats = eliminate_dead_code(ir.gm)
        ir.propagate()
        ctx.record(
            identity_nodes=stats.identity_nodes,
            dead_nodes=stats.dead_nodes,
            submodules=stats.submodules,
            parameters=stats.parameters,
            buffers=stats.buffers,
            param_elements=stats.param_elements,
        )
        return ir
