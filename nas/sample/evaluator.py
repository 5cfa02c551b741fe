"""Candidate evaluation shared by every sample-based search: one budget, one cache, one history.

:class:`CandidateEvaluator` is what a search method talks to. It counts evaluations (the
budget every method gets is the same number of *distinct* architectures scored), caches
scores by architecture (two sequences that differ only by the order of a node's two
branches are one network, so the cache key is :meth:`SearchSpace.canonical`), and keeps the
history (score and best-so-far after each evaluation) the passes write out and plot.

Two backends score a candidate:

- :class:`WeightSharingBackend` — one :class:`~nas.sample.supernet.SinglePathSupernet`, trained
  by sampling architectures from the method's current pool (or its sampler, for the RL
  controller) for a fixed number of steps per new candidate, then the candidate's path is
  scored by top-1 accuracy on fixed held-out validation batches (ENAS sec. 2.3; NAO sec. 3.4).
  Every method pays the same supernet training per evaluation, so the comparison is fair.
- :class:`ShortTrainingBackend` — the derived network is trained from scratch for a few
  epochs on a subset of the training split and scored on the validation split (NAO's
  "train and evaluate" reranking, shortened).

A batch of new candidates is scored in two steps: the backend's ``prepare`` does the sequential,
stateful part (supernet training), then its ``scorer`` (a pure, picklable function of one
architecture over a frozen snapshot) is mapped over the batch by
:class:`~nas.sample.workers.ScoringWorkers`, in this process or as Ray tasks, with the same
scores either way. ``state_dict``/``load_state_dict`` carry the evaluator and its backend
through a checkpoint (see :mod:`nas.sample.checkpointing`).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from fxsculpt.nas.sample.batches import BatchStream
from fxsculpt.nas.sample.checkpointing import random_state, set_random_state
from fxsculpt.nas.sample.encoding import Arch, SearchSpace
from fxsculpt.nas.sample.supernet import SinglePathSupernet
from fxsculpt.nas.sample.workers import Scorer, ScoringWorkers

#: What a method hands the weight-sharing trainer: a pool to sample from uniformly, or a sampler.
PoolLike = Sequence[Arch] | Callable[[], Arch]


class Backend(Protocol):
    """Scores architectures; ``prepare`` runs before a batch of new candidates is scored.

    ``scorer(portable)`` is the score as a pure function of the architecture over the state
    ``prepare`` left (``portable``: it will be pickled to another process, so it must hold CPU
    copies); ``score(arch)`` is ``scorer(False)(arch)``. ``state_dict``/``load_state_dict`` hold
    everything a resumed search needs to continue (tensors, dicts, lists and scalars only).
    """

    def prepare(self, new: Sequence[Arch], pool: PoolLike | None) -> None: ...

    def score(self, arch: Arch) -> float: ...

    def scorer(self, portable: bool = False) -> Scorer: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class EvalRecord:
    """One evaluation: its 1-based index, the architecture, its score and the best so far."""

    index: int
    arch: Arch
    score: float
    best: float
    seconds: float

    def as_dict(self, space: SearchSpace) -> dict[str, Any]:
        return {
            "evaluation": self.index,
            "tokens": space.to_tokens(self.arch),
            "arch": space.describe(self.arch),
            "score": round(self.score, 6),
            "best_so_far": round(self.best, 6),
            "seconds": round(self.seconds, 4),
        }


@dataclass
class CandidateEvaluator:
    """Budgeted, cached evaluation of architectures; ``budget`` counts distinct candidates.

    ``max_proposals`` bounds how many architectures (cached ones included) a method may
    propose in total, so a method that keeps proposing what it has already seen still ends.
    ``workers`` says where the new candidates of one batch are scored (here, or Ray tasks).
    """

    space: SearchSpace
    backend: Backend
    budget: int
    max_proposals: int | None = None
    cache: dict[Arch, float] = field(default_factory=dict)
    history: list[EvalRecord] = field(default_factory=list)
    proposals: int = 0
    workers: ScoringWorkers = field(default_factory=ScoringWorkers)

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"the evaluation budget must be at least 1, got {self.budget}")
        if self.max_proposals is None:
            self.max_proposals = 50 * self.budget + 1000

    @property
    def used(self) -> int:
        return len(self.history)

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    @property
    def exhausted(self) -> bool:
        """No budget left, or the method has proposed more than ``max_proposals`` candidates."""
        return self.remaining <= 0 or self.proposals >= (self.max_proposals or 0)

    def seen(self, arch: Arch) -> bool:
        return self.space.canonical(arch) in self.cache

    def cached_score(self, arch: Arch) -> float | None:
        return self.cache.get(self.space.canonical(arch))

    def evaluate(self, archs: Sequence[Arch], pool: PoolLike | None = None) -> list[float | None]:
        """Scores of ``archs``: cached ones are free, new ones spend budget; ``None`` once it is spent.

        ``pool`` is where the weight-sharing backend samples the architectures it trains on
        before scoring (default: the new candidates themselves). The new candidates are scored
        together, through ``workers``: in parallel when it has more than one.
        """
        self.proposals += len(archs)
        new: list[Arch] = []
        keys: set[Arch] = set()
        for arch in archs:
            key = self.space.canonical(arch)
            if key not in self.cache and key not in keys and len(new) < self.remaining:
                new.append(arch)
                keys.add(key)
        if new:
            start = time.perf_counter()
            self.backend.prepare(new, pool)
            scorer = self.backend.scorer(portable=self.workers.remote)
            scores = self.workers.map(scorer, new, first_index=len(self.history))
            seconds = (time.perf_counter() - start) / len(new)  # the batch's time, shared out
            for arch, score in zip(new, scores):
                self.cache[self.space.canonical(arch)] = score
                best = max(score, self.history[-1].best) if self.history else score
                self.history.append(EvalRecord(len(self.history) + 1, arch, score, best, seconds))
        return [self.cached_score(arch) for arch in archs]

    def evaluate_one(self, arch: Arch, pool: PoolLike | None = None) -> float | None:
        return self.evaluate([arch], pool)[0]

    def best(self) -> EvalRecord:
        """The best evaluation so far (the earliest one among equal scores)."""
        if not self.history:
            raise ValueError("nothing has been evaluated yet")
        return max(self.history, key=lambda r: (r.score, -r.index))

    def ranked(self) -> list[tuple[Arch, float]]:
        """Every evaluated architecture with its score, best first."""
        return sorted(((r.arch, r.score) for r in self.history), key=lambda t: -t[1])

    def state_dict(self) -> dict[str, Any]:
        """The history (architectures as tokens), the proposal count and the backend's state.

        The cache is not stored: it holds exactly the history's architectures and is rebuilt.
        """
        return {
            "history": [
                {
                    "index": r.index,
                    "tokens": self.space.to_tokens(r.arch),
                    "score": r.score,
                    "best": r.best,
                    "seconds": r.seconds,
                }
                for r in self.history
            ],
            "proposals": self.proposals,
            "backend": self.backend.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of an evaluator over the same space and backend."""
        self.history = [
            EvalRecord(
                int(h["index"]),
                self.space.from_tokens([int(t) for t in h["tokens"]]),
                float(h["score"]),
                float(h["best"]),
                float(h["seconds"]),
            )
            for h in state["history"]
        ]
        self.cache = {self.space.canonical(r.arch): r.score for r in self.history}
        self.proposals = int(state["proposals"])
        self.backend.load_state_dict(state["backend"])


class FunctionBackend:
    """A backend from a plain function of the architecture (synthetic rewards in tests)."""

    def __init__(self, fn: Callable[[Arch], float]) -> None:
        self.fn = fn

    def prepare(self, new: Sequence[Arch], pool: PoolLike | None) -> None:
        return None

    def score(self, arch: Arch) -> float:
        return float(self.fn(arch))

    def scorer(self, portable: bool = False) -> Scorer:
        return self.fn

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def accuracy_on(
    model: Callable[[torch.Tensor], torch.Tensor], batches: Sequence[Any], device: torch.device
) -> float:
    """Top-1 accuracy of ``model`` over ``batches`` (no gradients)."""
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device))
            correct += int((logits.argmax(1) == y.to(device)).sum())
            total += int(y.numel())
    return correct / max(total, 1)


class WeightSharingBackend:
    """One single-path supernet, trained on the method's pool, scoring paths on held-out batches.

    Training: SGD (momentum 0.9, weight decay 3e-4, gradient norm clipped at 5, as in NAO-WS's
    child training) with the learning rate annealed on a cosine over the total number of steps
    the budget implies (``warmup_steps + budget * steps_per_eval``). ``warmup_steps`` are spent
    on architectures drawn uniformly from the grammar before the first candidate is scored,
    identically for every method.
    """

    def __init__(
        self,
        space: SearchSpace,
        train: Dataset[Any],
        val: Dataset[Any],
        *,
        budget: int,
        channels: int = 8,
        layers: int = 5,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_size: int = 64,
        lr: float = 0.05,
        warmup_steps: int = 50,
        steps_per_eval: int = 4,
        val_batches: int = 2,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.space = space
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.supernet = SinglePathSupernet(space, channels, layers, num_classes, in_channels).to(
                self.device
            )
        self.optimizer = torch.optim.SGD(self.supernet.parameters(), lr=lr, momentum=0.9, weight_decay=3e-4)
        self.base_lr = lr
        self.total_steps = warmup_steps + budget * steps_per_eval
        self.steps_done = 0
        self.warmup_steps = warmup_steps
        self.steps_per_eval = steps_per_eval
        self.train_batches = BatchStream(train, batch_size, self.generator)
        self.val_batches = _fixed_batches(val, batch_size, val_batches)
        self.loss_fn = nn.CrossEntropyLoss()
        self.warmed_up = False

    def train_steps(self, steps: int, sample: Callable[[], Arch]) -> float:
        """``steps`` SGD steps, each on one minibatch through one sampled architecture; mean loss."""
        from fxsculpt.training.loop import cosine_lr

        self.supernet.train()
        total = 0.0
        for _ in range(steps):
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_lr(self.base_lr, self.steps_done, self.total_steps)
            x, y = next(self.train_batches)
            arch = sample()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.supernet(x.to(self.device), arch), y.to(self.device))
            if not torch.isfinite(loss):
                from fxsculpt.ir.errors import RunFailedError

                raise RunFailedError(f"weight-sharing supernet training diverged (loss {float(loss)})")
            loss.backward()
            nn.utils.clip_grad_norm_(self.supernet.parameters(), 5.0)
            self.optimizer.step()
            self.steps_done += 1
            total += loss.item()
        return total / max(steps, 1)

    def prepare(self, new: Sequence[Arch], pool: PoolLike | None) -> None:
        if not self.warmed_up:
            self.train_steps(self.warmup_steps, lambda: self.space.random_arch(self.rng))
            self.warmed_up = True
        if callable(pool):
            sample: Callable[[], Arch] = pool
        else:
            choices = list(pool) + list(new) if pool else list(new)
            sample = lambda: self.rng.choice(choices)  # noqa: E731
        self.train_steps(self.steps_per_eval * len(new), sample)

    def scorer(self, portable: bool = False) -> SupernetScorer:
        """The supernet as it is now, scoring paths on the fixed validation batches."""
        if portable and self.device.type != "cpu":
            return SupernetScorer(copy.deepcopy(self.supernet).cpu(), self.val_batches, torch.device("cpu"))
        return SupernetScorer(self.supernet, self.val_batches, self.device)

    def score(self, arch: Arch) -> float:
        return self.scorer()(arch)

    def state_dict(self) -> dict[str, Any]:
        """Weights, SGD state, schedule position, training batch order and the pool sampler."""
        return {
            "supernet": self.supernet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps_done": self.steps_done,
            "warmed_up": self.warmed_up,
            "batches": self.train_batches.state_dict(),
            "rng": random_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.supernet.load_state_dict(state["supernet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self.warmed_up = bool(state["warmed_up"])
        self.train_batches.load_state_dict(state["batches"])
        set_random_state(self.rng, state["rng"])


class SupernetScorer:
    """One candidate's weight-sharing score: its path's top-1 accuracy on fixed validation batches.

    A plain function of the architecture once built (no randomness: BatchNorm uses batch
    statistics, there is no dropout), picklable with its weights for a Ray task.
    """

    def __init__(self, supernet: SinglePathSupernet, batches: Sequence[Any], device: torch.device) -> None:
        self.supernet = supernet
        self.batches = batches
        self.device = device

    def __call__(self, arch: Arch) -> float:
        self.supernet.eval()  # BatchNorm keeps no running statistics: batch statistics either way
        return accuracy_on(lambda x: self.supernet(x, arch), self.batches, self.device)


def _fixed_batches(dataset: Dataset[Any], batch_size: int, count: int) -> list[Any]:
    """The first ``count`` batches of ``dataset`` in order: the same held-out data for every candidate."""
    n = len(dataset)  # type: ignore[arg-type]
    batches = []
    for start in range(0, min(n, batch_size * max(count, 1)), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        batches.append((torch.stack([t[0] for t in items]), torch.stack([t[1] for t in items])))
    return batches


class ShortTrainingBackend:
    """Trains each candidate's derived network from scratch for a few epochs; scores on validation.

    ``build(arch)`` returns a fresh network for the architecture (the darts-eval network of
    its genotype). ``train_limit`` keeps the first images of the training split so the short
    run stays short; the seed of each run depends on the architecture only, so a candidate's
    score does not depend on when a method happened to propose it.
    """

    def __init__(
        self,
        space: SearchSpace,
        build: Callable[[Arch], nn.Module],
        train: Dataset[Any],
        val: Dataset[Any],
        *,
        epochs: int = 1,
        batch_size: int = 64,
        lr: float = 0.05,
        train_limit: int = 1000,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.space = space
        self.build = build
        n = len(train)  # type: ignore[arg-type]
        self.train = Subset(train, range(min(n, train_limit))) if train_limit > 0 else train
        self.val = val
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.device = torch.device(device)
        self.seed = seed

    def prepare(self, new: Sequence[Arch], pool: PoolLike | None) -> None:
        return None

    def scorer(self, portable: bool = False) -> Scorer:
        """``score`` itself (training from scratch is already a pure function of the architecture)."""
        if portable and self.device.type != "cpu":
            on_cpu = copy.copy(self)
            on_cpu.device = torch.device("cpu")
            return on_cpu.score
        return self.score

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def score(self, arch: Arch) -> float:
        from fxsculpt.passes.base import TrainSettings
        from fxsculpt.training.loop import evaluate, train_model

        salt = sum((i + 1) * t for i, t in enumerate(self.space.to_tokens(self.space.canonical(arch))))
        seed = (self.seed * 1_000_003 + salt) % 2**63  # the passes' seeds reach 2**62: keep it in range
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.build(arch).to(self.device)
        settings = TrainSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, progress=False)
        train_model(model, self.train, settings, self.device, generator)
        _, acc = evaluate(model, self.val, batch_size=256, device=self.device)
        return float(acc)


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous setting.

    The controllers (NAO's LSTMs, the RL controller) are tiny sequential models: extra threads
    only add synchronization, and on a shared machine oversubscription made them 40x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
