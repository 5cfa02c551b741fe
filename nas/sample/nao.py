"""Neural Architecture Optimization (Luo et al., NeurIPS 2018), on the shared token encoding.

An encoder maps an architecture's token sequence to continuous vectors, a predictor maps
their mean to a score, and a decoder maps the vectors back to the sequence (sec. 3.1-3.3):

- encoder: embedding (48) of every token; pairs of tokens ``(input, op)`` are concatenated
  (the official code's ``source_length / encoder_length = 2``), so a 96-wide LSTM of hidden
  size 96 reads one branch per step; its outputs are L2-normalized per step;
- predictor ``f``: mean-pool the outputs, L2-normalize (the architecture embedding), an MLP of
  3 layers of 200 units (ReLU, dropout 0.1), one linear output and a sigmoid; targets are the
  scores min-max normalized to [0, 1];
- decoder: an LSTM (hidden 96) whose initial state ``(h0, c0)`` is the architecture embedding,
  with attention over the encoder outputs (Luong et al. 2015, "general" dot product and a
  ``tanh`` combination layer); decoding is greedy and restricted to the grammar's tokens at each
  position, so every decoded sequence is a valid architecture (the official decoder restricts
  the index range the same way; here the restriction is also applied in training).

Training minimizes ``λ · MSE(f, y) + (1 − λ) · NLL(decoder)`` with λ = 0.8 (eq. 1 and the
official ``trade_off``), Adam (lr 1e-3, weight decay 1e-4; a fresh optimizer each iteration,
as in the official code), gradient norm 5, with the symmetric augmentation that lists a node's
two branches the other way round (sec. 3.4). The random seed pool is evaluated as one batch, as
NAO-WS scores its whole pool after training the supernet on it. New candidates come from the
best architectures by one gradient step on the encoder outputs, ``h' = h + η ∂f/∂h`` (eq. 2),
re-normalized and decoded, with η = 1, 2, ... raised until enough unseen architectures decode
(official code: up to 50). The pool keeps its size: the new architectures replace the worst
ones, and the encoder-predictor-decoder is trained on the pool again each iteration.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxsculpt.nas.sample.checkpointing import SearchCheckpoint, Tracked, archs_from_tokens, archs_to_tokens
from fxsculpt.nas.sample.encoding import Arch, SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator, threads

SOS = 0  # the start symbol, token 0 of the shared vocabulary


@dataclass
class NAOSettings:
    """NAO's controller settings (official NAO-WS CIFAR-10 scripts) and the search loop's sizes."""

    emb_size: int = 48
    hidden_size: int = 96
    mlp_layers: int = 3
    mlp_hidden_size: int = 200
    mlp_dropout: float = 0.1
    trade_off: float = 0.8
    lr: float = 1e-3
    l2_reg: float = 1e-4
    grad_bound: float = 5.0
    epochs: int = 1000
    batch_size: int = 100
    expand: int = 10  # copies per training architecture, all but one with swapped branches
    top_k: int = 100  # architectures the gradient steps start from
    max_step: int = 50  # largest η tried
    seed_archs: int = 0  # initial pool (0: a third of the budget, at least 2)
    new_archs: int = 0  # new candidates per iteration (0: a sixth of the budget, at least 1)


class NAOModel(nn.Module):
    """Encoder, performance predictor and attention decoder over one token vocabulary."""

    grammar_mask: torch.Tensor

    def __init__(self, space: SearchSpace, settings: NAOSettings | None = None) -> None:
        super().__init__()
        s = settings or NAOSettings()
        self.space = space
        self.settings = s
        if 2 * s.emb_size != s.hidden_size:
            raise ValueError("NAO reads two tokens per encoder step: hidden_size must be 2 * emb_size")
        self.embedding = nn.Embedding(space.vocab_size, s.emb_size)
        self.encoder = nn.LSTM(s.hidden_size, s.hidden_size, batch_first=True)
        layers: list[nn.Module] = []
        width = s.hidden_size
        for _ in range(s.mlp_layers):
            layers += [nn.Linear(width, s.mlp_hidden_size), nn.ReLU(), nn.Dropout(s.mlp_dropout)]
            width = s.mlp_hidden_size
        self.mlp = nn.Sequential(*layers)
        self.regressor = nn.Linear(width, 1)
        self.dec_embedding = nn.Embedding(space.vocab_size, s.hidden_size)
        self.decoder = nn.LSTM(s.hidden_size, s.hidden_size, batch_first=True)
        self.attn_combine = nn.Linear(2 * s.hidden_size, s.hidden_size)
        self.out = nn.Linear(s.hidden_size, space.vocab_size)
        mask = torch.full((space.length, space.vocab_size), float("-inf"))
        for p in range(space.length):
            mask[p, space.allowed_tokens(p)] = 0.0
        self.register_buffer("grammar_mask", mask)

    # -- encoder and predictor ------------------------------------------------------------
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-step encoder outputs, L2-normalized: ``(batch, length / 2, hidden)``."""
        emb = self.embedding(tokens)
        emb = emb.reshape(tokens.shape[0], tokens.shape[1] // 2, 2 * emb.shape[-1])
        out, _ = self.encoder(emb)
        return F.normalize(out, p=2, dim=-1)

    @staticmethod
    def arch_embedding(outputs: torch.Tensor) -> torch.Tensor:
        """Mean over steps, L2-normalized: the architecture's embedding."""
        return F.normalize(outputs.mean(dim=1), p=2, dim=-1)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The predictor ``f``: sigmoid(MLP(embedding)), one value per architecture."""
        return torch.sigmoid(self.regressor(self.mlp(self.arch_embedding(outputs)))).squeeze(-1)

    # -- decoder --------------------------------------------------------------------------
    def _decode_step(
        self,
        token: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        outputs: torch.Tensor,
        position: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.decoder(self.dec_embedding(token).unsqueeze(1), state)
        logits = self.out(self._attend(out, outputs).squeeze(1)) + self.grammar_mask[position]
        return F.log_softmax(logits, dim=-1), state

    def _initial_state(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.arch_embedding(outputs).unsqueeze(0)
        return emb.contiguous(), emb.contiguous()

    def _attend(self, out: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Luong attention over the encoder outputs and the ``tanh`` combination layer."""
        attn = torch.softmax(torch.bmm(out, outputs.transpose(1, 2)), dim=-1)
        context = torch.bmm(attn, outputs)
        return torch.tanh(self.attn_combine(torch.cat([context, out], dim=-1)))

    def decode_teacher(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of every position given the true previous token: ``(batch, length, vocab)``.

        With the previous tokens known, the decoder LSTM runs over the whole sequence in one call.
        """
        start = torch.full((target.shape[0], 1), SOS, dtype=torch.long, device=target.device)
        previous = torch.cat([start, target[:, :-1]], dim=1)
        out, _ = self.decoder(self.dec_embedding(previous), self._initial_state(outputs))
        logits = self.out(self._attend(out, outputs)) + self.grammar_mask.unsqueeze(0)
        return F.log_softmax(logits, dim=-1)

    def decode_greedy(self, outputs: torch.Tensor) -> torch.Tensor:
        """The most likely token at each position, within the grammar: ``(batch, length)``."""
        state = self._initial_state(outputs)
        previous = torch.full((outputs.shape[0],), SOS, dtype=torch.long, device=outputs.device)
        tokens = []
        for position in range(self.space.length):
            log_p, state = self._decode_step(previous, state, outputs, position)
            previous = log_p.argmax(dim=-1)
            tokens.append(previous)
        return torch.stack(tokens, dim=1)

    def loss(
        self, tokens: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``λ·MSE + (1 − λ)·NLL`` (Luo et al. 2018, eq. 1), with its two parts."""
        outputs = self.encode(tokens)
        mse = F.mse_loss(self.predict(outputs), targets)
        log_probs = self.decode_teacher(outputs, tokens)
        nll = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), tokens.reshape(-1))
        lam = self.settings.trade_off
        return lam * mse + (1.0 - lam) * nll, mse, nll

    def improve(self, tokens: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One gradient step on the encoder outputs, ``h' = h + η ∂f/∂h`` (eq. 2), re-normalized.

        Returns the new outputs, ``f`` before and ``f`` after the step.
        """
        was_training = self.training
        self.eval()
        try:
            outputs = self.encode(tokens).detach().requires_grad_(True)
            before = self.predict(outputs)
            (grad,) = torch.autograd.grad(before.sum(), outputs)
            new_outputs = F.normalize(outputs + step * grad, p=2, dim=-1).detach()
            with torch.no_grad():
                after = self.predict(new_outputs)
        finally:
            self.train(was_training)
        return new_outputs, before.detach(), after

    def generate(self, tokens: torch.Tensor, step: float) -> torch.Tensor:
        """Decode the improved embeddings of ``tokens`` (greedy, grammar-restricted)."""
        new_outputs, _, _ = self.improve(tokens, step)
        with torch.no_grad():
            return self.decode_greedy(new_outputs)


def normalized_targets(scores: Sequence[float]) -> list[float]:
    """Min-max normalization to [0, 1] (NAO's predictor targets); all equal -> 0.5."""
    low, high = min(scores), max(scores)
    if high - low < 1e-12:
        return [0.5 for _ in scores]
    return [(s - low) / (high - low) for s in scores]


def augmented(
    space: SearchSpace, archs: Sequence[Arch], targets: Sequence[float], expand: int, rng: random.Random
) -> tuple[list[Arch], list[float]]:
    """Each architecture plus ``expand - 1`` copies with one node per cell swapped (NAO sec. 3.4)."""
    out_archs, out_targets = list(archs), list(targets)
    for _ in range(max(expand, 1) - 1):
        for arch, target in zip(archs, targets):
            a, b = rng.randrange(space.steps), rng.randrange(space.steps)
            out_archs.append(space.swap_inputs(arch, a, b))
            out_targets.append(target)
    return out_archs, out_targets


def train_nao(
    model: NAOModel,
    archs: Sequence[Arch],
    scores: Sequence[float],
    generator: torch.Generator,
    epochs: int | None = None,
) -> dict[str, float]:
    """Train encoder, predictor and decoder jointly on ``archs`` with min-max-normalized ``scores``."""
    s = model.settings
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    train_archs, train_targets = augmented(model.space, archs, normalized_targets(scores), s.expand, rng)
    tokens = torch.tensor([model.space.to_tokens(a) for a in train_archs], dtype=torch.long)
    targets = torch.tensor(train_targets, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.l2_reg)
    model.train()
    stats = {"loss": float("nan"), "mse": float("nan"), "nll": float("nan")}
    with threads(1), torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))  # dropout
        for _ in range(s.epochs if epochs is None else epochs):
            order = torch.randperm(len(tokens), generator=generator)
            for start in range(0, len(tokens), s.batch_size):
                index = order[start : start + s.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss, mse, nll = model.loss(tokens[index], targets[index])
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), s.grad_bound)
                optimizer.step()
                stats = {"loss": loss.item(), "mse": mse.item(), "nll": nll.item()}
    model.eval()
    return stats


def propose(
    model: NAOModel, evaluator: CandidateEvaluator, top: Sequence[Arch], count: int
) -> tuple[list[Arch], float]:
    """Up to ``count`` unseen architectures decoded from ``top`` with η = 1, 2, ..., ``max_step``.

    Returns them and the last η tried.
    """
    space = model.space
    tokens = torch.tensor([space.to_tokens(a) for a in top], dtype=torch.long)
    found: list[Arch] = []
    keys: set[Arch] = set()
    step = 0.0
    while len(found) < count and step < model.settings.max_step:
        step += 1.0
        with threads(1):
            rows = model.generate(tokens, step).tolist()
        for row in rows:
            arch = space.from_tokens(row)  # grammar-restricted decoding: always valid
            key = space.canonical(arch)
            if not evaluator.seen(arch) and key not in keys:
                found.append(arch)
                keys.add(key)
            if len(found) >= count:
                break
    return found, step


def seed_pool(
    space: SearchSpace, evaluator: CandidateEvaluator, rng: random.Random, count: int
) -> list[Arch]:
    """Up to ``count`` distinct unseen random architectures, evaluated together; those that got a score.

    NAO-WS trains the supernet on its whole random seed pool and then scores every member, so
    the seed pool is one batch (evaluated in parallel with several workers).
    """
    want = min(count, evaluator.remaining)
    archs: list[Arch] = []
    keys: set[Arch] = set()
    attempts = 0
    while len(archs) < want and attempts < 100 * want:  # a tiny space may have fewer unseen ones
        attempts += 1
        arch = space.random_arch(rng)
        key = space.canonical(arch)
        if not evaluator.seen(arch) and key not in keys:
            archs.append(arch)
            keys.add(key)
    scores = evaluator.evaluate(archs, pool=archs)
    return [a for a, score in zip(archs, scores) if score is not None]


def nao_search(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    generator: torch.Generator,
    settings: NAOSettings | None = None,
    *,
    checkpoint: SearchCheckpoint | None = None,
) -> dict[str, float]:
    """NAO's loop until the budget is spent: evaluate the pool, train, step, decode, replace.

    Each iteration's new architectures are evaluated together (in parallel with several
    workers). With ``checkpoint`` the encoder-predictor-decoder, the pool, the counters, the
    generator and the evaluator are saved after the seed pool and after every iteration; a
    resumed run continues there. (Like the official code, every iteration trains with a fresh
    Adam optimizer, so no optimizer state crosses a boundary.)

    Returns a summary (iterations, random fills when decoding found too few unseen ones).
    """
    s = settings or NAOSettings()
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    seed_count = s.seed_archs or max(2, evaluator.budget // 3)
    new_count = s.new_archs or max(1, evaluator.budget // 6)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        model = NAOModel(space, s)
    checkpoint = checkpoint or SearchCheckpoint()
    tracked = Tracked(modules={"nao": model}, generators={"nao": generator}, rngs={"nao": rng})

    def state() -> dict[str, Any]:
        return {
            "pool": archs_to_tokens(space, pool),
            "iterations": iterations,
            "random_fills": fills,
            "last_step_size": last_step,
        }

    saved = checkpoint.restore(evaluator, tracked)
    if saved is not None:
        pool = archs_from_tokens(space, saved["pool"])
        iterations, fills = int(saved["iterations"]), int(saved["random_fills"])
        last_step = float(saved["last_step_size"])
    else:
        pool = seed_pool(space, evaluator, rng, seed_count)
        iterations = fills = 0
        last_step = 0.0
        checkpoint.save(evaluator, tracked, state())
    while not evaluator.exhausted:
        iterations += 1
        scores = [evaluator.cached_score(a) or 0.0 for a in pool]
        order = sorted(range(len(pool)), key=lambda i: -scores[i])
        pool = [pool[i] for i in order]
        scores = [scores[i] for i in order]
        train_nao(model, pool, scores, generator)
        want = min(new_count, evaluator.remaining)
        new, last_step = propose(model, evaluator, pool[: s.top_k], want)
        while len(new) < want:  # decoding found too few unseen ones: fill from the grammar
            arch = space.random_arch(rng)
            if not evaluator.seen(arch) and arch not in new:
                new.append(arch)
                fills += 1
        evaluator.evaluate(new, pool=pool + new)
        pool = pool[: max(len(pool) - len(new), 0)] + new
        checkpoint.save(evaluator, tracked, state())
    return {"iterations": iterations, "random_fills": fills, "last_step_size": last_step}
