"""Fake quantization against a NumPy reference at every width, and its straight-through gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxsculpt.quant import fake_quant as fq
from fxsculpt.quant.modules import ActQuantizer, WeightQuantizer

BITS = list(range(2, 9))


def np_fake_quant(x: np.ndarray, scale: np.ndarray | float, qmin: int, qmax: int, zp: int = 0) -> np.ndarray:
    """Reference: q = clip(round_half_even(x / s) + z, qmin, qmax); x̂ = (q − z) s."""
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


@pytest.mark.parametrize("bits", BITS)
def test_weight_per_channel_matches_numpy(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).reshape(6, -1).max(axis=1) / qmax
    expected = np_fake_quant(w, scale[:, None, None, None], -(2 ** (bits - 1)), qmax)
    got = fq.fake_quant_per_channel(torch.from_numpy(w), fq.weight_scale(torch.from_numpy(w), bits), bits)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    # at most 2^b distinct levels per channel
    for c in range(6):
        assert len(np.unique(np.round(got.numpy()[c] / scale[c]))) <= 2**bits


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_activation_container_matches_numpy(bits: int, signed: bool) -> None:
    rng = np.random.default_rng(100 + bits)
    x = (rng.normal(size=(4, 5, 7)) * 2).astype(np.float32)
    scale = 0.037
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    expected = np_fake_quant(x, scale, lo, hi)  # the b-bit quantizer, zero point 0
    got = fq.activation_fake_quant(torch.from_numpy(x), scale, bits, signed)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    assert len(np.unique(np.round(got.numpy() / scale))) <= 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ste_gradient_is_identity_inside_the_clip_range(bits: int) -> None:
    scale = 0.1
    reach = 1.5 * 2 ** (bits - 1) * scale  # half again beyond the clip range on both sides
    x = torch.linspace(-reach, reach, 301, dtype=torch.float32, requires_grad=True)
    upstream = torch.randn(301, generator=torch.Generator().manual_seed(0))
    fq.activation_fake_quant(x, scale, bits, signed=True).backward(upstream)
    # autograd of the identity gives `upstream`; the STE passes it inside the range, zero outside
    ident = x.detach().clone().requires_grad_(True)
    ident.backward(upstream)
    lo, hi = -(2 ** (bits - 1)) * scale, (2 ** (bits - 1) - 1) * scale
    inside = (x.detach() > lo + 1e-6) & (x.detach() < hi - 1e-6)
    outside = (x.detach() < lo - 1e-6) | (x.detach() > hi + 1e-6)
    assert torch.equal(x.grad[inside], ident.grad[inside])
    assert torch.all(x.grad[outside] == 0)
    assert inside.any() and outside.any()


def test_weight_quantizer_gradient_reaches_weights_by_ste() -> None:
    conv = nn.Conv2d(2, 3, 3, bias=False)
    wq = WeightQuantizer(conv, bits=4)
    x = torch.randn(2, 2, 5, 5)
    wq(x).sum().backward()
    # reference: the same conv with the quantized weight treated as w (identity STE)
    w_ref = wq.quantized_weight().detach().requires_grad_(True)
    torch.nn.functional.conv2d(x, w_ref).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w_ref.grad)


def test_act_quantizer_observes_then_quantizes() -> None:
    q = ActQuantizer(bits=8, signed=False)
    q.start_observing()
    x = torch.rand(4, 10) * 3
    assert torch.equal(q(x), x)  # identity while observing
    t = q.calibrate("minmax")
    assert t == pytest.approx(float(x.max()))
    assert q.scale == pytest.approx(float(x.max()) / 255)
    expected = np_fake_quant(x.numpy(), q.scale, 0, 255)
    np.testing.assert_allclose(q(x).numpy(), expected, atol=1e-6)


def test_snap_bias_matches_numpy_int32_rounding() -> None:
    """Reference: ONNX Runtime's float32 ``Round(b / (s_x · s_w))`` times ``s_x · s_w``, in NumPy."""
    rng = np.random.default_rng(7)
    bias = rng.normal(scale=0.3, size=12).astype(np.float32)
    s_w = (rng.uniform(0.002, 0.4, size=12)).astype(np.float32)  # 8-bit to 2-bit sized steps
    s_x = 0.0314202776
    step = np.float32(s_x) * s_w
    expected = np.round(bias / step) * step
    got = fq.snap_bias(torch.from_numpy(bias), s_x, torch.from_numpy(s_w)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.abs(got - bias) <= step / 2 * (1 + 1e-6))
    # snapping is idempotent: ONNX Runtime's own rounding leaves a snapped bias unchanged
    again = fq.snap_bias(torch.from_numpy(got), s_x, torch.from_numpy(s_w)).numpy()
    np.testing.assert_array_equal(again, got)


def test_freeze_puts_the_bias_on_the_input_times_weight_grid() -> None:
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[1] = 0.0  # a dead channel: its scale must still give its bias room in int32
        conv.bias.copy_(torch.tensor([0.3, 0.5, -0.2, 0.01]))
    wq = WeightQuantizer(conv, bits=2)
    wq.freeze(input_scale=0.02)
    step = np.float32(0.02) * wq.scale.numpy()
    codes = conv.bias.detach().numpy() / step
    np.testing.assert_allclose(codes, np.round(codes), rtol=0, atol=1e-3)
    assert np.all(np.abs(codes) < 2**31)
    # the dead channel keeps its bias (to float32 precision), instead of a saturated int32 code
    assert float(conv.bias[1].detach()) == pytest.approx(0.5, rel=1e-6)
    # every other bias moved by at most half a step
    moved = np.abs(conv.bias.detach().numpy() - np.array([0.3, 0.5, -0.2, 0.01], dtype=np.float32))
    assert np.all(moved <= step / 2 * (1 + 1e-6))


def test_bad_bits_are_refused() -> None:
    for bits in (1, 9, 16):
        with pytest.raises(ValueError):
            fq.quant_range(bits, True)


def test_affine_act_quantizer_spreads_its_codes_over_min_max() -> None:
    """A SiLU-like range [-0.3, 5]: 256 codes from min to max, 0.0 on a code (hand-computed zero point)."""
    q = ActQuantizer(bits=8, signed=True, affine=True)
    q.start_observing()
    x = torch.linspace(-0.3, 5.0, 1000)
    q(x)
    q.calibrate("minmax")
    assert q.scale == pytest.approx(5.3 / 255)
    assert q.zero_point == round(0.3 / (5.3 / 255)) == 14
    expected = np_fake_quant(x.numpy(), q.scale, 0, 255, zp=14)
    np.testing.assert_allclose(q(x).numpy(), expected, atol=1e-6)
    assert float(q(torch.zeros(1))) == 0.0
    # half the step of symmetric codes (2·5/255), so at most about half the rounding error
    symmetric = ActQuantizer(bits=8, signed=True)
    symmetric.start_observing()
    symmetric(x)
    symmetric.calibrate("minmax")
    assert (q(x) - x).abs().max() <= q.scale / 2 + 1e-6 < (symmetric(x) - x).abs().max()
    # the range survives a state-dict round trip
    copy = ActQuantizer(bits=8, signed=True)
    copy.set_extra_state(q.get_extra_state())
    assert (copy.scale, copy.zero_point) == (q.scale, q.zero_point)


def test_affine_act_quantizer_is_symmetric_below_8_bits_and_for_other_calibrations() -> None:
    for bits, method in ((4, "minmax"), (8, "percentile")):
        q = ActQuantizer(bits=bits, signed=True, affine=True)
        q.start_observing()
        q(torch.linspace(-0.3, 5.0, 1000))
        q.calibrate(method, percentile=100.0)
        assert q.zero_point == 128
        assert q.scale == pytest.approx(5.0 / fq.positive_levels(bits, True), rel=1e-3)


def _frozen_on_grid(
    layer: nn.Module, bits: int, x: torch.Tensor
) -> tuple[WeightQuantizer, torch.Tensor, float]:
    """``layer`` frozen at ``bits`` behind an 8-bit affine input quantizer, in eval mode, and that
    quantizer's output for ``x`` (the layer's input on its grid) with the input scale."""
    aq = ActQuantizer(8, signed=True, affine=True)
    aq.start_observing()
    aq(x)
    aq.calibrate()
    wq = WeightQuantizer(layer, bits=bits)
    wq.freeze(input_scale=aq.scale)
    return wq.eval(), aq(x), aq.scale


def _int64_layer(wq: WeightQuantizer, x_hat: torch.Tensor, s_x: float) -> np.ndarray:
    """Reference in integers: int64 codes summed by NumPy (no float accumulation), int32 bias codes
    added, then scaled once in float64 and rounded to float32."""
    assert wq.scale is not None
    s_w = wq.scale.detach().double().numpy()
    w = wq.layer.weight.detach().double().numpy()
    w_codes = np.rint(w / s_w.reshape([-1] + [1] * (w.ndim - 1))).astype(np.int64)
    x_codes = np.rint(x_hat.double().numpy() / s_x).astype(np.int64)
    bias = wq.layer.bias.detach().double().numpy()
    b_codes = np.rint(bias / (s_x * s_w)).astype(np.int64)
    if isinstance(wq.layer, nn.Linear):
        total = x_codes @ w_codes.T + b_codes
        return (total * (s_x * s_w)).astype(np.float32)
    conv = wq.layer
    (ph, pw), (sh, sw), g = conv.padding, conv.stride, conv.groups
    padded = np.pad(x_codes, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, _, hp, wp = padded.shape
    oc, icg, kh, kw = w_codes.shape
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    total = np.zeros((n, oc, oh, ow), dtype=np.int64)
    per_group = oc // g
    for o in range(oc):
        grp = o // per_group
        for i in range(oh):
            for j in range(ow):
                patch = padded[:, grp * icg : (grp + 1) * icg, i * sh : i * sh + kh, j * sw : j * sw + kw]
                total[:, o, i, j] = (patch * w_codes[o]).sum(axis=(1, 2, 3))
    total += b_codes.reshape(1, -1, 1, 1)
    return (total * (s_x * s_w).reshape(1, -1, 1, 1)).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "make_layer, shape",
    [
        (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), (3, 6, 9, 9)),
        (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 7, 7)),  # depthwise
        (lambda: nn.Linear(300, 7), (5, 300)),
    ],
)
def test_a_frozen_layer_computes_what_integer_kernels_compute(make_layer, shape, bits: int) -> None:
    """Exact integer accumulation: a frozen layer on a quantized input gives, bit for bit, the
    int64 sum of code products plus the bias codes, scaled once; the float32 computation of the
    dequantized values only approximates it."""
    torch.manual_seed(bits)
    x = torch.randn(*shape) * 3
    wq, x_hat, s_x = _frozen_on_grid(make_layer(), bits, x)
    assert wq.computes_on_codes()
    expected = _int64_layer(wq, x_hat, s_x)
    with torch.no_grad():
        got = wq(x_hat).numpy()
        float_form = torch.func.functional_call(wq.layer, {"weight": wq.quantized_weight()}, (x_hat,)).numpy()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(float_form, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # with autograd on, the values are the same and the gradient is the float computation's
    x_grad = x_hat.clone().requires_grad_(True)
    out = wq(x_grad)
    np.testing.assert_array_equal(out.detach().numpy(), expected)
    out.sum().backward()
    reference = x_hat.clone().requires_grad_(True)
    torch.func.functional_call(wq.layer, {"weight": wq.quantized_weight()}, (reference,)).sum().backward()
    assert x_grad.grad is not None and reference.grad is not None
    torch.testing.assert_close(x_grad.grad, reference.grad)


def test_only_a_frozen_eval_layer_on_a_quantized_input_computes_on_codes() -> None:
    conv = nn.Conv2d(3, 4, 3)
    wq = WeightQuantizer(conv, bits=8).eval()
    assert not wq.computes_on_codes()  # not frozen
    wq.freeze(input_scale=None)
    assert not wq.computes_on_codes()  # a float input: no grid to read codes from
    wq.freeze(input_scale=0.05)
    assert wq.computes_on_codes()
    assert not wq.train().computes_on_codes()  # training-mode dropout may move inputs off the grid
    wq.eval().set_group_bits([4])
    assert not wq.computes_on_codes()  # new widths: no longer frozen
    wq.freeze(input_scale=0.05)
    restored = WeightQuantizer(nn.Conv2d(3, 4, 3), bits=8)
    restored.set_extra_state(wq.get_extra_state())  # what a checkpoint keeps
    assert restored.input_scale == 0.05 and restored.frozen
