"""Uniform (HATRPO), KKT (HATRPO-W) and greedy (HATRPO-G) on Multi-Agent MuJoCo, equal samples.

Resumable: every run writes its per-iteration progress to
``<results>/<env>/<allocator>/seed<k>/progress.jsonl`` and a checkpoint every
``--checkpoint-every`` steps; a run cut short continues from its checkpoint. Finished runs
append one line to ``<results>/final.jsonl``. Several workers can share the runs: with ``--claim``
each takes the next run no other live worker holds (a ``claim`` file in the run's folder names its
process; a dead worker's claim is taken over), so workers stay busy however unequal the runs' costs
(greedy's iteration costs up to 1.8x uniform's on 6 agents); ``--worker i --n-workers n`` instead
takes every n-th run.

    python benchmarks/mamujoco.py --timesteps 1000000 --seeds 0 1 2 --claim &
    python benchmarks/mamujoco.py --timesteps 1000000 --seeds 0 1 2 --claim &
    python benchmarks/mamujoco.py --report          # table + learning curves into docs/

The report compares final returns (mean of the last deterministic evaluation) and each
allocator's relative improvement over uniform with the paper's figures (W +22.5%, G +25.2%),
and the wall time of the update step per iteration.

Settings: the zoo config's entry for each env (``zoo_configs/hatrpo.yml``, HARL's tuned values),
the one source of tuned settings; a variant only adds its own overrides. Every ``--eval-every``
steps the model is evaluated deterministically (5 episodes) into ``eval.jsonl``;
``--report-evals`` prints those returns per variant and step (mean and per seed).
``--study-report`` prints issue #8's table (Welch and bootstrap 95% CIs of the difference to uniform,
stuck seeds, KL spent / budget); the study's command lines are in ``docs/reproduction.md`` §4.3.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_hatrpo import HATRPO, make_vec_env
from sb3_hatrpo.evaluation import evaluate_policy
from sb3_hatrpo.zoo.config import get_hyperparams, prepare_hyperparams

RESULTS = Path(__file__).parent / "results" / "mamujoco_tuned"
# HARL's HATRPO measured on this kind of machine (per seed and step), shipped with the steering repo
HARL_REFERENCE = Path(__file__).parent.parent.parent / "shared" / "reference" / "harl_hatrpo_halfcheetah_2x3.json"
DOCS = Path(__file__).parent.parent / "docs"
PAPER_GAIN = {"kkt": 22.5, "greedy": 25.2, "kkt-krylov": 22.5, "greedy-krylov": 25.2, "kkt-nofloor": 22.5}


def zoo_settings(env_id: str) -> tuple[dict[str, Any], int]:
    """The zoo config's ``HATRPO`` arguments for ``env_id`` and its ``n_envs`` (one setting for every variant)."""
    hyperparams, _ = get_hyperparams(env_id)
    prepared = prepare_hyperparams(hyperparams)
    kwargs = dict(prepared.model_kwargs)
    kwargs.pop("allocator", None)
    kwargs.pop("allocator_kwargs", None)
    if prepared.env_kwargs:
        kwargs["env_kwargs"] = prepared.env_kwargs
    return kwargs, prepared.n_envs


def variant_kwargs(env_id: str, variant: str) -> tuple[dict[str, Any], int]:
    """Zoo settings with the variant's overrides (``policy_kwargs`` merged key by key).

    ``package-defaults`` ignores the zoo: ``HATRPO("MlpPolicy", env_id)`` with every constructor default.
    """
    if variant == "package-defaults":
        return {"allocator": "uniform"}, 1
    settings, n_envs = zoo_settings(env_id)
    name, extra = VARIANTS[variant]
    extra = dict(extra)
    policy_kwargs = {**settings.get("policy_kwargs", {}), **extra.pop("policy_kwargs", {})}
    return {**settings, **extra, "policy_kwargs": policy_kwargs, "allocator": name}, n_envs


# Variant -> (allocator, extra HATRPO arguments). "kkt" and "greedy" are the paper's versions, every
# recomputed direction solved from scratch (also the package default, krylov_rtol=None); "-krylov" starts
# it from the agent's Krylov basis (opt-in krylov_rtol=0.05). Uniform never recomputes a direction.
# HARL's batch of 4 envs x 1000 steps. The zoo's HalfCheetah 2x3 entry has used 4 x 500 since the
# half-batch measurement; the ablations and the first stage of the allocator study ran with this one,
# so their variants pin it (a no-op on the entries that still use it).
BATCH_4000: dict[str, Any] = {"n_steps": 1000, "batch_size": 4000}
# The zoo config's MaMuJoCo entries without HARL's sigmoid std and accept ratio (the base the ablations ran on)
SB3_STD: dict[str, Any] = {
    **BATCH_4000,
    "line_search_accept_ratio": 0.0,
    "policy_kwargs": {"std_parametrization": "log"},
}

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform": ("uniform", {}),
    "kkt": ("kkt", {"krylov_rtol": None}),
    "greedy": ("greedy", {"krylov_rtol": None}),
    "kkt-krylov": ("kkt", {"krylov_rtol": 0.05}),
    "greedy-krylov": ("greedy", {"krylov_rtol": 0.05}),
    # the KKT floor (min_kl_fraction, 0.5 by default) against none: the paper's plain KKT
    "kkt-nofloor": ("kkt", {"krylov_rtol": None, "allocator_kwargs": {"min_kl_fraction": 0.0}}),
    # Ablations of the base algorithm (docs/benchmarks.md), one difference from HARL at a time. They were
    # run against the zoo config before it took HARL's sigmoid std and accept ratio ("uniform-sb3-std"),
    # so each is defined against that base: the zoo config with SB3_STD undone, plus its own change.
    "uniform-sb3-std": ("uniform", SB3_STD),
    "uniform-no-obs-norm": ("uniform", {**SB3_STD, "normalize_observation": False}),
    "uniform-sigmoid-std": ("uniform", {**BATCH_4000, "line_search_accept_ratio": 0.0}),
    "uniform-accept-ratio": ("uniform", {**BATCH_4000, "policy_kwargs": {"std_parametrization": "log"}}),
    "uniform-harl-critic": (
        "uniform",
        {
            **SB3_STD,
            "value_loss": "huber",
            "clip_range_vf": 0.2,
            "max_grad_norm": 10.0,
            "policy_kwargs": {"std_parametrization": "log", "optimizer_kwargs": {"eps": 1e-5}},
        },
    ),
    "uniform-no-truncation-bootstrap": ("uniform", {**SB3_STD, "bootstrap_truncation": False}),
    "uniform-reward-norm": ("uniform", {**SB3_STD, "normalize_reward": True}),
    "uniform-layer-norm": ("uniform", {**SB3_STD, "policy_kwargs": {"std_parametrization": "log", "layer_norm": True}}),
    # HARL's sigmoid std and accept ratio together: the zoo config with HARL's batch (HalfCheetah 2x3's
    # entry until the half batch; the uniform cell of the allocator study's first stage on 2x3)
    "uniform-harl-std-accept": ("uniform", BATCH_4000),
    "kkt-nofloor-batch4000": ("kkt", {**BATCH_4000, "krylov_rtol": None, "allocator_kwargs": {"min_kl_fraction": 0.0}}),
    "greedy-batch4000": ("greedy", {**BATCH_4000, "krylov_rtol": None}),
    # the zoo config plus HARL's critic and time-limit handling: every HARL ingredient but its LayerNorm
    "uniform-harl-full": (
        "uniform",
        {
            **BATCH_4000,
            "value_loss": "huber",
            "clip_range_vf": 0.2,
            "max_grad_norm": 10.0,
            "bootstrap_truncation": False,
            "policy_kwargs": {"optimizer_kwargs": {"eps": 1e-5}},
        },
    ),
    # half HARL's batch (4 envs x 500 steps): twice the updates per sample (HalfCheetah 2x3's zoo entry now)
    "uniform-half-batch": ("uniform", {"n_steps": 500, "batch_size": 2000}),
    # the zoo config of any env without observation normalisation (its price or gain on MPE and the games)
    "zoo-no-obs-norm": ("uniform", {"normalize_observation": False}),
    "package-defaults": ("uniform", {}),  # no zoo settings at all (see variant_kwargs)
    # Issue #8, the tuned-base study: greedy's bias fixes (ratio at a common step fraction, random ties)
    # and the noise-aware allocators (sb3_hatrpo.noise_aware), with the Krylov reuse their cost was measured with.
    "greedy-fair": (
        "greedy",
        {"krylov_rtol": 0.05, "allocator_kwargs": {"ratio": "common-fraction", "tie_break": "random"}},
    ),
    "kkt-shrink": ("kkt-shrink", {"krylov_rtol": 0.05}),
    "cross-fit": ("cross-fit", {"krylov_rtol": 0.05}),
    # control for greedy's larger KL spend: uniform thresholds, but what a line search leaves unused
    # goes to the agents still to move (greedy passes it on by design)
    "uniform-pass-unused": ("uniform", {"allocator_kwargs": {"pass_unused_budget": True}}),
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (``final.jsonl``, ``progress.jsonl``, ``eval.jsonl``); none if it is missing."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(results: Path) -> dict[tuple[str, str, int], int]:
    """``{(env, variant, seed): steps}`` of the runs in ``final.jsonl``, at their largest finished budget."""
    done: dict[tuple[str, str, int], int] = {}
    for r in read_jsonl(results / "final.jsonl"):
        key = (r["env"], r["allocator"], r["seed"])
        done[key] = max(done.get(key, 0), r["timesteps"])
    return done


def _keep_lines_upto(path: Path, done: int) -> None:
    """Drop the lines of a JSONL file written after the checkpoint at ``done`` steps."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["timesteps"] <= done]
        path.write_text("".join(line + "\n" for line in kept))


def train_one(
    results: Path, env_id: str, allocator: str, seed: int, timesteps: int, checkpoint_every: int, eval_every: int
) -> None:
    folder = run_dir(results, env_id, allocator, seed)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, progress, evals = folder / "checkpoint.zip", folder / "progress.jsonl", folder / "eval.jsonl"
    kwargs, n_envs = variant_kwargs(env_id, allocator)
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=kwargs.get("env_kwargs"))
    if checkpoint.exists():
        model = HATRPO.load(checkpoint, env=env)
        done = model.num_timesteps
        _keep_lines_upto(progress, done)
        _keep_lines_upto(evals, done)
        print(f"resuming {env_id} {allocator} seed {seed} at {done} steps", flush=True)
    else:
        progress.unlink(missing_ok=True)
        evals.unlink(missing_ok=True)
        model = HATRPO("MlpPolicy", env, seed=seed, **{k: v for k, v in kwargs.items() if k != "env_kwargs"})
        done = 0
    recorder = ProgressRecorder(progress)
    eval_env = make_vec_env(env_id, n_envs=1, seed=10_000 + seed, env_kwargs=kwargs.get("env_kwargs"))
    start = time.perf_counter()
    while model.num_timesteps < timesteps:
        # stop at every checkpoint and every evaluation point
        next_eval = (model.num_timesteps // eval_every + 1) * eval_every
        chunk = min(checkpoint_every, timesteps - model.num_timesteps, next_eval - model.num_timesteps)
        model.learn(chunk, callback=recorder, reset_num_timesteps=False)
        if model.num_timesteps % eval_every == 0 or model.num_timesteps >= timesteps:
            mean, std = evaluate_policy(model, eval_env, n_eval_episodes=5, deterministic=True)
            with evals.open("a") as f:
                f.write(json.dumps({"timesteps": model.num_timesteps, "mean": float(mean), "std": float(std)}) + "\n")
            print(f"{env_id} {allocator} seed {seed}: {model.num_timesteps} steps, eval {mean:.0f}", flush=True)
        model.save(checkpoint)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=5, deterministic=True)
    record = {
        "env": env_id,
        "allocator": allocator,
        "seed": seed,
        "timesteps": model.num_timesteps,
        "eval_return_mean": float(mean),
        "eval_return_std": float(std),
        "wall_seconds_this_session": time.perf_counter() - start,
        "settings": {**kwargs, "n_envs": n_envs},
    }
    with (results / "final.jsonl").open("a") as f:
        f.write(json.dumps(record, default=repr) + "\n")  # repr: classes such as activation_fn
    env.close()
    eval_env.close()


def claim_run(folder: Path) -> bool:
    """Take the run in ``folder`` for this process: create ``folder/claim`` (``host pid``) atomically.

    False if another live process on this host holds it. A claim of a process that is gone (a killed
    worker) is taken over; one of another host is respected (its liveness cannot be checked here).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / "claim", f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = path.read_text().partition(" ")
            if host != socket.gethostname() or not pid.strip().isdigit():
                return False
            try:
                os.kill(int(pid), 0)
                return int(pid) == os.getpid()
            except ProcessLookupError:  # the worker that claimed it is gone
                path.unlink(missing_ok=True)
                continue
            except PermissionError:  # alive, another user's
                return False
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def load_progress(results: Path, env_id: str, allocator: str, seed: int) -> list[dict[str, Any]]:
    return read_jsonl(run_dir(results, env_id, allocator, seed) / "progress.jsonl")


def report(results: Path, envs: list[str], allocators: list[str], seeds: list[int]) -> str:
    """Markdown table of final returns, update times, KL use; learning curves as PNG into docs/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = read_jsonl(results / "final.jsonl")
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
            finals[allocator] = list(study_returns(results, env_id, allocator, seeds).values())  # latest budget
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
        # the untuned study's figures (results/mamujoco) keep their names; other result folders get a suffix
        suffix = "" if results.name == "mamujoco" else f"_{results.name}"
        fig.savefig(DOCS / f"mamujoco_{env_id.split(':')[1]}{suffix}.png", dpi=110)
        plt.close(fig)
        base = np.mean(finals["uniform"]) if finals.get("uniform") else None
        for allocator in allocators:
            values = finals[allocator]
            progress = [p for s in seeds for p in progress_of(env_id, allocator, s)]
            update = np.median([p["update_seconds"] for p in progress]) if progress else float("nan")
            iteration = np.median([p["iteration_seconds"] for p in progress]) if progress else float("nan")
            done_seeds = list(study_returns(results, env_id, allocator, seeds))
            last = [np.mean([p["ep_rew_mean"] for p in progress_of(env_id, allocator, s)[-10:]]) for s in done_seeds]
            training = f"{np.mean(last):.0f} ± {np.std(last):.0f}" if last else ""
            budget = [sum(r["kl"] for r in p["allocation"]) for p in progress]
            # the runs' own target_kl (older result folders used other settings than today's zoo config)
            recorded = [
                r["settings"]["target_kl"] for r in final if r["env"] == env_id and "target_kl" in r["settings"]
            ]
            target_kl = recorded[0] if recorded else zoo_settings(env_id)[0]["target_kl"]
            spent = np.mean(budget) / (target_kl * len(progress[0]["allocation"])) if progress else float("nan")
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


def difference_se(values: list[float], base: list[float]) -> float:
    """Standard error of ``mean(values) - mean(base)`` with unequal variances (Welch): ``sqrt(s1^2/n1 + s2^2/n2)``."""
    return float(np.sqrt(np.var(values, ddof=1) / len(values) + np.var(base, ddof=1) / len(base)))


def welch_df(values: list[float], base: list[float]) -> float:
    """Welch-Satterthwaite degrees of freedom of :func:`difference_se`:
    ``(v1 + v2)^2 / (v1^2 / (n1 - 1) + v2^2 / (n2 - 1))`` with ``v = s^2 / n`` (1 when both spreads are 0)."""
    va, vb = np.var(values, ddof=1) / len(values), np.var(base, ddof=1) / len(base)
    if va + vb == 0:
        return 1.0
    return float((va + vb) ** 2 / (va**2 / (len(values) - 1) + vb**2 / (len(base) - 1)))


def difference_cis(
    values: list[float], base: list[float], n_boot: int = 10_000, seed: int = 0
) -> tuple[tuple[float, float], tuple[float, float]]:
    """95% CIs of ``mean(values) - mean(base)`` in % of ``|mean(base)|``: Welch's t and a percentile bootstrap.

    Welch: ``d +- t_{0.975, nu} sqrt(s1^2/n1 + s2^2/n2)`` with the Welch-Satterthwaite ``nu``. Bootstrap:
    seeds resampled with replacement within each group, ``n_boot`` times. ``nan`` with fewer than 2 seeds
    in a group.
    """
    from scipy import stats

    a, b = np.asarray(values, dtype=float), np.asarray(base, dtype=float)
    nan = (float("nan"), float("nan"))
    if len(a) < 2 or len(b) < 2 or np.mean(b) == 0:
        return nan, nan
    scale = 100.0 / abs(np.mean(b))
    diff = np.mean(a) - np.mean(b)
    half = float(stats.t.ppf(0.975, welch_df(values, base)) * difference_se(values, base))
    rng = np.random.default_rng(seed)
    boot_a = rng.choice(a, (n_boot, len(a))).mean(axis=1)
    boot_b = rng.choice(b, (n_boot, len(b))).mean(axis=1)
    boot = (boot_a - boot_b) * 100.0 / np.abs(boot_b).clip(min=1e-12)
    welch = (float((diff - half) * scale), float((diff + half) * scale))
    return welch, (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))


def study_returns(
    results: Path, env_id: str, variant: str, seeds: list[int], at_steps: int | None = None
) -> dict[int, float]:
    """``{seed: eval return}``: the final evaluation of each finished run (its largest budget), or with
    ``at_steps`` the deterministic evaluation at that step from ``eval.jsonl`` (runs that got there)."""
    if at_steps is not None:
        evals = load_evals(results, env_id, variant, seeds)
        return {seed: by_step[at_steps] for seed, by_step in evals.items() if at_steps in by_step}
    latest: dict[int, tuple[int, float]] = {}
    for r in read_jsonl(results / "final.jsonl"):
        if r["env"] == env_id and r["allocator"] == variant and (not seeds or r["seed"] in seeds):
            steps = r.get("timesteps", 0)
            if r["seed"] not in latest or steps >= latest[r["seed"]][0]:
                latest[r["seed"]] = (steps, r["eval_return_mean"])
    return {seed: value for seed, (_, value) in latest.items()}


def study_auc(
    results: Path, env_id: str, variant: str, seeds: list[int], upto: int, every: int = 100_000
) -> dict[int, float]:
    """``{seed: mean deterministic eval return at every, 2 every, ..., upto steps}``: the area under the eval
    curve divided by its span, a measure of sample efficiency with less seed noise than one final evaluation.
    Seeds that lack any of those evaluations (unfinished runs) are left out."""
    grid = range(every, upto + 1, every)
    return {
        seed: float(np.mean([by_step[t] for t in grid]))
        for seed, by_step in load_evals(results, env_id, variant, seeds).items()
        if grid and all(t in by_step for t in grid)
    }


def _largest_budget(results: Path, env_id: str, variants: list[str]) -> int | None:
    """The largest ``timesteps`` of the finished runs of ``variants`` on ``env_id`` (None without any)."""
    records = read_jsonl(results / "final.jsonl")
    steps = [r.get("timesteps") for r in records if r["env"] == env_id and r["allocator"] in variants]
    return max((s for s in steps if s is not None), default=None)


def pooled_difference(
    diffs: list[float], ses: list[float], dfs: list[float] | None = None
) -> tuple[float, float, float, float]:
    """Fixed-effect (inverse-variance) pooling of per-task differences to uniform, in %.

    ``d = sum(w_t d_t) / sum(w_t)`` with ``w_t = 1 / se_t^2``, 95% interval ``d +- q / sqrt(sum w_t)``, and
    the p-value of Cochran's ``Q = sum w_t (d_t - d)^2`` on ``T - 1`` degrees of freedom: a small one says
    the tasks disagree and the pooled figure hides it. ``nan`` without 2 tasks. With each task's Welch
    degrees of freedom ``dfs`` (:func:`welch_df`), ``q`` is Student's t quantile on the Satterthwaite
    ``nu = (sum w_t)^2 / sum(w_t^2 / nu_t)`` (the pooled variance ``1 / sum w_t`` is the sum of the terms
    ``w_t / (sum w_t)^2``); without them the normal 1.96, which is too narrow with 10 seeds a side. The
    weights are treated as known, as fixed-effect pooling does.
    """
    from scipy import stats

    d, se = np.asarray(diffs, dtype=float), np.asarray(ses, dtype=float)
    if len(d) < 2 or not np.all(se > 0):
        return (float("nan"),) * 4  # type: ignore[return-value]
    w = 1.0 / se**2
    mean = float(np.sum(w * d) / np.sum(w))
    if dfs is None:
        quantile = 1.96
    else:
        nu = float(np.sum(w) ** 2 / np.sum(w**2 / np.asarray(dfs, dtype=float)))
        quantile = float(stats.t.ppf(0.975, nu))
    half = quantile / float(np.sqrt(np.sum(w)))
    q = float(np.sum(w * (d - mean) ** 2))
    return mean, mean - half, mean + half, float(stats.chi2.sf(q, len(d) - 1))


# Issue #8's target: a gain of at least this many percent over uniform, with a 95% interval above 0
TARGET_GAIN = 10.0


def verdict(gain: float, welch: tuple[float, float], target: float = TARGET_GAIN) -> str:
    """What one cell says about the target: ``"beats uniform"`` (gain >= ``target`` % and the Welch interval
    above 0), ``"+10% ruled out"`` (the interval's upper end below ``target``), else ``"inconclusive"``
    (``"n/a"`` without an interval: fewer than 2 seeds on a side)."""
    low, high = welch
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    if gain >= target and low > 0:
        return "beats uniform"
    if high < target:
        return f"+{target:.0f}% ruled out"
    return "inconclusive"


def floor_bindings(
    results: Path, env_id: str, variant: str, seeds: list[int], min_kl_fraction: float = 0.5
) -> tuple[int, int, list[int]]:
    """How often KKT's default floor would have bound in a run without it (``kkt-nofloor``): thresholds
    below ``min_kl_fraction * target_kl``, all thresholds, and the seeds with at least one.

    Where it never binds, ``kkt_thresholds`` with the floor returns the same thresholds to the bit (the
    water-filling ends at ``k = n`` in both cases), so the package-default KKT is the same update as W on
    those iterations."""
    floor = min_kl_fraction * zoo_settings(env_id)[0]["target_kl"]
    bound, total, bound_seeds = 0, 0, []
    for seed in seeds:
        thresholds = [a["threshold"] for p in load_progress(results, env_id, variant, seed) for a in p["allocation"]]
        below = sum(t < floor * (1 - 1e-9) for t in thresholds)
        bound, total = bound + below, total + len(thresholds)
        if below:
            bound_seeds.append(seed)
    return bound, total, bound_seeds


def default_kkt_seeds_from_w(results: Path, env_id: str, seeds: list[int]) -> list[int]:
    """Seeds on which the package-default KKT's run *is* W's run: no ``kkt`` run of its own, and a ``kkt-nofloor``
    run whose thresholds never fell below the default floor (:func:`floor_bindings`, over the whole run).

    The two variants differ only in ``min_kl_fraction``; where the floor does not bind, ``kkt_thresholds``
    returns W's thresholds to the bit, so on the host that ran W the default KKT makes the same update in
    every iteration and ends in the same policy. Its cell can then count W's run for that seed instead of
    spending a run on a copy. A seed whose W run met the floor once needs a run of its own."""
    borrowed = []
    for seed in seeds:
        if (run_dir(results, env_id, "kkt", seed) / "progress.jsonl").exists():
            continue
        bound, total, _ = floor_bindings(results, env_id, "kkt-nofloor", [seed])
        if total and not bound:  # W has a run for this seed (thresholds recorded), none below the floor
            borrowed.append(seed)
    return borrowed


def allocation_effect(results: Path, env_id: str, variant: str, seeds: list[int]) -> tuple[float, float, int]:
    """How far an allocator's thresholds are from uniform ones, per iteration (medians over all recorded ones).

    Returns the fraction of the iteration's budget moved away from equal shares,
    ``sum_i |delta_i - sum(delta) / n| / (2 sum(delta))``; the first-order surrogate gain those thresholds
    predict over equal shares *by the allocator's own potentials*, ``sqrt(n sum delta) / sum sqrt(delta) - 1``
    (KKT without an active floor: ``delta_i`` is proportional to ``c_i^2``, so ``sum c_i sqrt(2 delta_i)``
    against ``sum c_i sqrt(2 sum(delta) / n)`` is this ratio; an upper bound on what W can gain per
    iteration if the potentials were exact); and the number of iterations.
    """
    moved, gain = [], []
    for seed in seeds:
        for record in load_progress(results, env_id, variant, seed):
            delta = np.array([a["threshold"] for a in record["allocation"]], dtype=float)
            if delta.size < 2 or delta.sum() <= 0:
                continue
            moved.append(float(np.abs(delta - delta.mean()).sum() / (2 * delta.sum())))
            gain.append(float(np.sqrt(delta.size * delta.sum()) / np.sqrt(delta).sum() - 1))
    if not moved:
        return float("nan"), float("nan"), 0
    return float(np.median(moved)), float(np.median(gain)), len(moved)


def _over_sources(
    sources: dict[str, dict[str, list[int]]], read: Callable[..., dict[int, float]], *args: Any
) -> dict[str, dict[int, float]]:
    """``{variant: {seed: value}}``: ``read(source, seeds, *args)`` over each variant's source variants."""
    return {
        v: {s: r for src, ss in by_src.items() for s, r in read(src, ss, *args).items()}
        for v, by_src in sources.items()
    }


def study_report(
    results: Path,
    envs: list[str],
    variants: list[str],
    seeds: list[int],
    stuck_fraction: float = 0.5,
    at_steps: int | None = None,
    baseline: str = "uniform",
    metric: str = "final",
    eval_every: int = 100_000,
    baselines: dict[str, str] | None = None,
    default_kkt_from_w: bool = False,
) -> str:
    """Issue #8's table: per task and variant, final eval return mean ± std over seeds, the difference to
    uniform with Welch and bootstrap 95% CIs, the fraction of stuck seeds (final return below
    ``stuck_fraction`` times uniform's median on the task), the KL spent / budget and the cell's
    :func:`verdict` on the target. With ``at_steps`` the returns are the evaluations at that step and the
    KL figure covers the iterations up to it. ``baseline``: the variant the others are compared with
    (uniform HATRPO on the same settings); ``baselines`` overrides it per task (``{env_id: variant}``, e.g.
    HalfCheetah 2x3's uniform cell under another name), and a baseline of one task gets no row on the others.
    Below the table: per variant, on how many tasks it beats uniform, the difference pooled over the tasks
    (:func:`pooled_difference`), and for ``kkt-nofloor`` how often the default floor would have bound.

    ``metric="auc"`` compares :func:`study_auc` (the mean of the evaluations every ``eval_every`` steps up to the
    budget) instead of the final evaluation; stuck seeds are still judged by the final evaluation.

    ``default_kkt_from_w``: the ``kkt`` cell also counts W's runs on the seeds of
    :func:`default_kkt_seeds_from_w` (the same updates to the bit), named in a note below the table."""
    if metric not in ("final", "auc"):
        raise ValueError(f"metric must be 'final' or 'auc', not {metric!r}")
    measure = "final eval return" if metric == "final" else f"AUC: mean eval return every {eval_every:,} steps"
    lines = [
        f"| env | variant | seeds | {measure} (mean ± std) | vs uniform | 95% CI (Welch) | 95% CI (bootstrap) "
        f"| stuck seeds (< {stuck_fraction:.0%} of uniform's median) | KL spent / budget | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    task_baseline = {env_id: (baselines or {}).get(env_id, baseline) for env_id in envs}
    verdicts: dict[str, list[str]] = {v: [] for v in variants if v not in task_baseline.values()}
    # (diff %, its standard error %, its Welch degrees of freedom)
    differences: dict[str, list[tuple[float, float, float]]] = {v: [] for v in verdicts}
    notes: list[str] = []
    for env_id in envs:
        env_baseline = task_baseline[env_id]
        # without at_steps: the final evaluations at the task's largest finished budget, never a mix of budgets
        budget = at_steps if at_steps is not None else _largest_budget(results, env_id, variants)
        # where a variant's seed is another variant's run: {variant: {source variant: seeds}}
        sources = {v: {v: seeds} for v in variants}
        if default_kkt_from_w and "kkt" in variants:
            borrowed = default_kkt_seeds_from_w(results, env_id, seeds)
            if borrowed:
                sources["kkt"] = {"kkt": [s for s in seeds if s not in borrowed], "kkt-nofloor": borrowed}
                notes.append(
                    f"{env_id} kkt: seeds {borrowed} are kkt-nofloor's runs (the default floor never bound in them: "
                    "on the host that ran them, the same updates to the bit)"
                )
        finals = _over_sources(sources, functools.partial(study_returns, results, env_id), budget)
        if metric == "auc" and budget is not None:
            compared = _over_sources(sources, functools.partial(study_auc, results, env_id), budget, eval_every)
        else:
            compared = finals
        base = list(compared.get(env_baseline, {}).values())
        base_finals = list(finals.get(env_baseline, {}).values())
        # stuck needs a positive reference: with uniform's median <= 0 (no learning yet) it is undefined
        threshold = (
            stuck_fraction * float(np.median(base_finals))
            if base_finals and np.median(base_finals) > 0
            else float("nan")
        )
        for variant in variants:
            if variant != env_baseline and variant not in verdicts:
                continue  # another task's baseline
            values = list(compared[variant].values())
            final_values = [finals[variant][seed] for seed in compared[variant] if seed in finals[variant]]
            progress = [
                p
                for src, ss in sources[variant].items()
                for s in ss
                for p in load_progress(results, env_id, src, s)
                if at_steps is None or p["timesteps"] <= at_steps
            ]
            spent = (
                np.mean([sum(r["kl"] for r in p["allocation"]) for p in progress])
                / (zoo_settings(env_id)[0]["target_kl"] * len(progress[0]["allocation"]))
                if progress
                else float("nan")
            )
            kl_cell = f"{spent:.0%}" if np.isfinite(spent) else "n/a"  # n/a: no iteration recorded yet
            if variant.startswith("kkt-nofloor") and progress:
                bound, total, bound_seeds = floor_bindings(results, env_id, variant, seeds)
                moved, gain, iterations = allocation_effect(results, env_id, variant, seeds)
                notes.append(
                    f"{env_id} {variant}: the default floor (min_kl_fraction 0.5) would have bound in {bound} of "
                    f"{total} thresholds (seeds {bound_seeds or 'none'}); median iteration of {iterations}: "
                    f"{moved:.1%} of the budget moved from equal shares, predicted surrogate gain over equal "
                    f"shares by its own potentials {gain:+.2%}"
                )
            if not values:
                lines.append(f"| {env_id} | {variant} | 0 | running | | | | | {kl_cell} | |")
                continue
            gain, welch, boot, cell_verdict = "", "", "", ""
            if base and variant != env_baseline:
                change = 100 * (np.mean(values) - np.mean(base)) / abs(np.mean(base))
                if len(values) > 1 and len(base) > 1:
                    se = 100 * difference_se(values, base) / abs(np.mean(base))
                    differences[variant].append((change, se, welch_df(values, base)))
                gain = f"{change:+.1f}%"
                (w_lo, w_hi), (b_lo, b_hi) = difference_cis(values, base)
                # fewer than 2 seeds on a side: no interval
                welch = f"{w_lo:+.0f}% .. {w_hi:+.0f}%" if np.isfinite(w_lo) else "n/a"
                boot = f"{b_lo:+.0f}% .. {b_hi:+.0f}%" if np.isfinite(b_lo) else "n/a"
                cell_verdict = verdict(change, (w_lo, w_hi))
                verdicts[variant].append(cell_verdict)
            stuck = (
                f"{sum(v < threshold for v in final_values)}/{len(final_values)}" if np.isfinite(threshold) else "n/a"
            )
            spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
            lines.append(
                f"| {env_id} | {variant} | {len(values)} | {np.mean(values):.0f} ± {spread:.0f} "
                f"| {gain} | {welch} | {boot} | {stuck} | {kl_cell} | {cell_verdict} |"
            )
    lines.append("")
    for variant, said in verdicts.items():
        counts = ", ".join(f"{said.count(v)} {v}" for v in sorted(set(said)))
        pooled = ""
        if len(differences[variant]) > 1:
            mean, low, high, p_q = pooled_difference(*map(list, zip(*differences[variant])))
            pooled = (
                f"; pooled over {len(differences[variant])} tasks (fixed effect): {mean:+.1f}% "
                f"(95% CI {low:+.1f}% .. {high:+.1f}%, heterogeneity p = {p_q:.2f})"
            )
        lines.append(
            f"{variant}: beats uniform on {said.count('beats uniform')} of {len(envs)} tasks "
            f"({counts or 'no data'}){pooled}"
        )
    return "\n".join(lines + notes)


def parse_baselines(entries: list[str]) -> tuple[str, dict[str, str]]:
    """``--baseline`` entries: one ``VARIANT`` (default ``uniform``) and any ``ENV=VARIANT`` overrides."""
    plain = [e for e in entries if "=" not in e]
    if len(plain) > 1:
        raise SystemExit(f"--baseline: one default variant at most, got {plain}; give the others as ENV=VARIANT")
    overrides = dict(e.split("=", 1) for e in entries if "=" in e)
    for variant in [*plain, *overrides.values()]:
        if variant not in VARIANTS:
            raise SystemExit(f"--baseline: unknown variant {variant!r}; choose from {', '.join(sorted(VARIANTS))}")
    return (plain[0] if plain else "uniform"), overrides


def study_curves(
    results: Path, envs: list[str], variants: list[str], seeds: list[int], out_dir: Path = DOCS
) -> list[Path]:
    """Per task, deterministic eval return against steps: mean over seeds with a 95% t-interval band
    (seeds that reached the step), one line per variant; PNGs ``docs/study_<task>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    paths = []
    for env_id in envs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in variants:
            by_seed = load_evals(results, env_id, variant, seeds)
            steps = sorted({t for evals in by_seed.values() for t in evals})
            points = [(t, [evals[t] for evals in by_seed.values() if t in evals]) for t in steps]
            points = [(t, v) for t, v in points if len(v) >= 2]
            if not points:
                continue
            x = np.array([t for t, _ in points])
            mean = np.array([np.mean(v) for _, v in points])
            half = np.array([stats.t.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / np.sqrt(len(v)) for _, v in points])
            n_seeds = max(len(v) for _, v in points)
            ax.plot(x, mean, label=f"{variant} ({n_seeds} seeds)")
            ax.fill_between(x, mean - half, mean + half, alpha=0.2)
        ax.set_title(f"{env_id}: eval return, mean and 95% CI over seeds", fontsize=10)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("eval return")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"study_{env_id.split(':')[1]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def report_evals(results: Path, envs: list[str], variants: list[str], seeds: list[int]) -> str:
    """Markdown table: deterministic eval return at each evaluation step, mean over seeds and per seed."""
    lines = ["| env | variant | steps | seeds | mean ± std | per seed |", "|---|---|---|---|---|---|"]
    for env_id in envs:
        for variant in variants:
            by_step: dict[int, dict[int, float]] = {}
            for seed, evals in load_evals(results, env_id, variant, seeds).items():
                for step, value in evals.items():
                    by_step.setdefault(step, {})[seed] = value
            for step in sorted(by_step):
                values = by_step[step]
                per_seed = " / ".join(f"{values[s]:.0f}" for s in sorted(values))
                lines.append(
                    f"| {env_id} | {variant} | {step:,} | {len(values)} | "
                    f"{np.mean(list(values.values())):.0f} ± {np.std(list(values.values())):.0f} | {per_seed} |"
                )
    return "\n".join(lines)


def load_evals(results: Path, env_id: str, variant: str, seeds: list[int]) -> dict[int, dict[int, float]]:
    """``{seed: {timesteps: deterministic eval return}}`` of the finished evaluations of a variant."""
    evals: dict[int, dict[int, float]] = {}
    for seed in seeds:
        path = run_dir(results, env_id, variant, seed) / "eval.jsonl"
        if path.exists():
            evals[seed] = {r["timesteps"]: r["mean"] for r in read_jsonl(path)}
    return evals


def compare_harl(results: Path, variant: str, seeds: list[int], reference: Path) -> str:
    """Our HalfCheetah 2x3 eval returns against HARL's measured ones, same steps; a PNG of both curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_id = "mamujoco:HalfCheetah-2x3"
    harl_raw = json.loads(reference.read_text())["eval_return_by_seed_and_step"]
    harl = {int(seed): {int(step): value for step, value in steps.items()} for seed, steps in harl_raw.items()}
    ours = load_evals(results, env_id, variant, seeds)
    lines = [
        f"| steps | HARL HATRPO (seeds {'/'.join(map(str, sorted(harl)))}) | HARL mean "
        f"| sb3_hatrpo {variant} (per seed) | sb3_hatrpo mean ± std | ratio of means |",
        "|---|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curves, color in (("HARL HATRPO", harl, "tab:gray"), (f"sb3_hatrpo {variant}", ours, "tab:red")):
        steps = sorted({step for curve in curves.values() for step in curve})
        for curve in curves.values():
            xs = [s for s in steps if s in curve]
            ax.plot(xs, [curve[s] for s in xs], color=color, alpha=0.35, linewidth=1)
        means = [np.mean([c[s] for c in curves.values() if s in c]) for s in steps]
        ax.plot(steps, means, color=color, linewidth=2.5, label=f"{label} (mean of {len(curves)} seeds)")
    steps = sorted({step for curve in [*harl.values(), *ours.values()] for step in curve})
    for step in steps:
        h = [c[step] for c in harl.values() if step in c]
        o = [c[step] for c in ours.values() if step in c]
        ratio = f"{np.mean(o) / np.mean(h):.1f}x" if h and o else ""
        lines.append(
            f"| {step:,} | {' / '.join(f'{v:.0f}' for v in h)} | {np.mean(h):.0f} | "
            f"{' / '.join(f'{v:.0f}' for v in o)} | "
            + (f"{np.mean(o):.0f} ± {np.std(o):.0f}" if o else "")
            + f" | {ratio} |"
            if h
            else f"| {step:,} | | | {' / '.join(f'{v:.0f}' for v in o)} | {np.mean(o):.0f} ± {np.std(o):.0f} | |"
        )
    ax.set_title(f"{env_id}: deterministic eval return")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "harl_vs_sb3_hatrpo_HalfCheetah-2x3.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["mamujoco:HalfCheetah-2x3", "mamujoco:HalfCheetah-6x1"])
    parser.add_argument("--allocators", nargs="+", default=["uniform", "kkt", "greedy"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--timesteps", type=int, default=1_000_000)
    parser.add_argument("--checkpoint-every", type=int, default=40_000)
    parser.add_argument("--eval-every", type=int, default=100_000, help="deterministic evaluation interval")
    parser.add_argument("--report-evals", action="store_true", help="eval returns per variant and step")
    parser.add_argument(
        "--compare-harl", action="store_true", help="HalfCheetah 2x3 eval returns against HARL's reference, and a PNG"
    )
    parser.add_argument("--harl-reference", type=Path, default=HARL_REFERENCE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--n-workers", type=int, default=1)
    parser.add_argument(
        "--claim", action="store_true", help="share the runs with other workers dynamically (a claim file per run)"
    )
    parser.add_argument("--report", action="store_true", help="print the table and draw the curves, train nothing")
    parser.add_argument(
        "--study-report",
        action="store_true",
        help="issue #8's table: Welch and bootstrap CIs of the difference to uniform, stuck seeds, KL spent",
    )
    parser.add_argument("--stuck-fraction", type=float, default=0.5, help="stuck: below this times uniform's median")
    parser.add_argument(
        "--at-steps", type=int, default=None, help="--study-report: compare the evaluations at this step"
    )
    parser.add_argument(
        "--baseline",
        nargs="+",
        default=["uniform"],
        help="--study-report: the variant compared against, and ENV=VARIANT for a task whose uniform cell has "
        "another name (e.g. mamujoco:HalfCheetah-2x3=uniform-half-batch)",
    )
    parser.add_argument(
        "--metric",
        choices=["final", "auc"],
        default="final",
        help="--study-report: compare the final evaluation, or the mean of all evaluations up to the budget (AUC)",
    )
    parser.add_argument(
        "--default-kkt-from-w",
        action="store_true",
        help="--study-report: the kkt cell counts W's (kkt-nofloor's) run on a seed without a kkt run of its own "
        "where the default floor never bound (the same updates to the bit)",
    )
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(args.results, args.envs, args.allocators, args.seeds))
        return
    if args.compare_harl:
        print(compare_harl(args.results, args.allocators[0], args.seeds, args.harl_reference))
        return
    if args.study_report:
        baseline, baselines = parse_baselines(args.baseline)
        print(
            study_report(
                args.results,
                args.envs,
                args.allocators,
                args.seeds,
                args.stuck_fraction,
                args.at_steps,
                baseline,
                metric=args.metric,
                eval_every=args.eval_every,
                baselines=baselines,
                default_kkt_from_w=args.default_kkt_from_w,
            )
        )
        for path in study_curves(args.results, args.envs, args.allocators, args.seeds):
            print(f"learning curves: {path}")
        return
    if args.report_evals:
        print(report_evals(args.results, args.envs, args.allocators, args.seeds))
        return
    # seed-major order: a partial run still covers every allocator on every env
    runs = [(e, a, s) for s in args.seeds for e in args.envs for a in args.allocators]
    mine = runs if args.claim else [run for i, run in enumerate(runs) if i % args.n_workers == args.worker]
    for env_id, allocator, seed in mine:
        # a run finished at a smaller budget continues from its checkpoint (staged studies: 500k, then 1M)
        if finished(args.results).get((env_id, allocator, seed), 0) >= args.timesteps:
            continue
        folder = run_dir(args.results, env_id, allocator, seed)
        if args.claim and not claim_run(folder):
            continue
        # another worker may have finished it between the check above and the claim
        if args.claim and finished(args.results).get((env_id, allocator, seed), 0) >= args.timesteps:
            (folder / "claim").unlink(missing_ok=True)
            continue
        try:
            train_one(args.results, env_id, allocator, seed, args.timesteps, args.checkpoint_every, args.eval_every)
        finally:
            if args.claim:
                (folder / "claim").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
