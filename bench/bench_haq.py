"""HAQ benchmark: the best mixed-precision policy depends on the hardware (Wang et al., CVPR 2019).

For ``builtin:mobilenet`` and ``builtin:resnet`` trained on the real CIFAR-10 subset, HAQ
searches a policy under a latency budget on two targets:

- ``ort-cpu`` (measured ONNX Runtime tables): budget 1.5x the uniform-int8 latency; the
  levels worth having there are int8 and float (sub-8-bit layers run the float kernel);
- ``bitserial`` (analytical bit-fusion model): budget 0.6x the uniform 8-bit latency; 2-8
  bits all pay there.

Each HAQ policy is compared with the best *uniform* bit-width that meets the same budget on
the same target (same final fine-tune): test accuracy (ONNX Runtime on the exported file),
latency of the exported model (ort-cpu: measured, interleaved rounds, medians; bitserial:
the analytical model of the final IR), size (packed bits). The two per-layer policies are
shown side by side, and the wall time per episode is split into fine-tuning, evaluation and
hardware look-ups (the look-ups should be a negligible share).

    python bench/bench_haq.py            # default: reduced episode count; 95 min on the shared 2-core machine (load ~3)
    python bench/bench_haq.py --quick    # smoke run: small data subset, a few episodes (writes haq-quick.*)

Writes ``bench/results/haq.json``, ``haq.md`` and ``haq.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fxsculpt.hardware.bitserial import BitserialTarget  # noqa: E402
from fxsculpt.hardware.counts import count_model  # noqa: E402
from fxsculpt.hardware.ort_cpu import OrtCpuTarget  # noqa: E402
from fxsculpt.ir.graph import IR  # noqa: E402
from fxsculpt.passes.base import Context, TrainSettings  # noqa: E402
from fxsculpt.passes.hardware import onnx_accuracy  # noqa: E402
from fxsculpt.quant import export as qe  # noqa: E402
from fxsculpt.quant.haq.options import HaqOptions  # noqa: E402
from fxsculpt.quant.haq.run import finalize_policy, prepare_haq, run_haq  # noqa: E402
from fxsculpt.training.data import load_data  # noqa: E402
from fxsculpt.training.loop import evaluate, train_model  # noqa: E402
from fxsculpt.zoo import BuiltinSpec, build_builtin  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
TARGETS = (("ort-cpu", 1.5), ("bitserial", 0.6))

log = logging.getLogger("bench_haq")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 800 images, 1 epoch, 3 episodes")
    parser.add_argument("--models", default="mobilenet,resnet")
    parser.add_argument("--epochs", type=int, default=4, help="float training epochs")
    parser.add_argument("--episodes", type=int, default=16, help="HAQ episodes per search (official: 600)")
    parser.add_argument("--warmup", type=int, default=8, help="random warm-up episodes (official: 20)")
    parser.add_argument(
        "--search-samples", type=int, default=600, help="training images fine-tuned on per episode"
    )
    parser.add_argument("--final-epochs", type=int, default=1, help="fine-tune epochs of the chosen policies")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds on ort-cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.episodes, args.warmup, args.search_samples, args.rounds = 1, 3, 2, 200, 5
    return args


def bits_text(bits: int | None) -> str:
    return "fp" if bits is None else str(bits)


def uniform_policy(setup: Any) -> tuple[int | None, float]:
    """The highest uniform level (float above 8 where offered) that meets the setup's budget,
    judged by the same whole-model prediction the search enforces with."""
    n = len(setup.states.layers)
    cost = setup.exact_cost or setup.cost
    for bits in reversed(setup.levels.levels):
        predicted = cost([(bits, bits)] * n)
        if predicted <= setup.budget.target:
            return bits, predicted
    bits = setup.levels.levels[0]
    return bits, cost([(bits, bits)] * n)


def export(ir: IR, path: Path) -> Path:
    example = ir.example_input(batch=1)
    return qe.export_quantized(ir.gm, example, path, dynamic_batch=True)


def ort_latencies(paths: dict[str, Path], rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved medians at batch 1, 1 thread: each round times every model once."""
    target = OrtCpuTarget(threads=1, max_seconds=0.4)
    timings = target.time_interleaved(paths, batch=1, rounds=rounds)
    samples = {key: [t.median_ms for t in per_round] for key, per_round in timings.items()}
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in samples.items()}


def run_model(name: str, args: argparse.Namespace, data: Any, work: Path) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build_builtin(name, BuiltinSpec(num_classes=10))
    ir = IR.from_module(model, (1, 3, 32, 32), 10, source=f"builtin:{name}")
    t0 = time.perf_counter()
    settings = TrainSettings(epochs=args.epochs, batch_size=64, lr=0.05, progress=False)
    train_model(
        ir.gm, data.train, settings, "cpu", torch.Generator().manual_seed(args.seed), desc=f"{name} float"
    )
    train_s = time.perf_counter() - t0
    float_test = evaluate(ir.gm, data.test, 256, "cpu")[1]
    log.info("%s: float test accuracy %.4f after %d epochs (%.0f s)", name, float_test, args.epochs, train_s)
    x_test = data.test.tensors[0].numpy()
    y_test = data.test.tensors[1].numpy()
    out: dict[str, Any] = {"float_test_accuracy": float_test, "train_seconds": train_s, "targets": {}}
    files: dict[str, Path] = {}
    finals: dict[str, IR] = {}
    for target, ratio in TARGETS:
        opts = HaqOptions(
            episodes=args.episodes,
            latency_ratio=ratio,
            haq_warmup=args.warmup,
            haq_search_samples=args.search_samples,
            haq_final_epochs=args.final_epochs,
        )
        stage = work / f"{name}-{target}"
        ctx = Context(
            out_dir=stage,
            stage_dir=stage / "stage",
            data=data,
            target=target,
            seed=args.seed,
            threads=args.threads,
            train=TrainSettings(epochs=args.final_epochs, batch_size=64, lr=0.05, progress=False),
        )
        t0 = time.perf_counter()
        haq_ir = run_haq(ir, ctx, opts)
        search_s = time.perf_counter() - t0
        section = ctx.sections["haq"]
        # the uniform baseline: same budget, same cost table, same final fine-tune
        base_ctx = Context(
            out_dir=stage,
            stage_dir=stage / "base",
            data=data,
            target=target,
            seed=args.seed,
            threads=args.threads,
            train=ctx.train,
        )
        base_opts = dataclasses.replace(opts, haq_measure=False)  # the uniform level is clear without it
        setup = prepare_haq(ir, base_ctx, base_opts)
        ubits, ucost = uniform_policy(setup)
        upolicy = [(ubits, ubits)] * len(setup.states.layers)
        uval = finalize_policy(setup.env, upolicy, base_ctx, args.final_epochs, opts.haq_final_lr)
        base_ir = setup.env.ir
        # the reference everything is relative to: uniform 8-bit (the ratio's denominator)
        ref = prepare_haq(ir, base_ctx, base_opts)
        finalize_policy(ref.env, [(8, 8)] * len(ref.states.layers), base_ctx, 0, opts.haq_final_lr)
        row: dict[str, Any] = {
            "ratio": ratio,
            "levels": section["levels"],
            "budget_predicted": section["budget"],
            "haq": {
                "policy": section["policy"],
                "predicted_cost": section["cost"],
                "val_accuracy": section["val_accuracy_final"],
                "search_seconds": search_s,
                "timing_per_episode_s": section["timing_per_episode_s"],
                "cost_lookups": section["cost_lookups"],
                "best_episode": section["best_episode"],
                "search_best_policy": section["search_best_policy"],
                "calibration": section.get("calibration"),
                "measured_checks": section.get("measured_checks", []),
            },
            # (on ort-cpu the baseline's setup is not calibrated: its table sum would not compare)
            "uniform": {
                "bits": bits_text(ubits),
                "predicted_cost": ucost if target != "ort-cpu" else None,
                "val_accuracy": uval,
            },
        }
        for key, model_ir in (("haq", haq_ir), ("uniform", base_ir), ("uniform8", ref.env.ir)):
            path = export(model_ir, work / f"{name}-{target}-{key}.onnx")
            files[f"{target}/{key}"] = path
            finals[f"{target}/{key}"] = model_ir
            entry = row.setdefault(key, {})
            entry["test_accuracy"] = onnx_accuracy(path, x_test, y_test)
            entry["size_bytes"] = count_model(model_ir).size_bytes
            entry["file_bytes"] = path.stat().st_size
            if target == "bitserial":
                entry["latency_ms"] = BitserialTarget().model_latency(model_ir, None).median_ms
        out["targets"][target] = row
        log.info(
            "%s on %s: HAQ val %.4f (uniform %s val %.4f), search %.0f s",
            name,
            target,
            section["val_accuracy_final"],
            bits_text(ubits),
            uval,
            search_s,
        )
    # ort-cpu latencies of every exported file, measured in interleaved rounds
    ort_paths = {k: v for k, v in files.items() if k.startswith("ort-cpu/")}
    ort_paths["bitserial/haq"] = files["bitserial/haq"]  # the bitserial policy, run on the CPU
    measured = ort_latencies(ort_paths, args.rounds)
    for key, value in measured.items():
        target, kind = key.split("/")
        out["targets"][target][kind]["ort_cpu_measured"] = value
    for target, ratio in TARGETS:
        row = out["targets"][target]
        if target == "ort-cpu":
            ref_ms = row["uniform8"]["ort_cpu_measured"]["median_ms"]
            for kind in ("haq", "uniform", "uniform8"):
                row[kind]["latency_ms"] = row[kind]["ort_cpu_measured"]["median_ms"]
        else:
            ref_ms = row["uniform8"]["latency_ms"]
        limit = ratio * ref_ms
        row["budget_on_exported"] = {"reference_8bit_ms": ref_ms, "limit_ms": limit}
        for kind in ("haq", "uniform"):
            row[kind]["latency_ratio_of_8bit"] = row[kind]["latency_ms"] / ref_ms
            row[kind]["meets_budget"] = row[kind]["latency_ms"] <= limit
    return out


def side_by_side(result: dict[str, Any]) -> list[dict[str, str]]:
    ort = result["targets"]["ort-cpu"]["haq"]["policy"]
    bs = result["targets"]["bitserial"]["haq"]["policy"]
    rows = []
    for a, b in zip(ort, bs, strict=True):
        rows.append(
            {
                "layer": a["layer"],
                "ort-cpu w/a": f"{bits_text(_b(a['weight_bits']))}/{bits_text(_b(a['act_bits']))}",
                "bitserial w/a": f"{bits_text(_b(b['weight_bits']))}/{bits_text(_b(b['act_bits']))}",
            }
        )
    return rows


def _b(value: Any) -> int | None:
    return None if value == "float" else int(value)


def policies_differ(result: dict[str, Any]) -> bool:
    rows = side_by_side(result)
    return any(r["ort-cpu w/a"] != r["bitserial w/a"] for r in rows)


def markdown(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    lines = [
        "# HAQ: hardware-aware mixed precision (bench/bench_haq.py)",
        "",
        f"Run: {report['settings']}",
        "",
        "Latency budget per target: ort-cpu 1.5x the uniform-int8 latency (measured ONNX Runtime, 1 thread,",
        "batch 1, CPU time of the inference thread, interleaved medians); bitserial 0.6x the uniform 8-bit",
        "latency (analytical model, not a measurement). 'budget met' is checked on the exported files after",
        "the run, against the same run's uniform-8 file timed in the same interleaved rounds. 'predicted' is",
        "the cost model the search enforced with (ort-cpu: calibrated table plus float/int8 conversions).",
        "Test accuracy is ONNX Runtime's on the exported file, on the test split the search never saw.",
        "",
        "On ort-cpu each layer is int8 or float. The search prices a policy as ONNX Runtime runs it",
        "(a layer is an integer kernel only when its output is quantized too, and every float/int8",
        "boundary costs a standalone QuantizeLinear or DequantizeLinear: hardware/qdq.py), with the",
        "table calibrated on the exported uniform-int8 and all-float files; the chosen policy's",
        "exported file is timed before and after the final fine-tune, and bits are lowered (last layer",
        "first) while it measures over the budget less a 5% margin (quant/haq/verify.py).",
        "",
    ]
    for name, result in report["models"].items():
        lines += [f"## builtin:{name} (float test accuracy {100 * result['float_test_accuracy']:.2f}%)", ""]
        rows = []
        for target, row in result["targets"].items():
            for kind in ("haq", "uniform", "uniform8"):
                e = row[kind]
                label = {
                    "haq": "HAQ",
                    "uniform": f"uniform {row['uniform']['bits']}-bit",
                    "uniform8": "uniform 8-bit (reference)",
                }[kind]
                predicted = e.get("predicted_cost")
                rows.append(
                    [
                        target,
                        label,
                        f"{100 * e['test_accuracy']:.2f}%",
                        f"{e['latency_ms']:.4f}" if "latency_ms" in e else "-",
                        f"{predicted:.4f}" if predicted is not None else "-",
                        f"{e.get('latency_ratio_of_8bit', 1.0):.2f}x",
                        "yes" if e.get("meets_budget", kind == "uniform8") else "NO",
                        f"{e['size_bytes'] / 1024:.1f}",
                    ]
                )
        lines.append(
            tabulate(
                rows,
                headers=[
                    "target",
                    "policy",
                    "test acc (ORT)",
                    "latency ms",
                    "predicted ms",
                    "vs 8-bit",
                    "budget met",
                    "size KiB",
                ],
                tablefmt="github",
            )
        )
        lines += ["", *measurement_lines(result)]
        lines += ["", "Per-layer HAQ policies (weight/activation bits; fp = float):", ""]
        lines.append(tabulate(side_by_side(result), headers="keys", tablefmt="github"))
        lines += ["", f"Policies differ between targets: {'yes' if policies_differ(result) else 'no'}", ""]
        trows = []
        for target, row in result["targets"].items():
            t = row["haq"]["timing_per_episode_s"]
            total = t["total"] or 1.0
            trows.append(
                [
                    target,
                    f"{t['total']:.2f}",
                    f"{t['finetune']:.2f} ({100 * t['finetune'] / total:.0f}%)",
                    f"{t['evaluate']:.2f} ({100 * t['evaluate'] / total:.0f}%)",
                    f"{t['hardware'] * 1000:.2f} ms ({100 * t['hardware'] / total:.2f}%)",
                    f"{t['agent']:.2f}",
                    row["haq"]["cost_lookups"],
                ]
            )
        lines.append(
            tabulate(
                trows,
                headers=[
                    "target",
                    "s/episode",
                    "fine-tune",
                    "evaluation",
                    "hardware look-ups",
                    "agent",
                    "look-ups",
                ],
                tablefmt="github",
            )
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def measurement_lines(result: dict[str, Any]) -> list[str]:
    """How the ort-cpu prediction was calibrated and what the exported candidates measured."""
    haq = result["targets"]["ort-cpu"]["haq"]
    cal = haq.get("calibration")
    lines: list[str] = []
    if cal:
        lines.append(
            "ort-cpu latency model: table sums before calibration "
            f"int8 {cal['int8_predicted']:.4f} ms / float {cal['float_predicted']:.4f} ms, "
            f"measured exports int8 {cal['int8_measured']:.4f} ms / float {cal['float_measured']:.4f} ms, "
            f"scales integer {cal['scale_integer']:.3f}, other {cal['scale_other']:.3f}."
        )
    for i, check in enumerate(haq.get("measured_checks", [])):
        lines.append(
            f"Exported candidate {i + 1}: predicted {check['predicted_ms']:.4f} ms, measured "
            f"{check['measured_ms']:.4f} ms against target {check['target_ms']:.4f} ms "
            f"(limit {check['limit_ms']:.4f} = 1.5 x int8 {check['reference_ms']:.4f} ms): "
            f"{'met' if check['met'] else 'over, bits lowered'}."
        )
    return [line + "  " for line in lines] + ([""] if lines else [])


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        result = report["models"][name]
        for offset, (target, color) in ((-0.2, ("ort-cpu", "tab:blue")), (0.2, ("bitserial", "tab:orange"))):
            policy = result["targets"][target]["haq"]["policy"]
            w = [9 if p["weight_bits"] == "float" else p["weight_bits"] for p in policy]
            a = [9 if p["act_bits"] == "float" else p["act_bits"] for p in policy]
            xs = np.arange(len(policy)) + offset
            ax.bar(xs, w, width=0.2, color=color, label=f"{target} weights")
            ax.bar(
                xs + 0.1 * np.sign(offset),
                a,
                width=0.1,
                color=color,
                alpha=0.45,
                label=f"{target} activations",
            )
        ax.set_xticks(np.arange(len(policy)))
        ax.set_xticklabels([p["layer"] for p in policy], rotation=70, fontsize=6)
        ax.set_yticks([2, 4, 6, 8, 9])
        ax.set_yticklabels(["2", "4", "6", "8", "float"])
        ax.set_title(
            f"builtin:{name}: HAQ policies under a latency budget (ort-cpu 1.5x int8, bitserial 0.6x 8-bit)"
        )
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for name in ("fxsculpt", "bench_haq"):  # the exporter's INFO chatter stays off
        logging.getLogger(name).setLevel(logging.INFO)
    if not DATA.is_file():
        sys.exit(f"error: the CIFAR-10 subset is not at {DATA} (../shared/data next to the checkout)")
    torch.set_num_threads(args.threads)
    data = load_data(f"npz:{DATA}", seed=args.seed, limit=800 if args.quick else None)
    report: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            report["models"][name] = run_model(name, args, data, Path(tmp))
    report["wall_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (args.out / f"haq{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"haq{suffix}.md").write_text(markdown(report))
    plot(report, args.out / f"haq{suffix}.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
