"""Run by tests/test_quant_dfq_resume.py under ``torchrun --nproc_per_node 2``: one rank of a DFQ search.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/quant_ddp_worker.py OUT``.
Each rank searches the same small BatchNorm-free network (bit logits per layer and per channel
group) on its shards of each global batch and writes ``OUT/rank<R>.pt`` with its weights, bit
logits and history. The tests also import :func:`build` and :func:`run_search` for one-process runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from fxsculpt.quant import dfq  # noqa: E402
from fxsculpt.quant.modules import WeightQuantizer  # noqa: E402
from fxsculpt.training import distributed  # noqa: E402
from fxsculpt.training.checkpoint import Checkpointer  # noqa: E402

#: Global batches of 10 over 2 ranks (5 + 5); 40 samples per split: 4 steps per epoch.
SAMPLES, BATCH, EPOCHS = 40, 10, 2
#: θ near the validation loss: λ falls while there is slack and rises where the loss exceeds θ.
SETTINGS = dfq.DFQSettings(
    epochs=EPOCHS, batch_size=BATCH, weight_lr=0.05, arch_lr=0.2, theta=1.1, dual_lr=2.0, progress=False
)


class ToyNet(nn.Module):
    """conv (bits searched per group of 3 channels) → ReLU → mean → linear (bits searched per layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = WeightQuantizer(nn.Conv2d(2, 6, 3, padding=1))
        self.fc = WeightQuantizer(nn.Linear(6, 3))
        self.conv.enable_search((2, 4, 8), groups=2)
        self.fc.enable_search((2, 4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    def searched(self) -> dict[str, WeightQuantizer]:
        return {"conv": self.conv, "fc": self.fc}


def build() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet()


def splits() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * SAMPLES, 2, 5, 5, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 2, 2] > 0).long()
    return TensorDataset(x[:SAMPLES], y[:SAMPLES]), TensorDataset(x[SAMPLES:], y[SAMPLES:])


def run_search(
    model: ToyNet,
    settings: dfq.DFQSettings = SETTINGS,
    checkpoint: Checkpointer | None = None,
    on_epoch: dfq.EpochCallback | None = None,
) -> dfq.DFQHistory:
    train, val = splits()
    return dfq.search(
        model,
        model.searched(),
        train,
        val,
        settings,
        torch.Generator().manual_seed(7),
        torch.device("cpu"),
        on_epoch=on_epoch,
        checkpoint=checkpoint,
    )


def main(out: Path) -> None:
    info = distributed.init_distributed("cpu")
    assert info is not None and info.world_size == 2, "start me with torchrun --nproc_per_node 2"
    model = build()
    history = run_search(model)
    torch.save({"state": model.state_dict(), "history": history.epochs}, out / f"rank{info.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
