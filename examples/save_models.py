"""Write the example models in every form fxsculpt loads: ``python examples/save_models.py DIR``.

For each model in :data:`examples.models.MODELS` it writes ``DIR/<name>.pt`` (the whole
module pickled with ``torch.save``: load with ``--trust-model``), ``DIR/<name>_state.pt``
(a state dict: load with ``--model-class examples.models:<Class>``) and ``DIR/<name>.pt2``
(a ``torch.export`` program with a dynamic batch dimension), plus ``DIR/branchy.pt``, a
pickled :class:`~examples.models.BranchyNet` that torch.fx cannot trace (to see the
tracing error and its ``--leaf-modules`` fix). Weights and BatchNorm
statistics are random but fixed by ``--seed``, so the files are the same on every run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so the pickles name the class as examples.models.<Class>
    sys.path.insert(0, str(ROOT))

from examples.models import MODELS, BranchyNet  # noqa: E402


def randomize_batch_norm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm layers non-trivial running statistics, as a trained model would have."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            assert module.running_var is not None
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def save_all(out_dir: Path, seed: int = 0, in_channels: int = 3, image_size: int = 32) -> list[Path]:
    """Save every example model three ways into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, cls in MODELS.items():
        torch.manual_seed(seed)
        model = cls(in_channels=in_channels)  # type: ignore[call-arg]
        with torch.no_grad():
            randomize_batch_norm(model, torch.Generator().manual_seed(seed))
        model.eval()
        full, state, program = out_dir / f"{name}.pt", out_dir / f"{name}_state.pt", out_dir / f"{name}.pt2"
        torch.save(model, full)
        torch.save(model.state_dict(), state)
        example = torch.randn(
            2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(seed)
        )
        batch = torch.export.Dim("batch", min=1, max=4096)
        exported = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(exported, program)
        written += [full, state, program]
    torch.manual_seed(seed)
    branchy = out_dir / "branchy.pt"
    torch.save(BranchyNet(in_channels=in_channels).eval(), branchy)
    written.append(branchy)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path, help="folder to write the model files into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--in-channels", type=int, default=3, help="input channels of the models")
    parser.add_argument("--image-size", type=int, default=32, help="image size of the .pt2 example input")
    args = parser.parse_args(argv)
    for path in save_all(args.out_dir, args.seed, args.in_channels, args.image_size):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
