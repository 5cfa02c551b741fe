"""fxsculpt's command line: ``optimize``, ``inspect``, ``passes`` and ``profile``.

``python cli.py ...`` and the installed ``fxsculpt`` command are the same program.
Exit codes: 0 done; 1 internal error (a bug: please report it); 2 bad input (usage,
unreadable or untraceable model, bad data, unknown pass or option); 3 a budget not met;
4 the run failed (training diverged, ONNX parity did not hold).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tomllib
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_RUN_FAILED = 0, 1, 2, 3, 4

# Top-level keys a --config TOML file may set, with the flag each one stands for.
CONFIG_KEYS = {
    "passes": "--passes",
    "data": "--data",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "seed": "--seed",
    "device": "--device",
    "budget": "--budget",
    "target": "--target",
    "threads": "--threads",
    "out": "--out",
    "input_shape": "--input-shape",
    "val_fraction": "--val-fraction",
    "data_limit": "--data-limit",
    "plugins": "--plugin",
    "workers": "--workers",
    "ray_address": "--ray-address",
}

DEFAULTS: dict[str, Any] = {
    "passes": "",
    "data": "digits",
    "epochs": 3,
    "batch_size": 64,
    "lr": 0.05,
    "seed": 0,
    "device": "cpu",
    "budget": None,
    "target": "ort-cpu",
    "threads": 1,
    "out": "out",
    "input_shape": None,
    "val_fraction": 0.1,
    "data_limit": None,
    "plugins": [],
    "workers": 1,
    "ray_address": None,
}


class UsageError(Exception):
    """Raised instead of argparse's exit so that usage errors share the one-line format."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a .pt/.pth file, a .pt2 torch.export program, or builtin:NAME")
    parser.add_argument(
        "--trust-model",
        action="store_true",
        help="allow loading a fully pickled model (unpickling runs code from the file)",
    )
    parser.add_argument("--model-class", help="package.module:ClassName to load a state dict into")
    parser.add_argument(
        "--input-shape", help="input shape with batch, e.g. 1,3,32,32 (default: from the data)"
    )
    parser.add_argument(
        "--num-classes", type=int, help="classes of a built-in model (default: from the data)"
    )
    parser.add_argument(
        "--in-channels", type=int, help="input channels of a built-in model (default: from the data)"
    )
    parser.add_argument("--genotype", help="genotype name or genotype.json for builtin:darts-eval")
    parser.add_argument(
        "--model-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a built-in model's option (repeatable)",
    )
    parser.add_argument(
        "--leaf-modules",
        default="",
        help="comma-separated module class names or paths that tracing keeps opaque",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxsculpt", description="Search, prune, quantize and export PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    opt = sub.add_parser("optimize", help="run passes on a model and export ONNX")
    _add_model_arguments(opt)
    opt.add_argument(
        "--passes", default=None, help="comma-separated pass names, run in order (export is added last)"
    )
    opt.add_argument("--set", action="append", default=[], metavar="PASS.OPTION=VALUE", help="a pass option")
    opt.add_argument("--config", help="a TOML file giving the same settings as the flags")
    opt.add_argument("--plugin", action="append", default=None, help="a Python file defining extra passes")
    opt.add_argument(
        "--data", default=None, help="digits (default), npz:PATH, cifar10:DIR, mnist:DIR, or none"
    )
    opt.add_argument("--val-fraction", type=float, default=None, help="share of training data held out (0.1)")
    opt.add_argument(
        "--data-limit",
        type=int,
        default=None,
        help="use only the first N training and N test images (quick runs)",
    )
    opt.add_argument("--epochs", type=int, default=None, help="training epochs for passes that train (3)")
    opt.add_argument("--batch-size", type=int, default=None, help="training batch size (64)")
    opt.add_argument("--lr", type=float, default=None, help="learning rate for passes that train (0.05)")
    opt.add_argument("--seed", type=int, default=None, help="seed of every random choice (0)")
    opt.add_argument("--device", default=None, help="cpu (default) or cuda")
    opt.add_argument(
        "--budget", default=None, help="e.g. latency=4ms,size=500KB,bitops=1G,params=1M,accuracy_drop=1%%"
    )
    opt.add_argument("--target", default=None, help="hardware target: ort-cpu (default) or bitserial")
    opt.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for measurements (1)")
    opt.add_argument("--out", default=None, help="output folder (out)")
    opt.add_argument(
        "--workers",
        type=int,
        default=None,
        help="evaluate search candidates in N parallel Ray workers (1; needs fxsculpt[distributed])",
    )
    opt.add_argument(
        "--ray-address",
        default=None,
        help="an existing Ray cluster for --workers, e.g. HEAD:6379 or auto (default: a local runtime)",
    )
    opt.add_argument(
        "--resume",
        default=None,
        metavar="OUT",
        help="continue the interrupted run whose output folder is OUT from its checkpoints (same command)",
    )
    opt.add_argument("--quiet", action="store_true", help="no progress bars or logs, only the final table")

    ins = sub.add_parser("inspect", help="trace a model and print its layers, shapes, parameters and MACs")
    _add_model_arguments(ins)
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")

    lst = sub.add_parser("passes", help="list the passes and their options")
    lst.add_argument("--plugin", action="append", default=[], help="a Python file defining extra passes")
    lst.add_argument("--json", action="store_true", help="print JSON instead of text")

    prof = sub.add_parser("profile", help="measure a model's latency per layer on a hardware target")
    try:
        from fxsculpt.hardware.profile_cli import add_profile_arguments
    except ImportError:
        prof.add_argument("model", help="a .pt, .pt2 or .onnx file")
    else:
        add_profile_arguments(prof)
    return parser


# -- helpers ---------------------------------------------------------------------------------
def parse_key_values(items: Sequence[str], flag: str) -> dict[str, str]:
    from fxsculpt.ir.errors import BadInputError

    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"bad {flag} {item!r}: expected KEY=VALUE")
        values[key.strip()] = value.strip()
    return values


def parse_pass_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["darts.order=2", ...]`` → ``{"darts": {"order": "2"}}``."""
    from fxsculpt.ir.errors import BadInputError

    options: dict[str, dict[str, Any]] = {}
    for key, value in parse_key_values(items, "--set").items():
        pass_name, dot, option_name = key.partition(".")
        if not dot or not option_name:
            raise BadInputError(f"bad --set {key}={value}: expected PASS.OPTION=VALUE, e.g. darts.order=2")
        options.setdefault(pass_name, {})[option_name] = value
    return options


def load_config(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read a TOML config: top-level settings and one table of options per pass."""
    from fxsculpt.ir.errors import BadInputError

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise BadInputError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"config {path} is not valid TOML: {exc}") from exc
    settings: dict[str, Any] = {}
    pass_options: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            pass_options[key] = dict(value)
        elif key in CONFIG_KEYS:
            settings[key] = value
        else:
            known = ", ".join(sorted(CONFIG_KEYS))
            raise BadInputError(
                f"config {path}: unknown setting '{key}' (settings: {known}; pass options go in [PASS] tables)"
            )
    return settings, pass_options


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Flags override the config file, which overrides the defaults."""
    config_settings, pass_options = load_config(args.config) if args.config else ({}, {})
    settings: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        flag_value = getattr(args, key, None)
        if flag_value is not None:
            settings[key] = flag_value
        elif key in config_settings:
            settings[key] = config_settings[key]
        else:
            settings[key] = default
    passes = settings["passes"]
    if isinstance(passes, str):
        passes = [p.strip() for p in passes.split(",") if p.strip()]
    settings["passes"] = list(passes)
    if isinstance(settings["input_shape"], list):
        settings["input_shape"] = ",".join(map(str, settings["input_shape"]))
    for pass_name, values in parse_pass_options(args.set).items():
        pass_options.setdefault(pass_name, {}).update(values)
    return settings, pass_options


def make_registry(plugins: Sequence[str]):  # -> PassRegistry
    from fxsculpt.passes.registry import PassRegistry

    registry = PassRegistry.with_builtins()
    registry.load_entry_points()
    for plugin in plugins:
        registry.load_plugin(plugin)
    return registry


def load_options_from_args(args: argparse.Namespace, input_shape: tuple[int, ...] | None, data: Any = None):
    """The loader's options from the shared model flags, filling gaps from the data."""
    from fxsculpt.ir.load import LoadOptions

    model_options = parse_key_values(args.model_opt, "--model-opt")
    if args.genotype:
        model_options["genotype"] = args.genotype
    in_channels = args.in_channels or (data.input_shape[0] if data is not None else 3)
    image_size = data.input_shape[-1] if data is not None else 32
    if input_shape is not None and len(input_shape) == 4:
        in_channels = args.in_channels or input_shape[1]
        image_size = input_shape[-1]
    num_classes = args.num_classes or (data.num_classes if data is not None else None)
    leaf_modules = tuple(m.strip() for m in args.leaf_modules.split(",") if m.strip())
    return LoadOptions(
        trust_model=args.trust_model,
        model_class=args.model_class,
        input_shape=input_shape,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        model_options=model_options,
        leaf_modules=leaf_modules,
    )


def check_data_fits(ir: Any, data: Any, data_spec: str) -> None:
    from fxsculpt.ir.errors import BadInputError

    sample_shape = tuple(ir.input_shape[1:])
    if tuple(data.input_shape) != sample_shape:
        raise BadInputError(
            f"data {data_spec} has samples of shape {'x'.join(map(str, data.input_shape))} but the model takes "
            f"{'x'.join(map(str, sample_shape))}; pass matching --data, or --data none"
        )
    from fxsculpt.training.data import check_labels

    if ir.num_classes is not None:
        check_labels(data, ir.num_classes)


def resolve_out_dir(args: argparse.Namespace, settings: dict[str, Any]) -> tuple[Path, Path | None]:
    """The output folder and the run to resume (``--resume OUT``) or None.

    A new run refuses an output folder holding checkpoints of an unfinished run: they would be
    lost, and the user most likely meant ``--resume``.
    """
    from fxsculpt.ir.errors import BadInputError
    from fxsculpt.training.checkpoint import CHECKPOINT_FOLDER, has_checkpoints

    if args.resume is None:
        out_dir = Path(settings["out"])
        if has_checkpoints(out_dir):
            raise BadInputError(
                f"{out_dir} holds checkpoints of an unfinished run: add --resume {out_dir} to continue it, "
                f"or remove {out_dir / CHECKPOINT_FOLDER} to start afresh"
            )
        return out_dir, None
    resume = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != resume.resolve():
        raise BadInputError(f"--resume {resume} continues in its own folder; drop --out {args.out}")
    if not has_checkpoints(resume):
        raise BadInputError(
            f"--resume {resume}: no checkpoints in {resume / CHECKPOINT_FOLDER} to resume from"
        )
    from fxsculpt.training.distributed import is_main_process

    if is_main_process():  # rank 0 only: other ranks must not race it for its new staging folder
        for stale in resume.glob(".fxsculpt-staging-*"):  # left by the killed run, which could not clean up
            shutil.rmtree(stale, ignore_errors=True)
    return resume, resume


def run_fingerprint(
    args: argparse.Namespace, settings: dict[str, Any], pass_options: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The settings a run's result depends on; ``--resume`` must repeat them."""
    ignored = {"out", "workers", "ray_address", "plugins"}
    return {
        "model": args.model,
        "model_class": args.model_class,
        "model_opt": sorted(args.model_opt),
        "genotype": args.genotype,
        "num_classes": args.num_classes,
        "in_channels": args.in_channels,
        "pass_options": pass_options,
        **{key: value for key, value in settings.items() if key not in ignored},
    }


# -- commands --------------------------------------------------------------------------------
def cmd_optimize(args: argparse.Namespace) -> int:
    """``optimize``, joining the torchrun process group first when started by torchrun."""
    from fxsculpt.training import distributed

    try:
        if distributed.launched_by_torchrun():
            settings, _ = resolve_settings(args)
            distributed.init_distributed(settings["device"])
            if not distributed.is_main_process():
                args.quiet = True  # one set of logs and progress bars: rank 0's
                logging.getLogger().setLevel(logging.WARNING)
        return _optimize(args)
    finally:
        distributed.teardown()


def _optimize(args: argparse.Namespace) -> int:
    import torch

    from fxsculpt.ir.errors import BadInputError
    from fxsculpt.ir.load import load_ir, parse_shape
    from fxsculpt.passes.base import Context, TrainSettings
    from fxsculpt.passes.outputs import OutputFolder
    from fxsculpt.passes.pipeline import Pipeline
    from fxsculpt.passes.report import build_report, render_console, render_markdown, to_json

    settings, pass_options = resolve_settings(args)
    plugins = list(settings["plugins"] or []) + list(args.plugin or [])
    registry = make_registry(plugins)
    pipeline = Pipeline(settings["passes"], registry=registry, options=pass_options)

    from fxsculpt.hardware.targets import TARGET_NAMES

    if settings["target"] not in TARGET_NAMES:
        raise BadInputError(f"unknown --target '{settings['target']}' (known: {', '.join(TARGET_NAMES)})")
    budget = None
    if settings["budget"]:
        from fxsculpt.hardware.budget import parse_budget

        budget = parse_budget(str(settings["budget"]))
    device = torch.device(settings["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda was asked for, but no CUDA device is available")
    from fxsculpt.training import distributed

    dist_info = distributed.active()
    if dist_info is not None:
        device = dist_info.device  # one GPU per process under torchrun
    out_dir, resume_from = resolve_out_dir(args, settings)
    workers = int(settings["workers"])
    if workers < 1:
        raise BadInputError(f"--workers must be >= 1, got {workers}")
    if workers > 1 or settings["ray_address"]:
        from fxsculpt.training.parallel import require_ray

        require_ray()
    if settings["threads"] < 1 or settings["epochs"] < 0 or settings["batch_size"] < 1 or settings["lr"] <= 0:
        raise BadInputError("--threads and --batch-size must be >= 1, --epochs >= 0 and --lr > 0")

    torch.manual_seed(settings["seed"])  # modules built below draw their initial weights from it
    data_spec = None if str(settings["data"]).lower() == "none" else str(settings["data"])
    data = None
    if data_spec is not None:
        from fxsculpt.training.data import load_data

        data = load_data(
            data_spec,
            seed=settings["seed"],
            val_fraction=float(settings["val_fraction"]),
            limit=settings["data_limit"],
        )
    input_shape = parse_shape(settings["input_shape"]) if settings["input_shape"] else None
    if input_shape is None and data is not None:
        input_shape = (1, *data.input_shape)
    ir = load_ir(args.model, load_options_from_args(args, input_shape, data))
    if data is not None and data_spec is not None:
        check_data_fits(ir, data, data_spec)
    ir.gm.to(device)
    before = ir.summary()

    logger = logging.getLogger("fxsculpt")
    out = OutputFolder(out_dir) if distributed.is_main_process() else distributed.RankLocalOutput(out_dir)
    ctx = Context(
        out_dir=out.out_dir,
        stage_dir=out.stage_dir,
        data=data,
        device=device,
        seed=settings["seed"],
        train=TrainSettings(
            epochs=settings["epochs"],
            batch_size=settings["batch_size"],
            lr=settings["lr"],
            progress=not args.quiet,
        ),
        budget=budget,
        target=settings["target"],
        threads=settings["threads"],
        logger=logger,
        checkpoint_dir=out_dir / "checkpoints",
        resume_from=resume_from,
        workers=workers,
        ray_address=settings["ray_address"],
    )
    from fxsculpt.training.checkpoint import CHECKPOINT_FOLDER, has_checkpoints, record_run_settings

    complete = False
    try:
        record_run_settings(
            out_dir, run_fingerprint(args, settings, pass_options), resume=resume_from is not None
        )
        result = pipeline.run(ir, ctx)
        if not distributed.is_main_process():
            return EXIT_OK  # rank 0 reports and publishes
        status = "over_budget" if result.budget_error is not None else "ok"
        report = build_report(result.ir, result, ctx, before=before, data_spec=data_spec, status=status)
        written = out.publish(
            ctx.artifacts, {"report.json": to_json(report), "report.md": render_markdown(report)}
        )
        complete = True
    finally:
        out.discard()
        # Checkpoints outlive a failed run (--resume continues it); a complete run, or one that
        # failed before its first checkpoint, leaves none.
        if distributed.is_main_process() and (complete or not has_checkpoints(out_dir)):
            shutil.rmtree(out_dir / CHECKPOINT_FOLDER, ignore_errors=True)
    print(render_console(report))
    for path in written:
        print(f"wrote {path}")
    if result.budget_error is not None:
        print(f"error: {_one_line(str(result.budget_error))}", file=sys.stderr)
        return EXIT_BUDGET
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from fxsculpt.ir.load import load_ir, parse_shape
    from fxsculpt.passes.report import _fmt_count

    input_shape = parse_shape(args.input_shape) if args.input_shape else None
    ir = load_ir(args.model, load_options_from_args(args, input_shape))
    summary = ir.summary()
    info = {
        "model": ir.source,
        "input_shape": list(ir.input_shape),
        "output_shape": list(ir.output_shape() or []),
        "num_classes": ir.num_classes,
        "params": summary["params"],
        "macs": summary["macs"],
        "size_bytes": summary["size_bytes"],
        "nodes": summary["nodes"],
        "layers": [row.as_dict() for row in ir.layers()],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    from tabulate import tabulate

    rows = [
        [
            r["name"],
            r["op"],
            "x".join(map(str, r["shape"] or [])),
            _fmt_count(r["params"]),
            _fmt_count(r["macs"]),
        ]
        for r in info["layers"]
    ]
    print(tabulate(rows, headers=["layer", "op", "output shape", "params", "MACs"], tablefmt="simple"))
    print(
        f"\n{info['model']}: input {info['input_shape']}, output {info['output_shape']}, "
        f"{info['params']:,} parameters, {info['macs']:,} MACs, {info['size_bytes']:,} bytes"
    )
    return EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    import dataclasses

    from fxsculpt.passes.options import describe_type, resolved_types

    registry = make_registry(args.plugin)
    listing = []
    for cls in registry.classes():
        types_by_name = resolved_types(cls.Options)
        options = [
            {
                "name": f.name,
                "type": describe_type(types_by_name[f.name]),
                "default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),  # type: ignore[misc]
                "help": f.metadata.get("help", ""),
            }
            for f in dataclasses.fields(cls.Options)
        ]
        listing.append(
            {"name": cls.name, "summary": cls.summary_line(), "placement": cls.placement, "options": options}
        )
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return EXIT_OK
    for entry in listing:
        print(f"{entry['name']}: {entry['summary']}")
        for o in entry["options"]:
            print(f"    {entry['name']}.{o['name']} ({o['type']}, default {o['default']!r}): {o['help']}")
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    from fxsculpt.ir.errors import BadInputError

    try:
        from fxsculpt.hardware.profile_cli import run_profile
    except ImportError:
        raise BadInputError("profiling needs the hardware package, which this installation lacks") from None
    return int(run_profile(args))


COMMANDS = {"optimize": cmd_optimize, "inspect": cmd_inspect, "passes": cmd_passes, "profile": cmd_profile}


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    for noisy in ("torch", "onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run a command; returns the exit code (never raises for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        _configure_logging(getattr(args, "quiet", False))
        if not debug:
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        from fxsculpt.ir.errors import FxsculptError

        try:
            return COMMANDS[args.command](args)
        except FxsculptError as exc:
            if debug:
                traceback.print_exc()
            print(f"error: {_one_line(str(exc))}", file=sys.stderr)
            return exc.exit_code
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted; no output was published", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in fxsculpt: say so, with a traceback only on request
        if debug:
            traceback.print_exc()
        print(
            f"internal error: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _one_line(text: str) -> str:
    return " ".join(text.split()) if text else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
