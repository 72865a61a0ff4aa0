"""Training throughput: HATRPO on MaMuJoCo HalfCheetah-2x3 against sb3-contrib TRPO on HalfCheetah-v5.

Both run in this process, side by side and alternating, with the zoo config's settings for
``mamujoco:HalfCheetah-2x3`` (n_steps, n_envs, network, CG steps, critic updates, minibatch size;
``zoo_configs/hatrpo.yml`` is the one source of tuned settings), so their ratio is meaningful on a
shared machine. HATRPO also runs with ``normalize_observation=False``, which prices the observation
normalisation. Also prints the raw env steps/s with random actions: the ceiling of each loop.
``--fisher`` runs HATRPO with each ``fisher_product`` (the analytic product, the default, and the
double backward) and TRPO instead, alternating (``benchmarks/fisher_product.py`` times the products alone).

    python benchmarks/throughput.py --timesteps 40000 --repeats 2
    python benchmarks/throughput.py --mamujoco-env     # the MaMuJoCo env alone: original against index-mapped
    python benchmarks/throughput.py --timesteps 40000 --repeats 3 --fisher
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

try:  # run as a script (python benchmarks/throughput.py) or as a module
    from mamujoco import zoo_settings  # type: ignore[import-not-found]
except ImportError:
    from benchmarks.mamujoco import zoo_settings

ENV_ID = "mamujoco:HalfCheetah-2x3"
# sb3-contrib TRPO takes these of the zoo entry; the rest (allocators, normalisation) are HATRPO's own
TRPO_KEYS = (
    "n_steps",
    "batch_size",
    "learning_rate",
    "gamma",
    "gae_lambda",
    "cg_max_steps",
    "cg_damping",
    "line_search_shrinking_factor",
    "line_search_max_iter",
    "n_critic_updates",
    "target_kl",
    "normalize_advantage",
)
ALGOS = ("hatrpo", "hatrpo-no-obs-norm", "trpo")
FISHER_ALGOS = ("hatrpo", "hatrpo-double-backward", "trpo")  # --fisher


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


def train_steps_per_second(algo: str, timesteps: int, vec_env_cls: str) -> float:
    """Training steps/s of one run of ``algo`` (``ALGOS``, ``FISHER_ALGOS``) with the zoo settings, after a warm-up."""
    settings, n_envs = zoo_settings(ENV_ID)
    common = dict(seed=0, device="cpu")
    if algo.startswith("hatrpo"):
        env = make_vec_env(ENV_ID, n_envs=n_envs, seed=0, vec_env_cls=vec_env_cls)
        kwargs = {**settings, **common, "num_threads": None}  # num_threads None: --threads, as TRPO
        if "no-obs-norm" in algo:
            kwargs["normalize_observation"] = False
        if "double-backward" in algo:
            kwargs["fisher_product"] = "double_backward"
        model = HATRPO("MlpPolicy", env, **kwargs)
        n_steps = model.n_steps
    else:
        from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

        cls = SubprocVecEnv if vec_env_cls == "subproc" else DummyVecEnv
        env = sb3_make_vec_env("HalfCheetah-v5", n_envs=n_envs, seed=0, vec_env_cls=cls)
        policy_kwargs = dict(settings["policy_kwargs"])
        net_arch = policy_kwargs.pop("net_arch")
        policy_kwargs = {
            "net_arch": dict(pi=net_arch, vf=net_arch),
            **{k: v for k, v in policy_kwargs.items() if k in ("activation_fn", "log_std_init")},
        }
        kwargs = {k: settings[k] for k in TRPO_KEYS if k in settings}
        model = TRPO("MlpPolicy", env, policy_kwargs=policy_kwargs, **kwargs, **common)
        n_steps = model.n_steps
    model.learn(n_steps * n_envs)  # warm-up: first rollout, allocations, thread pools
    start = time.perf_counter()
    model.learn(timesteps, reset_num_timesteps=False)
    elapsed = time.perf_counter() - start
    env.close()
    return timesteps / elapsed


def mamujoco_env_speedup(tasks: tuple[str, ...], n_steps: int = 3000, repeats: int = 3) -> None:
    """Raw steps/s (random actions) of gymnasium-robotics' MaMuJoCo env and of the package's index-mapped
    subclass, alternating; prints the medians and their ratio per task."""
    import warnings

    from gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi import MultiAgentMujocoEnv

    from sb3_hatrpo.envs.mamujoco_fast import FastMultiAgentMujocoEnv

    for task in tasks:
        scenario, conf = task.split("-")
        speeds: dict[str, list[float]] = {"original": [], "index-mapped": []}
        for _ in range(repeats):
            for label, cls in (("original", MultiAgentMujocoEnv), ("index-mapped", FastMultiAgentMujocoEnv)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    env = cls(scenario, conf)
                env.reset(seed=0)
                rng = np.random.default_rng(0)
                actions = [
                    {a: rng.uniform(-1, 1, env.action_space(a).shape) for a in env.possible_agents} for _ in range(100)
                ]
                start = time.perf_counter()
                for i in range(n_steps):
                    env.step(actions[i % 100])
                    if not env.agents:
                        env.reset()
                speeds[label].append(n_steps / (time.perf_counter() - start))
                env.close()
        original, fast = (float(np.median(v)) for v in speeds.values())
        print(f"{task}: gymnasium-robotics {original:,.0f} steps/s, index-mapped {fast:,.0f} ({fast / original:.2f}x)")


# Where an HATRPO iteration spends its time: (label, file name(s), function) as cProfile names them
PROFILE_PARTS = [
    ("env step (MuJoCo + PettingZoo wrappers)", ("vec_env/dummy.py", "vec_env/subproc.py"), "step_wait"),
    ("actor sampling in the rollout", "policies.py", "sample_rollout_actions"),
    ("critic values in the rollout", "hatrpo.py", "_values"),
    ("rollout buffer add", "buffers.py", "add"),
    ("GAE", "buffers.py", "compute_returns_and_advantage"),
    ("critic regression", "hatrpo.py", "_train_critic"),
    ("trust-region directions (gradient + CG)", "trust_region.py", "direction"),
    ("  of which Fisher-vector products", "trust_region.py", "fisher_vector_product"),
    ("line searches", "trust_region.py", "step"),
]


def profile_hatrpo(timesteps: int, vec_env_cls: str) -> None:
    """cProfile one HATRPO run (zoo settings) and print the share of wall time of each part of an iteration."""
    import cProfile
    import pstats

    settings, n_envs = zoo_settings(ENV_ID)
    env = make_vec_env(ENV_ID, n_envs=n_envs, seed=0, vec_env_cls=vec_env_cls)
    model = HATRPO("MlpPolicy", env, **settings, seed=0, num_threads=None)  # --threads
    model.learn(model.n_steps * n_envs)
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
    parser.add_argument("--timesteps", type=int, default=40000, help="timed training steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each algorithm")
    parser.add_argument("--vec-env", choices=["dummy", "subproc"], default="dummy")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is as fast as 2 for small MLPs)")
    parser.add_argument("--profile", action="store_true", help="also profile one HATRPO run: where the time goes")
    parser.add_argument(
        "--fisher", action="store_true", help="HATRPO with each fisher_product (analytic, double_backward) and TRPO"
    )
    parser.add_argument(
        "--mamujoco-env",
        action="store_true",
        help="only compare the raw steps/s of gymnasium-robotics' MaMuJoCo env and the index-mapped one",
    )
    args = parser.parse_args(argv)
    th.set_num_threads(args.threads)
    if args.mamujoco_env:
        mamujoco_env_speedup(("HalfCheetah-2x3", "HalfCheetah-6x1", "Walker2d-2x3", "Ant-4x2"))
        return
    settings, n_envs = zoo_settings(ENV_ID)
    print(
        f"zoo settings of {ENV_ID}: {settings}, n_envs={n_envs}, vec_env={args.vec_env}, torch threads={args.threads}"
    )
    raw_ma = raw_multiagent_steps_per_second(5000)
    raw_sa = raw_single_agent_steps_per_second(5000)
    print(f"raw env steps/s (random actions): MaMuJoCo HalfCheetah-2x3 {raw_ma:,.0f}, HalfCheetah-v5 {raw_sa:,.0f}")
    algos = FISHER_ALGOS if args.fisher else ALGOS
    results: dict[str, list[float]] = {algo: [] for algo in algos}
    for repeat in range(args.repeats):
        for algo in algos:  # alternate, so drifts in machine load hit all alike
            sps = train_steps_per_second(algo, args.timesteps, args.vec_env)
            results[algo].append(sps)
            print(f"  repeat {repeat}: {algo:22s} {sps:,.0f} training steps/s")
    median = {algo: float(np.median(values)) for algo, values in results.items()}
    hatrpo, trpo = median["hatrpo"], median["trpo"]
    print(f"HATRPO (2 actors) {hatrpo:,.0f} steps/s | TRPO (1 actor) {trpo:,.0f} steps/s | ratio {hatrpo / trpo:.2f}x")
    if args.fisher:
        double = median["hatrpo-double-backward"]
        print(
            f"Fisher-vector products: analytic {hatrpo:,.0f} steps/s, double backward {double:,.0f} steps/s "
            f"({hatrpo / double - 1:+.1%}); TRPO ratio with the double backward {double / trpo:.2f}x"
        )
    else:
        plain = median["hatrpo-no-obs-norm"]
        print(
            f"observation normalisation: {plain:,.0f} steps/s without, {hatrpo:,.0f} with ({hatrpo / plain - 1:+.1%})"
        )
    print(f"share of the raw env ceiling: HATRPO {hatrpo / raw_ma:.0%}, TRPO {trpo / raw_sa:.0%}")
    if args.profile:
        profile_hatrpo(args.timesteps, args.vec_env)


if __name__ == "__main__":
    main()
