"""The α step of DARTS' bi-level optimization (Liu et al., ICLR 2019, sec. 2.3, Algorithm 1).

First order: α follows ∇_α L_val(w, α) (ξ = 0). Second order (eq. 6–8): α follows

    ∇_α L_val(w', α) − ξ ∇²_{α,w} L_train(w, α) ∇_{w'} L_val(w', α),   w' = w − ξ ∇_w L_train(w, α)

with the Hessian-vector product by central finite differences (eq. 8):

    ∇²_{α,w} L_train(w, α) v ≈ (∇_α L_train(w⁺, α) − ∇_α L_train(w⁻, α)) / (2ε),
    w± = w ± ε v,   v = ∇_{w'} L_val(w', α),   ε = 0.01 / ‖v‖.

As in the DARTS code, the unrolled step is one step of the weight optimizer: the gradient
includes weight decay and the momentum buffer (``w' = w − ξ (μ m + ∇_w L_train + λ w)``).

Memory: the unrolled weights are written into the model's own parameters and restored from one
saved copy (no second model); every gradient is taken with ``torch.autograd.grad`` for only the
tensors it needs (α alone for the three α-gradients), so each graph is freed as soon as it has
been differentiated and no weight gradient is computed that is not used. ``lean=False`` runs the
DARTS code's way instead (a copied model for w', ``backward()`` into every ``.grad``): the
benchmark's baseline.

Under torchrun each rank holds a shard of every batch: each loss is scaled so that gradients
averaged over the ranks are those of the global batch's mean loss, and every gradient the α
step uses (the train gradient of the unrolled step, ∇_{w'} L_val, ∇_α L_val and the
finite-difference HVP) is averaged before use, so all ranks take the same α step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fxsculpt.training import distributed
from fxsculpt.training.frozen import frozen

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The search objective on one batch: mean cross-entropy of the model's logits."""
    return nn.functional.cross_entropy(model(x), y)


def unique_parameters(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` without repeats (tied α appear once per cell that shares them)."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Euclidean norm of a list of tensors taken as one vector (in float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        total = total + (t.detach().double() ** 2).sum().cpu()
    return torch.sqrt(total)


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params, zeros for parameters the loss does not reach."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def finite_difference_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: Sequence[nn.Parameter],
    alphas: Sequence[nn.Parameter],
    vector: Sequence[torch.Tensor],
    epsilon_scale: float = 0.01,
) -> list[torch.Tensor]:
    """∇²_{α,w} L(w, α) v by central differences (DARTS eq. 8), the weights restored after.

    ε = ``epsilon_scale`` / ‖v‖; the quotient divides by 2ε (it does not multiply by ε/2).
    """
    norm = _norm(vector)
    epsilon = epsilon_scale / float(norm) if float(norm) > 0 else 0.0
    if epsilon == 0.0:
        return [torch.zeros_like(a) for a in alphas]
    with torch.no_grad():
        for w, v in zip(weights, vector):
            w.add_(v, alpha=epsilon)
    with frozen(weights):
        grad_plus = _grads(loss_fn(model, x, y), alphas)
    with torch.no_grad():
        for w, v in zip(weights, vector):
            w.sub_(v, alpha=2 * epsilon)
    with frozen(weights):
        grad_minus = _grads(loss_fn(model, x, y), alphas)
    with torch.no_grad():
        for w, v in zip(weights, vector):
            w.add_(v, alpha=epsilon)
    return [(gp - gm) / (2 * epsilon) for gp, gm in zip(grad_plus, grad_minus)]


class Architect:
    """Owns the α optimizer (Adam) and computes the α gradient of each search step."""

    def __init__(
        self,
        model: nn.Module,
        weights: Sequence[nn.Parameter],
        alphas: Sequence[nn.Parameter],
        weight_optimizer: torch.optim.SGD,
        *,
        order: int = 1,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 1e-3,
        loss_fn: LossFn = cross_entropy_loss,
        lean: bool = True,
        epsilon_scale: float = 0.01,
    ) -> None:
        if order not in (1, 2):
            raise ValueError("DARTS order must be 1 or 2")
        self.model = model
        self.weights = unique_parameters(weights)
        self.alphas = unique_parameters(alphas)
        self.weight_optimizer = weight_optimizer
        self.order = order
        self.loss_fn = loss_fn
        self.lean = lean
        self.optimizer = torch.optim.Adam(self.alphas, lr=lr, betas=betas, weight_decay=weight_decay)
        self.epsilon_scale = epsilon_scale  # eq. 8: ε = 0.01 / ‖∇_{w'} L_val‖ in the paper
        self.last_hvp_norm: float | None = None

    def _shard_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss on this rank's shard, scaled so that rank-averaged gradients are the global ones."""
        return self.loss_fn(model, x, y) * distributed.local_loss_scale(len(y))

    @staticmethod
    def _averaged(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        distributed.average_tensors(grads)
        return grads

    # -- the unrolled model (eq. 6) ----------------------------------------------------------
    def _unrolled_direction(self, train_grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """μ m + g + λ w for each weight: the step the weight optimizer would take (times lr)."""
        group = self.weight_optimizer.param_groups[0]
        momentum, decay = float(group.get("momentum", 0.0)), float(group.get("weight_decay", 0.0))
        out = []
        for w, g in zip(self.weights, train_grads):
            d = g + decay * w.detach() if decay else g.clone()
            buf = self.weight_optimizer.state.get(w, {}).get("momentum_buffer")
            if momentum and buf is not None:
                d = d + momentum * buf
            out.append(d)
        return out

    def second_order_grads(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        xi: float,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(∇_α L_val(w', α), HVP) of eq. 7–8; the α gradient is ``first − ξ · HVP``."""
        if not self.lean:
            return self._second_order_reference(x_train, y_train, x_val, y_val, xi)
        with frozen(self.alphas):
            train_grads = self._averaged(_grads(self._shard_loss(self.model, x_train, y_train), self.weights))
        direction = self._unrolled_direction(train_grads)
        del train_grads
        saved = [w.detach().clone() for w in self.weights]
        try:
            with torch.no_grad():
                for w, d in zip(self.weights, direction):
                    w.sub_(d, alpha=xi)
            del direction
            grads = self._averaged(
                _grads(self._shard_loss(self.model, x_val, y_val), [*self.alphas, *self.weights])
            )
            dalpha, vector = grads[: len(self.alphas)], grads[len(self.alphas) :]
        finally:
            with torch.no_grad():
                for w, s in zip(self.weights, saved):
                    w.copy_(s)
        del saved
        hvp = finite_difference_hvp(
            self.model,
            self._shard_loss,
            x_train,
            y_train,
            self.weights,
            self.alphas,
            vector,
            self.epsilon_scale,
        )
        return dalpha, self._averaged(hvp)

    def _second_order_reference(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        xi: float,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The DARTS code's formulation: a copied unrolled model, full ``backward()`` calls."""
        for p in self.model.parameters():
            p.grad = None
        loss = self.loss_fn(self.model, x_train, y_train)
        train_grads = [
            torch.zeros_like(w) if g is None else g
            for w, g in zip(self.weights, torch.autograd.grad(loss, self.weights, allow_unused=True))
        ]
        direction = self._unrolled_direction(train_grads)
        unrolled = copy.deepcopy(self.model)
        index = {id(p): i for i, p in enumerate(self.weights)}
        alpha_index = {id(p): i for i, p in enumerate(self.alphas)}
        u_weights: list[nn.Parameter | None] = [None] * len(self.weights)
        u_alphas: list[nn.Parameter | None] = [None] * len(self.alphas)
        for (_, p), (_, q) in zip(
            self.model.named_parameters(remove_duplicate=False),
            unrolled.named_parameters(remove_duplicate=False),
        ):
            if id(p) in index:
                u_weights[index[id(p)]] = q
            elif id(p) in alpha_index:
                u_alphas[alpha_index[id(p)]] = q
        with torch.no_grad():
            for uq, w, d in zip(u_weights, self.weights, direction):
                assert uq is not None
                uq.copy_(w - xi * d)
        unrolled.zero_grad(set_to_none=True)
        self.loss_fn(unrolled, x_val, y_val).backward()
        dalpha = [
            torch.zeros_like(a) if q is None or q.grad is None else q.grad.clone()
            for a, q in zip(self.alphas, u_alphas)
        ]
        vector = [
            torch.zeros_like(w) if q is None or q.grad is None else q.grad.clone()
            for w, q in zip(self.weights, u_weights)
        ]
        del unrolled
        norm = _norm(vector)
        epsilon = self.epsilon_scale / float(norm)
        grads = []
        for sign in (1.0, -2.0):
            with torch.no_grad():
                for w, v in zip(self.weights, vector):
                    w.add_(v, alpha=sign * epsilon)
            grads.append(_grads(self.loss_fn(self.model, x_train, y_train), self.alphas))
        with torch.no_grad():
            for w, v in zip(self.weights, vector):
                w.add_(v, alpha=epsilon)
        for p in self.model.parameters():
            p.grad = None
        hvp = [(gp - gm) / (2 * epsilon) for gp, gm in zip(*grads)]
        return dalpha, hvp

    # -- one α step ---------------------------------------------------------------------------
    def alpha_gradients(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        xi: float,
    ) -> list[torch.Tensor]:
        """The α gradient of this step: eq. 5 (first order) or eq. 7 with eq. 8 (second order)."""
        if self.order == 1:
            if self.lean:
                with frozen(self.weights):
                    return self._averaged(_grads(self._shard_loss(self.model, x_val, y_val), self.alphas))
            for p in self.model.parameters():
                p.grad = None
            self.loss_fn(self.model, x_val, y_val).backward()
            out = [torch.zeros_like(a) if a.grad is None else a.grad.clone() for a in self.alphas]
            for p in self.model.parameters():
                p.grad = None
            return out
        dalpha, hvp = self.second_order_grads(x_train, y_train, x_val, y_val, xi)
        self.last_hvp_norm = float(_norm(hvp))
        return [g - xi * h for g, h in zip(dalpha, hvp)]

    def step(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        xi: float,
    ) -> None:
        """Update α with Adam along :meth:`alpha_gradients` (Algorithm 1, step 1)."""
        grads = self.alpha_gradients(x_train, y_train, x_val, y_val, xi)
        self.optimizer.zero_grad(set_to_none=True)
        for a, g in zip(self.alphas, grads):
            a.grad = g
        self.optimizer.step()
        for a in self.alphas:
            a.grad = None
