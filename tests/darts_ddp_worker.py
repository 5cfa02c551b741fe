"""Run by tests/test_darts_resume_ddp.py under ``torchrun --nproc_per_node 2``: one rank of a DARTS search.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/darts_ddp_worker.py OUT``.
Each rank searches the same small mixed-op network (second order) on its shards of each global
batch and writes ``OUT/rank<R>.pt`` with its α, weights and history.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from fxsculpt.nas.darts.mixed import MixedOp  # noqa: E402
from fxsculpt.nas.darts.search import SearchResult, SearchSettings, search  # noqa: E402
from fxsculpt.training import distributed  # noqa: E402

#: Global batches of 10 over 2 ranks (5 + 5); 40 samples per split: 4 steps per epoch.
SAMPLES, BATCH, EPOCHS = 40, 10, 2
SETTINGS = SearchSettings(epochs=EPOCHS, batch_size=BATCH, order=2, channels_last=True)


class MixedNet(nn.Module):
    """Two mixed edges over convolutions, identity and pooling; no BatchNorm (its statistics are per rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        names = ["none", "conv_3x3", "conv_5x5", "skip_connect", "avg_pool_3x3"]

        def candidates() -> list[nn.Module]:
            return [
                nn.Identity(),  # stands in for 'none', which the mixed op skips
                nn.Conv2d(4, 4, 3, padding=1),
                nn.Conv2d(4, 4, 5, padding=2),
                nn.Identity(),
                nn.AvgPool2d(3, stride=1, padding=1),
            ]

        self.edge1 = MixedOp(candidates(), names)
        self.edge2 = MixedOp(candidates(), names)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.edge1(h))
        h = self.edge2(h) + h
        return self.fc(h.mean(dim=(2, 3)))


def build() -> MixedNet:
    torch.manual_seed(0)
    return MixedNet()


def splits() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * SAMPLES, 2, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x[:SAMPLES], y[:SAMPLES]), TensorDataset(x[SAMPLES:], y[SAMPLES:])


def run_search(model: MixedNet) -> SearchResult:
    alphas = [model.edge1.alpha, model.edge2.alpha]
    ids = {id(a) for a in alphas}
    weights = [p for p in model.parameters() if id(p) not in ids]
    train, val = splits()
    return search(
        model, weights, alphas, train, val, SETTINGS, torch.device("cpu"), torch.Generator().manual_seed(7)
    )


def main(out: Path) -> None:
    info = distributed.init_distributed("cpu")
    assert info is not None and info.world_size == 2, "start me with torchrun --nproc_per_node 2"
    model = build()
    result = run_search(model)
    torch.save(
        {"state": model.state_dict(), "history": result.history, "alpha_history": result.alpha_history},
        out / f"rank{info.rank}.pt",
    )
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
