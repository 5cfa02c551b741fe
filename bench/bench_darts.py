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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--order", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="lean", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
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
