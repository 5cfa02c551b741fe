"""The eight candidate operations of the DARTS search space (Liu et al., ICLR 2019, sec. 3.1).

Order and names follow the DARTS code's ``PRIMITIVES``: ``none``, ``max_pool_3x3``,
``avg_pool_3x3``, ``skip_connect``, ``sep_conv_3x3``, ``sep_conv_5x5``, ``dil_conv_3x3``,
``dil_conv_5x5``. Convolutions are ReLU-Conv-BN; separable convolutions are applied twice
(paper, sec. 3.1 / appendix A.1); BatchNorm has no affine parameters during the search and
pooling is followed by BatchNorm there (appendix A.1.1).

Every op that starts with a ReLU derives from :class:`ReluFirst` and exposes ``body(relu_x)``,
so a mixed op can compute ``relu(x)`` once per edge and feed it to all such candidates: the
same result, one activation tensor saved for backward instead of four.

The search variants of the dilated convolutions compute their depthwise stage by phase
splitting while they train (:func:`dilated_depthwise`): oneDNN's backward kernels for dilated
depthwise convolutions are several times slower on CPU than for undilated ones, and a
dilation-2 convolution is exactly four undilated ones on the 2x2 sub-grids of its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

#: The candidate operations, in the DARTS code's order (index 0 is the zero op).
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class ReluFirst(nn.Module):
    """An op of the form ``body(relu(x))``; ``body`` takes the already rectified input."""

    def body(self, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(F.relu(x))


class ReLUConvBN(ReluFirst):
    """ReLU, a dense convolution, BatchNorm: the cells' 1x1 preprocessing."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def body(self, r: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(r))


def is_nhwc(x: torch.Tensor) -> bool:
    """Whether ``x`` is an image batch stored channels-last (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _phase_split_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`dilated_depthwise` can compute ``conv(x)`` by phase splitting."""
    if isinstance(x, fx.Proxy) or x.dim() != 4:
        return False
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    if conv.dilation != (2, 2) or conv.groups != conv.in_channels or kh != kw or kh % 2 == 0:
        return False
    if conv.padding != (kh - 1, kw - 1) or conv.padding_mode != "zeros" or (sh, sw) not in ((1, 1), (2, 2)):
        return False
    return sh == 2 or (x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0)


def dilated_depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a "same"-padded, dilation-2 depthwise conv, computed without dilation.

    With padding p = k − 1, output row h reads input rows h·s + 2t − p (t = 0..k−1), all of the
    parity of h·s. Stride 2 therefore reads only the even sub-grid: an undilated conv with
    padding (k − 1)/2 on ``x[:, :, ::2, ::2]``. Stride 1 reads, for each output parity (a, b),
    the input sub-grid of that parity: the four sub-grids are stacked along the batch, convolved
    undilated, and interleaved back. Same values (up to float summation order), in the input's
    memory layout. Anything else (odd sizes at stride 1, other dilations) runs ``conv`` itself.
    """
    if not _phase_split_applies(conv, x):
        return conv(x)
    half = (conv.kernel_size[0] - 1) // 2
    if conv.stride == (2, 2):
        return F.conv2d(x[:, :, ::2, ::2], conv.weight, conv.bias, 1, half, 1, conv.groups)
    if conv.bias is not None:
        return _merge_phases(F.conv2d(_stack_phases(x), conv.weight, conv.bias, 1, half, 1, conv.groups), x)
    out: torch.Tensor = _PhaseSplitConv.apply(x, conv.weight, half, conv.groups)  # type: ignore[no-untyped-call]
    return out


def _stack_phases(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (4N, C, H/2, W/2): the four 2x2 sub-grids of ``x`` stacked along the batch,
    phase (a, b) first; in ``x``'s memory layout (each copy stays channels-last for NHWC)."""
    n, c, h, w = x.shape
    if is_nhwc(x):
        phases = x.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c).permute(2, 4, 0, 1, 3, 5)
        return phases.reshape(4 * n, h // 2, w // 2, c).permute(0, 3, 1, 2)
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(3, 5, 0, 1, 2, 4).reshape(4 * n, c, h // 2, w // 2)


def _merge_phases(stacked: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_stack_phases`: interleave the sub-grids back to ``like``'s shape."""
    n, _, h, w = like.shape
    c = stacked.shape[1]
    if is_nhwc(like):
        merged = stacked.permute(0, 2, 3, 1).reshape(2, 2, n, h // 2, w // 2, c).permute(2, 3, 0, 4, 1, 5)
        return merged.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return stacked.reshape(2, 2, n, c, h // 2, w // 2).permute(2, 3, 4, 0, 5, 1).reshape(n, c, h, w)


class _PhaseSplitConv(torch.autograd.Function):
    """A stride-1 phase-split depthwise conv that keeps its input, not the stacked copy of it:
    the backward stacks the input again (a copy per backward instead of one more activation
    kept per op). Built from differentiable ops, so a double backward still works."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        half: int,
        groups: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.half, ctx.groups = half, groups  # type: ignore[attr-defined]
        return _merge_phases(F.conv2d(_stack_phases(x), weight, None, 1, half, 1, groups), x)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        half, groups = ctx.half, ctx.groups  # type: ignore[attr-defined]
        layout = torch.channels_last if is_nhwc(x) else torch.contiguous_format
        grad_stacked = _stack_phases(grad.contiguous(memory_format=layout))
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_stacked,
            _stack_phases(x),
            weight,
            None,
            [1, 1],
            [half, half],
            [1, 1],
            False,
            [0, 0],
            groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],  # type: ignore[attr-defined]
        )
        return (_merge_phases(grad_x, x) if grad_x is not None else None), grad_w, None, None


class DilConv(ReluFirst):
    """ReLU, depthwise (dilated) conv, pointwise conv, BatchNorm: ``dil_conv_*``.

    ``phase_split`` (the search variant) computes a dilated depthwise stage with
    :func:`dilated_depthwise` while training with gradients on; evaluation, tracing and export
    see the plain convolution.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool = True,
        phase_split: bool = False,
    ) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            c_in, c_in, kernel, stride=stride, padding=padding, dilation=dilation, groups=c_in, bias=False
        )
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)
        self.phase_split = phase_split

    def body(self, r: torch.Tensor) -> torch.Tensor:
        if self.phase_split and self.training and torch.is_grad_enabled():
            mid = dilated_depthwise(self.depthwise, r)
        else:
            mid = self.depthwise(r)
        return self.bn(self.pointwise(mid))


class SepConv(ReluFirst):
    """A depthwise-separable conv applied twice, the first with the stride: ``sep_conv_*``."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True
    ) -> None:
        super().__init__()
        self.first = DilConv(c_in, c_in, kernel, stride, padding, 1, affine)
        self.second = DilConv(c_in, c_out, kernel, 1, padding, 1, affine)

    def body(self, r: torch.Tensor) -> torch.Tensor:
        mid = self.first.body(r)
        # While training, the second ReLU may overwrite the first BatchNorm's output: BatchNorm's
        # backward reads its input, not its output, so one activation per op need not be kept.
        inplace = self.training and torch.is_grad_enabled()
        return self.second.body(F.relu(mid, inplace=inplace))


class FactorizedReduce(ReluFirst):
    """ReLU, two 1x1 stride-2 convs on offset grids, concatenated, BatchNorm.

    The DARTS code's ``skip_connect`` at stride 2. The second conv reads the grid shifted by
    one pixel; a zero row/column is padded at the end so that odd sizes work as well (for
    even sizes the result equals the DARTS code's ``x[:, :, 1:, 1:]``).
    """

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError("FactorizedReduce needs an even number of output channels")
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def body(self, r: torch.Tensor) -> torch.Tensor:
        # Slice, then pad: the same values as padding first, but the result keeps the input's
        # memory layout (a padded-then-sliced NHWC tensor is contiguous in neither layout).
        shifted = F.pad(r[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(r), self.conv_2(shifted)], dim=1))


class _MaxPoolFromInput(torch.autograd.Function):
    """3x3 max pooling (padding 1) whose backward finds the maxima again from the input.

    Autograd's max pooling keeps an int64 index per output element, twice the bytes of the
    float output; the input is kept anyway (it is the edge's input, which other candidates
    save), so the search keeps nothing more. The backward is built from differentiable ops, so
    a double backward (an exact Hessian-vector product) still works.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, stride: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.stride = stride  # type: ignore[attr-defined]
        return F.max_pool2d(x, 3, stride, 1)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        stride = ctx.stride  # type: ignore[attr-defined]
        with torch.no_grad():
            _, indices = F.max_pool2d(x, 3, stride, 1, return_indices=True)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, [3, 3], [stride, stride], [1, 1], [1, 1], False, indices
        )
        return grad_x, None


class Pool(nn.Module):
    """3x3 max or average pooling (average excludes padding), with BatchNorm during search.

    While the search trains, max pooling recomputes its maxima in the backward pass instead of
    keeping their indices (:class:`_MaxPoolFromInput`): same values, less memory.
    """

    def __init__(self, kind: str, channels: int, stride: int, bn: bool) -> None:
        super().__init__()
        if kind == "max":
            self.pool: nn.Module = nn.MaxPool2d(3, stride=stride, padding=1)
        else:
            self.pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        self.bn = nn.BatchNorm2d(channels, affine=False) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and isinstance(self.pool, nn.MaxPool2d) and self.training and x.requires_grad:
            out: torch.Tensor = _MaxPoolFromInput.apply(x, self.pool.stride)  # type: ignore[no-untyped-call]
        else:
            out = self.pool(x)
        return self.bn(out) if self.bn is not None else out


class Zero(nn.Module):
    """The ``none`` op: zeros of the output's shape. A mixed op skips it instead of calling it."""

    def __init__(self, c_out: int, stride: int) -> None:
        super().__init__()
        self.c_out = c_out
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = x[:, :1, :: self.stride, :: self.stride]
        return sub.mul(0.0).expand(-1, self.c_out, -1, -1)


def build_op(name: str, c_in: int, c_out: int, stride: int, *, search: bool) -> nn.Module | None:
    """Candidate ``name`` mapping ``c_in`` to ``c_out`` channels at ``stride``, or ``None``.

    ``None`` means the op cannot produce that shape (pooling and identity cannot change the
    channel count; the stride-2 skip needs an even ``c_out``). ``search=True`` builds the search
    variant: BatchNorm without affine parameters, and BatchNorm after pooling.
    """
    affine = not search
    if name == "none":
        return Zero(c_out, stride)
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        if c_in != c_out:
            return None
        return Pool(name[:3], c_out, stride, bn=search)
    if name == "skip_connect":
        if stride == 1:
            return nn.Identity() if c_in == c_out else None
        if stride == 2 and c_out % 2 == 0:
            return FactorizedReduce(c_in, c_out, affine)
        return None
    if name.startswith("sep_conv_"):
        kernel = int(name[-1])
        return SepConv(c_in, c_out, kernel, stride, kernel // 2, affine)
    if name.startswith("dil_conv_"):
        kernel = int(name[-1])
        return DilConv(c_in, c_out, kernel, stride, kernel - 1, 2, affine, phase_split=search)
    raise ValueError(f"unknown DARTS op '{name}' (known: {', '.join(PRIMITIVES)})")
