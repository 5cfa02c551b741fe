"""Layers as a runtime sees them: IR nodes grouped into kernels, each with a signature.

ONNX Runtime folds BatchNorm into the preceding convolution and fuses a following ReLU or
ReLU6 (Clip) into it (``FusedConv``; in QDQ models ``QLinearConv`` clamps), so the unit of
cost is not the fx node but the group *conv → [BatchNorm] → [activation]*. :func:`layer_groups`
forms those groups in graph order; :class:`LayerSignature` is what a latency table is keyed
by (op, input and output shapes, kernel, stride, padding, dilation, groups, bias, fused
activation, weight and activation bits).
"""

from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from fxsculpt.ir.constructs import Quantizer
from fxsculpt.ir.graph import IR

#: Modules and functions that cost nothing at inference (removed or folded by the exporter).
_FREE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.relu_}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
_MUL_FUNCTIONS = {operator.mul, torch.mul, operator.imul}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}


def compute_module(module: nn.Module) -> nn.Module:
    """The layer that does the work: a weight quantizer's wrapped Conv/Linear, else ``module``."""
    inner = getattr(module, "layer", None) if isinstance(module, Quantizer) else None
    return inner if isinstance(inner, nn.Conv2d | nn.Linear) else module


def is_free_module(module: nn.Module) -> bool:
    """Costs nothing at inference: identity, dropout, or an activation quantizer (its Q/DQ pair
    fuses into the neighbouring integer kernels)."""
    if isinstance(module, _FREE_MODULES):
        return True
    return isinstance(module, Quantizer) and compute_module(module) is module


def _module_at(ir: IR, node: fx.Node) -> nn.Module:
    return compute_module(ir.gm.get_submodule(str(node.target)))


@dataclass(frozen=True)
class LayerSignature:
    """What determines a layer's latency on a target; hashable and stable across runs."""

    op: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    act: str = ""  # fused activation: "", "relu" or "relu6"
    weight_bits: int | None = None
    act_bits: int | None = None
    extra: str = ""  # op-specific detail (second input shape, module fingerprint, ...)

    def key(self) -> str:
        """A canonical text form (JSON) of every field."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()[:20]

    def with_bits(self, weight_bits: int | None, act_bits: int | None) -> LayerSignature:
        return replace(self, weight_bits=weight_bits, act_bits=act_bits)

    def describe(self) -> str:
        bits = (
            "fp32"
            if self.weight_bits is None and self.act_bits is None
            else f"w{self.weight_bits or 'fp'}a{self.act_bits or 'fp'}"
        )
        act = f"+{self.act}" if self.act else ""
        shape = "x".join(map(str, self.in_shape))
        return f"{self.op}{act} {shape} {bits}"


@dataclass
class LayerGroup:
    """IR nodes that run as one kernel: ``main`` does the work, ``fused`` are folded into it."""

    main: fx.Node
    fused: list[fx.Node] = field(default_factory=list)
    signature: LayerSignature | None = None  # None: costs nothing (reshape-free ops, identity)
    module: nn.Module | None = None  # for fallback ops measured by exporting the module itself

    @property
    def names(self) -> list[str]:
        return [self.main.name] + [n.name for n in self.fused]


def _pair(value: Any, n: int = 2) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def _shape(ir: IR, node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    return ir.meta(node).shape


def _skip_free(ir: IR, node: fx.Node) -> fx.Node:
    """Follow single-user chains through nodes the exporter erases (identity, dropout).

    Quantizers are not skipped: a Q/DQ pair between a conv and its BatchNorm or activation
    stops ONNX Runtime from fusing them, so they are separate kernels.
    """
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(ir.gm.get_submodule(str(user.target)), _FREE_MODULES):
            node = user
            continue
        break
    return node


def activation_kind(ir: IR, node: fx.Node) -> str:
    """``"relu"``/``"relu6"`` when ``node`` is such an activation, else ``""``."""
    if node.op == "call_module":
        module = ir.gm.get_submodule(str(node.target))
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, nn.ReLU6) or (
            isinstance(module, nn.Hardtanh) and module.min_val == 0.0 and module.max_val == 6.0
        ):
            return "relu6"
    elif node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu"
    elif node.op == "call_function" and node.target is torch.nn.functional.relu6:
        return "relu6"
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return ""


def erased_source(ir: IR, node: fx.Node) -> fx.Node:
    """Follow ``node`` back through modules the exporter erases (identity, dropout) to the node
    whose value it passes on (a residual block's identity shortcut hands on its input)."""
    while (
        node.op == "call_module"
        and isinstance(ir.gm.get_submodule(str(node.target)), _FREE_MODULES)
        and len(node.all_input_nodes) == 1
    ):
        node = node.all_input_nodes[0]
    return node


def _next_single(ir: IR, node: fx.Node) -> fx.Node | None:
    node = _skip_free(ir, node)
    if len(node.users) != 1:
        return None
    return next(iter(node.users))


def _is_free(ir: IR, node: fx.Node) -> bool:
    if node.op == "call_module":
        return is_free_module(ir.gm.get_submodule(str(node.target)))
    if node.op == "call_function" and node.target is operator.getitem:
        return True
    return node.op == "call_method" and node.target == "contiguous"


def _bits(ir: IR, nodes: list[fx.Node]) -> tuple[int | None, int | None]:
    """Weight bits of the main node; activation bits of the first node in the group that sets them."""
    wbits = ir.meta(nodes[0]).weight_bits
    abits = next((ir.meta(n).act_bits for n in nodes if ir.meta(n).act_bits is not None), None)
    if abits is None:  # e.g. a residual add: quantized when every input comes from a quantizer
        inputs = [erased_source(ir, a) for a in nodes[0].all_input_nodes]  # through identity shortcuts
        sources = [
            ir.meta(a).act_bits
            for a in inputs
            if a.op == "call_module" and isinstance(ir.gm.get_submodule(str(a.target)), Quantizer)
        ]
        if sources and len(sources) == len(nodes[0].all_input_nodes) and len(set(sources)) == 1:
            abits = sources[0]
    return wbits, abits


def layer_groups(ir: IR) -> list[LayerGroup]:
    """The IR's compute nodes grouped as the runtime runs them, in graph order."""
    claimed: set[fx.Node] = set()
    groups: list[LayerGroup] = []
    for node in ir.gm.graph.nodes:
        if node in claimed or node.op not in ("call_module", "call_function", "call_method"):
            continue
        if _is_free(ir, node):
            continue
        group = LayerGroup(main=node)
        module = _module_at(ir, node) if node.op == "call_module" else None
        if isinstance(module, nn.Conv2d | nn.Linear):
            nxt = _next_single(ir, node)
            if (
                isinstance(module, nn.Conv2d)
                and nxt is not None
                and nxt.op == "call_module"
                and isinstance(ir.gm.get_submodule(str(nxt.target)), nn.BatchNorm2d)
            ):
                group.fused.append(nxt)
                nxt = _next_single(ir, nxt)
            if nxt is not None and activation_kind(ir, nxt):
                group.fused.append(nxt)
        elif _op_name(ir, node) in ("add", "bn", "mul"):
            nxt = _next_single(ir, node)
            if nxt is not None and activation_kind(ir, nxt):
                group.fused.append(nxt)
        claimed.update(group.fused)
        group.signature, group.module = _signature(ir, group)
        groups.append(group)
    return groups


def _op_name(ir: IR, node: fx.Node) -> str:
    if node.op == "call_module":
        module = _module_at(ir, node)
        if isinstance(module, nn.Conv2d):
            return "conv"
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.BatchNorm2d):
            return "bn"
        if activation_kind(ir, node):
            return activation_kind(ir, node)
        if isinstance(module, nn.MaxPool2d):
            return "maxpool"
        if isinstance(module, nn.AvgPool2d):
            return "avgpool"
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return "global_avgpool" if _pair(module.output_size) == (1, 1) else "module"
        if isinstance(module, nn.Flatten):
            return "reshape"
        return "module"
    if node.op == "call_function":
        if node.target in _ADD_FUNCTIONS:
            return "add"
        if node.target in _MUL_FUNCTIONS:
            return "mul"
        if node.target in _RESHAPE_FUNCTIONS:
            return "reshape"
        if node.target is torch.nn.functional.adaptive_avg_pool2d and _pair(node.args[1]) == (1, 1):
            return "global_avgpool"
        if activation_kind(ir, node):
            return activation_kind(ir, node)
        if node.target is torch.cat:
            return "concat"
        return "function"
    if node.op == "call_method":
        if node.target in _RESHAPE_METHODS:
            return "reshape"
        if node.target in ("add", "add_"):
            return "add"
        if node.target in ("mul", "mul_"):
            return "mul"
        if activation_kind(ir, node):
            return activation_kind(ir, node)
        return "function"
    return "function"


def _signature(ir: IR, group: LayerGroup) -> tuple[LayerSignature | None, nn.Module | None]:
    node = group.main
    op = _op_name(ir, node)
    tensor_args = [a for a in node.all_input_nodes if ir.meta(a).shape is not None]
    in_shape = _shape(ir, tensor_args[0]) if tensor_args else None
    last = group.fused[-1] if group.fused else node
    out_shape = _shape(ir, last)
    if in_shape is None or out_shape is None:
        return None, None
    act = next((activation_kind(ir, n) for n in group.fused if activation_kind(ir, n)), "")
    wbits, abits = _bits(ir, [node, *group.fused])
    base: dict[str, Any] = {"in_shape": in_shape, "out_shape": out_shape, "act": act}
    if op == "conv":
        conv = _module_at(ir, node)
        assert isinstance(conv, nn.Conv2d)
        if isinstance(conv.padding, str):
            return None, None
        has_bn = any(
            n.op == "call_module" and isinstance(ir.gm.get_submodule(str(n.target)), nn.BatchNorm2d)
            for n in group.fused
        )
        sig = LayerSignature(
            op="conv",
            kernel=_pair(conv.kernel_size),
            stride=_pair(conv.stride),
            padding=_pair(conv.padding),
            dilation=_pair(conv.dilation),
            groups=int(conv.groups),
            bias=conv.bias is not None or has_bn,
            weight_bits=wbits,
            act_bits=abits,
            **base,
        )
        return sig, None
    if op == "linear":
        linear = _module_at(ir, node)
        assert isinstance(linear, nn.Linear)
        return LayerSignature(
            op="linear", bias=linear.bias is not None, weight_bits=wbits, act_bits=abits, **base
        ), None
    if op in ("add", "mul"):
        shapes = [_shape(ir, a) for a in node.args if isinstance(a, fx.Node)]
        if len(shapes) != 2 or shapes[1] is None:
            return LayerSignature(op=op + "_scalar", act_bits=abits, **base), None
        return LayerSignature(op=op, extra="x".join(map(str, shapes[1])), act_bits=abits, **base), None
    if op in ("relu", "relu6", "bn", "global_avgpool", "reshape"):
        if op in ("relu", "relu6"):
            base["act"] = ""
        return LayerSignature(op=op, act_bits=abits, **base), None
    if op in ("maxpool", "avgpool"):
        pool = ir.gm.get_submodule(str(node.target))
        assert isinstance(pool, nn.MaxPool2d | nn.AvgPool2d)
        if getattr(pool, "ceil_mode", False) or (
            isinstance(pool, nn.MaxPool2d) and _pair(pool.dilation) != (1, 1)
        ):
            return _module_signature(ir, node, base, abits)
        return (
            LayerSignature(
                op=op,
                kernel=_pair(pool.kernel_size),
                stride=_pair(pool.stride if pool.stride is not None else pool.kernel_size),
                padding=_pair(pool.padding),
                act_bits=abits,
                **base,
            ),
            None,
        )
    if op == "concat":
        shapes = [_shape(ir, a) for a in node.all_input_nodes]
        return LayerSignature(op="concat", extra=json.dumps(shapes), act_bits=abits, **base), None
    if node.op == "call_module":
        return _module_signature(ir, node, base, abits)
    return None, None  # a function we cannot measure alone: left out of predictions (reported)


def _module_signature(
    ir: IR, node: fx.Node, base: dict[str, Any], abits: int | None
) -> tuple[LayerSignature, nn.Module]:
    module = ir.gm.get_submodule(str(node.target))
    fingerprint = hashlib.sha256(repr(module).encode()).hexdigest()[:12]
    base = dict(base, act="")
    sig = LayerSignature(op=f"module:{type(module).__name__}", extra=fingerprint, act_bits=abits, **base)
    return sig, module
