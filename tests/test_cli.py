"""The command line: exit codes, one-line errors, nothing half-written, and real runs.

Most tests call ``cli.main`` in-process (torch is imported once); one runs the real
entry point in a subprocess to check the exit code and the absence of a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from examples.save_models import save_all
from fxsculpt import cli
from fxsculpt.zoo import BuiltinSpec, build_builtin

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    """The example user models saved as pickles, state dicts and .pt2 programs."""
    folder = tmp_path_factory.mktemp("models")
    save_all(folder)
    return folder


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, fragment: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "expected an error message"
    assert lines[-1].startswith("error: "), lines
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in err


def test_passes_lists_builtins_with_their_options(capsys):
    code, out, _ = run(["passes", "--json"], capsys)
    assert code == 0
    listing = {entry["name"]: entry for entry in json.loads(out)}
    for name in ("train", "fold_bn", "dce", "export"):
        assert name in listing and listing[name]["summary"]
    assert listing["export"]["placement"] == "export"
    assert any(o["name"] == "opset" for o in listing["export"]["options"])


def test_inspect_counts_match_the_module(capsys):
    code, out, _ = run(["inspect", "builtin:resnet", "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    model = build_builtin("resnet", BuiltinSpec(num_classes=10, in_channels=3, image_size=32))
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["input_shape"] == [1, 3, 32, 32] and info["output_shape"] == [1, 10]
    # MACs of the first conv by hand: 3x3 kernel over 3 channels at every output element.
    conv1 = next(layer for layer in info["layers"] if layer["op"] == "Conv2d")
    _, c_out, h, w = conv1["shape"]
    assert conv1["macs"] == c_out * h * w * 3 * 3 * 3


@pytest.mark.parametrize("name", ["residual", "squeeze_excite", "concat"])
def test_user_models_export_matching_onnx(name, model_files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["optimize", str(model_files / f"{name}.pt"), "--trust-model", "--input-shape", "1,3,32,32"]
    code, _, err = run(
        [*argv, "--passes", "fold_bn,dce", "--data", "none", "--out", str(out), "--quiet"], capsys
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["max_abs_diff"] <= 1e-4
    # Independent check: ONNX Runtime on the published file against the original module.
    module = torch.load(model_files / f"{name}.pt", weights_only=False).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = module(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_state_dict_and_program_load(model_files, capsys):
    state = str(model_files / "residual_state.pt")
    shape = ["--input-shape", "1,3,32,32"]
    code, out, err = run(
        ["inspect", state, "--model-class", "examples.models:ResidualNet", *shape, "--json"], capsys
    )
    assert code == 0, err
    from_state = json.loads(out)["params"]
    code, out, err = run(["inspect", str(model_files / "residual.pt2"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["params"] == from_state


def test_pickle_without_trust_is_refused_and_nothing_is_written(model_files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["optimize", str(model_files / "residual.pt"), "--input-shape", "1,3,32,32", "--data", "none"]
    code, _, err = run([*argv, "--out", str(out)], capsys)
    assert code == 2
    assert_one_line_error(err, "--trust-model")
    assert not out.exists() or not any(out.iterdir())


def test_untraceable_model_names_the_line(tmp_path, capsys):
    branchy = tmp_path / "branchy.pt"
    from examples.models import BranchyNet

    torch.save(BranchyNet(), branchy)
    code, _, err = run(["inspect", str(branchy), "--trust-model", "--input-shape", "1,3,32,32"], capsys)
    assert code == 2
    assert_one_line_error(err, "models.py:")
    assert "--leaf-modules" in err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--passes", "nonexistent"], "unknown pass 'nonexistent'"),
        (["--passes", "fold_bn", "--set", "fold_bn.bogus=1"], "has no option 'bogus'"),
        (["--passes", "fold_bn", "--set", "export.opset=eighteen"], "bad value 'eighteen' for export.opset"),
        (["--passes", "fold_bn", "--set", "noequals"], "expected KEY=VALUE"),
        (["--input-shape", "1,3,32"], "--input-shape must be N,C,H,W"),
        (["--data", "npz:/no/such/file.npz"], "/no/such/file.npz"),
        (["--data", "imagenet:/x"], "unknown data spec"),
        (["--bogus-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_gives_exit_2_and_one_line(extra, fragment, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["optimize", "builtin:resnet", "--out", str(out), "--quiet"]
    if "--data" not in extra:
        argv += ["--data", "none"]
    if "--input-shape" not in extra:
        argv += ["--input-shape", "1,3,32,32"]
    code, _, err = run(argv + extra, capsys)
    assert code == 2
    assert_one_line_error(err, fragment)
    assert not (out / "model.onnx").exists() and not (out / "report.json").exists()


def test_input_shape_that_does_not_fit_a_file_model(model_files, tmp_path, capsys):
    argv = ["inspect", str(model_files / "residual.pt"), "--trust-model", "--input-shape", "1,5,32,32"]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert_one_line_error(err, "does not fit the model")


def test_config_file_gives_the_same_settings_as_flags(tmp_path, capsys):
    config = tmp_path / "pipeline.toml"
    config.write_text(
        'passes = ["fold_bn"]\ndata = "none"\ninput_shape = [1, 3, 32, 32]\n[export]\nopset = 18\n'
    )
    out = tmp_path / "out"
    code, _, err = run(
        ["optimize", "builtin:mobilenet", "--config", str(config), "--out", str(out), "--quiet"], capsys
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["fold_bn", "export"]
    assert report["onnx"]["opset"] == 18


def test_plugin_pass_runs_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    plugin = str(ROOT / "tests" / "plugin_example.py")
    argv = ["optimize", "builtin:resnet", "--plugin", plugin, "--passes", "count_ops", "--data", "none"]
    code, _, err = run([*argv, "--set", "count_ops.modules_only=true", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads((out / "report.json").read_text())["passes"][0]["summary"]
    model = build_builtin("resnet", BuiltinSpec())
    assert summary["Conv2d"] == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert "relu" not in summary  # modules_only counted no function calls


def test_end_to_end_on_real_cifar(cifar_npz, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["optimize", "builtin:resnet", "--data", f"npz:{cifar_npz}", "--passes", "train,fold_bn,dce"]
    argv += ["--epochs", "1", "--data-limit", "600", "--out", str(out), "--quiet"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["train", "fold_bn", "dce", "export"]
    metrics = report["metrics"]
    assert 0.0 <= metrics["accuracy_after"] <= 1.0
    assert metrics["params"] < metrics["params_before"]  # BatchNorm parameters were folded away
    assert report["onnx"]["max_abs_diff"] <= 1e-4 and report["onnx"]["top1_agreement"] >= 0.99
    assert {layer["name"] for layer in report["layers"]} >= {"fc"}
    assert (out / "report.md").read_text().startswith("# fxsculpt report")
    assert "accuracy (test)" in stdout


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "inspect", str(missing), "--input-shape", "1,3,32,32"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
