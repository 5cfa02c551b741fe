"""Channel-dependency analysis over an fx graph: which channels are zero, which move together.

Removing a channel from a tensor is only possible when every layer that touches it agrees:
a residual add ties the channels of its operands (channel c of ``a + b`` needs channel c of
both), a concatenation places its operands' channels at offsets, a depthwise or grouped
convolution ties a group of input channels to its group of output channels, BatchNorm and
activations carry channel c straight through, ``flatten`` spreads channel c over ``H·W``
features. Convolutions with ``groups == 1`` and Linear layers are *cuts*: their output
channels are new ones, and an input channel they read can be dropped from their weights
exactly when it is zero (or their weights for it are zero).

The analysis works on *atoms* ``(node, channel)``: a union-find joins the atoms that must be
kept or removed together (Sparse Structure Selection, Huang & Wang 2018, section 3.2 prunes
residual blocks and groups; the tie rules above are what that needs on an arbitrary graph).
A class of atoms can be removed when no atom in it is pinned (a graph input or output, or
touched by an op the analysis does not understand) and every cut that reads one of its
atoms sees a zero there. Zeros come from :func:`zero_masks`, a forward propagation of
"this channel is identically zero" from gates whose λ is 0.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR

# -- op classification ---------------------------------------------------------------------

#: Modules that map each channel to itself and 0 to 0.
ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.SiLU,
    nn.GELU,
    nn.Tanh,
    nn.ELU,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
#: Modules that map each channel to itself but not 0 to 0.
CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)

ZERO_PRESERVING_FUNCTIONS: set[Any] = {
    torch.relu,
    F.relu,
    F.relu6,
    F.hardtanh,
    F.hardswish,
    F.silu,
    F.gelu,
    F.leaky_relu,
    F.elu,
    torch.tanh,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
CHANNELWISE_FUNCTIONS: set[Any] = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "detach"}
CHANNELWISE_METHODS = {"sigmoid"}
ADD_TARGETS: set[Any] = {operator.add, operator.iadd, torch.add}
MUL_TARGETS: set[Any] = {operator.mul, operator.imul, torch.mul}
#: ``x.size(0)`` and friends only read the batch size: no channel constraint.
SHAPE_METHODS = {"size", "dim"}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def is_cut_conv(module: nn.Module | None) -> bool:
    """A Conv (not transposed) with one group: output channels are independent of input channels."""
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1


def is_grouped_conv(module: nn.Module | None) -> bool:
    """A depthwise or grouped Conv: group g of inputs feeds only group g of outputs."""
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups > 1


def classify(gm: fx.GraphModule, node: fx.Node) -> str:
    """The analysis's name for what ``node`` does to channels (``"unknown"`` pins them)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    module = _module(gm, node)
    if module is not None:
        if is_cut_conv(module):
            return "conv"
        if is_grouped_conv(module):
            return "grouped_conv"
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "bn"
        if isinstance(module, Gate):
            return "gate"
        if isinstance(module, ZERO_PRESERVING_MODULES):
            return "zero_preserving"
        if isinstance(module, CHANNELWISE_MODULES):
            return "channelwise"
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return "flatten"
        return "unknown"
    target = node.target
    if node.op == "call_function":
        if target in ZERO_PRESERVING_FUNCTIONS:
            return "zero_preserving"
        if target in CHANNELWISE_FUNCTIONS:
            return "channelwise"
        if target in ADD_TARGETS:
            return "add"
        if target in MUL_TARGETS:
            return "mul"
        if target is torch.cat:
            return "cat"
        if target is torch.flatten:
            return "flatten"
        if target is torch.mean:
            return "mean"
        if getattr(target, "__name__", "") == "zeros_batch":
            return "zeros"
        return "unknown"
    if node.op == "call_method":
        if target in ZERO_PRESERVING_METHODS:
            return "zero_preserving"
        if target in CHANNELWISE_METHODS:
            return "channelwise"
        if target in ("add", "add_"):
            return "add"
        if target in ("mul", "mul_"):
            return "mul"
        if target == "flatten":
            return "flatten"
        if target == "mean":
            return "mean"
        if target in SHAPE_METHODS:
            return "shape"
        return "unknown"
    return "unknown"


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def reduced_dims(node: fx.Node) -> list[int] | None:
    dims = _arg(node, 1, "dim", None)
    if dims is None:
        return None
    return [int(d) for d in (dims if isinstance(dims, list | tuple) else [dims])]


def cat_dim(node: fx.Node) -> int:
    return int(_arg(node, 1, "dim", 0))


def node_inputs(node: fx.Node) -> list[fx.Node]:
    """Every node ``node`` reads, in argument order, without repeats."""
    found: list[fx.Node] = []

    def visit(n: fx.Node) -> fx.Node:
        if n not in found:
            found.append(n)
        return n

    fx.node.map_arg((node.args, node.kwargs), visit)
    return found


def input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from a graph input: the tensors that carry the batch dimension.

    Shapes are propagated at batch 1, so a parameter broadcast into an add (a ViT's position
    embedding) looks like the add's own shape; only these nodes can stand in for the add.
    """
    found: set[fx.Node] = set()
    for node in graph.nodes:  # topological order
        if node.op == "placeholder" or any(n in found for n in node_inputs(node)):
            found.add(node)
    return found


# -- the analysis ----------------------------------------------------------------------------


@dataclass
class ChannelAnalysis:
    """Atoms, their classes, pins, zero masks and the cut readers of every channel tensor."""

    ir: IR
    channels: dict[fx.Node, int] = field(default_factory=dict)
    base: dict[fx.Node, int] = field(default_factory=dict)
    parent: list[int] = field(default_factory=list)
    pinned: set[int] = field(default_factory=set)
    zero: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    kinds: dict[fx.Node, str] = field(default_factory=dict)

    # union-find
    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def atom(self, node: fx.Node, channel: int) -> int:
        return self.base[node] + channel

    def has_channels(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.base

    def pin_node(self, node: Any) -> None:
        if self.has_channels(node):
            for c in range(self.channels[node]):
                self.pinned.add(self.atom(node, c))

    def tie(self, a: fx.Node, b: fx.Node) -> bool:
        """Join channel c of ``a`` with channel c of ``b``; False when the counts differ."""
        if not (self.has_channels(a) and self.has_channels(b)) or self.channels[a] != self.channels[b]:
            return False
        for c in range(self.channels[a]):
            self.union(self.atom(a, c), self.atom(b, c))
        return True

    def class_of(self, node: fx.Node, channel: int) -> int:
        return self.find(self.atom(node, channel))

    def class_vector(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.class_of(node, c) for c in range(self.channels[node]))

    def pinned_classes(self) -> set[int]:
        return {self.find(a) for a in self.pinned}


def _shape(ir: IR, node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("sculpt")
    return getattr(meta, "shape", None)


def analyze(ir: IR, with_zeros: bool = True) -> ChannelAnalysis:
    """Build the atom classes of ``ir`` (propagated) and, optionally, its zero masks."""
    gm = ir.gm
    ana = ChannelAnalysis(ir)
    total = 0
    for node in gm.graph.nodes:
        ana.kinds[node] = classify(gm, node)
        shape = _shape(ir, node)
        if shape is not None and len(shape) >= 2 and node.op != "output":
            ana.channels[node] = int(shape[1])
            ana.base[node] = total
            total += int(shape[1])
    ana.parent = list(range(total))
    module_calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module_calls.setdefault(str(node.target), []).append(node)
        _tie_node(ana, node)
    # A module called at several places has one weight: its channels are one set everywhere.
    for calls in module_calls.values():
        for other in calls[1:]:
            ok = ana.tie(calls[0], other)
            first_in, other_in = (
                calls[0].args[0] if calls[0].args else None,
                other.args[0] if other.args else None,
            )
            if isinstance(first_in, fx.Node) and isinstance(other_in, fx.Node):
                ok = ana.tie(first_in, other_in) and ok
            if not ok:
                for n in calls:
                    ana.pin_node(n)
                    for i in node_inputs(n):
                        ana.pin_node(i)
    if with_zeros:
        ana.zero = zero_masks(ir, ana)
    return ana


def _tie_node(ana: ChannelAnalysis, node: fx.Node) -> None:
    """Apply the tie rule of ``node``'s kind; pin what the rule cannot describe."""
    kind = ana.kinds[node]
    gm = ana.ir.gm
    inputs = node_inputs(node)
    if kind in ("placeholder", "get_attr"):
        ana.pin_node(node)
        return
    if kind == "output":
        for n in inputs:
            ana.pin_node(n)
        return
    if kind == "shape":
        dim = _arg(node, 1, "dim", None)
        if node.target == "size" and dim == 0:
            return
        if node.target == "dim":
            return
        for n in inputs:
            ana.pin_node(n)
        return
    if kind == "zeros":
        return  # a producer of zeros; its size argument is rewritten with the channels
    first = node.args[0] if node.args else None
    if kind in ("conv", "linear"):
        extra = [n for n in inputs if n is not first]
        for n in extra:
            ana.pin_node(n)
        if (
            kind == "linear"
            and isinstance(first, fx.Node)
            and ana.has_channels(first)
            and len(_shape(ana.ir, first) or ()) != 2
        ):
            ana.pin_node(first)  # Linear over the last dim of a >2-D tensor: not channels
            ana.pin_node(node)
        return
    if kind == "grouped_conv":
        module = _module(gm, node)
        assert isinstance(module, nn.modules.conv._ConvNd)
        if not (ana.has_channels(first) and ana.has_channels(node)) or len(inputs) != 1:
            _pin_all(ana, node, inputs)
            return
        assert isinstance(first, fx.Node)
        groups = module.groups
        cin, cout = ana.channels[first] // groups, ana.channels[node] // groups
        for g in range(groups):
            anchor = ana.atom(first, g * cin)
            for i in range(cin):
                ana.union(anchor, ana.atom(first, g * cin + i))
            for j in range(cout):
                ana.union(anchor, ana.atom(node, g * cout + j))
        return
    if kind in ("bn", "gate", "zero_preserving", "channelwise"):
        extra = [n for n in inputs if n is not first]
        if extra or not isinstance(first, fx.Node) or not ana.tie(first, node):
            _pin_all(ana, node, inputs)
        return
    if kind == "mean":
        dims = reduced_dims(node)
        shape = _shape(ana.ir, first) if isinstance(first, fx.Node) else None
        rank = len(shape) if shape else 0
        if (
            dims is None
            or any((d % rank if rank else d) in (0, 1) for d in dims)
            or not isinstance(first, fx.Node)
            or not ana.tie(first, node)
        ):
            _pin_all(ana, node, inputs)
        return
    if kind == "flatten":
        if node.op == "call_module":
            start, end = 1, -1
        else:
            start, end = int(_arg(node, 1, "start_dim", 0)), int(_arg(node, 2, "end_dim", -1))
        if start != 1 or end != -1 or not (ana.has_channels(first) and ana.has_channels(node)):
            _pin_all(ana, node, inputs)
            return
        assert isinstance(first, fx.Node)
        per = ana.channels[node] // ana.channels[first]
        for c in range(ana.channels[first]):
            for k in range(per):
                ana.union(ana.atom(first, c), ana.atom(node, c * per + k))
        return
    if kind in ("add", "mul"):
        if not ana.has_channels(node):
            _pin_all(ana, node, inputs)
            return
        out_rank = len(_shape(ana.ir, node) or ())
        for operand in inputs:
            shape = _shape(ana.ir, operand)
            if (
                shape is not None
                and len(shape) == out_rank
                and ana.channels.get(operand) == ana.channels[node]
            ):
                ana.tie(operand, node)
            elif shape is not None and (len(shape) == 0 or (len(shape) == out_rank and shape[1] == 1)):
                continue  # a scalar or a channel-broadcast operand: no channel of its own
            else:
                ana.pin_node(operand)
                ana.pin_node(node)
        return
    if kind == "cat":
        dim = cat_dim(node)
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        rank = len(_shape(ana.ir, node) or ())
        if (
            dim % max(rank, 1) != 1
            or not isinstance(parts, list | tuple)
            or not all(ana.has_channels(p) for p in parts)
            or not ana.has_channels(node)
        ):
            _pin_all(ana, node, inputs)
            return
        offset = 0
        for part in parts:
            assert isinstance(part, fx.Node)
            for c in range(ana.channels[part]):
                ana.union(ana.atom(part, c), ana.atom(node, offset + c))
            offset += ana.channels[part]
        return
    _pin_all(ana, node, inputs)


def _pin_all(ana: ChannelAnalysis, node: fx.Node, inputs: Iterable[fx.Node]) -> None:
    ana.pin_node(node)
    for n in inputs:
        ana.pin_node(n)


# -- zeros ---------------------------------------------------------------------------------


def bn_shift(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """What eval-mode BatchNorm outputs for a zero input: ``β − μ γ / sqrt(σ² + ε)``."""
    n = bn.num_features
    device = next((t.device for t in bn.parameters()), torch.device("cpu"))
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(n, device=device)
    var = bn.running_var if bn.running_var is not None else torch.ones(n, device=device)
    gamma = bn.weight if bn.weight is not None else torch.ones(n, device=device)
    beta = bn.bias if bn.bias is not None else torch.zeros(n, device=device)
    return (beta - mean * gamma / torch.sqrt(var + bn.eps)).detach()


def _in_features(module: nn.Module) -> int:
    """Input channels of a Conv/Linear: its weight's second dimension times its groups."""
    assert isinstance(module.weight, torch.Tensor)
    return int(module.weight.shape[1]) * int(getattr(module, "groups", 1))


def _layer_zero_outputs(module: nn.Module, zero_in: torch.Tensor) -> torch.Tensor:
    """Output channels of a Conv/Linear that are zero given which input channels are zero."""
    assert isinstance(module.weight, torch.Tensor)
    weight = module.weight.detach()
    cout = weight.shape[0]
    groups = getattr(module, "groups", 1)
    per_in = weight.shape[1]
    per_out = cout // groups
    live = (~zero_in).reshape(groups, per_in)  # live inputs of each group
    nonzero = weight.reshape(cout, per_in, -1).abs().amax(dim=2) != 0  # [cout, per_in]
    group_of = torch.arange(cout, device=weight.device) // per_out
    reads_live = (nonzero & live.to(weight.device)[group_of]).any(dim=1)
    bias = getattr(module, "bias", None)
    has_bias = bias is not None and bias.detach() != 0
    return (~reads_live & ~(has_bias if isinstance(has_bias, torch.Tensor) else torch.tensor(False))).cpu()


def zero_masks(ir: IR, ana: ChannelAnalysis) -> dict[fx.Node, torch.Tensor]:
    """For every channel tensor, a bool mask of the channels that are identically zero.

    Forward rules: a gate zeroes the channels whose λ is 0; activations with f(0) = 0, pooling
    and dropout keep zeros; eval-mode BatchNorm keeps a zero only where its shift is 0; a
    Conv/Linear output channel is zero when it reads no live input through a nonzero weight and
    has no bias; ``a + b`` is zero where both are, ``a · b`` where either is; ``cat`` and
    ``flatten`` move the masks. Anything else is assumed nonzero.
    """
    gm = ir.gm
    zero: dict[fx.Node, torch.Tensor] = {}

    def mask(n: Any) -> torch.Tensor | None:
        return zero.get(n) if isinstance(n, fx.Node) else None

    for node in gm.graph.nodes:
        if not ana.has_channels(node):
            continue
        c = ana.channels[node]
        out = torch.zeros(c, dtype=torch.bool)
        kind = ana.kinds[node]
        first = node.args[0] if node.args else None
        m_in = mask(first)
        module = _module(gm, node)
        if kind == "zeros":
            out = torch.ones(c, dtype=torch.bool)
        elif kind == "gate" and m_in is not None and isinstance(module, Gate):
            scale = module.channel_scale().detach().cpu()
            out = m_in | (scale == 0).expand(c) if scale.dim() == 0 else m_in | (scale == 0)
        elif kind in ("zero_preserving", "mean") and m_in is not None and m_in.numel() == c:
            out = m_in.clone()
        elif kind == "bn" and m_in is not None and isinstance(module, nn.modules.batchnorm._BatchNorm):
            # Zero in eval mode (the shift) and in training mode (β: a zero channel normalizes to β).
            beta = module.bias.detach().cpu() if module.bias is not None else torch.zeros(c)
            out = m_in & (bn_shift(module).cpu() == 0) & (beta == 0)
        elif (
            kind in ("conv", "grouped_conv", "linear")
            and m_in is not None
            and module is not None
            and m_in.numel() == _in_features(module)
        ):  # a mask of another axis (a ViT's tokens before a transpose) says nothing here
            out = _layer_zero_outputs(module, m_in)
        elif kind == "add":
            operands = node_inputs(node)
            consts = [a for a in node.args if not isinstance(a, fx.Node)]
            if all(isinstance(a, int | float) and a == 0 for a in consts):
                masks = [mask(o) for o in operands]
                if all(m is not None and m.numel() in (c, 1) for m in masks):
                    out = torch.ones(c, dtype=torch.bool)
                    for m in masks:
                        assert m is not None
                        out &= m.expand(c)
        elif kind == "mul":
            operands = node_inputs(node)
            consts = [a for a in node.args if not isinstance(a, fx.Node)]
            if any(isinstance(a, int | float) and a == 0 for a in consts):
                out = torch.ones(c, dtype=torch.bool)
            for o in operands:
                m = mask(o)
                if m is not None and m.numel() in (c, 1):
                    out |= m.expand(c)
        elif kind == "cat":
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            masks = [mask(p) for p in parts] if isinstance(parts, list | tuple) else []
            if (
                masks
                and all(m is not None for m in masks)
                and sum(m.numel() for m in masks if m is not None) == c
            ):
                out = torch.cat([m for m in masks if m is not None])
        elif kind == "flatten" and m_in is not None and c % m_in.numel() == 0:
            out = m_in.repeat_interleave(c // m_in.numel())
        zero[node] = out
    return zero


def fully_zero(ana: ChannelAnalysis, node: fx.Node) -> bool:
    """Whether every channel of ``node`` is identically zero."""
    m = ana.zero.get(node)
    return m is not None and bool(m.numel()) and bool(m.all())
