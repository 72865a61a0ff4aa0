"""Layout and storage: what each agent's observation and action look like once vectorised, and the preallocated
arrays the copies write into (shared by the main process and the subprocess workers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces

from sb3_hatrpo.action_spaces import check_action_space
from sb3_hatrpo.envs.global_state import state_space_of

# Action kinds
_BOX, _DISCRETE, _MULTI_DISCRETE = 0, 1, 2
_NO_BOUNDS = np.zeros(0)


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
    check_action_space(agent, space)  # after it: a Box with finite bounds, Discrete or MultiDiscrete
    if isinstance(space, spaces.Box):
        return _ActSpec(agent, _BOX, space.shape, space.dtype, space.low, space.high)
    if isinstance(space, spaces.Discrete):
        return _ActSpec(agent, _DISCRETE, (), np.dtype(np.int64), _NO_BOUNDS, _NO_BOUNDS)
    return _ActSpec(agent, _MULTI_DISCRETE, tuple(space.shape or ()), np.dtype(np.int64), _NO_BOUNDS, _NO_BOUNDS)


@dataclass(frozen=True)
class _Layout:
    """The storage plan shared by the main process and the workers."""

    agents: list[str]
    obs: list[_ObsSpec]
    actions: list[_ActSpec]
    flat_width: int  # float32 observations, then the state
    state_offset: int
    state_dim: int
    obs_spaces: tuple[spaces.Space, ...] = ()  # per agent, what the runner checks each observation against


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
    return _Layout(
        list(agents),
        specs,
        list(act_specs),
        offset + state_dim,
        offset,
        state_dim,
        tuple(obs_spaces[agent] for agent in agents),
    )


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
