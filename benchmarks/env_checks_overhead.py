"""Cost of checking env outputs (agent names, observation shapes, types and ranges) on every reset and step.

One process, one env: the checks of every copy are switched on and off between interleaved blocks, so
both modes see the same machine load. Two figures: ``MultiAgentVecEnv.step()`` alone (random actions,
the upper bound of the slowdown) and HATRPO training steps/s with ``benchmarks/throughput.py``'s
settings (MaMuJoCo HalfCheetah 2x3, 2 copies, n_steps 1024).

    python benchmarks/env_checks_overhead.py --steps 4000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch as th

from sb3_hatrpo import HATRPO, make_vec_env

ENV_ID = "mamujoco:HalfCheetah-2x3"


class _Replay:
    """Stands in for a copy's env: ``step()`` returns the same recorded outputs at once."""

    def __init__(self, agents: list[str], outputs: tuple) -> None:
        self.agents = agents
        self.outputs = outputs

    def step(self, actions: dict) -> tuple:
        return self.outputs


def set_checks(env, on: bool, saved: dict) -> None:
    """Switch the output checks of every copy of an in-process vectorised env."""
    for runner in env._runners:
        saved.setdefault(id(runner), runner.checks)
        runner.checks = saved[id(runner)] if on else None


def time_steps(env, actions: list[dict], on: bool, saved: dict) -> float:
    set_checks(env, on, saved)
    start = time.perf_counter()
    for action in actions:
        env.step(action)
    return time.perf_counter() - start


def time_training(model: HATRPO, timesteps: int, on: bool, saved: dict) -> float:
    set_checks(model.env, on, saved)
    start = time.perf_counter()
    model.learn(timesteps, reset_num_timesteps=False)
    return timesteps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000, help="step() calls per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks of each mode")
    parser.add_argument("--train-timesteps", type=int, default=4096, help="training steps per timed block (0: skip)")
    parser.add_argument("--n-envs", type=int, default=2)
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    warnings.filterwarnings("ignore")

    env = make_vec_env(ENV_ID, n_envs=args.n_envs, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    actions = [
        {a: rng.uniform(-1, 1, (args.n_envs, *env.action_space[a].shape)).astype(np.float32) for a in env.agents}
        for _ in range(args.steps)
    ]
    saved: dict = {}
    time_steps(env, actions[: args.steps // 4], True, saved)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.repeats):
        for on in (True, False) if repeat % 2 == 0 else (False, True):
            times[on].append(time_steps(env, actions, on, saved))
    # The checks alone, without the physics noise: one copy's step() replaying a real MaMuJoCo step's outputs
    # (the env's step returns them at once), on vs off; the difference is all the checks add to a copy-step
    runner = env._runners[0]
    real_env = runner.env
    outputs = real_env.step({a: np.zeros(real_env.action_space(a).shape, np.float32) for a in runner.agents})
    runner.env = _Replay(real_env.agents, outputs)
    copy_actions = [np.zeros(env.action_space[a].shape, np.float32) for a in env.agents]
    micro: dict[bool, float] = {}
    for on in (True, False) * 3:
        set_checks(env, on, saved)
        start = time.perf_counter()
        for _ in range(20000):
            runner.step(copy_actions)
        micro[on] = min(micro.get(on, float("inf")), (time.perf_counter() - start) / 20000 * 1e6)
    runner.env = real_env
    set_checks(env, True, saved)
    env.close()
    on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
    step_us = off_s / args.steps / args.n_envs * 1e6
    print(
        f"one copy's step() on replayed outputs: {micro[True]:.2f} us with checks, {micro[False]:.2f} us without: "
        f"+{micro[True] - micro[False]:.2f} us = {(micro[True] - micro[False]) / step_us:.2%} of a {step_us:.0f} us "
        "copy-step"
    )
    per_step = (on_s - off_s) / args.steps / args.n_envs * 1e6
    print(f"step(): {args.steps} calls x {args.n_envs} copies, median of {args.repeats} interleaved blocks")
    print(f"  checks on : {args.steps / on_s:8.0f} calls/s   blocks {[round(t, 3) for t in times[True]]}")
    print(f"  checks off: {args.steps / off_s:8.0f} calls/s   blocks {[round(t, 3) for t in times[False]]}")
    paired = statistics.median(on / off for on, off in zip(times[True], times[False]))
    print(
        f"  on/off time ratio {on_s / off_s:.4f} of the medians ({per_step:+.2f} us per copy-step), {paired:.4f} paired"
    )

    if args.train_timesteps > 0:
        model = HATRPO(
            "MlpPolicy",
            make_vec_env(ENV_ID, n_envs=args.n_envs, seed=0),
            n_steps=1024,
            batch_size=128,
            cg_max_steps=10,
            n_critic_updates=5,
            policy_kwargs=dict(net_arch=[64, 64]),
            seed=0,
        )
        model.learn(1024 * args.n_envs)  # warm-up
        rates: dict[bool, list[float]] = {True: [], False: []}
        saved = {}
        for repeat in range(args.repeats):
            for on in (True, False) if repeat % 2 == 0 else (False, True):
                rates[on].append(time_training(model, args.train_timesteps, on, saved))
        model.env.close()
        on_r, off_r = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"training: {args.train_timesteps} steps per block, median of {args.repeats} interleaved blocks")
        print(f"  checks on : {on_r:6.0f} steps/s   blocks {[round(r) for r in rates[True]]}")
        print(f"  checks off: {off_r:6.0f} steps/s   blocks {[round(r) for r in rates[False]]}")
        paired_rate = statistics.median(on / off for on, off in zip(rates[True], rates[False]))
        print(f"  slowdown {1 - on_r / off_r:+.2%} of the medians, {1 - paired_rate:+.2%} paired")


if __name__ == "__main__":
    main()
