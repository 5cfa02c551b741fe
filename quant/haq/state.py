"""The per-layer observation the HAQ agent sees (Wang et al., CVPR 2019, §3.1).

For layer ``k`` the paper's state is
``O_k = (k, c_in, c_out, s_kernel, s_stride, s_feat, n_params, i_dw, i_w/a, a_{k−1})``:
index, input and output channels (features for a fully connected layer), kernel size,
stride, input feature-map size, parameter count, a depthwise flag, a weight/activation
flag and the previous action. Every column is min-max normalized over the layers to
[0, 1] (as the official code does), so layers of very different sizes share one scale.

In latency (and BitOps) mode there are two steps per layer — weights, then activations —
and the weight/activation flag tells them apart. In size mode there is one step per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import fx, nn

COLUMNS = (
    "index",
    "in_channels",
    "out_channels",
    "kernel",
    "stride",
    "feature_map",
    "params",
    "depthwise",
    "is_weight",
    "prev_action",
)
#: Columns that describe the layer itself (normalized once); the last two change per step.
STATIC_COLUMNS = COLUMNS[:-2]


@dataclass(frozen=True)
class LayerInfo:
    """The static description of one quantizable layer (a convolution or a linear layer)."""

    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    feature_map: int  # input height × width (1 for a linear layer on a vector)
    params: int
    macs: int
    depthwise: bool

    def static_row(self, index: int) -> list[float]:
        return [
            float(index),
            float(self.in_channels),
            float(self.out_channels),
            float(self.kernel),
            float(self.stride),
            float(self.feature_map),
            float(self.params),
            float(self.depthwise),
        ]


def describe_layer(name: str, module: nn.Module, input_shape: Sequence[int], macs: int) -> LayerInfo:
    """A :class:`LayerInfo` for a Conv2d or Linear, given the shape of its input (with batch)."""
    params = sum(p.numel() for p in module.parameters())
    if isinstance(module, nn.Conv2d):
        fmap = int(input_shape[-1] * input_shape[-2]) if len(input_shape) >= 4 else 1
        return LayerInfo(
            name=name,
            kind="conv",
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel=int(module.kernel_size[0]),
            stride=int(module.stride[0]),
            feature_map=fmap,
            params=params,
            macs=macs,
            depthwise=module.groups == module.in_channels and module.groups > 1,
        )
    if isinstance(module, nn.Linear):
        return LayerInfo(
            name=name,
            kind="linear",
            in_channels=module.in_features,
            out_channels=module.out_features,
            kernel=1,
            stride=0,
            feature_map=1,
            params=params,
            macs=macs,
            depthwise=False,
        )
    raise TypeError(f"layer {name} is a {type(module).__name__}, not a Conv2d or Linear")


def quantizable_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Module]]:
    """The graph's Conv2d and Linear call_module nodes in execution order."""
    found: list[tuple[fx.Node, nn.Module]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.Conv2d | nn.Linear):
            found.append((node, module))
    return found


def minmax_normalize(table: np.ndarray) -> np.ndarray:
    """Scale every column to [0, 1] by its min and max; a constant column becomes 0.

    The official code leaves a constant column raw; a raw constant (say 4,608 parameters
    when every layer has that many) would swamp the other inputs, so it is zeroed here.
    """
    table = np.asarray(table, dtype=np.float64)
    lo = table.min(axis=0)
    hi = table.max(axis=0)
    span = hi - lo
    out = np.zeros_like(table)
    varying = span > 0
    out[:, varying] = (table[:, varying] - lo[varying]) / span[varying]
    return out


class StateSpace:
    """Observations for each step of an episode: the normalized static row plus the step's flags.

    ``two_steps`` (latency and BitOps modes) gives two steps per layer, weights then
    activations; otherwise one step per layer (weights only).
    """

    def __init__(self, layers: Sequence[LayerInfo], two_steps: bool) -> None:
        if not layers:
            raise ValueError("HAQ needs at least one quantizable layer")
        self.layers = list(layers)
        self.two_steps = two_steps
        raw = np.array([layer.static_row(i) for i, layer in enumerate(self.layers)], dtype=np.float64)
        self.static = minmax_normalize(raw)

    @property
    def dim(self) -> int:
        return len(COLUMNS)

    @property
    def steps(self) -> int:
        return len(self.layers) * (2 if self.two_steps else 1)

    def layer_of(self, step: int) -> tuple[int, bool]:
        """(layer index, is this the weight step) for step ``step`` of an episode."""
        if self.two_steps:
            return step // 2, step % 2 == 0
        return step, True

    def observation(self, step: int, prev_action: float) -> np.ndarray:
        """The state at ``step``: static columns, the weight flag and the previous action (in [0, 1])."""
        layer, is_weight = self.layer_of(step)
        return np.concatenate([self.static[layer], [float(is_weight), float(prev_action)]]).astype(np.float32)
