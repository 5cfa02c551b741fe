"""The DARTS search loop (Liu et al., ICLR 2019, Algorithm 1) with the paper's hyperparameters.

Each step first updates α on a validation batch (:class:`~nas.darts.architect.Architect`), then
the weights on a training batch. Defaults (sec. 3.1.1 / appendix A.1.1): weights by SGD, lr
0.025 cosine-annealed per epoch to 0.001, momentum 0.9, weight decay 3e-4, gradient norm
clipped at 5; α by Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3; 50 epochs, batch 64.

Never losing work: with a :class:`~training.checkpoint.Checkpointer` the whole search state
(weights and α, both optimizers, the data generator and every RNG, the history) is saved after
each epoch, and a resumed search continues after the last saved epoch exactly as an uninterrupted
one would on CPU. Under torchrun both splits are sharded per global batch
(:mod:`training.distributed`) and every gradient, of the weights and of α, is averaged over the
ranks before its step, so α and the weights stay identical on every rank.

On CPU the search runs channels-last (NHWC) by default: oneDNN's depthwise and pooling kernels
are about twice as fast in that layout, the values are the same up to float summation order,
and the model is handed back in the ordinary layout.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fxsculpt.ir.errors import BadInputError, RunFailedError
from fxsculpt.nas.darts.architect import Architect, unique_parameters
from fxsculpt.training import distributed
from fxsculpt.training.checkpoint import Checkpointer, all_finite, restore_training_state, training_state
from fxsculpt.training.frozen import frozen


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
    #: fraction of those steps an epoch takes (rounded up); with steps_per_epoch, the smaller
    data_fraction: float = 1.0
    progress: bool = False
    lean: bool = True
    #: NHWC tensors during the search (faster oneDNN kernels on CPU); the model is returned NCHW.
    channels_last: bool = False

    def checkpoint_config(self, train_size: int, val_size: int) -> dict[str, Any]:
        """The settings a saved search depends on: a resume with other values is refused."""
        return {
            "kind": "darts-search",
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "order": self.order,
            "w_lr": self.w_lr,
            "w_lr_min": self.w_lr_min,
            "steps_per_epoch": self.steps_per_epoch,
            "data_fraction": self.data_fraction,
            "train_size": train_size,
            "val_size": val_size,
            "world_size": distributed.world_size(),
        }


@dataclass
class SearchResult:
    """Per-epoch statistics and the mixture weights softmax(α) of every α after each epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    #: alpha_history[e][k]: softmax of unique α number k after epoch e (index 0: before search).
    alpha_history: list[list[list[float]]] = field(default_factory=list)
    #: wall seconds of each epoch run in this call (not of epochs restored from a checkpoint)
    epoch_seconds: list[float] = field(default_factory=list)


def epoch_steps(settings: SearchSettings, train_batches: int, val_batches: int) -> int:
    """Search steps per epoch: one per pair of batches, times ``data_fraction`` (rounded up),
    capped at ``steps_per_epoch`` when that is set."""
    steps = min(train_batches, val_batches)
    if settings.data_fraction < 1.0:
        steps = min(steps, max(1, math.ceil(settings.data_fraction * steps - 1e-9)))
    if settings.steps_per_epoch > 0:
        steps = min(steps, settings.steps_per_epoch)
    return steps


def _duration(seconds: float) -> str:
    """``75`` → ``1:15``, ``3725`` → ``1:02:05``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def cosine_epoch_lr(base: float, minimum: float, epoch: int, epochs: int) -> float:
    """The DARTS code's per-epoch cosine annealing (SGDR without restarts, eq. 5)."""
    if epochs <= 0:
        return base
    return minimum + (base - minimum) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def _loader(dataset: Dataset[Any], batch_size: int, generator: torch.Generator) -> DataLoader[Any]:
    """Shuffled batches drawn from ``generator`` (this rank's shards of them under torchrun)."""
    n = len(dataset)  # type: ignore[arg-type]
    return distributed.shuffled_loader(dataset, batch_size, generator, drop_last=n > batch_size)


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An image batch in the search's memory layout."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


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
        if distributed.active() is not None:
            # The global mean loss on every rank (and the same NaN); the scaled local loss makes
            # the averaged gradient that of the global batch.
            totals = torch.tensor([value * len(y), float(len(y))], dtype=torch.float64)
            distributed.all_reduce_sum(totals)
            value = float(totals[0] / totals[1])
            loss = loss * distributed.local_loss_scale(len(y))
        if not math.isfinite(value):
            return logits.detach(), value
        loss.backward()
        distributed.average_gradients(weights)
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


def _global_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(correct, seen) of this step over every rank's shard."""
    counts = torch.tensor([float((logits.argmax(dim=1) == y).sum()), float(len(y))], dtype=torch.float64)
    distributed.all_reduce_sum(counts)
    return int(counts[0]), int(counts[1])


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
    checkpoint: Checkpointer | None = None,
) -> SearchResult:
    """Run the bi-level search in place on ``model``; returns what the reports and plots need.

    With ``checkpoint`` the state is saved after every epoch (never once it stopped being
    finite, so a diverged search keeps its last good checkpoint), and a resuming checkpointer
    continues after the last saved epoch; ``on_epoch`` is called for the epochs run in this call.
    """
    n_train, n_val = len(train_set), len(val_set)  # type: ignore[arg-type]
    if n_train == 0 or n_val == 0:
        raise BadInputError("DARTS needs non-empty training and validation splits")
    weights = unique_parameters(weights)
    alphas = unique_parameters(alphas)
    if not alphas:
        raise BadInputError("the model has no architecture parameters to search")
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    distributed.broadcast_parameters([*weights, *alphas])
    model.train()
    optimizer, architect = make_optimizers(model, weights, alphas, settings)
    result = SearchResult(alpha_history=[snapshot(alphas)])
    train_loader = _loader(train_set, settings.batch_size, generator)
    val_loader = _loader(val_set, settings.batch_size, generator)
    config = settings.checkpoint_config(n_train, n_val)
    first_epoch = 0
    saved = checkpoint.load_latest(config) if checkpoint is not None else None
    if saved is not None:
        extra = restore_training_state(
            saved,
            modules={"model": model},
            optimizers={"weights": optimizer, "alpha": architect.optimizer},
            generators={"data": generator},
        )
        first_epoch = int(extra["epoch"])
        result.history = [dict(h) for h in extra["history"]]
        result.alpha_history = [[list(w) for w in epoch] for epoch in extra["alpha_history"]]
    log = logging.getLogger("fxsculpt")
    show = settings.progress and distributed.is_main_process()
    steps = epoch_steps(settings, len(train_loader), len(val_loader))
    if show and first_epoch < settings.epochs:
        log.info(
            "darts: %d epoch(s) of %d steps (batch %d, order %d, %d weight and %d α images)",
            settings.epochs - first_epoch,
            steps,
            settings.batch_size,
            settings.order,
            n_train,
            n_val,
        )
    started = time.perf_counter()
    # One bar for the whole search, so that its ETA is the search's; log lines go around it.
    bar = tqdm(
        total=steps * settings.epochs,
        initial=steps * min(first_epoch, settings.epochs),
        desc="darts",
        unit="step",
        file=sys.stderr,
        disable=not show,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(first_epoch, settings.epochs):
            epoch_start = time.perf_counter()
            stats = _search_epoch(
                model,
                optimizer,
                architect,
                weights,
                alphas,
                train_loader,
                val_loader,
                settings,
                epoch,
                device,
                bar,
            )
            distributed.broadcast_buffers(model)
            now = time.perf_counter()
            result.epoch_seconds.append(now - epoch_start)
            if show:
                done = epoch + 1 - first_epoch
                left = (now - started) / done * (settings.epochs - epoch - 1)
                with logging_redirect_tqdm():
                    log.info(
                        "darts: epoch %d/%d in %s (%.2f s/step), loss %.3f, accuracy %.3f; elapsed %s, ETA %s",
                        epoch + 1,
                        settings.epochs,
                        _duration(now - epoch_start),
                        (now - epoch_start) / max(stats["steps"], 1.0),
                        stats["train_loss"],
                        stats["train_accuracy"],
                        _duration(now - started),
                        _duration(left),
                    )
            result.history.append(stats)
            result.alpha_history.append(snapshot(alphas))
            if checkpoint is not None and all_finite(model):
                state = training_state(
                    modules={"model": model},
                    optimizers={"weights": optimizer, "alpha": architect.optimizer},
                    generators={"data": generator},
                    epoch=epoch + 1,
                    history=result.history,
                    alpha_history=result.alpha_history,
                )
                checkpoint.save(epoch + 1, {**state, "config": config})
            if on_epoch is not None:
                on_epoch(epoch + 1, stats)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        if settings.channels_last:
            model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return result


def _search_epoch(
    model: nn.Module,
    optimizer: torch.optim.SGD,
    architect: Architect,
    weights: Sequence[nn.Parameter],
    alphas: Sequence[nn.Parameter],
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    settings: SearchSettings,
    epoch: int,
    device: torch.device,
    bar: tqdm[Any],
) -> dict[str, float]:
    """One epoch of Algorithm 1: for each pair of batches an α step, then a weight step."""
    lr = cosine_epoch_lr(settings.w_lr, settings.w_lr_min, epoch, settings.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr
    steps = epoch_steps(settings, len(train_loader), len(val_loader))
    loss_sum, correct, seen = 0.0, 0, 0
    bar.set_description(f"darts epoch {epoch + 1}/{settings.epochs}", refresh=False)
    for step, ((x_t, y_t), (x_v, y_v)) in enumerate(zip(train_loader, val_loader)):
        if step >= steps:
            break
        x_t, x_v = (_layout(x.to(device), settings.channels_last) for x in (x_t, x_v))
        y_t, y_v = y_t.to(device), y_v.to(device)
        architect.step(x_t, y_t, x_v, y_v, xi=lr)
        logits, value = weight_step(
            model, optimizer, weights, alphas, x_t, y_t, settings.grad_clip, settings.lean
        )
        if not math.isfinite(value):
            raise RunFailedError(
                f"DARTS search diverged: loss is {value} at epoch {epoch + 1}, step {step + 1} "
                f"(lower darts.w_lr, now {lr:.3g})"
            )
        hits, batch = _global_hits(logits, y_t)
        loss_sum += value * batch
        correct += hits
        seen += batch
        bar.update(1)
        if bar.disable is False:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    return {
        "epoch": float(epoch + 1),
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "lr": lr,
        "steps": float(seen and steps),
    }
