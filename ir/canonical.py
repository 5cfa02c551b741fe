"""Canonical form of a traced graph: what passes expect to find, whoever wrote the model.

Third-party model code reaches the same computation by other routes than ``torch.nn``'s own
modules. Tracing through them leaves forms that no pass recognises; this module rewrites them
into the module-level form every pass speaks, without changing what the graph computes:

- **Functional batch norm on a module's own tensors.** Normalization layers that subclass
  ``nn.BatchNorm2d`` and add an activation (timm's ``BatchNormAct2d``, in most timm CNNs) are
  traced *through*, so the graph holds ``F.batch_norm(x, get_attr running_mean, …)`` with the
  branch on ``self.training`` frozen at trace time. It becomes a call of a plain ``nn.BatchNorm``
  module that shares the same parameters and buffers, so BatchNorm folding finds it and
  ``.train()`` / ``.eval()`` work again.
- **Shape assertions.** ``torch._assert(x.ndim == 4, …)`` checks (timm again) are removed with the
  ``getattr``/comparison nodes that fed only them: the input shape is fixed when the IR is built
  and verified by shape propagation, and the extra users would hide a conv's single consumer
  from the passes that look for conv → BN → ReLU chains.
- **aten calls.** A model loaded through ``torch.export`` (a ``.pt2`` file, or the fallback for
  models torch.fx cannot trace) is lifted to modules for its layers (:mod:`ir.lift`), but its
  activations, adds, pools and reshapes stay ``aten`` overloads. Those whose ``torch`` function
  takes the same arguments in the same order become that function (``aten.relu.default`` →
  ``torch.relu``), so passes that recognise ``torch``-level ops find them in either form. An
  in-place overload (``aten.add_``) becomes the out-of-place function only when nothing reads the
  overwritten tensor afterwards, so the value every node sees is unchanged.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

ASSERT_FUNCTIONS = (torch._assert,)
_BATCH_NORM_BY_DIMS: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def canonicalize(gm: fx.GraphModule) -> list[str]:
    """Rewrite ``gm`` in place into the canonical form; returns a line per kind of rewrite done."""
    done = []
    removed = remove_shape_asserts(gm)
    if removed:
        done.append(f"removed {removed} shape assertion(s)")
    modules = functional_batch_norms_to_modules(gm)
    if modules:
        done.append(f"{modules} functional batch norm(s) became BatchNorm modules")
    calls = aten_calls_to_torch(gm)
    if calls:
        done.append(f"{calls} aten call(s) became torch functions")
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def remove_shape_asserts(gm: fx.GraphModule) -> int:
    """Drop ``torch._assert`` nodes and the pure nodes that only fed them; returns how many asserts."""
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ASSERT_FUNCTIONS]
    for node in asserts:
        gm.graph.erase_node(node)
    if asserts:  # their messages were formatted from traced values too (``f"got {x.ndim}D"``)
        _erase_dead(gm.graph, list(gm.graph.nodes))
    return len(asserts)


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase ``candidates`` that lost their last user, and what fed only them (pure nodes only)."""
    stack, erased = list(candidates), set()
    while stack:
        node = stack.pop()
        if node in erased or node.users or node.op not in ("call_function", "call_method", "get_attr"):
            continue
        if node.op == "call_function" and node.target not in (getattr, *_PURE_FUNCTIONS):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)


#: Functions without side effects that may feed an assertion (its condition and message).
_PURE_FUNCTIONS = (
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.getitem,
    operator.and_,
    operator.or_,
    operator.not_,
    len,
)


def _attr_owner(gm: fx.GraphModule, node: object) -> tuple[str, str] | None:
    """``(module path, attribute)`` of a ``get_attr`` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, attr = str(node.target).rpartition(".")
    return owner, attr


def functional_batch_norms_to_modules(gm: fx.GraphModule) -> int:
    """Replace ``F.batch_norm`` on one module's own parameters/buffers by a shared ``nn.BatchNorm``."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        args = _batch_norm_args(node)
        if args is None:
            continue
        x = args["input"]
        assert isinstance(x, fx.Node)  # checked by _batch_norm_args
        stats = [args[k] for k in ("running_mean", "running_var", "weight", "bias")]
        owners = {_attr_owner(gm, s) for s in stats if s is not None}
        if None in owners or len({o[0] for o in owners if o is not None}) != 1:
            continue
        if args["running_mean"] is None or args["running_var"] is None:
            continue  # batch statistics only: no module form keeps that
        owner_path = next(iter(owners))[0]  # type: ignore[index]
        owner = gm.get_submodule(owner_path) if owner_path else gm
        cls = _batch_norm_class(owner, x)
        if cls is None:
            continue
        tensors = {k: _fetch(gm, args[k]) for k in ("running_mean", "running_var", "weight", "bias")}
        mean, eps = tensors["running_mean"], args["eps"]
        assert mean is not None and isinstance(eps, float | int)
        module = cls(
            int(mean.numel()),
            eps=float(eps),
            momentum=getattr(owner, "momentum", 0.1),
            affine=tensors["weight"] is not None,
        )
        for k in ("weight", "bias"):
            if tensors[k] is not None:
                setattr(module, k, tensors[k])  # the same Parameter: training either updates both
        module.running_mean = tensors["running_mean"]
        module.running_var = tensors["running_var"]
        tracked = getattr(owner, "num_batches_tracked", None)
        if isinstance(tracked, torch.Tensor):
            module.num_batches_tracked = tracked
        module.train(owner.training)
        name = _free_child(owner, "bn")
        owner.add_module(name, module)
        target = f"{owner_path}.{name}" if owner_path else name
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (x,))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        _erase_dead(gm.graph, [n for n in inputs if n is not x])
        count += 1
    return count


aten = torch.ops.aten
#: aten overloads → the torch function taking the same positional arguments (checked one by one
#: against the aten schema: ``max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)``).
ATEN_TO_TORCH: dict[object, object] = {
    aten.relu.default: torch.relu,
    aten.relu_.default: torch.relu,
    aten.add.Tensor: operator.add,
    aten.add_.Tensor: operator.add,
    aten.mul.Tensor: operator.mul,
    aten.mul_.Tensor: operator.mul,
    aten.sigmoid.default: torch.sigmoid,
    aten.hardswish.default: F.hardswish,
    aten.hardswish_.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid,
    aten.hardtanh.default: F.hardtanh,
    aten.hardtanh_.default: F.hardtanh,
    aten.gelu.default: F.gelu,
    aten.silu.default: F.silu,
    aten.silu_.default: F.silu,
    aten.cat.default: torch.cat,
    aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.mean.dim: torch.mean,
    aten.flatten.using_ints: torch.flatten,
    aten.view.default: torch.reshape,
    aten.reshape.default: torch.reshape,
    aten.transpose.int: torch.transpose,
    aten.permute.default: torch.permute,
    aten.dropout.default: F.dropout,
    aten.dropout_.default: F.dropout,
    aten.pad.default: F.pad,
}
_IN_PLACE = {aten.relu_.default, aten.add_.Tensor, aten.mul_.Tensor, aten.hardswish_.default}
_IN_PLACE |= {aten.hardtanh_.default, aten.silu_.default, aten.dropout_.default}


def aten_calls_to_torch(gm: fx.GraphModule) -> int:
    """Replace the aten overloads of :data:`ATEN_TO_TORCH` by their torch functions; returns how many.

    ``aten.add.Tensor`` with an ``alpha`` is left alone (``operator.add`` has none), and so is an
    in-place overload whose overwritten input is read after it.
    """
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    count = 0
    for node in list(gm.graph.nodes):
        target = ATEN_TO_TORCH.get(node.target) if node.op == "call_function" else None
        if target is None:
            continue
        if target in (operator.add, operator.mul) and (node.kwargs or len(node.args) != 2):
            continue  # alpha, or an out= form
        if node.target in _IN_PLACE and _read_after(node, order):
            continue
        node.target = target
        count += 1
    return count


def _read_after(node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether the tensor ``node`` overwrites (its first argument) has users after ``node``."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return True
    return any(order[user] > order[node] for user in first.users if user is not node)


_BN_PARAMS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _batch_norm_args(node: fx.Node) -> dict[str, object] | None:
    """``F.batch_norm``'s arguments by name (positional and keyword), or None if malformed."""
    named: dict[str, object] = dict(_BN_DEFAULTS)
    if len(node.args) > len(_BN_PARAMS):
        return None
    named.update(zip(_BN_PARAMS, node.args))
    named.update(node.kwargs)
    if not isinstance(named.get("input"), fx.Node) or not isinstance(named["eps"], float | int):
        return None
    return named


def _batch_norm_class(owner: nn.Module, x: fx.Node) -> type[nn.modules.batchnorm._BatchNorm] | None:
    """The ``nn.BatchNorm`` class for the owner (a BatchNorm subclass), else by the input's rank."""
    for cls in _BATCH_NORM_BY_DIMS.values():
        if isinstance(owner, cls):
            return cls
    meta = x.meta.get("sculpt")  # ir.graph's NodeMeta, where shapes were propagated
    shape = getattr(meta, "shape", None)
    return _BATCH_NORM_BY_DIMS.get(len(shape)) if shape is not None else None


def _fetch(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if node is None:
        return None
    assert isinstance(node, fx.Node)
    owner, _, attr = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _free_child(module: nn.Module, base: str) -> str:
    name, index = base, 1
    while hasattr(module, name):
        index += 1
        name = f"{base}{index}"
    return name
