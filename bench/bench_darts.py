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
next to the figures the issue quotes for a public port measured on this machine.

    python bench/bench_darts.py            # 10 steps after 2 warm-ups, both orders
    python bench/bench_darts.py --quick    # 3 steps after 1 warm-up
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: The issue's figures for a public PyTorch port at these settings on this machine (two runs each).
PUBLIC_PORT = {
    1: {"seconds": (9.6, 13.2), "peak_rss_gb": (5.65, 5.75)},
    2: {"seconds": (26.6, 27.7), "peak_rss_gb": (7.26, 7.30)},
}


def child(args: argparse.Namespace) -> None:
    """Build the supernet and time search steps; print one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from nas.darts.search import SearchSettings, make_optimizers, weight_step
    from nas.darts.supernet import SearchNetwork

    torch.set_num_threads(args.threads)
    lean = args.impl == "lean"
    generator = torch.Generator().manual_seed(0)
    steps = args.warmup + args.steps
    data = [
        (
            torch.randn(args.batch, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (args.batch,), generator=generator),
            torch.randn(args.batch, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (args.batch,), generator=generator),
        )
        for _ in range(steps)
    ]
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


def run_config(order: int, impl: str, args: argparse.Namespace) -> dict[str, object]:
    """Run one configuration in a fresh process; its step times and its own peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [
        sys.executable,
        __file__,
        "--child",
        f"--order={order}",
        f"--impl={impl}",
        f"--steps={args.steps if impl == 'lean' else args.reference_steps}",
        f"--warmup={args.warmup if impl == 'lean' else args.reference_warmup}",
        f"--batch={args.batch}",
        f"--layers={args.layers}",
        f"--channels={args.channels}",
        f"--threads={args.threads}",
    ]
    cmd.append(f"--layout={args.layout}")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps after 1 warm-up")
    parser.add_argument("--orders", default="1,2", help="comma-separated DARTS orders to measure")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the lean search")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps of the lean search")
    parser.add_argument(
        "--reference-steps", type=int, default=3, help="timed steps of the reference (slow on CPU)"
    )
    parser.add_argument("--reference-warmup", type=int, default=1, help="warm-up steps of the reference")
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
    if args.quick:
        args.steps, args.warmup = 3, 1
        args.reference_steps, args.reference_warmup = 1, 1
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    rows = []
    for _ in range(args.rounds):
        for order in [int(o) for o in args.orders.split(",")]:
            for impl in ("reference", "lean"):
                row = run_config(order, impl, args)
                print(
                    f"order {order} {impl:9s}: median {row['median_s']:.2f} s/step, peak RSS {row['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
                rows.append(row)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    summary = []
    for order in sorted({int(r["order"]) for r in rows}):  # type: ignore[call-overload]
        ref = [r for r in rows if r["order"] == order and r["impl"] == "reference"]
        lean = [r for r in rows if r["order"] == order and r["impl"] == "lean"]
        ref_s = statistics.median(float(r["median_s"]) for r in ref)  # type: ignore[arg-type]
        lean_s = statistics.median(float(r["median_s"]) for r in lean)  # type: ignore[arg-type]
        ref_m = max(float(r["peak_rss_gb"]) for r in ref)  # type: ignore[arg-type]
        lean_m = max(float(r["peak_rss_gb"]) for r in lean)  # type: ignore[arg-type]
        port = PUBLIC_PORT[order]
        summary.append(
            {
                "order": order,
                "reference_s": ref_s,
                "lean_s": lean_s,
                "time_ratio": lean_s / ref_s,
                "reference_peak_rss_gb": ref_m,
                "lean_peak_rss_gb": lean_m,
                "memory_ratio": lean_m / ref_m,
                "public_port_s": port["seconds"],
                "public_port_peak_rss_gb": port["peak_rss_gb"],
                "time_vs_public_port": lean_s / min(port["seconds"]),
                "memory_vs_public_port": lean_m / min(port["peak_rss_gb"]),
            }
        )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    settings = {
        "cpu": cpu,
        "layers": args.layers,
        "channels": args.channels,
        "batch": args.batch,
        "image": 32,
        "classes": 10,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "reference_steps": args.reference_steps,
        "reference_warmup": args.reference_warmup,
        "rounds": args.rounds,
        "lean_layout": args.layout,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "darts_quick" if args.quick else "darts"
    if args.orders != "1,2":
        name += "_order" + args.orders.replace(",", "")
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=2) + "\n"
    )
    from tabulate import tabulate

    table = tabulate(
        [
            [
                s["order"],
                f"{s['reference_s']:.2f}",
                f"{s['lean_s']:.2f}",
                f"{s['time_ratio']:.2f}",
                f"{s['reference_peak_rss_gb']:.2f}",
                f"{s['lean_peak_rss_gb']:.2f}",
                f"{s['memory_ratio']:.2f}",
                f"{s['public_port_s'][0]}-{s['public_port_s'][1]}",
                f"{s['time_vs_public_port']:.2f}",
                f"{s['public_port_peak_rss_gb'][0]}-{s['public_port_peak_rss_gb'][1]}",
                f"{s['memory_vs_public_port']:.2f}",
            ]
            for s in summary
        ],
        headers=[
            "order",
            "reference s/step",
            "lean s/step",
            "time ratio",
            "reference GB",
            "lean GB",
            "memory ratio",
            "public port s (issue)",
            "lean / port s",
            "public port GB (issue)",
            "lean / port GB",
        ],
        tablefmt="github",
    )
    text = (
        "# DARTS search step: lean vs reference computation\n\n"
        f"{args.layers} cells, {args.channels} channels, batch {args.batch}, 32x32, 10 classes, "
        f"{args.threads} threads; median of {args.steps} steps after {args.warmup} warm-ups (reference: "
        f"{args.reference_steps} after {args.reference_warmup}); "
        f"peak RSS of each configuration's own process; {cpu}. Load average before {' '.join(load_before)}, "
        f"after {' '.join(load_after)} (shared machine).\n\n"
        f"{table}\n\n`python bench/bench_darts.py {' '.join(sys.argv[1:])}`\n"
    )
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
