"""The fidelity bench's rows pooled over training seeds: ours beside ``quantize_static`` per model.

One seed of ``bench_zoo_fidelity.py`` compares two quantizations of one trained model on 846 test
images; which images flip decides most of the accuracy difference (most rows' sign-test p is
above 0.5). This reads the results the bench wrote for each seed (``zoo_fidelity.json``,
``zoo_fidelity_seed1.json``, …; each seed is a model trained again from other random weights)
and, per model, over the seeds that have it, puts the mean accuracies side by side and adds up the
images only ours gets right and only ``quantize_static`` does, with the sign test on the sums.
Nothing is measured here; rerun the bench per seed first:

    python bench/bench_zoo_fidelity.py --seed 1 --keep-models DIR
    python bench/zoo_fidelity_seeds.py --seeds 0 1

Writes ``bench/results/zoo_fidelity_seeds.json`` and ``.md`` (``zoo_fidelity_<calibration>_seeds.*``
for a calibration other than the default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_zoo_fidelity import DEFAULT_CALIBRATION, results_stem, sign_test_p  # noqa: E402

from fxsculpt.quant.calibrate import METHODS  # noqa: E402

RESULTS = HERE / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the training seeds to pool")
    parser.add_argument("--calibration", choices=METHODS, default=DEFAULT_CALIBRATION)
    return parser.parse_args(argv)


def seed_results(calibration: str, seeds: list[int]) -> dict[int, dict[str, Any]]:
    """Each seed's fidelity results (exit with a line naming the first one missing)."""
    found = {}
    for seed in seeds:
        path = RESULTS / f"{results_stem(calibration, seed)}.json"
        if not path.is_file():
            sys.exit(f"no results for seed {seed} at {path}: run bench/bench_zoo_fidelity.py --seed {seed}")
        found[seed] = json.loads(path.read_text())
    return found


def pooled_row(model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's rows (one per seed) pooled: mean accuracies and agreements, summed discordant counts."""

    def mean(section: str, key: str) -> float:
        return round(sum(r[section][key] for r in rows) / len(rows), 4)

    wins = sum(r["ours_vs_qs"]["only_ours"] for r in rows)
    losses = sum(r["ours_vs_qs"]["only_qs"] for r in rows)
    ties = [r["exact_top1_ties"]["qs"] for r in rows if "exact_top1_ties" in r]
    return {
        "model": model,
        "seeds": len(rows),
        "accuracy": {key: mean("accuracy", key) for key in ("float", "shipped", "qs")},
        "agreement_with_float": {key: mean("agreement_with_float", key) for key in ("shipped", "qs")},
        "shipped_is_float_file": [bool(r.get("shipped_is_float_file")) for r in rows],
        "only_ours": wins,
        "only_qs": losses,
        "p": round(sign_test_p(wins, losses), 3),
        "qs_exact_top1_ties": sum(ties) if len(ties) == len(rows) else None,
    }


def pooled(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """A pooled row per model, over the seeds whose results compare it (models in the order first seen)."""
    by_seed = [{r["model"]: r for r in result["rows"] if "ours_vs_qs" in r} for result in results.values()]
    models = list(dict.fromkeys(m for rows in by_seed for m in rows))
    return [pooled_row(m, [rows[m] for rows in by_seed if m in rows]) for m in models]


def markdown(rows: list[dict[str, Any]], seeds: list[int], calibration: str, images: Any) -> str:
    lines = [
        "| model | seeds | acc float / ours / qs (mean) | ours − qs (points) | agreement with float (ours / qs) "
        "| only ours / only qs right | sign-test p | qs exact top-1 ties |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc, fid = r["accuracy"], r["agreement_with_float"]
        float_file = sum(r["shipped_is_float_file"])
        note = f" (float file at {float_file} of {r['seeds']} seeds)" if float_file else ""
        ties = "–" if r["qs_exact_top1_ties"] is None else r["qs_exact_top1_ties"]
        lines.append(
            f"| {r['model']}{note} | {r['seeds']} "
            f"| {100 * acc['float']:.1f} / {100 * acc['shipped']:.1f} / {100 * acc['qs']:.1f} "
            f"| {100 * (acc['shipped'] - acc['qs']):+.2f} "
            f"| {fid['shipped']:.3f} / {fid['qs']:.3f} "
            f"| {r['only_ours']} / {r['only_qs']} | {r['p']} | {ties} |"
        )
    wins, losses = sum(r["only_ours"] for r in rows), sum(r["only_qs"] for r in rows)
    at_least = sum(r["only_ours"] >= r["only_qs"] for r in rows)
    worse = [r["model"] for r in rows if r["only_qs"] > r["only_ours"] and r["p"] < 0.05]
    lines += [
        "",
        f"Ours at or above quantize_static on {at_least} of {len(rows)} models; quantize_static ahead "
        f"at p < 0.05 on {', '.join(worse) if worse else 'none'}. All rows and seeds together: only "
        f"ours right {wins} times, only quantize_static {losses} (sign test p = {sign_test_p(wins, losses):.3f}).",
        "",
        f"Seeds {', '.join(map(str, seeds))} of `bench/bench_zoo_fidelity.py` (each a model trained "
        f"again from other random weights), activations calibrated by {calibration}, {images} test "
        "images per seed (the same images at every seed, so the counts pool models, not images). "
        "Ours is the file as shipped. qs exact top-1 ties: predictions of quantize_static's file "
        "decided by class order, its 8-bit logits being equal (–: a seed from before this count). "
        f"Command: `python bench/zoo_fidelity_seeds.py --seeds {' '.join(map(str, seeds))}"
        f"{'' if calibration == DEFAULT_CALIBRATION else f' --calibration {calibration}'}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = seed_results(args.calibration, args.seeds)
    rows = pooled(results)
    images = next(
        (r["test_images"] for res in results.values() for r in res["rows"] if "test_images" in r), "all"
    )
    stem = results_stem(args.calibration, 0) + "_seeds"
    summary = {"seeds": args.seeds, "calibration": args.calibration, "rows": rows}
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    table = markdown(rows, args.seeds, args.calibration, images)
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
