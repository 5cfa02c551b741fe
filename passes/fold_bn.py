"""``fold_bn``: fold eval-mode BatchNorm into the Conv or Linear that feeds it.

In eval mode BatchNorm is an affine map per channel, ``y = γ (x - μ) / sqrt(σ² + ε) + β``
(Ioffe & Szegedy 2015, Algorithm 1, with the running statistics μ, σ²). When ``x`` is the
output of a convolution or a linear layer ``x = W * z + b``, the two compose into one layer
with ``W' = W · s`` and ``b' = (b - μ) · s + β`` where ``s = γ / sqrt(σ² + ε)`` scales each
output channel (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", section 3.2 and eq. 17 describe the same fold).
Folding removes a node and a memory pass per BN and is what quantization must see: the
folded weights, not the unfolded ones, are what an integer kernel runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, Pass

#: Layers a BatchNorm can fold into. Transposed convolutions keep output channels on
#: weight dimension 1 and are not folded.
FoldableLayer = nn.modules.conv._ConvNd | nn.Linear


def fold_conv_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Return a new Conv/Linear equal to ``bn(layer(x))`` with ``bn`` in eval mode.

    ``layer`` is an ``nn.Conv1d/2d/3d`` (any groups, stride, dilation, padding; with or
    without bias) or an ``nn.Linear``; the result is a deep copy of it with the folded
    weight and a bias (always present). The fold is computed in float64 and cast back to
    the layer's dtype. ``layer`` and ``bn`` are not modified. Raises ``ValueError`` when
    the two cannot fold (channel counts differ, a transposed conv, BN without running
    statistics).
    """
    if not isinstance(layer, FoldableLayer) or (
        isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed
    ):
        raise ValueError(f"cannot fold BatchNorm into {type(layer).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics (track_running_stats=False) cannot fold")
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} channels, the layer outputs {out_channels}")

    weight = layer.weight.detach()
    dtype, device = weight.dtype, weight.device
    mean = bn.running_mean.detach().to(device, torch.float64)
    var = bn.running_var.detach().to(device, torch.float64)
    gamma = (
        bn.weight.detach().to(device, torch.float64)
        if bn.weight is not None
        else torch.ones_like(mean, dtype=torch.float64)
    )
    beta = (
        bn.bias.detach().to(device, torch.float64)
        if bn.bias is not None
        else torch.zeros_like(mean, dtype=torch.float64)
    )
    scale = gamma / torch.sqrt(var + bn.eps)  # s = γ / sqrt(σ² + ε), one per output channel
    bias = (
        layer.bias.detach().to(torch.float64)
        if layer.bias is not None
        else torch.zeros_like(mean, dtype=torch.float64)
    )
    # Output channels are weight dimension 0 for Conv (any groups) and for Linear.
    shape = [-1] + [1] * (weight.dim() - 1)
    new_weight = weight.to(torch.float64) * scale.reshape(shape)
    new_bias = (bias - mean) * scale + beta

    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(new_weight.to(dtype), requires_grad=layer.weight.requires_grad)
    folded.bias = nn.Parameter(new_bias.to(dtype), requires_grad=layer.weight.requires_grad)
    return folded


@dataclass
class FoldStats:
    """What one run of the fold did: how many BN nodes went, and why the others stayed."""

    folded: int = 0
    skipped: int = 0
    reasons: dict[str, int] | None = None

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def _module_users(gm: fx.GraphModule) -> dict[str, int]:
    """How many call_module nodes call each submodule (a shared layer is called more than once)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def _free_name(gm: fx.GraphModule, base: str) -> str:
    """A submodule path beside ``base`` that is not taken yet."""
    index = 0
    while True:
        candidate = f"{base}_bnfold{index}"
        try:
            gm.get_submodule(candidate)
        except AttributeError:
            return candidate
        index += 1


def _producer_problem(ir: IR, bn_node: fx.Node) -> str | None:
    """Why the node feeding ``bn_node`` cannot absorb it (``None`` when it can)."""
    gm = ir.gm
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "unusual call"
    source = bn_node.args[0]
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return "input is not a conv or linear layer"
    layer = gm.get_submodule(str(source.target))
    if not isinstance(layer, FoldableLayer) or (
        isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed
    ):
        return "input is not a conv or linear layer"
    if len(source.users) != 1:
        return "layer output has other users"
    if isinstance(layer, nn.Linear):
        # BatchNorm1d normalizes dimension 1; a Linear's features are the last dimension,
        # so only a 2-D output (N, F) puts them where BN looks.
        shape = ir.meta(source).shape
        if shape is None or len(shape) != 2:
            return "linear output is not 2-D"
    bn = gm.get_submodule(str(bn_node.target))
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics"
    return None


def fold_batchnorms(ir: IR) -> FoldStats:
    """Fold every foldable BatchNorm node of ``ir`` in place and return the counts."""
    gm = ir.gm
    ir.propagate()  # output ranks tell a Linear + BatchNorm1d on (N, F) from one on (N, L, F)
    stats = FoldStats()
    folded_state: set[int] = set()  # ids of the parameters and buffers of deleted BatchNorms
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(str(node.target))
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        problem = _producer_problem(ir, node)
        if problem is not None:
            stats.skip(problem)
            continue
        source = node.args[0]
        assert isinstance(source, fx.Node)
        layer = gm.get_submodule(str(source.target))
        try:
            folded = fold_conv_bn(layer, bn)
        except ValueError as exc:
            stats.skip(str(exc))
            continue
        # A layer object called from several nodes keeps its weights for the other calls.
        if _module_users(gm)[str(source.target)] > 1:
            new_name = _free_name(gm, str(source.target))
            gm.add_submodule(new_name, folded)
            source.target = new_name
        else:
            gm.add_submodule(str(source.target), folded)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        if _module_users(gm).get(str(node.target), 0) == 0:
            gm.delete_submodule(str(node.target))
            folded_state.update(id(t) for t in (*bn.parameters(), *bn.buffers()))
        stats.folded += 1
    _drop_shared_copies(gm, folded_state)
    gm.graph.lint()
    gm.recompile()
    ir.propagate()
    return stats


def _drop_shared_copies(gm: fx.GraphModule, folded_state: set[int]) -> None:
    """Remove the folded BatchNorms' tensors from modules that still hold them but no node calls.

    A traced-through norm layer (timm's ``BatchNormAct2d``, :mod:`ir.canonical`) becomes a
    ``BatchNorm`` child sharing its parent's scale, shift and statistics; once that child is folded
    and deleted, the parent (still a container of called children) would keep them, unused but
    counted in the model's parameters and size.
    """
    called = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for path, module in gm.named_modules():
        if path in called:
            continue
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for attr in [a for a, t in table.items() if t is not None and id(t) in folded_state]:
                if f"{path}.{attr}".lstrip(".") not in called:
                    del table[attr]


class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding Conv or Linear (exact up to rounding)."""

    name = "fold_bn"
    preserves_semantics = True

    def run(self, ir: IR, ctx: Context) -> IR:
        stats = fold_batchnorms(ir)
        ctx.record(folded=stats.folded, skipped=stats.skipped)
        if stats.reasons:
            ctx.record(skipped_reasons=dict(stats.reasons))
        return ir
