"""The DARTS mixed op as an IR :class:`~ir.constructs.Choice`, computed lean.

``MixedOp`` computes exactly the paper's eq. 2, ``sum_o softmax(alpha)_o * o(x)``, with three
savings that do not change the value: ``none`` is skipped (its term is zero), ``relu(x)`` is
computed once per edge for every ReLU-first candidate, and the weighted sum accumulates with
``addcmul`` instead of materializing each product. Candidates that are plain convolutions
differing only in kernel size (the ``conv_KxK`` of a relaxed user graph) run as one convolution:
convolution is linear in its kernel, so ``sum_k w_k conv(x, K_k) = conv(x, sum_k w_k pad(K_k))``
with each kernel zero-padded to the largest one, centred (:func:`conv_merge_group`). One
convolution at the largest kernel instead of one per size, and one output kept for backward;
only while gradients are on, so that hooks counting MACs see every candidate's own convolution.
``lean=False`` computes it the way the DARTS code does (every candidate including the zero op,
each with its own ReLU, each convolution on its own): the benchmark's baseline.

In channels-last (NHWC) search, the gradient reaching a mixed op can arrive as a channel slice
of a concatenation's gradient, contiguous in neither layout; every candidate's backward would
then run oneDNN's slow paths. The lean mixed op hands its candidates that gradient in its
output's layout (:func:`grad_in_layout_of`).

In the cell search space every normal (reduction) cell shares one α per edge position: the
same ``nn.Parameter`` object is assigned to all of them (``tie_alpha``), so the optimizer sees
each α once while every cell keeps its own weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxsculpt.ir.constructs import Choice
from fxsculpt.nas.darts.ops import ReluFirst, is_nhwc


class _GradInLayout(torch.autograd.Function):
    """Identity forward; backward makes the gradient contiguous in the forward value's layout."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.nhwc = is_nhwc(x)  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        if ctx.nhwc:  # type: ignore[attr-defined]
            return grad.contiguous(memory_format=torch.channels_last)
        return grad.contiguous()


def grad_in_layout_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, except that the gradient flowing back through it takes ``x``'s memory layout."""
    if not x.requires_grad:
        return x
    out: torch.Tensor = _GradInLayout.apply(x)  # type: ignore[no-untyped-call]
    return out


def _centre_offset(conv: nn.Conv2d) -> tuple[int, int] | None:
    """padding − dilation·(k − 1)/2 per dimension (0 for a "same" conv), or ``None`` if not whole."""
    if isinstance(conv.padding, str):
        return None
    out = []
    for p, k, d in zip(conv.padding, conv.kernel_size, conv.dilation):
        if d * (k - 1) % 2:
            return None
        out.append(p - d * (k - 1) // 2)
    return out[0], out[1]


def conv_merge_group(candidates: Sequence[nn.Module]) -> list[int]:
    """Indices of the candidates that one convolution can compute together (at least two), else [].

    They must be plain ``nn.Conv2d`` with zero padding and the same channels, groups, stride,
    dilation, bias presence and centre offset (padding − dilation·(k − 1)/2): then each equals
    the largest one with its kernel zero-padded around the centre, exactly.
    """
    convs = [i for i, c in enumerate(candidates) if type(c) is nn.Conv2d and c.padding_mode == "zeros"]
    if len(convs) < 2:
        return []

    def key(conv: nn.Conv2d) -> tuple[object, ...]:
        return (
            conv.in_channels,
            conv.out_channels,
            conv.groups,
            conv.stride,
            conv.dilation,
            conv.bias is not None,
            _centre_offset(conv),
            conv.kernel_size[0] % 2,
            conv.kernel_size[1] % 2,
        )

    first = candidates[convs[0]]
    assert isinstance(first, nn.Conv2d)
    if _centre_offset(first) is None:
        return []
    group = [i for i in convs if key(candidates[i]) == key(first)]  # type: ignore[arg-type]
    return group if len(group) >= 2 else []


def merged_conv(convs: Sequence[nn.Conv2d], weights: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[i] * convs[i](x)`` as one convolution (convs from :func:`conv_merge_group`)."""
    kh = max(c.kernel_size[0] for c in convs)
    kw = max(c.kernel_size[1] for c in convs)
    kernel: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    for conv, w in zip(convs, weights):
        dh, dw = (kh - conv.kernel_size[0]) // 2, (kw - conv.kernel_size[1]) // 2
        padded = F.pad(conv.weight, (dw, dw, dh, dh)) * w
        kernel = padded if kernel is None else kernel + padded
        if conv.bias is not None:
            bias = conv.bias * w if bias is None else bias + conv.bias * w
    assert kernel is not None
    offset = _centre_offset(convs[0])
    assert offset is not None
    d = convs[0].dilation
    padding = (offset[0] + d[0] * (kh - 1) // 2, offset[1] + d[1] * (kw - 1) // 2)
    return F.conv2d(x, kernel, bias, convs[0].stride, padding, d, convs[0].groups)


@dataclass(frozen=True)
class EdgeInfo:
    """Where a mixed op sits in the cell space: cell kind, target node, source state."""

    cell_type: str  # "normal" or "reduce"
    cell_index: int
    node: int  # intermediate node index, 0-based (state index node + 2)
    source: int  # state index of the edge's input: 0, 1 = cell inputs, 2.. = earlier nodes
    multiplier: int = 4  # how many of the cell's last nodes its output concatenates


class MixedOp(Choice):
    """softmax(α)-weighted sum of candidate ops (DARTS eq. 2); ``none`` skipped, ReLU shared."""

    def __init__(
        self,
        candidates: Sequence[nn.Module],
        candidate_names: Sequence[str],
        *,
        edge: EdgeInfo | None = None,
        lean: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(candidates, candidate_names)
        with torch.no_grad():  # the DARTS code's initialization: 1e-3 * N(0, 1)
            self.alpha.copy_(1e-3 * torch.randn(len(candidates), generator=generator))
        self.edge = edge
        self.lean = lean
        #: candidates computed together as one convolution (lean only; see conv_merge_group)
        self.merged = conv_merge_group(list(self.candidates)) if lean else []

    def tie_alpha(self, alpha: nn.Parameter) -> None:
        """Share ``alpha`` (one object) with other mixed ops at the same edge position."""
        if alpha.shape != self.alpha.shape:
            raise ValueError("a tied α must have one entry per candidate")
        self.alpha = alpha

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        (x,) = inputs
        weights = self.mixture_weights()
        if not self.lean:
            terms = [weights[i] * op(x) for i, op in enumerate(self.candidates)]
            summed = terms[0]
            for term in terms[1:]:
                summed = summed + term
            return summed
        rectified: torch.Tensor | None = None
        total: torch.Tensor | None = None
        # Merged only under autograd (the search's steps), where it saves time and memory; without
        # gradients (evaluation, shape propagation, MAC counting by hooks) each conv runs on its own.
        merged: list[int] = getattr(self, "merged", []) if torch.is_grad_enabled() else []
        if merged:
            convs = [self.candidates[i] for i in merged]
            total = merged_conv(convs, [weights[i] for i in merged], x)  # type: ignore[arg-type]
        for i, (name, op) in enumerate(zip(self.candidate_names, self.candidates)):
            if name == "none" or i in merged:
                continue
            if isinstance(op, ReluFirst):
                if rectified is None:
                    rectified = F.relu(x)
                out = op.body(rectified)
            else:
                out = op(x)
            total = out * weights[i] if total is None else torch.addcmul(total, out, weights[i])
        if total is None:
            raise RuntimeError("a mixed op whose only candidate is 'none' has no output shape")
        return grad_in_layout_of(total)
