"""Never lose a sample-based search: interrupted and resumed, it ends exactly as an uninterrupted run.

In process, for all four methods on a tiny weight-sharing supernet: a run stopped right after
its k-th checkpoint (an exception out of the save, as a kill would leave it) and resumed from
that checkpoint ends with the same final state (history, scores, supernet weights and optimizer,
the method's own state, every RNG) as an uninterrupted run, bit for bit. The same through the
CLI for NAO, with SIGKILL, is in ``test_sample_kill_resume.py``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fxsculpt.ir.errors import BadInputError
from fxsculpt.nas.sample.batches import BatchStream
from fxsculpt.nas.sample.checkpointing import SearchCheckpoint
from fxsculpt.nas.sample.encoding import SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator, WeightSharingBackend
from fxsculpt.nas.sample.evolution import regularized_evolution
from fxsculpt.nas.sample.nao import NAOSettings, nao_search
from fxsculpt.nas.sample.random_search import random_search
from fxsculpt.nas.sample.rl import ControllerSettings, reinforce_search
from fxsculpt.training.checkpoint import Checkpointer
from fxsculpt.training.loop import make_loader

SPACE = SearchSpace(steps=2, ops=("skip_connect", "sep_conv_3x3", "max_pool_3x3"))
BUDGET = 8


class Interrupted(Exception):
    """Stands for the kill: raised right after a checkpoint was written."""


class InterruptingCheckpointer(Checkpointer):
    """A checkpointer that stops the run after its ``stop_after``-th save."""

    def __init__(self, folder: Path, stop_after: int) -> None:
        super().__init__(folder)
        self.saves_left = stop_after

    def save(self, step: int, state: Any) -> Path | None:
        path = super().save(step, state)
        self.saves_left -= 1
        if self.saves_left == 0:
            raise Interrupted
        return path


def data() -> tuple[TensorDataset, TensorDataset]:
    """Tiny images whose class (of 4) is the quadrant of the mean of two channels: learnable."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(56, 3, 8, 8, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() * 2 + (x[:, 1].mean(dim=(1, 2)) > 0).long()
    return TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])


def evaluator() -> CandidateEvaluator:
    train, val = data()
    backend = WeightSharingBackend(
        SPACE,
        train,
        val,
        budget=BUDGET,
        channels=2,
        layers=3,
        num_classes=4,
        batch_size=8,
        lr=0.05,
        warmup_steps=2,
        steps_per_eval=2,
        val_batches=2,
        seed=5,
    )
    return CandidateEvaluator(SPACE, backend, BUDGET)


#: Each method with a batch of 2 candidates per step, so that every boundary follows a batch.
METHODS: dict[str, Callable[[CandidateEvaluator, SearchCheckpoint], Any]] = {
    "nao": lambda ev, ckpt: nao_search(
        SPACE,
        ev,
        torch.Generator().manual_seed(1),
        NAOSettings(epochs=3, expand=2, new_archs=2),
        checkpoint=ckpt,
    ),
    "rl": lambda ev, ckpt: reinforce_search(
        SPACE, ev, torch.Generator().manual_seed(1), ControllerSettings(aggregate=2), checkpoint=ckpt
    ).state_dict(),
    "evolution": lambda ev, ckpt: regularized_evolution(
        SPACE, ev, random.Random(1), population=3, sample=2, children=2, checkpoint=ckpt
    ),
    "random": lambda ev, ckpt: random_search(SPACE, ev, random.Random(1), per_step=2, checkpoint=ckpt),
}


def seed_globals() -> None:
    """Both runs start from the same global RNG states (the CLI seeds them from --seed)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def run(method: str, checkpointer: Checkpointer) -> tuple[Any, CandidateEvaluator, SearchCheckpoint]:
    seed_globals()
    ev = evaluator()
    checkpoint = SearchCheckpoint(checkpointer, {"method": method, "budget": BUDGET})
    result = METHODS[method](ev, checkpoint)
    return result, ev, checkpoint


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality, tensors bit for bit; wall-clock ``seconds`` are not part of the result."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys = set(a) - {"seconds"}
        assert isinstance(b, dict) and keys == set(b) - {"seconds"}, (where, sorted(keys), sorted(b))
        for key in keys:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def latest(folder: Path) -> dict[str, Any]:
    state = Checkpointer(folder, resume=True).load_latest()
    assert state is not None
    return state


@pytest.mark.parametrize("method", list(METHODS))
def test_interrupted_and_resumed_search_ends_as_an_uninterrupted_one(method: str, tmp_path: Path) -> None:
    reference, ref_eval, ref_ckpt = run(method, Checkpointer(tmp_path / "reference"))
    assert ref_eval.used == BUDGET and ref_ckpt.boundary >= 3

    folder = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        run(method, InterruptingCheckpointer(folder, stop_after=2))
    stopped = latest(folder)
    assert stopped["step"] == 2 and 0 < len(stopped["extra"]["evaluator"]["history"]) < BUDGET

    resumed, res_eval, res_ckpt = run(method, Checkpointer(folder, resume=True))
    assert res_ckpt.resumed_at == 2  # it continued; it did not start over
    assert res_ckpt.boundary == ref_ckpt.boundary
    assert [(r.arch, r.score, r.best) for r in res_eval.history] == [
        (r.arch, r.score, r.best) for r in ref_eval.history
    ]
    assert res_eval.proposals == ref_eval.proposals
    assert_same(resumed, reference, "returned")
    # The whole final state: supernet weights and SGD state, batch order, the method's modules,
    # optimizers and plain state, every generator and global RNG.
    final, expected = latest(folder), latest(tmp_path / "reference")
    assert_same(final, expected)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        run("random", InterruptingCheckpointer(tmp_path, stop_after=1))
    checkpoint = SearchCheckpoint(Checkpointer(tmp_path, resume=True), {"method": "random", "budget": 9})
    with pytest.raises(BadInputError, match=r"made with budget=8 but this run has budget=9"):
        random_search(SPACE, evaluator(), random.Random(1), checkpoint=checkpoint)


def test_without_a_checkpointer_nothing_is_written_and_the_search_is_unchanged(tmp_path: Path) -> None:
    seed_globals()
    plain = evaluator()
    random_search(SPACE, plain, random.Random(1), per_step=2)
    _, saved, _ = run("random", Checkpointer(tmp_path))
    assert [(r.arch, r.score) for r in plain.history] == [(r.arch, r.score) for r in saved.history]


def loader_batches(dataset: TensorDataset, batch: int, generator: torch.Generator) -> Any:
    """The loop the stream replaces: one shuffled DataLoader per pass, forever."""
    drop_last = len(dataset) > batch
    while True:
        yield from make_loader(dataset, batch, shuffle=True, generator=generator, drop_last=drop_last)


def test_batch_stream_matches_a_shuffled_dataloader_and_resumes_mid_pass() -> None:
    for n, batch in [(21, 4), (20, 4), (3, 4)]:
        dataset = TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))
        reference = loader_batches(dataset, batch, torch.Generator().manual_seed(3))
        expected = [y.tolist() for _, y in itertools.islice(reference, 17)]
        stream = BatchStream(dataset, batch, torch.Generator().manual_seed(3))
        head = [next(stream)[1].tolist() for _ in range(7)]
        resumed = BatchStream(dataset, batch, torch.Generator().manual_seed(99))
        resumed.load_state_dict(stream.state_dict())
        tail = [next(resumed)[1].tolist() for _ in range(10)]
        assert head + tail == expected, (n, batch)
