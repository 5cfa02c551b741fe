"""Sample-based search methods compared at equal cost on the real CIFAR-10 subset.

``python bench/bench_search.py`` (about 20 minutes on 2 cores; ``--quick`` for a smoke run).

For each method (NAO, RL, regularized evolution, random search) and each seed, the same
weight-sharing evaluator (same supernet size, initialization, data order, warm-up and
supernet steps per evaluation for a given seed) and the same evaluation budget. Reported:

- best validation accuracy (weight-sharing score) against the number of evaluations, mean and
  min-max band over the seeds (one plot);
- the test accuracy of each method's final pick after the same short retraining from scratch
  of its darts-eval network, and its ratio to random search's (the baseline, same run);
- Kendall τ between the weight-sharing score and short-training validation accuracy on a
  sample of random architectures: how far the cheap evaluator can be trusted.

Writes ``bench/results/search.json``, ``search.md`` and ``search.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fxsculpt.nas.sample.encoding import Arch, SearchSpace, genotype_to_json  # noqa: E402
from fxsculpt.nas.sample.evaluator import (  # noqa: E402
    CandidateEvaluator,
    ShortTrainingBackend,
    WeightSharingBackend,
)
from fxsculpt.nas.sample.evolution import regularized_evolution  # noqa: E402
from fxsculpt.nas.sample.nao import NAOSettings, nao_search  # noqa: E402
from fxsculpt.nas.sample.random_search import random_search  # noqa: E402
from fxsculpt.nas.sample.rl import reinforce_search  # noqa: E402
from fxsculpt.passes.sample_search import SpaceShape, derived_network  # noqa: E402

METHODS = ("nao", "rl", "evolution", "random")

CAVEAT = (
    "How to read this: the weight-sharing score is a few validation batches through a small supernet "
    "trained for a few dozen steps, and the picks are retrained only briefly, so differences smaller "
    "than the spread over seeds are noise; a Kendall τ near 0 (or a large p-value) says the cheap score "
    "does not rank architectures the way short training does at this scale."
)


def run_method(
    method: str, shape: SpaceShape, data: Any, cfg: dict[str, Any], seed: int
) -> CandidateEvaluator:
    backend = WeightSharingBackend(
        shape.space,
        data.train,
        data.val,
        budget=cfg["budget"],
        channels=cfg["ws_channels"],
        layers=cfg["ws_layers"],
        num_classes=shape.num_classes,
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        warmup_steps=cfg["warmup_steps"],
        steps_per_eval=cfg["steps_per_eval"],
        val_batches=cfg["val_batches"],
        seed=seed,
    )
    evaluator = CandidateEvaluator(shape.space, backend, cfg["budget"])
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    if method == "nao":
        nao_search(shape.space, evaluator, generator, NAOSettings(epochs=cfg["nao_epochs"]))
    elif method == "rl":
        reinforce_search(shape.space, evaluator, generator)
    elif method == "evolution":
        regularized_evolution(shape.space, evaluator, rng, cfg["population"], cfg["tournament"])
    else:
        random_search(shape.space, evaluator, rng)
    return evaluator


def retrain_test(shape: SpaceShape, arch: Arch, data: Any, cfg: dict[str, Any], seed: int) -> float:
    """The same short retraining from scratch for every final pick, then test accuracy."""
    from fxsculpt.passes.base import TrainSettings
    from fxsculpt.training.loop import evaluate, train_model

    torch.manual_seed(seed)
    model = derived_network(shape, arch)
    limit = min(len(data.train), cfg["retrain_images"])
    subset = torch.utils.data.Subset(data.train, range(limit))
    settings = TrainSettings(
        epochs=cfg["retrain_epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], progress=False
    )
    train_model(model, subset, settings, "cpu", torch.Generator().manual_seed(seed))
    return float(evaluate(model, data.test, 256, "cpu")[1])


def kendall(shape: SpaceShape, data: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """τ between weight-sharing scores and short-training accuracies of random architectures."""
    from scipy.stats import kendalltau

    rng = random.Random(1234)
    archs = [shape.space.random_arch(rng) for _ in range(cfg["tau_sample"])]
    ws = WeightSharingBackend(
        shape.space,
        data.train,
        data.val,
        budget=len(archs),
        channels=cfg["ws_channels"],
        layers=cfg["ws_layers"],
        num_classes=shape.num_classes,
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        warmup_steps=cfg["warmup_steps"],
        steps_per_eval=cfg["steps_per_eval"],
        val_batches=cfg["val_batches"],
        seed=0,
    )
    ws.prepare(archs, archs)
    ws_scores = [ws.score(a) for a in archs]
    short = ShortTrainingBackend(
        shape.space,
        lambda a: derived_network(shape, a),
        data.train,
        data.val,
        epochs=cfg["short_epochs"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        train_limit=cfg["short_images"],
        seed=0,
    )
    short_scores = [short.score(a) for a in archs]
    tau, p_value = kendalltau(ws_scores, short_scores)
    return {
        "sample": len(archs),
        "tau": None if np.isnan(tau) else round(float(tau), 3),
        "p_value": None if np.isnan(p_value) else round(float(p_value), 3),
        "weight_sharing": ws_scores,
        "short_training": short_scores,
    }


def plot(curves: dict[str, list[list[float]]], path: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(1, budget + 1)
    for method, runs in curves.items():
        arr = np.array(runs)
        mean = arr.mean(0)
        ax.plot(x, mean, label=f"{method} (mean of {len(runs)} seeds)")
        ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.15)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best validation accuracy so far (weight sharing)")
    ax.set_title("sample-based search on the DARTS cell space, CIFAR-10 subset")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budget, two seeds")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset.npz"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fxsculpt.training.data import load_data

    data = load_data(f"npz:{args.data}", seed=0, val_fraction=0.1)
    cfg: dict[str, Any] = {
        "seeds": [0, 1, 2],
        "budget": 16,
        "ws_channels": 4,
        "ws_layers": 3,
        "batch_size": 32,
        "lr": 0.05,
        "warmup_steps": 30,
        "steps_per_eval": 2,
        "val_batches": 3,
        "nao_epochs": 50,
        "population": 5,
        "tournament": 2,
        "eval_channels": 8,
        "eval_layers": 5,
        "retrain_epochs": 1,
        "retrain_images": 1000,
        "tau_sample": 6,
        "short_epochs": 1,
        "short_images": 600,
    }
    if args.quick:
        cfg |= {
            "seeds": [0, 1],
            "budget": 6,
            "warmup_steps": 4,
            "steps_per_eval": 1,
            "val_batches": 1,
            "nao_epochs": 5,
            "population": 3,
            "retrain_epochs": 1,
            "retrain_images": 200,
            "tau_sample": 4,
            "short_images": 200,
        }
    space = SearchSpace()
    search_shape = SpaceShape(space, cfg["eval_channels"], cfg["eval_layers"], 3, data.num_classes)
    curves: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    picks: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    start_all = time.perf_counter()
    for seed in cfg["seeds"]:
        for method in METHODS:
            start = time.perf_counter()
            evaluator = run_method(method, search_shape, data, cfg, seed)
            search_s = time.perf_counter() - start
            best = evaluator.best()
            test_acc = retrain_test(search_shape, best.arch, data, cfg, seed)
            curves[method].append([r.best for r in evaluator.history])
            picks[method].append(
                {
                    "seed": seed,
                    "best_val": best.score,
                    "found_at": best.index,
                    "test_acc_after_retrain": test_acc,
                    "search_seconds": round(search_s, 1),
                    "genotype": genotype_to_json(space.to_genotype(best.arch)),
                }
            )
            print(
                f"seed {seed} {method:9s} best val {best.score:.3f} (eval {best.index}) "
                f"test {test_acc:.3f} search {search_s:.0f}s",
                flush=True,
            )
    tau = kendall(search_shape, data, cfg)
    print(f"Kendall tau (weight sharing vs short training, {tau['sample']} archs): {tau['tau']}", flush=True)

    rows = []
    base_test = float(np.mean([p["test_acc_after_retrain"] for p in picks["random"]]))
    base_val = float(np.mean([c[-1] for c in curves["random"]]))
    for method in METHODS:
        finals = [c[-1] for c in curves[method]]
        tests = [p["test_acc_after_retrain"] for p in picks[method]]
        rows.append(
            {
                "method": method,
                "best_val_mean": float(np.mean(finals)),
                "best_val_std": float(np.std(finals)),
                "best_val_vs_random": float(np.mean(finals)) / base_val if base_val else None,
                "test_mean": float(np.mean(tests)),
                "test_std": float(np.std(tests)),
                "test_vs_random": float(np.mean(tests)) / base_test if base_test else None,
                "search_seconds_mean": float(np.mean([p["search_seconds"] for p in picks[method]])),
            }
        )
    ranking = sorted(rows, key=lambda r: -r["test_mean"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "config": cfg,
        "quick": args.quick,
        "threads": args.threads,
        "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "summary": rows,
        "ranking_by_test": [r["method"] for r in ranking],
        "kendall_tau": tau,
        "curves": curves,
        "picks": picks,
        "seconds": round(time.perf_counter() - start_all, 1),
    }
    (out / "search.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(curves, out / "search.png", cfg["budget"])
    from tabulate import tabulate

    table = tabulate(
        [
            [
                r["method"],
                f"{r['best_val_mean']:.3f} ± {r['best_val_std']:.3f}",
                f"{r['best_val_vs_random']:.3f}",
                f"{r['test_mean']:.3f} ± {r['test_std']:.3f}",
                f"{r['test_vs_random']:.3f}",
                f"{r['search_seconds_mean']:.0f}",
            ]
            for r in rows
        ],
        headers=[
            "method",
            "best val (WS score)",
            "÷ random",
            "test acc of pick after retrain",
            "÷ random",
            "search s",
        ],
        tablefmt="github",
    )
    md = [
        "# Sample-based search at equal cost (CIFAR-10 subset)",
        "",
        f"`python bench/bench_search.py{' --quick' if args.quick else ''}`: budget {cfg['budget']} evaluations, "
        f"seeds {cfg['seeds']}, weight-sharing supernet C={cfg['ws_channels']} x {cfg['ws_layers']} cells, "
        f"picks retrained {cfg['retrain_epochs']} epochs on {cfg['retrain_images']} images "
        f"(darts-eval C={cfg['eval_channels']} x {cfg['eval_layers']} cells), {args.threads} thread(s). "
        "Mean ± std over seeds; ratios against random search from the same run.",
        "",
        table,
        "",
        f"Ranking by test accuracy of the retrained pick: {' > '.join(r['method'] for r in ranking)}.",
        "",
        f"Kendall τ between the weight-sharing score and short-training accuracy "
        f"({cfg['short_epochs']} epoch on {cfg['short_images']} images) on {tau['sample']} random "
        f"architectures: {tau['tau']} (p = {tau['p_value']}).",
        "",
        CAVEAT,
        "",
        "![best validation accuracy against evaluations](search.png)",
        "",
    ]
    (out / "search.md").write_text("\n".join(md))
    print(table)
    print(f"wrote {out / 'search.json'}, {out / 'search.md'}, {out / 'search.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
