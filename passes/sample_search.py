"""What the four sample-based search passes (``nao``, ``rl``, ``evolution``, ``random``) share.

Each pass reads the cell space from the ``builtin:darts-supernet`` graph it is given (nodes,
cells, channels and candidate ops of its mixed ops), searches it with one method through the
same :class:`~nas.sample.evaluator.CandidateEvaluator` (the same budget, cache and evaluator
for every method, so they compare at equal cost), writes ``genotype.json`` (the DARTS code's
format, readable by ``builtin:darts-eval --genotype``), ``history.json`` and ``search.png``,
and returns the derived network of the best genotype (a plain graph, trained for
``--epochs`` unless ``PASS.final_epochs`` says otherwise) for the exporter.

Scale out and resume (issue 9): with ``--workers N`` the new candidates of each batch a method
proposes are scored as Ray tasks (:class:`~nas.sample.workers.ScoringWorkers`), with the same
result as one worker; the search saves its whole state at every batch boundary into
``OUT/checkpoints/<pass>/search`` and the final training every epoch into ``.../final``
(:mod:`nas.sample.checkpointing`), and ``--resume OUT`` continues where a killed run stopped.

:class:`SampleSearchPass` has no ``name``, so the registry does not list it; the concrete
passes in ``passes/nao.py``, ``passes/rl_search.py``, ``passes/evolution.py`` and
``passes/random_search.py`` only add their method's options and call their method.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR
from fxsculpt.nas.sample.checkpointing import SearchCheckpoint
from fxsculpt.nas.sample.encoding import Arch, SearchSpace, genotype_to_json
from fxsculpt.nas.sample.evaluator import (
    Backend,
    CandidateEvaluator,
    ShortTrainingBackend,
    WeightSharingBackend,
    threads,
)
from fxsculpt.nas.sample.workers import ScoringWorkers
from fxsculpt.passes.base import Context, Pass, TrainSettings
from fxsculpt.passes.options import option
from fxsculpt.training.checkpoint import pass_checkpointer


@dataclass
class SampleSearchOptions:
    """Options every sample-based search pass has (``--set PASS.NAME=VALUE``)."""

    budget: int = option(20, "number of distinct architectures evaluated: the cost every method gets")
    evaluator: Literal["weight_sharing", "short_training"] = option(
        "weight_sharing",
        "weight_sharing: one single-path supernet scores candidates on validation batches; "
        "short_training: each candidate's network is trained from scratch briefly",
    )
    channels: int = option(0, "initial channels of the searched and derived networks (0: the supernet's)")
    layers: int = option(0, "cells of the searched and derived networks (0: the supernet's)")
    batch_size: int = option(0, "batch size of supernet and short training (0: --batch-size)")
    lr: float = option(0.0, "SGD learning rate of supernet and short training (0: --lr)")
    warmup_steps: int = option(
        50, "weight sharing: supernet steps on random architectures before the first score"
    )
    steps_per_eval: int = option(4, "weight sharing: supernet steps per new candidate, sampled from the pool")
    val_batches: int = option(2, "weight sharing: fixed validation batches each candidate is scored on")
    short_epochs: int = option(1, "short training: epochs per candidate")
    short_train_limit: int = option(1000, "short training: training images used per candidate (0: all)")
    final_epochs: int = option(
        -1, "epochs to train the best genotype's network before handing it on (-1: --epochs)"
    )
    plots: bool = option(True, "write search.png (best validation accuracy against evaluations)")


@dataclass(frozen=True)
class SpaceShape:
    """The cell space and network size read from a darts-supernet graph."""

    space: SearchSpace
    channels: int
    layers: int
    in_channels: int
    num_classes: int


def space_of(ir: IR, channels: int = 0, layers: int = 0) -> SpaceShape:
    """Read nodes per cell, candidate ops, cells and channels from the IR's DARTS mixed ops."""
    from fxsculpt.nas.darts.mixed import MixedOp
    from fxsculpt.nas.darts.ops import PRIMITIVES

    edges = []
    names: set[str] = set()
    for node in ir.construct_nodes():
        module = ir.gm.get_submodule(str(node.target))
        if isinstance(module, MixedOp) and module.edge is not None:
            edges.append(module.edge)
            names.update(module.candidate_names)
    if not edges:
        raise BadInputError(
            "sample-based search needs the DARTS cell space: run it on builtin:darts-supernet "
            "(the graph has no DARTS cell mixed ops)"
        )
    ops = tuple(p for p in PRIMITIVES if p in names and p != "none")
    steps = max(e.node for e in edges) + 1
    if not layers:
        layers = max(e.cell_index for e in edges) + 1
    if not channels:
        try:
            conv = ir.gm.get_submodule("cells.0.preprocess1.conv")
            channels = int(conv.out_channels)  # type: ignore[arg-type]
        except AttributeError:
            raise BadInputError("cannot read the supernet's channels: set PASS.channels") from None
    if ir.num_classes is None:
        raise BadInputError("sample-based search needs a classifier (the model's number of classes)")
    return SpaceShape(SearchSpace(steps=steps, ops=ops), channels, layers, ir.input_shape[1], ir.num_classes)


def derived_network(shape: SpaceShape, arch: Arch) -> nn.Module:
    """The darts-eval network of ``arch``'s genotype at the searched size (no auxiliary head)."""
    from fxsculpt.nas.darts.network import EvalNetwork

    return EvalNetwork(
        shape.space.to_genotype(arch),
        num_classes=shape.num_classes,
        in_channels=shape.in_channels,
        channels=shape.channels,
        layers=shape.layers,
        auxiliary=False,
    )


def make_evaluator(
    opts: SampleSearchOptions,
    shape: SpaceShape,
    data: Any,
    train: TrainSettings,
    device: torch.device,
    seed: int,
    workers: ScoringWorkers | None = None,
) -> CandidateEvaluator:
    """The evaluator the options ask for, over ``data.train`` (training) and ``data.val`` (scores).

    ``workers`` says where batches of new candidates are scored (default: in this process).
    """
    if opts.budget < 1:
        raise BadInputError(f"the search budget must be at least 1 evaluation, got {opts.budget}")
    if len(data.val) == 0:
        raise BadInputError("sample-based search scores candidates on the validation split, which is empty")
    batch_size = opts.batch_size or train.batch_size
    lr = opts.lr or train.lr
    backend: Backend
    if opts.evaluator == "weight_sharing":
        backend = WeightSharingBackend(
            shape.space,
            data.train,
            data.val,
            budget=opts.budget,
            channels=shape.channels,
            layers=shape.layers,
            num_classes=shape.num_classes,
            in_channels=shape.in_channels,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=opts.warmup_steps,
            steps_per_eval=opts.steps_per_eval,
            val_batches=opts.val_batches,
            device=device,
            seed=seed,
        )
    else:
        backend = ShortTrainingBackend(
            shape.space,
            functools.partial(derived_network, shape),  # picklable: travels to Ray workers
            data.train,
            data.val,
            epochs=opts.short_epochs,
            batch_size=batch_size,
            lr=lr,
            train_limit=opts.short_train_limit,
            device=device,
            seed=seed,
        )
    return CandidateEvaluator(shape.space, backend, opts.budget, workers=workers or ScoringWorkers())


def plot_history(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """Best validation accuracy so far against the number of evaluations, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, best in curves.items():
        ax.plot(range(1, len(best) + 1), best, label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SampleSearchPass(Pass):
    """Base of the sample-based search passes; subclasses set ``name`` and implement ``search``."""

    Options: ClassVar[type] = SampleSearchOptions
    method: ClassVar[str] = ""

    def search(
        self, space: SearchSpace, evaluator: CandidateEvaluator, ctx: Context, checkpoint: SearchCheckpoint
    ) -> dict[str, Any]:
        """Run the method until ``evaluator`` is exhausted; returns method-specific summary values.

        The method saves its state through ``checkpoint`` at every batch boundary and, when the
        run resumes, starts from the newest saved boundary.
        """
        raise NotImplementedError

    def initial_network(self, shape: SpaceShape, arch: Arch, ctx: Context) -> nn.Module:
        """The best architecture's network, initialized from ``--seed`` alone (never the global RNG)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator(f"{self.name}.derived")))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = derived_network(shape, arch)
        return model.to(ctx.device)

    def rng(self, ctx: Context) -> random.Random:
        """A Python RNG for discrete choices, seeded from ``--seed`` and the pass name."""
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=ctx.generator(f"{self.name}.rng"))))

    def run(self, ir: IR, ctx: Context) -> IR:
        opts: SampleSearchOptions = self.options
        if ctx.data is None:
            raise BadInputError(f"pass '{self.name}' evaluates candidates on data: give --data")
        shape = space_of(ir, opts.channels, opts.layers)
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator(f"{self.name}.evaluator")))
        workers = ScoringWorkers(
            workers=ctx.workers, ray_address=ctx.ray_address, threads=ctx.threads, seed=seed
        )
        checkpoint = SearchCheckpoint(
            pass_checkpointer(ctx, "search"), {"method": self.name, **dataclasses.asdict(opts)}
        )
        start = time.perf_counter()
        with threads(ctx.threads):
            evaluator = make_evaluator(opts, shape, ctx.data, ctx.train, ctx.device, seed, workers)
            summary = self.search(shape.space, evaluator, ctx, checkpoint)
            best = evaluator.best()
            model = self.initial_network(shape, best.arch, ctx)
            epochs = ctx.train.epochs if opts.final_epochs < 0 else opts.final_epochs
            if epochs > 0:
                from fxsculpt.training.loop import train_model

                settings = TrainSettings(
                    epochs=epochs,
                    batch_size=ctx.train.batch_size,
                    lr=ctx.train.lr,
                    progress=ctx.train.progress,
                )
                train_model(
                    model,
                    ctx.data.train,
                    settings,
                    ctx.device,
                    ctx.generator(f"{self.name}.final"),
                    desc=f"{self.name} final",
                    checkpoint=pass_checkpointer(ctx, "final"),
                )
        seconds = time.perf_counter() - start
        model.eval()
        genotype = shape.space.to_genotype(best.arch)
        ctx.stage("genotype.json").write_text(json.dumps(genotype_to_json(genotype), indent=2) + "\n")
        history = {
            "method": self.name,
            "evaluator": opts.evaluator,
            "budget": opts.budget,
            "evaluations": evaluator.used,
            "space": {
                "nodes": shape.space.steps,
                "ops": list(shape.space.ops),
                "channels": shape.channels,
                "layers": shape.layers,
            },
            "best": best.as_dict(shape.space) | {"genotype": genotype_to_json(genotype)},
            "summary": summary,
            "seconds": round(seconds, 2),
            "history": [r.as_dict(shape.space) for r in evaluator.history],
        }
        ctx.stage("history.json").write_text(json.dumps(history, indent=2) + "\n")
        files = ["genotype.json", "history.json"]
        if opts.plots:
            curve = [r.best for r in evaluator.history]
            plot_history({self.name: curve}, ctx.stage("search.png"), f"{self.name}: {opts.evaluator}")
            files.append("search.png")
        ctx.section(
            self.name,
            {k: v for k, v in history.items() if k != "history"} | {"files": files, "final_epochs": epochs},
        )
        ctx.record(
            evaluator=opts.evaluator,
            evaluations=evaluator.used,
            best_val_accuracy=round(best.score, 4),
            best_found_at=best.index,
            final_epochs=epochs,
        )
        out = IR.from_module(model, ir.input_shape, ir.num_classes, source=f"{ir.source} -> {self.name}")
        return out
