"""The ``bitserial`` target: an analytical roofline of a bit-fusion accelerator (not a measurement).

ONNX Runtime on a CPU has no kernels below 8 bits, so the speed of 2–7-bit layers is
modelled after Bit Fusion (Sharma et al., ISCA 2018, section III): the array is made of
2-bit × 2-bit *BitBricks*; a multiply of a ``w``-bit weight by an ``a``-bit activation fuses
``(w'/2) × (a'/2)`` bricks, where ``w'``/``a'`` are the widths rounded up to the supported
powers of two (2, 4, 8; wider operands, including float layers costed as 32-bit, are
decomposed over several bricks the same way). Per layer:

    compute_s = MACs × (w'/2) × (a'/2) / (bricks × f)
    memory_s  = (packed weight bytes + input bytes + output bytes) / bandwidth
    latency   = max(compute_s, memory_s)      (roofline: transfers overlap compute)

or their sum with ``combine="sum"`` (no overlap). Layers without MACs (add, pooling, ...)
cost their memory term only. The defaults (8192 bricks = 512 fusion units of 16 at
500 MHz, as evaluated in the paper; 25.6 GB/s DRAM, one DDR4-3200 channel, an assumption)
are options; every number this target produces is labelled "analytical model, not a
measurement".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from fxsculpt.hardware.layers import LayerSignature, layer_groups
from fxsculpt.hardware.targets import ModelLatency, Target
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR

LABEL = "analytical model, not a measurement (bit-fusion roofline)"


def fused_width(bits: int | None, brick_bits: int = 2) -> int:
    """The operand width a bit-fusion array spends on ``bits`` (a power-of-two multiple of a brick)."""
    width = 32 if bits is None else int(bits)
    if width < 1:
        raise BadInputError(f"bit-width must be >= 1, got {width}")
    fused = brick_bits
    while fused < width:
        fused *= 2
    return fused


def signature_macs(sig: LayerSignature) -> int:
    """MACs of one layer (whole batch) from its signature: conv and linear only."""
    out_elems = math.prod(sig.out_shape)
    if sig.op == "conv":
        return out_elems * (sig.in_shape[1] // max(sig.groups, 1)) * math.prod(sig.kernel)
    if sig.op == "linear":
        return out_elems * sig.in_shape[-1]
    return 0


def signature_weight_count(sig: LayerSignature) -> int:
    if sig.op == "conv":
        return sig.out_shape[1] * (sig.in_shape[1] // max(sig.groups, 1)) * math.prod(sig.kernel)
    if sig.op == "linear":
        return sig.out_shape[-1] * sig.in_shape[-1]
    return 0


class BitserialTarget(Target):
    """Analytical bit-fusion roofline; ``threads`` is accepted and ignored."""

    name = "bitserial"
    label = LABEL
    analytical = True

    def __init__(
        self,
        threads: int = 1,
        bricks: int = 8192,
        brick_bits: int = 2,
        freq_mhz: float = 500.0,
        bandwidth_gbs: float = 25.6,
        combine: str = "max",
    ) -> None:
        super().__init__(threads)
        if bricks < 1 or brick_bits < 1 or freq_mhz <= 0 or bandwidth_gbs <= 0:
            raise BadInputError("bitserial parameters must be positive")
        if combine not in ("max", "sum"):
            raise BadInputError(f"bitserial combine must be 'max' or 'sum', got {combine!r}")
        self.bricks = bricks
        self.brick_bits = brick_bits
        self.freq_mhz = freq_mhz
        self.bandwidth_gbs = bandwidth_gbs
        self.combine = combine

    def identity(self) -> dict[str, Any]:
        return {
            "bricks": self.bricks,
            "brick_bits": self.brick_bits,
            "freq_mhz": self.freq_mhz,
            "bandwidth_gbs": self.bandwidth_gbs,
            "combine": self.combine,
        }

    def terms_ms(self, sig: LayerSignature) -> tuple[float, float]:
        """(compute, memory) milliseconds of one layer."""
        wb, ab = sig.weight_bits, sig.act_bits
        bricks_per_mac = (fused_width(wb, self.brick_bits) // self.brick_bits) * (
            fused_width(ab, self.brick_bits) // self.brick_bits
        )
        macs = signature_macs(sig)
        compute_s = macs * bricks_per_mac / (self.bricks * self.freq_mhz * 1e6)
        act_bits = 32 if ab is None else ab
        weight_bits = 32 if wb is None else wb
        nbytes = (
            signature_weight_count(sig) * weight_bits
            + (math.prod(sig.in_shape) + math.prod(sig.out_shape)) * act_bits
        ) / 8
        if sig.bias:
            nbytes += 4 * sig.out_shape[1]
        memory_s = nbytes / (self.bandwidth_gbs * 1e9)
        return compute_s * 1e3, memory_s * 1e3

    def layer_latency_ms(self, sig: LayerSignature, module: nn.Module | None = None) -> float:
        compute, memory = self.terms_ms(sig)
        return max(compute, memory) if self.combine == "max" else compute + memory

    def model_latency(self, ir: IR | None, onnx_path: Path | None, batch: int = 1) -> ModelLatency:
        if ir is None:
            raise BadInputError(
                "the bitserial target models a PyTorch IR (.pt, .pt2 or builtin:), not an ONNX file"
            )
        if batch != ir.input_shape[0]:
            ir = ir.clone()
            ir.input_shape = (batch, *ir.input_shape[1:])
            ir.propagate()
        total = 0.0
        per_layer = []
        for group in layer_groups(ir):
            if group.signature is None:
                continue
            ms = self.layer_latency_ms(group.signature)
            compute, memory = self.terms_ms(group.signature)
            total += ms
            per_layer.append({"node": group.main.name, "ms": ms, "compute_ms": compute, "memory_ms": memory})
        return ModelLatency(
            median_ms=total,
            p90_ms=total,
            spread_ok=True,
            label=self.label,
            analytical=True,
            details={"per_layer": per_layer, **self.identity()},
        )
