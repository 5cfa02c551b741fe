"""Lift a ``torch.export`` program's aten graph to the module-level IR the passes expect.

``torch.export.load(path).module()`` gives a GraphModule whose weights are ``get_attr``
nodes feeding ``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm`` calls. The passes
(BN folding, pruning, quantization) look for ``call_module`` nodes holding ``nn.Conv2d``,
``nn.Linear`` and ``nn.BatchNorm2d``; this module rebuilds those modules around the same
tensors (also from the decomposed forms ``aten.convolution``, ``addmm`` of a transposed
weight and ``_native_batch_norm_legit_no_training``), keeps every other aten call as a ``call_function`` node, drops export's
``_guards_fn`` check, and replaces the pytree calling convention with a plain
``forward(x)`` that returns a tensor when the program returns one.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from fxsculpt.ir.errors import BadInputError

aten = torch.ops.aten

_CONV_OPS = {
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
}
_CONV_CLASSES: dict[int, Callable[..., nn.modules.conv._ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN_CLASSES: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: dict[str, Any] = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


class _Lifter:
    """Rewrites one aten GraphModule in place into a new root with lifted submodules."""

    def __init__(self, program_module: fx.GraphModule) -> None:
        self.source = program_module
        self.graph = program_module.graph
        self.root = nn.Module()
        self.names: set[str] = set()

    # -- attribute helpers --------------------------------------------------------------------
    def _tensor(self, value: Any) -> torch.Tensor | None:
        """The tensor behind a ``get_attr`` argument, or None when it is not one."""
        if isinstance(value, fx.Node) and value.op == "get_attr":
            attr = self.source
            for part in str(value.target).split("."):
                attr = getattr(attr, part)
            if isinstance(attr, torch.Tensor):
                return attr
        return None

    def _module_name(self, weight_node: fx.Node, fallback: str) -> str:
        """``layer1.0.conv1`` for weight ``layer1.0.conv1.weight``; unique within the new root."""
        target = str(weight_node.target)
        base = target.rsplit(".", 1)[0] if "." in target else fallback
        name, suffix = base, 1
        while name in self.names or self._taken(name):
            name = f"{base}_{suffix}"
            suffix += 1
        self.names.add(name)
        return name

    def _taken(self, path: str) -> bool:
        try:
            self.root.get_submodule(path)
            return True
        except AttributeError:
            return False

    def _install(self, path: str, value: nn.Module | torch.Tensor) -> None:
        """Put ``value`` at dotted ``path`` in the new root, creating empty parents."""
        parent = self.root
        parts = path.split(".")
        for part in parts[:-1]:
            child = getattr(parent, part, None)
            if not isinstance(child, nn.Module):
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        leaf = parts[-1]
        if isinstance(value, nn.Module):
            parent.add_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            parent.register_parameter(leaf, value)
        else:
            parent.register_buffer(leaf, value)

    def _replace(self, node: fx.Node, module: nn.Module, name: str, args: tuple[Any, ...]) -> fx.Node:
        self._install(name, module)
        with self.graph.inserting_before(node):
            new = self.graph.call_module(name, args)
        new.meta = dict(node.meta)
        return new

    # -- the rewrites -------------------------------------------------------------------------
    def lift_conv(self, node: fx.Node) -> None:
        b = _bind(node)
        weight = self._tensor(b["weight"])
        bias_node = b["bias"]
        bias = self._tensor(bias_node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None):
            return  # computed weights: leave the aten call as it is
        if node.target == aten.convolution.default:
            if b["transposed"] or any(int(p) for p in b["output_padding"]):
                return
            dims = weight.dim() - 2
        else:
            dims = _CONV_OPS[node.target]  # type: ignore[index]
        if dims not in _CONV_CLASSES or weight.dim() != dims + 2:
            return
        groups = int(b["groups"])
        padding: Any = b["padding"]
        if not isinstance(padding, str):
            padding = tuple(int(p) for p in padding) if len(padding) > 1 else (int(padding[0]),) * dims
        stride = tuple(int(s) for s in b["stride"])
        dilation = tuple(int(d) for d in b["dilation"])
        if len(stride) == 1:
            stride *= dims
        if len(dilation) == 1:
            dilation *= dims
        out_channels, in_per_group = int(weight.shape[0]), int(weight.shape[1])
        conv = _CONV_CLASSES[dims](
            in_per_group * groups,
            out_channels,
            tuple(int(k) for k in weight.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
        )
        conv.weight = _as_parameter(weight)
        if bias is not None:
            conv.bias = _as_parameter(bias)
        name = self._module_name(b["weight"], "conv")
        node.replace_all_uses_with(self._replace(node, conv, name, (b["input"],)))
        self.graph.erase_node(node)

    def lift_linear(self, node: fx.Node) -> None:
        b = _bind(node)
        weight = self._tensor(b["weight"])
        bias_node = b["bias"]
        bias = self._tensor(bias_node) if bias_node is not None else None
        if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
            return
        linear = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=bias is not None)
        linear.weight = _as_parameter(weight)
        if bias is not None:
            linear.bias = _as_parameter(bias)
        name = self._module_name(b["weight"], "linear")
        node.replace_all_uses_with(self._replace(node, linear, name, (b["input"],)))
        self.graph.erase_node(node)

    def lift_addmm(self, node: fx.Node) -> None:
        """``addmm(bias, x, t(weight))`` (a decomposed Linear) back to ``nn.Linear``."""
        b = _bind(node)
        if b.get("beta", 1) != 1 or b.get("alpha", 1) != 1:
            return
        transposed = b["mat2"]
        if not (isinstance(transposed, fx.Node) and transposed.op == "call_function"):
            return
        is_t = transposed.target == aten.t.default
        is_permute = transposed.target == aten.permute.default and list(transposed.args[1]) == [1, 0]  # type: ignore[arg-type]
        if not (is_t or is_permute):
            return
        weight_node = transposed.args[0]
        weight = self._tensor(weight_node)
        bias = self._tensor(b["self"])
        if weight is None or bias is None or weight.dim() != 2 or bias.shape != (weight.shape[0],):
            return
        linear = nn.Linear(int(weight.shape[1]), int(weight.shape[0]))
        linear.weight, linear.bias = _as_parameter(weight), _as_parameter(bias)
        assert isinstance(weight_node, fx.Node)
        name = self._module_name(weight_node, "linear")
        node.replace_all_uses_with(self._replace(node, linear, name, (b["mat1"],)))
        self.graph.erase_node(node)
        if not transposed.users:
            self.graph.erase_node(transposed)

    def lift_batch_norm(self, node: fx.Node, legit: bool) -> None:
        b = _bind(node)
        mean, var = self._tensor(b["running_mean"]), self._tensor(b["running_var"])
        weight_node, bias_node = b["weight"], b["bias"]
        weight = self._tensor(weight_node) if weight_node is not None else None
        bias = self._tensor(bias_node) if bias_node is not None else None
        if mean is None or var is None or (weight_node is not None and weight is None):
            return
        if (bias_node is not None and bias is None) or (weight is None) != (bias is None):
            return
        if not legit and b["training"]:
            return  # a BatchNorm exported in training mode: keep the aten call
        val = b["input"].meta.get("val") if isinstance(b["input"], fx.Node) else None
        rank = val.dim() if isinstance(val, torch.Tensor) else 4
        if rank not in _BN_CLASSES:
            return
        bn = _BN_CLASSES[rank](
            int(mean.shape[0]), eps=float(b["eps"]), momentum=float(b["momentum"]), affine=weight is not None
        )
        if weight is not None and bias is not None:
            bn.weight = _as_parameter(weight)
            bn.bias = _as_parameter(bias)
        bn.running_mean = mean
        bn.running_var = var
        name = self._module_name(b["running_mean"], "bn")
        tracked = _sibling(self.source, str(b["running_mean"].target), "num_batches_tracked")
        if isinstance(tracked, torch.Tensor):
            bn.num_batches_tracked = tracked
        new = self._replace(node, bn, name, (b["input"],))
        if legit:  # returns (out, save_mean, save_invstd): only getitem 0 may be used
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    self.graph.erase_node(user)
            if node.users:
                self.graph.erase_node(new)
                return
        else:
            node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    def run(self) -> fx.GraphModule:
        handlers: dict[Any, Callable[[fx.Node], None]] = {
            aten.linear.default: self.lift_linear,
            aten.batch_norm.default: lambda n: self.lift_batch_norm(n, legit=False),
            aten._native_batch_norm_legit_no_training.default: lambda n: self.lift_batch_norm(n, legit=True),
            aten.convolution.default: self.lift_conv,
            aten.addmm.default: self.lift_addmm,
        }
        handlers.update(dict.fromkeys(_CONV_OPS, self.lift_conv))
        for node in list(self.graph.nodes):
            if node.op == "call_module" and str(node.target) == "_guards_fn":
                self.graph.erase_node(node)
            elif node.op == "call_function" and node.target in handlers:
                handlers[node.target](node)
        # Attributes the graph still reads move to the new root under their own names.
        for node in list(self.graph.nodes):
            if node.op != "get_attr":
                continue
            if not node.users:
                self.graph.erase_node(node)
                continue
            attr: Any = self.source
            for part in str(node.target).split("."):
                attr = getattr(attr, part)
            if isinstance(attr, torch.Tensor | nn.Module):
                self._install(str(node.target), attr)
            else:
                raise BadInputError(
                    f"the exported program reads attribute '{node.target}' of an unsupported kind"
                )
        for node in self.graph.nodes:
            if node.op == "call_module" and not self._taken(str(node.target)):
                self._install(str(node.target), self.source.get_submodule(str(node.target)))
        _plain_io(self.graph)
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, "LiftedProgram")
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm.eval()  # the program was exported for inference: BatchNorm uses its running stats


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return (
        tensor
        if isinstance(tensor, nn.Parameter)
        else nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    )


def _sibling(root: nn.Module, target: str, name: str) -> Any:
    parent_path = target.rsplit(".", 1)[0] if "." in target else ""
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
    except AttributeError:
        return None
    return getattr(parent, name, None)


def _plain_io(graph: fx.Graph) -> None:
    """Use fx's plain calling convention; a one-tensor output tuple becomes the tensor itself."""
    graph._codegen = fx.graph.CodeGen()
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    result = output.args[0]
    if isinstance(result, list | tuple) and len(result) == 1 and isinstance(result[0], fx.Node):
        output.args = (result[0],)


def lift_program(program_module: fx.GraphModule) -> fx.GraphModule:
    """A module-level GraphModule computing what ``program_module`` (from ``ep.module()``) computes.

    The result is in eval mode (BatchNorm normalizes with its running statistics, as the
    exported ``batch_norm(training=False)`` calls did). The program's GraphModule is consumed: its graph is rewritten in place and its tensors
    are shared with the result.
    """
    return _Lifter(program_module).run()


def lift_exported(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """:func:`lift_program` on ``program.module()``."""
    module = program.module()
    if not isinstance(module, fx.GraphModule):
        raise BadInputError("the exported program did not unflatten to a GraphModule")
    return lift_program(module)
