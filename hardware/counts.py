"""Exact cost counts of an IR: parameters, MACs, BitOps, packed model size, peak activation memory.

Bit-widths come from the ``NodeMeta`` the quantization pass sets (``weight_bits``,
``act_bits``; ``None`` means float32). Definitions:

- **BitOps** = Σ over layers of MACs × weight bits × activation bits, float counting as 32
  (the cost measure of Bit Fusion, Sharma et al. ISCA 2018, and of DFQ/HAQ-style searches).
- **Size** counts every parameter tensor at its real width, packed: the kernel of a layer
  whose ``weight_bits`` is ``b`` (a weight tensor with at least two dimensions) takes
  ``ceil(numel × b / 8)`` bytes; biases, BatchNorm scales and any other parameter take
  32 bits each. Architecture parameters (α, λ, bit logits) and buffers (BatchNorm running
  statistics, which fold into the exported weights; quantizer scales) are not counted.
- **Peak activation memory** walks the fx graph in its (topological) order: a node's output
  is allocated when the node runs and freed after its last user ran; the peak is the largest
  total of tensors alive at once, each at its node's ``act_bits`` (else its dtype's width).
  The model input is alive from the start; weights are not activations; no tensor aliases
  another (a view or an in-place op counts as a new tensor), so this is an upper bound of
  what an allocator that reuses buffers needs, for the IR's batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from fxsculpt.ir.constructs import ARCH_PARAM_NAMES
from fxsculpt.ir.graph import IR

FLOAT_BITS = 32


@dataclass
class LayerCount:
    """The counts of one node that holds weights or does MACs."""

    name: str
    op: str
    params: int
    macs: int
    bitops: int
    weight_bits: int | None
    act_bits: int | None
    size_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelCounts:
    """The exact counts of a whole model (per sample for MACs/BitOps; at the IR's batch for memory)."""

    params: int
    macs: int
    bitops: int
    size_bytes: int
    peak_activation_bytes: int
    layers: list[LayerCount] = field(default_factory=list)

    def as_dict(self, with_layers: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "params": self.params,
            "macs": self.macs,
            "bitops": self.bitops,
            "size_bytes": self.size_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
        }
        if with_layers:
            out["layers"] = [row.as_dict() for row in self.layers]
        return out


def bits_or_float(bits: int | None) -> int:
    """A bit-width with ``None`` (float) read as 32."""
    return FLOAT_BITS if bits is None else int(bits)


def node_bitops(macs: int, weight_bits: int | None, act_bits: int | None) -> int:
    """MACs × weight bits × activation bits (float = 32)."""
    return int(macs) * bits_or_float(weight_bits) * bits_or_float(act_bits)


def _owner_nodes(ir: IR) -> dict[str, fx.Node]:
    return {str(n.target): n for n in ir.gm.graph.nodes if n.op == "call_module"}


def _owner_of(param_name: str, owners: dict[str, fx.Node]) -> fx.Node | None:
    """The call_module node whose module (the longest matching path) holds ``param_name``."""
    parts = param_name.split(".")[:-1]
    while parts:
        node = owners.get(".".join(parts))
        if node is not None:
            return node
        parts.pop()
    return None


def tensor_bits(param: torch.Tensor, leaf_name: str, weight_bits: int | None) -> int:
    """Bits per element of one parameter: ``weight_bits`` for a ≥2-D ``weight``, else its dtype's."""
    if weight_bits is not None and leaf_name == "weight" and param.dim() >= 2:
        return int(weight_bits)
    return param.element_size() * 8


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` elements of ``bits`` bits each, packed (rounded up to whole bytes)."""
    return (int(numel) * int(bits) + 7) // 8


def size_bytes_by_node(ir: IR) -> tuple[dict[str, int], int]:
    """Packed parameter bytes per owning node name (``""`` for unowned parameters) and the total."""
    owners = _owner_nodes(ir)
    per_node: dict[str, int] = {}
    total = 0
    for name, param in ir.gm.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ARCH_PARAM_NAMES:
            continue
        node = _owner_of(name, owners)
        wbits = ir.meta(node).weight_bits if node is not None else None
        nbytes = packed_bytes(param.numel(), tensor_bits(param, leaf, wbits))
        key = node.name if node is not None else ""
        per_node[key] = per_node.get(key, 0) + nbytes
        total += nbytes
    return per_node, total


def _tensor_bytes(ir: IR, node: fx.Node) -> int:
    meta = ir.meta(node)
    if meta.shape is None:
        return 0
    numel = 1
    for d in meta.shape:
        numel *= int(d)
    if meta.act_bits is not None:
        bits = int(meta.act_bits)
    elif meta.dtype is not None and hasattr(torch, meta.dtype):
        dtype = getattr(torch, meta.dtype)
        bits = torch.empty((), dtype=dtype).element_size() * 8 if isinstance(dtype, torch.dtype) else 32
    else:
        bits = FLOAT_BITS
    return packed_bytes(numel, bits)


def peak_activation_bytes(ir: IR) -> int:
    """Largest total of activation bytes alive at once, walking the graph in order (module docstring)."""
    nodes = [n for n in ir.gm.graph.nodes]
    position = {n: i for i, n in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        for user in node.users:
            last_use[node] = max(last_use.get(node, -1), position[user])
    live: dict[fx.Node, int] = {}
    peak = 0
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "call_module", "call_function", "call_method"):
            nbytes = _tensor_bytes(ir, node)
            if nbytes:
                live[node] = nbytes
        peak = max(peak, sum(live.values()))
        for value in list(live):
            if last_use.get(value, i) <= i:  # its last user has run (or it has none)
                del live[value]
    return peak


def count_model(ir: IR) -> ModelCounts:
    """Every count of :class:`ModelCounts` for ``ir`` (metadata propagated if missing)."""
    size_by_node, total_size = size_bytes_by_node(ir)
    layers: list[LayerCount] = []
    bitops = 0
    macs = 0
    for node in ir.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        meta = ir.meta(node)
        node_ops = node_bitops(meta.macs, meta.weight_bits, meta.act_bits)
        bitops += node_ops
        macs += meta.macs
        if not meta.macs and not meta.params:
            continue
        if node.op == "call_module":
            op = type(ir.gm.get_submodule(str(node.target))).__name__
        else:
            op = getattr(node.target, "__name__", str(node.target))
        layers.append(
            LayerCount(
                name=node.name,
                op=op,
                params=meta.params,
                macs=meta.macs,
                bitops=node_ops,
                weight_bits=meta.weight_bits,
                act_bits=meta.act_bits,
                size_bytes=size_by_node.get(node.name, 0),
            )
        )
    return ModelCounts(
        params=ir.param_count(),
        macs=macs,
        bitops=bitops,
        size_bytes=total_size,
        peak_activation_bytes=peak_activation_bytes(ir),
        layers=layers,
    )
