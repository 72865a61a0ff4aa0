"""Vectorised PettingZoo ParallelEnvs: ``n_envs`` copies stepped as one SB3 ``VecEnv``.

Observations, actions and their spaces are dicts keyed by agent; rewards are one team reward per copy; a copy
whose episode ends is reset at once (SB3's auto-reset) and the step's ``infos`` describe the episode that ended.
See ``docs/internals.md`` ("Vectorised environments") for the contract.
"""

from __future__ import annotations

import contextlib
import copy
import math
import multiprocessing as mp
import pickle
import select
import time
import traceback
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import (
    CloudpickleWrapper,
    VecEnv,
    VecEnvIndices,
    VecEnvStepReturn,
)

from sb3_hatrpo.envs.global_state import GlobalStateReader, state_space_of

__all__ = [
    "DummyMultiAgentVecEnv",
    "MultiAgentVecEnv",
    "NonFiniteError",
    "SubprocMultiAgentVecEnv",
    "make_vec_env",
]

REWARD_AGGREGATIONS = ("mean", "sum")
SUPPORTED_ACTION_SPACES = "Box (finite bounds), Discrete or MultiDiscrete"
_NON_FINITE_HINT = (
    "Hint: the env itself produced it, e.g. an unstable simulation (extreme actions, a diverging physics step) "
    "or a division by zero in its observation/reward code; reproduce it on the bare env with the same seed, "
    "or sanitise its outputs with a wrapper."
)

# Action kinds
_BOX, _DISCRETE, _MULTI_DISCRETE = 0, 1, 2
_NO_BOUNDS = np.zeros(0)


class NonFiniteError(ValueError):
    """A NaN or infinite observation, state or reward (a ``ValueError``; subprocess workers re-raise it as is)."""


# ---------------------------------------------------------------------------------------------------------------
# Layout: what each agent's observation and action look like once vectorised
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EnvDescription:
    """What a copy's env looks like, gathered where it lives (possibly in a worker) to be checked and compared."""

    agents: list[str]
    observation_spaces: dict[str, spaces.Space]
    action_spaces: dict[str, spaces.Space]
    state_space: spaces.Box
    render_mode: str | None
    metadata: dict[str, Any]


def _render_mode_of(env: Any) -> str | None:
    """``env.render_mode``; MaMuJoCo keeps it on its single-agent env."""
    mode = getattr(env, "render_mode", None)
    if mode is None:
        mode = getattr(getattr(env, "single_agent_env", None), "render_mode", None)
    return mode


def _check_is_parallel_env(env: Any, index: int) -> None:
    from pettingzoo import AECEnv

    if isinstance(env, AECEnv):
        raise TypeError(
            f"Env copy {index} is a PettingZoo AEC env ({type(env).__name__}); the vectorised envs need a "
            "ParallelEnv. Use sb3_hatrpo.make_vec_env, which converts it, or pettingzoo.utils.conversions."
            "aec_to_parallel."
        )
    if not all(hasattr(env, name) for name in ("possible_agents", "reset", "step", "observation_space")):
        raise TypeError(
            f"Env copy {index} is a {type(env).__name__}, not a PettingZoo ParallelEnv. Pass a ParallelEnv "
            "(or a factory returning one); sb3_hatrpo.make_vec_env also accepts env ids and AEC envs."
        )


def _describe(env: Any, index: int) -> _EnvDescription:
    _check_is_parallel_env(env, index)
    agents = list(env.possible_agents)
    metadata = getattr(env, "metadata", None)
    return _EnvDescription(
        agents=agents,
        observation_spaces={agent: env.observation_space(agent) for agent in agents},
        action_spaces={agent: env.action_space(agent) for agent in agents},
        state_space=state_space_of(env),
        render_mode=_render_mode_of(env),
        metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
    )


def _vectorised_observation_space(agent: str, space: spaces.Space) -> spaces.Space:
    """The space of the arrays the vec env returns for ``agent``: floating Boxes become float32."""
    if isinstance(space, spaces.Box):
        if np.issubdtype(space.dtype, np.floating):
            return spaces.Box(low=space.low.astype(np.float32), high=space.high.astype(np.float32), dtype=np.float32)
        return space
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        return space
    raise ValueError(
        f"Agent {agent!r} has the observation space {space}, which the vectorised env cannot store in one array. "
        "Supported: Box, Discrete, MultiDiscrete, MultiBinary; flatten the others first (e.g. with a wrapper "
        "applying gymnasium.spaces.flatten)."
    )


@dataclass(frozen=True)
class _ObsSpec:
    """Where an agent's observation lives: float32 Boxes share one flat buffer with the state, others own one."""

    agent: str
    shape: tuple[int, ...]
    dtype: np.dtype
    in_flat: bool
    offset: int  # into the flat buffer (float32 agents only)
    size: int


@dataclass(frozen=True)
class _ActSpec:
    """How an agent's batched action is turned into what the env receives."""

    agent: str
    kind: int
    shape: tuple[int, ...]
    dtype: np.dtype
    low: np.ndarray  # Box bounds (empty for the integer kinds)
    high: np.ndarray


def _action_spec(agent: str, space: spaces.Space) -> _ActSpec:
    if isinstance(space, spaces.Box):
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise ValueError(
                f"Agent {agent!r} has the action space {space} with infinite bounds; actions are clipped to the "
                "bounds before stepping, so they must be finite (rescale the actions in a wrapper)."
            )
        return _ActSpec(agent, _BOX, space.shape, space.dtype, space.low, space.high)
    if isinstance(space, spaces.Discrete):
        return _ActSpec(agent, _DISCRETE, (), np.dtype(np.int64), _NO_BOUNDS, _NO_BOUNDS)
    if isinstance(space, spaces.MultiDiscrete):
        return _ActSpec(agent, _MULTI_DISCRETE, space.shape, np.dtype(np.int64), _NO_BOUNDS, _NO_BOUNDS)
    raise ValueError(
        f"Agent {agent!r} has the action space {space}, which is not supported; supported action spaces: "
        f"{SUPPORTED_ACTION_SPACES}."
    )


@dataclass(frozen=True)
class _Layout:
    """The storage plan shared by the main process and the workers."""

    agents: list[str]
    obs: list[_ObsSpec]
    actions: list[_ActSpec]
    flat_width: int  # float32 observations, then the state
    state_offset: int
    state_dim: int


def _make_layout(
    agents: list[str],
    obs_spaces: Mapping[str, spaces.Space],
    act_specs: list[_ActSpec],
    state_space: spaces.Box,
) -> _Layout:
    specs = []
    offset = 0
    for agent in agents:
        space = obs_spaces[agent]
        shape = tuple(space.shape or ())
        size = int(np.prod(shape, dtype=np.int64))
        in_flat = isinstance(space, spaces.Box) and space.dtype == np.float32
        dtype = np.dtype(np.float32) if in_flat else np.dtype(space.dtype)
        specs.append(_ObsSpec(agent, shape, dtype, in_flat, offset if in_flat else -1, size))
        if in_flat:
            offset += size
    state_dim = int(state_space.shape[0])
    return _Layout(list(agents), specs, list(act_specs), offset + state_dim, offset, state_dim)


class _Storage:
    """Preallocated arrays for ``n`` copies; per-copy views of them are what the copies write into.

    :param layout: The storage plan.
    :param n: Number of copies.
    """

    def __init__(self, layout: _Layout, n: int) -> None:
        self.layout = layout
        # One float32 block for the float observations and the state, so one reduction checks them all for NaN
        self.flat = np.zeros((n, layout.flat_width), dtype=np.float32)
        self.alive = np.zeros((n, len(layout.agents)), dtype=bool)
        self.rewards = np.zeros(n, dtype=np.float32)
        self.dones = np.zeros(n, dtype=bool)
        self.obs: list[np.ndarray] = []  # per agent, (n, *shape)
        self.others: list[tuple[int, np.ndarray]] = []  # (agent index, array) of the non-float32 observations
        for j, spec in enumerate(layout.obs):
            if spec.in_flat:
                self.obs.append(self.flat[:, spec.offset : spec.offset + spec.size].reshape((n, *spec.shape)))
            else:
                array = np.zeros((n, *spec.shape), dtype=spec.dtype)
                self.obs.append(array)
                self.others.append((j, array))
        self.states = self.flat[:, layout.state_offset :]

    def copy_views(self, i: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Writable views of copy ``i``: per-agent observations, state, alive row."""
        obs_views = [array[i, ...] for array in self.obs]
        return obs_views, self.states[i], self.alive[i]


# ---------------------------------------------------------------------------------------------------------------
# One copy: steps its ParallelEnv, writes into its views, auto-resets
# ---------------------------------------------------------------------------------------------------------------


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

    def reset(self, seed: int | None, options: dict[str, Any] | None) -> dict[str, Any]:
        obs, infos = self.env.reset(seed=seed, options=options or None)
        self._write(obs)
        self.episode_return = 0.0
        self.episode_length = 0
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
        info["terminal_state"] = self.reader(obs)
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
            f"{_NON_FINITE_HINT}"
        )

    def _write(self, obs: Mapping[str, Any]) -> None:
        env_agents = self.env.agents
        try:
            if len(env_agents) == self.n_agents:
                for agent, view in self.pairs:
                    view[...] = obs[agent]
                if not self.all_alive:
                    self.alive_row[:] = True
                    self.live = list(self.agents)
                    self.all_alive = True
            else:
                obs = self._write_partial(obs, env_agents)
        except KeyError:  # an agent in env.agents without an observation: treat it as absent
            obs = self._write_partial(obs, env_agents)
        except ValueError as error:
            self._raise_bad_observation(obs, error)
        self.reader.write(obs, self.state_view)

    def _write_partial(self, obs: Mapping[str, Any], env_agents: Sequence[str]) -> dict[str, Any]:
        """Write the observations of the agents alive (zeros for the others); return those observations.

        The state is then built from the same observations (when it is their concatenation), so that it describes
        what the agents see: an agent that just left still has a last observation in ``obs`` but counts as absent.
        """
        present = set(env_agents)
        live = []
        live_obs = {}
        for j, (agent, view) in enumerate(self.pairs):
            if agent in present and agent in obs:
                view[...] = live_obs[agent] = obs[agent]
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
        """Every agent's observation as a new array in its final dtype (zeros for agents without one)."""
        out = {}
        for agent, spec in zip(self.agents, self.specs):
            value = obs.get(agent)
            if value is None:
                out[agent] = np.zeros(spec.shape, dtype=spec.dtype)
            else:
                out[agent] = np.array(value, dtype=spec.dtype).reshape(spec.shape)
        return out


# ---------------------------------------------------------------------------------------------------------------
# The vectorised envs
# ---------------------------------------------------------------------------------------------------------------


class MultiAgentVecEnv(VecEnv):
    """Base class of the vectorised multi-agent envs: ``num_envs`` copies of a PettingZoo ParallelEnv as an SB3
    ``VecEnv``, so SB3's callbacks and helpers accept it.

    * ``agents``: the ``possible_agents``, in a fixed order; ``observation_space`` and ``action_space`` are
      ``spaces.Dict`` keyed by agent (floating ``Box`` observations become float32); ``state_space`` is a flat
      float32 ``Box`` (see :func:`sb3_hatrpo.envs.global_state.state_space_of`).
    * ``reset()`` returns ``{agent: (num_envs, *obs_shape)}``; ``step(actions)`` takes ``{agent: (num_envs,
      *act_shape)}`` and returns ``(obs, rewards, dones, infos)`` with one team reward per copy.
    * After every ``reset()``/``step()``: ``states`` ``(num_envs, state_dim)`` float32 and ``alive``
      ``(num_envs, n_agents)`` bool describe the observations just returned. An agent is alive in a copy when it
      is in that copy's ``env.agents``; absent agents get zero observations and their actions are not passed on.
    * A copy's episode ends when its env has no agents left, or every agent of the step ended. It is then reset
      and ``infos[i]`` holds ``terminal_observation`` (``{agent: obs}``), ``terminal_state``, ``episode``
      (``{"r", "l", "t"}`` as SB3's ``Monitor``) and, when no agent was terminated (a time limit),
      ``TimeLimit.truncated = True``. Every step's info holds the env's per-agent infos under ``agent_infos``.
    * ``Box`` actions are clipped to their bounds and cast to the space's dtype; ``Discrete`` actions are passed
      as integer scalars, ``MultiDiscrete`` as integer arrays.
    * A NaN or infinite observation, state or reward raises a ``ValueError`` naming the agent (or "state"), the
      copy and the step since its reset.

    :param descriptions: What each copy's env looks like (all must agree).
    :param reward_aggregation: How a step's rewards become the team reward when the agents' rewards differ:
        ``"mean"`` (default) or ``"sum"``. When every agent gets the same reward (cooperative envs) the team
        reward is that value with either choice.
    """

    observation_space: spaces.Dict
    action_space: spaces.Dict

    def __init__(self, descriptions: Sequence[_EnvDescription], reward_aggregation: str = "mean") -> None:
        if reward_aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(
                f"Unknown reward_aggregation {reward_aggregation!r}; valid choices: {', '.join(REWARD_AGGREGATIONS)}"
            )
        if not descriptions:
            raise ValueError("A vectorised env needs at least one env copy.")
        self.reward_aggregation = reward_aggregation
        first = descriptions[0]
        _check_copies_agree(descriptions)
        self.agents: list[str] = list(first.agents)
        if not self.agents:
            raise ValueError("The env has no possible_agents.")
        obs_spaces = {
            agent: _vectorised_observation_space(agent, first.observation_spaces[agent]) for agent in self.agents
        }
        self._act_specs = [_action_spec(agent, first.action_spaces[agent]) for agent in self.agents]
        self.state_space: spaces.Box = first.state_space
        self._layout = _make_layout(self.agents, obs_spaces, self._act_specs, self.state_space)
        n_envs = len(descriptions)
        self._storage = _Storage(self._layout, n_envs)
        self._action_batch_shapes = [(n_envs, *spec.shape) for spec in self._act_specs]
        self._zero_actions = [
            np.zeros(shape, dtype=spec.dtype) for spec, shape in zip(self._act_specs, self._action_batch_shapes)
        ]
        self._t_start = time.time()
        # Steps since each copy's reset, for error messages
        self._steps = [0] * n_envs

        # What VecEnv.__init__ sets, without its get_attr("render_mode") (MaMuJoCo keeps it on its inner env)
        self.num_envs = n_envs
        self.observation_space = spaces.Dict(obs_spaces, sort_keys=False)
        self.action_space = spaces.Dict({agent: first.action_spaces[agent] for agent in self.agents}, sort_keys=False)
        self.reset_infos: list[dict[str, Any]] = [{} for _ in range(n_envs)]
        self._seeds: list[int | None] = [None for _ in range(n_envs)]
        self._options: list[dict[str, Any]] = [{} for _ in range(n_envs)]
        modes = {description.render_mode for description in descriptions}
        if len(modes) > 1:
            raise ValueError(f"All env copies must have the same render_mode, got {sorted(map(str, modes))}.")
        self.render_mode = first.render_mode
        render_modes = [] if self.render_mode is None else [self.render_mode]
        self.metadata = {**first.metadata, "render_modes": render_modes}

        self.states = np.zeros((n_envs, self._layout.state_dim), dtype=np.float32)
        self.alive = np.zeros((n_envs, len(self.agents)), dtype=bool)

    # --- stepping -------------------------------------------------------------------------------------------

    def _prepare_actions(self, actions: Mapping[str, Any]) -> list[np.ndarray]:
        """Per agent, a new ``(num_envs, *shape)`` array in the env's dtype, Box actions clipped to bounds."""
        prepared = []
        for j, (spec, batch_shape) in enumerate(zip(self._act_specs, self._action_batch_shapes)):
            try:
                action = actions[spec.agent]
            except KeyError:
                if self.alive[:, j].any():
                    raise ValueError(
                        f"No action for agent {spec.agent!r}, which is alive in some env copies; expected actions "
                        f"for {self.agents}."
                    ) from None
                prepared.append(self._zero_actions[j])
                continue
            except (TypeError, IndexError):
                raise TypeError(
                    f"Actions must be a dict {{agent: array of shape (num_envs, *action_shape)}}, got "
                    f"{type(actions).__name__}."
                ) from None
            array = np.asarray(action)
            if array.shape != batch_shape:
                try:
                    array = array.reshape(batch_shape)
                except ValueError:
                    raise ValueError(
                        f"The actions of agent {spec.agent!r} have shape {array.shape}; expected {batch_shape} "
                        "(num_envs, *action_shape)."
                    ) from None
            if spec.kind == _BOX:
                # The ndarray method: the same as np.clip with less call overhead; a new array, the caller's is kept
                array = array.clip(spec.low, spec.high).astype(spec.dtype, copy=False)
            elif spec.kind == _DISCRETE:
                array = array.astype(np.int64, copy=False)  # the env gets scalars taken out of it
            else:
                array = array.astype(np.int64)  # a copy: the env gets views of its rows
            prepared.append(array)
        return prepared

    def _collect(
        self, results: Iterable[tuple[float, bool, dict[str, Any], dict[str, Any] | None]]
    ) -> VecEnvStepReturn:
        """Turn the per-copy step results (the arrays are already stored) into SB3's step return."""
        storage = self._storage
        steps = self._steps
        infos: list[dict[str, Any]] = []
        ended = []
        for i, (reward, done, info, reset_info) in enumerate(results):
            storage.rewards[i] = reward
            storage.dones[i] = done
            infos.append(info)
            if done:
                steps[i] = 0
                self.reset_infos[i] = reset_info  # type: ignore[assignment]
                ended.append(i)
            else:
                steps[i] += 1
        for i in ended:
            self._check_terminal(i, infos[i])
        return self._finish(), storage.rewards.copy(), storage.dones.copy(), infos

    def _finish(self) -> dict[str, np.ndarray]:
        """Check the stored observations and states, then copy them out (the buffers are reused next step)."""
        storage = self._storage
        # A float32 sum is a cheap screen (NaN/inf propagate); an overflow of finite values is a false alarm that
        # the precise check then clears
        if storage.flat.size and not math.isfinite(storage.flat.sum()):
            self._check_non_finite()
        self.states = storage.states.copy()
        self.alive = storage.alive.copy()
        return {agent: array.copy() for agent, array in zip(self.agents, storage.obs)}

    def _check_non_finite(self) -> None:
        storage = self._storage
        for i in range(self.num_envs):
            for spec, array in zip(self._layout.obs, storage.obs):
                if spec.in_flat and not np.isfinite(array[i]).all():
                    raise NonFiniteError(
                        f"Non-finite observation for agent {spec.agent!r} in env copy {i} at step {self._steps[i]} "
                        f"since reset: {array[i]}. {_NON_FINITE_HINT}"
                    )
            if not np.isfinite(storage.states[i]).all():
                raise NonFiniteError(
                    f"Non-finite state in env copy {i} at step {self._steps[i]} since reset: {storage.states[i]}. "
                    f"{_NON_FINITE_HINT}"
                )

    def _check_terminal(self, i: int, info: dict[str, Any]) -> None:
        step = info["episode"]["l"]
        for spec in self._layout.obs:
            value = info["terminal_observation"][spec.agent]
            if spec.in_flat and not np.isfinite(value).all():
                raise NonFiniteError(
                    f"Non-finite observation for agent {spec.agent!r} in env copy {i} at step {step} since reset "
                    f"(the last of its episode): {value}. {_NON_FINITE_HINT}"
                )
        if not np.isfinite(info["terminal_state"]).all():
            raise NonFiniteError(
                f"Non-finite state in env copy {i} at step {step} since reset (the last of its episode): "
                f"{info['terminal_state']}. {_NON_FINITE_HINT}"
            )

    def _reset_arguments(self) -> list[tuple[int | None, dict[str, Any] | None]]:
        arguments = [(self._seeds[i], self._options[i] or None) for i in range(self.num_envs)]
        # Seeds and options are used once, as in SB3's DummyVecEnv
        self._reset_seeds()
        self._reset_options()
        self._steps = [0] * self.num_envs
        return arguments

    def step_async(self, actions: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Start a step of every copy.

        :param actions: ``{agent: array of shape (num_envs, *action_shape)}``.
        """
        self._step_async(self._prepare_actions(actions))

    def step(self, actions: Mapping[str, Any]) -> VecEnvStepReturn:  # type: ignore[override]
        """Step every copy.

        :param actions: ``{agent: array of shape (num_envs, *action_shape)}``; actions of absent agents are ignored.
        :return: ``(obs, rewards, dones, infos)``: ``{agent: (num_envs, *obs_shape)}``, ``(num_envs,)`` float32 team
            rewards, ``(num_envs,)`` bool, a list of ``num_envs`` dicts.
        """
        self.step_async(actions)
        return self.step_wait()

    @abstractmethod
    def _step_async(self, actions: list[np.ndarray]) -> None:
        """Start a step with the prepared per-agent actions."""

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """PettingZoo envs are never wrapped in gymnasium wrappers (e.g. SB3's ``Monitor``): all False.

        :param wrapper_class: The gymnasium wrapper class.
        :param indices: The copies to ask about.
        :return: ``False`` for each copy.
        """
        return [False for _ in self._get_indices(indices)]

    def render(self, mode: str | None = None) -> np.ndarray | None:
        """Render copy 0 (not a mosaic of all copies: a multi-agent video follows one env).

        :param mode: Must be the envs' ``render_mode`` or None.
        :return: The frame for ``"rgb_array"``, else None.
        """
        if mode is not None and mode != self.render_mode:
            warnings.warn(
                f"render(mode={mode!r}) ignored: the env copies were created with render_mode={self.render_mode!r}.",
                stacklevel=2,
            )
            return None
        if self.render_mode is None:
            warnings.warn("render() called but the env copies were created without a render_mode.", stacklevel=2)
            return None
        frame = self._render(0)
        return frame if self.render_mode == "rgb_array" else None

    def get_images(self) -> Sequence[np.ndarray | None]:
        """The ``render()`` of every copy (for ``render_mode="rgb_array"``).

        :return: One frame per copy (None when the render mode is not ``"rgb_array"``).
        """
        if self.render_mode != "rgb_array":
            warnings.warn(f"The render mode is {self.render_mode}, but get_images() needs 'rgb_array'.", stacklevel=2)
            return [None for _ in range(self.num_envs)]
        return [self._render(i) for i in range(self.num_envs)]

    @abstractmethod
    def _render(self, index: int) -> Any:
        """``render()`` of copy ``index``."""


def _check_copies_agree(descriptions: Sequence[_EnvDescription]) -> None:
    first = descriptions[0]
    for i, other in enumerate(descriptions[1:], start=1):
        if other.agents != first.agents:
            raise ValueError(
                f"Env copy {i} has the agents {other.agents} but copy 0 has {first.agents}; all copies must agree."
            )
        for agent in first.agents:
            for kind, mine, theirs in (
                ("observation", first.observation_spaces[agent], other.observation_spaces[agent]),
                ("action", first.action_spaces[agent], other.action_spaces[agent]),
            ):
                if mine != theirs:
                    raise ValueError(
                        f"Agent {agent!r} has the {kind} space {theirs} in env copy {i} but {mine} in copy 0; all "
                        "copies must agree."
                    )
        if other.state_space != first.state_space:
            raise ValueError(
                f"Env copy {i} has the state space {other.state_space} but copy 0 has {first.state_space}; all "
                "copies must agree."
            )


class DummyMultiAgentVecEnv(MultiAgentVecEnv):
    """All copies in this process, stepped one after the other (see :class:`MultiAgentVecEnv`).

    Best when one env step is cheap compared with inter-process communication (MPE, the matrix games,
    MaMuJoCo with few copies).

    :param env_fns: One factory per copy, each returning a new PettingZoo ``ParallelEnv``.
    :param reward_aggregation: ``"mean"`` (default) or ``"sum"``: the team reward when the agents' rewards
        differ (identical rewards give that value either way).
    """

    def __init__(self, env_fns: Sequence[Callable[[], Any]], reward_aggregation: str = "mean") -> None:
        self.closed = False
        self.envs = [fn() for fn in env_fns]
        if len({id(env) for env in self.envs}) != len(self.envs):
            raise ValueError(
                "Two env factories returned the same env instance; each copy needs its own (use a factory that "
                "creates a new env per call, e.g. lambda: make_env(...), not lambda: env)."
            )
        try:
            super().__init__([_describe(env, i) for i, env in enumerate(self.envs)], reward_aggregation)
            self._runners = [
                _CopyRunner(env, i, self._layout, self._storage.copy_views(i), reward_aggregation, self._t_start)
                for i, env in enumerate(self.envs)
            ]
        except BaseException:
            self.close()
            raise
        self._actions: list[np.ndarray] = []

    def reset(self) -> dict[str, np.ndarray]:
        """Reset every copy (with the seeds/options set by ``seed()``/``set_options()``, used once).

        :return: ``{agent: (num_envs, *obs_shape)}``.
        """
        for i, (seed, options) in enumerate(self._reset_arguments()):
            self.reset_infos[i] = self._runners[i].reset(seed, options)
        return self._finish()

    def _step_async(self, actions: list[np.ndarray]) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """Step every copy with the actions given to ``step_async``."""
        actions = self._actions
        results = []
        for i, runner in enumerate(self._runners):
            results.append(runner.step([array[i] for array in actions]))
        return self._collect(results)

    def close(self) -> None:
        """Close every copy (safe to call twice)."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        for env in getattr(self, "envs", []):
            env.close()

    def _render(self, index: int) -> Any:
        return self.envs[index].render()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """``getattr`` on each ParallelEnv copy.

        :param attr_name: The attribute.
        :param indices: The copies (all by default).
        :return: One value per copy.
        """
        return [getattr(self.envs[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """``setattr`` on each ParallelEnv copy.

        :param attr_name: The attribute.
        :param value: Its new value.
        :param indices: The copies (all by default).
        """
        for i in self._get_indices(indices):
            setattr(self.envs[i], attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a method of each ParallelEnv copy.

        :param method_name: The method.
        :param method_args: Its positional arguments.
        :param indices: The copies (all by default).
        :param method_kwargs: Its keyword arguments.
        :return: One result per copy.
        """
        return [getattr(self.envs[i], method_name)(*method_args, **method_kwargs) for i in self._get_indices(indices)]

    def has_attr(self, attr_name: str) -> bool:
        """Whether every copy has the attribute.

        :param attr_name: The attribute.
        :return: True if all copies have it.
        """
        return all(hasattr(env, attr_name) for env in self.envs)


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------------------------------

# A step message (both ways) starts with this 8-byte tag, then raw arrays; everything else is pickled (and starts
# with pickle's PROTO opcode 0x80, so the first byte tells them apart). Raw bytes instead of pickled arrays cut the
# per-step cost of a worker by about a factor of ten.
_STEP_BYTE = ord("S")
_STEP_TAG = b"S" + bytes(7)


def _padded(n_bytes: int) -> int:
    """``n_bytes`` rounded up to a multiple of 8, so every array in a message is aligned."""
    return -(-n_bytes // 8) * 8


class _PipeCodec:
    """Packs actions (main to worker) and a copy's stored outputs (worker to main) as raw bytes.

    :param layout: The storage plan both sides share.
    """

    def __init__(self, layout: _Layout) -> None:
        offset = len(_STEP_TAG)
        # Actions: per agent (offset, count, dtype, shape, is_discrete)
        self.action_parts: list[tuple[int, int, np.dtype, tuple[int, ...], bool]] = []
        for spec in layout.actions:
            count = int(np.prod(spec.shape, dtype=np.int64))
            self.action_parts.append((offset, count, spec.dtype, spec.shape, spec.kind == _DISCRETE))
            offset += _padded(count * spec.dtype.itemsize)
        self.action_size = offset
        # Reply: flat row, alive row, the other observations, then the pickled rest
        offset = len(_STEP_TAG)
        self.flat_offset = offset
        self.flat_count = layout.flat_width
        offset += _padded(4 * layout.flat_width)
        self.alive_offset = offset
        self.alive_count = len(layout.agents)
        offset += _padded(len(layout.agents))
        self.other_parts: list[tuple[int, int, np.dtype, tuple[int, ...]]] = []
        for obs_spec in layout.obs:
            if not obs_spec.in_flat:
                self.other_parts.append((offset, obs_spec.size, obs_spec.dtype, obs_spec.shape))
                offset += _padded(obs_spec.size * obs_spec.dtype.itemsize)
        self.tail_offset = offset

    def action_buffer(self, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """A ``(n, action_size)`` byte buffer (tag included) and, per agent, its typed ``(n, *shape)`` view."""
        buffer = np.zeros((n, self.action_size), dtype=np.uint8)
        buffer[:, : len(_STEP_TAG)] = np.frombuffer(_STEP_TAG, dtype=np.uint8)
        views = []
        for offset, count, dtype, shape, _ in self.action_parts:
            raw = buffer[:, offset : offset + count * dtype.itemsize]
            views.append(raw.view(dtype).reshape((n, *shape)))
        return buffer, views

    def decode_actions(self, message: bytes) -> list[Any]:
        # A writable copy: the env gets fresh arrays it may modify
        data = bytearray(message)
        actions: list[Any] = []
        for offset, count, dtype, shape, is_discrete in self.action_parts:
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            actions.append(array[0] if is_discrete else array.reshape(shape))
        return actions

    def encode_reply(self, storage: _Storage, tail: Any) -> bytes:
        parts = [_STEP_TAG, storage.flat[0].tobytes()]
        parts.append(bytes(self.alive_offset - self.flat_offset - 4 * self.flat_count))
        parts.append(storage.alive[0].tobytes())
        parts.append(bytes(_padded(self.alive_count) - self.alive_count))
        for (_, array), (_, count, dtype, _) in zip(storage.others, self.other_parts):
            parts.append(array[0].tobytes())
            parts.append(bytes(_padded(count * dtype.itemsize) - count * dtype.itemsize))
        parts.append(pickle.dumps(tail, protocol=pickle.HIGHEST_PROTOCOL))
        return b"".join(parts)

    def decode_reply(self, message: bytes, storage: _Storage, i: int) -> Any:
        storage.flat[i] = np.frombuffer(message, dtype=np.float32, count=self.flat_count, offset=self.flat_offset)
        storage.alive[i] = np.frombuffer(message, dtype=np.bool_, count=self.alive_count, offset=self.alive_offset)
        for (_, array), (offset, count, dtype, shape) in zip(storage.others, self.other_parts):
            array[i] = np.frombuffer(message, dtype=dtype, count=count, offset=offset).reshape(shape)
        return pickle.loads(memoryview(message)[self.tail_offset :])


def _plain_infos(agent_infos: Any) -> Any:
    """The agent infos with top-level NumPy scalars as Python scalars (pickled ten times faster).

    Dicts shared between agents (MaMuJoCo gives every agent the same one) stay shared.
    """
    if not isinstance(agent_infos, dict):
        return agent_infos
    converted: dict[int, Any] = {}
    out = {}
    for agent, info in agent_infos.items():
        plain = converted.get(id(info))
        if plain is None:
            if isinstance(info, dict):
                plain = {key: value.item() if isinstance(value, np.generic) else value for key, value in info.items()}
            else:
                plain = info
            converted[id(info)] = plain
        out[agent] = plain
    return out


def _error_payload(error: BaseException, context: str) -> tuple[str, str, str, bool, str]:
    return (
        type(error).__name__,
        str(error),
        traceback.format_exc(),
        isinstance(error, NonFiniteError),
        context,
    )


def _worker(remote: Connection, parent_remote: Connection, env_fn_wrapper: CloudpickleWrapper, index: int) -> None:
    """One copy in its own process.

    Steps are raw byte messages (see :class:`_PipeCodec`); other commands are pickled ``(command, data)`` answered
    with ``("ok", result)``; any exception is answered with ``("error", ...)``.
    """
    parent_remote.close()
    env: Any = None
    runner: _CopyRunner | None = None
    storage: _Storage | None = None
    codec: _PipeCodec | None = None
    try:
        env = env_fn_wrapper.var()
        description = _describe(env, index)
    except Exception as error:
        remote.send(("error", _error_payload(error, "while creating the env")))
        remote.close()
        return
    remote.send(("ok", description))
    while True:
        try:
            message = remote.recv_bytes()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        command = "step"
        try:
            if message[0] == _STEP_BYTE:
                assert runner is not None and storage is not None and codec is not None
                reward, done, info, reset_info = runner.step(codec.decode_actions(message))
                info["agent_infos"] = _plain_infos(info["agent_infos"])
                remote.send_bytes(codec.encode_reply(storage, (reward, done, info, reset_info)))
                continue
            command, data = pickle.loads(message)
            if command == "reset":
                assert runner is not None and storage is not None and codec is not None
                reset_info = runner.reset(*data)
                remote.send_bytes(codec.encode_reply(storage, reset_info))
            elif command == "setup":
                layout, reward_aggregation, t_start = data
                storage = _Storage(layout, 1)
                codec = _PipeCodec(layout)
                runner = _CopyRunner(env, index, layout, storage.copy_views(0), reward_aggregation, t_start)
                remote.send(("ok", None))
            elif command == "render":
                remote.send(("ok", env.render()))
            elif command == "get_attr":
                remote.send(("ok", getattr(env, data)))
            elif command == "has_attr":
                remote.send(("ok", hasattr(env, data)))
            elif command == "set_attr":
                setattr(env, data[0], data[1])
                remote.send(("ok", None))
            elif command == "env_method":
                name, args, kwargs = data
                remote.send(("ok", getattr(env, name)(*args, **kwargs)))
            elif command == "close":
                env.close()
                remote.send(("ok", None))
                break
            else:
                raise NotImplementedError(f"Unknown command {command!r}")
        except KeyboardInterrupt:
            break
        except Exception as error:
            try:
                remote.send(("error", _error_payload(error, f"in {command}()")))
            except (OSError, ValueError):
                break
    remote.close()


class SubprocMultiAgentVecEnv(MultiAgentVecEnv):
    """One worker process per copy (see :class:`MultiAgentVecEnv`), like SB3's ``SubprocVecEnv``.

    Worth it when one env step is expensive compared with a round trip through a pipe (MaMuJoCo with several
    copies) and there are free cores. An exception in a worker raises a ``RuntimeError`` here naming the worker
    and the original exception (with its traceback); non-finite values still raise ``ValueError``; a worker that
    died raises a ``RuntimeError`` naming the worker and its exit code. Nothing hangs on a dead worker: the main
    process waits on the pipe and on the process at once. NumPy scalars in the env's per-agent infos arrive as
    Python scalars.

    :param env_fns: One factory per copy, each returning a new PettingZoo ``ParallelEnv``; pickled with cloudpickle.
    :param reward_aggregation: ``"mean"`` (default) or ``"sum"``: the team reward when the agents' rewards
        differ (identical rewards give that value either way).
    :param start_method: The multiprocessing start method; ``"forkserver"`` where available, else ``"spawn"``.
        With those two, the script creating the env must be guarded by ``if __name__ == "__main__":``.
    :param close_timeout: Seconds to wait for the workers to exit on ``close()`` before terminating them.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Any]],
        reward_aggregation: str = "mean",
        start_method: str | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        self.closed = False
        self.waiting = False
        self.close_timeout = close_timeout
        self.remotes: list[Connection] = []
        self.processes: list[Any] = []
        self._pollers: list[Any] = []
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(start_method)
        try:
            for i, env_fn in enumerate(env_fns):
                remote, work_remote = context.Pipe()
                process = context.Process(  # type: ignore[attr-defined]
                    target=_worker,
                    args=(work_remote, remote, CloudpickleWrapper(env_fn), i),
                    daemon=True,  # if the main process dies, the workers go with it
                    name=f"sb3_hatrpo-env-{i}",
                )
                process.start()
                work_remote.close()
                self.remotes.append(remote)
                self.processes.append(process)
                self._pollers.append(_make_poller(remote, process))
            descriptions = [self._receive(i) for i in range(len(self.remotes))]
            super().__init__(descriptions, reward_aggregation)
            self._codec = _PipeCodec(self._layout)
            self._action_bytes, self._action_views = self._codec.action_buffer(self.num_envs)
            for i in range(self.num_envs):
                self._send(i, ("setup", (self._layout, reward_aggregation, self._t_start)))
            for i in range(self.num_envs):
                self._receive(i)
        except BaseException:
            self.close()
            raise

    # --- communication --------------------------------------------------------------------------------------

    def _died(self, i: int, error: BaseException | None = None) -> RuntimeError:
        process = self.processes[i]
        process.join(timeout=1.0)
        exitcode = process.exitcode
        how = f"exit code {exitcode}" if exitcode is None or exitcode >= 0 else f"killed by signal {-exitcode}"
        message = (
            f"Env worker {i} (pid {process.pid}) died ({how}) without answering: it was killed, or the env crashed "
            "the process (e.g. a segfault or running out of memory)."
        )
        return RuntimeError(message)

    def _receive_bytes(self, i: int) -> bytes:
        """The next message of worker ``i``; raises if it died instead of blocking forever."""
        remote, process, poller = self.remotes[i], self.processes[i], self._pollers[i]
        while not poller(1.0):
            if not process.is_alive():
                raise self._died(i)
        try:
            return remote.recv_bytes()
        except (EOFError, OSError) as error:
            raise self._died(i) from error

    def _raise_reply(self, i: int, message: bytes) -> Any:
        """Unpickle a non-step reply: its payload if ``"ok"``, else raise the worker's error."""
        status, payload = pickle.loads(message)
        if status == "ok":
            return payload
        name, text, worker_traceback, non_finite, context = payload
        if non_finite:
            raise NonFiniteError(text)
        raise RuntimeError(f"Env worker {i} raised {name} {context}: {text}\n\nWorker traceback:\n{worker_traceback}")

    def _receive(self, i: int) -> Any:
        return self._raise_reply(i, self._receive_bytes(i))

    def _receive_step(self, i: int) -> Any:
        """A step or reset reply: stores the arrays of copy ``i`` and returns the pickled rest."""
        message = self._receive_bytes(i)
        if message[0] != _STEP_BYTE:
            return self._raise_reply(i, message)
        return self._codec.decode_reply(message, self._storage, i)

    def _receive_all_steps(self) -> list[Any]:
        """Every worker's step reply; on an error the others are still read, keeping the pipes in step."""
        results: list[Any] = []
        first_error: BaseException | None = None
        for i in range(self.num_envs):
            try:
                results.append(self._receive_step(i))
            except (RuntimeError, ValueError) as error:
                results.append(None)
                if first_error is None:
                    first_error = error
        if first_error is not None:
            raise first_error
        return results

    def _send(self, i: int, message: Any, raw: bool = False) -> None:
        try:
            if raw:
                self.remotes[i].send_bytes(message)
            else:
                self.remotes[i].send(message)
        except (OSError, EOFError) as error:
            raise self._died(i) from error

    # --- VecEnv -------------------------------------------------------------------------------------------------

    def reset(self) -> dict[str, np.ndarray]:
        """Reset every copy (with the seeds/options set by ``seed()``/``set_options()``, used once).

        :return: ``{agent: (num_envs, *obs_shape)}``.
        """
        for i, arguments in enumerate(self._reset_arguments()):
            self._send(i, ("reset", arguments))
        for i, reset_info in enumerate(self._receive_all_steps()):
            self.reset_infos[i] = reset_info
        return self._finish()

    def _step_async(self, actions: list[np.ndarray]) -> None:
        for view, array in zip(self._action_views, actions):
            view[...] = array
        # Set first: if a send fails, close() still collects the answers of the workers that got theirs
        self.waiting = True
        for i, row in enumerate(self._action_bytes):
            self._send(i, row.tobytes(), raw=True)

    def step_wait(self) -> VecEnvStepReturn:
        """Collect the step started by ``step_async``."""
        self.waiting = False
        return self._collect(self._receive_all_steps())

    def close(self) -> None:
        """Stop the workers: ask each to close its env, wait up to ``close_timeout`` s, terminate stragglers.

        Safe to call twice, after a worker died, and from ``__del__``.
        """
        if getattr(self, "closed", True):
            return
        self.closed = True
        remotes = getattr(self, "remotes", [])
        processes = getattr(self, "processes", [])
        for remote, process in zip(remotes, processes):
            if self.waiting and process.is_alive() and remote.poll(self.close_timeout):
                with contextlib.suppress(EOFError, OSError):  # the answer of an unfinished step_async
                    remote.recv_bytes()
            if process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    remote.send(("close", None))
        self.waiting = False
        deadline = time.monotonic() + self.close_timeout
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=1.0)
        for remote in remotes:
            remote.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit module globals may already be gone
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass

    def _request(self, command: str, data: Any, indices: VecEnvIndices) -> list[Any]:
        targets = list(self._get_indices(indices))
        for i in targets:
            self._send(i, (command, data))
        return [self._receive(i) for i in targets]

    def _render(self, index: int) -> Any:
        return self._request("render", None, index)[0]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """``getattr`` on each ParallelEnv copy (the values are pickled back).

        :param attr_name: The attribute.
        :param indices: The copies (all by default).
        :return: One value per copy.
        """
        return self._request("get_attr", attr_name, indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """``setattr`` on each ParallelEnv copy.

        :param attr_name: The attribute.
        :param value: Its new value (pickled to the workers).
        :param indices: The copies (all by default).
        """
        self._request("set_attr", (attr_name, value), indices)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a method of each ParallelEnv copy.

        :param method_name: The method.
        :param method_args: Its positional arguments.
        :param indices: The copies (all by default).
        :param method_kwargs: Its keyword arguments.
        :return: One result per copy.
        """
        return self._request("env_method", (method_name, method_args, method_kwargs), indices)

    def has_attr(self, attr_name: str) -> bool:
        """Whether every copy has the attribute (without pickling its value).

        :param attr_name: The attribute.
        :return: True if all copies have it.
        """
        return all(self._request("has_attr", attr_name, None))


def _make_poller(remote: Connection, process: Any) -> Callable[[float], bool]:
    """A function waiting up to ``timeout`` s until ``remote`` is readable or ``process`` has exited.

    It returns True when there is something to read. Registered once (``select.poll``) rather than building a
    selector per call as ``Connection.poll`` does: that is a measurable part of a step.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        fd = remote.fileno()
        poller.register(fd, select.POLLIN)
        poller.register(process.sentinel, select.POLLIN)

        def poll(timeout: float) -> bool:
            # Only the sentinel firing means the process exited: False, and the caller sees it is not alive
            return any(event_fd == fd for event_fd, _ in poller.poll(timeout * 1000.0))

        return poll

    def wait_any(timeout: float) -> bool:  # Windows
        return remote in wait([remote, process.sentinel], timeout=timeout)

    return wait_any


# ---------------------------------------------------------------------------------------------------------------
# make_vec_env
# ---------------------------------------------------------------------------------------------------------------


class _EnvFactory:
    """A picklable zero-argument factory: builds the env, converts it to a ParallelEnv, applies the wrapper.

    :param source: An env id, a factory, or an env instance.
    :param env_kwargs: Keyword arguments for ``make_env`` or the factory.
    :param wrapper: Applied to the ParallelEnv.
    """

    def __init__(self, source: Any, env_kwargs: dict[str, Any], wrapper: Callable[[Any], Any] | None) -> None:
        self.source = source
        self.env_kwargs = env_kwargs
        self.wrapper = wrapper

    def __call__(self) -> Any:
        from sb3_hatrpo.envs import as_parallel_env, make_env

        if isinstance(self.source, str):
            env = make_env(self.source, **self.env_kwargs)
        elif _is_env_instance(self.source):
            env = self.source
        else:
            env = self.source(**self.env_kwargs)
        env = as_parallel_env(env)
        if self.wrapper is not None:
            env = as_parallel_env(self.wrapper(env))
        return env


def _is_env_instance(obj: Any) -> bool:
    from pettingzoo import AECEnv, ParallelEnv

    return isinstance(obj, (ParallelEnv, AECEnv))


_VecEnvClass = type[DummyMultiAgentVecEnv] | type[SubprocMultiAgentVecEnv]


def _vec_env_class(vec_env_cls: str | type[MultiAgentVecEnv]) -> _VecEnvClass:
    if isinstance(vec_env_cls, str):
        classes: dict[str, _VecEnvClass] = {
            "dummy": DummyMultiAgentVecEnv,
            "subproc": SubprocMultiAgentVecEnv,
        }
        if vec_env_cls not in classes:
            raise ValueError(f"Unknown vec_env_cls {vec_env_cls!r}; valid: 'dummy', 'subproc' or a class.")
        return classes[vec_env_cls]
    if isinstance(vec_env_cls, type) and issubclass(vec_env_cls, (DummyMultiAgentVecEnv, SubprocMultiAgentVecEnv)):
        return vec_env_cls
    raise ValueError(
        f"vec_env_cls must be 'dummy', 'subproc', DummyMultiAgentVecEnv or SubprocMultiAgentVecEnv (or a subclass), "
        f"got {vec_env_cls!r}."
    )


def make_vec_env(
    env: Any,
    n_envs: int = 1,
    seed: int | None = None,
    vec_env_cls: str | type[MultiAgentVecEnv] = "dummy",
    wrapper: Callable[[Any], Any] | None = None,
    env_kwargs: dict[str, Any] | None = None,
    reward_aggregation: str = "mean",
    start_method: str | None = None,
) -> MultiAgentVecEnv:
    """Create ``n_envs`` copies of a multi-agent env as one :class:`MultiAgentVecEnv`.

    :param env: An env id for :func:`sb3_hatrpo.envs.make_env` (e.g. ``"mamujoco:HalfCheetah-2x3"``), a factory
        returning a PettingZoo ParallelEnv or AEC env (called with ``env_kwargs``), an env instance (used as is
        for ``n_envs=1``, deep-copied for more), or an existing :class:`MultiAgentVecEnv` (returned as is).
    :param n_envs: Number of copies.
    :param seed: If given, ``vec_env.seed(seed)``: copy ``i`` is reset with ``seed + i`` at the first reset.
    :param vec_env_cls: ``"dummy"`` (all copies in this process), ``"subproc"`` (one process per copy) or one of
        the two classes.
    :param wrapper: Applied to each ParallelEnv, e.g. a SuperSuit wrapper.
    :param env_kwargs: Keyword arguments for ``make_env`` or the factory.
    :param reward_aggregation: ``"mean"`` or ``"sum"``: the team reward when the agents' rewards differ.
    :param start_method: Multiprocessing start method of the subprocess version (ignored by the dummy one).
    :return: The vectorised env.
    """
    if isinstance(env, MultiAgentVecEnv):
        return env
    if n_envs < 1:
        raise ValueError(f"n_envs must be at least 1, got {n_envs}.")
    cls = _vec_env_class(vec_env_cls)
    env_kwargs = dict(env_kwargs or {})
    if _is_env_instance(env):
        if env_kwargs:
            raise ValueError("env_kwargs cannot be applied to an env instance; pass an env id or a factory.")
        copies = [env]
        for _ in range(n_envs - 1):
            try:
                copies.append(copy.deepcopy(env))
            except Exception as error:
                raise ValueError(
                    f"Cannot make {n_envs} copies of the {type(env).__name__} instance (deepcopy failed: {error}); "
                    "pass a zero-argument factory that creates a new env per call, or an env id."
                ) from error
        factories = [_EnvFactory(instance, {}, wrapper) for instance in copies]
    elif isinstance(env, str) or callable(env):
        factories = [_EnvFactory(env, env_kwargs, wrapper) for _ in range(n_envs)]
    else:
        # Let as_parallel_env explain what is wrong with it
        from sb3_hatrpo.envs import as_parallel_env

        as_parallel_env(env)
        raise TypeError(f"Cannot make a vectorised env from a {type(env).__name__}.")
    vec_env: MultiAgentVecEnv
    if issubclass(cls, SubprocMultiAgentVecEnv):
        vec_env = cls(factories, reward_aggregation=reward_aggregation, start_method=start_method)
    else:
        vec_env = cls(factories, reward_aggregation=reward_aggregation)
    if seed is not None:
        vec_env.seed(seed)
    return vec_env
