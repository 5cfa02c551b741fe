"""An LSTM controller trained with REINFORCE (Zoph & Le, ICLR 2017), ENAS micro settings.

The controller (Pham et al. 2018, "ENAS", sec. 2.3 and the micro controller of the official
code) samples the same token sequence as every other method: per intermediate node two
inputs, chosen by attention over the LSTM states ("anchors") of the earlier nodes, then two
ops, chosen by a softmax over the op vocabulary; the normal cell first, the reduction cell
continuing from the LSTM state the normal cell left. Settings follow the ENAS CIFAR-10 micro
search: one LSTM layer of 64 units, logits squashed as ``c * tanh(l)`` with ``c = 1.1`` for
inputs and ``c / 2.5`` for ops, an entropy bonus of 1e-4 added to the reward, a moving-average
baseline with decay 0.99, Adam with learning rate 3.5e-3.

REINFORCE (Williams 1992; Zoph & Le eq. 2): ``∇J ≈ (R − b) ∇ log p(a)``, minimized as
``−(R − b) · log p(a)``, with ``b ← b − (1 − decay)(b − R)`` updated before the advantage is
taken (as ENAS does). One deviation, for short budgets: the baseline starts at the first
reward instead of 0, since with decay 0.99 a zero start takes hundreds of samples to wash out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxsculpt.nas.sample.checkpointing import SearchCheckpoint, Tracked
from fxsculpt.nas.sample.encoding import Arch, SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator, threads


@dataclass
class ControllerSettings:
    """ENAS micro-search controller settings (official CIFAR-10 script)."""

    lstm_size: int = 64
    tanh_constant: float = 1.1
    op_tanh_reduce: float = 2.5
    entropy_weight: float = 1e-4
    baseline_decay: float = 0.99
    lr: float = 3.5e-3
    aggregate: int = 1  # samples whose gradients are summed per Adam step (ENAS uses 10)


@dataclass
class Sample:
    """One sampled architecture with its log-probability and entropy (both differentiable sums)."""

    arch: Arch
    log_prob: torch.Tensor
    entropy: torch.Tensor


class Controller(nn.Module):
    """The ENAS micro controller: an LSTM cell, attention over node anchors, an op softmax."""

    def __init__(self, space: SearchSpace, settings: ControllerSettings | None = None) -> None:
        super().__init__()
        self.space = space
        self.settings = settings or ControllerSettings()
        h = self.settings.lstm_size
        self.lstm = nn.LSTMCell(h, h)
        self.g_emb = nn.Parameter(torch.empty(1, h))
        self.op_emb = nn.Embedding(len(space.ops), h)
        self.attn_1 = nn.Linear(h, h, bias=False)
        self.attn_2 = nn.Linear(h, h, bias=False)
        self.attn_v = nn.Linear(h, 1, bias=False)
        self.op_out = nn.Linear(h, len(space.ops))
        for p in self.parameters():  # ENAS initializes every controller weight U(-0.1, 0.1)
            nn.init.uniform_(p, -0.1, 0.1)

    def _input_logits(self, h: torch.Tensor, anchors_w: list[torch.Tensor]) -> torch.Tensor:
        query = torch.tanh(torch.cat(anchors_w, 0) + self.attn_2(h))
        logits = self.attn_v(query).view(1, -1)
        return self.settings.tanh_constant * torch.tanh(logits)

    def _op_logits(self, h: torch.Tensor) -> torch.Tensor:
        c = self.settings.tanh_constant / self.settings.op_tanh_reduce
        return c * torch.tanh(self.op_out(h))

    def _cell(
        self,
        state: tuple[torch.Tensor, torch.Tensor],
        generator: torch.Generator | None,
        forced: list[int] | None,
    ) -> tuple[
        list[tuple[int, int, int, int]], torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]
    ]:
        """Sample (or score, given ``forced`` plain indices) one cell; returns nodes, log p, entropy, state."""
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        anchors: list[torch.Tensor] = []
        anchors_w: list[torch.Tensor] = []
        inputs: torch.Tensor = self.g_emb
        for _ in range(2):  # the two cell inputs: zero anchors, as in ENAS
            state = self.lstm(inputs, state)
            anchors.append(torch.zeros_like(state[0]))
            anchors_w.append(self.attn_1(state[0]))
        nodes = []
        cursor = 0
        for _i in range(self.space.steps):
            picks: list[int] = []
            for kind in ("input", "input", "op", "op"):
                state = self.lstm(inputs, state)
                logits = (
                    self._input_logits(state[0], anchors_w) if kind == "input" else self._op_logits(state[0])
                )
                log_p = F.log_softmax(logits, dim=-1)
                if forced is not None:
                    index = forced[cursor]
                else:
                    index = int(torch.multinomial(log_p.exp(), 1, generator=generator))
                cursor += 1
                log_prob = log_prob + log_p[0, index]
                entropy = entropy - (log_p.exp() * log_p).sum().detach()
                picks.append(index)
                inputs = anchors[index] if kind == "input" else self.op_emb.weight[index : index + 1]
            state = self.lstm(inputs, state)
            anchors.append(state[0])
            anchors_w.append(self.attn_1(state[0]))
            inputs = self.g_emb
            nodes.append((picks[0], picks[2], picks[1], picks[3]))
        return nodes, log_prob, entropy, state

    def _run(self, generator: torch.Generator | None, arch: Arch | None) -> Sample:
        h = self.settings.lstm_size
        state = (torch.zeros(1, h), torch.zeros(1, h))
        cells = []
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        for c in range(2):
            forced = None
            if arch is not None:  # sampling order per node: input1, input2, op1, op2
                forced = [v for in1, op1, in2, op2 in arch[c] for v in (in1, in2, op1, op2)]
            nodes, lp, ent, state = self._cell(state, generator, forced)
            cells.append(tuple(nodes))
            log_prob = log_prob + lp
            entropy = entropy + ent
        return Sample(Arch(cells[0], cells[1]), log_prob, entropy)

    def sample(self, generator: torch.Generator | None = None) -> Sample:
        """Draw an architecture; ``log_prob`` keeps its graph for the REINFORCE update."""
        return self._run(generator, None)

    def log_prob(self, arch: Arch) -> torch.Tensor:
        """log p(arch) under the controller (differentiable)."""
        return self._run(None, arch).log_prob


class Reinforce:
    """REINFORCE with a moving-average baseline and an entropy bonus in the reward (ENAS)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.settings = controller.settings
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=self.settings.lr)
        self.baseline: float | None = None
        self.pending = 0
        self.optimizer.zero_grad(set_to_none=True)

    def update(self, sample: Sample, score: float) -> float:
        """Accumulate one sample's policy gradient; steps Adam every ``aggregate`` samples. Returns R − b."""
        reward = score + self.settings.entropy_weight * float(sample.entropy)
        if self.baseline is None:
            self.baseline = reward
        self.baseline -= (1.0 - self.settings.baseline_decay) * (self.baseline - reward)
        advantage = reward - self.baseline
        loss = -advantage * sample.log_prob
        loss.backward()
        self.pending += 1
        if self.pending >= self.settings.aggregate:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = 0
        return advantage

    def state_dict(self) -> dict[str, Any]:
        """The baseline and the gradients accumulated towards the next Adam step (if any)."""
        grads = [p.grad.clone() if p.grad is not None else None for p in self.controller.parameters()]
        return {"baseline": self.baseline, "pending": self.pending, "grads": grads if self.pending else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self.pending = int(state["pending"])
        for param, grad in zip(self.controller.parameters(), state["grads"]):
            param.grad = None if grad is None else grad.clone()


def reinforce_search(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    generator: torch.Generator,
    settings: ControllerSettings | None = None,
    controller: Controller | None = None,
    *,
    checkpoint: SearchCheckpoint | None = None,
) -> Controller:
    """Sample, evaluate and reinforce until the budget is spent; returns the trained controller.

    ``controller`` continues training a given controller (its own settings then apply).

    Each step samples ``aggregate`` architectures from the current policy (ENAS's batch of
    samples per controller update), evaluates them together (in parallel with several
    workers), then accumulates their policy gradients, which ends in one Adam step. With
    weight sharing the supernet trains on architectures the controller itself samples (ENAS's
    alternating scheme), one fresh sample per minibatch. With ``checkpoint`` the controller,
    its optimizer, the baseline, the generator and the evaluator are saved after every step.
    """
    if controller is None:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            controller = Controller(space, settings)
    trainer = Reinforce(controller)
    checkpoint = checkpoint or SearchCheckpoint()
    tracked = Tracked(
        modules={"controller": controller},
        optimizers={"controller": trainer.optimizer},
        generators={"controller": generator},
    )
    saved = checkpoint.restore(evaluator, tracked)
    if saved is not None:
        trainer.load_state_dict(saved)

    def sampler() -> Arch:
        with torch.no_grad(), threads(1):
            return controller.sample(generator).arch

    while not evaluator.exhausted:
        with threads(1):
            samples = [controller.sample(generator) for _ in range(trainer.settings.aggregate)]
        scores = evaluator.evaluate([s.arch for s in samples], pool=sampler)
        spent = False
        for sample, score in zip(samples, scores):
            if score is None:  # the budget ran out within this step
                spent = True
                break
            with threads(1):
                trainer.update(sample, score)
        checkpoint.save(evaluator, tracked, trainer.state_dict())
        if spent:
            break
    return controller
