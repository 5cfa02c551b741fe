"""Third-party models (timm, torchvision definitions, Hugging Face) through the CLI, as a user runs it.

Table-driven over :data:`examples.third_party.ZOO` (random weights, no downloads), each model
saved with ``torch.save`` and handed to ``cli.main``:

- ``--passes fold_bn``: the float ONNX file agrees with the *original* PyTorch model (its
  logits, ``ModelOutput.logits`` for Hugging Face models called with ``pixel_values``), computed
  here by ONNX Runtime;
- ``--passes fold_bn,quantize`` (uniform 8-bit): exit 0, ONNX Runtime's integer kernels match the
  quantized PyTorch model layer by layer (the report's teacher-forced parity), and the layers the
  report says stayed float are exactly the Conv/Gemm kernels with float weights in the file;
- ``prune`` and ``darts`` (reduced epochs and data) with ``--budget`` checked on their exported files.

Rows outside the default subset are marked ``zoo_long`` (and ``slow``): ``pytest -m zoo_long``
runs them; ``python bench/bench_zoo.py`` measures them all, with latency.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

third_party = pytest.importorskip("examples.third_party")

import cli  # noqa: E402

ZOO = third_party.ZOO
#: One row per construct family that stays in the default run (the rest are ``zoo_long``).
DEFAULT_ROWS = ("timm_mobilenetv3_small_050", "hf_resnet")
INPUT_SHAPE = "1,3,32,32"


def rows(names: list[str] | None = None) -> list[Any]:
    chosen = names or list(ZOO)
    return [
        pytest.param(
            name,
            id=name,
            marks=[] if name in DEFAULT_ROWS else [pytest.mark.zoo_long, pytest.mark.slow],
        )
        for name in chosen
    ]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def saved(name: str, folder: Path) -> Path:
    """The zoo model ``name`` with seed-0 random weights, saved whole with ``torch.save`` (once per module)."""
    reason = third_party.missing_package(ZOO[name])
    if reason:
        pytest.skip(reason)
    path = folder / f"{name}.pt"
    if not path.is_file():
        torch.save(third_party.build(name, seed=0), path)
    return path


def optimize(model: Path, out: Path, passes: str, data: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    """``cli.main`` as ``fxsculpt optimize``: exit code, report.json (empty when none), stderr."""
    argv = [
        "optimize", str(model), "--trust-model", "--input-shape", INPUT_SHAPE, "--passes", passes,
        "--data", f"npz:{data}", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return rc, report, err.getvalue()


def reference_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The original model's logits: positional call, or ``pixel_values=`` and ``.logits`` (Hugging Face)."""
    with torch.no_grad():
        if hasattr(model, "config") and hasattr(model.config, "model_type"):
            out = model(pixel_values=x)
        else:
            out = model(x)
    return (out.logits if hasattr(out, "logits") else out).numpy()


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def float_weight_layers(path: Path) -> int:
    """Conv/Gemm/MatMul nodes of the file whose weight is a float32 initializer (counted in the file)."""
    import onnx

    model = onnx.load(str(path))
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return sum(
        1
        for node in model.graph.node
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in floats
    )


@pytest.mark.parametrize("name", rows())
def test_float_export_matches_the_original_model(
    name: str, tmp_path: Path, cifar_npz: Path, zoo_dir: Path
) -> None:
    path = saved(name, zoo_dir)
    rc, report, err = optimize(path, tmp_path / "float", "fold_bn", cifar_npz, "--data-limit", "256")
    assert rc == 0, err
    x = torch.from_numpy(np.load(cifar_npz)["x_test"][:16]).float()
    expected = reference_logits(torch.load(path, weights_only=False).eval(), x)
    got = ort_outputs(tmp_path / "float" / "model.onnx", x.numpy())
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-3 * max(1.0, float(np.abs(expected).max()))
    assert report["onnx"]["max_abs_diff"] <= report["onnx"]["tolerance"]


INT8 = ("--set", "quantize.method=uniform", "--set", "quantize.bits=8", "--set", "export.compare_samples=64")


@pytest.mark.parametrize("name", rows())
def test_int8_export_runs_the_quantized_model(
    name: str, tmp_path: Path, cifar_npz: Path, zoo_dir: Path
) -> None:
    # float_fallback=table: the placed model is handed over whatever the whole-model timing would
    # say, so its integer kernels are always the ones checked (the measured choice: next test).
    path = saved(name, zoo_dir)
    rc, report, err = optimize(
        path, tmp_path / "int8", "fold_bn,quantize", cifar_npz,
        "--data-limit", "512", *INT8, "--set", "quantize.float_fallback=table",
    )  # fmt: skip
    assert rc == 0, err
    parity = report["onnx"]["kernel_parity"]
    assert parity["holds"] and parity["max_code_step"] <= 1
    assert parity["off_by_one"] - parity["off_by_one_at_boundary"] <= 1e-3 * parity["values_compared"]
    quantization = report["quantization"]
    assert "whole_model" not in quantization["placement"]
    float_layers = quantization["float_layers"]
    assert all(row["reason"] for row in float_layers)
    # Every layer the report calls float is a float-weight kernel in the file, and no other is:
    # the classifier head reads its int8 weights through a DequantizeLinear, so it is not one.
    assert float_weight_layers(tmp_path / "int8" / "model.onnx") == len(float_layers)


@pytest.mark.parametrize("name", rows(["timm_mobilenetv3_small_050"]))
def test_the_measured_choice_hands_over_the_fastest_file(
    name: str, tmp_path: Path, cifar_npz: Path, zoo_dir: Path
) -> None:
    path = saved(name, zoo_dir)
    rc, report, err = optimize(
        path, tmp_path / "int8", "fold_bn,quantize", cifar_npz, "--data-limit", "512", *INT8
    )
    assert rc == 0, err
    quantization = report["quantization"]
    whole_model = quantization["placement"]["whole_model"]
    # The file handed over is the fastest of the candidates timed (placed, every layer int8, float)
    # among float and those that beat float in all but one round; which one wins on this model is
    # within the machine's noise, so each outcome is checked.
    assert {"placed", "float"} <= set(whole_model["ms"]) == set(whole_model["over_float"])
    ratio, faster, rounds = (
        whole_model["over_float"],
        whole_model["rounds_faster_than_float"],
        whole_model["rounds"],
    )
    assert ratio["float"] == 1.0 and set(faster) == set(ratio) - {"float"}
    consistent = [k for k in faster if ratio[k] < 1.0 and faster[k] >= rounds - 1]
    best = min([1.0, *(ratio[k] for k in consistent)])
    assert ratio[whole_model["chosen"]] == best
    assert whole_model["chosen"] == "float" or whole_model["chosen"] in consistent
    layers = len(quantization["layers"])
    file_floats = float_weight_layers(tmp_path / "int8" / "model.onnx")
    if whole_model["chosen"] == "float":
        assert "kernel_parity" not in report["onnx"]
        assert report["onnx"]["max_abs_diff"] <= report["onnx"]["tolerance"]
        assert len(quantization["float_layers"]) == layers == file_floats
    else:
        assert report["onnx"]["kernel_parity"]["holds"]
        assert file_floats == len(quantization["float_layers"]) < layers


@pytest.mark.parametrize("passes", ["prune", "darts"])
@pytest.mark.parametrize(
    "name", rows(["timm_mobilenetv3_small_050", *[n for n in ZOO if n not in DEFAULT_ROWS]])
)
def test_search_passes_run_and_meet_a_budget(
    name: str, passes: str, tmp_path: Path, cifar_npz: Path, zoo_dir: Path
) -> None:
    path = saved(name, zoo_dir)
    quick = {
        "prune": [
            "--set",
            "prune.pretrain_epochs=0",
            "--set",
            "prune.search_epochs=1",
            "--set",
            "prune.measure=false",
        ],
        "darts": [],
    }[passes]
    rc, report, err = optimize(
        path, tmp_path / passes, passes, cifar_npz, "--epochs", "1", "--data-limit", "256",
        "--budget", "latency=10s", *quick,
    )  # fmt: skip
    assert rc == 0, err
    latency = report["budget"]["latency"]
    assert latency["met"] and 0 < latency["measured"] <= latency["limit"]
    assert (tmp_path / passes / "model.onnx").is_file()


def int8_size_bytes(model: torch.nn.Module) -> int:
    """Uniform 8-bit size counted by hand: one byte per Conv/Linear weight, a 32-bit bias per
    output channel (every conv has one once BatchNorm is folded in)."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    weights = sum(m.weight.numel() for m in layers)
    channels = sum(m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features for m in layers)
    return weights + 4 * channels


@pytest.mark.parametrize(
    "name", rows([*DEFAULT_ROWS, "timm_mobilenetv2_050", "timm_vit_tiny", "hf_mobilenet_v2"])
)
def test_bit_width_searches_run_and_meet_their_budgets(
    name: str, tmp_path: Path, cifar_npz: Path, zoo_dir: Path
) -> None:
    path = saved(name, zoo_dir)
    common = ["--epochs", "1", "--data-limit", "256", "--budget", "latency=10s"]
    rc, report, err = optimize(
        path, tmp_path / "dfq", "quantize", cifar_npz, *common,
        "--set", "quantize.method=dfq", "--set", "quantize.search_epochs=1",
    )  # fmt: skip
    assert rc == 0, err
    assert report["budget"]["latency"]["met"]
    assert report["quantization"]["size_kb"] < report["quantization"]["float_size_kb"]

    rc, report, err = optimize(
        path, tmp_path / "haq", "quantize", cifar_npz, *common,
        "--set", "quantize.method=haq", "--set", "quantize.episodes=3", "--set", "quantize.haq_warmup=2",
        "--set", "quantize.size_ratio=0.5",
    )  # fmt: skip
    assert rc == 0, err
    size = report["budget"]["size"]
    assert size["limit"] == pytest.approx(0.5 * int8_size_bytes(torch.load(path, weights_only=False)))
    assert size["met"] and size["measured"] <= size["limit"]
    assert report["budget"]["latency"]["met"] and (tmp_path / "haq" / "model.onnx").is_file()
