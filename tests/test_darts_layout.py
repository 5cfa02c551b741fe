"""The search's fast paths compute what the plain computation computes.

Phase-split dilated depthwise convolutions (:func:`nas.darts.ops.dilated_depthwise`) against
``nn.Conv2d`` itself and autograd's gradients of it; the gradient-layout shim of the mixed op
against the identity; and a channels-last search step against the same step in NCHW.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsculpt.nas.darts.mixed import grad_in_layout_of
from fxsculpt.nas.darts.ops import DilConv, Pool, SepConv, _MaxPoolFromInput, dilated_depthwise
from fxsculpt.nas.darts.search import SearchSettings, make_optimizers, weight_step
from fxsculpt.nas.darts.supernet import SearchNetwork


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(8, 10), (7, 9)])
def test_phase_split_equals_the_dilated_conv_and_its_gradients(
    channels_last: bool, stride: int, kernel: int, size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(
        5, 5, kernel, stride=stride, padding=kernel - 1, dilation=2, groups=5, bias=False
    ).double()
    x = torch.randn(3, 5, *size, dtype=torch.double)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    reference = conv(x)
    out = dilated_depthwise(conv, x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, [x, conv.weight], upstream, create_graph=True)
    got = torch.autograd.grad(out, [x, conv.weight], upstream, create_graph=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    # second order (the exact Hessian-vector product differentiates these gradients again)
    probe = torch.randn_like(x)
    expected2 = torch.autograd.grad((expected[0] * probe).sum() + (expected[1] ** 2).sum(), [x, conv.weight])
    got2 = torch.autograd.grad((got[0] * probe).sum() + (got[1] ** 2).sum(), [x, conv.weight])
    for g, e in zip(got2, expected2):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_dil_conv_uses_the_phase_split_only_while_training_with_gradients() -> None:
    op = DilConv(4, 4, 3, 1, 2, 2, affine=False, phase_split=True)
    calls = []
    original = op.depthwise.forward
    op.depthwise.forward = lambda x: calls.append(1) or original(x)  # type: ignore[method-assign]
    x = torch.randn(2, 4, 8, 8)
    op.train()
    op(x)
    assert calls == []  # computed by phase splitting, not by the dilated conv
    with torch.no_grad():
        op(x)
    op.eval()
    op(x)
    assert calls == [1, 1]


def test_gradient_through_the_layout_shim_is_the_identity_gradient_in_nhwc() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = x * 2.0
    shimmed = torch.cat([grad_in_layout_of(y), y], dim=1)
    plain = torch.cat([y, y], dim=1)
    upstream = torch.randn_like(plain).contiguous(memory_format=torch.channels_last)
    grads: list[torch.Tensor] = []
    y.register_hook(lambda g: grads.append(g))
    (g_shim,) = torch.autograd.grad(shimmed, x, upstream, retain_graph=True)
    (g_plain,) = torch.autograd.grad(plain, x, upstream)
    torch.testing.assert_close(g_shim, g_plain, rtol=0, atol=0)
    # The slice of the concatenation's gradient reached y's producer in y's own layout.
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def _two_steps(channels_last: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(3)
    model = SearchNetwork(num_classes=5, channels=4, layers=3, steps=2, multiplier=2)
    generator = torch.Generator().manual_seed(4)
    x_t, x_v = (torch.randn(8, 3, 8, 8, generator=generator) for _ in range(2))
    y_t, y_v = (torch.randint(0, 5, (8,), generator=generator) for _ in range(2))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x_t, x_v = (x.contiguous(memory_format=torch.channels_last) for x in (x_t, x_v))
    alphas = [*model._alphas["normal"], *model._alphas["reduce"]]
    initial = [a.detach().clone() for a in alphas]
    ids = {id(a) for a in alphas}
    weights = [p for p in model.parameters() if id(p) not in ids]
    settings = SearchSettings(order=2)
    optimizer, architect = make_optimizers(model, weights, alphas, settings)
    model.train()
    for _ in range(2):
        architect.step(x_t, y_t, x_v, y_v, xi=settings.w_lr)
        weight_step(model, optimizer, weights, alphas, x_t, y_t, settings.grad_clip)
    return initial, [a.detach().clone() for a in alphas], [w.detach().contiguous() for w in weights]


def test_a_channels_last_second_order_step_equals_the_nchw_step() -> None:
    _, alphas_cl, weights_cl = _two_steps(channels_last=True)
    initial, alphas, weights = _two_steps(channels_last=False)
    for a, b in zip(alphas_cl, alphas):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(weights_cl, weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(not torch.equal(a, b) for a, b in zip(alphas, initial))  # the α steps moved every α


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_from_input_matches_autograds_max_pool_to_second_order(
    stride: int, channels_last: bool
) -> None:
    """The search's max pooling keeps no indices; values, gradients and a double backward equal
    torch's own max pooling (float64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    pool = Pool("max", 4, stride, bn=True).double().train()
    ours = pool.pool  # the module the reference uses
    got = _MaxPoolFromInput.apply(x, stride)
    want = ours(x)
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    (g_got,) = torch.autograd.grad(got, x, g, create_graph=True)
    (g_want,) = torch.autograd.grad(want, x, g, create_graph=True)
    assert torch.equal(g_got, g_want)
    v = torch.randn_like(x)
    (h_got,) = torch.autograd.grad((g_got * v).sum() + (got**2).sum(), x)
    (h_want,) = torch.autograd.grad((g_want * v).sum() + (want**2).sum(), x)
    torch.testing.assert_close(h_got, h_want, rtol=0, atol=1e-12)


def test_sep_conv_training_step_equals_one_with_out_of_place_relus() -> None:
    """SepConv overwrites its first BatchNorm's output with the second ReLU while training; the
    output and every gradient equal the same op computed with out-of-place ReLUs."""
    torch.manual_seed(0)
    op = SepConv(4, 4, 3, 1, 1, affine=False).double().train()
    reference = copy.deepcopy(op)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    out = op(x)
    r = F.relu(x)
    want = reference.second.bn(
        reference.second.pointwise(reference.second.depthwise(F.relu(reference.first.body(r))))
    )
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x, *op.parameters()], g)
    want_grads = torch.autograd.grad(want, [x, *reference.parameters()], g)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.equal(a, b)
