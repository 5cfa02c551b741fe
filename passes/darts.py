"""``darts``: differentiable architecture search (Liu, Simonyan & Yang, ICLR 2019).

Two ways in, one mechanism. A graph that already holds mixed ops (``builtin:darts-supernet``)
is searched as it is. Any other graph is first relaxed (:mod:`nas.darts.relax`): the nodes
matching ``darts.pattern`` and ``darts.kinds`` (depthwise and k×k convolutions by default, not
1×1) become mixed ops over the ``darts.ops`` candidates that fit their shapes (by default the
node's own convolution at 3×3 and 5×5, skip and zero: a depthwise node stays depthwise). A
relaxed MobileNet-style model then searches an epoch in about the time of a training epoch of
the model itself (``bench/bench_darts.py --relax``); the paper's eight ops on every convolution
cost about 20× its MACs. The search is the paper's bi-level optimization (Algorithm 1), first
order by default, second order with ``darts.order=2`` (eq. 7–8), checkpointed after every
epoch (``--resume OUT``) and data-parallel under torchrun. Discretization (sec. 2.4)
then leaves a plain graph; for the cell space the genotype is written as ``genotype.json``
(the DARTS code's format, readable by ``builtin:darts-eval --genotype``), together with plots
of α over the epochs and of the discovered cells.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Subset

from fxsculpt.ir.constructs import Choice
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR
from fxsculpt.nas.darts.architect import unique_parameters
from fxsculpt.nas.darts.discretize import discretize, genotype_of
from fxsculpt.nas.darts.mixed import MixedOp
from fxsculpt.nas.darts.ops import PRIMITIVES
from fxsculpt.nas.darts.relax import RELAX_KINDS, RELAX_OPS, is_candidate_name, relax, selected_nodes
from fxsculpt.nas.darts.search import SearchSettings, search
from fxsculpt.passes.base import Context, Pass
from fxsculpt.passes.options import option
from fxsculpt.training.checkpoint import pass_checkpointer


@dataclass
class DartsOptions:
    order: Literal[1, 2] = option(
        1, "1: first-order DARTS (the DARTS code's default); 2: second order (eq. 7-8)"
    )
    epochs: int | None = option(None, "search epochs (default: --epochs; paper: 50)")
    batch_size: int = option(64, "batch size of both the weight and the α step (paper: 64)")
    steps_per_epoch: int = option(0, "cap on search steps per epoch, 0 for a full pass over the data")
    data_fraction: float = option(
        1.0,
        "fraction of the batches of a full pass one search epoch takes (rounded up; "
        "with steps_per_epoch, the smaller)",
    )
    w_lr: float = option(0.025, "weight SGD learning rate, cosine-annealed per epoch (paper: 0.025)")
    w_lr_min: float = option(0.001, "final weight learning rate of the cosine schedule (paper: 0.001)")
    w_momentum: float = option(0.9, "weight SGD momentum (paper: 0.9)")
    w_weight_decay: float = option(3e-4, "weight decay of the weights (paper: 3e-4)")
    grad_clip: float = option(5.0, "clip the weights' gradient norm at this value, 0 for none (paper: 5)")
    arch_lr: float = option(3e-4, "α Adam learning rate (paper: 3e-4)")
    arch_beta1: float = option(0.5, "α Adam beta1 (paper: 0.5)")
    arch_beta2: float = option(0.999, "α Adam beta2 (paper: 0.999)")
    arch_weight_decay: float = option(1e-3, "α weight decay (paper: 1e-3)")
    split: Literal["train", "val"] = option(
        "train",
        "train: weights and α on two halves of the training split (paper); val: α on the validation split",
    )
    train_portion: float = option(
        0.5, "with split=train, the fraction of the training split used for weights"
    )
    pattern: str = option(
        "conv",
        "regex the nodes to relax must match: searched in the module class name, "
        "or matching a whole node name (e.g. blocks_.*_depthwise) or module path",
    )
    kinds: list[Literal["depthwise", "pointwise", "dense", "other"]] = option(
        None,
        "kinds of node to relax: depthwise convs, pointwise (1x1) convs, dense (other) convs, "
        "other modules the pattern selects",
        default_factory=lambda: list(RELAX_KINDS),
    )
    ops: list[str] = option(
        None,
        "candidate ops on relaxed edges: conv_KxK (the node's own conv with a KxK kernel, K odd) "
        "and the DARTS ops (" + ",".join(PRIMITIVES) + "); depthwise nodes get no op with a dense conv",
        default_factory=lambda: list(RELAX_OPS),
    )
    bn_recalibration_batches: int = option(
        20,
        "after discretizing, re-estimate BatchNorm statistics on this many training batches (the kept "
        "op's output no longer carries its mixture weight; see training.batchnorm_stats); 0: off",
    )
    plots: bool = option(True, "write darts_alphas.png and, for cells, darts_normal.png / darts_reduce.png")
    channels_last: bool = option(
        False,
        "search with NHWC tensors: about 2x faster convolutions and pooling on CPU, same values; off by "
        "default since relaxing timm's mobilenetv3_small_050 with it aborted in native code (heap corruption)",
    )


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (``--threads``), restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _edge_label(module: Choice, fallback: str) -> str:
    edge = getattr(module, "edge", None)
    if edge is None:
        return fallback
    return f"{edge.cell_type} node {edge.node} <- {edge.source}"


class Darts(Pass):
    """DARTS: relax edges into softmax mixtures of candidate ops, bi-level search, keep the strongest."""

    name = "darts"
    Options = DartsOptions

    def run(self, ir: IR, ctx: Context) -> IR:
        opts: DartsOptions = self.options
        self._check(opts)
        if ctx.data is None:
            raise BadInputError("pass 'darts' searches on data: give --data (e.g. npz:cifar10-subset.npz)")
        epochs = opts.epochs if opts.epochs is not None else ctx.train.epochs
        relaxed: dict[str, list[str]] = {}
        if not ir.construct_nodes(Choice):
            pattern_nodes = len(selected_nodes(ir, opts.pattern))
            matching = len(selected_nodes(ir, opts.pattern, opts.kinds))
            relaxed = relax(
                ir, opts.pattern, opts.ops, generator=ctx.generator("darts.alpha"), kinds=opts.kinds
            )
            if not relaxed:
                raise BadInputError(
                    f"pass 'darts' found no node matching darts.pattern={opts.pattern!r} and "
                    f"darts.kinds={','.join(opts.kinds)} ({matching} matched) for which two or more of "
                    f"darts.ops={','.join(opts.ops)} fit"
                )
            ctx.logger.info(
                "darts: relaxed %d of the %d nodes matching darts.pattern=%r (%d of kinds %s) "
                "into %d candidates (ops %s)",
                len(relaxed),
                pattern_nodes,
                opts.pattern,
                matching,
                ",".join(opts.kinds),
                sum(len(v) for v in relaxed.values()),
                ",".join(opts.ops),
            )
        ir.gm.to(ctx.device)

        # α in graph order, one entry per distinct parameter (tied α once), with a label each.
        alphas: list[nn.Parameter] = []
        labels: list[str] = []
        names: list[list[str]] = []
        for node in ir.construct_nodes(Choice):
            module = ir.gm.get_submodule(str(node.target))
            assert isinstance(module, Choice)
            if any(module.alpha is a for a in alphas):
                continue
            alphas.append(module.alpha)
            labels.append(_edge_label(module, node.name))
            names.append(list(module.candidate_names))
        arch_ids = {id(p) for p in ir.arch_parameters()}
        weights = [p for p in unique_parameters(list(ir.gm.parameters())) if id(p) not in arch_ids]

        train_set, val_set = self._splits(opts, ctx)
        settings = SearchSettings(
            epochs=epochs,
            batch_size=opts.batch_size,
            order=opts.order,
            w_lr=opts.w_lr,
            w_lr_min=opts.w_lr_min,
            w_momentum=opts.w_momentum,
            w_weight_decay=opts.w_weight_decay,
            grad_clip=opts.grad_clip,
            arch_lr=opts.arch_lr,
            arch_betas=(opts.arch_beta1, opts.arch_beta2),
            arch_weight_decay=opts.arch_weight_decay,
            steps_per_epoch=opts.steps_per_epoch,
            data_fraction=opts.data_fraction,
            progress=ctx.train.progress,
            channels_last=opts.channels_last,
        )
        with torch_threads(ctx.threads):
            result = search(
                ir.gm,
                weights,
                alphas,
                train_set,
                val_set,
                settings,
                ctx.device,
                ctx.generator("darts.data"),
                checkpoint=pass_checkpointer(ctx),
            )
        genotype = genotype_of(ir)
        final_weights = {
            label: dict(zip(n, h)) for label, n, h in zip(labels, names, result.alpha_history[-1])
        }
        decisions = discretize(ir)
        recalibrated = self._recalibrate_batchnorm(ir, opts, ctx)
        ir.gm.train(False)

        if genotype is not None:
            document: dict[str, Any] = genotype.as_dict()
        else:
            document = {"edges": {k: v for k, v in decisions.items()}}
        ctx.stage("genotype.json").write_text(json.dumps(document, indent=2) + "\n")
        plots: list[str] = []
        if opts.plots:
            from fxsculpt.nas.darts.plots import plot_alpha_history, plot_cell

            plot_alpha_history(result.alpha_history, labels, names, ctx.stage("darts_alphas.png"))
            plots.append("darts_alphas.png")
            if genotype is not None:
                plot_cell(
                    genotype.normal, genotype.normal_concat, ctx.stage("darts_normal.png"), "normal cell"
                )
                plot_cell(
                    genotype.reduce, genotype.reduce_concat, ctx.stage("darts_reduce.png"), "reduction cell"
                )
                plots += ["darts_normal.png", "darts_reduce.png"]
        ctx.section(
            "darts",
            {
                "order": opts.order,
                "epochs": epochs,
                "space": "cells" if genotype is not None else "relaxed edges",
                "relaxed_nodes": relaxed,
                "genotype": genotype.as_dict() if genotype is not None else None,
                "decisions": decisions,
                "bn_recalibration_batches": recalibrated,
                "mixture_weights": final_weights,
                "history": result.history,
                "epoch_seconds": [round(t, 3) for t in result.epoch_seconds],
                "files": ["genotype.json", *plots],
            },
        )
        last = result.history[-1] if result.history else {}
        ctx.record(
            order=opts.order,
            epochs=epochs,
            edges=len(decisions),
            kept=sum(1 for v in decisions.values() if v != "cut"),
            search_train_accuracy=round(float(last.get("train_accuracy", 0.0)), 4),
        )
        return ir

    @staticmethod
    def _check(opts: DartsOptions) -> None:
        if (opts.epochs is not None and opts.epochs < 0) or opts.batch_size < 1 or opts.steps_per_epoch < 0:
            raise BadInputError("darts.epochs and darts.steps_per_epoch must be >= 0, darts.batch_size >= 1")
        if not 0.0 < opts.train_portion < 1.0:
            raise BadInputError(f"darts.train_portion must be in (0, 1), got {opts.train_portion}")
        if not 0.0 < opts.data_fraction <= 1.0:
            raise BadInputError(f"darts.data_fraction must be in (0, 1], got {opts.data_fraction}")
        unknown = [o for o in opts.ops if not is_candidate_name(o)]
        if unknown or len([o for o in opts.ops if o != "none"]) < 2:
            raise BadInputError(
                "darts.ops needs two or more ops other than none "
                f"(unknown: {', '.join(unknown) or '-'}; known: conv_KxK for odd K, {', '.join(PRIMITIVES)})"
            )
        if not opts.kinds:
            raise BadInputError("darts.kinds needs at least one of depthwise, pointwise, dense, other")
        if min(opts.w_lr, opts.arch_lr) <= 0:
            raise BadInputError("darts.w_lr and darts.arch_lr must be positive")

    @staticmethod
    def _recalibrate_batchnorm(ir: IR, opts: DartsOptions, ctx: Context) -> int:
        """BatchNorm statistics of the discretized graph, from ``bn_recalibration_batches`` batches."""
        if opts.bn_recalibration_batches <= 0 or ctx.data is None:
            return 0
        from fxsculpt.training.batchnorm_stats import recalibrate_batchnorm
        from fxsculpt.training.loop import make_loader

        loader = make_loader(ctx.data.train, opts.batch_size, True, ctx.generator("darts.bn"))
        inputs = (x for x, _ in itertools.islice(loader, opts.bn_recalibration_batches))
        with torch_threads(ctx.threads):
            return recalibrate_batchnorm(ir.gm, inputs, ctx.device)

    @staticmethod
    def _splits(opts: DartsOptions, ctx: Context) -> tuple[Any, Any]:
        """Weights' and α's data: two halves of the training split (paper), or train and val."""
        assert ctx.data is not None
        if opts.split == "val":
            return ctx.data.train, ctx.data.val
        n = len(ctx.data.train)
        order = torch.randperm(n, generator=ctx.generator("darts.split")).tolist()
        cut = round(opts.train_portion * n)
        if cut < 1 or cut >= n:
            raise BadInputError(f"the training split ({n} images) is too small to halve for DARTS")
        return Subset(ctx.data.train, order[:cut]), Subset(ctx.data.train, order[cut:])


__all__ = ["Darts", "DartsOptions", "MixedOp"]
