"""DFQ: Differentiable Fine-grained Quantization (Cheng et al., 2018), searched on the IR.

Every searched layer (or group of its output channels) holds logits α over candidate widths
and computes with ``Σ_j softmax(α)_j · Q_{b_j}(w)`` (:class:`quant.modules.WeightQuantizer`).
The search solves (Cheng et al. 2018, §3.2)::

    min_α  G(α) = Σ_l Σ_c n_c Σ_j softmax(α_{l,g(c)})_j · b_j           (expected size, bits)
    s.t.   L_val(w*(α), α) − θ ≤ 0,     θ = L_val(float model) + tolerance

with weights trained on the training split and α on the validation split, alternating one step
each as first-order DARTS does (Liu et al., ICLR 2019, §2.3).

The constraint is handled by a Lagrange multiplier λ ≥ 0 updated by dual ascent,
``λ ← max(0, λ + η_λ (L_val − θ))`` (Boyd & Vandenberghe, *Convex Optimization*, §5.5.5; the
Lagrangian is ``G(α)/G_max + λ (L_val − θ)``). Why: a fixed penalty weight would have to be
tuned per model and data set to land on the constraint, whereas λ grows while the constraint is
violated (pushing α towards accuracy) and decays to zero while there is slack (pushing α
towards smaller widths), so the search settles where the loss meets θ without tuning.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ir.errors import RunFailedError
from quant.modules import WeightQuantizer


def expected_size_bits(quantizers: Mapping[str, WeightQuantizer]) -> torch.Tensor:
    """G(α): the expected storage in bits of the given layers (differentiable in every α)."""
    total = torch.zeros(())
    for module in quantizers.values():
        total = total + module.expected_size_bits().cpu()
    return total


def max_size_bits(quantizers: Mapping[str, WeightQuantizer]) -> float:
    """G at the widest candidate everywhere: the normalizer of the size term."""
    total = 0.0
    for module in quantizers.values():
        widest = max(module.candidates) if module.candidates else module.bits or 32
        total += module.weight_numel_per_channel() * module.out_channels * widest
    return max(total, 1.0)


class DualAscent:
    """A Lagrange multiplier for one inequality constraint ``c ≤ 0``: ``λ ← max(0, λ + η c)``."""

    def __init__(self, lr: float, initial: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError("the multiplier's step size must be positive")
        self.lr = lr
        self.value = max(0.0, float(initial))

    def update(self, violation: float) -> float:
        """One ascent step on the dual for the measured constraint value ``violation`` (= c)."""
        self.value = max(0.0, self.value + self.lr * float(violation))
        return self.value


@dataclass
class DFQSettings:
    """Search knobs; defaults are short enough for a 2-core CPU."""

    epochs: int = 2
    batch_size: int = 64
    weight_lr: float = 0.01
    arch_lr: float = 0.05
    dual_lr: float = 1.0
    initial_multiplier: float = 1.0
    theta: float = 1.0
    ema: float = 0.9
    progress: bool = True


@dataclass
class DFQHistory:
    """Per-epoch means: expected bits per weight, λ, validation loss, and the objective."""

    epochs: list[dict[str, float]] = field(default_factory=list)


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def search(
    model: nn.Module,
    searched: Mapping[str, WeightQuantizer],
    train: Dataset[Any],
    val: Dataset[Any],
    settings: DFQSettings,
    generator: torch.Generator,
    device: torch.device,
) -> DFQHistory:
    """Alternate weight steps on ``train`` and α steps on ``val`` under the dual-ascent multiplier.

    ``searched`` layers must have had :meth:`WeightQuantizer.enable_search` called. Returns the
    history; the logits are left in place for :func:`choose_bits`.
    """
    from training.loop import make_loader

    arch = [m.bit_logits for m in searched.values() if m.bit_logits is not None]
    arch_ids = {id(p) for p in arch}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in arch_ids]
    w_opt = torch.optim.SGD(weights, lr=settings.weight_lr, momentum=0.9, weight_decay=5e-4)
    a_opt = torch.optim.Adam(arch, lr=settings.arch_lr, betas=(0.5, 0.999))
    multiplier = DualAscent(settings.dual_lr, settings.initial_multiplier)
    g_max = max_size_bits(searched)
    n_weights = sum(m.weight_numel_per_channel() * m.out_channels for m in searched.values())
    loss_fn = nn.CrossEntropyLoss()
    train_loader = make_loader(train, settings.batch_size, True, generator, drop_last=True)
    val_batches = _cycle(make_loader(val, settings.batch_size, True, generator))
    history = DFQHistory()
    smoothed: float | None = None
    model.to(device).train()
    for epoch in range(1, settings.epochs + 1):
        sums = {"val_loss": 0.0, "avg_bits": 0.0, "multiplier": 0.0, "train_loss": 0.0}
        steps = 0
        bar = tqdm(
            train_loader,
            desc=f"dfq {epoch}/{settings.epochs}",
            unit="batch",
            file=sys.stderr,
            disable=not settings.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            # weights: one step on the training split (α fixed)
            w_opt.zero_grad(set_to_none=True)
            train_loss = loss_fn(model(x), y)
            train_loss.backward()
            w_opt.step()
            # α: one step on the validation split, on the Lagrangian G/G_max + λ (L_val − θ)
            xv, yv = next(val_batches)
            xv, yv = xv.to(device), yv.to(device)
            a_opt.zero_grad(set_to_none=True)
            w_opt.zero_grad(set_to_none=True)
            val_loss = loss_fn(model(xv), yv)
            size = expected_size_bits(searched)
            objective = size / g_max + multiplier.value * (val_loss.cpu() - settings.theta)
            objective.backward()
            a_opt.step()
            w_opt.zero_grad(set_to_none=True)  # α's step must not leak into the weights
            value = float(val_loss.detach())
            if not math.isfinite(value) or not math.isfinite(float(train_loss.detach())):
                raise RunFailedError(
                    f"DFQ search diverged (loss {value}) at epoch {epoch}; lower quantize.arch_lr"
                )
            smoothed = value if smoothed is None else settings.ema * smoothed + (1 - settings.ema) * value
            multiplier.update(smoothed - settings.theta)
            steps += 1
            sums["val_loss"] += value
            sums["train_loss"] += float(train_loss.detach())
            sums["multiplier"] += multiplier.value
            sums["avg_bits"] += float(expected_weight_bits(searched)) / max(n_weights, 1)
            if settings.progress:
                bar.set_postfix(val=f"{value:.3f}", lam=f"{multiplier.value:.2f}", refresh=False)
        bar.close()
        history.epochs.append({"epoch": float(epoch), **{k: v / max(steps, 1) for k, v in sums.items()}})
    return history


def expected_weight_bits(searched: Mapping[str, WeightQuantizer]) -> torch.Tensor:
    """Σ over searched weights of their expected width (no bias or scales): avg bits × count."""
    total = torch.zeros(())
    with torch.no_grad():
        for m in searched.values():
            widths = torch.tensor(m.candidates, dtype=torch.float32)
            per_group = m.probabilities().cpu() @ widths
            counts = torch.bincount(m.channel_groups(m.groups).cpu(), minlength=m.groups).float()
            total = total + m.weight_numel_per_channel() * (counts * per_group).sum()
    return total


def choose_bits(
    searched: Mapping[str, WeightQuantizer], budget_bits: float | None = None
) -> dict[str, list[int]]:
    """Discretize every group to its argmax width, then fit ``budget_bits`` if one is given.

    The budget (total weight bits of the searched layers) is met greedily: while over it, lower
    the group whose next lower candidate costs the least log-probability per bit saved; then,
    while under it, raise the group whose next higher candidate gains the most log-probability
    per bit spent, as long as it still fits. Without a budget this is the plain argmax
    (Cheng et al. 2018, §3.3).
    """
    state: list[tuple[str, int, int, list[int], torch.Tensor]] = []  # name, group, n, widths, logp
    choice: dict[tuple[str, int], int] = {}
    for name, m in searched.items():
        order = sorted(range(len(m.candidates)), key=lambda k: m.candidates[k])
        widths = [m.candidates[k] for k in order]
        logp = torch.log_softmax(m.bit_logits.detach().cpu(), dim=-1)[:, order]  # type: ignore[union-attr]
        counts = torch.bincount(m.channel_groups(m.groups).cpu(), minlength=m.groups).tolist()
        for g in range(m.groups):
            n = counts[g] * m.weight_numel_per_channel()
            state.append((name, g, n, widths, logp[g]))
            choice[(name, g)] = int(logp[g].argmax())

    def total() -> float:
        return float(sum(n * w[choice[(name, g)]] for name, g, n, w, _ in state))

    if budget_bits is not None:
        while total() > budget_bits:
            best, best_cost = None, math.inf
            for name, g, n, widths, logp in state:
                k = choice[(name, g)]
                if k == 0 or n == 0:
                    continue
                cost = float(logp[k] - logp[k - 1]) / ((widths[k] - widths[k - 1]) * n)
                if cost < best_cost:
                    best, best_cost = (name, g), cost
            if best is None:
                break  # every group is at its narrowest: the budget cannot be met
            choice[best] -= 1
        while True:
            room = budget_bits - total()
            best, best_gain = None, -math.inf
            for name, g, n, widths, logp in state:
                k = choice[(name, g)]
                if k + 1 >= len(widths) or n * (widths[k + 1] - widths[k]) > room:
                    continue
                gain = float(logp[k + 1] - logp[k]) / ((widths[k + 1] - widths[k]) * n)
                if gain > best_gain:
                    best, best_gain = (name, g), gain
            if best is None:
                break
            choice[best] += 1
    result: dict[str, list[int]] = {}
    for name, g, _, widths, _ in state:
        result.setdefault(name, []).append(widths[choice[(name, g)]])
    return result
