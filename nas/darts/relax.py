"""Edge relaxation of a user's traced model: chosen nodes become DARTS mixed ops.

Each selected ``call_module`` node (2-D convolutions by default) is replaced in place by a
:class:`~nas.darts.mixed.MixedOp` whose candidates are the ops that can stand in for it:
built for the node's input and output channels and stride, then kept only if, run on the
node's recorded input shape, they produce exactly the node's recorded output shape. ``none``
is offered only where the graph stays connected without the node (some other path still
leads from the input to the output, e.g. a residual branch beside a shortcut).

Candidates are the DARTS ops (:data:`~nas.darts.ops.PRIMITIVES`) and ``conv_KxK``: the node's
own convolution with a K×K kernel (same channels, groups, stride, dilation and bias; padding
grown so the output size stays: by half the kernel growth, rounded up where a strided conv
such as a ViT's 4×4 patch embedding floors the odd remainder away), so a depthwise node offers depthwise kernel sizes and a dense
node dense ones. The default (:data:`RELAX_OPS`) is a kernel-size choice plus skip and zero;
the DARTS ops are ReLU-conv-BN stacks with dense pointwise convolutions, which on a
MobileNet-style model cost about 20× the model itself. Whatever is asked for, a depthwise node
stays depthwise: no candidate with a dense convolution (``sep_conv_*``, ``dil_conv_*``, the
stride-2 ``skip_connect``) replaces one. Nodes are selected by ``pattern`` and by kind
(:func:`node_kind`: 1×1 convolutions are left alone by default), and a node with fewer than two
candidates besides ``none`` is left as it is: discretization never keeps ``none``, so there
would be nothing to choose.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import fx, nn

from fxsculpt.ir.constructs import SearchConstruct
from fxsculpt.ir.graph import IR
from fxsculpt.nas.darts.mixed import MixedOp
from fxsculpt.nas.darts.ops import PRIMITIVES, FactorizedReduce, build_op

#: Kinds of node a relaxation can select (``darts.kinds``), see :func:`node_kind`.
NODE_KINDS: tuple[str, ...] = ("depthwise", "pointwise", "dense", "other")

#: Kinds relaxed by default: 1x1 convolutions have no cheap alternative of their own shape.
RELAX_KINDS: tuple[str, ...] = ("depthwise", "dense", "other")

#: The default candidates on a relaxed user graph: kernel sizes of the node's own kind, skip, zero.
RELAX_OPS: tuple[str, ...] = ("conv_3x3", "conv_5x5", "skip_connect", "none")

#: DARTS ops that contain a dense convolution, never offered on a depthwise node.
_DENSE_DARTS_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")

_CONV_LIKE = re.compile(r"conv_(\d+)x(\d+)")


def conv_like_kernel(name: str) -> int | None:
    """K for a candidate name ``conv_KxK`` (K odd), else ``None``."""
    match = _CONV_LIKE.fullmatch(name)
    if match is None or match.group(1) != match.group(2):
        return None
    kernel = int(match.group(1))
    return kernel if kernel % 2 == 1 else None


def is_candidate_name(name: str) -> bool:
    """Whether ``name`` is a candidate a relaxation can build (a DARTS op or ``conv_KxK``)."""
    return name in PRIMITIVES or conv_like_kernel(name) is not None


def node_kind(module: nn.Module) -> str:
    """``depthwise`` (groups = input channels > 1), ``pointwise`` (1x1, groups 1), ``dense``
    (any other Conv2d), or ``other`` (a module that is not a Conv2d)."""
    if not isinstance(module, nn.Conv2d):
        return "other"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    if module.kernel_size == (1, 1) and module.groups == 1:
        return "pointwise"
    return "dense"


def build_conv_like(module: nn.Module, kernel: int, c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """``conv_KxK`` for the node running ``module``: its own convolution with a K×K kernel.

    For a Conv2d: same channels, groups, stride, dilation, bias and padding mode, the padding
    grown (or shrunk) by dilation·(K − k)/2 per side so that the output size is unchanged. An
    odd growth is rounded up: a strided conv's output size floors the extra row away, while at
    stride 1 the size changes and the caller's shape check drops the op. ``None`` where the
    padding would be negative. For any other module: a dense "same" conv.
    """
    if not isinstance(module, nn.Conv2d):
        return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            base: tuple[int, ...] = (0, 0)
        else:  # "same": stride 1, output size = input size
            base = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
            if any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                return None
    else:
        base = tuple(module.padding)
    padding = []
    for p, k, d in zip(base, module.kernel_size, module.dilation):
        pad = p - (-d * (kernel - k) // 2)  # p + ceil(growth / 2)
        if pad < 0:
            return None
        padding.append(pad)
    return nn.Conv2d(
        module.in_channels,
        module.out_channels,
        kernel,
        stride=module.stride,  # type: ignore[arg-type]
        padding=tuple(padding),  # type: ignore[arg-type]
        dilation=module.dilation,  # type: ignore[arg-type]
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )


def connected_without(graph: fx.Graph, removed: fx.Node) -> bool:
    """Whether the output still depends on some graph input once ``removed`` carries nothing."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    seen: set[fx.Node] = set()
    stack = list(inputs)
    while stack:
        node = stack.pop()
        if node in seen or node is removed:
            continue
        seen.add(node)
        if node.op == "output":
            return True
        stack.extend(node.users)
    return False


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def selected_nodes(ir: IR, pattern: str, kinds: Sequence[str] = NODE_KINDS) -> list[fx.Node]:
    """call_module nodes of one of ``kinds`` whose module class name matches ``pattern`` (a regex
    search, case-insensitive), or whose node name or module path it matches in full."""
    regex = re.compile(pattern, re.IGNORECASE)
    chosen = []
    for node in ir.gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = ir.gm.get_submodule(str(node.target))
        if isinstance(module, SearchConstruct) or node_kind(module) not in kinds:
            continue
        if (
            regex.search(type(module).__name__)
            or regex.fullmatch(str(node.target))
            or regex.fullmatch(node.name)
        ):
            chosen.append(node)
    return chosen


def candidates_for(
    module: nn.Module,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    primitives: Sequence[str],
    allow_none: bool,
) -> tuple[list[nn.Module], list[str]]:
    """The candidate ops (search variants) that map ``in_shape`` to exactly ``out_shape``.

    Empty when fewer than two candidates other than ``none`` fit (nothing to choose).
    """
    if len(in_shape) != 4 or len(out_shape) != 4:
        return [], []
    c_in, c_out = int(in_shape[1]), int(out_shape[1])
    depthwise = node_kind(module) == "depthwise"
    stride = getattr(module, "stride", (1, 1))
    stride = int(stride[0]) if isinstance(stride, tuple | list) else int(stride)
    if stride not in (1, 2):
        # Any spatial reduction is realized at the ops' own stride, checked on shapes below.
        stride = 2 if int(out_shape[2]) < int(in_shape[2]) else 1
    ops: list[nn.Module] = []
    names: list[str] = []
    probe = torch.zeros(2, *[int(d) for d in in_shape[1:]])
    for name in primitives:
        if name == "none" and not allow_none:
            continue
        if depthwise and name in _DENSE_DARTS_OPS:
            continue
        kernel = conv_like_kernel(name)
        if kernel is not None:
            op = build_conv_like(module, kernel, c_in, c_out, stride)
        else:
            op = build_op(name, c_in, c_out, stride, search=True)
        if op is None or (depthwise and isinstance(op, FactorizedReduce)):
            continue
        if name != "none":
            op.eval()
            try:
                with torch.no_grad():
                    shape = tuple(op(probe).shape[1:])
            except RuntimeError:
                continue
            if shape != tuple(int(d) for d in out_shape[1:]):
                continue
        ops.append(op)
        names.append(name)
    if sum(1 for n in names if n != "none") < 2:
        return [], []
    return ops, names


def relax(
    ir: IR,
    pattern: str = "conv",
    primitives: Sequence[str] = RELAX_OPS,
    generator: torch.Generator | None = None,
    lean: bool = True,
    kinds: Sequence[str] = RELAX_KINDS,
) -> dict[str, list[str]]:
    """Replace every matching node by a mixed op; returns node name → candidate names.

    Nodes for which fewer than two candidates fit stay as they are. The IR's metadata is
    re-propagated.
    """
    ir.propagate()
    device = ir.device
    relaxed: dict[str, list[str]] = {}
    for node in selected_nodes(ir, pattern, kinds):
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if len(args) != 1 or node.kwargs:
            continue
        in_shape, out_shape = ir.meta(args[0]).shape, ir.meta(node).shape
        if in_shape is None or out_shape is None:
            continue
        module = ir.gm.get_submodule(str(node.target))
        allow_none = connected_without(ir.gm.graph, node)
        ops, names = candidates_for(module, in_shape, out_shape, primitives, allow_none)
        if not ops:
            continue
        mixed = MixedOp(ops, names, generator=generator, lean=lean).to(device)
        _set_submodule(ir.gm, str(node.target), mixed)
        relaxed[node.name] = names
    ir.gm.recompile()
    ir.propagate()
    return relaxed
