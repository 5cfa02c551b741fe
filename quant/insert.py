"""Put quantizers into the IR as graph nodes, set their bits, calibrate, freeze, and count size.

This is the API a mixed-precision method uses (uniform, DFQ here; HAQ reuses it):

1. :func:`insert_quantizers` wraps every Conv/Linear in a :class:`WeightQuantizer` (same node,
   same target) and adds an :class:`ActQuantizer` node after the model input and after every
   conv/linear output, ReLU-like op, add and average pool, so that the exported graph has a
   QuantizeLinear/DequantizeLinear pair on every tensor an integer kernel reads or writes
   (a conv followed only by a ReLU is quantized after the ReLU, which ONNX Runtime then drops).
2. :func:`set_bits` changes the widths (per layer name), :func:`calibrate` sets activation scales
   from real batches, a fine-tune trains the weights through the straight-through estimator,
   3. :func:`freeze` stores the weights on their grids, ready for :mod:`quant.export`, and puts a
   :class:`~quant.modules.FloatBoundary` in front of each float layer that reads a quantized
   activation, so that ONNX Runtime keeps that layer in float (:func:`isolate_float_layers`).

Every change is mirrored into ``NodeMeta.weight_bits`` / ``act_bits``: a layer's ``act_bits`` is
the width of the quantizer feeding its input (what BitOps multiplies by).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxsculpt.ir.graph import IR
from fxsculpt.quant.modules import WRAPPABLE, ActQuantizer, FloatBoundary, WeightQuantizer

RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS: tuple[Any, ...] = (F.relu, torch.relu, F.relu6)
RELU_METHODS = ("relu", "relu_")
ADD_FUNCTIONS: tuple[Any, ...] = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
MUL_FUNCTIONS: tuple[Any, ...] = (operator.mul, operator.imul, torch.mul)
MUL_METHODS = ("mul", "mul_")
SIGMOID_FUNCTIONS: tuple[Any, ...] = (torch.sigmoid, F.sigmoid)
SIGMOID_METHODS = ("sigmoid", "sigmoid_")
SILU_FUNCTIONS: tuple[Any, ...] = (F.silu,)
AVG_POOLS: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
#: Ops that keep a non-negative input non-negative and need no quantizer of their own (ONNX
#: Runtime moves the QDQ pair across them).
PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
)
PASS_THROUGH_FUNCTIONS: tuple[Any, ...] = (
    torch.flatten,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.chunk,
    torch.split,
    operator.getitem,
    F.max_pool2d,
    F.dropout,
)
PASS_THROUGH_METHODS = (
    "flatten",
    "view",
    "reshape",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "transpose",
    "permute",
    "chunk",
    "split",
)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def is_relu_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = _module(gm, node)
    if module is not None:
        return isinstance(module, RELU_MODULES)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in RELU_METHODS


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ADD_METHODS


def is_sigmoid(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = _module(gm, node)
    if module is not None:
        return isinstance(module, nn.Sigmoid)
    if node.op == "call_function":
        return node.target in SIGMOID_FUNCTIONS
    return node.op == "call_method" and node.target in SIGMOID_METHODS


def is_activation_product(ir: IR, node: fx.Node) -> bool:
    """A product of two float activations (a SiLU's ``x·sigmoid(x)``, a squeeze-excite gate), not a
    scaling by a parameter or a constant."""
    if node.op == "call_function":
        found = node.target in MUL_FUNCTIONS
    else:
        found = node.op == "call_method" and node.target in MUL_METHODS
    operands = node.args[:2]
    return (
        found
        and len(operands) == 2
        and all(
            isinstance(a, fx.Node) and a.op not in ("get_attr", "placeholder") and _is_float(ir, a)
            for a in operands
        )
    )


def _is_float(ir: IR, node: fx.Node) -> bool:
    dtype = ir.meta(node).dtype
    return dtype is None or dtype.startswith(("float", "bfloat"))


def split_silu(ir: IR) -> int:
    """Rewrite every SiLU (``nn.SiLU``, ``F.silu``) as ``x * sigmoid(x)``, the form whose two ops
    have integer kernels in ONNX Runtime (QLinearSigmoid, QLinearMul); returns how many."""
    gm = ir.gm
    found = [
        n
        for n in gm.graph.nodes
        if isinstance(_module(gm, n), nn.SiLU) or (n.op == "call_function" and n.target in SILU_FUNCTIONS)
    ]
    for node in found:
        x = node.args[0]
        with gm.graph.inserting_before(node):
            gate = gm.graph.call_function(torch.sigmoid, (x,))
            product = gm.graph.call_function(operator.mul, (x, gate))
        node.replace_all_uses_with(product)
        gm.graph.erase_node(node)
    if found:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        ir.propagate()
    return len(found)


def is_pass_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = _module(gm, node)
    if module is not None:
        return isinstance(module, PASS_THROUGH_MODULES)
    if node.op == "call_function":
        return node.target in PASS_THROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in PASS_THROUGH_METHODS


def layer_nodes(ir: IR) -> list[fx.Node]:
    """Conv/Linear nodes, wrapped or not, in graph order: the layers whose weights get bits."""
    found = []
    for node in ir.gm.graph.nodes:
        module = _module(ir.gm, node)
        if isinstance(module, (WeightQuantizer, *WRAPPABLE)):
            found.append(node)
    return found


def weight_quantizers(ir: IR) -> dict[str, WeightQuantizer]:
    """Layer node name → its :class:`WeightQuantizer`."""
    out = {}
    for node in layer_nodes(ir):
        module = _module(ir.gm, node)
        if isinstance(module, WeightQuantizer):
            out[node.name] = module
    return out


def act_quantizers(ir: IR) -> dict[str, ActQuantizer]:
    """Quantizer node name → its :class:`ActQuantizer`, in graph order."""
    return {n.name: m for n in ir.gm.graph.nodes if isinstance(m := _module(ir.gm, n), ActQuantizer)}


def resolve_layer_names(ir: IR, names: Iterable[str]) -> set[str]:
    """Map user-given layer names (node names or module paths such as ``layer1.0.conv1``) to nodes.

    Raises ``KeyError`` naming the first unknown one.
    """
    by_target = {str(n.target): n.name for n in layer_nodes(ir)}
    node_names = {n.name for n in layer_nodes(ir)}
    resolved = set()
    for name in names:
        if name in node_names:
            resolved.add(name)
        elif name in by_target:
            resolved.add(by_target[name])
        else:
            raise KeyError(name)
    return resolved


@dataclass
class Site:
    """Where an activation quantizer goes: after ``node``, signed or not."""

    node: fx.Node
    signed: bool


CONCAT_FUNCTIONS: tuple[Any, ...] = (torch.cat, torch.concat)
#: Modules that are the identity at inference: looked through when asking who consumes a value.
TRANSPARENT_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout)


def is_concat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CONCAT_FUNCTIONS


def is_avg_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), AVG_POOLS) or (
        node.op == "call_function" and node.target in (F.avg_pool2d, F.adaptive_avg_pool2d)
    )


def consumers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The users of ``node``'s value, looking through identity modules (timm's ``drop``, ``aa``, …)."""
    found: list[fx.Node] = []
    for user in node.users:
        if isinstance(_module(gm, user), TRANSPARENT_MODULES):
            found.extend(consumers(gm, user))
        else:
            found.append(user)
    return found


def nonnegative_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose output is never negative: ReLU-like ops, and adds, concats, average pools and
    pass-through ops of such values (their quantizers are unsigned)."""
    nonneg: set[fx.Node] = set()
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if is_relu_like(gm, node):
            nonneg.add(node)
        elif is_add(node) or is_concat(node):
            if inputs and all(a in nonneg for a in inputs):
                nonneg.add(node)
        elif (is_avg_pool(gm, node) or is_pass_through(gm, node)) and inputs and inputs[0] in nonneg:
            nonneg.add(node)
    return nonneg


def activation_sites(ir: IR, elementwise: bool = False) -> list[Site]:
    """The nodes whose outputs get an activation quantizer (see the module docstring).

    After the model input: every conv/linear output (unless a ReLU-like op is its only consumer,
    which is quantized instead, so the pair fuses), every ReLU-like op, add, concatenation and
    average pool; with ``elementwise`` also every sigmoid (unsigned: its range is [0, 1]) and every
    product of two activations, so that ONNX Runtime runs them on QLinearSigmoid / QLinearMul.
    Layers whose input is still not quantized after these (it comes from an op with
    no integer kernel: a sigmoid gate, a hard-swish, a channel shuffle) get one more in
    :func:`insert_quantizers`, so that every quantized layer runs on an integer kernel.
    """
    gm = ir.gm
    nonneg = nonnegative_nodes(gm)
    sites: list[Site] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if placeholders:
        sites.append(Site(placeholders[0], signed=True))
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        module = _module(gm, node)
        if isinstance(module, ActQuantizer):
            continue
        if not _is_float(ir, node):
            continue  # integer or boolean tensors (position ids, masks) carry no activations
        users = consumers(gm, node)
        only_relu = len(users) == 1 and is_relu_like(gm, users[0])
        sigmoid = elementwise and is_sigmoid(gm, node)
        always = is_relu_like(gm, node) or is_avg_pool(gm, node) or sigmoid
        unless_relu = isinstance(module, (WeightQuantizer, *WRAPPABLE)) or is_add(node) or is_concat(node)
        unless_relu = unless_relu or (elementwise and is_activation_product(ir, node))
        if always or (unless_relu and not only_relu):
            sites.append(Site(node, signed=node not in nonneg and not sigmoid))
    return sites


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, index = base, 1
    taken = dict(gm.named_modules())
    while name in taken or hasattr(gm, name):
        index += 1
        name = f"{base}_{index}"
    return name


def _wrap(
    gm: fx.GraphModule, node: fx.Node, bits: int | None, per_channel: bool, reduce_range: bool
) -> WeightQuantizer:
    target = str(node.target)
    layer = gm.get_submodule(target)
    if isinstance(layer, WeightQuantizer):
        layer.bits = bits
        layer.reduce_range = reduce_range
        return layer
    wrapper = WeightQuantizer(layer, bits, per_channel, reduce_range)
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, wrapper)
    return wrapper


def insert_quantizers(
    ir: IR,
    weight_bits: Mapping[str, int | None],
    act_bits: int | None = 8,
    per_channel: bool = True,
    keep_float: Iterable[str] = (),
    quantize_output: bool = False,
    reduce_range: bool = False,
    elementwise: bool = False,
    affine: bool = False,
) -> None:
    """Wrap every layer in ``weight_bits`` (node name → width or ``None``) and add activation nodes.

    ``elementwise`` also quantizes sigmoids and products of activations, SiLUs split into
    ``x * sigmoid(x)`` first (:func:`split_silu`; see :func:`activation_sites`).

    Layers in ``keep_float`` (node names) keep float weights, and the activation quantizers that
    would feed only them, or sit right after them, are left out. Idempotent per layer.

    The model's output (the logits) stays float unless ``quantize_output``: an 8-bit quantizer
    there lets ONNX Runtime run the last Linear as QGemm, but rounds the logits to 255 levels, so
    near-tied predictions flip between PyTorch and the integer kernels (98.8% top-1 agreement
    measured on digits); without it the last layer runs as DequantizeLinear → Gemm on its int8
    weights, a negligible cost for a classifier head.

    ``reduce_range`` gives 8-bit weights the codes ±63 (see :class:`WeightQuantizer`): needed on
    targets whose int8 kernels saturate (:meth:`hardware.targets.Target.int8_dot_saturates`).

    ``affine`` gives signed activation quantizers affine 8-bit codes over their calibrated
    ``[min, max]`` (see :class:`ActQuantizer`) instead of symmetric ones.
    """
    gm = ir.gm
    keep = set(keep_float)
    for node in layer_nodes(ir):
        if node.name in keep:
            continue
        _wrap(gm, node, weight_bits.get(node.name), per_channel, reduce_range)
    if not act_quantizers(ir):
        if elementwise:
            split_silu(ir)
        for site in activation_sites(ir, elementwise):
            users = list(site.node.users)
            layer_users = {u.name for u in users}
            if site.node.name in keep or (users and layer_users <= keep):
                continue
            if not quantize_output and any(u.op == "output" for u in users):
                continue
            name = _free_name(gm, f"{site.node.name}_aq")
            gm.add_submodule(name, ActQuantizer(act_bits, signed=site.signed, affine=affine))
            anchor = site.node
            if anchor.op == "placeholder":
                anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
            with gm.graph.inserting_after(anchor):
                new = gm.graph.call_module(name, (site.node,))
            site.node.replace_all_uses_with(new, delete_user_cb=_not(new))
        _quantize_layer_inputs(ir, act_bits, keep, affine)
    gm.graph.lint()
    gm.recompile()
    ir.propagate()
    update_meta(ir)


def _quantize_layer_inputs(ir: IR, act_bits: int | None, keep: set[str], affine: bool = False) -> None:
    """An activation quantizer in front of every quantized layer whose input is still float.

    Its input then comes from an op without an integer kernel of its own (sigmoid gates, hard-swish,
    GELU, a channel shuffle's transpose): quantizing that value lets ONNX Runtime run the layer
    itself on its integer kernel instead of on dequantized weights.
    """
    gm = ir.gm
    nonneg = nonnegative_nodes(gm)
    for node in layer_nodes(ir):
        if node.name in keep or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        feed = node.args[0]
        if _quantizer_of(ir, feed) is not None or feed.op == "placeholder":
            continue
        name = _free_name(gm, f"{feed.name}_aq")
        gm.add_submodule(name, ActQuantizer(act_bits, signed=feed not in nonneg, affine=affine))
        with gm.graph.inserting_after(feed):
            new = gm.graph.call_module(name, (feed,))
        feed.replace_all_uses_with(new, delete_user_cb=_not_output(new))


def _not_output(excluded: fx.Node) -> Callable[[fx.Node], bool]:
    """Like :func:`_not`, and the model's output keeps the float value (the logits stay float)."""
    return lambda user: user is not excluded and user.op != "output"


def _not(excluded: fx.Node) -> Callable[[fx.Node], bool]:
    """A ``delete_user_cb`` that rewires every user except ``excluded`` (the new quantizer)."""
    return lambda user: user is not excluded


def set_bits(
    ir: IR,
    weight_bits: Mapping[str, int | None] | None = None,
    act_bits: Mapping[str, int | None] | int | None = None,
) -> None:
    """Change widths in place: ``weight_bits`` by layer node name, ``act_bits`` by quantizer node
    name (or one width for all). Names not given keep their width; ``None`` means float."""
    wq = weight_quantizers(ir)
    for name, bits in (weight_bits or {}).items():
        if name not in wq:
            raise KeyError(f"no quantized layer named '{name}'")
        wq[name].set_group_bits([bits]) if bits is not None else _to_float(wq[name])
    aq = act_quantizers(ir)
    if isinstance(act_bits, int):
        for module in aq.values():
            module.bits = act_bits
    elif act_bits is not None:
        for name, bits in act_bits.items():
            if name not in aq:
                raise KeyError(f"no activation quantizer named '{name}'")
            aq[name].bits = bits
    update_meta(ir)


def _to_float(module: WeightQuantizer) -> None:
    module.bits, module.group_bits, module.bit_logits, module.frozen = None, None, None, False


def input_quantizer(ir: IR, node: fx.Node) -> ActQuantizer | None:
    """The activation quantizer feeding ``node``'s first input, looking through pass-through ops.

    A :class:`FloatBoundary` in front of ``node`` ends the search (None): the layer behind it reads
    its input in float, which is what ONNX Runtime runs (see :func:`isolate_float_layers`).
    """
    return _quantizer_of(ir, node.all_input_nodes[0]) if node.all_input_nodes else None


def _quantizer_of(ir: IR, value: fx.Node) -> ActQuantizer | None:
    """The activation quantizer whose output ``value`` is, directly or through pass-through ops."""
    current: fx.Node | None = value
    while current is not None:
        module = _module(ir.gm, current)
        if isinstance(module, ActQuantizer):
            return module
        if not is_pass_through(ir.gm, current) or not current.all_input_nodes:
            return None
        current = current.all_input_nodes[0]
    return None


def is_float_layer(module: nn.Module | None) -> bool:
    """A Conv/Linear that computes with float weights: never wrapped, or wrapped at ``bits=None``."""
    if isinstance(module, WeightQuantizer):
        return module.bits is None
    return isinstance(module, WRAPPABLE)


def isolate_float_layers(ir: IR) -> list[str]:
    """Put a :class:`FloatBoundary` in front of every float layer that reads a quantized activation.

    Without it ONNX Runtime quantizes such a layer's float weights to int8 itself and runs it on
    an integer kernel (see :class:`FloatBoundary`), so a layer kept in float (``keep_float``, or
    bits ``None``) would not be float in the exported model. The boundary is an exact identity, so
    the PyTorch model computes what it did; the layer's ``act_bits`` becomes float, as ONNX Runtime
    then runs it. A boundary in front of a layer that is quantized again (its bits changed since),
    or whose input is no longer quantized, is removed: there it would stop ONNX Runtime's fusion.
    Idempotent; returns the names of the layers behind a boundary.
    """
    gm = ir.gm
    changed = False
    isolated = []
    for node in layer_nodes(ir):
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            continue
        has_boundary = isinstance(_module(gm, first), FloatBoundary)
        feed = first.all_input_nodes[0] if has_boundary else first
        source = _quantizer_of(ir, feed)
        wanted = is_float_layer(_module(gm, node)) and source is not None and source.bits is not None
        if wanted:
            isolated.append(node.name)
        if wanted and not has_boundary:
            name = _free_name(gm, f"{node.name}_float_input")
            gm.add_submodule(name, FloatBoundary())
            with gm.graph.inserting_before(node):
                boundary = gm.graph.call_module(name, (first,))
            node.replace_input_with(first, boundary)
            changed = True
        elif has_boundary and not wanted:
            node.replace_input_with(first, feed)
            if not first.users:
                gm.graph.erase_node(first)
                gm.delete_submodule(str(first.target))
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
        ir.propagate()
    return isolated


def update_meta(ir: IR) -> None:
    """Write the quantizers' widths into ``NodeMeta`` (layers: weight and input-activation bits)."""
    for node in ir.gm.graph.nodes:
        module = _module(ir.gm, node)
        if isinstance(module, ActQuantizer):
            ir.meta(node).act_bits = module.bits
        elif isinstance(module, WeightQuantizer):
            meta = ir.meta(node)
            meta.weight_bits = module.bits
            source = input_quantizer(ir, node)
            meta.act_bits = source.bits if source is not None else None
            if module.group_bits is not None:
                meta.extra["weight_bits_per_group"] = list(module.group_bits)
            else:
                meta.extra.pop("weight_bits_per_group", None)
            meta.extra["weight_size_bits"] = module.size_bits()


def calibration_method(method: str, bits: int | None) -> str:
    """``auto`` means KL below 5 bits (as HAQ) and min/max otherwise."""
    if method != "auto":
        return method
    return "kl" if bits is not None and bits < 5 else "minmax"


def calibrate(
    ir: IR, batches: Iterable[torch.Tensor], method: str = "auto", percentile: float = 99.99
) -> dict[str, float]:
    """Run ``batches`` through the model in eval mode and set every activation scale.

    Weights are quantized as set while observing, so each activation scale sees the values it
    will see at inference. Returns quantizer name → threshold.
    """
    quantizers = act_quantizers(ir)
    for q in quantizers.values():
        q.start_observing()
    was_training = ir.gm.training
    ir.gm.eval()
    device = ir.device
    try:
        with torch.no_grad():
            for x in batches:
                ir.gm(x.to(device))
    finally:
        ir.gm.train(was_training)
    thresholds = {}
    for name, q in quantizers.items():
        thresholds[name] = q.calibrate(calibration_method(method, q.bits), percentile)
    return thresholds


def freeze(ir: IR) -> None:
    """Snap every quantized weight onto its grid (the exported form) and refresh the metadata.

    Each layer's bias goes onto the int32 grid of its input scale times its weight scales, as the
    integer kernels (and ONNX Runtime's rewrite of a float bias) have it, so that the exported file
    computes what the PyTorch model does (:meth:`WeightQuantizer.freeze`). Calibrate first: the
    grid depends on the input's activation scale. Layers left in float get a
    :class:`FloatBoundary` in front when they read a quantized activation
    (:func:`isolate_float_layers`), so that they stay float in ONNX Runtime.
    """
    isolate_float_layers(ir)  # first: a quantized layer must see its input quantizer for its bias
    for name, module in weight_quantizers(ir).items():
        node = next(n for n in ir.gm.graph.nodes if n.name == name)
        source = input_quantizer(ir, node)
        input_scale = source.scale if source is not None and source.bits is not None else None
        module.freeze(input_scale)
    update_meta(ir)


def model_size_bits(ir: IR) -> int:
    """Exact storage: quantized layers by :meth:`WeightQuantizer.size_bits`, every other weight at 32."""
    total = 0
    wrapped = weight_quantizers(ir)
    inside: set[int] = set()
    for module in wrapped.values():
        total += module.size_bits()
        inside.update(id(p) for p in module.layer.parameters())
    arch = {id(p) for p in ir.arch_parameters()}
    for param in ir.gm.parameters():
        if id(param) not in inside and id(param) not in arch:
            total += 32 * param.numel()
    return total


def bits_table(ir: IR) -> list[dict[str, Any]]:
    """One row per layer: name, op, params, MACs, weight bits (per group if mixed), input act bits, KB."""
    rows = []
    for node in layer_nodes(ir):
        module = _module(ir.gm, node)
        meta = ir.meta(node)
        layer = module.layer if isinstance(module, WeightQuantizer) else module
        if isinstance(module, WeightQuantizer):
            bits: Any = module.group_bits if module.group_bits is not None else module.bits
            size_bits = module.size_bits()
            source = input_quantizer(ir, node)
            act = source.bits if source is not None else None
        else:
            bits, act = None, None
            size_bits = 32 * sum(p.numel() for p in layer.parameters()) if layer is not None else 0
        rows.append(
            {
                "layer": node.name,
                "op": type(layer).__name__,
                "params": meta.params,
                "macs": meta.macs,
                "weight_bits": bits if bits is not None else "float",
                "act_bits": act if act is not None else "float",
                "size_kb": round(size_bits / 8 / 1024, 3),
            }
        )
    return rows
