"""L1 search (DSO-NAS / SSS scales + APG) against L1-norm filter pruning at equal MACs.

For ``builtin:resnet`` and ``builtin:mobilenet`` on the real CIFAR-10 subset (all of its training
images, the whole test split), for every seed: one model is pretrained and both arms start from it.

- *L1 search*: the ``prune`` pass's search once per γ (gates on residual branches and channel
  groups, ``--search`` epochs of SGD on W and APG on λ with joint batches), then, for each MAC
  target, what the pass does when its search ends above ``macs_target``: the lowest λ (scored
  relative to their gate, see :mod:`nas.dso.ranking`) are ranked out down to the target, the
  gates are folded and the network is fine-tuned ``--retrain`` epochs. One search serves both
  targets, which is what lets three γ, two targets and two seeds fit in half an hour.
- *L1-norm filters* (Li et al., ICLR 2017): the dense model trains ``--search`` epochs (the
  search's compute: with joint batches a search epoch is one forward/backward per batch, as a
  dense epoch is), is pruned by filter L1 norms to the MAC target (the largest model not above
  it, so never fewer MACs than the search points it is compared with) and is fine-tuned
  ``--retrain`` epochs with the same settings and the same batch order.

Accuracy (whole test split), parameters, MACs and measured ort-cpu latency (batch 1, 1 thread)
are recorded per run; the summary gives mean ± standard deviation over the seeds and the
paired difference (search minus baseline of the same seed and target).

    python bench/bench_prune.py            # the full run (under 30 minutes, one thread)
    python bench/bench_prune.py --quick    # a smoke-sized run (a couple of minutes)

Writes bench/results/prune.json, prune.md and prune.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from fxsculpt.ir.constructs import Gate  # noqa: E402
from fxsculpt.ir.graph import IR  # noqa: E402
from fxsculpt.nas.dso.gating import fold_gates, gate_branches, gate_channels  # noqa: E402
from fxsculpt.nas.dso.magnitude import magnitude_prune_to_macs  # noqa: E402
from fxsculpt.nas.dso.ranking import CutScore, meet_macs_target  # noqa: E402
from fxsculpt.nas.dso.search import SearchSettings, search, split_halves  # noqa: E402
from fxsculpt.passes.base import TrainSettings  # noqa: E402
from fxsculpt.passes.prune import PruneOptions, measure_latency_ms  # noqa: E402
from fxsculpt.training.data import load_data  # noqa: E402
from fxsculpt.training.loop import evaluate, make_loader, train_model  # noqa: E402
from fxsculpt.zoo import BuiltinSpec, build_builtin  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
RESULTS = ROOT / "bench" / "results"
PRUNE = PruneOptions()  # the pass's defaults for μ, weight decay and clipping
SEARCH, BASELINE, SEARCHED = "l1-search", "l1-norm-filters", "searched, before the cut"


def measure(ir: IR, data: Any, threads: int, latency: bool) -> dict[str, Any]:
    ir.gm.eval()
    ir.propagate()
    _, acc = evaluate(ir.gm, data.test, 256, "cpu")
    return {
        "params": ir.param_count(),
        "macs": ir.mac_count(),
        "latency_ms": measure_latency_ms(ir, threads) if latency else None,
        "test_accuracy": acc,
    }


def train(ir: IR, data: Any, settings: TrainSettings, seed: int) -> None:
    train_model(ir.gm, data.train, settings, "cpu", torch.Generator().manual_seed(seed), weight_decay=1e-4)


def retrain_order(seed: int) -> torch.Generator:
    """The retrain's batch order: one per seed, shared by both arms (common random numbers make
    the paired difference less noisy)."""
    return torch.Generator().manual_seed(10_000 + seed)


def retrain(ir: IR, data: Any, args: argparse.Namespace, seed: int) -> None:
    """Fold what gates remain (λ frozen) and fine-tune ``--retrain`` epochs at ``--retrain-lr``."""
    for module in ir.gm.modules():
        if isinstance(module, Gate):
            module.lam.requires_grad_(False)
    fold_gates(ir)
    settings = TrainSettings(
        epochs=args.retrain, batch_size=args.batch_size, lr=args.retrain_lr, progress=False
    )
    train_model(ir.gm, data.train, settings, "cpu", retrain_order(seed), weight_decay=PRUNE.weight_decay)


def search_once(base: IR, data: Any, args: argparse.Namespace, seed: int, gamma: float) -> IR:
    """The ``prune`` pass's search on a copy of ``base``: gates on branches and channels, then
    ``--search`` epochs of SGD on W and APG on λ (the pass's μ, weight decay and clipping) with
    no budget, so only structure whose λ reached exactly zero is removed here."""
    searched = base.clone()
    gate_branches(searched)
    gate_channels(searched)
    settings = SearchSettings(
        epochs=args.search,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=PRUNE.mu,
        gamma=gamma,
        weight_decay=PRUNE.weight_decay,
        grad_clip=PRUNE.grad_clip,
        cut_score=args.cut_score,
    )
    order = torch.Generator().manual_seed(20_000 + seed)
    if args.scale_batches == "joint":
        weights, scales = data.train, None
    else:
        weights, scales = split_halves(data.train, order)
    search(searched, weights, scales, settings, order, make_loader)
    return searched


def cut_to(searched: IR, macs: int, cut_score: CutScore) -> tuple[IR, int]:
    """A copy of the searched graph with its lowest-scored λ ranked out to at most ``macs`` MACs
    (what the pass does when its search ends above ``macs_target``)."""
    pruned = searched.clone()
    return pruned, meet_macs_target(pruned, macs, cut_score)


def run_model_seed(name: str, seed: int, args: argparse.Namespace, data: Any) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    base = IR.from_module(build_builtin(name, BuiltinSpec()).eval(), (1, 3, 32, 32), 10, f"builtin:{name}")
    settings = TrainSettings(epochs=args.pretrain, batch_size=args.batch_size, lr=args.lr, progress=False)
    common = {"model": name, "seed": seed}
    start = time.perf_counter()
    train(base, data, settings, seed)
    rows = [
        {
            **common,
            "method": "pretrained",
            **measure(base, data, args.threads, args.latency),
            "seconds": time.perf_counter() - start,
        }
    ]
    print(f"[{name} seed {seed}] {rows[-1]}", flush=True)
    # The baseline's compute before pruning equals the search's: the dense model trains for as
    # many epochs as the search lasts.
    start = time.perf_counter()
    dense = base.clone()
    train(dense, data, replace(settings, epochs=args.search), seed + 2)
    rows.append(
        {
            **common,
            "method": "dense-trained",
            **measure(dense, data, args.threads, args.latency),
            "seconds": time.perf_counter() - start,
        }
    )
    print(f"[{name} seed {seed}] {rows[-1]}", flush=True)
    full_macs = base.mac_count()
    searched: dict[float, IR] = {}
    for gamma in args.gammas:
        start = time.perf_counter()
        searched[gamma] = search_once(base, data, args, seed, gamma)
        seconds = time.perf_counter() - start
        rows.append(
            {
                **common,
                "method": SEARCHED,
                "gamma": gamma,
                **measure(searched[gamma], data, args.threads, latency=False),
                "seconds": seconds,
            }
        )
        print(f"[{name} seed {seed}] {rows[-1]}", flush=True)
    for target in args.targets:
        budget = int(target * full_macs)
        candidates: list[tuple[str, float | None, IR, int | None]] = [
            (BASELINE, None, magnitude_prune_to_macs(dense, budget), None)
        ]
        for gamma in args.gammas:
            candidates.append((SEARCH, gamma, *cut_to(searched[gamma], budget, args.cut_score)))
        for method, gamma, pruned, ranked_out in candidates:
            start = time.perf_counter()
            _, after_cut = evaluate(pruned.gm, data.test, 256, "cpu")
            retrain(pruned, data, args, seed)
            rows.append(
                {
                    **common,
                    "method": method,
                    "gamma": gamma,
                    "macs_target": target,
                    "ranked_out": ranked_out,
                    "accuracy_after_cut": after_cut,
                    **measure(pruned, data, args.threads, args.latency),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"[{name} seed {seed}] {rows[-1]}", flush=True)
    for row in rows:
        row["macs_ratio"] = round(row["macs"] / full_macs, 4)
        row["params_ratio"] = round(row["params"] / rows[0]["params"], 4)
        if row["latency_ms"] and rows[0]["latency_ms"]:
            row["speedup"] = round(rows[0]["latency_ms"] / row["latency_ms"], 3)
    return rows


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per model, method, MAC target and γ: means over seeds, and for the search the
    paired difference to the baseline of the same seed and target."""
    keys: list[tuple[Any, ...]] = []
    for r in rows:
        key = (r["model"], r["method"], r.get("macs_target"), r.get("gamma"))
        if key not in keys:
            keys.append(key)
    summary = []
    for model, method, target, gamma in keys:
        group = [
            r
            for r in rows
            if (r["model"], r["method"], r.get("macs_target"), r.get("gamma"))
            == (model, method, target, gamma)
        ]
        acc, acc_sd = mean_sd([r["test_accuracy"] for r in group])
        line: dict[str, Any] = {
            "model": model,
            "method": method,
            "macs_target": target,
            "gamma": gamma,
            "seeds": len(group),
            "macs_ratio": statistics.fmean(r["macs_ratio"] for r in group),
            "params_ratio": statistics.fmean(r["params_ratio"] for r in group),
            "speedup": statistics.fmean(r["speedup"] for r in group)
            if all("speedup" in r for r in group)
            else None,
            "accuracy": acc,
            "accuracy_sd": acc_sd,
        }
        if all(r.get("accuracy_after_cut") is not None for r in group):
            line["after_cut"] = statistics.fmean(r["accuracy_after_cut"] for r in group)
        if method == SEARCH:
            diffs = []
            for r in group:
                twin = next(
                    b
                    for b in rows
                    if b["model"] == model
                    and b["method"] == BASELINE
                    and b["seed"] == r["seed"]
                    and b["macs_target"] == target
                )
                diffs.append(r["test_accuracy"] - twin["test_accuracy"])
            line["minus_baseline"], line["minus_baseline_sd"] = mean_sd(diffs)
            line["wins"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        summary.append(line)
    return summary


def summary_table(summary: list[dict[str, Any]]) -> str:
    def pm(mean: float | None, sd: float | None, scale: float = 100.0) -> str:
        if mean is None:
            return ""
        return f"{scale * mean:.1f} ± {scale * (sd or 0.0):.1f}"

    table = [
        [
            s["model"],
            s["method"],
            s["macs_target"] if s["macs_target"] is not None else "",
            s["gamma"] if s["gamma"] is not None else "",
            s["seeds"],
            f"{s['macs_ratio']:.3f}",
            f"{s['params_ratio']:.3f}",
            f"{s['speedup']:.2f}" if s["speedup"] else "",
            f"{100 * s['after_cut']:.1f}" if s.get("after_cut") is not None else "",
            pm(s["accuracy"], s["accuracy_sd"]),
            pm(s.get("minus_baseline"), s.get("minus_baseline_sd")),
            s.get("wins", ""),
        ]
        for s in summary
    ]
    headers = [
        "model",
        "method",
        "MAC target",
        "γ",
        "seeds",
        "MACs / unpruned",
        "params / unpruned",
        "speed-up",
        "acc. % after cut",
        "test acc. % (mean ± sd)",
        "search − baseline, pt",
        "search wins",
    ]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against MACs, parameters and latency: every run as a faint point, the seed means
    of each (γ, target) of the search and each target of the baseline as markers with sd bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    axes_keys = [
        ("macs_ratio", "MACs / unpruned"),
        ("params_ratio", "parameters / unpruned"),
        ("latency_ms", "ort-cpu latency (ms, batch 1)"),
    ]
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 4.0 * len(models)), squeeze=False)
    gammas = sorted({r["gamma"] for r in rows if r["method"] == SEARCH})
    colors = plt.get_cmap("viridis")([0.15 + 0.7 * i / max(len(gammas) - 1, 1) for i in range(len(gammas))])
    styles: dict[tuple[str, Any], tuple[str, Any, str]] = {
        (BASELINE, None): ("s", "tab:red", "L1-norm filters (Li et al.)"),
        ("pretrained", None): ("*", "black", "pretrained (start of both)"),
        ("dense-trained", None): ("^", "grey", "dense, + search epochs"),
    }
    for gamma, color in zip(gammas, colors):
        styles[(SEARCH, gamma)] = ("o", color, f"L1 search, γ={gamma:g}")
    for i, model in enumerate(models):
        for j, (key, label) in enumerate(axes_keys):
            ax = axes[i][j]
            for (method, gamma), (marker, color, name) in styles.items():
                runs = [
                    r
                    for r in rows
                    if r["model"] == model and r["method"] == method and r.get("gamma") == gamma
                ]
                pts = [(r[key], r["test_accuracy"]) for r in runs if r.get(key) is not None]
                if not pts:
                    continue
                ax.scatter(
                    [p[0] for p in pts],
                    [100 * p[1] for p in pts],
                    marker=marker,
                    color=color,
                    alpha=0.25,
                    s=18,
                )
                by_target: dict[Any, list[dict[str, Any]]] = {}
                for r in runs:
                    by_target.setdefault(r.get("macs_target"), []).append(r)
                curve = []
                for group in by_target.values():
                    xs = [r[key] for r in group if r.get(key) is not None]
                    accs = [100 * r["test_accuracy"] for r in group]
                    mean, sd = mean_sd(accs)
                    curve.append((statistics.fmean(xs), mean, sd))
                curve.sort()
                ax.errorbar(
                    [c[0] for c in curve],
                    [c[1] for c in curve],
                    yerr=[c[2] for c in curve],
                    fmt=marker + ("--" if method == BASELINE else "-"),
                    color=color,
                    label=name,
                    markersize=8 if marker == "*" else 6,
                    capsize=3,
                )
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"builtin:{model}")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.suptitle(
        "L1 search vs L1-norm filter pruning, CIFAR-10 subset (mean ± sd over seeds; faint: single runs)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 600 images, one seed, γ and target")
    parser.add_argument("--models", default="resnet,mobilenet")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; quick: 0)")
    parser.add_argument("--gammas", default=None, help="γ of the search, comma-separated")
    parser.add_argument("--targets", default=None, help="MAC fractions to keep, comma-separated")
    parser.add_argument("--limit", type=int, default=None, help="training images used (default: all)")
    parser.add_argument("--pretrain", type=int, default=None, help="epochs before the two arms split")
    parser.add_argument(
        "--search", type=int, default=None, help="search epochs = dense epochs of the baseline"
    )
    parser.add_argument("--retrain", type=int, default=None, help="epochs after pruning, both arms")
    parser.add_argument("--retrain-lr", type=float, default=0.02, help="retrain (fine-tune) learning rate")
    parser.add_argument("--scale-batches", default="joint", choices=("split", "joint"))
    parser.add_argument("--cut-score", default="relative", choices=("relative", "lambda"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip ort-cpu timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.limit = args.limit or (600 if quick else None)
    args.seeds = [int(s) for s in (args.seeds or ("0" if quick else "0,1")).split(",") if s.strip()]
    args.gammas = parse_floats(args.gammas or ("0.01" if quick else "0.003,0.006,0.012"))
    args.targets = parse_floats(args.targets or ("0.5" if quick else "0.6,0.35"))
    args.pretrain = args.pretrain if args.pretrain is not None else (1 if quick else 3)
    args.search = args.search if args.search is not None else (1 if quick else 2)
    args.retrain = args.retrain if args.retrain is not None else 1
    if not DATA.is_file():
        print(f"the real CIFAR-10 subset is needed at {DATA}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    data = load_data(f"npz:{DATA}", seed=0, limit=args.limit)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        for seed in args.seeds:
            rows.extend(run_model_seed(name, seed, args, data))
    seconds = time.perf_counter() - start
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "prune.json").write_text(
        json.dumps(
            {"config": config, "seconds": round(seconds, 1), "summary": summary, "rows": rows}, indent=2
        )
    )
    with np.load(DATA) as arrays:
        whole_test = len(data.test) == len(arrays["y_test"])
    test_images = f"all {len(data.test)}" if whole_test else f"the first {len(data.test)}"
    command = "python bench/bench_prune.py" + (" --quick" if quick else "")
    md = (
        "# prune: L1 search (DSO-NAS/SSS, APG) vs L1-norm filter pruning at equal MACs\n\n"
        f"`{command}`: CIFAR-10 subset, {len(data.train)} training images ({len(data.val)} more held out "
        f"for validation), {test_images} test images; seeds {', '.join(map(str, args.seeds))}. "
        f"Per seed one model is pretrained {args.pretrain} epochs (lr {args.lr}, batch {args.batch_size}, "
        "cosine) and both arms start from it. *l1-search*: the `prune` pass's search once per γ (gates "
        f"on branches and channels, APG on λ with {args.scale_batches} batches, {args.search} epochs; "
        "*searched* rows are these networks before any cut), then per MAC target the lowest λ ranked "
        f"out by `{args.cut_score}` scores, gates folded, {args.retrain} fine-tune epoch(s) at lr "
        f"{args.retrain_lr}. *l1-norm-filters*: the dense model trains {args.search} more epochs (the "
        "search's compute), is pruned by filter L1 norms to the largest model not above the MAC target "
        f"and is fine-tuned alike (same batch order). `accuracy_after_cut` is before the fine-tune. "
        "Latency: ONNX Runtime CPU, batch 1, "
        f"{args.threads} thread(s), median. Total {seconds:.0f} s.\n\n"
        "## Summary (mean ± sd over seeds; search − baseline is paired by seed and target)\n\n"
        f"{summary_table(summary)}\n\n"
        "## Every run\n\n"
        f"{runs_table(rows)}\n"
    )
    (args.out / "prune.md").write_text(md)
    plot(rows, args.out / "prune.png")
    print(md)
    return 0


def runs_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "model",
        "seed",
        "method",
        "macs_target",
        "gamma",
        "ranked_out",
        "params",
        "macs",
        "macs_ratio",
        "latency_ms",
        "speedup",
        "accuracy_after_cut",
        "test_accuracy",
        "seconds",
    ]
    return tabulate([[r.get(c) for c in cols] for r in rows], headers=cols, tablefmt="github", floatfmt=".4g")


if __name__ == "__main__":
    raise SystemExit(main())
