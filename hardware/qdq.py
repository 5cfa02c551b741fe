"""What ONNX Runtime actually runs for a mixed float/int8 QDQ model: integer kernels and conversions.

ONNX Runtime fuses ``DequantizeLinear → op → QuantizeLinear`` into one integer kernel
(QLinearConv, QGemm, QLinearAdd, ...) only when the op's inputs *and its output* are
quantized. In a model where some layers stay float, three things follow that a per-layer
latency table, keyed by each layer's own (weight, input-activation) bits, does not see:

- a layer with 8-bit weights and an 8-bit input whose output is not quantized (the next
  layer keeps its input in float) runs the *float* kernel, not the integer one;
- a QuantizeLinear whose producer is not an integer kernel, and a DequantizeLinear whose
  consumer is not one, run as kernels of their own (a float/int8 boundary costs one pass over
  the tensor each way);
- the int8 weights of a layer that runs the float kernel are dequantized on every inference
  (ONNX Runtime does not constant-fold DequantizeLinear);
- a Conv or Gemm with float weights behind a quantized input would have its weights quantized
  by ONNX Runtime itself (``WeightBiasQuantization``: symmetric per-tensor int8) and run as an
  integer kernel; :func:`quant.insert.freeze` prevents that with a
  :class:`~quant.modules.FloatBoundary` (``Max(x, x)``) in front of such a layer, so the plan
  counts it as the float kernel it is exported as (the ``Max`` itself is not priced; HAQ on
  ort-cpu never exports such a layer, :func:`quant.haq.hardware_cost.int8_or_float`).

:func:`runs_int8` decides the first, :func:`standalone_conversions` lists the second and third
as signatures (:func:`hardware.single_layer.conversion_signature`) a latency table can measure.
Both read the IR with its quantizers and bit-widths set, as :func:`hardware.layers.layer_groups`
groups it; a test compares them with the nodes left in ONNX Runtime's optimized graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

from fxsculpt.hardware.layers import _FREE_MODULES, LayerGroup, LayerSignature, erased_source, layer_groups
from fxsculpt.hardware.single_layer import conversion_signature, is_int8
from fxsculpt.ir.constructs import Quantizer
from fxsculpt.ir.graph import IR


@dataclass
class KernelPlan:
    """A model as the runtime runs it: each group's kernel signature and the standalone conversions."""

    groups: list[LayerGroup]
    kernels: list[LayerSignature | None]  # per group: the signature it runs as (None: free)
    integer: list[bool]  # per group: whether that is an integer kernel
    conversions: list[LayerSignature]


class _View:
    """The IR with its modules looked up once (``get_submodule`` walks a dotted path every call)."""

    def __init__(self, ir: IR) -> None:
        self.ir = ir
        self.modules = dict(ir.gm.named_modules())

    def module(self, node: fx.Node) -> Any:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def quantizer_bits(self, node: fx.Node) -> tuple[bool, int | None]:
        """(whether ``node`` is an activation quantizer, its bits)."""
        module = self.module(node)
        if not isinstance(module, Quantizer) or module.role != "activation":
            return False, None
        return True, module.bits

    def uses(self, node: fx.Node) -> list[fx.Node]:
        """The nodes that read ``node``'s value, looking through identity and dropout modules."""
        out: list[fx.Node] = []
        for user in node.users:
            if isinstance(self.module(user), _FREE_MODULES):
                out.extend(self.uses(user))
            elif user not in out:
                out.append(user)
        return out

    def output_quantized(self, group: LayerGroup) -> bool:
        """Every use of the group's result goes through an 8-bit activation quantizer."""
        users = self.uses(group.fused[-1] if group.fused else group.main)
        return bool(users) and all(self.quantizer_bits(u) == (True, 8) for u in users)


def _group_index(groups: list[LayerGroup]) -> dict[fx.Node, int]:
    return {node: i for i, group in enumerate(groups) for node in [group.main, *group.fused]}


_WEIGHTED = ("conv", "linear")


def runs_int8(ir: IR, group: LayerGroup, view: _View | None = None) -> bool:
    """Whether ONNX Runtime runs ``group`` as an integer kernel: 8-bit inputs and weights
    (:func:`hardware.single_layer.is_int8`) and an 8-bit quantizer on its output."""
    if group.signature is None or not is_int8(group.signature):
        return False
    return (view or _View(ir)).output_quantized(group)


def _shape(ir: IR, node: fx.Node) -> tuple[int, ...] | None:
    shape = ir.meta(node).shape
    return tuple(shape) if shape is not None else None


def kernel_plan(ir: IR) -> KernelPlan:
    """Group ``ir`` as the runtime does and predict its kernels and standalone conversions."""
    view = _View(ir)
    groups = layer_groups(ir)
    index = _group_index(groups)
    integer = [runs_int8(ir, g, view) for g in groups]
    kernels: list[LayerSignature | None] = [
        None if g.signature is None else (g.signature if fast else g.signature.with_bits(None, None))
        for g, fast in zip(groups, integer, strict=True)
    ]

    def integer_at(node: fx.Node) -> bool:
        i = index.get(node)
        return i is not None and integer[i]

    conversions: list[LayerSignature] = []
    for node in ir.gm.graph.nodes:
        is_quantizer, bits = view.quantizer_bits(node)
        if not is_quantizer or bits is None:
            continue
        shape = _shape(ir, node)
        if shape is None:
            continue
        producer = erased_source(ir, node.all_input_nodes[0]) if node.all_input_nodes else None
        if producer is None or not integer_at(producer):
            conversions.append(conversion_signature("quantize", shape))
        consumers: list[int | None] = []
        for user in view.uses(node):  # ONNX Runtime gives every consumer its own DequantizeLinear
            i = index.get(user)
            if (i is None or not integer[i]) and (i is None or i not in consumers):
                consumers.append(i)
        conversions.extend(conversion_signature("dequantize", shape) for _ in consumers)
    for group, fast in zip(groups, integer, strict=True):
        if not fast:
            conversions.extend(_weight_conversions(view, group))
    return KernelPlan(groups, kernels, integer, conversions)


def _weight_conversions(view: _View, group: LayerGroup) -> list[LayerSignature]:
    """The DequantizeLinear of the int8 weight of a Conv/Gemm that runs the float kernel: it runs
    every inference. (A float weight that ONNX Runtime quantizes itself is folded back to a
    constant, and so is the int32 bias: neither leaves a kernel.)"""
    sig = group.signature
    if sig is None or sig.op not in _WEIGHTED or sig.weight_bits is None:
        return []
    module = view.module(group.main)
    weight = getattr(getattr(module, "layer", module), "weight", None)
    if weight is None:
        return []
    return [conversion_signature("dequantize_weight", tuple(weight.shape))]
