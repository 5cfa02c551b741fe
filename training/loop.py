"""The train and evaluate loops every pass shares.

Defaults follow common CIFAR practice: SGD with momentum 0.9 and weight decay, the learning
rate annealed per step on a cosine (Loshchilov & Hutter, SGDR, ICLR 2017, eq. 5 without
restarts: ``lr_t = lr_0 * (1 + cos(pi * t / T)) / 2``). All randomness (shuffling, dropout)
comes from the generator the caller passes, so one seed gives one result on CPU.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ir.errors import BadInputError, RunFailedError
from passes.base import TrainSettings

EpochCallback = Callable[[int, dict[str, float]], None]


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    *,
    drop_last: bool = False,
) -> DataLoader[Any]:
    """A single-process loader; shuffling draws from ``generator`` only (never the global RNG)."""
    if batch_size < 1:
        raise BadInputError(f"batch size must be at least 1, got {batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=0,
    )


def _logits(output: Any) -> torch.Tensor:
    """The classifier's logits: the output itself, or the first tensor of a tuple/list/dict output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    raise BadInputError(f"the model returned {type(output).__name__}; training needs a tensor of logits")


@contextmanager
def _seeded_global_rng(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (used by dropout and friends) from ``generator`` without leaking the change."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _forward(model: nn.Module, x: torch.Tensor, first: bool) -> torch.Tensor:
    """The model's logits; a failure on the very first batch is reported as a batch-size problem."""
    if not first:
        return _logits(model(x))
    try:
        return _logits(model(x))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(
            f"the model fails on a batch of {int(x.shape[0])} inputs of shape {tuple(x.shape[1:])}: {detail} "
            "(a .pt2 exported with a fixed batch size needs torch.export.Dim on the batch dimension)"
        ) from exc


def _check_fit(logits: torch.Tensor, y: torch.Tensor) -> None:
    """Labels must index the logits: a clear error instead of cross-entropy's index error."""
    if logits.dim() != 2:
        raise BadInputError(
            f"the model's output has shape {tuple(logits.shape)}; a classifier must output (batch, classes)"
        )
    if y.numel() and int(y.max()) >= logits.shape[1]:
        raise BadInputError(
            f"the data has label {int(y.max())} but the model has only {logits.shape[1]} outputs"
        )


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the body with ``count`` intra-op threads, then restore the previous count.

    On a busy 2-core machine two threads can be several times slower than one (measured:
    one training epoch 7.5 s with 1 thread against 41-55 s with 2 while other jobs ran),
    so passes train with the run's ``--threads``.
    """
    if not count or count < 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """SGDR's cosine annealing to zero over ``total_steps`` (Loshchilov & Hutter 2017, eq. 5)."""
    if total_steps <= 0:
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def default_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 5e-4, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """SGD with momentum over every trainable parameter of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BadInputError("the model has no trainable parameters")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_model(
    model: nn.Module,
    dataset: Dataset[Any],
    settings: TrainSettings,
    device: torch.device | str,
    generator: torch.Generator,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str = "train",
    on_epoch_end: EpochCallback | None = None,
    schedule: Literal["cosine", "constant"] = "cosine",
    weight_decay: float = 5e-4,
) -> list[dict[str, float]]:
    """Train ``model`` with cross-entropy for ``settings.epochs`` epochs; returns per-epoch stats.

    Each entry has ``epoch`` (1-based), ``loss`` (mean over samples), ``accuracy`` (top-1 in
    [0, 1]) and ``lr`` (at the epoch's end). Without ``optimizer`` it uses SGD with momentum 0.9
    and ``weight_decay``; ``schedule="cosine"`` anneals every parameter group's learning rate per
    step. A NaN or infinite loss raises :class:`RunFailedError` naming the epoch and step.
    """
    device = torch.device(device)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise BadInputError("the training split is empty")
    if settings.epochs < 0:
        raise BadInputError(f"epochs must be >= 0, got {settings.epochs}")
    model.to(device)
    if optimizer is None:
        optimizer = default_optimizer(model, settings.lr, weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    # A last batch of one sample breaks BatchNorm in training mode: drop it in that one case.
    drop_last = n > settings.batch_size and n % settings.batch_size == 1
    loader = make_loader(dataset, settings.batch_size, shuffle=True, generator=generator, drop_last=drop_last)
    total_steps = settings.epochs * len(loader)
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict[str, float]] = []
    step = 0
    model.train()
    with _seeded_global_rng(generator, device):
        for epoch in range(1, settings.epochs + 1):
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(
                loader,
                desc=f"{desc} {epoch}/{settings.epochs}",
                unit="batch",
                file=sys.stderr,
                disable=not settings.progress,
                leave=False,
                dynamic_ncols=True,
            )
            for batch_index, (x, y) in enumerate(bar, start=1):
                x, y = x.to(device), y.to(device)
                if schedule == "cosine":
                    for group, base in zip(optimizer.param_groups, base_lrs):
                        group["lr"] = cosine_lr(base, step, total_steps)
                optimizer.zero_grad(set_to_none=True)
                logits = _forward(model, x, first=step == 0)
                _check_fit(logits, y)
                loss = loss_fn(logits, y)
                value = float(loss.detach())
                if not math.isfinite(value):
                    bar.close()
                    raise RunFailedError(
                        f"training diverged: loss is {value} at epoch {epoch}, step {batch_index} "
                        f"({desc}; lower the learning rate, now {optimizer.param_groups[0]['lr']:.3g})"
                    )
                loss.backward()
                optimizer.step()
                step += 1
                batch = int(y.shape[0])
                loss_sum += value * batch
                correct += int((logits.detach().argmax(dim=1) == y).sum())
                seen += batch
                if settings.progress:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
            bar.close()
            stats = {
                "epoch": float(epoch),
                "loss": loss_sum / max(seen, 1),
                "accuracy": correct / max(seen, 1),
                "lr": float(optimizer.param_groups[0]["lr"]),
            }
            history.append(stats)
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)
    return history


def evaluate(
    model: nn.Module, dataset: Dataset[Any], batch_size: int, device: torch.device | str
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy in [0, 1] on ``dataset``, in eval mode.

    Every submodule's previous train/eval flag is restored afterwards, so evaluating in the
    middle of a training phase does not change it.
    """
    device = torch.device(device)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise BadInputError("cannot evaluate on an empty split")
    modes = _module_modes(model)
    model.to(device)
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    try:
        with torch.no_grad():
            for index, (x, y) in enumerate(make_loader(dataset, batch_size, shuffle=False, generator=None)):
                x, y = x.to(device), y.to(device)
                logits = _forward(model, x, first=index == 0)
                _check_fit(logits, y)
                loss_sum += float(loss_fn(logits, y))
                correct += int((logits.argmax(dim=1) == y).sum())
    finally:
        _restore_modes(modes)
    return loss_sum / n, correct / n
