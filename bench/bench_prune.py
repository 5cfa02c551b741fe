"""L1 search (DSO-NAS / SSS scales + APG) against L1-norm filter pruning at equal MACs.

For ``builtin:resnet`` and ``builtin:mobilenet`` on the real CIFAR-10 subset, both methods start
from one pretrained model. The search runs the ``prune`` pass (gates on branches and channels,
APG search for ``--search`` epochs, shrink to a MAC budget, retrain ``--retrain`` epochs). The
baseline (Li et al. 2017) trains the dense model for as many epochs as the search took (equal
compute before pruning: a search epoch is one pass over each half of the data), prunes it by
filter L1 norms to the search result's MACs and retrains it as long (equal recovery). Accuracy
(test split), parameters, MACs and measured ort-cpu latency (batch 1, 1 thread) are compared
in the same run.

    python bench/bench_prune.py            # default run (about 12 minutes on 2 idle cores)
    python bench/bench_prune.py --quick    # a smoke-sized run

Writes bench/results/prune.json, prune.md and prune.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from ir.graph import IR  # noqa: E402
from nas.dso.gating import fold_gates  # noqa: E402
from nas.dso.magnitude import magnitude_prune_to_macs  # noqa: E402
from passes import Context, Pipeline  # noqa: E402
from passes.base import TrainSettings  # noqa: E402
from passes.prune import measure_latency_ms  # noqa: E402
from training.data import load_data  # noqa: E402
from training.loop import evaluate, train_model  # noqa: E402
from zoo import BuiltinSpec, build_builtin  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
RESULTS = ROOT / "bench" / "results"


def measure(ir: IR, data: Any, threads: int) -> dict[str, Any]:
    ir.gm.eval()
    ir.propagate()
    _, acc = evaluate(ir.gm, data.test, 256, "cpu")
    return {
        "params": ir.param_count(),
        "macs": ir.mac_count(),
        "latency_ms": measure_latency_ms(ir, threads),
        "test_accuracy": acc,
    }


def run_model(name: str, args: argparse.Namespace, data: Any) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    ir = IR.from_module(build_builtin(name, BuiltinSpec()).eval(), (1, 3, 32, 32), 10, f"builtin:{name}")
    settings = TrainSettings(epochs=args.pretrain, batch_size=args.batch_size, lr=args.lr, progress=False)
    start = time.perf_counter()
    train_model(
        ir.gm, data.train, settings, "cpu", torch.Generator().manual_seed(args.seed), weight_decay=1e-4
    )
    base = measure(ir, data, args.threads)
    print(
        f"[{name}] pretrained {args.pretrain} epochs in {time.perf_counter() - start:.0f}s: {base}",
        flush=True,
    )
    rows = [
        {"model": name, "method": "unpruned", "gamma": None, **base, "seconds": time.perf_counter() - start}
    ]
    # The baseline's compute before pruning equals the search's: the dense model trains for as
    # many epochs as the search lasts, then is pruned by filter norms; both then retrain alike.
    dense = ir.clone()
    start = time.perf_counter()
    search_epochs = replace(settings, epochs=args.search)
    train_model(
        dense.gm,
        data.train,
        search_epochs,
        "cpu",
        torch.Generator().manual_seed(args.seed + 2),
        weight_decay=1e-4,
    )
    dense_row = measure(dense, data, args.threads)
    rows.append(
        {
            "model": name,
            "method": "dense-trained",
            "gamma": None,
            **dense_row,
            "seconds": time.perf_counter() - start,
        }
    )
    points = [(args.gamma, t) for t in args.targets] + [(g, 0.0) for g in args.gammas]
    for gamma, target in points:
        start = time.perf_counter()
        searched = ir.clone()
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp) / "stage"
            stage.mkdir()
            ctx = Context(out_dir=Path(tmp), stage_dir=stage, data=data, seed=args.seed, train=settings)
            options = {
                "gamma": gamma,
                "macs_target": target,
                "pretrain_epochs": 0,
                "search_epochs": args.search,
                "retrain_epochs": args.retrain,
                "measure": False,
                "target": "both",
                "batch_size": args.batch_size,
            }
            searched = Pipeline(["prune"], options={"prune": options}, export=False).run(searched, ctx).ir
            ranked_out = ctx.sections["prune"]["scales_ranked_out_for_macs_target"]
        row = measure(searched, data, args.threads)
        rows.append(
            {
                "model": name,
                "method": "l1-search",
                "gamma": gamma,
                "macs_target": target or None,
                "ranked_out": ranked_out,
                **row,
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"[{name}] γ={gamma}: {rows[-1]}", flush=True)
        start = time.perf_counter()
        baseline = magnitude_prune_to_macs(dense, row["macs"])
        fold_gates(baseline)
        tune = replace(settings, epochs=args.retrain)
        train_model(
            baseline.gm,
            data.train,
            tune,
            "cpu",
            torch.Generator().manual_seed(args.seed + 1),
            weight_decay=1e-4,
        )
        brow = measure(baseline, data, args.threads)
        rows.append(
            {
                "model": name,
                "method": "l1-norm-filters",
                "gamma": gamma,
                "macs_target": target or None,
                **brow,
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"[{name}] magnitude at {row['macs']} MACs: {rows[-1]}", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    axes_keys = [("macs", "MACs"), ("params", "parameters"), ("latency_ms", "ort-cpu latency (ms, batch 1)")]
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3.6 * len(models)), squeeze=False)
    styles = {
        "l1-search": ("o-", "L1 search (APG)"),
        "l1-norm-filters": ("s--", "L1-norm filters"),
        "unpruned": ("*", "pretrained (start of both)"),
        "dense-trained": ("^", "pretrained + search epochs, dense"),
    }
    for i, model in enumerate(models):
        for j, (key, label) in enumerate(axes_keys):
            ax = axes[i][j]
            for method, (style, name) in styles.items():
                pts = sorted(
                    (r[key], r["test_accuracy"])
                    for r in rows
                    if r["model"] == model and r["method"] == method and r[key] is not None
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=8)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"builtin:{model}")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: 600 images, one epoch per stage")
    parser.add_argument("--models", default="resnet,mobilenet")
    parser.add_argument("--gamma", type=float, default=0.02, help="γ of the budgeted search points")
    parser.add_argument(
        "--targets", default=None, help="MAC fractions to keep, comma-separated (budgeted search)"
    )
    parser.add_argument(
        "--gammas", default=None, help="extra pure-L1 points (no MAC target), comma-separated γ"
    )
    parser.add_argument("--limit", type=int, default=None, help="training images used")
    parser.add_argument("--pretrain", type=int, default=None)
    parser.add_argument("--search", type=int, default=None)
    parser.add_argument("--retrain", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.limit = args.limit or (600 if quick else 1500)
    args.pretrain = args.pretrain if args.pretrain is not None else (1 if quick else 3)
    args.search = args.search if args.search is not None else (1 if quick else 2)
    args.retrain = args.retrain if args.retrain is not None else (1 if quick else 2)
    targets = args.targets or ("0.5" if quick else "0.6,0.35")
    args.targets = [float(t) for t in targets.split(",") if t]
    args.gammas = [float(g) for g in (args.gammas or "").split(",") if g]
    if not DATA.is_file():
        print(f"the real CIFAR-10 subset is needed at {DATA}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    data = load_data(f"npz:{DATA}", seed=args.seed, limit=args.limit)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows.extend(run_model(name, args, data))
    seconds = time.perf_counter() - start
    for row in rows:  # the comparison at equal MACs: search minus baseline, and ratios to unpruned
        base = next(r for r in rows if r["model"] == row["model"] and r["method"] == "unpruned")
        row["macs_ratio"] = round(row["macs"] / base["macs"], 4)
        row["params_ratio"] = round(row["params"] / base["params"], 4)
        if row["latency_ms"] and base["latency_ms"]:
            row["speedup"] = round(base["latency_ms"] / row["latency_ms"], 3)
        if row["method"] == "l1-search":
            twin = next(
                r
                for r in rows
                if r["model"] == row["model"]
                and r["method"] == "l1-norm-filters"
                and r["gamma"] == row["gamma"]
                and r["macs_target"] == row["macs_target"]
            )
            row["acc_minus_magnitude"] = round(row["test_accuracy"] - twin["test_accuracy"], 4)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "prune.json").write_text(
        json.dumps({"config": config, "seconds": round(seconds, 1), "rows": rows}, indent=2)
    )
    cols = [
        "model",
        "method",
        "gamma",
        "macs_target",
        "ranked_out",
        "params",
        "params_ratio",
        "macs",
        "macs_ratio",
        "latency_ms",
        "speedup",
        "test_accuracy",
        "acc_minus_magnitude",
        "seconds",
    ]
    table = tabulate(
        [[r.get(c) for c in cols] for r in rows], headers=cols, tablefmt="github", floatfmt=".4g"
    )
    md = (
        "# prune: L1 search (DSO-NAS/SSS, APG) vs L1-norm filter pruning at equal MACs\n\n"
        f"`python bench/bench_prune.py{' --quick' if quick else ''}`: CIFAR-10 subset, {args.limit} training "
        f"images (10% held out for validation), {len(data.test)} test images; pretrain {args.pretrain} epochs, "
        f"search {args.search} epochs, then prune and retrain {args.retrain} epochs; the baseline trains "
        f"the dense model {args.search} epochs (equal compute: a search epoch is one pass over each half), "
        f"prunes it by filter norms to the search's MACs and retrains {args.retrain} epochs; latency: ONNX Runtime CPU, batch 1, {args.threads} thread(s), "
        f"median. Total {seconds:.0f} s.\n\n{table}\n"
    )
    (args.out / "prune.md").write_text(md)
    plot(rows, args.out / "prune.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
