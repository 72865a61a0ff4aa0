"""Uniform (HATRPO), KKT (HATRPO-W) and greedy (HATRPO-G) on Multi-Agent MuJoCo, equal samples.

Resumable: every run writes its per-iteration progress to
``<results>/<env>/<allocator>/seed<k>/progress.jsonl`` and a checkpoint every
``--checkpoint-every`` steps; a run cut short continues from its checkpoint. Finished runs
append one line to ``<results>/final.jsonl``. Several workers can share the runs:
``--worker i --n-workers n`` takes every n-th run.

    python benchmarks/mamujoco.py --timesteps 1000000 --seeds 0 1 2 --worker 0 --n-workers 2 &
    python benchmarks/mamujoco.py --timesteps 1000000 --seeds 0 1 2 --worker 1 --n-workers 2 &
    python benchmarks/mamujoco.py --report          # table + learning curves into docs/

The report compares final returns (mean of the last deterministic evaluation) and each
allocator's relative improvement over uniform with the paper's figures (W +22.5%, G +25.2%),
and the wall time of the update step per iteration.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_hatrpo import HATRPO, make_vec_env
from sb3_hatrpo.evaluation import evaluate_policy

RESULTS = Path(__file__).parent / "results" / "mamujoco"
DOCS = Path(__file__).parent.parent / "docs"
PAPER_GAIN = {"kkt": 22.5, "greedy": 25.2, "kkt-krylov": 22.5, "greedy-krylov": 25.2, "kkt-nofloor": 22.5}

# One setting for every allocator; the joint budget is n_agents * target_kl for all three.
SETTINGS: dict[str, Any] = dict(
    n_steps=1000,
    batch_size=500,
    n_critic_updates=5,
    cg_max_steps=10,
    target_kl=0.005,
    gamma=0.99,
    gae_lambda=0.95,
    learning_rate=5e-4,
    policy_kwargs=dict(net_arch=[64, 64]),
)
N_ENVS = 4
# Variant -> (allocator, extra HATRPO arguments). "kkt" and "greedy" are the paper's versions, every
# recomputed direction solved from scratch; "-krylov" starts it from the agent's Krylov basis (the
# package default, krylov_rtol=0.05). Uniform never recomputes a direction, so it has one variant.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform": ("uniform", {}),
    "kkt": ("kkt", {"krylov_rtol": None}),
    "greedy": ("greedy", {"krylov_rtol": None}),
    "kkt-krylov": ("kkt", {"krylov_rtol": 0.05}),
    "greedy-krylov": ("greedy", {"krylov_rtol": 0.05}),
    # the KKT floor (min_kl_fraction, 0.5 by default) against none: the paper's plain KKT
    "kkt-nofloor": ("kkt", {"krylov_rtol": None, "allocator_kwargs": {"min_kl_fraction": 0.0}}),
}


class ProgressRecorder(BaseCallback):
    """Appends one JSON line per iteration: steps, training return, allocation, update wall time."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._rollout_end = 0.0
        self._iteration_start = 0.0

    def _on_rollout_start(self) -> None:
        now = time.perf_counter()
        if self._rollout_end and self.model.last_allocation:  # type: ignore[attr-defined]
            episodes = [info["r"] for info in self.model.ep_info_buffer]
            record = {
                "timesteps": self.num_timesteps,
                "ep_rew_mean": float(np.mean(episodes)) if episodes else None,
                "update_seconds": now - self._rollout_end,
                "iteration_seconds": now - self._iteration_start,
                "allocation": self.model.last_allocation,  # type: ignore[attr-defined]
            }
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self._iteration_start = now

    def _on_rollout_end(self) -> None:
        self._rollout_end = time.perf_counter()

    def _on_step(self) -> bool:
        return True


def run_dir(results: Path, env_id: str, allocator: str, seed: int) -> Path:
    return results / env_id.replace(":", "_") / allocator / f"seed{seed}"


def finished(results: Path) -> set[tuple[str, str, int]]:
    final = results / "final.jsonl"
    if not final.exists():
        return set()
    lines = [json.loads(line) for line in final.read_text().splitlines() if line.strip()]
    return {(r["env"], r["allocator"], r["seed"]) for r in lines}


def train_one(results: Path, env_id: str, allocator: str, seed: int, timesteps: int, checkpoint_every: int) -> None:
    folder = run_dir(results, env_id, allocator, seed)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, progress = folder / "checkpoint.zip", folder / "progress.jsonl"
    env = make_vec_env(env_id, n_envs=N_ENVS, seed=seed)
    if checkpoint.exists():
        model = HATRPO.load(checkpoint, env=env)
        done = model.num_timesteps
        # drop progress lines written after the checkpoint
        kept = [line for line in progress.read_text().splitlines() if json.loads(line)["timesteps"] <= done]
        progress.write_text("".join(line + "\n" for line in kept))
        print(f"resuming {env_id} {allocator} seed {seed} at {done} steps", flush=True)
    else:
        progress.unlink(missing_ok=True)
        name, extra = VARIANTS[allocator]
        model = HATRPO("MlpPolicy", env, allocator=name, seed=seed, **SETTINGS, **extra)
        done = 0
    recorder = ProgressRecorder(progress)
    start = time.perf_counter()
    while model.num_timesteps < timesteps:
        chunk = min(checkpoint_every, timesteps - model.num_timesteps)
        model.learn(chunk, callback=recorder, reset_num_timesteps=False)
        model.save(checkpoint)
        print(f"{env_id} {allocator} seed {seed}: {model.num_timesteps} steps", flush=True)
    eval_env = make_vec_env(env_id, n_envs=1, seed=10_000 + seed)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=5, deterministic=True)
    record = {
        "env": env_id,
        "allocator": allocator,
        "seed": seed,
        "timesteps": model.num_timesteps,
        "eval_return_mean": float(mean),
        "eval_return_std": float(std),
        "wall_seconds_this_session": time.perf_counter() - start,
        "settings": {**SETTINGS, **VARIANTS[allocator][1], "n_envs": N_ENVS},
    }
    with (results / "final.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    env.close()
    eval_env.close()


def load_progress(results: Path, env_id: str, allocator: str, seed: int) -> list[dict[str, Any]]:
    path = run_dir(results, env_id, allocator, seed) / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(results: Path, envs: list[str], allocators: list[str], seeds: list[int]) -> str:
    """Markdown table of final returns, update times, KL use; learning curves as PNG into docs/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = (
        [json.loads(line) for line in (results / "final.jsonl").read_text().splitlines()]
        if (results / "final.jsonl").exists()
        else []
    )
    lines = [
        "| env | allocator | seeds done | final eval return (mean ± std over seeds) | vs uniform | paper | "
        "training return, last 10 iterations | update s/iter | iteration s/iter | KL spent / budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    colors = {
        "uniform": "tab:red",
        "greedy": "tab:blue",
        "kkt": "tab:green",
        "greedy-krylov": "tab:cyan",
        "kkt-krylov": "tab:olive",
        "kkt-nofloor": "tab:gray",
    }
    progress_of = functools.cache(functools.partial(load_progress, results))  # each run's file read once
    for env_id in envs:
        fig, ax = plt.subplots(figsize=(6, 4))
        finals: dict[str, list[float]] = {}
        for allocator in allocators:
            finals[allocator] = [
                r["eval_return_mean"] for r in final if r["env"] == env_id and r["allocator"] == allocator
            ]
            curves = [progress_of(env_id, allocator, s) for s in seeds]
            curves = [c for c in curves if c]
            if curves:
                length = min(len(c) for c in curves)
                steps = np.array([c[i]["timesteps"] for i in range(length) for c in curves[:1]])
                returns = np.array([[c[i]["ep_rew_mean"] or np.nan for i in range(length)] for c in curves])
                mean, std = np.nanmean(returns, axis=0), np.nanstd(returns, axis=0)
                ax.plot(steps, mean, color=colors.get(allocator), label=f"{allocator} ({len(curves)} seeds)")
                ax.fill_between(steps, mean - std, mean + std, color=colors.get(allocator), alpha=0.2)
        ax.set_title(env_id)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("training episode return")
        ax.legend()
        fig.tight_layout()
        DOCS.mkdir(exist_ok=True)
        fig.savefig(DOCS / f"mamujoco_{env_id.split(':')[1]}.png", dpi=110)
        plt.close(fig)
        base = np.mean(finals["uniform"]) if finals.get("uniform") else None
        for allocator in allocators:
            values = finals[allocator]
            progress = [p for s in seeds for p in progress_of(env_id, allocator, s)]
            update = np.median([p["update_seconds"] for p in progress]) if progress else float("nan")
            iteration = np.median([p["iteration_seconds"] for p in progress]) if progress else float("nan")
            done_seeds = [r["seed"] for r in final if r["env"] == env_id and r["allocator"] == allocator]
            last = [np.mean([p["ep_rew_mean"] for p in progress_of(env_id, allocator, s)[-10:]]) for s in done_seeds]
            training = f"{np.mean(last):.0f} ± {np.std(last):.0f}" if last else ""
            budget = [sum(r["kl"] for r in p["allocation"]) for p in progress]
            spent = (
                np.mean(budget) / (SETTINGS["target_kl"] * len(progress[0]["allocation"])) if progress else float("nan")
            )
            if values:
                gain = (
                    f"{100 * (np.mean(values) - base) / abs(base):+.1f}%"
                    if base is not None and allocator != "uniform"
                    else ""
                )
                cell = f"{np.mean(values):.0f} ± {np.std(values):.0f}"
            else:
                gain, cell = "", "running"
            paper = f"+{PAPER_GAIN[allocator]}%" if allocator in PAPER_GAIN else ""
            lines.append(
                f"| {env_id} | {allocator} | {len(values)} | {cell} | {gain} | {paper} | {training} "
                f"| {update:.2f} | {iteration:.2f} | {spent:.0%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["mamujoco:HalfCheetah-2x3", "mamujoco:HalfCheetah-6x1"])
    parser.add_argument("--allocators", nargs="+", default=["uniform", "kkt", "greedy"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--timesteps", type=int, default=1_000_000)
    parser.add_argument("--checkpoint-every", type=int, default=40_000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--n-workers", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="print the table and draw the curves, train nothing")
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(args.results, args.envs, args.allocators, args.seeds))
        return
    # seed-major order: a partial run still covers every allocator on every env
    runs = [(e, a, s) for s in args.seeds for e in args.envs for a in args.allocators]
    mine = [run for i, run in enumerate(runs) if i % args.n_workers == args.worker]
    for env_id, allocator, seed in mine:
        if (env_id, allocator, seed) in finished(args.results):
            continue
        train_one(args.results, env_id, allocator, seed, args.timesteps, args.checkpoint_every)


if __name__ == "__main__":
    main()
