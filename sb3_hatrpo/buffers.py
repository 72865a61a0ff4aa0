"""Rollout storage for HATRPO: per-agent observations and actions, one global state and team reward.

Values are not computed step by step: the critic does not change during a rollout, so
all states (and the final states of truncated episodes) are valued in one batched
pass when the rollout ends, then GAE runs on the whole array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch as th
from gymnasium import spaces


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    dones: np.ndarray,
    last_values: np.ndarray,
    truncation_values: np.ndarray,
    gamma: float,
    gae_lambda: float,
    truncated: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over a ``(n_steps, n_envs)`` rollout.

    ``dones[t]`` marks an episode that ended with step ``t`` (the next row starts a new
    episode). A truncated episode (time limit) is bootstrapped with the value of its
    final state, ``truncation_values[t]`` (0 where the episode did not end by
    truncation); a terminated one is not.

    :param rewards: team rewards ``(n_steps, n_envs)``
    :param values: ``V(s_t)`` ``(n_steps, n_envs)``
    :param dones: episode ended after step t ``(n_steps, n_envs)``
    :param last_values: ``V(s_T)`` of the states after the last step ``(n_envs,)``
    :param truncation_values: ``V(final state)`` where the episode was truncated at step t, else 0
    :param gamma: discount factor
    :param gae_lambda: GAE's bias-variance trade-off
    :param truncated: where given, the steps at which an episode was truncated get advantage 0 and return
        ``V(s_t)`` instead of bootstrapping (HARL's ``use_proper_time_limits``: the last transition of a
        truncated episode teaches nothing); ``truncation_values`` is then ignored
    :return: ``(advantages, returns)``, returns = advantages + values (the critic's targets)
    """
    n_steps = rewards.shape[0]
    advantages = np.zeros_like(rewards, dtype=np.float32)
    next_advantage = np.zeros_like(last_values, dtype=np.float32)
    for t in reversed(range(n_steps)):
        next_values = last_values if t == n_steps - 1 else values[t + 1]
        next_non_terminal = 1.0 - dones[t].astype(np.float32)
        # Truncation: r + gamma V(final state); the next row belongs to a new episode.
        delta = rewards[t] + gamma * truncation_values[t] + gamma * next_values * next_non_terminal - values[t]
        next_advantage = delta + gamma * gae_lambda * next_non_terminal * next_advantage
        if truncated is not None:
            next_advantage = np.where(truncated[t], 0.0, next_advantage).astype(np.float32)
        advantages[t] = next_advantage
    return advantages, advantages + values


@dataclass
class RolloutData:
    """One rollout flattened to ``n = n_steps * n_envs`` samples, as tensors."""

    observations: dict[str, th.Tensor]
    actions: dict[str, th.Tensor]
    alive: dict[str, th.Tensor]  # float 0/1 per agent, (n,)
    states: th.Tensor
    values: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor


def _shape(space: spaces.Space) -> tuple[int, ...]:
    assert space.shape is not None, f"{space} has no fixed shape"
    return space.shape


class MultiAgentRolloutBuffer:
    """Fixed-size storage of one rollout of a ``MultiAgentVecEnv``.

    :param buffer_size: steps per env in a rollout (``n_steps``)
    :param observation_space: ``spaces.Dict`` of per-agent observation spaces
    :param action_space: ``spaces.Dict`` of per-agent action spaces
    :param state_dim: size of the flat global state
    :param n_envs: number of env copies
    :param gamma: discount factor
    :param gae_lambda: GAE lambda
    :param device: where ``get()`` puts the tensors
    :param bootstrap_truncation: bootstrap a truncated episode with ``V(final state)`` (default); ``False``
        gives its last step advantage 0 instead (HARL)
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Dict,
        action_space: spaces.Dict,
        state_dim: int,
        n_envs: int,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        device: th.device | str = "cpu",
        bootstrap_truncation: bool = True,
    ) -> None:
        self.buffer_size = buffer_size
        self.bootstrap_truncation = bootstrap_truncation
        self.n_envs = n_envs
        self.agents = list(observation_space.spaces)
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.device = th.device(device)
        shape = (buffer_size, n_envs)
        self.observations = {a: np.zeros(shape + _shape(observation_space[a]), dtype=np.float32) for a in self.agents}
        self.actions = {
            a: np.zeros(
                shape + _shape(action_space[a]),
                dtype=np.float32 if isinstance(action_space[a], spaces.Box) else np.int64,
            )
            for a in self.agents
        }
        self.alive = np.zeros((*shape, len(self.agents)), dtype=bool)
        self.states = np.zeros((*shape, state_dim), dtype=np.float32)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.dones = np.zeros(shape, dtype=bool)
        self.values = np.zeros(shape, dtype=np.float32)
        self.truncation_values = np.zeros(shape, dtype=np.float32)
        self.advantages = np.zeros(shape, dtype=np.float32)
        self.returns = np.zeros(shape, dtype=np.float32)
        # (step, env) of every truncated episode, with its final global state
        self.truncations: list[tuple[int, int, np.ndarray]] = []
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.pos == self.buffer_size

    def reset(self) -> None:
        self.pos = 0
        self.truncations = []
        self.truncation_values[:] = 0.0

    def add(
        self,
        observations: dict[str, np.ndarray],
        states: np.ndarray,
        alive: np.ndarray,
        actions: dict[str, np.ndarray],
        rewards: np.ndarray,
        dones: np.ndarray,
    ) -> None:
        """Store one step of every env copy: what the agents saw, did, and what followed."""
        if self.full:
            raise RuntimeError("MultiAgentRolloutBuffer is full: call reset() before adding")
        t = self.pos
        for agent in self.agents:
            self.observations[agent][t] = observations[agent]
            self.actions[agent][t] = actions[agent].reshape(self.actions[agent][t].shape)
        self.states[t] = states
        self.alive[t] = alive
        self.rewards[t] = rewards
        self.dones[t] = dones
        self.pos += 1

    def add_truncation(self, env_index: int, final_state: np.ndarray) -> None:
        """The episode of env ``env_index`` was truncated at the last added step: bootstrap from ``final_state``."""
        self.truncations.append((self.pos - 1, env_index, np.asarray(final_state, dtype=np.float32)))

    def compute_returns_and_advantage(
        self, values: np.ndarray, last_values: np.ndarray, truncation_values: np.ndarray
    ) -> None:
        """Fill values, advantages and returns.

        :param values: ``V(s_t)`` of the stored states, ``(n_steps, n_envs)``
        :param last_values: ``V`` of the states after the last step, ``(n_envs,)``
        :param truncation_values: ``V`` of the final states in ``truncations`` order
        """
        self.values[:] = values
        self.truncation_values[:] = 0.0
        for (t, env, _), value in zip(self.truncations, truncation_values):
            self.truncation_values[t, env] = value
        truncated = None
        if not self.bootstrap_truncation:
            truncated = np.zeros_like(self.dones)
            for t, env, _ in self.truncations:
                truncated[t, env] = True
        self.advantages, self.returns = compute_gae(
            self.rewards,
            self.values,
            self.dones,
            last_values,
            self.truncation_values,
            self.gamma,
            self.gae_lambda,
            truncated=truncated,
        )

    def get(self) -> RolloutData:
        """The whole rollout, flattened to ``n_steps * n_envs`` samples (step-major)."""
        n = self.buffer_size * self.n_envs

        def flat(array: np.ndarray) -> th.Tensor:
            return th.as_tensor(array.reshape((n, *array.shape[2:])), device=self.device)

        return RolloutData(
            observations={a: flat(self.observations[a]) for a in self.agents},
            actions={a: flat(self.actions[a]) for a in self.agents},
            alive={a: flat(self.alive[..., i]).float() for i, a in enumerate(self.agents)},
            states=flat(self.states),
            values=flat(self.values),
            advantages=flat(self.advantages),
            returns=flat(self.returns),
        )
