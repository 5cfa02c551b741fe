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

With a size budget (``quantize.avg_bits``) the user has fixed the size and wants the most
accurate model within it, so the roles swap: α minimizes ``L_val + μ (G_w(α)/B − 1)`` with
``μ ← max(0, μ + η_λ (G_w/B − 1))``, ``G_w`` the expected weight bits and ``B`` the budget. The
paper's problem reaches a budget only indirectly (through θ, then a greedy fit at
discretization), and when θ has slack λ falls to zero and G alone pulls every layer down at the
same pace (Adam normalizes each logit's step), whatever the layer's size or sensitivity. Under
the budget constraint each logit instead weighs its layer's loss gradient against its share of
the bits at one common price μ, and the search ends near the budget, so the greedy fit has
little left to do. Measured on builtin:resnet (CIFAR-10 subset, candidates 2–8, 4-bit budget):
with the paper's objective the chosen widths changed from seed to seed (one seed gave 3 bits to
the stage-2 shortcut, a layer that alone adds 0.2 nats of validation loss at 3 bits), and their
mean test accuracy over 3 seeds was 1.6 points below uniform 4-bit's with the same seeds.

Never losing work: with a :class:`~training.checkpoint.Checkpointer` the whole search state
(weights and α, both optimizers, λ and its loss estimate, the data generator and every RNG, the
history) is saved after each epoch, and a resumed search continues exactly as an uninterrupted
one on CPU. Under torchrun both splits are sharded per global batch and every gradient, of the
weights and of α, is averaged over the ranks before its step, so the weights, α and λ stay
identical on every rank and the search equals a one-process search with the same global batch
up to float summation order (:mod:`training.distributed`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fxsculpt.ir.errors import BadInputError, RunFailedError
from fxsculpt.quant.modules import WeightQuantizer
from fxsculpt.training import distributed
from fxsculpt.training.checkpoint import Checkpointer, all_finite, restore_training_state, training_state
from fxsculpt.training.frozen import frozen


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


class LossConstraint:
    """The constraint ``L_val − θ ≤ 0`` as the search tracks it: an EMA of the measured validation
    loss (one batch is a noisy estimate of L_val) drives the multiplier's dual ascent."""

    def __init__(self, theta: float, multiplier: DualAscent, ema: float) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"the EMA factor must be in [0, 1), got {ema}")
        self.theta = theta
        self.multiplier = multiplier
        self.ema = ema
        self.smoothed: float | None = None

    def observe(self, val_loss: float) -> float:
        """Fold one batch's validation loss into the estimate and step λ; returns the new λ."""
        value = float(val_loss)
        self.smoothed = value if self.smoothed is None else self.ema * self.smoothed + (1 - self.ema) * value
        return self.multiplier.update(self.smoothed - self.theta)

    def state(self) -> dict[str, float | None]:
        """What a checkpoint keeps: λ and the loss estimate."""
        return {"multiplier": self.multiplier.value, "smoothed": self.smoothed}

    def load(self, state: Mapping[str, Any]) -> None:
        self.multiplier.value = float(state["multiplier"])
        smoothed = state["smoothed"]
        self.smoothed = None if smoothed is None else float(smoothed)


@dataclass
class DFQSettings:
    """Search knobs; defaults are short enough for a 2-core CPU."""

    #: Search epochs; each is one pass over the training split.
    epochs: int = 2
    #: Global batch of both splits (shared by the processes under torchrun).
    batch_size: int = 64
    #: SGD (momentum 0.9, weight decay 5e-4) learning rate of the weights, on the training split;
    #: 0 keeps the weights as trained and searches α alone.
    weight_lr: float = 0.01
    #: Adam learning rate of the bit logits α, on the validation split.
    arch_lr: float = 0.05
    #: Step size η of the multiplier's dual ascent.
    dual_lr: float = 1.0
    #: λ at the start of the search.
    initial_multiplier: float = 1.0
    #: The loss bound θ of the constraint L_val − θ ≤ 0 (nats).
    theta: float = 1.0
    #: EMA factor of the validation-loss estimate that drives λ.
    ema: float = 0.9
    #: Total weight bits the searched layers may use. ``None``: the paper's problem, the smallest
    #: expected size with ``L_val ≤ θ``. Set: the lowest ``L_val`` with expected weight bits
    #: ``≤`` this budget, the multiplier μ on the size constraint raised by dual ascent
    #: (see the module docstring for why).
    size_budget_bits: float | None = None
    #: Show a progress bar (on the main process only).
    progress: bool = True

    def checkpoint_config(
        self, searched: Mapping[str, WeightQuantizer], train_size: int, val_size: int
    ) -> dict[str, Any]:
        """The settings a saved search depends on: a resume with other values is refused."""
        return {
            "kind": "dfq-search",
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "weight_lr": self.weight_lr,
            "arch_lr": self.arch_lr,
            "dual_lr": self.dual_lr,
            "initial_multiplier": self.initial_multiplier,
            "theta": float(f"{self.theta:.6g}"),  # from a measured loss: tolerant of summation order
            "ema": self.ema,
            "size_budget_bits": self.size_budget_bits,
            "layers": [[name, list(m.candidates), m.groups] for name, m in searched.items()],
            "train_size": train_size,
            "val_size": val_size,
            "world_size": distributed.world_size(),
        }


@dataclass
class DFQHistory:
    """Per-epoch means: expected bits per weight, λ, validation loss, and the objective."""

    epochs: list[dict[str, float]] = field(default_factory=list)


EpochCallback = Callable[[int, dict[str, float]], None]


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def _global_mean(loss: torch.Tensor, count: int) -> float:
    """The mean loss over every rank's shard of the batch (this shard's mean alone in one process)."""
    value = float(loss.detach())
    if distributed.active() is None:
        return value
    totals = torch.tensor([value * count, float(count)], dtype=torch.float64)
    distributed.all_reduce_sum(totals)
    return float(totals[0] / totals[1])


def _loader(dataset: Dataset[Any], batch_size: int, generator: torch.Generator) -> DataLoader[Any]:
    """Shuffled batches drawn from ``generator``, this rank's shards of them under torchrun; a last
    partial batch is dropped (every step then sees a full batch, and shards stay equal)."""
    n = len(dataset)  # type: ignore[arg-type]
    return distributed.shuffled_loader(dataset, batch_size, generator, drop_last=n > batch_size)


class DFQSearch:
    """One DFQ search's state and its two alternating steps (the weights', then α's).

    Under torchrun every step's loss is this rank's shard scaled by
    :func:`training.distributed.local_loss_scale`, and the gradients of the weights and of α are
    averaged over the ranks before their steps, so both stay identical on every rank; the losses
    that drive λ and the statistics are global means, so λ is identical too.
    """

    def __init__(
        self,
        model: nn.Module,
        searched: Mapping[str, WeightQuantizer],
        settings: DFQSettings,
        device: torch.device,
    ) -> None:
        self.model = model
        self.searched = searched
        self.settings = settings
        self.device = device
        self.arch = [m.bit_logits for m in searched.values() if m.bit_logits is not None]
        if not self.arch:
            raise BadInputError("DFQ has no bit-width logits to search (enable_search was not called)")
        arch_ids = {id(p) for p in self.arch}
        self.weights = [p for p in model.parameters() if p.requires_grad and id(p) not in arch_ids]
        self.weight_optimizer = torch.optim.SGD(
            self.weights, lr=settings.weight_lr, momentum=0.9, weight_decay=5e-4
        )
        self.arch_optimizer = torch.optim.Adam(self.arch, lr=settings.arch_lr, betas=(0.5, 0.999))
        self.constraint = LossConstraint(
            settings.theta, DualAscent(settings.dual_lr, settings.initial_multiplier), settings.ema
        )
        self.g_max = max_size_bits(searched)
        self.n_weights = sum(m.weight_numel_per_channel() * m.out_channels for m in searched.values())
        if settings.size_budget_bits is not None and settings.size_budget_bits <= 0:
            raise BadInputError(f"the DFQ size budget must be positive, got {settings.size_budget_bits}")
        #: μ of the size constraint ``G_w(α) / budget − 1 ≤ 0`` (used only with a size budget).
        self.size_multiplier = DualAscent(settings.dual_lr, 0.0)
        self.loss_fn = nn.CrossEntropyLoss()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"weights": self.weight_optimizer, "bits": self.arch_optimizer}

    def weight_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One SGD step of the weights on a training batch (α fixed); returns the global loss.

        A non-finite loss is returned without an update, for the caller to report. With a weight
        learning rate of 0 (α searched on the weights as trained) the loss is only measured.
        """
        if self.settings.weight_lr == 0:
            with torch.no_grad():
                return _global_mean(self.loss_fn(self.model(x), y), len(y))
        with frozen(self.arch):
            self.weight_optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            value = _global_mean(loss, len(y))
            if not math.isfinite(value):
                return value
            (loss * distributed.local_loss_scale(len(y))).backward()
            distributed.average_gradients(self.weights)
            self.weight_optimizer.step()
            self.weight_optimizer.zero_grad(set_to_none=True)
        return value

    def arch_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One Adam step of α on a validation batch; returns the global validation loss.

        Without a size budget the objective is the Lagrangian ``G/G_max + λ (L_val − θ)``; with
        one, ``L_val + μ (G_w/budget − 1)``. The weights are fixed; a non-finite loss is returned
        without an update.
        """
        with frozen(self.weights):
            loss = self.loss_fn(self.model(x), y)
            value = _global_mean(loss, len(y))
            if not math.isfinite(value):
                return value
            shard_loss = loss.cpu() * distributed.local_loss_scale(len(y))
            budget = self.settings.size_budget_bits
            if budget is None:
                size = expected_size_bits(self.searched)
                lam = self.constraint.multiplier.value
                objective = size / self.g_max + lam * (shard_loss - self.settings.theta)
            else:
                mu = self.size_multiplier.value
                objective = shard_loss + mu * (expected_weight_bits(self.searched) / budget - 1.0)
            grads = torch.autograd.grad(objective, self.arch, allow_unused=True)
            grads_list = [torch.zeros_like(a) if g is None else g for a, g in zip(self.arch, grads)]
            distributed.average_tensors(grads_list)
            self.arch_optimizer.zero_grad(set_to_none=True)
            for a, g in zip(self.arch, grads_list):
                a.grad = g.to(a.device)
            self.arch_optimizer.step()
            self.arch_optimizer.zero_grad(set_to_none=True)
        return value

    def observe(self, val_loss: float) -> float:
        """Step the active multiplier after an α step and return it: λ from the validation loss,
        or, with a size budget, μ from the expected weight bits α now gives (the same on every rank)."""
        budget = self.settings.size_budget_bits
        if budget is None:
            return self.constraint.observe(val_loss)
        with torch.no_grad():
            ratio = float(expected_weight_bits(self.searched)) / budget
        return self.size_multiplier.update(ratio - 1.0)

    def multipliers_state(self) -> dict[str, float | None]:
        """What a checkpoint keeps of the multipliers: λ, its loss estimate, and μ."""
        return {**self.constraint.state(), "size_multiplier": self.size_multiplier.value}

    def load_multipliers(self, state: Mapping[str, Any]) -> None:
        self.constraint.load(state)
        self.size_multiplier.value = float(state.get("size_multiplier", 0.0))

    def run_epoch(
        self, epoch: int, train_loader: DataLoader[Any], val_loader: DataLoader[Any]
    ) -> dict[str, float]:
        """One pass over the training split, each weight step followed by an α step and a λ step.

        The validation batches restart each epoch, so an epoch depends only on the state at its
        start (what a checkpoint holds). A non-finite loss stops the search with a one-line
        :class:`RunFailedError` naming the epoch and step, before anything is updated with it.
        """
        settings = self.settings
        sums = {"val_loss": 0.0, "avg_bits": 0.0, "multiplier": 0.0, "train_loss": 0.0}
        steps = 0
        val_batches = _cycle(val_loader)
        bar = tqdm(
            train_loader,
            desc=f"dfq {epoch}/{settings.epochs}",
            unit="batch",
            file=sys.stderr,
            disable=not (settings.progress and distributed.is_main_process()),
            leave=False,
            dynamic_ncols=True,
        )
        for step, (x, y) in enumerate(bar, start=1):
            train_value = self.weight_step(x.to(self.device), y.to(self.device))
            if not math.isfinite(train_value):
                bar.close()
                raise RunFailedError(
                    f"DFQ search diverged: training loss is {train_value} at epoch {epoch}, step {step} "
                    f"(lower the weights' learning rate, quantize.finetune_lr, now {settings.weight_lr:.3g})"
                )
            xv, yv = next(val_batches)
            val_value = self.arch_step(xv.to(self.device), yv.to(self.device))
            if not math.isfinite(val_value):
                bar.close()
                raise RunFailedError(
                    f"DFQ search diverged: validation loss is {val_value} at epoch {epoch}, step {step} "
                    f"(lower quantize.arch_lr, now {settings.arch_lr:.3g})"
                )
            multiplier = self.observe(val_value)
            steps += 1
            sums["val_loss"] += val_value
            sums["train_loss"] += train_value
            sums["multiplier"] += multiplier
            with torch.no_grad():
                sums["avg_bits"] += float(expected_weight_bits(self.searched)) / max(self.n_weights, 1)
            if not bar.disable:
                bar.set_postfix(val=f"{val_value:.3f}", lam=f"{multiplier:.2f}", refresh=False)
        bar.close()
        return {"epoch": float(epoch), **{k: v / max(steps, 1) for k, v in sums.items()}}


def search(
    model: nn.Module,
    searched: Mapping[str, WeightQuantizer],
    train: Dataset[Any],
    val: Dataset[Any],
    settings: DFQSettings,
    generator: torch.Generator,
    device: torch.device,
    *,
    on_epoch: EpochCallback | None = None,
    checkpoint: Checkpointer | None = None,
) -> DFQHistory:
    """Alternate weight steps on ``train`` and α steps on ``val`` under the dual-ascent multiplier.

    ``searched`` layers must have had :meth:`WeightQuantizer.enable_search` called. Returns the
    history; the logits are left in place for :func:`choose_bits`.

    With ``checkpoint`` the whole search state (weights and α in the model's state, both
    optimizers, λ and its loss estimate, the data generator and every RNG, the history) is saved
    after each epoch, never once it stopped being finite, so a diverged search keeps its last good
    checkpoint; a resuming checkpointer continues after the last saved epoch exactly as an
    uninterrupted search would on CPU, and refuses a checkpoint made with other settings.
    ``on_epoch`` is called for the epochs run in this call. Under torchrun both splits are
    sharded per global batch (:mod:`training.distributed`; see :class:`DFQSearch`).
    """
    n_train, n_val = len(train), len(val)  # type: ignore[arg-type]
    if n_train == 0 or n_val == 0:
        raise BadInputError("DFQ needs non-empty training and validation splits")
    model.to(device)
    run = DFQSearch(model, searched, settings, device)
    distributed.broadcast_parameters([*run.weights, *run.arch])
    history = DFQHistory()
    config = settings.checkpoint_config(searched, n_train, n_val)
    first_epoch = 1
    saved = checkpoint.load_latest(config) if checkpoint is not None else None
    if saved is not None:
        extra = restore_training_state(
            saved, modules={"model": model}, optimizers=run.optimizers(), generators={"data": generator}
        )
        first_epoch = int(extra["epoch"]) + 1
        history.epochs = [dict(e) for e in extra["history"]]
        run.load_multipliers(extra["constraint"])
    train_loader = _loader(train, settings.batch_size, generator)
    val_loader = _loader(val, settings.batch_size, generator)
    model.train()
    for epoch in range(first_epoch, settings.epochs + 1):
        stats = run.run_epoch(epoch, train_loader, val_loader)
        history.epochs.append(stats)
        if checkpoint is not None and all_finite(model):
            state = training_state(
                modules={"model": model},
                optimizers=run.optimizers(),
                generators={"data": generator},
                epoch=epoch,
                history=history.epochs,
                constraint=run.multipliers_state(),
            )
            checkpoint.save(epoch, {**state, "config": config})
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return history


def expected_weight_bits(searched: Mapping[str, WeightQuantizer]) -> torch.Tensor:
    """Σ over searched weights of their expected width (no bias or scales), differentiable in α."""
    total = torch.zeros(())
    for m in searched.values():
        total = total + m.expected_weight_bits().cpu()
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
