"""Accelerated proximal gradient (APG) for the sparse scales λ (DSO-NAS, SSS).

The scales are trained on ``L(W, λ) + γ‖λ‖₁``. The L1 term is not differentiable at 0, so
λ takes a proximal step instead of a gradient step: Sparse Structure Selection (Huang & Wang,
ECCV 2018, section 3.3, eqs. 7-10) derives a Nesterov-accelerated proximal update and DSO-NAS
(Zhang et al., 2018, section 3.3) reuses it with the reformulation both codebases implement:

    v ← μ v
    z = λ − η ∇_λ L
    z = S_{ηγ}(z),          S_α(x) = sign(x) · max(0, |x| − α)      (soft threshold)
    v = z − λ + v
    λ = z + μ v
    λ = max(0, λ)

The last line is ours to state: λ is a non-negative scale (it multiplies a branch or a channel
group), so the update is projected back onto λ ≥ 0. The soft threshold makes scales exactly
zero, which is what lets the structure behind them be removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def soft_threshold(x: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """S_α(x) = sign(x) · max(0, |x| − α), the proximal operator of α‖·‖₁ (SSS, eq. 8)."""
    return torch.sign(x) * torch.clamp(x.abs() - alpha, min=0.0)


class APG(torch.optim.Optimizer):
    """The APG update above for parameters that are scales λ; no weight decay on λ.

    Options per parameter group: ``lr`` (η), ``momentum`` (μ), ``gamma`` (γ, the L1 weight; a
    tensor broadcastable to the parameter gives per-entry weights, as the adaptive-FLOPs
    variant needs) and ``nonneg`` (project onto λ ≥ 0, default true). The gradient must be that
    of the smooth loss only: the L1 term is handled by the soft threshold.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        gamma: float = 0.001,
        nonneg: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"APG needs a positive learning rate, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"APG momentum must be in [0, 1), got {momentum}")
        defaults = {"lr": lr, "momentum": momentum, "gamma": gamma, "nonneg": nonneg}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eta, mu, gamma = group["lr"], group["momentum"], group["gamma"]
            for lam in group["params"]:
                if lam.grad is None:
                    continue
                state = self.state[lam]
                if "v" not in state:
                    state["v"] = torch.zeros_like(lam)
                v = state["v"]
                threshold = eta * (gamma.to(lam) if isinstance(gamma, torch.Tensor) else gamma)
                v.mul_(mu)
                z = soft_threshold(lam - eta * lam.grad, threshold)
                v.add_(z - lam)
                lam.copy_(z + mu * v)
                if group["nonneg"]:
                    lam.clamp_(min=0.0)
        return loss
