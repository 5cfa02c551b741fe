"""APG and the soft threshold against hand-computed values (SSS eqs. 7-10; DSO-NAS section 3.3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsculpt.nas.dso.apg import APG, soft_threshold


def test_soft_threshold_matches_hand_values():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    # S_0.4(x) = sign(x) max(0, |x| - 0.4), by hand:
    expected = torch.tensor([-1.6, -0.1, 0.0, 0.0, 1.1])
    assert torch.allclose(soft_threshold(x, 0.4), expected, atol=1e-7)


def _step(opt: APG, lam: torch.nn.Parameter, grad: list[float]) -> None:
    lam.grad = torch.tensor(grad)
    opt.step()


def test_two_apg_steps_match_hand_computation():
    lam = torch.nn.Parameter(torch.tensor([1.0, 0.05, 0.5]))
    opt = APG([lam], lr=0.1, momentum=0.9, gamma=0.5)  # threshold ηγ = 0.05
    _step(opt, lam, [0.2, 0.1, -1.0])
    # v = 0; z = λ - ηg = [0.98, 0.04, 0.6]; S_0.05(z) = [0.93, 0, 0.55]
    # v = z - λ + v = [-0.07, -0.05, 0.05]; λ = z + μv = [0.867, -0.045 -> 0, 0.595]
    assert torch.allclose(lam.detach(), torch.tensor([0.867, 0.0, 0.595]), atol=1e-6)
    _step(opt, lam, [0.0, 0.0, 0.0])
    # v = 0.9 v = [-0.063, -0.045, 0.045]; z = S_0.05(λ) = [0.817, 0, 0.545]
    # v = z - λ + v = [-0.113, -0.045, -0.005]; λ = z + 0.9 v = [0.7153, -0.0405 -> 0, 0.5405]
    assert torch.allclose(lam.detach(), torch.tensor([0.7153, 0.0, 0.5405]), atol=1e-6)


def test_without_l1_and_momentum_apg_is_a_projected_gradient_step():
    lam = torch.nn.Parameter(torch.tensor([0.3, 0.02, 2.0]))
    grad = torch.tensor([1.0, 0.5, -3.0])
    opt = APG([lam], lr=0.1, momentum=0.0, gamma=0.0)
    expected = torch.clamp(lam.detach() - 0.1 * grad, min=0.0)
    lam.grad = grad
    opt.step()
    assert torch.allclose(lam.detach(), expected)


def test_per_group_gamma_thresholds_each_group_separately():
    a = torch.nn.Parameter(torch.tensor([0.5]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    opt = APG([{"params": [a], "gamma": 1.0}, {"params": [b], "gamma": 6.0}], lr=0.1, momentum=0.0)
    a.grad, b.grad = torch.zeros(1), torch.zeros(1)
    opt.step()
    assert (
        float(a.detach()) == pytest.approx(0.4) and float(b.detach()) == 0.0
    )  # 0.5 - 0.1·1 and max(0, 0.5 - 0.6)


@settings(max_examples=60, deadline=None)
@given(
    lam=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=6),
    grads=st.lists(st.lists(st.floats(-50.0, 50.0), min_size=6, max_size=6), min_size=1, max_size=5),
    lr=st.floats(1e-3, 1.0),
    mu=st.floats(0.0, 0.99),
    gamma=st.floats(0.0, 1.0),
)
def test_scales_never_go_negative(lam, grads, lr, mu, gamma):
    param = torch.nn.Parameter(torch.tensor(lam))
    opt = APG([param], lr=lr, momentum=mu, gamma=gamma)
    for g in grads:
        param.grad = torch.tensor(g[: len(lam)])
        opt.step()
        assert bool((param.detach() >= 0).all())
