"""HAQ's episode loop: act per layer, enforce the budget, measure, reward, learn (HAQ §3.1–3.5).

One episode walks the layers (two steps per layer in latency/BitOps mode: weights, then
activations), turns each action into bits, lowers bits until the policy fits the budget
(:mod:`quant.haq.enforce`), hands the policy to ``evaluate`` (quantize, short fine-tune,
validation accuracy) and rewards the agent with ``R = 0.1 · (acc_quant − acc_orig)``
(paper eq. 9 with λ = 0.1, as in the official code). The best policy seen is kept.

The loop is independent of models and data: ``evaluate`` is a callback, so the same code
runs the real search and the synthetic problems the tests use. Warm-up episodes (uniform random
actions, no agent update before the last of them) can be handed to a batch evaluator several at
a time, e.g. to Ray workers (:mod:`quant.haq.run`); their rewards are learnt from in episode
order with the agent's RNG as it was after each episode's actions, so batching changes nothing.
After every episode the whole state can be checkpointed and resumed (:mod:`quant.haq.checkpoint`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxsculpt.quant.haq.actions import BitLevels, Bits
from fxsculpt.quant.haq.checkpoint import Best, HaqCheckpoint, SearchProgress
from fxsculpt.quant.haq.cost import BudgetSpec, CostModel
from fxsculpt.quant.haq.ddpg import DDPGAgent, DDPGConfig
from fxsculpt.quant.haq.enforce import Policy, enforce
from fxsculpt.quant.haq.state import StateSpace

REWARD_SCALE = 0.1


@dataclass
class Evaluation:
    """What ``evaluate(policy)`` reports: validation accuracy and where its time went."""

    accuracy: float
    finetune_s: float = 0.0
    evaluate_s: float = 0.0


@dataclass
class EpisodeRecord:
    """One point of the learning curve."""

    episode: int
    reward: float
    accuracy: float
    cost: float
    warmup: bool
    sigma: float
    policy: list[list[Bits]]
    enforce_steps: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchResult:
    """The best policy found and the whole learning curve."""

    best_policy: Policy
    best_reward: float
    best_accuracy: float
    best_cost: float
    best_episode: int
    original_accuracy: float
    budget: BudgetSpec
    curve: list[EpisodeRecord]
    layer_names: list[str]
    agent: DDPGAgent | None = None

    def timing(self) -> dict[str, float]:
        """Mean seconds per episode, split by where they went (fine-tune, evaluation, look-ups, agent)."""
        keys = ("finetune", "evaluate", "hardware", "agent", "total")
        n = max(len(self.curve), 1)
        return {k: sum(r.seconds.get(k, 0.0) for r in self.curve) / n for k in keys}

    def policy_table(self) -> list[dict[str, Any]]:
        return [
            {"layer": name, "weight_bits": w, "act_bits": a}
            for name, (w, a) in zip(self.layer_names, self.best_policy, strict=True)
        ]


def reward_of(accuracy: float, original_accuracy: float) -> float:
    """HAQ's reward (paper eq. 9, λ = 0.1): ``0.1 · (acc_quant − acc_orig)``, accuracies in [0, 1]."""
    return REWARD_SCALE * (accuracy - original_accuracy)


def run_episode_actions(
    agent: DDPGAgent, states: StateSpace, levels: BitLevels, episode: int, fixed_act_bits: Bits
) -> tuple[Policy, list[tuple[Any, float, Any, bool]]]:
    """Let the agent pick bits for every step; returns the raw policy and the transitions."""
    transitions = []
    prev = 1.0  # the official code starts the previous-action column at the top level
    chosen: list[Bits] = []
    observation = states.observation(0, prev)
    for step in range(states.steps):
        action = agent.act(observation, episode)
        bits = levels.to_bits(action)
        chosen.append(bits)
        prev = levels.normalized(bits)
        last = step == states.steps - 1
        next_observation = observation if last else states.observation(step + 1, prev)
        transitions.append((observation, action, next_observation, last))
        observation = next_observation
    if states.two_steps:
        policy = [(chosen[2 * i], chosen[2 * i + 1]) for i in range(len(states.layers))]
    else:
        policy = [(w, fixed_act_bits) for w in chosen]
    return policy, transitions


@dataclass
class PlannedEpisode:
    """An episode up to its evaluation: the agent's actions, enforced and costed."""

    episode: int
    policy: Policy
    transitions: list[tuple[Any, float, Any, bool]]
    cost: float
    enforce_steps: int
    #: The agent generator's state right after this episode's actions: what a sequential run holds
    #: when it learns from (and checkpoints) this episode, whatever was drawn for later ones.
    agent_rng: torch.Tensor
    act_s: float
    hardware_s: float
    #: The cost models' look-up counts once this episode was costed (see :class:`HaqCheckpoint`).
    counts: dict[str, int] = field(default_factory=dict)


#: Evaluates ``(episode, policy)`` items, in order; the episode index seeds what it draws.
BatchEvaluate = Callable[[Sequence[tuple[int, Policy]]], list[Evaluation]]


def haq_search(
    states: StateSpace,
    levels: BitLevels,
    cost: CostModel,
    budget: BudgetSpec,
    evaluate: Callable[[Policy], Evaluation],
    original_accuracy: float,
    episodes: int,
    config: DDPGConfig | None = None,
    seed: int = 0,
    fixed_act_bits: Bits = 8,
    on_episode: Callable[[EpisodeRecord], None] | None = None,
    exact_cost: Callable[[Policy], float] | None = None,
    project: Callable[[Policy], Policy] | None = None,
    table_first: bool = True,
    *,
    evaluate_batch: BatchEvaluate | None = None,
    batch: int = 1,
    checkpoint: HaqCheckpoint | None = None,
) -> SearchResult:
    """Run ``episodes`` HAQ episodes and return the best policy (highest reward) and the curve.

    ``exact_cost`` (optional) is a slower, exact evaluation of the same metric: enforcement
    runs on the fast table ``cost`` first (unless ``table_first`` is off: a table that is off
    in either direction would lower bits for nothing) and then continues on ``exact_cost``
    until it fits, and the episode's cost is the exact one. Enforcement aims at the budget's
    ``target`` (its limit less the headroom margin). ``project`` maps a policy to the one the
    target actually runs (ort-cpu: every layer int8 or float, :func:`quant.haq.hardware_cost.
    int8_or_float`); costs are taken of projected policies and the episode measures one.

    ``evaluate_batch`` (optional) replaces ``evaluate``: it gets ``(episode, policy)`` pairs, up
    to ``batch`` warm-up episodes at a time (their random actions do not depend on rewards, so
    they can be evaluated together, e.g. in parallel), one at a time after the warm-up. The
    rewards are then learnt from in episode order, exactly as one by one. ``checkpoint``
    saves the whole state after every episode and, when it resumes, continues after the last
    saved episode (see :mod:`quant.haq.checkpoint`).
    """
    if episodes < 1:
        raise ValueError("HAQ needs at least one episode")
    agent = DDPGAgent(states.dim, states.steps, config, seed=seed)
    proj: Callable[[Policy], Policy] = project if project is not None else (lambda p: p)
    stages: list[Callable[[Policy], float]] = []
    if exact_cost is None or table_first:
        stages.append(cost)
    if exact_cost is not None:
        stages.append(exact_cost)
    if evaluate_batch is None:
        evaluate_batch = lambda items: [evaluate(policy) for _, policy in items]  # noqa: E731

    def projected(stage: Callable[[Policy], float]) -> Callable[[Policy], float]:
        return lambda p: stage(proj(p))

    def plan(episode: int) -> PlannedEpisode:
        t0 = time.perf_counter()
        raw, transitions = run_episode_actions(agent, states, levels, episode, fixed_act_bits)
        agent_rng = agent.generator.get_state()
        t1 = time.perf_counter()
        policy, steps = proj(raw), 0
        for stage in stages:
            policy, more = enforce(
                policy,
                projected(stage),
                budget.target,
                levels,
                lower_activations=cost.two_steps,
                what=cost.metric,
                unit=cost.unit,
            )
            policy, steps = proj(policy), steps + more
        policy_cost = exact_cost(policy) if exact_cost is not None else cost(policy)
        t2 = time.perf_counter()
        counts = checkpoint.counts() if checkpoint is not None else {}
        return PlannedEpisode(
            episode, policy, transitions, policy_cost, steps, agent_rng, t1 - t0, t2 - t1, counts
        )

    progress = (checkpoint.restore(agent) if checkpoint is not None else None) or SearchProgress()

    def finish(planned: PlannedEpisode, outcome: Evaluation, evaluation_s: float) -> None:
        episode = planned.episode
        t3 = time.perf_counter()
        reward = reward_of(outcome.accuracy, original_accuracy)
        if not math.isfinite(reward):
            reward = -1.0  # a diverged fine-tune is the worst outcome, not a crash of the search
        agent.generator.set_state(planned.agent_rng)
        agent.store_episode(planned.transitions, reward)
        agent.learn_after_episode(episode, states.steps)
        t4 = time.perf_counter()
        if progress.best is None or reward > progress.best.reward:
            progress.best = Best(reward, list(planned.policy), outcome.accuracy, planned.cost, episode)
        other_eval = max(evaluation_s - outcome.finetune_s - outcome.evaluate_s, 0.0)
        agent_s = planned.act_s + (t4 - t3)
        record = EpisodeRecord(
            episode=episode,
            reward=reward,
            accuracy=outcome.accuracy,
            cost=planned.cost,
            warmup=agent.exploring(episode),
            sigma=1.0 if agent.exploring(episode) else agent.sigma,
            policy=[[w, a] for w, a in planned.policy],
            enforce_steps=planned.enforce_steps,
            seconds={
                "finetune": outcome.finetune_s,
                "evaluate": outcome.evaluate_s + other_eval,
                "hardware": planned.hardware_s,
                "agent": agent_s,
                "total": agent_s + planned.hardware_s + evaluation_s,
            },
        )
        progress.curve.append(record)
        progress.next_episode = episode + 1
        if checkpoint is not None:
            checkpoint.save(episode + 1, agent, progress, planned.counts)
        if on_episode is not None:
            on_episode(record)

    while progress.next_episode < episodes:
        first = progress.next_episode
        # warm-up episodes act at random, whatever the rewards: a batch of them is planned first
        # (no update happens before the last warm-up episode is learnt from, so that one ends a batch)
        last = (
            min(first + max(1, batch), agent.config.warmup, episodes) if agent.exploring(first) else first + 1
        )
        planned = [plan(e) for e in range(first, last)]
        t_eval = time.perf_counter()
        outcomes = evaluate_batch([(p.episode, p.policy) for p in planned])
        evaluation_s = (time.perf_counter() - t_eval) / len(planned)
        if len(outcomes) != len(planned):
            raise RuntimeError(f"{len(planned)} episodes were evaluated into {len(outcomes)} results")
        for p, outcome in zip(planned, outcomes, strict=True):
            finish(p, outcome, evaluation_s)
    best = progress.best
    assert best is not None
    return SearchResult(
        best_policy=best.policy,
        best_reward=best.reward,
        best_accuracy=best.accuracy,
        best_cost=best.cost,
        best_episode=best.episode,
        original_accuracy=original_accuracy,
        budget=budget,
        curve=progress.curve,
        layer_names=[layer.name for layer in states.layers],
        agent=agent,
    )


def greedy_policy(
    agent: DDPGAgent, states: StateSpace, levels: BitLevels, fixed_act_bits: Bits = 8
) -> Policy:
    """The policy the trained actor picks without exploration noise (before enforcement)."""
    chosen: list[Bits] = []
    prev = 1.0
    for step in range(states.steps):
        bits = levels.to_bits(agent.greedy_action(states.observation(step, prev)))
        chosen.append(bits)
        prev = levels.normalized(bits)
    if states.two_steps:
        return [(chosen[2 * i], chosen[2 * i + 1]) for i in range(len(states.layers))]
    return [(w, fixed_act_bits) for w in chosen]


def write_curve_json(result: SearchResult, path: Path) -> None:
    """The learning curve (reward, accuracy and cost per episode) and the best policy as JSON."""
    payload = {
        "original_accuracy": result.original_accuracy,
        "budget": result.budget.as_dict(),
        "best": {
            "episode": result.best_episode,
            "reward": result.best_reward,
            "accuracy": result.best_accuracy,
            "cost": result.best_cost,
            "policy": result.policy_table(),
        },
        "timing_per_episode_s": result.timing(),
        "episodes": [asdict(r) for r in result.curve],
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")


def plot_curve(result: SearchResult, path: Path, title: str = "HAQ") -> None:
    """Reward and cost per episode (with the budget line), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = [r.episode for r in result.curve]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    top.plot(episodes, [r.reward for r in result.curve], ".", ms=3, label="reward")
    running = []
    best = -math.inf
    for r in result.curve:
        best = max(best, r.reward)
        running.append(best)
    top.plot(episodes, running, "-", label="best so far")
    warm = [r.episode for r in result.curve if r.warmup]
    if warm:
        top.axvspan(-0.5, max(warm) + 0.5, color="0.9", label="warm-up (random)")
    top.set_ylabel("reward 0.1·Δacc")
    top.legend(loc="lower right", fontsize=8)
    top.set_title(title)
    bottom.plot(episodes, [r.cost for r in result.curve], ".", ms=3, label="policy cost")
    bottom.axhline(result.budget.limit, color="r", lw=1, label="budget")
    bottom.axhline(result.budget.reference_8bit, color="k", lw=0.8, ls="--", label="uniform 8-bit")
    bottom.set_ylabel(f"{result.budget.metric}{UNIT_LABEL.get(result.budget.metric, '')}")
    bottom.set_xlabel("episode")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


UNIT_LABEL = {"latency": " (ms)", "size": " (bytes)", "bitops": " (BitOps)"}
