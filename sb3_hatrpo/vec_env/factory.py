"""``make_vec_env``: ``n_envs`` copies of an env id, factory or instance as one ``MultiAgentVecEnv``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from sb3_hatrpo.env_spec import EnvSpec
from sb3_hatrpo.vec_env.base import MultiAgentVecEnv
from sb3_hatrpo.vec_env.dummy import DummyMultiAgentVecEnv
from sb3_hatrpo.vec_env.subproc import SubprocMultiAgentVecEnv


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
    step_timeout: float | None = None,
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
    :param step_timeout: Subprocess version only: seconds a worker may take per ``reset()``/``step()`` before it is
        terminated and :class:`~sb3_hatrpo.vec_env.errors.EnvTimeoutError` names it (None: no limit).
    :return: The vectorised env.
    """
    if isinstance(env, MultiAgentVecEnv):
        return env
    if n_envs < 1:
        raise ValueError(f"n_envs must be at least 1, got {n_envs}.")
    cls = _vec_env_class(vec_env_cls)
    if step_timeout is not None and not issubclass(cls, SubprocMultiAgentVecEnv):
        raise ValueError("step_timeout needs vec_env_cls='subproc': a hung env in this process cannot be interrupted")
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
        vec_env = cls(
            factories, reward_aggregation=reward_aggregation, start_method=start_method, step_timeout=step_timeout
        )
    else:
        vec_env = cls(factories, reward_aggregation=reward_aggregation)
    if isinstance(env, str):
        # Saved with a model, so that it can rebuild this env (HATRPO.make_env, HATRPO.load(path, env=id))
        vec_env.env_spec = EnvSpec(env, env_kwargs, wrapper)
    if seed is not None:
        vec_env.seed(seed)
    return vec_env
