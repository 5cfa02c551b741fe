"""NAO, the RL controller, regularized evolution and random search on synthetic rewards."""

from __future__ import annotations

import itertools
import math
import random

import torch

from fxsculpt.nas.sample.encoding import Arch, SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator, FunctionBackend, threads
from fxsculpt.nas.sample.evolution import regularized_evolution
from fxsculpt.nas.sample.nao import NAOModel, NAOSettings, nao_search, propose, train_nao
from fxsculpt.nas.sample.random_search import random_search
from fxsculpt.nas.sample.rl import Controller, reinforce_search

SMALL = SearchSpace(steps=2, ops=("skip_connect", "sep_conv_3x3", "max_pool_3x3"))


def grammar_ok(space: SearchSpace, tokens: list[int]) -> bool:
    """The grammar written out by hand: node i's input tokens are 1..i+2, op tokens follow the inputs."""
    n_in = space.steps + 1
    return len(tokens) == 8 * space.steps and all(
        (1 <= t <= (p // 4) % space.steps + 2) if p % 2 == 0 else (n_in < t <= n_in + len(space.ops))
        for p, t in enumerate(tokens)
    )


def matching_reward(space: SearchSpace, target: Arch):  # type: ignore[no-untyped-def]
    """Fraction of tokens (canonical form) equal to the target's: 1.0 exactly at the target."""
    want = space.to_tokens(space.canonical(target))

    def reward(arch: Arch) -> float:
        got = space.to_tokens(space.canonical(arch))
        return sum(a == b for a, b in zip(got, want)) / len(want)

    return reward


def first_hit(evaluator: CandidateEvaluator) -> int:
    """Evaluations until the reward reached 1.0 (budget + 1 if never)."""
    return next((r.index for r in evaluator.history if r.score == 1.0), evaluator.budget + 1)


def test_evaluator_caches_by_architecture_and_spends_the_budget_once() -> None:
    calls: list[Arch] = []
    evaluator = CandidateEvaluator(SMALL, FunctionBackend(lambda a: calls.append(a) or 0.5), budget=3)
    rng = random.Random(0)
    a, b = SMALL.random_arch(rng), SMALL.random_arch(rng)
    swapped = SMALL.swap_inputs(a, 0, 1)
    assert evaluator.evaluate([a, swapped, a]) == [0.5, 0.5, 0.5]  # one network, one evaluation
    assert len(calls) == 1 and evaluator.used == 1
    evaluator.evaluate([b])
    assert evaluator.used == 2 and not evaluator.exhausted


def test_nao_autoencoder_reconstructs_its_training_sequences() -> None:
    rng = random.Random(0)
    archs = [SMALL.random_arch(rng) for _ in range(12)]
    scores = [rng.random() for _ in archs]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = NAOModel(SMALL, NAOSettings(epochs=150, expand=1))
    train_nao(model, archs, scores, torch.Generator().manual_seed(0))
    tokens = torch.tensor([SMALL.to_tokens(a) for a in archs])
    with torch.no_grad():
        decoded = model.decode_greedy(model.encode(tokens))
    assert (decoded == tokens).float().mean() >= 0.95
    assert (decoded == tokens).all(dim=1).float().mean() >= 0.75
    for row in decoded.tolist():
        assert grammar_ok(SMALL, row)


def test_a_gradient_step_raises_the_predictors_score() -> None:
    rng = random.Random(1)
    archs = [SMALL.random_arch(rng) for _ in range(12)]
    scores = [rng.random() for _ in archs]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = NAOModel(SMALL, NAOSettings(epochs=40))
    train_nao(model, archs, scores, torch.Generator().manual_seed(1))
    tokens = torch.tensor([SMALL.to_tokens(a) for a in archs])
    # first order: f(normalize(h + η g)) - f(h) ≈ η (|g|² - (h·g)²) >= 0 for unit rows h (Cauchy-Schwarz)
    _, before, after = model.improve(tokens, step=0.05)
    assert bool((after >= before - 1e-6).all()) and float((after - before).mean()) > 0
    # the predictor's own gradient, checked against a finite difference along it
    outputs = model.encode(tokens).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.predict(outputs).sum(), outputs)
    eps = 1e-3
    with torch.no_grad():
        numeric = (model.predict(outputs + eps * grad) - model.predict(outputs - eps * grad)) / (2 * eps)
    expected = (grad * grad).sum(dim=(1, 2))
    assert torch.allclose(numeric, expected, rtol=2e-2, atol=2e-5)


def test_nao_proposes_unseen_valid_architectures_and_spends_the_budget() -> None:
    target = SMALL.random_arch(random.Random(7))
    evaluator = CandidateEvaluator(SMALL, FunctionBackend(matching_reward(SMALL, target)), budget=18)
    summary = nao_search(SMALL, evaluator, torch.Generator().manual_seed(0), NAOSettings(epochs=20))
    assert evaluator.used == 18 and summary["iterations"] >= 2
    keys = [SMALL.canonical(r.arch) for r in evaluator.history]
    assert len(set(keys)) == len(keys)
    for record in evaluator.history:
        assert grammar_ok(SMALL, SMALL.to_tokens(record.arch))
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = NAOModel(SMALL, NAOSettings(epochs=5))
    new, _ = propose(model, evaluator, [r.arch for r in evaluator.history[:5]], 4)
    assert all(not evaluator.seen(a) and grammar_ok(SMALL, SMALL.to_tokens(a)) for a in new)


def test_controller_distribution_is_normalized() -> None:
    tiny = SearchSpace(steps=1, ops=("skip_connect", "max_pool_3x3"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        controller = Controller(tiny)
    cells = [((i1, o1, i2, o2),) for i1, o1, i2, o2 in itertools.product(range(2), repeat=4)]
    with torch.no_grad(), threads(1):
        total = sum(math.exp(float(controller.log_prob(Arch(n, r)))) for n in cells for r in cells)
    assert abs(total - 1.0) < 1e-4  # all 256 architectures of the tiny space
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), threads(1):
        samples = [controller.sample(generator) for _ in range(50)]
        rescored = [float(controller.log_prob(s.arch)) for s in samples]
    for s, log_p in zip(samples, rescored):
        assert grammar_ok(tiny, tiny.to_tokens(s.arch))
        assert abs(float(s.log_prob) - log_p) < 1e-5


def test_reinforce_raises_the_probability_of_the_best_architecture() -> None:
    target = SMALL.random_arch(random.Random(123))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        controller = Controller(SMALL)
    with torch.no_grad():
        before = float(controller.log_prob(target))
    evaluator = CandidateEvaluator(SMALL, FunctionBackend(matching_reward(SMALL, target)), budget=200)
    reinforce_search(SMALL, evaluator, torch.Generator().manual_seed(0), controller=controller)
    with torch.no_grad():
        after = float(controller.log_prob(target))
    assert after > before + 1.0, (before, after)  # e times more likely, at least


def test_evolution_reaches_the_best_architecture_in_fewer_evaluations_than_random() -> None:
    target = SMALL.random_arch(random.Random(123))
    reward = matching_reward(SMALL, target)
    evo, rnd = [], []
    for seed in range(4):
        e = CandidateEvaluator(SMALL, FunctionBackend(reward), budget=800)
        regularized_evolution(SMALL, e, random.Random(seed), population=20, sample=5)
        r = CandidateEvaluator(SMALL, FunctionBackend(reward), budget=800)
        random_search(SMALL, r, random.Random(seed))
        evo.append(first_hit(e))
        rnd.append(first_hit(r))
    assert sum(evo) / len(evo) < sum(rnd) / len(rnd), (evo, rnd)
    assert all(h <= 800 for h in evo), evo  # evolution found it on every seed
