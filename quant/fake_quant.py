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


#: Largest 8-bit weight code with ``reduce_range``: 7-bit codes, see :mod:`hardware.int8_arithmetic`.
REDUCED_8BIT_WEIGHT_LEVELS = 63


def weight_levels(bits: int, reduce_range: bool = False) -> int:
    """Largest code of a ``bits``-bit symmetric weight: ``2^(b-1)-1``, or 63 for 8 bits with ``reduce_range``.

    Only 8-bit weights need the reduced range on CPUs whose int8 kernels add product pairs in
    saturating 16 bits: below 8 bits the codes are at most ±64, and every pair of products with
    a uint8 activation fits already (255·64·2 = 32640 ≤ 32767).
    """
    if reduce_range and bits == 8:
        return REDUCED_8BIT_WEIGHT_LEVELS
    return positive_levels(bits, signed=True)


def weight_scale(
    weight: torch.Tensor, bits: int, per_channel: bool = True, reduce_range: bool = False
) -> torch.Tensor:
    """Symmetric max-abs scale ``max|w| / levels`` (:func:`weight_levels`), one per output channel or one in all.

    Returned detached: the scale is a statistic of the weights, not a path for gradients (STE).
    """
    w = weight.detach()
    peak = w.abs().flatten(1).amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    return (peak / weight_levels(bits, reduce_range)).clamp_min(EPS)


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


def affine_grid(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of 8-bit affine codes 0..255 over ``[min(low, 0), max(high, 0)]``,
    with 0.0 exactly on a code (the zero point rounded, as ``quantize_static``)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = max(high - low, EPS) / 255
    return scale, int(min(255, max(0, round(-low / scale))))


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


#: Largest int32 bias code kept: below 2^31 and exact in float32, since ONNX Runtime computes the
#: code in float32 and casts it to int32 (a float at or above 2^31 would overflow the cast).
BIAS_CODE_LIMIT = 2**31 - 2**7
#: Headroom for :func:`bias_safe_weight_scale`: a bias needs at most 2^30 steps of its grid.
BIAS_CODE_HEADROOM = 2**30


def bias_step(input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """The int32 bias grid ``s_x · s_w[c]`` of a quantized Conv/Gemm, one step per output channel.

    Integer kernels add the bias to the int32 accumulator, so it is stored with the accumulator's
    scale and zero point 0 (Jacob et al., CVPR 2018, §2.4). Computed in float32, product of the two
    float32 scales, exactly as ONNX Runtime's ``WeightBiasQuantization`` transformer computes it.
    """
    return torch.tensor(float(input_scale), dtype=torch.float32) * weight_scale.detach().to(torch.float32)


def snap_bias(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """``bias`` rounded onto its int32 grid: ``clamp(round(b / step)) · step`` (round half to even).

    ONNX Runtime rewrites a float bias of a Conv/Gemm whose input and weight are dequantized into
    ``DequantizeLinear(Cast<int32>(Round(b / (s_x · s_w))), s_x · s_w)`` before it fuses the
    layer, so the file computes with this rounded bias. Its rounding error is up to half a step,
    ``s_x · s_w / 2``, which at 2 to 4 bits (large ``s_w``) moves outputs by a sizeable fraction
    of their own quantization step. A bias already on the grid is left exactly as it is by
    ONNX Runtime's rewrite (``b / step`` is then an integer to within an ulp), so after this
    PyTorch and ONNX Runtime add the same bias.
    """
    step = bias_step(input_scale, weight_scale)
    codes = torch.round(bias.detach().to(torch.float32) / step).clamp(-BIAS_CODE_LIMIT, BIAS_CODE_LIMIT)
    return (codes * step).to(bias.dtype)


def bias_safe_weight_scale(
    weight_scale: torch.Tensor, bias: torch.Tensor | None, input_scale: float | None
) -> torch.Tensor:
    """Raise a channel's weight scale where its bias would not fit the int32 grid ``s_x · s_w``.

    The floor is ``|b| / (s_x · 2^30)`` (1e-7 for ``b = 1``, ``s_x = 0.01``), so only channels whose
    weights are (nearly) all zero are affected: with the minimal scale :data:`EPS` such a bias would
    need ~10^13 steps, far beyond int32, and ONNX Runtime's float-to-int32 cast would overflow.
    """
    if bias is None or input_scale is None:
        return weight_scale
    floor = bias.detach().abs().to(weight_scale.dtype) / (float(input_scale) * BIAS_CODE_HEADROOM)
    return torch.maximum(weight_scale, floor)
