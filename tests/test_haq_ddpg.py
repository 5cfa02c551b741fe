"""The DDPG agent's parts (HAQ §3.4): replay buffer, exploration noise, target updates, critic learning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.stats
import torch

from fxsculpt.quant.haq.ddpg import DDPGAgent, DDPGConfig, ReplayBuffer, soft_update, truncated_normal


def test_replay_buffer_keeps_the_newest_transitions() -> None:
    buf = ReplayBuffer(capacity=4, state_dim=2)
    for i in range(6):
        buf.push(
            np.full(2, i, np.float32),
            action=i / 10,
            reward=float(i),
            next_state=np.full(2, i + 1, np.float32),
            done=i == 5,
        )
    assert len(buf) == 4
    assert sorted(buf.rewards[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]  # 0 and 1 were overwritten
    states, actions, rewards, next_states, dones = buf.sample(4, torch.Generator().manual_seed(0))
    assert sorted(rewards[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]  # without replacement: each once
    for s, a, r, s2, d in zip(states, actions, rewards, next_states, dones, strict=True):
        i = int(r)
        assert torch.all(s == i) and torch.all(s2 == i + 1)
        assert a.item() == pytest.approx(i / 10)
        assert d.item() == float(i == 5)
    big = buf.sample(10, torch.Generator().manual_seed(0))[2]  # more than stored: with replacement
    assert big.shape == (10, 1) and set(big[:, 0].tolist()) <= {2.0, 3.0, 4.0, 5.0}
    with pytest.raises(ValueError):
        ReplayBuffer(2, 1).sample(1, torch.Generator())


def test_episode_transitions_all_get_the_episode_reward() -> None:
    agent = DDPGAgent(state_dim=3, steps_per_episode=2, config=DDPGConfig(buffer_per_step=4), seed=0)
    assert agent.buffer.capacity == 8  # 4 per step × 2 steps
    s = np.zeros(3, np.float32)
    agent.store_episode([(s, 0.1, s, False), (s, 0.9, s, True)], reward=-0.25)
    assert len(agent.buffer) == 2 and np.all(agent.buffer.rewards[:2, 0] == -0.25)
    assert agent.buffer.dones[:2, 0].tolist() == [0.0, 1.0]


def test_truncated_normal_matches_scipy() -> None:
    gen = torch.Generator().manual_seed(3)
    mu, sigma = 0.8, 0.5
    draws = np.array([truncated_normal(mu, sigma, 0.0, 1.0, gen) for _ in range(4000)])
    assert draws.min() >= 0.0 and draws.max() <= 1.0
    ref = scipy.stats.truncnorm((0 - mu) / sigma, (1 - mu) / sigma, loc=mu, scale=sigma)
    assert draws.mean() == pytest.approx(ref.mean(), abs=0.015)
    assert draws.std() == pytest.approx(ref.std(), abs=0.015)
    assert scipy.stats.kstest(draws, ref.cdf).pvalue > 0.001


def test_exploration_noise_decays_as_the_paper_says() -> None:
    cfg = DDPGConfig(warmup=5)
    agent = DDPGAgent(state_dim=2, steps_per_episode=1, config=cfg, seed=0)
    assert agent.exploring(4) and not agent.exploring(5)
    agent.act(np.zeros(2, np.float32), episode=15)
    assert agent.sigma == pytest.approx(0.5 * 0.99**10)


def test_soft_update_is_a_convex_combination() -> None:
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = copy.deepcopy(target)
    soft_update(target, source, tau=0.01)
    for t, b, s in zip(target.parameters(), before.parameters(), source.parameters(), strict=True):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)


def test_critic_loss_falls_on_a_fixed_toy_problem() -> None:
    """Terminal transitions with reward r = −(a − s₀)²: the critic must learn Q(s, a) = r − baseline."""
    torch.manual_seed(0)
    cfg = DDPGConfig(hidden=(64, 64), batch_size=64)
    agent = DDPGAgent(state_dim=2, steps_per_episode=1, config=cfg, seed=0)
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(512, 2)
    for _ in range(512):
        s = rng.random(2).astype(np.float32)
        a = float(rng.random())
        buf.push(s, a, -((a - s[0]) ** 2), s, True)
    agent.buffer = buf
    first = np.mean([agent.update()[0] for _ in range(5)])
    for _ in range(600):
        agent.update()
    last = np.mean([agent.update()[0] for _ in range(20)])
    # An independent check of the fitted critic: its Q on fresh points against the true reward.
    states = torch.tensor(rng.random((200, 2)), dtype=torch.float32)
    actions = torch.tensor(rng.random((200, 1)), dtype=torch.float32)
    truth = -((actions - states[:, :1]) ** 2)
    with torch.no_grad():
        q = agent.critic(states, actions) + agent.baseline
    assert last < 0.2 * first
    assert float(((q - truth) ** 2).mean()) < 0.2 * float(truth.var())
