"""``prune``: L1 edge and channel pruning by sparse scales (DSO-NAS / Sparse Structure Selection).

You Only Search Once (DSO-NAS, Zhang et al. 2018) puts a scale λ on every edge of a search
space and trains with ``L + δ‖W‖² + γ‖λ‖₁``, updating λ by accelerated proximal gradient so
scales become exactly zero; Sparse Structure Selection (Huang & Wang, ECCV 2018) does the
same on residual blocks and channel groups of an existing network. This pass does both on
any traced model:

1. *gates*: scalar gates on residual branches (``target=edges``), channel gates after
   convolutions (``channels``), or both; a model that already holds gates (``builtin:dso-supernet``)
   keeps its own for ``edges``;
2. *pretrain* the weights with λ fixed; *search*: W by SGD on one half of the training split,
   λ by APG on the other, removing dead structure every ``prune_every`` epochs;
3. *retrain* the smaller network: fine-tune it, or re-initialize its weights and train from
   scratch (``retrain``); then the remaining gates are folded into the layer before them.

The IR that comes out is the physically smaller graph, so the exported ONNX is the small
model. Parameters, MACs and (on ``ort-cpu``) measured latency before and after are recorded.

A budget (``macs_target``, default 0.5 of the MACs) stops the search once enough structure is
gone. Scales start at 1 and the soft threshold lowers them by ηγ per step (about ηγ/(1 − μ) with
APG's momentum); with the paper's γ = 0.001 they reach zero only after tens of thousands of
steps (the paper's budget, not a CPU run's). When the search ends above the budget the lowest
scales are ranked out, as Network Slimming (Liu et al., ICCV 2017) does with L1-trained scales,
relative to their gate (``cut_score``, see :mod:`nas.dso.ranking`: a gate between two
BatchNorms can be scaled as a whole without changing the network, so only differences inside a
gate mean something). ``budget_points`` spreads that ranking over the search, so the weights
train on with the smaller structure. ``macs_target=0`` is the pure method: only scales that
reached exactly zero are removed.

``scale_batches=split`` (default) takes λ's gradient from the other half of the data, as
DSO-NAS does; ``joint`` takes both gradients from one batch, as Sparse Structure Selection does:
at equal compute the weights then get twice the updates and all of the data.

Each phase (``pretrain``, ``search``, ``retrain``) saves its whole state after every epoch in
``OUT/checkpoints/prune/<phase>`` and ``--resume OUT`` continues where a killed run stopped;
under torchrun all three train data-parallel (:mod:`training.distributed`), with λ and every
removal identical on every rank.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.gating import fold_gates, gate_branches, gate_channels
from fxsculpt.nas.dso.search import SearchSettings, prune_now, search, split_halves
from fxsculpt.passes.base import Context, Pass
from fxsculpt.passes.options import option
from fxsculpt.training import distributed
from fxsculpt.training.checkpoint import pass_checkpointer


@dataclass
class PruneOptions:
    """Options of the ``prune`` pass (defaults: DSO-NAS's CIFAR search, section 4.1)."""

    target: Literal["edges", "channels", "both"] = option(
        "both", "where the scales go: residual branches / supernet edges, conv channel groups, or both"
    )
    gamma: float = option(0.001, "γ, the weight of the L1 penalty on the scales")
    macs_target: float = option(
        0.5,
        "keep at most this fraction of the MACs: stop the search there, or rank out the smallest λ "
        "at its end if the scales did not reach zero on their own (0: pure L1, only exact zeros go)",
    )
    adaptive_flops: bool = option(False, "scale γ per block by its share of the MACs (adaptive FLOPs)")
    mu: float = option(0.9, "μ, the APG momentum (also the SGD momentum of the weights)")
    lr: float = option(0.1, "learning rate of weights and scales (cosine-annealed)")
    weight_decay: float = option(1e-4, "weight decay on W (never on λ)")
    grad_clip: float = option(2.0, "gradient-norm clipping of W and of λ")
    pretrain_epochs: int = option(1, "epochs of weight training with λ fixed before the search")
    search_epochs: int | None = option(None, "epochs of the sparse search (default: --epochs)")
    retrain_epochs: int = option(1, "epochs to retrain the pruned network")
    prune_every: int = option(1, "remove dead structure every this many search epochs")
    scale_batches: Literal["split", "joint"] = option(
        "split",
        "where λ's gradient comes from: a batch of the other half of the training split (split, "
        "DSO-NAS), or the weights' own batch (joint, as Sparse Structure Selection trains: one "
        "forward/backward per step and the weights see all of the data)",
    )
    cut_score: Literal["relative", "lambda"] = option(
        "relative",
        "how λ are ranked out for macs_target: relative (λ times the BatchNorm weight before the gate, "
        "over its gate's mean; scalar gates over the scalar gates' mean) or lambda (raw λ, globally)",
    )
    budget_points: int = option(
        0,
        "reach macs_target gradually in this many cuts spread over the search, so the weights adapt "
        "while channels go; the search then runs all its epochs (0: rank out only at its end)",
    )
    retrain: Literal["finetune", "scratch"] = option(
        "finetune", "fine-tune the pruned weights, or re-initialize them and train from scratch"
    )
    retrain_lr: float | None = option(None, "learning rate of the retrain (cosine-annealed; default: lr)")
    channel_group: int = option(1, "channels per scale for channel gates (ties may make groups larger)")
    batch_size: int | None = option(None, "batch size (default: --batch-size)")
    measure: bool = option(True, "measure ort-cpu latency before and after (exports twice)")


def _reset_weights(ir: IR, generator: torch.Generator) -> None:
    """Re-initialize every layer's weights (for ``retrain=scratch``), seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        for module in ir.gm.modules():
            if isinstance(module, Gate):
                continue
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and not isinstance(module, nn.modules.batchnorm._BatchNorm):
                reset()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.reset_parameters()


def _freeze_scales(ir: IR, value: float | None = None) -> None:
    """λ stops training (and, given ``value``, every nonzero λ is set to it)."""
    for module in ir.gm.modules():
        if isinstance(module, Gate):
            if value is not None:
                with torch.no_grad():
                    module.lam.copy_(
                        torch.where(module.lam != 0, torch.full_like(module.lam, value), module.lam)
                    )
            module.lam.requires_grad_(False)


def measure_latency_ms(ir: IR, threads: int, target: str = "ort-cpu") -> float | None:
    """Median batch-1 latency of the IR's ONNX export on ``target`` (None if that is not possible)."""
    try:
        from fxsculpt.hardware.targets import get_target
        from fxsculpt.passes.export import export_onnx
    except ImportError:
        return None
    if target != "ort-cpu":
        return None
    was_training = ir.gm.training
    ir.gm.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(ir.gm, ir.example_input(batch=1), path)
            return float(get_target("ort-cpu", threads=threads).model_latency(ir, path, batch=1).median_ms)
    finally:
        ir.gm.train(was_training)


class Prune(Pass):
    """L1 pruning with scales on edges/channels trained by APG (DSO-NAS); returns the smaller graph."""

    name = "prune"
    Options = PruneOptions

    def run(self, ir: IR, ctx: Context) -> IR:
        opts: PruneOptions = self.options
        self._check(opts)
        if ctx.data is None:
            raise BadInputError(
                "the prune pass trains: pass --data (e.g. npz:../shared/data/cifar10-subset.npz)"
            )
        from fxsculpt.training.data import check_labels
        from fxsculpt.training.loop import evaluate, make_loader, train_model

        check_labels(ctx.data, ir.num_classes)
        ir.propagate()
        before = {"params": ir.param_count(), "macs": ir.mac_count()}
        # Latency is measured by the process that reports (rank 0 under torchrun).
        measure = opts.measure and distributed.is_main_process()
        latency_before = measure_latency_ms(ir, ctx.threads, ctx.target) if measure else None

        existing = [m for m in ir.gm.modules() if isinstance(m, Gate)]
        branch_gates: list[str] = []
        channel_gates: list[str] = []
        if opts.target in ("edges", "both") and not existing:
            branch_gates = gate_branches(ir)
        if opts.target in ("channels", "both"):
            channel_gates = gate_channels(ir, group_size=opts.channel_group)
        gates = [m for m in ir.gm.modules() if isinstance(m, Gate)]
        if not gates:
            raise BadInputError(
                f"prune.target={opts.target} found nothing to scale in this model "
                "(no residual adds for 'edges', no prunable convolutions for 'channels')"
            )
        ctx.logger.info(
            "prune: %d scales in %d gates (%d branch, %d channel, %d built in)",
            sum(g.lam.numel() for g in gates),
            len(gates),
            len(branch_gates),
            len(channel_gates),
            len(existing),
        )
        batch = opts.batch_size or ctx.train.batch_size
        device = ctx.device
        ir.gm.to(device)
        history: dict[str, Any] = {}

        # 1. pretrain with λ fixed
        if opts.pretrain_epochs > 0:
            _freeze_scales(ir)
            settings = replace(ctx.train, epochs=opts.pretrain_epochs, lr=opts.lr, batch_size=batch)
            history["pretrain"] = train_model(
                ir.gm,
                ctx.data.train,
                settings,
                device,
                ctx.generator("prune-pretrain"),
                desc="prune pretrain",
                weight_decay=opts.weight_decay,
                checkpoint=pass_checkpointer(ctx, "pretrain"),
            )
            for g in gates:
                g.lam.requires_grad_(True)

        # 2. search: W on one half, λ on the other, pruning as scales reach zero
        epochs = opts.search_epochs if opts.search_epochs is not None else ctx.train.epochs
        weights_half: Any = ctx.data.train
        scales_half: Any = None
        if opts.scale_batches == "split":
            weights_half, scales_half = split_halves(ctx.data.train, ctx.generator("prune-split"))
        settings_s = SearchSettings(
            epochs=epochs,
            batch_size=batch,
            lr=opts.lr,
            momentum=opts.mu,
            gamma=opts.gamma,
            weight_decay=opts.weight_decay,
            grad_clip=opts.grad_clip,
            prune_every=opts.prune_every,
            adaptive_flops=opts.adaptive_flops,
            progress=ctx.train.progress,
            device=device,
            macs_target=int(opts.macs_target * before["macs"]) if opts.macs_target > 0 else None,
            cut_score=opts.cut_score,
            budget_points=opts.budget_points,
        )
        result = search(
            ir,
            weights_half,
            scales_half,
            settings_s,
            ctx.generator("prune-search"),
            make_loader,
            checkpoint=pass_checkpointer(ctx, "search"),
        )
        if epochs == 0:
            prune_now(ir)
        history["search"] = result.history

        # 3. retrain the smaller network (λ frozen; from scratch: nonzero λ reset to 1, weights re-drawn)
        if opts.retrain == "scratch":
            _freeze_scales(ir, value=1.0)
            _reset_weights(ir, ctx.generator("prune-scratch"))
        else:
            _freeze_scales(ir)
        folded = fold_gates(ir)
        if opts.retrain_epochs > 0:
            retrain_lr = opts.retrain_lr if opts.retrain_lr is not None else opts.lr
            settings_r = replace(ctx.train, epochs=opts.retrain_epochs, lr=retrain_lr, batch_size=batch)
            history["retrain"] = train_model(
                ir.gm,
                ctx.data.train,
                settings_r,
                device,
                ctx.generator("prune-retrain"),
                desc=f"prune {opts.retrain}",
                weight_decay=opts.weight_decay,
                checkpoint=pass_checkpointer(ctx, "retrain"),
            )
        ir.gm.eval()
        ir.propagate()
        after = {"params": ir.param_count(), "macs": ir.mac_count()}
        latency_after = measure_latency_ms(ir, ctx.threads, ctx.target) if measure else None
        _, val_acc = evaluate(ir.gm, ctx.data.val, 256, device) if len(ctx.data.val) else (0.0, None)

        summary: dict[str, Any] = {
            "params_before": before["params"],
            "params_after": after["params"],
            "macs_before": before["macs"],
            "macs_after": after["macs"],
            "macs_ratio": round(after["macs"] / max(before["macs"], 1), 4),
            "gates": len(gates),
            "ranked_out": result.ranked_out,
            "val_accuracy": val_acc,
        }
        if latency_before is not None and latency_after is not None:
            summary.update(
                latency_ms_before=round(latency_before, 4),
                latency_ms_after=round(latency_after, 4),
                latency_speedup=round(latency_before / max(latency_after, 1e-9), 3),
            )
        ctx.record(**summary)
        ctx.section(
            "prune",
            {
                "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
                "target": ctx.target,
                "before": {**before, "latency_ms": latency_before},
                "after": {**after, "latency_ms": latency_after},
                "branch_gates": len(branch_gates),
                "channel_gates": len(channel_gates),
                "builtin_gates": len(existing),
                "gates_folded": folded,
                "channels_removed_by_zero_scales": sum(r.channels_removed for r in result.shrinks),
                "branches_removed_by_zero_scales": sum(r.branches for r in result.shrinks),
                "gates_zeroed_by_dead_propagation": result.zeroed_gates,
                "scales_ranked_out_for_macs_target": result.ranked_out,
                "search_stopped_early": result.stopped_early,
                "history": history,
            },
        )
        return ir

    @staticmethod
    def _check(opts: PruneOptions) -> None:
        problems = []
        if opts.gamma < 0:
            problems.append(f"prune.gamma must be >= 0, got {opts.gamma}")
        if not 0 <= opts.mu < 1:
            problems.append(f"prune.mu must be in [0, 1), got {opts.mu}")
        if opts.lr <= 0 or (opts.retrain_lr is not None and opts.retrain_lr <= 0):
            problems.append(f"prune.lr and prune.retrain_lr must be > 0, got {opts.lr}, {opts.retrain_lr}")
        if opts.weight_decay < 0 or opts.grad_clip <= 0:
            problems.append("prune.weight_decay must be >= 0 and prune.grad_clip > 0")
        if (
            min(opts.pretrain_epochs, opts.retrain_epochs, opts.search_epochs or 0) < 0
            or opts.prune_every < 1
        ):
            problems.append("prune epochs must be >= 0 and prune.prune_every >= 1")
        if not 0 <= opts.macs_target <= 1:
            problems.append(f"prune.macs_target must be in [0, 1], got {opts.macs_target}")
        if opts.budget_points < 0:
            problems.append(f"prune.budget_points must be >= 0, got {opts.budget_points}")
        if opts.channel_group < 1:
            problems.append(f"prune.channel_group must be >= 1, got {opts.channel_group}")
        if problems:
            raise BadInputError(problems[0])
