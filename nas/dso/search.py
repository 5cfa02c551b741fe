"""The sparse search: weights by SGD on one half of the data, scales λ by APG on the other.

DSO-NAS (Zhang et al. 2018, section 3.3) minimizes ``L(W, λ) + δ‖W‖² + γ‖λ‖₁`` and, like
DARTS, updates W and λ on two disjoint halves of the training set so the scales are chosen
for generalization rather than fit. W takes an SGD step (momentum, weight decay, gradient
clipping); λ takes one APG step (:class:`nas.dso.apg.APG`), which has no weight decay and
keeps λ ≥ 0. Every ``prune_every`` epochs the structure whose λ reached zero is removed
(:func:`prune_now`), so later epochs are cheaper.

Never losing work: with a :class:`~training.checkpoint.Checkpointer` the whole search state
(weights and λ, the SGD and APG states, the data generator and every RNG, the history, the step
that places the cosine schedule and the budget cuts) is saved after each epoch. The graph itself
changes when structure is removed and cannot be stored as data, so each checkpoint also lists
the removals so far with what they read of the model (:func:`structure_witness`); a resume
replays them on the graph it starts from and continues after the last saved epoch exactly as
an uninterrupted search would on CPU. Under torchrun both halves are sharded per global batch
(:mod:`training.distributed`) and the gradients of W and λ are averaged over the ranks before
their steps, so W, λ and every removal stay identical on every rank.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.errors import BadInputError, RunFailedError, first_line
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.apg import APG
from fxsculpt.nas.dso.dead import apply_dead_structure
from fxsculpt.nas.dso.ranking import CutScore, budget_steps, meet_macs_target
from fxsculpt.nas.dso.shrink import ShrinkReport, shrink
from fxsculpt.training import distributed
from fxsculpt.training.checkpoint import Checkpointer, all_finite, restore_training_state, training_state


def split_halves(dataset: Dataset[Any], generator: torch.Generator) -> tuple[Subset[Any], Subset[Any]]:
    """Two disjoint random halves: one for the weights, one for the scales."""
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=generator).tolist()
    return Subset(dataset, order[: n // 2]), Subset(dataset, order[n // 2 :])


def gate_modules(ir: IR) -> dict[str, Gate]:
    """Every Gate module of the graph by its qualified name (each once)."""
    return {name: m for name, m in ir.gm.named_modules() if isinstance(m, Gate)}


def block_of(ir: IR, gate_name: str) -> str:
    """The block a gate scales: the closest enclosing module that holds MAC-bearing layers.

    For gates the pruner inserted (``dso_gates.*``) the search starts at the layer before the
    gate; for gates built into a model (the supernet's edges) at the gate itself.
    """
    path = gate_name
    if gate_name.startswith("dso_gates."):
        for node in ir.gm.graph.nodes:
            if node.op == "call_module" and str(node.target) == gate_name:
                source = node.args[0]
                if isinstance(source, fx.Node) and source.op == "call_module":
                    path = str(source.target)
                    break
    working = [str(n.target) for n in ir.gm.graph.nodes if n.op == "call_module" and ir.meta(n).macs > 0]
    parts = path.split(".")[:-1]
    while parts:
        prefix = ".".join(parts) + "."
        if any(t.startswith(prefix) for t in working):
            break
        parts = parts[:-1]
    return ".".join(parts)


def adaptive_gammas(ir: IR, gamma: float) -> dict[str, float]:
    """γ per gate scaled by its block's share of the MACs (the adaptive-FLOPs variant, DSO-NAS
    section 3.5): ``γ_b = γ · F_b / mean_b F_b`` so costly blocks are pushed harder to sparsity."""
    ir.propagate()
    names = list(gate_modules(ir))
    blocks = {name: block_of(ir, name) for name in names}
    flops: dict[str, int] = {}
    for block in set(blocks.values()):
        prefix = block + "." if block else ""
        flops[block] = sum(
            ir.meta(n).macs
            for n in ir.gm.graph.nodes
            if n.op == "call_module" and str(n.target).startswith(prefix)
        )
    mean = sum(flops.values()) / max(len(flops), 1)
    if mean <= 0:
        return dict.fromkeys(names, gamma)
    return {name: gamma * flops[blocks[name]] / mean for name in names}


@dataclass
class SearchSettings:
    """The search's knobs (defaults: DSO-NAS's CIFAR search, section 4.1)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9  # μ of APG, and SGD's momentum
    gamma: float = 0.001
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    prune_every: int = 1
    adaptive_flops: bool = False
    #: Stop once the graph has at most this many MACs; if the scales have not got there on
    #: their own by the end, remove the smallest λ until it has (None: pure L1, zeros only).
    macs_target: int | None = None
    #: How λ are compared when they are ranked out for ``macs_target`` (see :mod:`nas.dso.ranking`).
    cut_score: CutScore = "relative"
    #: Reach ``macs_target`` gradually, in this many cuts spread over the search (0: only at the
    #: end); the search then runs all its epochs, the last part with the final structure.
    budget_points: int = 0
    progress: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def checkpoint_config(
        self, weights_size: int, scales_size: int | None, start_macs: int, scales: int
    ) -> dict[str, Any]:
        """The settings a saved search depends on: a resume with other values is refused."""
        return {
            "kind": "dso-search",
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "gamma": self.gamma,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "prune_every": self.prune_every,
            "adaptive_flops": self.adaptive_flops,
            "macs_target": self.macs_target,
            "cut_score": self.cut_score,
            "budget_points": self.budget_points,
            "scale_batches": "joint" if scales_size is None else "split",
            "weights_size": weights_size,
            "scales_size": scales_size,
            "start_macs": start_macs,
            "scales": scales,
            "world_size": distributed.world_size(),
        }


@dataclass
class SearchResult:
    history: list[dict[str, float]] = field(default_factory=list)
    shrinks: list[ShrinkReport] = field(default_factory=list)
    zeroed_gates: int = 0
    #: λ entries set to zero by magnitude to meet ``macs_target`` (0 when the L1 got there).
    ranked_out: int = 0
    stopped_early: bool = False

    def state(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {
            "history": [dict(h) for h in self.history],
            "shrinks": [asdict(r) for r in self.shrinks],
            "zeroed_gates": self.zeroed_gates,
            "ranked_out": self.ranked_out,
            "stopped_early": self.stopped_early,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SearchResult:
        return cls(
            history=[dict(h) for h in state["history"]],
            shrinks=[ShrinkReport(**r) for r in state["shrinks"]],
            zeroed_gates=int(state["zeroed_gates"]),
            ranked_out=int(state["ranked_out"]),
            stopped_early=bool(state["stopped_early"]),
        )


def weight_optimizer(ir: IR, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the weights only: λ (and other architecture parameters) are not in it."""
    return torch.optim.SGD(ir.weight_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def scale_optimizer(ir: IR, settings: SearchSettings) -> APG | None:
    """APG over every gate's λ, γ per gate (adaptive-FLOPs scaled when asked); None without gates."""
    gates = gate_modules(ir)
    if not gates:
        return None
    gammas = adaptive_gammas(ir, settings.gamma) if settings.adaptive_flops else {}
    groups = [
        {"params": [gate.lam], "gamma": gammas.get(name, settings.gamma)} for name, gate in gates.items()
    ]
    return APG(groups, lr=settings.lr, momentum=settings.momentum, gamma=settings.gamma)


def _carry_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Keep momentum buffers of parameters that survived a shrink unchanged."""
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]


def _rebuilt_optimizers(
    ir: IR, settings: SearchSettings, lr: float, opt_w: torch.optim.SGD, opt_l: APG | None
) -> tuple[torch.optim.SGD, APG | None]:
    """Optimizers over the parameters of the graph after a shrink, with surviving state kept."""
    new_w = weight_optimizer(ir, lr, settings.momentum, settings.weight_decay)
    new_l = scale_optimizer(ir, settings)
    _carry_state(opt_w, new_w)
    if opt_l is not None and new_l is not None:
        _carry_state(opt_l, new_l)
    return new_w, new_l


def prune_now(ir: IR) -> tuple[ShrinkReport, int]:
    """Dead-structure propagation, then physical removal; returns the shrink report and how many
    gates the propagation zeroed."""
    dead = apply_dead_structure(ir)
    return shrink(ir), len(dead.zeroed_gates)


# -- rebuilding the pruned structure on resume -----------------------------------------------------

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def structure_witness(ir: IR) -> dict[str, dict[str, torch.Tensor]]:
    """What a removal reads of the model's values, small enough to keep one per removal.

    Dead-structure propagation, the shrink's zero analysis and the ranking for a MAC budget read
    λ, BatchNorm parameters and statistics, biases, and of a Conv/Linear weight only which
    (output, input) kernels are entirely zero (:mod:`nas.dso.channels`). So every tensor is kept
    as it is except those weights, of which the flat indices of the zero kernels are kept.
    """
    layer_weights = {f"{name}.weight" for name, m in ir.gm.named_modules() if isinstance(m, _LAYERS)}
    exact: dict[str, torch.Tensor] = {}
    zero_kernels: dict[str, torch.Tensor] = {}
    for key, value in ir.gm.state_dict().items():
        if key in layer_weights and value.dim() >= 2:
            w = value.detach()
            kernel_max = w.reshape(w.shape[0] * w.shape[1], -1).abs().amax(dim=1)
            zero_kernels[key] = (kernel_max == 0).nonzero().flatten().cpu()
        else:
            exact[key] = value.detach().cpu().clone()
    return {"exact": exact, "zero_kernels": zero_kernels}


def load_witness(ir: IR, witness: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Give ``ir`` values for which a removal decides as it did when ``witness`` was taken
    (Conv/Linear weights become ones with the recorded kernels at zero)."""
    state: dict[str, torch.Tensor] = {}
    try:
        for key, value in ir.gm.state_dict().items():
            if key in witness["zero_kernels"]:
                stand_in = torch.ones_like(value)
                stand_in.view(value.shape[0] * value.shape[1], -1)[
                    witness["zero_kernels"][key].to(value.device)
                ] = 0
                state[key] = stand_in
            else:
                state[key] = witness["exact"][key]
        ir.gm.load_state_dict(state)
    except (KeyError, RuntimeError, IndexError) as exc:
        detail = first_line(exc)
        raise BadInputError(
            f"the checkpoint's pruned structure cannot be rebuilt on this model ({detail}); "
            "resume with the same command"
        ) from exc


def _structure(ir: IR) -> dict[str, Any]:
    """The graph's code and parameter shapes: what a resumed graph must match."""
    return {
        "code": ir.gm.code,
        "shapes": {k: list(v.shape) for k, v in ir.gm.state_dict().items()},
    }


def _replay(ir: IR, removals: list[dict[str, Any]], cut_score: CutScore) -> None:
    """Apply the saved removals, in order, to the graph the search started from."""
    for removal in removals:
        load_witness(ir, removal["witness"])
        if removal["kind"] == "cut":
            meet_macs_target(ir, int(removal["macs"]), cut_score)
        else:
            prune_now(ir)


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def _loader(
    dataset: Dataset[Any], batch_size: int, generator: torch.Generator, make_loader: Callable[..., Any] | None
) -> Any:
    """Shuffled batches from ``generator`` (this rank's shards of each global batch under torchrun)."""
    if make_loader is not None and distributed.active() is None:
        return make_loader(dataset, batch_size, True, generator, drop_last=True)
    return distributed.shuffled_loader(dataset, batch_size, generator, drop_last=True)


def search(
    ir: IR,
    weights_half: Dataset[Any],
    scales_half: Dataset[Any] | None,
    settings: SearchSettings,
    generator: torch.Generator,
    make_loader: Callable[..., Any] | None = None,
    on_prune: Callable[[ShrinkReport], None] | None = None,
    *,
    checkpoint: Checkpointer | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> SearchResult:
    """Alternate one SGD step on W (``weights_half``) and one APG step on λ (``scales_half``).

    With ``scales_half=None`` both steps use the gradient of one batch of ``weights_half``
    (joint training, as Sparse Structure Selection does): one forward/backward per step instead
    of two, and the weights see all of the data.

    Cosine-annealed learning rate for both (as the DARTS/DSO CIFAR searches do); after every
    ``prune_every`` epochs and at the end, dead structure is removed from ``ir`` in place.

    ``make_loader(dataset, batch, shuffle, generator, drop_last=)`` builds the one-process
    loaders (default: :func:`training.distributed.shuffled_loader`, which under torchrun always
    serves). With ``checkpoint`` the state is saved after every epoch and a resuming checkpointer
    continues after the last saved one (see the module docstring); ``on_epoch`` is called after
    each epoch run in this call. A non-finite loss, or weights that are no longer finite at an
    epoch's end, stop the search with :class:`RunFailedError` before anything is saved.
    """
    result = SearchResult()
    device = settings.device
    ir.gm.to(device)
    n_weights = len(weights_half)  # type: ignore[arg-type]
    n_scales = len(scales_half) if scales_half is not None else None  # type: ignore[arg-type]
    start_macs = ir.mac_count()
    config = settings.checkpoint_config(
        n_weights, n_scales, start_macs, sum(g.lam.numel() for g in gate_modules(ir).values())
    )
    loader_w = _loader(weights_half, settings.batch_size, generator, make_loader)
    loader_s = None
    if scales_half is not None:
        loader_s = _loader(scales_half, settings.batch_size, generator, make_loader)
    steps_per_epoch = len(loader_w)
    total = max(1, settings.epochs * steps_per_epoch)
    gradual = settings.macs_target is not None and settings.budget_points > 0
    schedule = budget_steps(total, settings.budget_points) if gradual else {}
    step = 0
    first_epoch = 1
    lr = settings.lr
    #: Every removal so far with its witness, replayed by a resume (see :func:`structure_witness`).
    removals: list[dict[str, Any]] = []
    saved = checkpoint.load_latest(config) if checkpoint is not None else None
    if saved is not None:
        assert checkpoint is not None
        removals = list(saved["extra"]["removals"])
        _replay(ir, removals, settings.cut_score)
        if _structure(ir) != saved["extra"]["structure"]:
            raise BadInputError(
                f"the pruned structure saved in {checkpoint.folder} cannot be rebuilt on this model; "
                "resume with the same command, or start afresh in another output folder"
            )
    else:
        distributed.broadcast_parameters(list(ir.gm.parameters()))
        distributed.broadcast_buffers(ir.gm)
    ir.gm.to(device)
    ir.gm.train()
    opt_w = weight_optimizer(ir, settings.lr, settings.momentum, settings.weight_decay)
    opt_l = scale_optimizer(ir, settings)
    if saved is not None:
        extra = restore_training_state(
            saved,
            modules={"model": ir.gm},
            optimizers={"weights": opt_w, "scales": opt_l},
            generators={"data": generator},
        )
        result = SearchResult.from_state(extra["result"])
        step = int(extra["step"])
        first_epoch = int(extra["epoch"]) + 1
        lr = float(extra["lr"])
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(first_epoch, settings.epochs + 1):
        if result.stopped_early:
            break  # a resumed search that had already met its budget
        ir.gm.train()
        loss_sum, correct, seen = 0.0, 0, 0
        # Fresh iterators every epoch, so the generator's state at an epoch's end is all a
        # resume needs (the scales half is never shorter than the weights half).
        scales_iter = _cycle(loader_s) if loader_s is not None else None
        bar = tqdm(
            loader_w,
            desc=f"prune search {epoch}/{settings.epochs}",
            unit="batch",
            file=sys.stderr,
            disable=not (settings.progress and distributed.is_main_process()),
            leave=False,
        )
        for batch_index, (x, y) in enumerate(bar, start=1):
            lr = 0.5 * settings.lr * (1 + math.cos(math.pi * step / total))
            for opt in (opt_w, opt_l):
                for group in opt.param_groups if opt is not None else []:
                    group["lr"] = lr
            x, y = x.to(device), y.to(device)
            weights: list[torch.Tensor] = opt_w.param_groups[0]["params"]
            # W step on the weights half (joint: W and λ from this one batch).
            opt_w.zero_grad(set_to_none=True)
            if opt_l is not None:
                opt_l.zero_grad(set_to_none=True)
            logits = ir.gm(x)
            loss = loss_fn(logits, y)
            hits = int((logits.detach().argmax(1) == y).sum())
            value, batch = float(loss.detach()), int(y.shape[0])
            if distributed.active() is not None:
                # The global mean loss on every rank (and the same NaN), global hits and count.
                totals = torch.tensor([value * batch, float(batch), float(hits)], dtype=torch.float64)
                distributed.all_reduce_sum(totals)
                value, batch, hits = float(totals[0] / totals[1]), int(totals[1]), int(totals[2])
            if not math.isfinite(value):
                bar.close()
                raise RunFailedError(
                    f"prune search diverged: loss is {value} at epoch {epoch}, step {batch_index} "
                    f"(lower prune.lr, now {lr:.3g}){_kept(checkpoint)}"
                )
            (loss * distributed.local_loss_scale(len(y))).backward()
            distributed.average_gradients(weights)
            torch.nn.utils.clip_grad_norm_(weights, settings.grad_clip)
            opt_w.step()
            # λ step (the L1 term is the APG's soft threshold): on a batch of the scales half, or
            # jointly with the gradient this batch already gave.
            if opt_l is not None:
                if scales_iter is not None:
                    xs, ys = next(scales_iter)
                    xs, ys = xs.to(device), ys.to(device)
                    opt_w.zero_grad(set_to_none=True)
                    opt_l.zero_grad(set_to_none=True)
                    (loss_fn(ir.gm(xs), ys) * distributed.local_loss_scale(len(ys))).backward()
                scales = [p for group in opt_l.param_groups for p in group["params"]]
                distributed.average_gradients(scales)
                torch.nn.utils.clip_grad_norm_(scales, settings.grad_clip)
                opt_l.step()
            step += 1
            if step in schedule and settings.macs_target is not None:
                allowed = int(start_macs - schedule[step] * (start_macs - settings.macs_target))
                _align(ir)
                witness = structure_witness(ir)
                cut = meet_macs_target(ir, allowed, settings.cut_score)
                removals.append({"kind": "cut", "macs": allowed, "witness": witness})
                if cut:
                    result.ranked_out += cut
                    ir.gm.train()
                    opt_w, opt_l = _rebuilt_optimizers(ir, settings, lr, opt_w, opt_l)
            loss_sum += value * batch
            correct += hits
            seen += batch
        bar.close()
        _align(ir)
        if not all_finite(ir.gm):
            raise RunFailedError(
                f"prune search diverged: the weights or scales are no longer finite after epoch {epoch} "
                f"(lower prune.lr, now {lr:.3g}){_kept(checkpoint)}"
            )
        lams = torch.cat([g.lam.detach().flatten() for g in gate_modules(ir).values()] or [torch.zeros(0)])
        stats = {
            "epoch": float(epoch),
            "loss": loss_sum / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "zero_scales": float((lams == 0).sum()),
            "scales": float(lams.numel()),
        }
        if epoch % max(settings.prune_every, 1) == 0 or epoch == settings.epochs:
            witness = structure_witness(ir)
            report, zeroed = prune_now(ir)
            removals.append({"kind": "prune", "witness": witness})
            result.shrinks.append(report)
            result.zeroed_gates += zeroed
            stats["macs"] = float(ir.mac_count())
            stats["params"] = float(ir.param_count())
            if on_prune is not None:
                on_prune(report)
            opt_w, opt_l = _rebuilt_optimizers(ir, settings, lr, opt_w, opt_l)
        result.history.append(stats)
        reached = settings.macs_target is not None and ir.mac_count() <= settings.macs_target
        if reached and not gradual:
            result.stopped_early = epoch < settings.epochs
        if checkpoint is not None:
            state = training_state(
                modules={"model": ir.gm},
                optimizers={"weights": opt_w, "scales": opt_l},
                generators={"data": generator},
                epoch=epoch,
                step=step,
                lr=lr,
                result=result.state(),
                removals=removals,
                structure=_structure(ir),
            )
            checkpoint.save(epoch, {**state, "config": config})
        if on_epoch is not None:
            on_epoch(epoch, stats)
        if reached and not gradual:
            break
    if settings.macs_target is not None and ir.mac_count() > settings.macs_target:
        result.ranked_out += meet_macs_target(ir, settings.macs_target, settings.cut_score)
    return result


def _align(ir: IR) -> None:
    """Under torchrun, rank 0's BatchNorm statistics and λ on every rank before a removal or a
    checkpoint (gradients are averaged, so W and λ already agree; this guards the decisions)."""
    if distributed.active() is None:
        return
    distributed.broadcast_buffers(ir.gm)
    distributed.broadcast_parameters(ir.arch_parameters())


def _kept(checkpoint: Checkpointer | None) -> str:
    """The clause of a failure message that says which checkpoint survives."""
    if checkpoint is None:
        return ""
    steps = checkpoint.steps()
    return f"; the checkpoint of epoch {steps[-1]} was kept" if steps else "; no epoch had been checkpointed"
