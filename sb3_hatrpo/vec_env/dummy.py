"""``DummyMultiAgentVecEnv``: every copy in this process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from sb3_hatrpo.vec_env.base import MultiAgentVecEnv
from sb3_hatrpo.vec_env.layout import _describe
from sb3_hatrpo.vec_env.runner import _CopyRunner


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
