"""``quantize.method=haq``: search a mixed-precision policy with HAQ, then fine-tune and freeze it.

The steps (Wang et al., CVPR 2019, §3): put 8-bit quantizers on every Conv/Linear and their
inputs (:mod:`quant.insert`), build the per-layer state and the cost table of the chosen
resource on ``ctx.target`` (latency from the target's latency table, size, or BitOps), turn
``--budget`` or a ``*_ratio`` option into a limit, run the DDPG search (each episode: act,
enforce, quantize, fine-tune on a training subset, reward on the validation split), then
set the best policy, fine-tune it on the whole training split and freeze the weights for
export. The ``haq`` section of ``report.json`` holds the policy, its cost against the
budget, the timing split and the paths of the learning curve (JSON and PNG).

On a measured target (ort-cpu) the latency prediction is calibrated on the exported uniform
int8 and float models first (:mod:`quant.haq.calibration`), each layer is int8 or float
(:func:`quant.haq.hardware_cost.int8_or_float`), and the chosen policy's exported file is
timed before and after the final fine-tune; while it measures over the budget the
enforcement walk goes on (:mod:`quant.haq.verify`), so the file handed over meets it.

Never losing work: with checkpoints on (the pipeline's output folder), the search saves its
whole state after every episode in ``checkpoints/quantize/haq-search`` (:mod:`quant.haq.
checkpoint`), the measured check before the fine-tune its outcome in ``haq-verify``, and the
final fine-tune every epoch in ``haq-finetune`` (:func:`training.loop.train_model`);
``--resume OUT`` continues each where it stopped and ends as the uninterrupted run on CPU.

Parallel episodes (``--workers N``, through Ray, :func:`training.parallel.map_in_order`): DDPG
is sequential, since every action after the warm-up comes from an actor that learnt from the
previous episode's reward, and one episode's fine-tune is a single SGD run that cannot be split
without changing its arithmetic. What is independent are the warm-up episodes (paper §3.4: 20
of them by default, with uniform random actions that do not depend on any reward, and no agent
update before the last one): they are acted and enforced in episode order in this process, then
evaluated N at a time on the workers, then learnt from in order, so the agent sees exactly what
it sees one by one. The episodes after the warm-up are evaluated in this process, one at a time.
Every evaluation is a function of its policy and episode index only (float weights restored, the
fine-tune's order and the global RNGs seeded from the seed and the episode, ``--threads``
intra-op threads), so ``--workers N`` gives the sequential run's result, and the speed-up is
bounded by the warm-up's share of the episodes (raise ``haq_warmup`` to widen it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from fxsculpt.ir.errors import BadInputError, BudgetError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.quant.haq.actions import BitLevels, Bits
from fxsculpt.quant.haq.calibration import Calibration, calibrate_latency
from fxsculpt.quant.haq.checkpoint import HaqCheckpoint
from fxsculpt.quant.haq.cost import BudgetSpec, CostModel, resolve_budget, size_cost
from fxsculpt.quant.haq.ddpg import DDPGConfig
from fxsculpt.quant.haq.enforce import Policy
from fxsculpt.quant.haq.env import EnvSettings, EpisodeEvaluator, QuantizeEnv
from fxsculpt.quant.haq.hardware_cost import (
    ExactLatency,
    LatencySource,
    bitops_model,
    int8_or_float,
    latency_model,
    layer_input_shape,
    ort_cpu_canonical,
    undominated_levels,
)
from fxsculpt.quant.haq.meter import PolicyMeter
from fxsculpt.quant.haq.options import HaqOptions
from fxsculpt.quant.haq.ratio_budget import publish_ratio_limit
from fxsculpt.quant.haq.search import (
    EpisodeRecord,
    Evaluation,
    SearchResult,
    haq_search,
    plot_curve,
    write_curve_json,
)
from fxsculpt.quant.haq.state import LayerInfo, StateSpace, describe_layer
from fxsculpt.quant.haq.verify import Check, verify_on_export
from fxsculpt.quant.insert import freeze, insert_quantizers, layer_nodes
from fxsculpt.quant.modules import WeightQuantizer
from fxsculpt.training.checkpoint import Checkpointer, pass_checkpointer
from fxsculpt.training.loop import evaluate, train_model

log = logging.getLogger(__name__)

#: Targets whose fastest kernel is int8: lower bits buy nothing there, float is offered instead.
INT8_FASTEST_TARGETS = ("ort-cpu",)
CURVE_JSON = "haq_curve.json"
CURVE_PNG = "haq_curve.png"


def choose_metric(opts: HaqOptions, budget: Any) -> tuple[str, float | None, float | None]:
    """(metric, absolute limit, ratio) from the ratio options and ``--budget``.

    At most one ratio option may be set; its metric is the one searched. Where ``--budget`` also
    limits that metric, both are returned and the tighter applies (:func:`quant.haq.cost.resolve_budget`).
    """
    ratios = {
        "latency": opts.latency_ratio,
        "size": opts.size_ratio,
        "bitops": opts.bitops_ratio,
    }
    given = {k: v for k, v in ratios.items() if v is not None}
    if len(given) > 1:
        raise BadInputError(
            f"HAQ constrains one resource: set only one of {', '.join(f'quantize.{k}_ratio' for k in given)}"
        )
    limits = budget.limits() if budget is not None and hasattr(budget, "limits") else {}
    if given:
        metric, ratio = next(iter(given.items()))
        absolute = limits.get(metric)
        return metric, None if absolute is None else float(absolute), ratio
    for metric in ("latency", "size", "bitops"):
        if metric in limits:
            return metric, float(limits[metric]), None
    raise BadInputError(
        "quantize.method=haq needs a resource budget: --budget latency=...|size=...|bitops=..., "
        "or quantize.latency_ratio / size_ratio / bitops_ratio"
    )


def layer_infos(ir: IR) -> list[LayerInfo]:
    """State descriptions of the searched layers of a quantizer-equipped IR."""
    infos = []
    for node in layer_nodes(ir):
        module = ir.gm.get_submodule(str(node.target))
        inner = module.layer if isinstance(module, WeightQuantizer) else module
        infos.append(describe_layer(node.name, inner, layer_input_shape(ir, node), ir.meta(node).macs))
    return infos


def kernel_numels(ir: IR) -> list[int]:
    out = []
    for node in layer_nodes(ir):
        module = ir.gm.get_submodule(str(node.target))
        inner = module.layer if isinstance(module, WeightQuantizer) else module
        weight = inner.weight
        assert isinstance(weight, torch.Tensor)
        out.append(int(weight.numel()))
    return out


def default_latency_table(target: str, threads: int) -> LatencySource:
    """The target's per-layer latency table, cached on disk (:mod:`hardware.latency_table`)."""
    from fxsculpt.hardware.latency_table import LatencyTable
    from fxsculpt.hardware.targets import get_target

    return LatencyTable(get_target(target, threads))


def build_cost(
    metric: str,
    float_ir: IR,
    q_ir: IR,
    infos: list[LayerInfo],
    levels: BitLevels,
    ctx: Context,
    table: LatencySource | None = None,
) -> tuple[CostModel, BitLevels]:
    """The cost table of ``metric`` and the action levels (latency may drop dominated levels)."""
    if metric == "size":
        numels = kernel_numels(q_ir)
        return size_cost(numels, levels, other_params=max(float_ir.param_count() - sum(numels), 0)), levels
    if metric == "bitops":
        return bitops_model(infos, levels), levels
    table = table or default_latency_table(ctx.target, ctx.threads)
    canonical = ort_cpu_canonical if ctx.target == "ort-cpu" else None
    model = latency_model(q_ir, [i.name for i in infos], levels, table, canonical)
    return model, undominated_levels(model, levels)


def _hidden(text: str) -> tuple[int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2 or min(parts) < 1:
        raise BadInputError(f"quantize.haq_hidden must be two positive sizes such as 300,300, got {text!r}")
    return parts[0], parts[1]


def search_subset(ctx: Context, samples: int) -> Subset[Any] | Any:
    assert ctx.data is not None
    train = ctx.data.train
    n = len(train)
    if samples <= 0 or samples >= n:
        return train
    order = torch.randperm(n, generator=ctx.generator("haq-subset"))[:samples].sort().values
    return Subset(train, order.tolist())


@dataclass
class HaqSetup:
    """Everything a search (or a baseline under the same budget) needs, built once per run."""

    float_ir: IR  # the input IR with BatchNorm folded
    env: QuantizeEnv  # owns the quantizer-equipped IR
    states: StateSpace
    levels: BitLevels
    cost: CostModel
    budget: BudgetSpec
    original_accuracy: float
    exact_cost: ExactLatency | None = None
    #: What the target runs for a policy (ort-cpu: each layer int8 or float); None: as chosen.
    project: Callable[[Policy], Policy] | None = None
    #: Exports and times policies on a measured target (``haq_measure``); None otherwise.
    meter: PolicyMeter | None = None
    calibration: Calibration | None = None
    work_dir: Path | None = None

    def close(self) -> None:
        """Remove the folder of exported candidates."""
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None


def measured_target(ctx: Context) -> Any:
    """The target as a timer of whole files, or ``None`` when it is analytical."""
    from fxsculpt.hardware.targets import get_target

    target = get_target(ctx.target, ctx.threads)
    return None if target.analytical else target


def prepare_haq(
    ir: IR,
    ctx: Context,
    opts: HaqOptions,
    latency_table: LatencySource | None = None,
    reduce_range: bool = False,
) -> HaqSetup:
    """Check options, fold BatchNorm, insert 8-bit quantizers, build state, cost table and budget."""
    if ctx.data is None:
        raise BadInputError("quantize.method=haq needs data (--data) to fine-tune and measure accuracy")
    if opts.episodes < 1:
        raise BadInputError(f"quantize.episodes must be at least 1, got {opts.episodes}")
    metric, absolute, ratio = choose_metric(opts, ctx.budget)
    with_float = metric == "latency" and ctx.target in INT8_FASTEST_TARGETS
    try:
        levels = BitLevels(opts.haq_min_bits, opts.haq_max_bits, with_float=with_float)
    except ValueError as exc:
        raise BadInputError(f"quantize.haq_min_bits/haq_max_bits: {exc}") from exc
    if not 2 <= opts.haq_min_bits <= opts.haq_max_bits <= 8:
        raise BadInputError("quantize.haq_min_bits and haq_max_bits must satisfy 2 <= min <= max <= 8")

    if metric == "latency" and ratio is not None and ratio < 1.0 and ctx.target in INT8_FASTEST_TARGETS:
        raise BudgetError(
            f"HAQ: latency_ratio={ratio:g} is infeasible on {ctx.target}: int8 is its fastest kernel and lower "
            "bits are not faster, so no policy beats uniform 8-bit (use a ratio >= 1, or --target bitserial)"
        )
    float_ir = ir.clone()
    _fold_batchnorms(float_ir)  # integer kernels run conv+BN as one conv: search what will be exported
    q_ir = float_ir.clone()
    insert_quantizers(q_ir, {n.name: 8 for n in layer_nodes(q_ir)}, act_bits=8, reduce_range=reduce_range)
    layers = layer_nodes(q_ir)
    infos = layer_infos(q_ir)
    states = StateSpace(infos, two_steps=metric != "size")
    cost, levels = build_cost(metric, float_ir, q_ir, infos, levels, ctx, latency_table)
    int8_fastest = ctx.target in INT8_FASTEST_TARGETS
    if not 0.0 <= opts.haq_latency_margin < 1.0:
        raise BadInputError(f"quantize.haq_latency_margin must be in [0, 1), got {opts.haq_latency_margin}")

    settings = EnvSettings(
        finetune_epochs=opts.haq_search_epochs,
        finetune_lr=opts.haq_search_lr,
        batch_size=ctx.train.batch_size,
        low_bit_calibration=opts.haq_low_bit_calibration,
    )
    env = QuantizeEnv(
        q_ir,
        layers,
        search_subset(ctx, opts.haq_search_samples),
        ctx.data.val,
        settings,
        ctx.device,
        ctx.seed,
    )
    original = evaluate(float_ir.gm, ctx.data.val, 256, ctx.device)[1]
    setup = HaqSetup(float_ir, env, states, levels, cost, BudgetSpec(metric, math.inf, 0.0, ""), original)
    try:
        if metric == "latency":
            table = latency_table or default_latency_table(ctx.target, ctx.threads)
            _attach_latency(setup, ctx, opts, q_ir, layers, table, with_float, measure=latency_table is None)
        exact, project = setup.exact_cost, setup.project or (lambda p: p)
        n, low = len(layers), levels.levels[0]
        setup.budget = resolve_budget(
            cost,
            levels,
            ctx.target,
            absolute=absolute,
            ratio=ratio,
            int8_is_fastest=int8_fastest,
            reference=exact(project([(8, 8)] * n)) if exact is not None else None,
            floor=exact(project([(low, low)] * n)) if exact is not None else None,
        )
    except BaseException:
        setup.close()
        raise
    if metric == "latency":
        setup.budget.margin = opts.haq_latency_margin
    return setup


def _attach_latency(
    setup: HaqSetup,
    ctx: Context,
    opts: HaqOptions,
    q_ir: IR,
    layers: list[Any],
    table: LatencySource,
    with_float: bool,
    measure: bool,
) -> None:
    """The whole-model latency evaluation of the search; on a measured target (and ``haq_measure``)
    also the meter of exported files, and the table calibrated on the int8 and float exports."""
    canonical = ort_cpu_canonical if ctx.target == "ort-cpu" else None
    setup.exact_cost = ExactLatency(q_ir, layers, table, canonical, runtime_plan=with_float)
    setup.project = int8_or_float if with_float else None
    timer = measured_target(ctx) if opts.haq_measure and measure else None
    if timer is None:
        return
    setup.work_dir = Path(tempfile.mkdtemp(prefix="fxsculpt-haq-"))
    setup.meter = PolicyMeter(setup.env, timer, setup.work_dir, rounds=opts.haq_measure_rounds)
    setup.calibration = calibrate_latency(setup.exact_cost, setup.meter, len(layers))


def run_haq(
    ir: IR,
    ctx: Context,
    opts: HaqOptions,
    latency_table: LatencySource | None = None,
    on_episode: Callable[[EpisodeRecord], None] | None = None,
    reduce_range: bool = False,
) -> IR:
    """Search, fine-tune and freeze; returns the quantized IR (the input IR is left untouched).

    ``reduce_range`` keeps 8-bit weights to 7-bit codes (see :func:`quant.insert.insert_quantizers`).
    """
    if ctx.workers > 1:
        from fxsculpt.training.parallel import require_ray

        require_ray()  # before any work: a one-line message when Ray is missing
    setup = prepare_haq(ir, ctx, opts, latency_table, reduce_range)
    try:
        return _search_and_finalize(setup, ctx, opts, on_episode)
    finally:
        setup.close()


def _search_and_finalize(
    setup: HaqSetup, ctx: Context, opts: HaqOptions, on_episode: Callable[[EpisodeRecord], None] | None
) -> IR:
    env, states, levels, cost, budget = setup.env, setup.states, setup.levels, setup.cost, setup.budget
    original, metric = setup.original_accuracy, budget.metric
    config = DDPGConfig(hidden=_hidden(opts.haq_hidden), warmup=opts.haq_warmup)
    ctx.logger.info(
        "haq: %d layers, %s budget %.4g%s (%s), %d episodes",
        len(states.layers),
        metric,
        budget.limit,
        cost.unit,
        budget.source,
        opts.episodes,
    )
    fixed_act: Bits = 8
    checkpoint = HaqCheckpoint(
        pass_checkpointer(ctx, "haq-search"),
        search_config(setup, ctx, opts),
        counters={"cost": cost, "exact_cost": setup.exact_cost},
    )
    result = haq_search(
        states,
        levels,
        cost,
        budget,
        env,
        original,
        opts.episodes,
        config,
        seed=ctx.seed,
        fixed_act_bits=fixed_act,
        on_episode=on_episode or _progress(ctx, opts.episodes),
        exact_cost=setup.exact_cost,
        project=setup.project,
        table_first=setup.project is None,  # ort-cpu: the table alone misprices mixed policies
        evaluate_batch=episode_evaluator(env, ctx),
        batch=ctx.workers,
        checkpoint=checkpoint,
    )

    # on a measured target the exported file must measure within the budget: checked before the
    # final fine-tune (which then trains the policy handed over) and again after it, just before
    # the pipeline exports (the machine's load may have changed in between)
    policy = result.best_policy
    checks = _check_before_finetune(setup, ctx, policy)
    if checks:
        policy = [(w, a) for w, a in checks[-1].policy]
    # (costed before finalizing: evaluating a cost sets bits on the IR that is about to be frozen)
    final_cost = setup.exact_cost(policy) if setup.exact_cost is not None and checks else result.best_cost

    final_epochs = ctx.train.epochs if opts.haq_final_epochs < 0 else opts.haq_final_epochs
    finetune_policy(
        env, policy, ctx, final_epochs, opts.haq_final_lr, checkpoint=pass_checkpointer(ctx, "haq-finetune")
    )
    if setup.meter is not None:
        setup.meter.keep_weights = True  # the fine-tuned weights, bits set on them as they are
        after = _check_exported(setup, ctx, policy, "after fine-tune")
        checks += after
        if after and [tuple(p) for p in after[-1].policy] != list(policy):
            policy = [(w, a) for w, a in after[-1].policy]
            final_cost = setup.exact_cost(policy) if setup.exact_cost is not None else final_cost
        env.apply(policy)  # the check's exports set other policies' bits on the IR
    final_val = freeze_policy(env)

    curve_json = ctx.stage(CURVE_JSON)
    write_curve_json(result, curve_json)
    curve_png = ctx.stage(CURVE_PNG)
    plot_curve(result, curve_png, title=f"HAQ on {ctx.target}: {metric} budget {budget.limit:.4g}{cost.unit}")
    section = haq_section(result, cost, budget, ctx, levels, final_val, policy, final_cost)
    if setup.exact_cost is not None:
        section["cost_lookups"] += setup.exact_cost.lookups
    if setup.calibration is not None:
        section["calibration"] = setup.calibration.as_dict()
    if checks:
        section["measured_checks"] = [c.as_dict() for c in checks]
        section["measured_ms"] = checks[-1].measured_ms
        section["measured_limit_ms"] = checks[-1].limit_ms
        section["meets_budget"] = checks[-1].met
        section["policy_lowered_by_check"] = any(not c.met for c in checks)
    published = publish_ratio_limit(ctx, budget, checks)  # the hardware pass checks the file against it
    if published is not None:
        section["ratio_limit"] = published
    ctx.section("haq", section)
    ctx.record(
        method="haq",
        episodes=opts.episodes,
        metric=metric,
        budget=round(budget.limit, 6),
        cost=round(final_cost, 6),
        val_acc_best=round(result.best_accuracy, 4),
        val_acc_final=round(final_val, 4),
        **({"measured_ms": round(checks[-1].measured_ms, 6)} if checks else {}),
    )
    if not checks and final_cost > budget.limit * (1 + 1e-9):
        raise BudgetError(
            f"HAQ: the best policy costs {final_cost:.4g}{cost.unit}, over the budget {budget.limit:.4g}{cost.unit}"
        )
    return env.ir


def search_config(setup: HaqSetup, ctx: Context, opts: HaqOptions) -> dict[str, Any]:
    """The settings a saved search depends on: a checkpoint made with others is refused.

    The budget enters as given (metric, ``--budget`` limit or ratio), not as resolved: on a
    measured target the resolved limit moves with the machine's timing.
    """
    assert ctx.data is not None
    metric, absolute, _ = choose_metric(opts, ctx.budget)  # (a ratio is among the options)
    haq_fields = {f.name for f in dataclasses.fields(HaqOptions)}
    return {
        "seed": ctx.seed,
        "target": ctx.target,
        "metric": metric,
        "budget": absolute,
        "layers": [layer.name for layer in setup.states.layers],
        "levels": list(setup.levels.levels),
        "batch_size": ctx.train.batch_size,
        "train_samples": len(ctx.data.train),
        "val_samples": len(ctx.data.val),
        **{k: v for k, v in dataclasses.asdict(opts).items() if k in haq_fields},
    }


def episode_evaluator(
    env: QuantizeEnv, ctx: Context
) -> Callable[[Sequence[tuple[int, Policy]]], list[Evaluation]]:
    """Evaluates ``(episode, policy)`` items in order: several at once on Ray workers when
    ``ctx.workers > 1``, else (and for single items) in this process, with the same results.

    Either way each runs through :func:`training.parallel.map_in_order` with ``ctx.threads``
    intra-op threads and the global RNGs seeded from the seed and its episode.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator("haq-episodes")))
    local = EpisodeEvaluator(env, seed)
    remote: EpisodeEvaluator | None = None

    def run(items: Sequence[tuple[int, Policy]]) -> list[Evaluation]:
        nonlocal remote
        from fxsculpt.training import parallel

        items = list(items)
        if ctx.workers > 1 and len(items) > 1:
            remote = remote or EpisodeEvaluator(env.portable(), seed)
            return parallel.map_in_order(
                remote, items, ctx.workers, ctx.ray_address, seed=seed, threads=ctx.threads
            )
        return parallel.map_in_order(local, items, 1, seed=seed, threads=ctx.threads)

    return run


def _check_before_finetune(setup: HaqSetup, ctx: Context, policy: Policy) -> list[Check]:
    """:func:`_check_exported` before the final fine-tune, its outcome kept in ``haq-verify``: a
    resumed run fine-tunes the policy the killed one checked (a new measurement might differ)."""
    if setup.meter is None or setup.exact_cost is None:
        return []
    saved = pass_checkpointer(ctx, "haq-verify")
    config = {"policy": [[w, a] for w, a in policy]}
    state = saved.load_latest(config) if saved is not None else None
    if state is not None:
        return [Check(**check) for check in state["checks"]]
    checks = _check_exported(setup, ctx, policy, "before fine-tune")
    if saved is not None:
        saved.save(
            0, {"kind": "haq_verify", "config": config, "checks": [dataclasses.asdict(c) for c in checks]}
        )
    return checks


def _check_exported(setup: HaqSetup, ctx: Context, policy: Policy, phase: str) -> list[Check]:
    """:func:`quant.haq.verify.verify_on_export` when the target is measured (else no checks), logged."""
    if setup.meter is None or setup.exact_cost is None:
        return []
    _, checks = verify_on_export(
        policy, setup.exact_cost, setup.meter, setup.budget, setup.levels, setup.project, phase=phase
    )
    for check in checks:
        ctx.logger.info(
            "haq (%s): exported candidate measures %.4g ms (predicted %.4g ms), budget target %.4g ms: %s",
            phase,
            check.measured_ms,
            check.predicted_ms,
            check.target_ms,
            "met" if check.met else "over, lowering bits",
        )
    return checks


def finetune_policy(
    env: QuantizeEnv,
    policy: Policy,
    ctx: Context,
    epochs: int,
    lr: float,
    checkpoint: Checkpointer | None = None,
) -> None:
    """Set ``policy`` on the env's IR (float weights back) and fine-tune it on the whole training
    split, then recalibrate the activation scales. ``checkpoint`` saves every epoch and resumes."""
    assert ctx.data is not None
    env.prepare(policy)
    if epochs > 0:
        settings = TrainSettings(
            epochs=epochs, batch_size=ctx.train.batch_size, lr=lr, progress=ctx.train.progress
        )
        train_model(
            env.ir.gm,
            ctx.data.train,
            settings,
            ctx.device,
            ctx.generator("haq-final"),
            desc="haq final fine-tune",
            checkpoint=checkpoint,
        )
        env.calibrate()


def freeze_policy(env: QuantizeEnv) -> float:
    """Validation accuracy of the env's IR as it is, then its weights frozen for export (freezing
    does not change the function)."""
    accuracy = env.accuracy()
    freeze(env.ir)  # weights onto their grids, scales as buffers; also refreshes the bits metadata
    return accuracy


def finalize_policy(env: QuantizeEnv, policy: Policy, ctx: Context, epochs: int, lr: float) -> float:
    """Set ``policy`` on the env's IR, fine-tune it on the whole training split, recalibrate, freeze.

    Returns the validation accuracy before freezing. Also how a uniform baseline is made
    comparable: the same steps with a uniform policy.
    """
    finetune_policy(env, policy, ctx, epochs, lr)
    return freeze_policy(env)


def _fold_batchnorms(ir: IR) -> None:
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ir.gm.modules()):
        return
    from fxsculpt.passes.fold_bn import fold_batchnorms

    fold_batchnorms(ir)
    ir.gm.recompile()
    ir.propagate()


def _bits_text(bits: Bits) -> str | int:
    return "float" if bits is None else bits


def haq_section(
    result: SearchResult,
    cost: CostModel,
    budget: BudgetSpec,
    ctx: Context,
    levels: BitLevels,
    final_val: float,
    policy: Policy | None = None,
    final_cost: float | None = None,
) -> dict[str, Any]:
    """The ``haq`` block of ``report.json``: ``policy`` is the one exported (the search's best,
    lowered further where its exported file measured over budget), ``final_cost`` its predicted cost."""
    policy = result.best_policy if policy is None else policy
    final_cost = result.best_cost if final_cost is None else final_cost
    per_layer = cost.per_layer(policy)
    return {
        "target": ctx.target,
        "metric": budget.metric,
        "unit": cost.unit.strip(),
        "budget": budget.as_dict(),
        "cost": final_cost,
        "cost_ratio_of_8bit": final_cost / budget.reference_8bit if budget.reference_8bit else None,
        "meets_budget": final_cost <= budget.limit * (1 + 1e-9),
        "levels": [_bits_text(b) for b in levels.levels],
        "policy": [
            {"layer": name, "weight_bits": _bits_text(w), "act_bits": _bits_text(a), "cost": c}
            for name, (w, a), c in zip(result.layer_names, policy, per_layer, strict=True)
        ],
        "search_best_policy": [[_bits_text(w), _bits_text(a)] for w, a in result.best_policy],
        "search_best_cost": result.best_cost,
        "best_episode": result.best_episode,
        "episodes": len(result.curve),
        "reward": result.best_reward,
        "val_accuracy_float": result.original_accuracy,
        "val_accuracy_best_episode": result.best_accuracy,
        "val_accuracy_final": final_val,
        "timing_per_episode_s": {k: round(v, 4) for k, v in result.timing().items()},
        "cost_lookups": cost.lookups,
        "learning_curve": CURVE_JSON,
        "learning_curve_plot": CURVE_PNG,
    }


def _progress(ctx: Context, episodes: int) -> Callable[[EpisodeRecord], None]:
    every = max(1, episodes // 20)

    def report(record: EpisodeRecord) -> None:
        if record.episode % every == 0 or record.episode == episodes - 1:
            ctx.logger.info(
                "haq episode %d/%d: reward %.4f acc %.4f cost %.4g%s",
                record.episode + 1,
                episodes,
                record.reward,
                record.accuracy,
                record.cost,
                "" if math.isfinite(record.cost) else "?",
            )

    return report
