"""``MultiAgentVecEnv``: the base class of the vectorised multi-agent envs (the contract, action preparation,
collecting step results, non-finite checks, rendering)."""

from __future__ import annotations

import math
import time
import warnings
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from sb3_hatrpo.env_spec import EnvSpec
from sb3_hatrpo.vec_env.errors import NON_FINITE_HINT, NonFiniteError
from sb3_hatrpo.vec_env.layout import (
    _BOX,
    _DISCRETE,
    _action_spec,
    _EnvDescription,
    _make_layout,
    _Storage,
    _vectorised_observation_space,
)

REWARD_AGGREGATIONS = ("mean", "sum")


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
    # The env id, env_kwargs and wrapper the copies were made from (set by make_vec_env for an id)
    env_spec: EnvSpec | None = None

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
                        f"since reset: {array[i]}. {NON_FINITE_HINT}"
                    )
            if not np.isfinite(storage.states[i]).all():
                raise NonFiniteError(
                    f"Non-finite state in env copy {i} at step {self._steps[i]} since reset: {storage.states[i]}. "
                    f"{NON_FINITE_HINT}"
                )

    def _check_terminal(self, i: int, info: dict[str, Any]) -> None:
        step = info["episode"]["l"]
        for spec in self._layout.obs:
            value = info["terminal_observation"][spec.agent]
            if spec.in_flat and not np.isfinite(value).all():
                raise NonFiniteError(
                    f"Non-finite observation for agent {spec.agent!r} in env copy {i} at step {step} since reset "
                    f"(the last of its episode): {value}. {NON_FINITE_HINT}"
                )
        if not np.isfinite(info["terminal_state"]).all():
            raise NonFiniteError(
                f"Non-finite state in env copy {i} at step {step} since reset (the last of its episode): "
                f"{info['terminal_state']}. {NON_FINITE_HINT}"
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
