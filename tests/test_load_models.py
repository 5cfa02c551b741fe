"""Loading every kind of model file, and refusing the ones that are unsafe or broken.

References are the original in-memory models: a loaded model must compute what the model
that was saved computes, on inputs of other batch sizes than the one it was saved with.
"""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
from torch import nn

from examples.models import ConcatNet, ResidualNet, SqueezeExciteNet
from examples.save_models import randomize_batch_norm
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.load import LoadOptions, load_ir, pickled_globals

SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """ResidualNet with non-trivial BatchNorm statistics, saved in every form."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = ResidualNet().eval()
    with torch.no_grad():
        randomize_batch_norm(model, torch.Generator().manual_seed(1))
    torch.save(model, folder / "full.pt")
    torch.save(model.state_dict(), folder / "state.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, folder / "checkpoint.pth")
    exported = torch.export.export(
        model, (torch.randn(2, *SHAPE[1:]),), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}
    )
    torch.export.save(exported, folder / "model.pt2")
    return {"folder": folder, "model": model}


def _outputs_match(loaded: nn.Module, reference: nn.Module, batch: int = 5) -> None:
    x = torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=1e-6)


def test_full_pickle_needs_trust(saved: dict[str, object]) -> None:
    path = Path(saved["folder"]) / "full.pt"  # type: ignore[arg-type]
    with pytest.raises(BadInputError) as info:
        load_ir(str(path), LoadOptions(input_shape=SHAPE))
    message = str(info.value)
    assert "pickled module (examples.models.ResidualNet)" in message
    assert "runs code" in message and "--trust-model" in message and "\n" not in message
    assert info.value.exit_code == 2
    ir = load_ir(str(path), LoadOptions(trust_model=True, input_shape=SHAPE))
    _outputs_match(ir.gm, saved["model"])  # type: ignore[arg-type]
    assert ir.num_classes == 10 and ir.source == str(path) and not ir.gm.training


def test_pickled_globals_are_read_without_unpickling(saved: dict[str, object], tmp_path: Path) -> None:
    names = pickled_globals(Path(saved["folder"]) / "full.pt")  # type: ignore[arg-type]
    assert "examples.models.ResidualNet" in names
    marker = tmp_path / "ran"

    class Trap(nn.Module):
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    torch.save(Trap(), tmp_path / "trap.pt")
    with pytest.raises(BadInputError, match="pickled"):
        load_ir(str(tmp_path / "trap.pt"), LoadOptions(input_shape=SHAPE))
    assert not marker.exists()  # refusing did not run the file's code


@pytest.mark.parametrize("name", ["state.pt", "checkpoint.pth"])
def test_state_dict_with_model_class(saved: dict[str, object], name: str) -> None:
    path = str(Path(saved["folder"]) / name)  # type: ignore[arg-type]
    with pytest.raises(
        BadInputError, match=r"is a state dict .* pass --model-class package\.module:ClassName"
    ):
        load_ir(path, LoadOptions(input_shape=SHAPE))
    ir = load_ir(path, LoadOptions(model_class="examples.models:ResidualNet", input_shape=SHAPE))
    _outputs_match(ir.gm, saved["model"])  # type: ignore[arg-type]


def test_state_dict_mismatches_name_keys(saved: dict[str, object], tmp_path: Path) -> None:
    state = str(Path(saved["folder"]) / "state.pt")  # type: ignore[arg-type]
    with pytest.raises(BadInputError) as info:
        load_ir(state, LoadOptions(model_class="examples.models:ConcatNet", input_shape=SHAPE))
    message = str(info.value)
    assert "does not match examples.models:ConcatNet" in message
    assert "missing branch1.bias" in message and "unexpected bn1.bias" in message and "more)" in message
    wrong = ResidualNet(num_classes=4).state_dict()
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(BadInputError, match=r"size mismatch for fc\.weight"):
        load_ir(
            str(tmp_path / "wrong.pt"),
            LoadOptions(model_class="examples.models:ResidualNet", input_shape=SHAPE),
        )
    for spec, fragment in [
        ("examples.models", "must look like package.module:ClassName"),
        ("examples.models:Nope", "has no class 'Nope'"),
        ("no_such_pkg.mod:X", "cannot import 'no_such_pkg.mod'"),
        ("examples.models:MODELS", "is not an nn.Module subclass"),
    ]:
        with pytest.raises(BadInputError, match=fragment):
            load_ir(state, LoadOptions(model_class=spec, input_shape=SHAPE))


def test_model_class_from_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "usernet.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 2, 3)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x).mean(dim=(2, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usernet  # type: ignore[import-not-found]

    net = usernet.Net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    ir = load_ir("net.pt", LoadOptions(model_class="usernet:Net", input_shape=(1, 1, 5, 5)))
    x = torch.randn(3, 1, 5, 5)
    torch.testing.assert_close(ir.gm(x), net(x))
    assert ir.num_classes == 2


def test_pt2_program_matches_original(saved: dict[str, object]) -> None:
    ir = load_ir(str(Path(saved["folder"]) / "model.pt2"))  # type: ignore[arg-type]
    assert ir.input_shape == SHAPE  # the batch dimension was dynamic, so batch 1 is used
    _outputs_match(ir.gm, saved["model"], batch=7)  # type: ignore[arg-type]
    kinds = [
        type(ir.gm.get_submodule(str(n.target))).__name__ for n in ir.gm.graph.nodes if n.op == "call_module"
    ]
    assert kinds.count("Conv2d") == 4 and kinds.count("BatchNorm2d") == 3 and kinds.count("Linear") == 1
    assert "_guards_fn" not in kinds
    # The lifted modules can be trained like any other: BatchNorm follows train()/eval().
    bn = ir.gm.get_submodule("bn1")
    before = bn.running_mean.clone()
    ir.gm.train()
    ir.gm(torch.randn(4, *SHAPE[1:]))
    assert not torch.equal(bn.running_mean, before)
    ir.gm.eval()


@pytest.mark.parametrize("cls", [SqueezeExciteNet, ConcatNet])
def test_pt2_of_other_models_and_decomposed_programs(cls: type[nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        randomize_batch_norm(model, torch.Generator().manual_seed(2))
    example = (torch.randn(2, *SHAPE[1:]),)
    plain = torch.export.export(model, example)
    decomposed = torch.export.export(model, example).run_decompositions()
    for i, program in enumerate((plain, decomposed)):
        path = tmp_path / f"m{i}.pt2"
        torch.export.save(program, path)
        ir = load_ir(str(path))
        assert ir.input_shape == (2, *SHAPE[1:])  # static batch: the program's own shape
        x = torch.randn(2, *SHAPE[1:])
        with torch.no_grad():
            torch.testing.assert_close(ir.gm(x), model(x), rtol=0, atol=1e-5)
        n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        lifted = sum(
            isinstance(ir.gm.get_submodule(str(n.target)), nn.Conv2d)
            for n in ir.gm.graph.nodes
            if n.op == "call_module"
        )
        assert lifted == n_convs


def test_builtins_for_classes_and_channels() -> None:
    for name in ("resnet", "mobilenet"):
        for classes, channels, size in [(10, 3, 32), (7, 1, 28), (3, 1, 8)]:
            ir = load_ir(
                f"builtin:{name}", LoadOptions(num_classes=classes, in_channels=channels, image_size=size)
            )
            assert ir.input_shape == (1, channels, size, size) and ir.num_classes == classes
            assert ir.output_shape() == (1, classes) and ir.source == f"builtin:{name}"
    ir = load_ir("builtin:resnet", LoadOptions(input_shape=(2, 1, 28, 28), num_classes=4))
    assert ir.input_shape == (2, 1, 28, 28) and ir.output_shape() == (2, 4)
    ir = load_ir("builtin:resnet", LoadOptions(model_options={"blocks": "1"}))
    adds = [n for n in ir.gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 3
    with pytest.raises(BadInputError, match=r"unknown built-in model 'nope' \(known: .*mobilenet.*resnet"):
        load_ir("builtin:nope")
    with pytest.raises(BadInputError, match="option blocks='x' is not an integer"):
        load_ir("builtin:resnet", LoadOptions(model_options={"blocks": "x"}))


def test_broken_files_get_one_line_errors(saved: dict[str, object], tmp_path: Path) -> None:
    good = (Path(saved["folder"]) / "full.pt").read_bytes()  # type: ignore[arg-type]
    cases = {
        "truncated.pt": (good[: len(good) // 2], "not a readable PyTorch file"),
        "text.pt": (b"hello, this is not a model", "not a readable PyTorch file"),
        "empty.pt": (b"", "is empty"),
    }
    for name, (blob, fragment) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(BadInputError, match=fragment) as info:
            load_ir(str(tmp_path / name), LoadOptions(trust_model=True, input_shape=SHAPE))
        assert "\n" not in str(info.value) and name in str(info.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(BadInputError, match="holds a list, not a model"):
        load_ir(str(tmp_path / "list.pt"), LoadOptions(input_shape=SHAPE))
    pt2 = (Path(saved["folder"]) / "model.pt2").read_bytes()  # type: ignore[arg-type]
    (tmp_path / "cut.pt2").write_bytes(pt2[: len(pt2) // 2])
    with pytest.raises(BadInputError, match=r"not a readable torch\.export program"):
        load_ir(str(tmp_path / "cut.pt2"))
    torch.jit.save(torch.jit.script(ResidualNet()), tmp_path / "scripted.pt")
    with pytest.raises(BadInputError, match="TorchScript archive"):
        load_ir(str(tmp_path / "scripted.pt"), LoadOptions(input_shape=SHAPE))
    with pytest.raises(BadInputError, match="does not exist"):
        load_ir(str(tmp_path / "absent.pt"))


def test_input_shape_and_class_count_checks(saved: dict[str, object]) -> None:
    full = str(Path(saved["folder"]) / "full.pt")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="pass --input-shape N,C,H,W"):
        load_ir(full, LoadOptions(trust_model=True))
    with pytest.raises(BadInputError, match="input shape 1,1,32,32 does not fit the model"):
        load_ir(full, LoadOptions(trust_model=True, input_shape=(1, 1, 32, 32)))
    with pytest.raises(BadInputError, match="outputs 10 classes but --num-classes says 4"):
        load_ir(full, LoadOptions(trust_model=True, input_shape=SHAPE, num_classes=4))
    with pytest.raises(BadInputError, match="positive integers"):
        load_ir(full, LoadOptions(trust_model=True, input_shape=(1, 0, 32, 32)))


def test_pickle_of_a_script_class_says_what_to_do(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "save_it.py"
    script.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x.mean(dim=(2, 3))\n"
        f"torch.save(Net(), {str(tmp_path / 'script.pt')!r})\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path)
    with pytest.raises(BadInputError, match=r"pickles __main__\.Net, a class defined in the script"):
        load_ir(str(tmp_path / "script.pt"), LoadOptions(trust_model=True, input_shape=SHAPE))


def test_save_models_script_writes_loadable_files(tmp_path: Path) -> None:
    from examples.models import MODELS
    from examples.save_models import save_all

    written = save_all(tmp_path, seed=3)
    assert {p.name for p in written} >= {"residual.pt", "concat_state.pt", "squeeze_excite.pt2", "branchy.pt"}
    x = torch.randn(3, *SHAPE[1:], generator=torch.Generator().manual_seed(4))
    for name, cls in MODELS.items():
        full = load_ir(str(tmp_path / f"{name}.pt"), LoadOptions(trust_model=True, input_shape=SHAPE))
        state = load_ir(
            str(tmp_path / f"{name}_state.pt"),
            LoadOptions(model_class=f"examples.models:{cls.__name__}", input_shape=SHAPE),
        )
        program = load_ir(str(tmp_path / f"{name}.pt2"))
        with torch.no_grad():
            reference = full.gm(x)
            torch.testing.assert_close(state.gm(x), reference, rtol=0, atol=0)
            torch.testing.assert_close(program.gm(x), reference, rtol=0, atol=1e-6)
        assert full.summary()["params"] == program.summary()["params"] == state.summary()["params"]
        assert full.summary()["macs"] == program.summary()["macs"]
