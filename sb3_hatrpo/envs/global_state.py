"""The global state a centralised critic sees.

An env *declares* a global state by having a ``state_space`` attribute (PettingZoo's convention), or by being
Multi-Agent MuJoCo, whose ``state()`` is the observation of the underlying single-agent env (it has no
``state_space``). For those envs the state is ``env.state()``. Every other env gets the concatenation of the
flattened observations of ``possible_agents`` (zeros for agents absent from the observation dict).

The source is chosen from the declaration rather than by calling ``state()`` so that the space
(:func:`state_space_of`) and the values (:func:`global_state`) always agree: the size of ``state()`` can only be
known after a reset, but the space is needed before it to build the critic.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from gymnasium import spaces

__all__ = ["GlobalStateReader", "global_state", "state_space_of"]


def _declared_state_space(env: Any) -> spaces.Space | None:
    """The state space an env declares: ``env.state_space``, or MaMuJoCo's single-agent observation space."""
    try:
        space = env.state_space
    except AttributeError:
        space = None
    if isinstance(space, spaces.Space):
        return space
    # MaMuJoCo: state() is ``single_agent_env.unwrapped._get_obs()``, the single-agent observation
    single = getattr(env, "single_agent_env", None)
    single_space = getattr(single, "observation_space", None)
    if isinstance(single_space, spaces.Space):
        return single_space
    return None


def _flat_float32_box(space: spaces.Space, what: str) -> spaces.Box:
    """``space`` flattened into a 1-D float32 Box (Discrete parts become one-hot blocks, as in ``spaces.flatten``)."""
    flat = space if isinstance(space, spaces.Box) else spaces.flatten_space(space)
    if not isinstance(flat, spaces.Box):
        raise ValueError(f"The {what} {space} cannot be flattened into a Box (got {flat}).")
    low = np.asarray(flat.low, dtype=np.float32).reshape(-1)
    high = np.asarray(flat.high, dtype=np.float32).reshape(-1)
    return spaces.Box(low=low, high=high, dtype=np.float32)


def _concatenated_observation_space(env: Any) -> spaces.Box:
    """The flattened observation spaces of ``possible_agents``, end to end, as one float32 Box."""
    boxes = [
        _flat_float32_box(env.observation_space(agent), f"observation space of agent {agent!r}")
        for agent in env.possible_agents
    ]
    if not boxes:
        raise ValueError("The env has no possible_agents, so it has no global state.")
    low = np.concatenate([box.low for box in boxes])
    high = np.concatenate([box.high for box in boxes])
    return spaces.Box(low=low, high=high, dtype=np.float32)


def state_space_of(env: Any) -> spaces.Box:
    """The global state space of a PettingZoo ParallelEnv, as a flat float32 Box.

    ``env.state_space`` if the env has one; for MaMuJoCo (``state()`` but no ``state_space``) the space of
    ``env.single_agent_env.observation_space``; otherwise the concatenation of the flattened observation spaces
    of ``env.possible_agents``.

    :param env: A PettingZoo ``ParallelEnv`` (or any object with the same interface).
    :return: A 1-D float32 ``Box``.
    """
    declared = _declared_state_space(env)
    if declared is not None:
        return _flat_float32_box(declared, "state space")
    return _concatenated_observation_space(env)


class GlobalStateReader:
    """Reads the global state of one env, having resolved once where it comes from.

    The hot loop of a vectorised env calls :meth:`write` every step, so the choice between ``env.state()`` and
    the concatenated observations is made on the first call and cached here instead of being retried.

    :param env: A PettingZoo ``ParallelEnv``.
    """

    def __init__(self, env: Any) -> None:
        self.env = env
        declared = _declared_state_space(env)
        self._use_state = declared is not None
        self.space: spaces.Box = (
            _flat_float32_box(declared, "state space") if declared is not None else _concatenated_observation_space(env)
        )
        # Whether env.state() has been seen to work (then it is called without a try)
        self._state_works = False
        self._size_checked = False
        self._ravel = True
        self._state_fn: Callable[[], Any] = env.state if self._use_state else _no_state
        self._concat_cache: _ObservationConcatenator | None = None

    @property
    def _concat(self) -> _ObservationConcatenator:
        # Built on first use: envs with a state() need it only if state() turns out not to be implemented
        if self._concat_cache is None:
            self._concat_cache = _ObservationConcatenator(self.env)
        return self._concat_cache

    @property
    def uses_state(self) -> bool:
        """Whether the values come from ``env.state()`` (else from the concatenated observations)."""
        return self._use_state

    def _state(self) -> Any | None:
        """``env.state()``, or None once it turned out not to be implemented."""
        if self._state_works:
            return self._state_fn()
        if not self._use_state:
            return None
        try:
            state = self._state_fn()
        except (NotImplementedError, AttributeError):
            self._use_state = False
            return None
        self._state_works = True
        return state

    def __call__(self, obs: Mapping[Any, Any]) -> np.ndarray:
        """The global state for the observations ``obs`` just returned by the env.

        :param obs: The env's observation dict ``{agent: obs}``; agents missing from it count as zeros.
        :return: A new 1-D float32 array.
        """
        state = self._state()
        if state is not None:
            return np.array(state, dtype=np.float32).reshape(-1)
        return self._concat(obs)

    def write(self, obs: Mapping[Any, Any], out: np.ndarray) -> None:
        """Write the global state into ``out`` (a preallocated 1-D float32 array of the size of :attr:`space`).

        :param obs: The env's observation dict ``{agent: obs}``.
        :param out: Where to write; its size is checked against the state on the first call.
        """
        if self._size_checked:
            if self._state_works:
                state = self._state_fn()
                value = np.ravel(state) if self._ravel else state
                if getattr(value, "shape", None) != out.shape and np.shape(value) != out.shape:
                    # Checked every step: NumPy would broadcast a (1,) state over the whole row
                    raise ValueError(
                        f"env.state() returned {np.size(value)} values (shape {np.shape(state)}) but the state "
                        f"space has {out.size}; state() must always return the same number of values."
                    )
                out[...] = value
            else:
                self._concat.write(obs, out)
            return
        state = self._state()
        value = self._concat(obs) if state is None else np.array(state, dtype=np.float32).reshape(-1)
        if value.shape != out.shape:
            source = "env.state()" if self._use_state else "the concatenated observations"
            raise ValueError(
                f"The global state from {source} has {value.size} values but the state space has {out.size}. "
                "If the env declares a state_space, its state() must be implemented and match it."
            )
        out[...] = value
        self._size_checked = True
        # A 1-D state is written as it is; only other shapes need a ravel each step
        self._ravel = state is None or np.ndim(state) != 1


def _no_state() -> Any:
    raise NotImplementedError


class _ObservationConcatenator:
    """Concatenates the flattened observations of ``possible_agents`` (zeros for absent agents).

    It keeps no reference to the env, so it can be cached in a weak-keyed dict without keeping the env alive.

    :param env: The env whose agents and observation spaces to use.
    """

    def __init__(self, env: Any) -> None:
        # (agent, observation space, slice of the state, whether a plain ravel flattens it)
        self._parts: list[tuple[Any, spaces.Space, slice, bool]] = []
        offset = 0
        for agent in env.possible_agents:
            space = env.observation_space(agent)
            size = spaces.flatdim(space)
            self._parts.append((agent, space, slice(offset, offset + size), isinstance(space, spaces.Box)))
            offset += size
        self.size = offset

    def write(self, obs: Mapping[Any, Any], out: np.ndarray) -> None:
        for agent, space, part, is_box in self._parts:
            value = obs.get(agent)
            if value is None:
                out[part] = 0.0
            elif is_box:
                out[part] = np.ravel(value)
            else:
                out[part] = spaces.flatten(space, value)

    def __call__(self, obs: Mapping[Any, Any]) -> np.ndarray:
        out = np.empty(self.size, dtype=np.float32)
        self.write(obs, out)
        return out


# Per env: None when its state comes from state(), else the concatenator. Resolved on the first call of
# global_state() so later calls do not try/except; weak keys so the cache does not keep envs alive.
_RESOLVED: weakref.WeakKeyDictionary[Any, _ObservationConcatenator | None] = weakref.WeakKeyDictionary()


def global_state(env: Any, obs: Mapping[Any, Any]) -> np.ndarray:
    """The global state of a PettingZoo ParallelEnv, flat float32.

    ``env.state()`` when the env declares a state (see :func:`state_space_of`) and implements it
    (``NotImplementedError``/``AttributeError`` fall back); otherwise the concatenation of the flattened
    observations of ``env.possible_agents``, zeros for agents absent from ``obs``. Which of the two applies is
    cached per env.

    :param env: A PettingZoo ``ParallelEnv``.
    :param obs: The observation dict the env just returned.
    :return: A new 1-D float32 array.
    """
    try:
        known = env in _RESOLVED
    except TypeError:  # not hashable or not weak-referenceable: no cache
        return GlobalStateReader(env)(obs)
    if not known:
        reader = GlobalStateReader(env)
        value = reader(obs)
        _RESOLVED[env] = None if reader.uses_state else reader._concat
        return value
    concat = _RESOLVED[env]
    if concat is None:
        return np.array(env.state(), dtype=np.float32).reshape(-1)
    return concat(obs)
