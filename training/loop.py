"""The train and evaluate loops every pass shares.

Defaults follow common CIFAR practice: SGD with momentum 0.9 and weight decay, the learning
rate annealed per step on a cosine (Loshchilov & Hutter, SGDR, ICLR 2017, eq. 5 without
restarts: ``lr_t = lr_0 * (1 + cos(pi * t / T)) / 2``). All randomness (shuffling, dropout)
comes from the generator the caller passes, so one seed gives one result on CPU.

Under torchrun the loop trains data-parallel (:mod:`training.distributed`): the batch size is the
global batch, shared by the ranks, and the model is wrapped in DDP. With a
:class:`~training.checkpoint.Checkpointer` it saves its whole state after every epoch and, when
resuming, continues after the last saved epoch with the same result as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fxsculpt.ir.errors import BadInputError, RunFailedError, first_line
from fxsculpt.passes.base import TrainSettings
from fxsculpt.training import distributed
from fxsculpt.training.checkpoint import Checkpointer, all_finite, capture_rng, restore_rng

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
    """Seed the global RNG (used by dropout and friends) from ``generator`` without leaking the change.

    Under torchrun each rank gets its own seed (rank 0 the one-process seed), so dropout masks differ.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(distributed.rank_seed_offset(seed))
        yield


def _forward(model: nn.Module, x: torch.Tensor, first: bool) -> torch.Tensor:
    """The model's logits; a failure on the very first batch is reported as a batch-size problem."""
    if not first:
        return _logits(model(x))
    try:
        return _logits(model(x))
    except RuntimeError as exc:
        detail = first_line(exc)
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


def _checkpoint_config(
    settings: TrainSettings, n: int, base_lrs: list[float], schedule: str, desc: str
) -> dict[str, Any]:
    """The settings a saved training state depends on; resuming with others is refused."""
    return {
        "desc": desc,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "base_lrs": [float(lr) for lr in base_lrs],
        "schedule": schedule,
        "samples": n,
        "world_size": distributed.world_size(),
    }


def _load_checkpoint(
    checkpoint: Checkpointer,
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any] | None:
    """Restore weights and optimizer from the latest checkpoint; returns it (RNGs are restored later)."""
    state = checkpoint.load_latest(config)
    if state is None:
        return None
    if state.get("kind") != "train_model":
        raise BadInputError(f"{checkpoint.folder} holds a checkpoint of another kind ({state.get('kind')!r})")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = first_line(exc)
        raise BadInputError(
            f"the checkpoint in {checkpoint.folder} does not fit this model or optimizer ({detail}); "
            "resume with the same command"
        ) from exc
    return state


def _save_checkpoint(
    checkpoint: Checkpointer,
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    base_lrs: list[float],
    epoch: int,
    step: int,
    history: list[dict[str, float]],
    desc: str,
) -> None:
    """Save the state at the end of ``epoch``; every rank takes part (global RNG states are per rank)."""
    if not all_finite(model):
        raise RunFailedError(
            f"training diverged: the weights are no longer finite after epoch {epoch} ({desc}; "
            "the last good checkpoint was kept; lower the learning rate)"
        )
    global_states = distributed.gather_objects(torch.get_rng_state())
    checkpoint.save(
        epoch,
        {
            "kind": "train_model",
            "config": config,
            "epoch": epoch,
            "global_step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "base_lrs": list(base_lrs),
            "history": [dict(h) for h in history],
            "rng": capture_rng({"loop": generator}),
            "rank_torch_rng": global_states,
        },
    )


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
    checkpoint: Checkpointer | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` with cross-entropy for ``settings.epochs`` epochs; returns per-epoch stats.

    Each entry has ``epoch`` (1-based), ``loss`` (mean over samples), ``accuracy`` (top-1 in
    [0, 1]) and ``lr`` (at the epoch's end). Without ``optimizer`` it uses SGD with momentum 0.9
    and ``weight_decay``; ``schedule="cosine"`` anneals every parameter group's learning rate per
    step. A NaN or infinite loss raises :class:`RunFailedError` naming the epoch and step.

    With ``checkpoint``, the weights, optimizer state, schedule position, history and RNG states
    are saved after every epoch (never once the weights stopped being finite, so a diverged run
    keeps its last good checkpoint); when the checkpointer resumes, training continues after the
    last saved epoch, and ``on_epoch_end`` is called only for the epochs trained in this call.
    Under torchrun (see :mod:`training.distributed`) ``settings.batch_size`` is the global batch.
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
    info = distributed.active()
    # A last batch of one sample breaks BatchNorm in training mode: drop it in that one case.
    drop_last = n > settings.batch_size and n % settings.batch_size == 1
    if info is None:
        loader = make_loader(
            dataset, settings.batch_size, shuffle=True, generator=generator, drop_last=drop_last
        )
    else:
        loader = distributed.make_sharded_loader(
            dataset, settings.batch_size, generator, drop_last=drop_last, info=info
        )
    total_steps = settings.epochs * len(loader)
    config = _checkpoint_config(settings, n, base_lrs, schedule, desc)
    history: list[dict[str, float]] = []
    step = 0
    first_epoch = 1
    resumed = _load_checkpoint(checkpoint, config, model, optimizer) if checkpoint is not None else None
    if checkpoint is not None and resumed is not None:
        base_lrs = [float(lr) for lr in resumed["base_lrs"]]
        history = [dict(h) for h in resumed["history"]]
        step = int(resumed["global_step"])
        first_epoch = int(resumed["epoch"]) + 1
        if distributed.is_main_process():
            logging.getLogger("fxsculpt").info(
                "%s: resuming after epoch %d of %d from %s",
                desc,
                first_epoch - 1,
                settings.epochs,
                checkpoint.folder,
            )
    net: nn.Module = model if info is None else distributed.wrap_ddp(model, info)
    loss_fn = nn.CrossEntropyLoss(reduction="mean" if info is None else "sum")
    show_progress = settings.progress and distributed.is_main_process()
    model.train()
    try:
        with _seeded_global_rng(generator, device):
            if resumed is not None:
                restore_rng(resumed["rng"], {"loop": generator})
                torch.set_rng_state(resumed["rank_torch_rng"][distributed.rank()])
            for epoch in range(first_epoch, settings.epochs + 1):
                loss_sum, correct, seen = 0.0, 0, 0
                bar = tqdm(
                    loader,
                    desc=f"{desc} {epoch}/{settings.epochs}",
                    unit="batch",
                    file=sys.stderr,
                    disable=not show_progress,
                    leave=False,
                    dynamic_ncols=True,
                )
                for batch_index, (x, y) in enumerate(bar, start=1):
                    x, y = x.to(device), y.to(device)
                    if schedule == "cosine":
                        for group, base in zip(optimizer.param_groups, base_lrs):
                            group["lr"] = cosine_lr(base, step, total_steps)
                    optimizer.zero_grad(set_to_none=True)
                    logits = _forward(net, x, first=step == 0)
                    _check_fit(logits, y)
                    loss = loss_fn(logits, y)
                    hits = int((logits.detach().argmax(dim=1) == y).sum())
                    if info is None:
                        value, batch = float(loss.detach()), int(y.shape[0])
                    else:
                        # Global sums over the ranks' shards: every rank sees the same value (and the
                        # same NaN), and the scaled loss makes DDP's gradient average the global mean.
                        totals = torch.tensor(
                            [float(loss.detach()), float(y.shape[0]), float(hits)], dtype=torch.float64
                        )
                        distributed.all_reduce_sum(totals)
                        batch = int(totals[1])
                        value = float(totals[0]) / batch
                        hits = int(totals[2])
                        loss = loss * (info.world_size / batch)
                    if not math.isfinite(value):
                        bar.close()
                        raise RunFailedError(
                            f"training diverged: loss is {value} at epoch {epoch}, step {batch_index} "
                            f"({desc}; lower the learning rate, now {optimizer.param_groups[0]['lr']:.3g})"
                        )
                    loss.backward()
                    optimizer.step()
                    step += 1
                    loss_sum += value * batch
                    correct += hits
                    seen += batch
                    if show_progress:
                        bar.set_postfix(
                            loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False
                        )
                bar.close()
                stats = {
                    "epoch": float(epoch),
                    "loss": loss_sum / max(seen, 1),
                    "accuracy": correct / max(seen, 1),
                    "lr": float(optimizer.param_groups[0]["lr"]),
                }
                history.append(stats)
                if checkpoint is not None:
                    _save_checkpoint(
                        checkpoint, config, model, optimizer, generator, base_lrs, epoch, step, history, desc
                    )
                if on_epoch_end is not None:
                    on_epoch_end(epoch, stats)
    finally:
        if net is not model:
            del net  # drops DDP's gradient hooks from the parameters
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
