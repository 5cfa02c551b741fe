"""The four sample-based search passes through Pipeline + Context on a tiny darts-supernet and real CIFAR-10."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.load import LoadOptions, load_ir
from fxsculpt.nas.darts.genotype import load_genotype
from fxsculpt.nas.darts.mixed import MixedOp
from fxsculpt.nas.sample.encoding import SearchSpace
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.pipeline import Pipeline
from fxsculpt.passes.registry import PassRegistry
from fxsculpt.training.data import load_data

TINY = {"channels": "2", "layers": "3", "nodes": "2"}
FAST = {
    "budget": "4",
    "warmup_steps": "2",
    "steps_per_eval": "1",
    "val_batches": "1",
    "batch_size": "16",
    "final_epochs": "0",
}
METHOD = {
    "nao": {"controller_epochs": "3", "expand": "2"},
    "rl": {},
    "evolution": {"population": "3", "sample": "2"},
    "random": {},
}


def tiny_supernet():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return load_ir(
        "builtin:darts-supernet",
        LoadOptions(input_shape=(1, 3, 32, 32), num_classes=10, model_options=dict(TINY)),
    )


@pytest.fixture(scope="module")
def cifar(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    path = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-subset.npz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {path} (../shared/data is absent)")
    data = load_data(f"npz:{path}", seed=0, val_fraction=0.2, limit=160)
    # the pipeline scores the model before and after on the test split: 16 images keep that cheap
    return dataclasses.replace(data, test=TensorDataset(*(t[:16] for t in data.test.tensors)))


def make_context(tmp_path: Path, data, seed: int = 0) -> Context:  # type: ignore[no-untyped-def]
    return Context(
        out_dir=tmp_path,
        stage_dir=tmp_path / "stage",
        data=data,
        seed=seed,
        train=TrainSettings(epochs=0, batch_size=16, lr=0.05, progress=False),
    )


def test_the_four_passes_are_registered() -> None:
    names = PassRegistry.with_builtins().names()
    assert {"nao", "rl", "evolution", "random"} <= set(names)
    assert "" not in names  # the shared base class is not a pass


@pytest.mark.parametrize("name", ["nao", "rl", "evolution", "random"])
def test_pass_writes_genotype_history_and_plot(name: str, cifar, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ir = tiny_supernet()
    ctx = make_context(tmp_path, cifar)
    export = name == "random"  # one pass goes through the exporter too; the others skip it for time
    pipeline = Pipeline([name], options={name: FAST | METHOD[name]}, export=export)
    result = pipeline.run(ir, ctx)

    stage = tmp_path / "stage"
    genotype = load_genotype(str(stage / "genotype.json"))  # darts-eval can read what we wrote
    history = json.loads((stage / "history.json").read_text())
    assert (stage / "search.png").stat().st_size > 0
    assert history["evaluations"] == 4 and len(history["history"]) == 4
    best = [h["best_so_far"] for h in history["history"]]
    assert best == [max(h["score"] for h in history["history"][: i + 1]) for i in range(4)]
    assert history["best"]["score"] == max(h["score"] for h in history["history"])
    n_val_batch = min(16, len(cifar.val))
    for h in history["history"]:  # an accuracy over one batch of n images is a multiple of 1/n
        assert abs(h["score"] * n_val_batch - round(h["score"] * n_val_batch)) < 1e-6

    space = SearchSpace(steps=2)
    assert space.to_tokens(space.from_genotype(genotype)) == history["best"]["tokens"]
    # the returned IR is the plain derived network: no mixed ops left, classifier output
    out = result.ir
    assert not any(isinstance(m, MixedOp) for m in out.gm.modules())
    assert out.output_shape() == (1, 10)
    if export:
        assert any(p.suffix == ".onnx" for p in stage.iterdir())


@pytest.mark.slow
def test_same_seed_same_search(cifar, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runs = []
    for i in range(2):
        ctx = make_context(tmp_path / str(i), cifar, seed=3)
        Pipeline(["evolution"], options={"evolution": FAST | METHOD["evolution"]}, export=False).run(
            tiny_supernet(), ctx
        )
        history = json.loads((tmp_path / str(i) / "stage" / "history.json").read_text())
        runs.append([(h["tokens"], h["score"]) for h in history["history"]])
    assert runs[0] == runs[1]


def test_a_model_without_the_cell_space_is_refused(cifar, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ir = load_ir("builtin:resnet", LoadOptions(input_shape=(1, 3, 32, 32), num_classes=10))
    with pytest.raises(BadInputError, match="darts-supernet"):
        Pipeline(["random"], options={"random": FAST}, export=False).run(ir, make_context(tmp_path, cifar))
