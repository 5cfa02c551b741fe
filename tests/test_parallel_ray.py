"""The evaluator pool: Ray workers give the sequential results, in input order, for the same seed."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.ir.errors import BadInputError
from fxsculpt.passes.base import TrainSettings
from fxsculpt.training import parallel
from fxsculpt.training.loop import evaluate, train_model
from fxsculpt.training.parallel import derive_seed, map_in_order


def draws(item: int) -> tuple[int, list[float], float, float, int]:
    """A deterministic function of the item and of the three global RNGs."""
    return item, torch.rand(3).tolist(), float(np.random.rand()), random.random(), item * item


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=g)
    y = (x.sum(dim=(1, 2, 3)) > 0).long()
    return TensorDataset(x, y)


def evaluate_candidate(width: int) -> tuple[float, float, float]:
    """Build a candidate of ``width`` hidden units (init from the seeded global RNG), train briefly, score."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 2))
    data = _data()
    settings = TrainSettings(epochs=1, batch_size=16, lr=0.1, progress=False)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    train_model(model, data, settings, "cpu", generator)
    loss, accuracy = evaluate(model, data, 64, "cpu")
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return loss, accuracy, checksum


def fails_on_three(item: int) -> int:
    if item == 3:
        raise BadInputError(f"candidate {item} is not valid")
    return item


def test_sequential_seeds_per_item_and_leaves_globals_alone() -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = map_in_order(draws, range(4), workers=1, seed=1)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    # The independent reference: each item's draws with its derived seed, by hand.
    for index, result in enumerate(first):
        torch.manual_seed(derive_seed(1, index))
        np.random.seed(derive_seed(1, index) % 2**32)
        random.seed(derive_seed(1, index))
        assert result == (index, torch.rand(3).tolist(), float(np.random.rand()), random.random(), index**2)
    assert first == map_in_order(draws, range(4), workers=1, seed=1)
    assert first != map_in_order(draws, range(4), workers=1, seed=2)
    assert len({derive_seed(0, i) for i in range(1000)}) == 1000


def test_without_ray_workers_above_one_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setattr(parallel, "_STARTED_BY_US", False)
    with pytest.raises(
        BadInputError, match=r"needs Ray, which is not installed: pip install 'fxsculpt\[distributed\]'"
    ):
        map_in_order(draws, range(3), workers=2)
    assert map_in_order(draws, range(2), workers=1) == map_in_order(draws, range(2), workers=0)


def test_ray_equals_sequential_on_a_deterministic_function(ray_runtime: None) -> None:
    items = list(range(7))
    sequential = map_in_order(draws, items, workers=1, seed=3)
    with_ray = map_in_order(draws, items, workers=2, seed=3)
    assert with_ray == sequential
    assert [r[0] for r in with_ray] == items  # input order


def test_ray_equals_sequential_on_model_evaluation(ray_runtime: None) -> None:
    widths = [4, 8, 6, 4]
    sequential = map_in_order(evaluate_candidate, widths, workers=1, seed=11)
    with_ray = map_in_order(evaluate_candidate, widths, workers=2, seed=11)
    assert with_ray == sequential  # bit for bit: same seeds, one thread each
    assert sequential[0] != sequential[3]  # same width, other position: another seed, another model


def test_ray_reraises_the_workers_error(ray_runtime: None) -> None:
    with pytest.raises(BadInputError, match="candidate 3 is not valid"):
        map_in_order(fails_on_three, range(5), workers=2)
