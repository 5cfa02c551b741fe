"""The sparse search: weights by SGD on one half of the data, scales λ by APG on the other.

DSO-NAS (Zhang et al. 2018, section 3.3) minimizes ``L(W, λ) + δ‖W‖² + γ‖λ‖₁`` and, like
DARTS, updates W and λ on two disjoint halves of the training set so the scales are chosen
for generalization rather than fit. W takes an SGD step (momentum, weight decay, gradient
clipping); λ takes one APG step (:class:`nas.dso.apg.APG`), which has no weight decay and
keeps λ ≥ 0. Every ``prune_every`` epochs the structure whose λ reached zero is removed
(:func:`prune_now`), so later epochs are cheaper.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from ir.constructs import Gate
from ir.errors import RunFailedError
from ir.graph import IR
from nas.dso.apg import APG
from nas.dso.dead import apply_dead_structure
from nas.dso.ranking import CutScore, budget_steps, meet_macs_target
from nas.dso.shrink import ShrinkReport, shrink


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


@dataclass
class SearchResult:
    history: list[dict[str, float]] = field(default_factory=list)
    shrinks: list[ShrinkReport] = field(default_factory=list)
    zeroed_gates: int = 0
    #: λ entries set to zero by magnitude to meet ``macs_target`` (0 when the L1 got there).
    ranked_out: int = 0
    stopped_early: bool = False


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


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def search(
    ir: IR,
    weights_half: Dataset[Any],
    scales_half: Dataset[Any] | None,
    settings: SearchSettings,
    generator: torch.Generator,
    make_loader: Callable[..., Any],
    on_prune: Callable[[ShrinkReport], None] | None = None,
) -> SearchResult:
    """Alternate one SGD step on W (``weights_half``) and one APG step on λ (``scales_half``).

    With ``scales_half=None`` both steps use the gradient of one batch of ``weights_half``
    (joint training, as Sparse Structure Selection does): one forward/backward per step instead
    of two, and the weights see all of the data.

    Cosine-annealed learning rate for both (as the DARTS/DSO CIFAR searches do); after every
    ``prune_every`` epochs and at the end, dead structure is removed from ``ir`` in place.
    """
    result = SearchResult()
    device = settings.device
    ir.gm.to(device)
    opt_w = weight_optimizer(ir, settings.lr, settings.momentum, settings.weight_decay)
    opt_l = scale_optimizer(ir, settings)
    loader_w = make_loader(weights_half, settings.batch_size, True, generator, drop_last=True)
    scales_iter = None
    if scales_half is not None:
        scales_iter = _cycle(make_loader(scales_half, settings.batch_size, True, generator, drop_last=True))
    steps_per_epoch = len(loader_w)
    total = max(1, settings.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    gradual = settings.macs_target is not None and settings.budget_points > 0
    schedule = budget_steps(total, settings.budget_points) if gradual else {}
    start_macs = ir.mac_count()
    for epoch in range(1, settings.epochs + 1):
        ir.gm.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            loader_w,
            desc=f"prune search {epoch}/{settings.epochs}",
            unit="batch",
            file=sys.stderr,
            disable=not settings.progress,
            leave=False,
        )
        for x, y in bar:
            lr = 0.5 * settings.lr * (1 + math.cos(math.pi * step / total))
            for opt in (opt_w, opt_l):
                for group in opt.param_groups if opt is not None else []:
                    group["lr"] = lr
            x, y = x.to(device), y.to(device)
            # W step on the weights half (joint: W and λ from this one batch).
            opt_w.zero_grad(set_to_none=True)
            if opt_l is not None:
                opt_l.zero_grad(set_to_none=True)
            logits = ir.gm(x)
            loss = loss_fn(logits, y)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RunFailedError(f"prune search diverged: loss is {value} at epoch {epoch}, step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ir.weight_parameters(), settings.grad_clip)
            opt_w.step()
            # λ step (the L1 term is the APG's soft threshold): on a batch of the scales half, or
            # jointly with the gradient this batch already gave.
            if opt_l is not None:
                if scales_iter is not None:
                    xs, ys = next(scales_iter)
                    xs, ys = xs.to(device), ys.to(device)
                    opt_w.zero_grad(set_to_none=True)
                    opt_l.zero_grad(set_to_none=True)
                    loss_fn(ir.gm(xs), ys).backward()
                torch.nn.utils.clip_grad_norm_(ir.arch_parameters(), settings.grad_clip)
                opt_l.step()
            step += 1
            if step in schedule and settings.macs_target is not None:
                allowed = start_macs - schedule[step] * (start_macs - settings.macs_target)
                cut = meet_macs_target(ir, int(allowed), settings.cut_score)
                if cut:
                    result.ranked_out += cut
                    ir.gm.train()
                    opt_w, opt_l = _rebuilt_optimizers(ir, settings, lr, opt_w, opt_l)
            loss_sum += value * int(y.shape[0])
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += int(y.shape[0])
        bar.close()
        lams = torch.cat([g.lam.detach().flatten() for g in gate_modules(ir).values()] or [torch.zeros(0)])
        stats = {
            "epoch": float(epoch),
            "loss": loss_sum / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "zero_scales": float((lams == 0).sum()),
            "scales": float(lams.numel()),
        }
        if epoch % max(settings.prune_every, 1) == 0 or epoch == settings.epochs:
            report, zeroed = prune_now(ir)
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
            break
    if settings.macs_target is not None and ir.mac_count() > settings.macs_target:
        result.ranked_out += meet_macs_target(ir, settings.macs_target, settings.cut_score)
    return result
