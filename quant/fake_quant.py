"""Uniform affine fake quantization with straight-through gradients.

``q = clamp(round(x / s) + z, q_min, q_max)`` and ``x̂ = (q − z) · s`` (Jacob et al., CVPR 2018,
eq. 1), round-half-to-even. Every function here goes through
``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``: their backward is the
straight-through estimator (gradient 1 inside the clip range, 0 outside; Bengio et al. 2013), and
with 8-bit ranges the dynamo exporter writes them as ONNX QuantizeLinear/DequantizeLinear pairs,
which ONNX Runtime fuses into integer kernels (TOOLCHAIN.md).

Widths below 8 are exported in an 8-bit *container*: activations are first clipped to the
``2^b`` levels of their width and then fake-quantized with the 8-bit range and the same scale,
which gives exactly the values of the ``b``-bit quantizer (the clip bounds are grid points).
"""

from __future__ import annotations

import torch

#: Bit-widths a quantizer accepts.
MIN_BITS, MAX_BITS = 2, 8
#: Smallest scale, so that an all-zero tensor does not divide by zero.
EPS = 1e-12


def check_bits(bits: int) -> int:
    """``bits`` itself when it is a supported width (2..8), else ``ValueError``."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bit-width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: ``[-2^(b-1), 2^(b-1)-1]`` or ``[0, 2^b-1]``."""
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def positive_levels(bits: int, signed: bool) -> int:
    """The largest code on the positive side: ``2^(b-1)-1`` (signed) or ``2^b-1`` (unsigned).

    A symmetric scale for a threshold ``t`` is ``t / positive_levels`` so that ``t`` is a grid point.
    """
    return quant_range(bits, signed)[1]


def weight_scale(weight: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Symmetric max-abs scale ``max|w| / (2^(b-1)-1)``, one per output channel (dim 0) or one in all.

    Returned detached: the scale is a statistic of the weights, not a path for gradients (STE).
    """
    w = weight.detach()
    peak = w.abs().flatten(1).amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    return (peak / positive_levels(bits, signed=True)).clamp_min(EPS)


def fake_quant_per_channel(
    x: torch.Tensor, scale: torch.Tensor, bits: int, axis: int = 0, signed: bool = True
) -> torch.Tensor:
    """Symmetric per-channel fake quantization of ``x`` at ``bits`` (zero point 0 or none).

    ``scale`` has one entry per slice of ``axis`` (or a single entry, broadcast). Gradient: STE.
    """
    qmin, qmax = quant_range(bits, signed)
    scale = scale.detach().to(torch.float32)
    if scale.numel() == 1 and x.shape[axis] != 1:
        scale = scale.reshape(1).expand(x.shape[axis]).contiguous()
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


def fake_quant_per_tensor(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """Per-tensor affine fake quantization with Python-number parameters (exported as QDQ at 8 bits)."""
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), int(qmin), int(qmax))


def activation_fake_quant(x: torch.Tensor, scale: float, bits: int, signed: bool) -> torch.Tensor:
    """Fake-quantize an activation at ``bits`` in the exportable uint8 container.

    Unsigned: codes ``0..2^b-1`` (zero point 0). Signed: symmetric codes ``-2^(b-1)..2^(b-1)-1``
    stored with zero point 128, so the exported tensor is uint8 either way: uint8 activations with
    int8 weights is the pattern ONNX Runtime fuses fully on CPU (TOOLCHAIN.md). Below 8 bits the
    input is clipped to the ``b``-bit grid first, which makes the 8-bit rounding land on it.
    """
    lo, hi = quant_range(bits, signed)
    zero_point = 128 if signed else 0
    if bits < 8:
        x = torch.clamp(x, lo * scale, hi * scale)
    return fake_quant_per_tensor(x, scale, zero_point, 0, 255)
