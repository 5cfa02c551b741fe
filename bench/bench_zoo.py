"""Third-party models through fxsculpt, side by side with ONNX Runtime's ``quantize_static``.

For every architecture of :data:`examples.third_party.ZOO` (timm, torchvision and Hugging Face
definitions, random initial weights): train briefly on the real CIFAR-10 subset, save it with
``torch.save``, then run the CLI as a user would —

- ``optimize m.pt --passes fold_bn``: the float ONNX file, its parity with PyTorch;
- ``optimize m.pt --passes fold_bn,quantize --set quantize.method=uniform --set quantize.bits=8``:
  exit code, int8 parity (top-1 agreement, max |diff|), the layers kept float, pass times;
- ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, the same 512 training
  images for calibration) on the float file;

and measure the three files with the ``ort-cpu`` target (ONNX Runtime CPU, ``ORT_ENABLE_ALL`` as
a deployed session runs, batch 1, 1 thread, the thread's CPU time) in interleaved rounds, each
round a fresh session per file: int8 ÷ float and ours ÷ quantize_static are medians of the
per-round ratios (files timed moments apart, so the machine's drift between rounds cancels), and
the float file is timed twice so that float ÷ float shows the run's noise floor (a file the pass
handed over as float can read a few percent "slower" than itself).
Accuracy is top-1 on the test split, computed by ONNX Runtime. ``--prune`` models also get
``--passes prune`` and ``--passes darts`` rows (exit code, seconds).

    python bench/bench_zoo.py                   # every model (~45 min on 2 idle cores)
    python bench/bench_zoo.py --quick           # the fast rows, fewer rounds
    python bench/bench_zoo.py --only tv_resnet18 hf_vit
    python bench/bench_zoo.py --search-only --prune tv_resnet18 hf_vit   # prune/darts rows alone
    python bench/bench_zoo.py --search-only --prune hf_vit --merge   # rerun rows of the last table

Writes ``bench/results/zoo.json`` and ``bench/results/zoo.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_quantize import onnx_accuracy, ort_quantize_static  # noqa: E402

import cli  # noqa: E402
from examples.third_party import ZOO, build, missing_package  # noqa: E402
from fxsculpt.hardware.ort_cpu import OrtCpuTarget  # noqa: E402
from fxsculpt.hardware.runtime import median_of_rounds, paired_ratios  # noqa: E402
from fxsculpt.passes.base import TrainSettings  # noqa: E402
from fxsculpt.training.data import load_data  # noqa: E402
from fxsculpt.training.loop import train_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
INT8 = ["--set", "quantize.method=uniform", "--set", "quantize.bits=8"]
PRUNE_MODELS = ("tv_resnet18", "timm_mobilenetv2_050", "hf_resnet")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast rows only, 1 epoch, fewer rounds")
    parser.add_argument("--only", nargs="+", choices=sorted(ZOO), help="these models only")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs before quantizing")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds")
    parser.add_argument("--prune", nargs="*", default=list(PRUNE_MODELS), help="models with prune/darts rows")
    parser.add_argument(
        "--search-only",
        action="store_true",
        help="only the prune/darts rows of the --prune models (written to zoo_search.json/.md), so "
        "they can run beside the timed rows",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace these models' rows in the existing results file instead of writing a new one "
        "(its commands list says which run made which rows)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_keep_models(parser)
    return parser.parse_args()


def run_cli(argv: list[str]) -> tuple[int, float, dict[str, Any] | None, str]:
    """``cli.main(argv)`` in this process: exit code, seconds, report.json (if written), stderr."""
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    seconds = time.perf_counter() - start
    out = Path(argv[argv.index("--out") + 1])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return rc, seconds, report, err.getvalue().strip().splitlines()[-1:][0] if err.getvalue().strip() else ""


def optimize(model: Path, out: Path, passes: str, *extra: str) -> list[str]:
    return [
        "optimize", str(model), "--trust-model", "--input-shape", "1,3,32,32", "--passes", passes,
        "--data", f"npz:{DATA}", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def pass_seconds(report: dict[str, Any] | None) -> dict[str, float]:
    return {p["name"]: round(p["seconds"], 1) for p in (report or {}).get("passes", [])}


def kept_float(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The layers the quantize pass left in float, with its reasons."""
    quant = (report or {}).get("quantization", {})
    return list(quant.get("float_layers", [])) or [
        {"layer": row["layer"], "reason": row.get("float_reason", "")}
        for row in quant.get("layers", [])
        if row.get("weight_bits") is None
    ]


def trained_and_saved(
    name: str, tmp: Path, data: Any, epochs: int, seed: int, keep: Path | None = None
) -> tuple[Path, float]:
    """The zoo model ``name`` trained ``epochs`` on ``data``, saved whole at ``tmp/name.pt``; training seconds.

    With ``keep`` (a folder) the trained model is also kept there, named by model, epochs and
    seed, and a later call with the same folder loads it instead of training again (the seconds
    given are then those of the training that made it).
    """
    path = tmp / f"{name}.pt"
    kept = None if keep is None else keep / f"{name}-{epochs}ep-seed{seed}.pt"
    if kept is not None and kept.is_file() and kept.with_suffix(".seconds").is_file():
        shutil.copyfile(kept, path)
        return path, float(kept.with_suffix(".seconds").read_text())
    model = build(name, seed)
    start = time.perf_counter()
    settings = TrainSettings(epochs=epochs, batch_size=64, lr=0.02, progress=False)
    train_model(model, data.train, settings, "cpu", torch.Generator().manual_seed(seed), desc=name)
    seconds = round(time.perf_counter() - start, 1)
    model.eval()
    torch.save(model, path)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
        kept.with_suffix(".seconds").write_text(str(seconds))
    return path, seconds


def quantize_static_file(float_onnx: Path, out: Path, data: Any) -> Path:
    """``quantize_static`` of ``float_onnx``, calibrated on the first 512 training images (8 batches)."""
    calib = [data.train.tensors[0][i : i + 64].numpy() for i in range(0, 512, 64)]
    return ort_quantize_static(float_onnx, out, calib)


def model_row(name: str, tmp: Path, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "package": ZOO[name].package, "features": ZOO[name].features}
    path, row["train_s"] = trained_and_saved(name, tmp, data, args.epochs, args.seed, args.keep_models)

    if args.search_only:
        search_rows(name, path, tmp, row)
        return row
    rc, seconds, report, err = run_cli(optimize(path, tmp / f"{name}_float", "fold_bn"))
    row["float"] = {"rc": rc, "s": round(seconds, 1), "error": err if rc else ""}
    if rc:
        return row
    row["float"]["max_abs_diff"] = report["onnx"]["max_abs_diff"]
    float_onnx = tmp / f"{name}_float" / "model.onnx"

    rc, seconds, report, err = run_cli(optimize(path, tmp / f"{name}_int8", "fold_bn,quantize", *INT8))
    onnx = (report or {}).get("onnx", {})
    row["int8"] = {
        "rc": rc,
        "s": round(seconds, 1),
        "error": err if rc else "",
        "agreement": onnx.get("top1_agreement"),
        "max_abs_diff": onnx.get("max_abs_diff"),
        "file_bytes": onnx.get("file_bytes"),
        "kept_float": kept_float(report),
        "pass_s": pass_seconds(report),
    }
    qs = quantize_static_file(float_onnx, tmp / f"{name}_qs.onnx", data)
    paths = {"float": float_onnx, "qs": qs}
    ours = tmp / f"{name}_int8" / "model.onnx"
    # The pass hands over the float file itself where it measured fastest: the same bytes run at
    # the same speed, so the row says so instead of timing a copy of the float file.
    row["ours_is_float_file"] = rc == 0 and ours.read_bytes() == float_onnx.read_bytes()
    if rc == 0 and not row["ours_is_float_file"]:
        paths["ours"] = ours
    # the float file a second time: the ratio of a file to itself is this run's noise floor
    timed = {**paths, "float_again": float_onnx}
    timings = OrtCpuTarget(threads=1).time_interleaved(timed, batch=1, rounds=args.rounds)
    row["latency_ms"] = {k: round(v, 4) for k, v in median_of_rounds(timings).items()}
    over_float = paired_ratios(timings, "float")
    row["float_over_float"] = round(over_float["float_again"], 3)
    x, y = data.test.tensors
    row["accuracy"] = {k: round(onnx_accuracy(p, x, y), 4) for k, p in paths.items()}
    row["qs_file_bytes"] = qs.stat().st_size
    if row["ours_is_float_file"]:
        row["accuracy"]["ours"] = row["accuracy"]["float"]
        row["int8_over_float"] = 1.0
        row["ours_over_qs"] = round(paired_ratios(timings, "qs")["float"], 3)
    elif "ours" in timings:
        row["int8_over_float"] = round(over_float["ours"], 3)
        row["ours_over_qs"] = round(paired_ratios(timings, "qs")["ours"], 3)
    if name in args.prune:
        search_rows(name, path, tmp, row)
    return row


def search_rows(name: str, path: Path, tmp: Path, row: dict[str, Any]) -> None:
    """``--passes prune`` and ``--passes darts`` (one epoch) on the saved model: exit code, seconds."""
    for passes in ("prune", "darts"):
        rc, seconds, _, err = run_cli(optimize(path, tmp / f"{name}_{passes}", passes, "--epochs", "1"))
        row[passes] = {"rc": rc, "s": round(seconds, 1), "error": err if rc else ""}


def markdown(result: dict[str, Any]) -> str:
    searched = any("prune" in r for r in result["rows"])  # else the rows are in zoo_search.md
    lines = [
        "| model | features | float diff | int8 rc | agreement | int8 max diff | int8÷float | float÷float "
        "| ours÷qs | acc float / ours / qs | kept float | quantize s | export s |"
        + (" prune | darts |" if searched else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if searched else ""),
    ]
    for r in result["rows"]:
        i8, acc = r.get("int8", {}), r.get("accuracy", {})
        names = [k["layer"] for k in i8.get("kept_float", [])]
        kept = ", ".join(names) if len(names) <= 4 else f"{len(names)} layers ({names[0]}, …)"
        kept = kept or "none"
        acc_cell = " / ".join(f"{100 * acc[k]:.1f}" if k in acc else "–" for k in ("float", "ours", "qs"))
        int8_over_float = f"{r.get('int8_over_float', float('nan')):.2f}"
        if r.get("ours_is_float_file"):
            int8_over_float = "1 (the float file)"

        def rc_time(key: str, row: dict[str, Any] = r) -> str:
            return f"rc {row[key]['rc']}, {row[key]['s']:.0f} s" if key in row else ""

        lines.append(
            f"| {r['model']} | {r['features']} | {r.get('float', {}).get('max_abs_diff', float('nan')):.1e} "
            f"| {i8.get('rc', '–')} | {i8.get('agreement') or 0:.3f} | {i8.get('max_abs_diff') or 0:.2e} "
            f"| {int8_over_float} | {r.get('float_over_float', float('nan')):.2f} "
            f"| {r.get('ours_over_qs', float('nan')):.2f} "
            f"| {acc_cell} | {kept} | {i8.get('pass_s', {}).get('quantize', '')} "
            f"| {i8.get('pass_s', {}).get('export', '')} |"
            + (f" {rc_time('prune')} | {rc_time('darts')} |" if searched else "")
        )
    lines += [
        "",
        f"ONNX Runtime {result['ort']} (ORT_ENABLE_ALL), {result['cpu']}; batch 1, 1 thread, ratios are "
        f"medians of per-round ratios over {result['rounds']} interleaved rounds, a fresh session per file "
        "and round (thread CPU time). Accuracy: CIFAR-10 subset test split after "
        f"{result['epochs']} training epoch(s) from random weights. Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def search_markdown(result: dict[str, Any]) -> str:
    lines = ["| model | features | prune | darts |", "|---|---|---|---|"]
    for r in result["rows"]:
        cells = [
            f"rc {r[k]['rc']}, {r[k]['s']:.0f} s" + (f" ({r[k]['error']})" if r[k]["error"] else "")
            for k in ("prune", "darts")
        ]
        lines.append(f"| {r['model']} | {r['features']} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"One epoch each after {result['epochs']} training epoch(s). Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def merged(
    path: Path, result: dict[str, Any], settings: tuple[str, ...] = ("epochs", "rounds")
) -> dict[str, Any]:
    """``result``'s rows put in place of the same models' rows of the results at ``path``.

    Refused (exit) where the old results were made with other ``settings``.
    """
    if not path.is_file():
        return result
    old = json.loads(path.read_text())
    if any(old.get(key) != result.get(key) for key in settings):
        flags = "/".join(f"--{key}" for key in settings)
        sys.exit(f"--merge: {path} was made with other {flags}; rerun every row instead")
    new = {row["model"]: row for row in result["rows"]}
    rows = [new.pop(row["model"], row) for row in old["rows"]] + list(new.values())
    commands = [*old.get("commands", [old["command"]]), result["command"]]
    return {**result, "rows": rows, "commands": commands, "command": " ; ".join(commands)}


def add_keep_models(parser: argparse.ArgumentParser) -> None:
    """The ``--keep-models`` option of every bench that trains zoo models (see :func:`trained_and_saved`)."""
    parser.add_argument(
        "--keep-models", type=Path, help="keep the trained models here and reuse them on a later run"
    )


def trained_zoo_arguments(description: str) -> argparse.Namespace:
    """The command line of the benches that train zoo models longer and compare files of them."""
    return trained_zoo_parser(description).parse_args()


def trained_zoo_parser(description: str) -> argparse.ArgumentParser:
    """The parser behind :func:`trained_zoo_arguments`, for a bench that adds options of its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--only", nargs="+", choices=sorted(ZOO), help="these models only")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs before quantizing")
    parser.add_argument("--merge", action="store_true", help="replace these models' rows in the last results")
    parser.add_argument("--seed", type=int, default=0)
    add_keep_models(parser)
    return parser


def cifar_subset(seed: int, threads: int = 2) -> Any:
    """The real CIFAR-10 subset (exit with a line where it is absent), with quiet logs and torch
    on ``threads`` threads."""
    if not DATA.is_file():
        sys.exit(f"the real CIFAR-10 subset is needed at {DATA}")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(threads)
    return load_data(f"npz:{DATA}", seed=seed)


def rows_written(
    stem: str,
    names: list[str],
    row_of: Callable[[str, Path], dict[str, Any]],
    markdown_of: Callable[[dict[str, Any]], str],
    merge: bool,
    settings: dict[str, Any],
) -> None:
    """One row per model of ``names`` (``row_of(name, scratch folder)``; a model whose package is
    missing is skipped and said so), written to ``results/<stem>.json`` and ``.md`` with the
    ``settings`` (kept equal across ``merge``s), the versions and the command line."""
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench_{stem}_") as tmp:
        for name in names:
            reason = missing_package(ZOO[name])
            if reason:
                print(f"{name}: skipped, {reason}", flush=True)
                continue
            rows.append(row_of(name, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    import onnxruntime

    result = {
        "rows": rows,
        **settings,
        "ort": onnxruntime.__version__,
        "command": "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "numpy": np.__version__,
    }
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    if merge:
        result = merged(results / f"{stem}.json", result, settings=tuple(settings))
    (results / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (results / f"{stem}.md").write_text(markdown_of(result))
    print(markdown_of(result))


def main() -> None:
    args = parse_args()
    # search rows leave a core to timed rows
    data = cifar_subset(args.seed, threads=1 if args.search_only else 2)
    if args.quick:
        args.epochs, args.rounds = 1, 7
    names = args.only or [n for n, m in ZOO.items() if not (args.quick and m.slow)]
    if args.search_only:
        names = [n for n in names if n in args.prune]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_zoo_") as tmp:
        for name in names:
            reason = missing_package(ZOO[name])
            if reason:
                print(f"{name}: skipped, {reason}", flush=True)
                continue
            row = model_row(name, Path(tmp), data, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    import onnxruntime

    from fxsculpt.hardware.runtime import cpu_name

    result = {
        "rows": rows,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "ort": onnxruntime.__version__,
        "cpu": cpu_name(),
        "command": "python " + " ".join(["bench/bench_zoo.py", *sys.argv[1:]]),
        "numpy": np.__version__,
    }
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stem = "zoo_search" if args.search_only else "zoo"
    if args.merge:
        result = merged(results / f"{stem}.json", result)
    table = search_markdown(result) if args.search_only else markdown(result)
    (results / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (results / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
