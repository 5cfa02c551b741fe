"""The DDPG agent that picks a bit-width per layer (HAQ, Wang et al., CVPR 2019, §3.4).

Deep deterministic policy gradient (Lillicrap et al., ICLR 2016) with HAQ's choices:

- actor μ(s) and critic Q(s, a): two hidden layers (300 units each by default, as in the
  official code; the paper's 400/300 is ``hidden=(400, 300)``), ReLU, a sigmoid on the
  actor's output so actions live in [0, 1]; the critic adds its state and action branches
  before the first ReLU;
- Adam with learning rates 1e-4 (actor) and 1e-3 (critic), soft target updates
  θ' ← τθ + (1 − τ)θ' with τ = 0.01, discount γ = 1, minibatches of 64;
- a replay buffer of 128 transitions per step of an episode;
- 20 warm-up episodes of uniform random actions, then exploration by a truncated normal
  around μ(s) on [0, 1] with σ = 0.5 · 0.99^(episode − warm-up) (paper §3.4);
- every transition of an episode is stored with the episode's final reward, and a moving
  average of the batch's mean reward is subtracted as a baseline (paper eq. 8 and the
  official code's ``moving_alpha = 0.5``).

The critic's target is ``y = (r − b) + γ · (1 − done) · Q'(s', μ'(s'))`` (paper eq. 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class DDPGConfig:
    """The agent's hyper-parameters; the defaults are the official HAQ code's."""

    hidden: tuple[int, int] = (300, 300)
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    buffer_per_step: int = 128
    warmup: int = 20
    init_sigma: float = 0.5
    sigma_decay: float = 0.99
    baseline_alpha: float = 0.5
    updates_per_step: int = 1


class Actor(nn.Module):
    """μ(s): state → action in [0, 1] (two hidden ReLU layers, sigmoid output)."""

    def __init__(self, state_dim: int, hidden: Sequence[int] = (300, 300)) -> None:
        super().__init__()
        h1, h2 = hidden
        self.net = nn.Sequential(
            nn.Linear(state_dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1), nn.Sigmoid()
        )

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class Critic(nn.Module):
    """Q(s, a): the state and action branches are summed before the first ReLU."""

    def __init__(self, state_dim: int, hidden: Sequence[int] = (300, 300)) -> None:
        super().__init__()
        h1, h2 = hidden
        self.state_in = nn.Linear(state_dim, h1)
        self.action_in = nn.Linear(1, h1)
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.body(self.state_in(state) + self.action_in(action))


class ReplayBuffer:
    """A ring buffer of transitions (s, a, r, s', done); the oldest is overwritten when full."""

    def __init__(self, capacity: int, state_dim: int) -> None:
        if capacity < 1:
            raise ValueError("the replay buffer needs a positive capacity")
        self.capacity = capacity
        self.states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, 1), dtype=np.float32)
        self.rewards = np.zeros((capacity, 1), dtype=np.float32)
        self.next_states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.dones = np.zeros((capacity, 1), dtype=np.float32)
        self.size = 0
        self.cursor = 0

    def __len__(self) -> int:
        return self.size

    def push(
        self, state: np.ndarray, action: float, reward: float, next_state: np.ndarray, done: bool
    ) -> None:
        i = self.cursor
        self.states[i] = state
        self.actions[i, 0] = action
        self.rewards[i, 0] = reward
        self.next_states[i] = next_state
        self.dones[i, 0] = float(done)
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A minibatch drawn without replacement (with replacement while the buffer is smaller)."""
        if self.size == 0:
            raise ValueError("cannot sample an empty replay buffer")
        if self.size >= batch:
            idx = torch.randperm(self.size, generator=generator)[:batch].numpy()
        else:
            idx = torch.randint(self.size, (batch,), generator=generator).numpy()
        return tuple(
            torch.from_numpy(a[idx])
            for a in (self.states, self.actions, self.rewards, self.next_states, self.dones)
        )


def truncated_normal(mu: float, sigma: float, low: float, high: float, generator: torch.Generator) -> float:
    """One draw from N(μ, σ²) truncated to [low, high], by inverting the normal CDF."""
    if sigma <= 0:
        return min(max(mu, low), high)
    normal = torch.distributions.Normal(
        torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    )
    a = normal.cdf(torch.tensor((low - mu) / sigma, dtype=torch.float64))
    b = normal.cdf(torch.tensor((high - mu) / sigma, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    p = (a + u * (b - a)).clamp(1e-12, 1 - 1e-12)
    value = mu + sigma * float(normal.icdf(p))
    return min(max(value, low), high)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """θ' ← τ θ + (1 − τ) θ' (Lillicrap et al. 2016, Algorithm 1)."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.mul_(1.0 - tau).add_(s, alpha=tau)


class DDPGAgent:
    """HAQ's agent: acts one step at a time, learns once per episode from the replay buffer."""

    def __init__(
        self, state_dim: int, steps_per_episode: int, config: DDPGConfig | None = None, seed: int = 0
    ) -> None:
        self.config = config or DDPGConfig()
        self.state_dim = state_dim
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(state_dim, cfg.hidden)
            self.critic = Critic(state_dim, cfg.hidden)
        self.actor_target = Actor(state_dim, cfg.hidden)
        self.critic_target = Critic(state_dim, cfg.hidden)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)
        self.buffer = ReplayBuffer(cfg.buffer_per_step * steps_per_episode, state_dim)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.baseline: float | None = None
        self.value_loss = float("nan")
        self.policy_loss = float("nan")
        self.sigma = cfg.init_sigma

    # -- acting ------------------------------------------------------------------------
    def exploring(self, episode: int) -> bool:
        """Whether ``episode`` is a warm-up episode (uniform random actions)."""
        return episode < self.config.warmup

    def random_action(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def greedy_action(self, state: np.ndarray) -> float:
        """μ(s) without noise."""
        with torch.no_grad():
            return float(self.actor(torch.as_tensor(state, dtype=torch.float32).reshape(1, -1)))

    def act(self, state: np.ndarray, episode: int) -> float:
        """Uniform during warm-up, else a truncated normal around μ(s) with decaying σ."""
        if self.exploring(episode):
            return self.random_action()
        cfg = self.config
        self.sigma = cfg.init_sigma * cfg.sigma_decay ** (episode - cfg.warmup)
        return truncated_normal(self.greedy_action(state), self.sigma, 0.0, 1.0, self.generator)

    # -- learning ----------------------------------------------------------------------
    def store_episode(
        self, transitions: Sequence[tuple[np.ndarray, float, np.ndarray, bool]], reward: float
    ) -> None:
        """Store every (s, a, s', done) of one episode with the episode's reward (HAQ §3.4)."""
        for state, action, next_state, done in transitions:
            self.buffer.push(state, action, reward, next_state, done)

    def update(self) -> tuple[float, float]:
        """One critic and one actor step on a minibatch; returns (value loss, policy loss)."""
        cfg = self.config
        states, actions, rewards, next_states, dones = self.buffer.sample(cfg.batch_size, self.generator)
        batch_mean = float(rewards.mean())
        if self.baseline is None:
            self.baseline = batch_mean
        else:
            self.baseline += cfg.baseline_alpha * (batch_mean - self.baseline)
        with torch.no_grad():
            next_q = self.critic_target(next_states, self.actor_target(next_states))
            target = (rewards - self.baseline) + cfg.discount * (1.0 - dones) * next_q
        value_loss = nn.functional.mse_loss(self.critic(states, actions), target)
        self.critic_optim.zero_grad()
        value_loss.backward()
        self.critic_optim.step()

        policy_loss = -self.critic(states, self.actor(states)).mean()
        self.actor_optim.zero_grad()
        policy_loss.backward()
        self.actor_optim.step()

        soft_update(self.actor_target, self.actor, cfg.tau)
        soft_update(self.critic_target, self.critic, cfg.tau)
        self.value_loss, self.policy_loss = float(value_loss.detach()), float(policy_loss.detach())
        return self.value_loss, self.policy_loss

    def learn_after_episode(self, episode: int, steps: int) -> None:
        """After an episode: ``updates_per_step`` updates per step, from the last warm-up episode on."""
        if episode < self.config.warmup - 1 or len(self.buffer) == 0:
            return
        for _ in range(steps * self.config.updates_per_step):
            self.update()
