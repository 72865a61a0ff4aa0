"""Training throughput: HATRPO on MaMuJoCo HalfCheetah-2x3 against sb3-contrib TRPO on HalfCheetah-v5.

Both run in this process, side by side, with matching settings (n_steps, n_envs, network
sizes, CG steps, critic updates, minibatch size), so their ratio is meaningful on a shared
machine. Also prints the raw env steps/s with random actions: the ceiling of each loop.

    python benchmarks/throughput.py --timesteps 40960 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch as th
from sb3_contrib import TRPO
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env

from sb3_hatrpo import HATRPO, make_vec_env


def raw_multiagent_steps_per_second(n_steps: int) -> float:
    from sb3_hatrpo.envs import make_env

    env = make_env("mamujoco:HalfCheetah-2x3")
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(n_steps):
        actions = {agent: env.action_space(agent).sample() for agent in env.agents}
        env.step(actions)
        if not env.agents:
            env.reset()
    return n_steps / (time.perf_counter() - start)


def raw_single_agent_steps_per_second(n_steps: int) -> float:
    env = gym.make("HalfCheetah-v5")
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(n_steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return n_steps / (time.perf_counter() - start)


def train_steps_per_second(algo: str, timesteps: int, settings: dict, vec_env_cls: str) -> float:
    n_envs = settings["n_envs"]
    common = dict(
        n_steps=settings["n_steps"],
        batch_size=settings["batch_size"],
        cg_max_steps=settings["cg_max_steps"],
        n_critic_updates=settings["n_critic_updates"],
        target_kl=0.01,
        policy_kwargs=dict(net_arch=dict(pi=settings["net_arch"], vf=settings["net_arch"])),
        seed=0,
        device="cpu",
    )
    if algo == "hatrpo":
        env = make_vec_env("mamujoco:HalfCheetah-2x3", n_envs=n_envs, seed=0, vec_env_cls=vec_env_cls)
        model = HATRPO("MlpPolicy", env, num_threads=None, **common)  # --threads, as TRPO
    else:
        from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

        cls = SubprocVecEnv if vec_env_cls == "subproc" else DummyVecEnv
        env = sb3_make_vec_env("HalfCheetah-v5", n_envs=n_envs, seed=0, vec_env_cls=cls)
        model = TRPO("MlpPolicy", env, **common)
    model.learn(settings["n_steps"] * n_envs)  # warm-up: first rollout, allocations, thread pools
    start = time.perf_counter()
    model.learn(timesteps, reset_num_timesteps=False)
    elapsed = time.perf_counter() - start
    env.close()
    return timesteps / elapsed


# Where an HATRPO iteration spends its time: (label, file name(s), function) as cProfile names them
PROFILE_PARTS = [
    ("env step (MuJoCo + PettingZoo wrappers)", ("vec_env/dummy.py", "vec_env/subproc.py"), "step_wait"),
    ("actor sampling in the rollout", "policies.py", "sample_actions"),
    ("critic values in the rollout", "hatrpo.py", "_values"),
    ("rollout buffer add", "buffers.py", "add"),
    ("GAE", "buffers.py", "compute_returns_and_advantage"),
    ("critic regression", "hatrpo.py", "_train_critic"),
    ("trust-region directions (gradient + CG)", "trust_region.py", "direction"),
    ("  of which Fisher-vector products", "trust_region.py", "fisher_vector_product"),
    ("line searches", "trust_region.py", "step"),
]


def profile_hatrpo(timesteps: int, settings: dict, vec_env_cls: str) -> None:
    """cProfile one HATRPO run and print the share of wall time of each part of an iteration."""
    import cProfile
    import pstats

    env = make_vec_env("mamujoco:HalfCheetah-2x3", n_envs=settings["n_envs"], seed=0, vec_env_cls=vec_env_cls)
    model = HATRPO(
        "MlpPolicy",
        env,
        num_threads=None,  # --threads
        n_steps=settings["n_steps"],
        batch_size=settings["batch_size"],
        cg_max_steps=settings["cg_max_steps"],
        n_critic_updates=settings["n_critic_updates"],
        target_kl=0.01,
        policy_kwargs=dict(net_arch=settings["net_arch"]),
        seed=0,
    )
    model.learn(settings["n_steps"] * settings["n_envs"])
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    model.learn(timesteps, reset_num_timesteps=False)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    print(f"profile of HATRPO, {timesteps} steps in {total:.1f} s (cumulative time per part):")
    for label, filename, function in PROFILE_PARTS:
        seconds = sum(
            entry[3] for (path, _, name), entry in stats.items() if path.endswith(filename) and name == function
        )
        print(f"  {label:45s} {seconds:6.2f} s  {seconds / total:5.1%}")
    env.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=40960, help="timed training steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each algorithm")
    parser.add_argument("--n-envs", type=int, default=2)
    parser.add_argument("--n-steps", type=int, default=1024)
    parser.add_argument("--vec-env", choices=["dummy", "subproc"], default="dummy")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is as fast as 2 for small MLPs)")
    parser.add_argument("--profile", action="store_true", help="also profile one HATRPO run: where the time goes")
    args = parser.parse_args(argv)
    th.set_num_threads(args.threads)
    settings = dict(
        n_envs=args.n_envs,
        n_steps=args.n_steps,
        batch_size=128,
        cg_max_steps=15,
        n_critic_updates=10,
        net_arch=[64, 64],
    )
    print(f"settings: {settings}, vec_env={args.vec_env}, torch threads={args.threads}")
    raw_ma = raw_multiagent_steps_per_second(5000)
    raw_sa = raw_single_agent_steps_per_second(5000)
    print(f"raw env steps/s (random actions): MaMuJoCo HalfCheetah-2x3 {raw_ma:,.0f}, HalfCheetah-v5 {raw_sa:,.0f}")
    results: dict[str, list[float]] = {"hatrpo": [], "trpo": []}
    for repeat in range(args.repeats):
        for algo in ("hatrpo", "trpo"):  # alternate, so drifts in machine load hit both
            sps = train_steps_per_second(algo, args.timesteps, settings, args.vec_env)
            results[algo].append(sps)
            print(f"  repeat {repeat}: {algo:6s} {sps:,.0f} training steps/s")
    hatrpo, trpo = np.median(results["hatrpo"]), np.median(results["trpo"])
    print(f"HATRPO (2 actors) {hatrpo:,.0f} steps/s | TRPO (1 actor) {trpo:,.0f} steps/s | ratio {hatrpo / trpo:.2f}x")
    print(f"share of the raw env ceiling: HATRPO {hatrpo / raw_ma:.0%}, TRPO {trpo / raw_sa:.0%}")
    if args.profile:
        profile_hatrpo(args.timesteps, settings, args.vec_env)


if __name__ == "__main__":
    main()
