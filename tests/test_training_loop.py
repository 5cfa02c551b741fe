"""Train/evaluate loops and the ``train`` pass: determinism, divergence, evaluation, labels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.ir.errors import BadInputError, RunFailedError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.pipeline import Pipeline
from fxsculpt.passes.train import TrainPass
from fxsculpt.training.data import load_data
from fxsculpt.training.loop import cosine_lr, evaluate, train_model


def _toy_data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(F.relu(self.bn(self.conv(x))), 1)))


def _trained(seed: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same initial weights every time; the loop's seed is what varies
    model = TinyNet()
    settings = TrainSettings(epochs=2, batch_size=16, lr=0.1, progress=False)
    history = train_model(model, _toy_data(), settings, "cpu", torch.Generator().manual_seed(seed))
    return history, {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_is_bit_identical_and_seed_matters() -> None:
    h1, s1 = _trained(11)
    h2, s2 = _trained(11)
    _, s3 = _trained(12)
    assert h1 == h2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)  # shuffling and dropout follow the seed
    assert [h["epoch"] for h in h1] == [1.0, 2.0]


def test_global_rng_is_left_alone() -> None:
    model = TinyNet()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    settings = TrainSettings(epochs=1, batch_size=16, lr=0.1, progress=False)
    train_model(model, _toy_data(), settings, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # dropout drew from a forked, seeded RNG


def test_nan_loss_names_epoch_and_step() -> None:
    class Poisoned(nn.Module):
        """Returns NaN logits on its third call: epoch 2, step 1 with two batches per epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(36, 4)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = self.fc(x.flatten(1))
            return out * float("nan") if self.calls == 3 else out

    settings = TrainSettings(epochs=3, batch_size=48, lr=0.1, progress=False)
    with pytest.raises(RunFailedError, match=r"training diverged: loss is nan at epoch 2, step 1"):
        train_model(Poisoned(), _toy_data(), settings, "cpu", torch.Generator().manual_seed(0))


def test_exploding_learning_rate_is_reported() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4))
    with torch.no_grad():
        model[1].weight.mul_(1e30)
    settings = TrainSettings(epochs=2, batch_size=32, lr=1e30, progress=False)
    with pytest.raises(RunFailedError, match=r"training diverged: loss is (nan|inf) at epoch \d+, step \d+"):
        train_model(model, _toy_data(), settings, "cpu", torch.Generator().manual_seed(0))


def test_evaluate_matches_direct_computation_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    data = _toy_data(50)
    model.train()
    model.bn.eval()  # a mixed state must come back exactly as it was
    loss, acc = evaluate(model, data, batch_size=7, device="cpu")
    assert model.training and not model.bn.training and model.drop.training
    model.eval()
    with torch.no_grad():
        logits = model(data.tensors[0])
    expected_loss = float(F.cross_entropy(logits, data.tensors[1]))
    expected_acc = float((logits.argmax(1) == data.tensors[1]).double().mean())
    assert math.isclose(loss, expected_loss, rel_tol=1e-5)
    assert acc == pytest.approx(expected_acc)


def test_cosine_schedule_follows_sgdr_and_reaches_zero() -> None:
    for step, total in [(0, 10), (3, 10), (5, 10), (10, 10)]:
        assert cosine_lr(0.2, step, total) == pytest.approx(0.1 * (1 + math.cos(math.pi * step / total)))
    history, _ = _trained(0)
    steps_per_epoch = math.ceil(96 / 16)
    total = 2 * steps_per_epoch
    # The last optimizer step used the lr of step total-1.
    assert history[-1]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * (total - 1) / total)))


def test_training_learns_digits() -> None:
    data = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    settings = TrainSettings(epochs=4, batch_size=32, lr=0.1, progress=False)
    history = train_model(model, data.train, settings, "cpu", torch.Generator().manual_seed(0))
    assert history[-1]["loss"] < history[0]["loss"]
    _, acc = evaluate(model, data.test, 256, "cpu")
    assert acc > 0.85  # chance is 0.1


def test_label_outside_model_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    settings = TrainSettings(epochs=1, batch_size=16, lr=0.1, progress=False)
    with pytest.raises(BadInputError, match="label 3 but the model has only 3 outputs"):
        train_model(model, _toy_data(), settings, "cpu", torch.Generator().manual_seed(0))


# -- the train pass ---------------------------------------------------------------------------------


def _ctx(tmp_path: Path, data: object, epochs: int = 2) -> Context:
    return Context(
        out_dir=tmp_path / "out",
        stage_dir=tmp_path / "stage",
        data=data,  # type: ignore[arg-type]
        seed=0,
        train=TrainSettings(epochs=epochs, batch_size=64, lr=0.05, progress=False),
    )


class DigitsNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2), 1))


def test_train_pass_records_and_is_deterministic(tmp_path: Path) -> None:
    data = load_data("digits", seed=0, limit=600)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        ir = IR.from_module(DigitsNet().eval(), (1, 1, 8, 8), num_classes=10)
        ctx = _ctx(tmp_path, data)
        out = Pipeline(["train"], export=False, options={"train": {"lr": "0.1"}}).run(ir, ctx)
        results.append((ctx.summaries["train"], out.ir.gm.state_dict()))
    summary = results[0][0]
    assert summary["epochs"] == 2 and summary["lr"] == 0.1
    assert {"train_loss", "train_accuracy", "val_accuracy", "val_loss"} <= set(summary)
    assert summary["val_accuracy"] > 0.5  # chance is 0.1
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_train_pass_refuses_missing_or_unfit_data(tmp_path: Path) -> None:
    data = load_data("digits", seed=0)
    ir = IR.from_module(DigitsNet(classes=5).eval(), (1, 1, 8, 8), num_classes=5)
    with pytest.raises(BadInputError, match="needs data"):
        Pipeline(["train"], export=False).run(ir, _ctx(tmp_path, None))
    with pytest.raises(BadInputError, match=r"labels up to 9 .* 5 outputs"):
        TrainPass().run(ir, _ctx(tmp_path, data))
    with pytest.raises(BadInputError, match=r"label 9 but the model has only 5 outputs"):
        Pipeline(["train"], export=False).run(ir, _ctx(tmp_path, data))  # caught by the first evaluation
    wide = IR.from_module(DigitsNet().eval(), (1, 1, 8, 8), num_classes=10)
    wide.input_shape = (1, 1, 16, 16)
    with pytest.raises(
        BadInputError, match=r"images of shape 1x8x8 but the model's input shape is 1,1,16,16"
    ):
        Pipeline(["train"], export=False).run(wide, _ctx(tmp_path, data))
    with pytest.raises(BadInputError, match=r"bad value 'x' for train\.epochs"):
        Pipeline(["train"], export=False, options={"train": {"epochs": "x"}})


def test_fixed_batch_model_fails_with_a_clear_error() -> None:
    class FixedBatch(nn.Module):
        """What a decomposed .pt2 exported at batch 2 looks like: a view with the batch baked in."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(36, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.view(2, 36))

    data = _toy_data(12)
    with pytest.raises(BadInputError, match=r"fails on a batch of 5 inputs of shape \(1, 6, 6\)"):
        evaluate(FixedBatch(), data, batch_size=5, device="cpu")
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.1, progress=False)
    with pytest.raises(BadInputError, match=r"torch\.export\.Dim on the batch dimension"):
        train_model(FixedBatch(), data, settings, "cpu", torch.Generator().manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_training_on_cuda_matches_the_contract() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    settings = TrainSettings(epochs=1, batch_size=16, lr=0.1, progress=False)
    history = train_model(model, _toy_data(), settings, "cuda", torch.Generator().manual_seed(0))
    assert next(model.parameters()).is_cuda and len(history) == 1
    loss, acc = evaluate(model, _toy_data(), 32, "cuda")
    assert math.isfinite(loss) and 0.0 <= acc <= 1.0
