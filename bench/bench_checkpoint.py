"""What never losing work costs: per-epoch checkpoints against the same training without them.

``builtin:resnet`` (CIFAR-style ResNet) is trained on the real CIFAR-10 subset (or ``digits``
when ../shared/data is absent) with the shared loop, alternately with and without a
:class:`~training.checkpoint.Checkpointer`, in the same run (the machine is shared and noisy):
the ratio of the medians is the overhead. Also reported: the time of one atomic save (write,
fsync, rename) and the size of one checkpoint, and that a resumed run equals the uninterrupted one.

    python bench/bench_checkpoint.py            # 3 rounds of 2 epochs on 1,000 images
    python bench/bench_checkpoint.py --quick    # 2 rounds of 1 epoch on 300 images

Writes bench/results/checkpoint.json and checkpoint.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from fxsculpt.passes.base import TrainSettings  # noqa: E402
from fxsculpt.training.checkpoint import Checkpointer  # noqa: E402
from fxsculpt.training.data import load_data  # noqa: E402
from fxsculpt.training.loop import train_model  # noqa: E402
from fxsculpt.zoo import BuiltinSpec, build_builtin  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
RESULTS = ROOT / "bench" / "results"


def _model(channels: int, classes: int, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_builtin("resnet", BuiltinSpec(num_classes=classes, in_channels=channels, image_size=size))


def _train(
    data: Any, settings: TrainSettings, folder: Path | None, resume: bool = False
) -> tuple[float, Any]:
    c, h, _ = data.input_shape
    model = _model(c, data.num_classes, h)
    checkpoint = Checkpointer(folder, resume=resume) if folder is not None else None
    start = time.perf_counter()
    train_model(model, data.train, settings, "cpu", torch.Generator().manual_seed(0), checkpoint=checkpoint)
    return time.perf_counter() - start, model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    epochs = 1 if args.quick else 2
    limit = 300 if args.quick else 1000
    torch.set_num_threads(1)
    spec = f"npz:{DATA}" if DATA.is_file() else "digits"
    data = load_data(spec, seed=0, limit=limit)
    settings = TrainSettings(epochs=epochs, batch_size=64, lr=0.05, progress=False)

    plain, checkpointed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(rounds):  # alternate, so drifting background load hits both alike
            seconds, reference = _train(data, settings, None)
            plain.append(seconds)
            folder = Path(tmp) / f"run{index}"
            seconds, state = _train(data, settings, folder)
            checkpointed.append(seconds)
        files = sorted(folder.glob("ckpt-*.pt"))
        size = files[-1].stat().st_size
        payload = torch.load(files[-1], weights_only=True)
        saves = []
        for step in range(5):
            start = time.perf_counter()
            Checkpointer(Path(tmp) / "timing", resume=True).save(step, payload)
            saves.append(time.perf_counter() - start)
        same = all(torch.equal(state[k], reference[k]) for k in reference)

    result = {
        "data": spec.split("/")[-1],
        "images": len(data.train),
        "epochs": epochs,
        "rounds": rounds,
        "train_seconds_plain": plain,
        "train_seconds_checkpointed": checkpointed,
        "overhead_ratio_of_medians": statistics.median(checkpointed) / statistics.median(plain),
        "checkpoint_bytes": size,
        "save_seconds_median": statistics.median(saves),
        "checkpointed_weights_equal_plain": same,
        "torch_threads": 1,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ["training, no checkpoints (median s)", f"{statistics.median(plain):.2f}"],
        ["training, a checkpoint per epoch (median s)", f"{statistics.median(checkpointed):.2f}"],
        ["overhead (ratio of medians)", f"{result['overhead_ratio_of_medians']:.3f}"],
        ["one atomic save (median s)", f"{result['save_seconds_median']:.4f}"],
        ["checkpoint size (bytes)", f"{size:,}"],
        ["weights equal with and without checkpoints", str(same)],
    ]
    table = tabulate(rows, headers=["builtin:resnet", "value"], tablefmt="github", disable_numparse=True)
    header = (
        f"# Checkpoint overhead\n\n`python bench/bench_checkpoint.py{' --quick' if args.quick else ''}`: "
        f"{result['data']}, {result['images']} training images, {epochs} epoch(s), {rounds} alternating rounds, "
        "1 thread.\n\n"
    )
    (RESULTS / "checkpoint.md").write_text(header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
