"""Does the subprocess vec env's own pipe protocol pay off against SB3's ``SubprocVecEnv`` machinery?

``SubprocMultiAgentVecEnv`` sends a step as raw bytes (actions one way; the float32 observations, state and alive
mask the other, then a small pickled tail). The alternative measured here rebuilds the subprocess path on SB3's
``SubprocVecEnv`` (its worker loop and pickled ``(obs, reward, done, info)`` tuples): each copy's runner sits in a
small gymnasium adapter whose observation is the copy's storage row as a ``Dict``, which ``SubprocVecEnv`` stacks.
Both write into the same storage and share the same checks, so the difference is the transport alone.

Env steps per second with fixed actions, the variants interleaved in every repeat (the machine is noisy)::

    python benchmarks/vec_env_pipe.py --env mamujoco:HalfCheetah-2x3 --n-envs 2 4 --steps 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import SubprocVecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from sb3_hatrpo.vec_env import MultiAgentVecEnv, make_vec_env
from sb3_hatrpo.vec_env.factory import _EnvFactory
from sb3_hatrpo.vec_env.layout import _describe, _Layout, _Storage
from sb3_hatrpo.vec_env.runner import _CopyRunner


class _RunnerAsGymEnv(gym.Env):
    """One copy behind the gymnasium API SB3's worker expects; the runner auto-resets, so SB3 never sees a done."""

    def __init__(self, env_fn: Callable[[], Any], layout: _Layout, reward_aggregation: str, t_start: float) -> None:
        self.env = env_fn()
        self.storage = _Storage(layout, 1)
        self.runner = _CopyRunner(self.env, 0, layout, self.storage.copy_views(0), reward_aggregation, t_start)
        parts: dict[str, spaces.Space] = {
            "flat": spaces.Box(-np.inf, np.inf, (layout.flat_width,), np.float32),
            "alive": spaces.MultiBinary(len(layout.agents)),
        }
        for j, array in self.storage.others:
            parts[f"obs{j}"] = spaces.Box(-np.inf, np.inf, array.shape[1:], array.dtype)  # type: ignore[arg-type]
        self.observation_space = spaces.Dict(parts)
        self.action_space = spaces.Box(-1, 1, (1,))  # unused: SB3's worker passes the actions on as they come
        self.render_mode = None

    def _observation(self) -> dict[str, np.ndarray]:
        out = {"flat": self.storage.flat[0].copy(), "alive": self.storage.alive[0].copy()}
        for j, array in self.storage.others:
            out[f"obs{j}"] = array[0].copy()
        return out

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        info = self.runner.reset(seed, options)
        return self._observation(), info

    def step(self, action: Any) -> Any:
        reward, done, info, reset_info = self.runner.step(action)
        return self._observation(), reward, False, False, {"copy": (reward, done, info, reset_info)}


class Sb3SubprocMultiAgentVecEnv(MultiAgentVecEnv):
    """The subprocess path rebuilt on SB3's ``SubprocVecEnv`` (a prototype for this measurement only)."""

    def __init__(self, env_fns: Sequence[Callable[[], Any]], reward_aggregation: str = "mean") -> None:
        probe = env_fns[0]()
        description = _describe(probe, 0)
        probe.close()
        super().__init__([description] * len(env_fns), reward_aggregation)
        layout, t_start = self._layout, self._t_start

        def adapter(fn: Callable[[], Any]) -> Callable[[], gym.Env]:
            return lambda: _RunnerAsGymEnv(fn, layout, reward_aggregation, t_start)

        self.inner = SubprocVecEnv([adapter(fn) for fn in env_fns], start_method="forkserver")

    def reset(self) -> dict[str, np.ndarray]:
        for i, (seed, options) in enumerate(self._reset_arguments()):
            self.inner._seeds[i], self.inner._options[i] = seed, options or {}
        self._store(self.inner.reset())
        self.reset_infos = list(self.inner.reset_infos)
        return self._finish()

    def _store(self, obs: Any) -> None:
        self._storage.flat[:] = obs["flat"]
        self._storage.alive[:] = obs["alive"]
        for j, array in self._storage.others:
            array[:] = obs[f"obs{j}"]

    def _step_async(self, actions: list[np.ndarray]) -> None:
        per_copy = [[array[i] for array in actions] for i in range(self.num_envs)]
        for remote, action in zip(self.inner.remotes, per_copy):
            remote.send(("step", action))
        self.inner.waiting = True

    def step_wait(self) -> VecEnvStepReturn:
        obs, _, _, infos = self.inner.step_wait()
        self._store(obs)
        return self._collect(info["copy"] for info in infos)

    def close(self) -> None:
        self.inner.close()

    def _render(self, index: int) -> Any:
        raise NotImplementedError

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        raise NotImplementedError

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise NotImplementedError

    def env_method(self, method_name: str, *args: Any, indices: VecEnvIndices = None, **kwargs: Any) -> list[Any]:
        raise NotImplementedError

    def has_attr(self, attr_name: str) -> bool:
        return False


def steps_per_second(vec_env: MultiAgentVecEnv, steps: int) -> float:
    """Env steps (copies x vec steps) per second with fixed random actions, after a warm-up."""
    rng = np.random.default_rng(0)
    vec_env.reset()
    actions = {}
    for agent, space in vec_env.action_space.spaces.items():
        space.seed(int(rng.integers(1 << 31)))
        actions[agent] = np.stack([space.sample() for _ in range(vec_env.num_envs)])
    for _ in range(50):
        vec_env.step(actions)
    start = time.perf_counter()
    for _ in range(steps):
        vec_env.step(actions)
    elapsed = time.perf_counter() - start
    return steps * vec_env.num_envs / elapsed


def build(kind: str, env_id: str, n_envs: int) -> MultiAgentVecEnv:
    if kind == "sb3-subproc":
        return Sb3SubprocMultiAgentVecEnv([_EnvFactory(env_id, {}, None) for _ in range(n_envs)])
    return make_vec_env(env_id, n_envs=n_envs, seed=0, vec_env_cls=kind)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="mamujoco:HalfCheetah-2x3")
    parser.add_argument("--n-envs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=2000, help="vec env steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    kinds = ["dummy", "subproc", "sb3-subproc"]
    for n_envs in args.n_envs:
        rates: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:  # interleaved: every repeat sees the same machine state for all three
                vec_env = build(kind, args.env, n_envs)
                try:
                    rates[kind].append(steps_per_second(vec_env, args.steps))
                finally:
                    vec_env.close()
        medians = {kind: float(np.median(values)) for kind, values in rates.items()}
        print(f"{args.env}, n_envs={n_envs}: env steps/s, median of {args.repeats} interleaved repeats")
        for kind in kinds:
            values = ", ".join(f"{v:,.0f}" for v in rates[kind])
            print(f"  {kind:12s} {medians[kind]:9,.0f}   ({values})")
        print(f"  own pipe protocol / SB3 SubprocVecEnv: {medians['subproc'] / medians['sb3-subproc']:.2f}x")


if __name__ == "__main__":
    main()
