"""One env copy: steps its ParallelEnv, writes what it returns into its storage views, auto-resets."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sb3_hatrpo.envs.global_state import GlobalStateReader
from sb3_hatrpo.vec_env.checks import ObservationCheck, observation_check, unknown_agents
from sb3_hatrpo.vec_env.errors import NON_FINITE_HINT, EnvOutputError, NonFiniteError
from sb3_hatrpo.vec_env.layout import _Layout


class _CopyRunner:
    """Runs one ParallelEnv copy and writes what it returns into the views it is given.

    :param env: The ParallelEnv.
    :param index: The copy's index (for error messages).
    :param layout: The storage plan.
    :param views: ``(obs views per agent, state view, alive row)``, see :meth:`_Storage.copy_views`.
    :param reward_aggregation: ``"mean"`` or ``"sum"``.
    :param t_start: The ``time.time()`` the ``"t"`` of the episode infos counts from.
    """

    def __init__(
        self,
        env: Any,
        index: int,
        layout: _Layout,
        views: tuple[list[np.ndarray], np.ndarray, np.ndarray],
        reward_aggregation: str,
        t_start: float,
    ) -> None:
        self.env = env
        self.index = index
        self.agents = layout.agents
        self.n_agents = len(self.agents)
        self.specs = layout.obs
        self.obs_views, self.state_view, self.alive_row = views
        self.pairs = list(zip(self.agents, self.obs_views))
        self.agent_index = {agent: j for j, agent in enumerate(self.agents)}
        self.reader = GlobalStateReader(env)
        self.sum_rewards = reward_aggregation == "sum"
        self.t_start = t_start
        self.episode_return = 0.0
        self.episode_length = 0
        self.live: list[str] = []  # agents alive in the observations last written
        self.all_alive = False
        self.known = frozenset(self.agents)
        # Per agent, the check of its observations against its space; None turns the checks off (benchmarks only)
        self.spaces = layout.obs_spaces
        self.checks: list[ObservationCheck] | None = [observation_check(space) for space in self.spaces]

    def reset(self, seed: int | None, options: dict[str, Any] | None) -> dict[str, Any]:
        obs, infos = self.env.reset(seed=seed, options=options or None)
        self.episode_return = 0.0
        self.episode_length = 0
        self._write(obs)
        if not self.live:
            raise EnvOutputError(
                f"Env copy {self.index}: reset() returned no agents (env.agents = {list(self.env.agents)}, "
                f"observations for {list(obs) if isinstance(obs, Mapping) else obs!r}); after a reset at least one "
                f"of possible_agents {self.agents} must be in env.agents with an observation. Fix the env's reset()."
            )
        return infos

    def step(self, actions: Sequence[Any]) -> tuple[float, bool, dict[str, Any], dict[str, Any] | None]:
        """Step with the per-agent actions of this copy (in ``agents`` order); auto-reset at the episode's end.

        :return: Team reward, done, the step's info, and the reset info when the copy was reset.
        """
        if self.all_alive:
            action_dict = dict(zip(self.agents, actions))
        else:  # agents that left get no action
            index = self.agent_index
            action_dict = {agent: actions[index[agent]] for agent in self.live}
        obs, rewards, terminations, truncations, agent_infos = self.env.step(action_dict)
        known = self.known
        if self.checks is not None and (
            rewards.keys() != known or terminations.keys() != known or truncations.keys() != known
        ):
            # some agents left, or the env invented names
            step = self.episode_length + 1
            self._check_names(rewards, "the rewards", step)
            self._check_names(terminations, "the terminations", step)
            self._check_names(truncations, "the truncations", step)
        reward = self._team_reward(rewards)
        self.episode_return += reward
        self.episode_length += 1
        info: dict[str, Any] = {"agent_infos": agent_infos}
        terminated = any(terminations.values())
        if not self.env.agents:
            done = True
        elif terminated or any(truncations.values()):
            # Some agents ended: the episode ends only if all of those that acted did
            done = all(terminations[a] or truncations.get(a, False) for a in terminations)
        else:
            done = False
        if not done:
            self._write(obs)
            return reward, False, info, None
        info["terminal_observation"] = self._observation_copy(obs)
        info["terminal_state"] = terminal_state = self.reader(obs)
        if terminal_state.size != self.state_view.size:
            raise EnvOutputError(
                f"Env copy {self.index} (step {self.episode_length}, the last of its episode): the global state has "
                f"{terminal_state.size} values but the state space has {self.state_view.size}; env.state() must "
                "always return the same number of values."
            )
        if not terminated:
            info["TimeLimit.truncated"] = True
        info["episode"] = {
            "r": round(self.episode_return, 6),
            "l": self.episode_length,
            "t": round(time.time() - self.t_start, 6),
        }
        reset_info = self.reset(None, None)
        return reward, True, info, reset_info

    def _team_reward(self, rewards: Mapping[str, Any]) -> float:
        values = iter(rewards.values())
        first = next(values, 0.0)
        for value in values:
            if value != first:
                break
        else:  # all equal (the cooperative case): that value, whatever the aggregation
            reward = float(first)
            if not math.isfinite(reward):
                self._raise_non_finite_reward(rewards)
            return reward
        total = math.fsum(float(value) for value in rewards.values())
        reward = total if self.sum_rewards else total / len(rewards)
        if not math.isfinite(reward):
            self._raise_non_finite_reward(rewards)
        return reward

    def _raise_non_finite_reward(self, rewards: Mapping[str, Any]) -> None:
        bad = [agent for agent, value in rewards.items() if not math.isfinite(float(value))]
        detail = ", ".join(f"agent {agent!r}: {float(rewards[agent])}" for agent in bad) or "their sum overflowed"
        raise NonFiniteError(
            f"Non-finite reward ({detail}) in env copy {self.index} at step {self.episode_length + 1} since reset. "
            f"{NON_FINITE_HINT}"
        )

    def _check_names(self, names: Any, where: str, step: int | None = None) -> None:
        """``EnvOutputError`` if ``names`` holds an agent outside ``possible_agents``."""
        unknown = unknown_agents(names, self.known)
        if unknown:
            step = self.episode_length if step is None else step
            raise EnvOutputError(
                f"Env copy {self.index} returned the agent(s) {unknown} in {where} at step {step} "
                f"since reset, but its possible_agents are {self.agents}; every agent the env names at run time "
                "must be declared in possible_agents (with the same name)."
            )

    def _bad_observation(self, j: int, problem: str, when: str = "") -> EnvOutputError:
        return EnvOutputError(
            f"Agent {self.agents[j]!r} in env copy {self.index} returned {problem} (step {self.episode_length} "
            f"since reset{when}; declared observation space {self.spaces[j]}). Fix the env, or wrap it so that its "
            "observations match the spaces it declares."
        )

    def _write(self, obs: Mapping[str, Any]) -> None:
        if type(obs) is not dict and not isinstance(obs, Mapping):  # the exact type first: ABC checks are slow
            raise EnvOutputError(
                f"Env copy {self.index} returned observations of type {type(obs).__name__}; a ParallelEnv returns a "
                "dict {agent: observation}."
            )
        env_agents = self.env.agents
        checks = self.checks
        try:
            if env_agents == self.agents and len(obs) == self.n_agents:  # everyone present, declared order
                for j, (agent, view) in enumerate(self.pairs):
                    value = obs[agent]
                    if checks is not None:
                        problem = checks[j](value)
                        if problem is not None:
                            raise self._bad_observation(j, problem)
                    view[...] = value
                if not self.all_alive:
                    self.alive_row[:] = True
                    self.live = list(self.agents)
                    self.all_alive = True
            else:
                obs = self._write_partial(obs, env_agents)
        except KeyError:  # an agent in env.agents without an observation: treat it as absent
            obs = self._write_partial(obs, env_agents)
        except EnvOutputError:
            raise
        except ValueError as error:
            self._raise_bad_observation(obs, error)
        try:
            self.reader.write(obs, self.state_view)
        except ValueError as error:
            raise EnvOutputError(f"Env copy {self.index} (step {self.episode_length} since reset): {error}") from None

    def _write_partial(self, obs: Mapping[str, Any], env_agents: Sequence[str]) -> dict[str, Any]:
        """Write the observations of the agents alive (zeros for the others); return those observations.

        The state is then built from the same observations (when it is their concatenation), so that it describes
        what the agents see: an agent that just left still has a last observation in ``obs`` but counts as absent.
        """
        if self.checks is not None:
            self._check_names(env_agents, "env.agents")
            self._check_names(obs, "the observation dict")
        present = set(env_agents)
        live = []
        live_obs = {}
        for j, (agent, view) in enumerate(self.pairs):
            if agent in present and agent in obs:
                value = obs[agent]
                if self.checks is not None:
                    problem = self.checks[j](value)
                    if problem is not None:
                        raise self._bad_observation(j, problem)
                view[...] = live_obs[agent] = value
                self.alive_row[j] = True
                live.append(agent)
            else:  # absent agents: zero observation, alive false
                view[...] = 0
                self.alive_row[j] = False
        self.live = live
        self.all_alive = len(live) == self.n_agents
        return live_obs

    def _raise_bad_observation(self, obs: Mapping[str, Any], error: ValueError) -> None:
        for agent, view in self.pairs:
            value = np.asarray(obs.get(agent, 0))
            if value.size != view.size:
                raise ValueError(
                    f"Agent {agent!r} in env copy {self.index} returned an observation of shape {value.shape}, but "
                    f"its observation space has shape {view.shape}."
                ) from error
        raise error

    def _observation_copy(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every agent's last observation as a new array in its final dtype (zeros for agents without one),
        checked as the others: a terminal observation is what GAE bootstraps a truncated episode from."""
        if not isinstance(obs, Mapping):
            raise EnvOutputError(
                f"Env copy {self.index} returned observations of type {type(obs).__name__} at the end of an "
                "episode; a ParallelEnv returns a dict {agent: observation}."
            )
        if self.checks is not None:
            self._check_names(obs, "the last observation dict of an episode")
        out = {}
        for j, (agent, spec) in enumerate(zip(self.agents, self.specs)):
            value = obs.get(agent)
            if value is None:
                out[agent] = np.zeros(spec.shape, dtype=spec.dtype)
                continue
            if self.checks is not None:
                problem = self.checks[j](value)
                if problem is not None:
                    raise self._bad_observation(j, problem, when=", the last observation of its episode")
            out[agent] = np.array(value, dtype=spec.dtype).reshape(spec.shape)
        return out
