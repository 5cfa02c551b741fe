"""The search loop: one joint step against autograd and the APG formula, the gradual budget."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.apg import soft_threshold
from fxsculpt.nas.dso.gating import gate_channels
from fxsculpt.nas.dso.search import SearchSettings, search
from fxsculpt.training.loop import make_loader
from tests.prune_models import TwoConvBN


def gated(seed: int = 0) -> IR:
    torch.manual_seed(seed)
    ir = IR.from_module(TwoConvBN().eval(), (1, 2, 4, 4))
    gate_channels(ir)
    with torch.no_grad():
        for module in ir.gm.modules():
            if isinstance(module, Gate):
                module.lam.uniform_(0.5, 1.5)
    return ir


def one_batch(n: int = 8, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


def test_a_joint_step_updates_weights_and_scales_from_one_batch():
    ir = gated()
    reference = copy.deepcopy(ir.gm).train()
    data = one_batch()
    eta, mu, gamma = 0.1, 0.9, 0.05
    # The reference gradient: autograd on the whole (single) batch at the starting point.
    x, y = data.tensors
    nn.functional.cross_entropy(reference(x), y).backward()
    expected: dict[str, torch.Tensor] = {}
    for name, p in reference.named_parameters():
        assert p.grad is not None
        if name.endswith("lam"):
            # First APG step (v = 0): z = S_ηγ(λ − η∇λ), v = z − λ, λ = max(0, z + μv).
            z = soft_threshold(p.detach() - eta * p.grad, eta * gamma)
            expected[name] = torch.clamp(z + mu * (z - p.detach()), min=0.0)
        else:
            expected[name] = p.detach() - eta * p.grad  # SGD with momentum, first step: p − η g
    settings = SearchSettings(
        epochs=1, batch_size=len(data), lr=eta, momentum=mu, gamma=gamma, weight_decay=0.0, grad_clip=1e9
    )
    search(ir, data, None, settings, torch.Generator().manual_seed(0), make_loader)
    for name, p in ir.gm.named_parameters():
        assert torch.allclose(p.detach(), expected[name], atol=1e-6), name


def test_the_gradual_budget_cuts_during_the_search_and_runs_every_epoch():
    ir = gated()
    data = one_batch()
    # 4x4 maps: conv1 16·2·4 = 128 MACs, conv2 16·4·3 = 192, fc 6: 326 in all.
    assert ir.mac_count() == 326
    settings = SearchSettings(
        epochs=3, batch_size=len(data), gamma=0.0, macs_target=166, budget_points=2, grad_clip=1e9
    )
    result = search(ir, data, None, settings, torch.Generator().manual_seed(0), make_loader)
    # One step per epoch, cuts after steps round(3/3) = 1 and round(6/3) = 2: half of the way
    # (326 − 80 = 246 MACs allowed) after epoch 1, the whole way (166) after epoch 2.
    assert result.history[0]["macs"] <= 246 < 326
    assert result.history[1]["macs"] <= 166
    assert len(result.history) == 3 and not result.stopped_early
    assert result.ranked_out >= 2
    assert ir.mac_count() <= 166
