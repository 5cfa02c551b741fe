"""The DARTS search loop (Liu et al., ICLR 2019, Algorithm 1) with the paper's hyperparameters.

Each step first updates α on a validation batch (:class:`~nas.darts.architect.Architect`), then
the weights on a training batch. Defaults (sec. 3.1.1 / appendix A.1.1): weights by SGD, lr
0.025 cosine-annealed per epoch to 0.001, momentum 0.9, weight decay 3e-4, gradient norm
clipped at 5; α by Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3; 50 epochs, batch 64.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ir.errors import BadInputError, RunFailedError
from nas.darts.architect import Architect, frozen, unique_parameters


@dataclass
class SearchSettings:
    """Knobs of one search; the defaults are the paper's."""

    epochs: int = 50
    batch_size: int = 64
    order: int = 1
    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    steps_per_epoch: int = 0  # 0: as many as the smaller split allows
    progress: bool = False
    lean: bool = True


@dataclass
class SearchResult:
    """Per-epoch statistics and the mixture weights softmax(α) of every α after each epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    #: alpha_history[e][k]: softmax of unique α number k after epoch e (index 0: before search).
    alpha_history: list[list[list[float]]] = field(default_factory=list)


def cosine_epoch_lr(base: float, minimum: float, epoch: int, epochs: int) -> float:
    """The DARTS code's per-epoch cosine annealing (SGDR without restarts, eq. 5)."""
    if epochs <= 0:
        return base
    return minimum + (base - minimum) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def _loader(dataset: Dataset[Any], batch_size: int, generator: torch.Generator) -> DataLoader[Any]:
    n = len(dataset)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=n > batch_size,
        num_workers=0,
    )


def snapshot(alphas: Sequence[nn.Parameter]) -> list[list[float]]:
    return [torch.softmax(a.detach().float().cpu(), dim=-1).tolist() for a in alphas]


def weight_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: Sequence[nn.Parameter],
    alphas: Sequence[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    grad_clip: float,
    lean: bool = True,
) -> tuple[torch.Tensor, float]:
    """Algorithm 1, step 2: one SGD step of the weights on a training batch; (logits, loss).

    ``lean`` keeps α out of the autograd graph (their gradient is not used here), which also
    spares autograd from saving every candidate's output for it. A non-finite loss skips the
    update and is returned for the caller to report.
    """
    with frozen(alphas if lean else []):
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        value = float(loss.detach())
        if not math.isfinite(value):
            return logits.detach(), value
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(weights, grad_clip)
        optimizer.step()
    for a in alphas:
        a.grad = None
    return logits.detach(), value


def make_optimizers(
    model: nn.Module,
    weights: Sequence[nn.Parameter],
    alphas: Sequence[nn.Parameter],
    settings: SearchSettings,
) -> tuple[torch.optim.SGD, Architect]:
    """The weights' SGD and the :class:`Architect` (α's Adam) with ``settings``' hyperparameters."""
    optimizer = torch.optim.SGD(
        weights, lr=settings.w_lr, momentum=settings.w_momentum, weight_decay=settings.w_weight_decay
    )
    architect = Architect(
        model,
        weights,
        alphas,
        optimizer,
        order=settings.order,
        lr=settings.arch_lr,
        betas=settings.arch_betas,
        weight_decay=settings.arch_weight_decay,
        lean=settings.lean,
    )
    return optimizer, architect


def search(
    model: nn.Module,
    weights: Sequence[nn.Parameter],
    alphas: Sequence[nn.Parameter],
    train_set: Dataset[Any],
    val_set: Dataset[Any],
    settings: SearchSettings,
    device: torch.device,
    generator: torch.Generator,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> SearchResult:
    """Run the bi-level search in place on ``model``; returns what the reports and plots need."""
    if len(train_set) == 0 or len(val_set) == 0:  # type: ignore[arg-type]
        raise BadInputError("DARTS needs non-empty training and validation splits")
    weights = unique_parameters(weights)
    alphas = unique_parameters(alphas)
    if not alphas:
        raise BadInputError("the model has no architecture parameters to search")
    model.to(device)
    model.train()
    optimizer, architect = make_optimizers(model, weights, alphas, settings)
    result = SearchResult(alpha_history=[snapshot(alphas)])
    train_loader = _loader(train_set, settings.batch_size, generator)
    val_loader = _loader(val_set, settings.batch_size, generator)
    for epoch in range(settings.epochs):
        lr = cosine_epoch_lr(settings.w_lr, settings.w_lr_min, epoch, settings.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        steps = min(len(train_loader), len(val_loader))
        if settings.steps_per_epoch > 0:
            steps = min(steps, settings.steps_per_epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            total=steps,
            desc=f"darts {epoch + 1}/{settings.epochs}",
            unit="step",
            file=sys.stderr,
            disable=not settings.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for step, ((x_t, y_t), (x_v, y_v)) in enumerate(zip(train_loader, val_loader)):
            if step >= steps:
                break
            x_t, y_t, x_v, y_v = x_t.to(device), y_t.to(device), x_v.to(device), y_v.to(device)
            architect.step(x_t, y_t, x_v, y_v, xi=lr)
            logits, value = weight_step(
                model, optimizer, weights, alphas, x_t, y_t, settings.grad_clip, settings.lean
            )
            if not math.isfinite(value):
                bar.close()
                raise RunFailedError(
                    f"DARTS search diverged: loss is {value} at epoch {epoch + 1}, step {step + 1} "
                    f"(lower darts.w_lr, now {lr:.3g})"
                )
            batch = int(y_t.shape[0])
            loss_sum += value * batch
            correct += int((logits.detach().argmax(dim=1) == y_t).sum())
            seen += batch
            bar.update(1)
            if settings.progress:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        bar.close()
        stats = {
            "epoch": float(epoch + 1),
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "lr": lr,
            "steps": float(seen and steps),
        }
        result.history.append(stats)
        result.alpha_history.append(snapshot(alphas))
        if on_epoch is not None:
            on_epoch(epoch + 1, stats)
    optimizer.zero_grad(set_to_none=True)
    return result
