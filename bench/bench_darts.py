"""One DARTS search step (an α step plus a weight step): seconds and peak memory.

Settings of the issue: the paper's search network (8 cells, 16 channels, 4 nodes), batch 32,
32x32 random inputs made before timing, 10 classes, weight init seed 2, 2 threads; first and
second order. Each configuration runs in its own subprocess so that its peak resident memory
(``ru_maxrss`` of that child, from ``os.wait4``) is its own; the median step time is over
``--steps`` steps after ``--warmup`` steps.

Baseline in the same run: ``reference`` computes the way the DARTS code does (every candidate
including the zero op, one ReLU per candidate, dilated convolutions as they are, NCHW tensors, a
copied model for the unrolled weights, full ``backward()`` calls); ``lean`` is fxsculpt's
implementation as the ``darts`` pass runs it (channels-last on CPU). Runs alternate between the two
(the machine is shared and its speed drifts) and the table reports lean / reference ratios,
next to the figures the issue quotes for a public port measured on another CPU.

The public port itself (khanrc/pt.darts, not part of this repository) joins the alternation
with ``--port DIR`` pointing at a checkout of it: its ``SearchCNNController`` and ``Architect``
are imported from there and driven at the same settings (same data, same init seed, same
optimizers as its search script), so the ratio lean / port is measured on this machine.

    python bench/bench_darts.py            # 10 steps after 2 warm-ups, both orders
    python bench/bench_darts.py --quick    # 3 steps after 1 warm-up
    python bench/bench_darts.py --impls lean,port --port ../pt.darts

``--relax`` measures the relaxation of ordinary models instead (``darts.md`` stays as it is;
it writes ``darts_relax.json`` and ``darts_relax.md``): for ``builtin:mobilenet``,
``builtin:resnet`` and the user's MobileNetV2 of ``examples/mobilenetv2_user.py``, one epoch of
the ``darts`` pass's search with its default options on the real CIFAR-10 subset, against one
epoch of the ``train`` pass's training of the same unrelaxed model on the same training split
(SGD, batch 64), each in its own process, alternating. Per epoch the search runs its α steps
on one half of the split and its weight steps on the other, so both see every image once. The
headline is the ratio of the two epochs' seconds. Memory is the peak resident set of each
process (``ru_maxrss`` from ``os.wait4``), and how much of it the epoch added (peak after the
epoch minus the peak before it, from ``resource.getrusage`` in the process).

    python bench/bench_darts.py --relax    # 1 thread, the CLI's default --threads
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: The issue's figures for a public PyTorch port at these settings (two runs each, on another CPU).
ISSUE_PORT_FIGURES = {
    1: {"seconds": (9.6, 13.2), "peak_rss_gb": (5.65, 5.75)},
    2: {"seconds": (26.6, 27.7), "peak_rss_gb": (7.26, 7.30)},
}


def random_batches(args: argparse.Namespace) -> list[tuple[Any, Any, Any, Any]]:
    """(train x, train y, val x, val y) for every step, made before timing."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(args.batch, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (args.batch,), generator=generator),
            torch.randn(args.batch, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (args.batch,), generator=generator),
        )
        for _ in range(args.warmup + args.steps)
    ]


def port_child(args: argparse.Namespace) -> None:
    """Time the public port's search step (its own classes, imported from ``--port``)."""
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(args.port).resolve()))
    from architect import Architect  # type: ignore[import-not-found]
    from models.search_cnn import SearchCNNController  # type: ignore[import-not-found]

    torch.set_num_threads(args.threads)
    data = random_batches(args)
    torch.manual_seed(2)
    criterion = nn.CrossEntropyLoss()
    net = SearchCNNController(3, args.channels, 10, args.layers, criterion, device_ids=[0])
    # the optimizers and hyper-parameters of the port's search script (its config defaults)
    w_optim = torch.optim.SGD(net.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    alpha_optim = torch.optim.Adam(net.alphas(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    architect = Architect(net, 0.9, 3e-4)
    net.train()
    times = []
    for x_t, y_t, x_v, y_v in data:
        start = time.perf_counter()
        alpha_optim.zero_grad()
        if args.order == 2:
            architect.unrolled_backward(x_t, y_t, x_v, y_v, 0.025, w_optim)
        else:
            net.loss(x_v, y_v).backward()
        alpha_optim.step()
        w_optim.zero_grad()
        criterion(net(x_t), y_t).backward()
        nn.utils.clip_grad_norm_(net.weights(), 5.0)
        w_optim.step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times[args.warmup :]}))


def child(args: argparse.Namespace) -> None:
    """Build the supernet and time search steps; print one JSON line."""
    if args.impl == "port":
        port_child(args)
        return
    sys.path.insert(0, str(ROOT))
    import torch

    from fxsculpt.nas.darts.search import SearchSettings, make_optimizers, weight_step
    from fxsculpt.nas.darts.supernet import SearchNetwork

    torch.set_num_threads(args.threads)
    lean = args.impl == "lean"
    data = random_batches(args)
    torch.manual_seed(2)
    model = SearchNetwork(10, 3, args.channels, args.layers, lean=lean)
    if lean and args.layout == "nhwc":  # what the darts pass does on CPU (darts.channels_last)
        model = model.to(memory_format=torch.channels_last)
        data = [
            tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in d)
            for d in data
        ]
    model.train()
    arch_ids = set()
    alphas = []
    for m in model.modules():
        alpha = getattr(m, "alpha", None)
        if isinstance(alpha, torch.nn.Parameter) and id(alpha) not in arch_ids:
            arch_ids.add(id(alpha))
            alphas.append(alpha)
    weights = [p for p in model.parameters() if id(p) not in arch_ids]
    settings = SearchSettings(order=args.order, lean=lean)
    optimizer, architect = make_optimizers(model, weights, alphas, settings)
    times = []
    for x_t, y_t, x_v, y_v in data:
        start = time.perf_counter()
        architect.step(x_t, y_t, x_v, y_v, xi=settings.w_lr)
        weight_step(model, optimizer, weights, alphas, x_t, y_t, settings.grad_clip, lean)
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times[args.warmup :]}))


# -- relaxation of ordinary models (--relax) -------------------------------------------------
#: The models of the relaxation benchmark: two built-ins and the user's depthwise model.
RELAX_MODELS = ("builtin:mobilenet", "builtin:resnet", "user:mobilenetv2")


def _relax_ir(model: str) -> Any:
    """The model as the CLI loads it, for 32x32 RGB inputs and 10 classes."""
    import torch

    from fxsculpt.ir.graph import IR
    from fxsculpt.ir.load import LoadOptions, load_ir

    torch.manual_seed(0)  # what cli.py does before building the model
    if model == "user:mobilenetv2":
        from examples.mobilenetv2_user import UserMobileNetV2

        return IR.from_module(UserMobileNetV2().eval(), (1, 3, 32, 32), 10)
    return load_ir(model, LoadOptions(input_shape=(1, 3, 32, 32), num_classes=10))


def relax_child(args: argparse.Namespace) -> None:
    """One epoch of the darts pass's search (``search``) or of training (``train``); one JSON line."""
    import copy
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from fxsculpt.nas.darts.relax import relax, selected_nodes
    from fxsculpt.passes.base import Context, TrainSettings
    from fxsculpt.passes.darts import Darts, DartsOptions, torch_threads
    from fxsculpt.training.data import load_data
    from fxsculpt.training.loop import train_model

    data = load_data(args.data, seed=0, val_fraction=0.1)
    ir = _relax_ir(args.model)
    convs = sum(
        1
        for n in ir.gm.graph.nodes
        if n.op == "call_module" and isinstance(ir.gm.get_submodule(str(n.target)), torch.nn.Conv2d)
    )
    macs = ir.mac_count()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, Any] = {"model": args.model, "convs": convs, "macs": macs}
    if args.relax_child == "train":
        settings = TrainSettings(epochs=1, batch_size=64, lr=0.05, progress=False)
        weights = [p for p in ir.weight_parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=5e-4)
        n = len(data.train)
        with torch_threads(args.threads):
            start = time.perf_counter()
            train_model(
                ir.gm, data.train, settings, "cpu", torch.Generator().manual_seed(0), optimizer=optimizer
            )
            seconds = time.perf_counter() - start
        steps = n // 64 if n % 64 == 1 else -(-n // 64)  # train_model drops a last batch of one
        out.update(seconds=seconds, steps=steps)
    else:
        from fxsculpt.passes.options import build_options

        values = dict(item.split("=", 1) for item in args.darts_set)
        options = build_options(DartsOptions, {"epochs": "1", "plots": "false", **values}, "darts")
        probe = copy.deepcopy(ir)
        relaxed = relax(probe, options.pattern, options.ops, kinds=options.kinds)
        out.update(
            relaxed=len(relaxed),
            matched=len(selected_nodes(ir, options.pattern)),
            candidates=sum(len(v) for v in relaxed.values()),
            supernet_macs=probe.mac_count(),
        )
        del probe
        pass_ = Darts()
        pass_.options = options
        stage = Path(tempfile.mkdtemp(prefix="bench_darts_"))
        ctx = Context(
            out_dir=stage,
            stage_dir=stage,
            data=data,
            train=TrainSettings(progress=False),
            threads=args.threads,
        )
        pass_.run(ir, ctx)
        section = ctx.sections["darts"]
        n_weights = round(options.train_portion * len(data.train))
        full = min(max(1, n // options.batch_size) for n in (n_weights, len(data.train) - n_weights))
        out.update(
            seconds=float(section["epoch_seconds"][0]),
            steps=int(section["history"][0]["steps"]),
            full_steps=full,
            options={k: str(v) for k, v in vars(options).items()},
        )
    out["rss_before_kb"] = before
    out["rss_after_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(out))


def run_relax_config(model: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of ``kind`` (search or train) on ``model`` in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [
        sys.executable,
        __file__,
        "--child",
        f"--relax-child={kind}",
        f"--model={model}",
        f"--data={args.data}",
        f"--threads={args.threads}",
        *(f"--darts-set={item}" for item in args.darts_set),
    ]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if code != 0:
        raise SystemExit(f"benchmark child {kind} {model} failed with exit code {code}")
    row = json.loads(text.strip().splitlines()[-1])
    row.update(
        kind=kind,
        peak_rss_gb=usage.ru_maxrss * 1024 / 1e9,
        epoch_rss_gb=(row["rss_after_kb"] - row["rss_before_kb"]) * 1024 / 1e9,
        s_per_step=row["seconds"] / row["steps"],
    )
    return row


def summarize_relax(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: medians over rounds of search and train seconds, the largest memory, the ratio."""
    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        search = [r for r in rows if r["model"] == model and r["kind"] == "search"]
        train = [r for r in rows if r["model"] == model and r["kind"] == "train"]
        entry: dict[str, Any] = {
            "model": model,
            "convs": search[0]["convs"],
            "relaxed": search[0]["relaxed"],
            "candidates": search[0]["candidates"],
            "macs": search[0]["macs"],
            "supernet_macs": search[0]["supernet_macs"],
        }
        for kind, runs in (("search", search), ("train", train)):
            entry[f"{kind}_steps"] = runs[0]["steps"]
            entry[f"{kind}_s_per_epoch"] = statistics.median(r["seconds"] for r in runs)
            entry[f"{kind}_s_per_step"] = statistics.median(r["s_per_step"] for r in runs)
            entry[f"{kind}_peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
            entry[f"{kind}_epoch_rss_gb"] = max(r["epoch_rss_gb"] for r in runs)
        # A search capped below a full pass (--darts-set steps_per_epoch=N): its epoch is
        # estimated as s/step times the steps of a full pass, and marked so.
        full = search[0]["full_steps"]
        entry["search_full_steps"] = full
        entry["search_epoch_estimated"] = entry["search_steps"] < full
        if entry["search_epoch_estimated"]:
            entry["search_s_per_epoch"] = entry["search_s_per_step"] * full
        entry["ratio"] = entry["search_s_per_epoch"] / entry["train_s_per_epoch"]
        summary.append(entry)
    return summary


def relax_table(summary: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    headers = [
        "model",
        "relaxed / convs",
        "supernet MACs ÷ model",
        "search s/step",
        "search steps",
        "search s/epoch",
        "search GB (epoch +GB)",
        "train s/step",
        "train steps",
        "train s/epoch",
        "train GB (epoch +GB)",
        "search ÷ train epoch",
    ]
    body = [
        [
            e["model"],
            f"{e['relaxed']} / {e['convs']} ({e['candidates']} candidates)",
            f"{e['supernet_macs'] / e['macs']:.2f}",
            f"{e['search_s_per_step']:.2f}",
            f"{e['search_steps']} of {e['search_full_steps']}"
            if e["search_epoch_estimated"]
            else e["search_steps"],
            f"{e['search_s_per_epoch']:.1f}" + (" (est.)" if e["search_epoch_estimated"] else ""),
            f"{e['search_peak_rss_gb']:.2f} (+{e['search_epoch_rss_gb']:.2f})",
            f"{e['train_s_per_step']:.3f}",
            e["train_steps"],
            f"{e['train_s_per_epoch']:.1f}",
            f"{e['train_peak_rss_gb']:.2f} (+{e['train_epoch_rss_gb']:.2f})",
            f"**{e['ratio']:.2f}×**",
        ]
        for e in summary
    ]
    return tabulate(body, headers=headers, tablefmt="github")


def run_relax(args: argparse.Namespace) -> None:
    """The --relax benchmark: alternate search and train epochs per model, write JSON + markdown."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    rows = []
    for _ in range(args.rounds):
        for model in models:
            for kind in ("train", "search"):
                row = run_relax_config(model, kind, args)
                print(
                    f"{model} {kind:6s}: {row['seconds']:.1f} s/epoch, {row['steps']} steps, "
                    f"{row['s_per_step']:.3f} s/step, peak RSS {row['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
                rows.append(row)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    summary = summarize_relax(rows)
    cpu = cpu_name()
    settings = {
        "cpu": cpu,
        "threads": args.threads,
        "data": args.data,
        "rounds": args.rounds,
        "darts_set": args.darts_set,
        "darts_options": rows[-1].get("options") if rows else None,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or "darts_relax"
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=2) + "\n"
    )
    command = " ".join(["python", "bench/bench_darts.py", *sys.argv[1:]])
    options_text = (
        "options " + ", ".join(f"darts.{item}" for item in args.darts_set)
        if args.darts_set
        else "default options: relaxed nodes, candidates, first order, batch 64, channels-last"
    )
    text = (
        "# DARTS relaxation of ordinary models: a search epoch against a training epoch\n\n"
        f"One epoch of the `darts` pass ({options_text}) against one epoch of training the unrelaxed model (SGD, batch 64, "
        f"as the `train` pass) on the same {args.data} training split (4,194 images: the search "
        f"takes α steps on one half and weight steps on the other), {args.threads} thread(s), "
        f"median of {args.rounds} alternating round(s); {cpu}. GB: peak resident set of the "
        f"process (ru_maxrss), in brackets what the epoch added to the peak before it. Load average "
        f"before {' '.join(load_before)}, after {' '.join(load_after)} (shared machine).\n\n"
        f"{relax_table(summary)}\n\n`{command}`\n"
    )
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def run_config(order: int, impl: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh process; its step times and its own peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    steps, warmup = (
        (args.steps, args.warmup) if impl == "lean" else (args.baseline_steps, args.baseline_warmup)
    )
    cmd = [
        sys.executable,
        __file__,
        "--child",
        f"--order={order}",
        f"--impl={impl}",
        f"--steps={steps}",
        f"--warmup={warmup}",
        f"--batch={args.batch}",
        f"--layers={args.layers}",
        f"--channels={args.channels}",
        f"--threads={args.threads}",
        f"--layout={args.layout}",
    ]
    if args.port:
        cmd.append(f"--port={args.port}")
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {impl} order {order} failed with exit code {proc.returncode}")
    times = json.loads(text.strip().splitlines()[-1])["times"]
    return {
        "order": order,
        "impl": impl,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # ru_maxrss is in KiB on Linux
    }


def summarize(rows: list[dict[str, Any]], impls: list[str]) -> list[dict[str, Any]]:
    """Per order: each implementation's median s/step and peak GB, and lean's ratios to the others."""
    summary = []
    for order in sorted({int(r["order"]) for r in rows}):
        entry: dict[str, Any] = {"order": order}
        for impl in impls:
            runs = [r for r in rows if r["order"] == order and r["impl"] == impl]
            entry[f"{impl}_s"] = statistics.median(float(r["median_s"]) for r in runs)
            entry[f"{impl}_peak_rss_gb"] = max(float(r["peak_rss_gb"]) for r in runs)
        for baseline in impls:
            if baseline != "lean" and "lean" in impls:
                entry[f"time_vs_{baseline}"] = entry["lean_s"] / entry[f"{baseline}_s"]
                entry[f"memory_vs_{baseline}"] = entry["lean_peak_rss_gb"] / entry[f"{baseline}_peak_rss_gb"]
        if "lean" in impls:
            quoted = ISSUE_PORT_FIGURES[order]
            entry["issue_port_s"] = quoted["seconds"]
            entry["issue_port_peak_rss_gb"] = quoted["peak_rss_gb"]
            entry["time_vs_issue_port"] = entry["lean_s"] / min(quoted["seconds"])
            entry["memory_vs_issue_port"] = entry["lean_peak_rss_gb"] / min(quoted["peak_rss_gb"])
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict[str, Any]], impls: list[str]) -> str:
    """One row per order: every implementation's time and memory, then lean's ratios."""
    from tabulate import tabulate

    headers = ["order"]
    for impl in impls:
        headers += [f"{impl} s/step", f"{impl} GB"]
    baselines = [impl for impl in impls if impl != "lean"] if "lean" in impls else []
    for baseline in baselines:
        headers += [f"lean / {baseline} s", f"lean / {baseline} GB"]
    if "lean" in impls:
        headers += ["port s, GB (issue, other CPU)", "lean / issue s", "lean / issue GB"]
    body = []
    for entry in summary:
        row: list[Any] = [entry["order"]]
        for impl in impls:
            row += [f"{entry[f'{impl}_s']:.2f}", f"{entry[f'{impl}_peak_rss_gb']:.2f}"]
        for baseline in baselines:
            row += [f"{entry[f'time_vs_{baseline}']:.2f}", f"{entry[f'memory_vs_{baseline}']:.2f}"]
        if "lean" in impls:
            s_lo, s_hi = entry["issue_port_s"]
            m_lo, m_hi = entry["issue_port_peak_rss_gb"]
            row += [
                f"{s_lo}-{s_hi} s, {m_lo}-{m_hi} GB",
                f"{entry['time_vs_issue_port']:.2f}",
                f"{entry['memory_vs_issue_port']:.2f}",
            ]
        body.append(row)
    return tabulate(body, headers=headers, tablefmt="github")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps after 1 warm-up")
    parser.add_argument("--orders", default="1,2", help="comma-separated DARTS orders to measure")
    parser.add_argument(
        "--impls",
        default="reference,lean",
        help="comma-separated implementations to alternate: reference, lean, port (needs --port)",
    )
    parser.add_argument("--port", help="a checkout of the public port khanrc/pt.darts (for --impls port)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the lean search")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps of the lean search")
    parser.add_argument(
        "--baseline-steps", type=int, default=3, help="timed steps of reference and port (slow on CPU)"
    )
    parser.add_argument("--baseline-warmup", type=int, default=1, help="warm-up steps of reference and port")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--layout",
        choices=("nhwc", "nchw"),
        default="nhwc",
        help="memory layout of the lean search (the darts pass's default is nhwc; the reference is always nchw)",
    )
    parser.add_argument(
        "--relax", action="store_true", help="the relaxation benchmark: search epoch vs training epoch"
    )
    parser.add_argument("--models", default=",".join(RELAX_MODELS), help="--relax: comma-separated models")
    parser.add_argument(
        "--data",
        default=f"npz:{ROOT.parent / 'shared' / 'data' / 'cifar10-subset.npz'}",
        help="--relax: data",
    )
    parser.add_argument(
        "--darts-set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="--relax: a darts option for the search (repeatable), e.g. steps_per_epoch=4",
    )
    parser.add_argument("--name", default=None, help="--relax: results file name (darts_relax)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--relax-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--order", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="lean", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.relax_child:
        relax_child(args)
        return
    if args.child:
        child(args)
        return
    if args.relax:
        if "--threads" not in " ".join(sys.argv):
            args.threads = 1  # the CLI's default --threads, which the darts and train passes use
        run_relax(args)
        return
    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    unknown = sorted(set(impls) - {"reference", "lean", "port"})
    if unknown:
        parser.error(f"unknown implementation(s) {', '.join(unknown)}; choose from reference, lean, port")
    if "port" in impls and not (args.port and (Path(args.port) / "models" / "search_cnn.py").is_file()):
        parser.error("--impls port needs --port DIR, a checkout of khanrc/pt.darts (models/search_cnn.py)")
    if args.quick:
        args.steps, args.warmup = 3, 1
        args.baseline_steps, args.baseline_warmup = 1, 1
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    rows = []
    for _ in range(args.rounds):
        for order in [int(o) for o in args.orders.split(",")]:
            for impl in impls:
                row = run_config(order, impl, args)
                print(
                    f"order {order} {impl:9s}: median {row['median_s']:.2f} s/step, peak RSS {row['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
                rows.append(row)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    summary = summarize(rows, impls)
    cpu = cpu_name()
    settings = {
        "cpu": cpu,
        "impls": impls,
        "layers": args.layers,
        "channels": args.channels,
        "batch": args.batch,
        "image": 32,
        "classes": 10,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "baseline_steps": args.baseline_steps,
        "baseline_warmup": args.baseline_warmup,
        "rounds": args.rounds,
        "lean_layout": args.layout,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "darts_quick" if args.quick else "darts"
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=2) + "\n"
    )
    text = (
        "# DARTS search step: fxsculpt (lean) against the DARTS computation and a public port\n\n"
        f"{args.layers} cells, {args.channels} channels, batch {args.batch}, 32x32, 10 classes, "
        f"{args.threads} threads; lean: median of {args.steps} steps after {args.warmup} warm-ups; "
        f"{', '.join(i for i in impls if i != 'lean') or 'baselines'}: {args.baseline_steps} after "
        f"{args.baseline_warmup}; peak RSS of each configuration's own process; {cpu}. "
        f"Load average before {' '.join(load_before)}, after {' '.join(load_after)} (shared machine).\n\n"
        "reference = the DARTS code's computation rebuilt in this repository (NCHW, dilated convs, "
        "every candidate); port = khanrc/pt.darts run from its own checkout; the issue's port "
        "figures were taken on another CPU and are shown for scale only.\n\n"
        f"{markdown_table(summary, impls)}\n\n`python bench/bench_darts.py {' '.join(sys.argv[1:])}`\n"
    )
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
