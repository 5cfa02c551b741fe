"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: one rank of a DDP training.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT``.
Each rank writes ``OUT/rank<R>.pt`` with its trained weights, history and the results of the
architecture-parameter helpers, for the test to compare with a one-process run.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from fxsculpt.passes.base import TrainSettings  # noqa: E402
from fxsculpt.training import distributed  # noqa: E402
from fxsculpt.training.checkpoint import Checkpointer  # noqa: E402
from fxsculpt.training.loop import train_model  # noqa: E402

#: 110 samples in global batches of 25: shards of 13 and 12, and a last batch of 10 (5 + 5).
SAMPLES, BATCH, EPOCHS, LR = 110, 25, 2, 0.1


def toy_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 2, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 1, 0, 0] > 0).long()
    return TensorDataset(x, y)


class SmallNet(nn.Module):
    """No BatchNorm or dropout: those keep per-rank statistics and masks under DDP by design."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 9, 4)
        self.unused = nn.Linear(2, 2)  # never called: DDP must not wait for its gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


class DropNet(SmallNet):
    """With dropout: per-rank dropout RNG streams must resume exactly too."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(super().forward(x))


def build() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


SETTINGS = TrainSettings(epochs=EPOCHS, batch_size=BATCH, lr=LR, progress=False)


class _Crash(Exception):
    pass


def _train_with_checkpoints(
    folder: Path, resume: bool, crash_after: int | None = None
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DropNet()

    def on_epoch_end(epoch: int, _: dict[str, float]) -> None:
        if epoch == crash_after:
            raise _Crash

    checkpoint = Checkpointer(folder, resume=resume, writer=distributed.is_main_process())
    train_model(
        model,
        toy_data(),
        SETTINGS,
        "cpu",
        torch.Generator().manual_seed(7),
        checkpoint=checkpoint,
        on_epoch_end=on_epoch_end,
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


def _resume_matches(out: Path) -> bool:
    """Crash after epoch 1 and resume (under DDP, with dropout) equals the uninterrupted DDP run."""
    reference = _train_with_checkpoints(out / "ckpt-a", resume=False)
    with contextlib.suppress(_Crash):
        _train_with_checkpoints(out / "ckpt-b", resume=False, crash_after=1)
    distributed.barrier()  # rank 0's checkpoint is on disk before anyone reads it
    resumed = _train_with_checkpoints(out / "ckpt-b", resume=True)
    return all(torch.equal(resumed[k], reference[k]) for k in reference)


def main(out: Path) -> None:
    info = distributed.init_distributed("cpu")
    assert info is not None and info.world_size == 2, "start me with torchrun --nproc_per_node 2"
    model = build()
    history = train_model(model, toy_data(), SETTINGS, "cpu", torch.Generator().manual_seed(7))
    # Architecture-parameter helpers: a gradient that differs per rank is averaged; a value is broadcast.
    alpha = nn.Parameter(torch.zeros(3))
    alpha.grad = torch.full((3,), float(info.rank + 1))
    distributed.average_gradients([alpha])
    lam = nn.Parameter(torch.full((2,), float(10 * info.rank + 1)))
    distributed.broadcast_parameters([lam])
    spread = distributed.max_rank_difference(model.parameters())
    resumed_equal = _resume_matches(out)
    torch.save(
        {
            "state": model.state_dict(),
            "history": history,
            "alpha_grad": alpha.grad.clone(),
            "lam": lam.detach().clone(),
            "spread": spread,
            "main": distributed.is_main_process(),
            "resumed_equal": resumed_equal,
        },
        out / f"rank{info.rank}.pt",
    )
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
