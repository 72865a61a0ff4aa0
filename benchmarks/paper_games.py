"""The joint-constraint paper's games: every allocator (and its option variants) over many seeds.

* The bimodal differential game (DESIGN §6), sweeping the start (``init_action`` 1.5 ... 3.5)
  and the initial standard deviation (0.5, 1.0): does the team escape the local optimum
  (R = 0.950 at (1.12, 1.00)) for the global one (R = 1.040 at (5.19, 5.00)), and how fast?
* The climbing and penalty matrix games: does the team find the optimal joint action?

Every run is a real ``HATRPO`` training run (one-step episodes, Gaussian or categorical
actors on a constant observation). Prints a Markdown table — fraction of seeds that reach
the global optimum, final return mean ± std, iterations to 99% of the maximum, and the
total KL spent per iteration as a fraction of ``delta_total`` — and draws the paper-style
figure (reward heatmap with each allocator's mean-action trajectory: red HATRPO, blue G,
green W) into ``docs/``. Results are cached in ``benchmarks/results/paper_games.jsonl``
(resumable: finished cells are not run again).

    python benchmarks/paper_games.py --seeds 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger

from sb3_hatrpo import HATRPO
from sb3_hatrpo.envs.games import climbing_game, differential_reward, penalty_game

RESULTS = Path(__file__).parent / "results" / "paper_games.jsonl"
DOCS = Path(__file__).parent.parent / "docs"
GLOBAL_MAX, LOCAL_MAX = 1.040, 0.950

# name -> (allocator, allocator_kwargs); the first three are the paper's methods with this package's defaults
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform": ("uniform", {}),
    "kkt": ("kkt", {}),
    "greedy": ("greedy", {}),
    "kkt-nofloor": ("kkt", {"min_kl_fraction": 0.0}),
    "kkt-pass": ("kkt", {"pass_unused_budget": True}),
    "kkt-smooth": ("kkt", {"potential_smoothing": 0.8}),
    "uniform-pass": ("uniform", {"pass_unused_budget": True}),
}
SETTINGS: dict[str, Any] = dict(
    n_steps=2,
    n_envs=64,  # 128 one-step episodes per iteration
    batch_size=128,
    n_critic_updates=2,
    cg_max_steps=10,
    target_kl=0.02,
    gamma=0.99,
    policy_kwargs=dict(net_arch=[]),  # constant observation: a linear head is a free mean (and log-std)
    # the paper's recomputation from scratch (with a handful of parameters CG is exact either way)
    krylov_rtol=None,
)
ITERATIONS = {"differential": 80, "climbing": 40, "penalty": 40}


class MeanActionRecorder(BaseCallback):
    """Deterministic joint action and the KL spent, before every rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.actions: list[list[float]] = []
        self.kl_fractions: list[float] = []
        self.allocations: list[list[dict[str, Any]]] = []

    def _on_rollout_start(self) -> None:
        obs = {agent: np.ones(1, np.float32) for agent in self.model.agents}  # type: ignore[attr-defined]
        actions, _ = self.model.predict(obs, deterministic=True)
        self.actions.append([float(np.asarray(actions[a]).reshape(-1)[0]) for a in self.model.agents])  # type: ignore[attr-defined]
        allocation = self.model.last_allocation  # type: ignore[attr-defined]
        if allocation:
            budget = self.model.joint_kl_budget  # type: ignore[attr-defined]
            self.kl_fractions.append(sum(r["kl"] for r in allocation) / budget)
            self.allocations.append([dict(r) for r in allocation])

    def _on_step(self) -> bool:
        return True


def settled_iteration(rewards: np.ndarray, maximum: float) -> int | None:
    """First iteration from which the return stays at >= 99% of the maximum (None if it never settles there)."""
    below = np.flatnonzero(rewards < 0.99 * maximum)
    if below.size == 0:
        return 0
    return None if below[-1] == len(rewards) - 1 else int(below[-1] + 1)


def trajectory_rewards(record: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Returns of the deterministic joint action at every iteration of a stored run, and the game's maximum."""
    played = np.array(record["trajectory"])
    if record["game"] == "differential":
        return differential_reward(played), GLOBAL_MAX
    game = climbing_game() if record["game"] == "climbing" else penalty_game()
    return game.payoff[played[:, 0].astype(int), played[:, 1].astype(int)], float(game.payoff.max())


def run_one(
    game: str, variant: str, seed: int, init_action: float, init_std: float, allocations: bool = False
) -> dict[str, Any]:
    allocator, allocator_kwargs = VARIANTS[variant]
    env_kwargs = {"init_action": init_action} if game == "differential" else {}
    policy_kwargs = dict(SETTINGS["policy_kwargs"])
    if game == "differential":
        policy_kwargs["log_std_init"] = float(np.log(init_std))
    model = HATRPO(
        "MlpPolicy",
        f"games:{game}",
        env_kwargs=env_kwargs,
        allocator=allocator,
        allocator_kwargs=allocator_kwargs,
        seed=seed,
        **{**SETTINGS, "policy_kwargs": policy_kwargs},
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # no log files for thousands of short runs
    recorder = MeanActionRecorder()
    iterations = ITERATIONS[game]
    model.learn(iterations * SETTINGS["n_steps"] * SETTINGS["n_envs"], callback=recorder)
    recorder.on_rollout_start()  # the final policy
    actions = np.array(recorder.actions)
    if game == "differential":
        played = np.clip(actions + init_action, 0.0, 7.0)  # the env's offset and clipping
        rewards = differential_reward(played)
        maximum = GLOBAL_MAX
    else:
        payoff = model.env.get_attr("payoff")[0]  # type: ignore[union-attr]
        played = actions.astype(int)
        rewards = payoff[played[:, 0], played[:, 1]]
        maximum = float(payoff.max())
    model.env.close()  # type: ignore[union-attr]
    extra = {"allocations": recorder.allocations} if allocations else {}
    return {
        **extra,
        "game": game,
        "variant": variant,
        "seed": seed,
        "init_action": init_action,
        "init_std": init_std,
        "final_return": float(rewards[-1]),
        "global": bool(rewards[-1] >= 0.99 * maximum),
        "iterations_to_99": settled_iteration(rewards, maximum),
        "kl_fraction": float(np.mean(recorder.kl_fractions)) if recorder.kl_fractions else None,
        "trajectory": played.tolist(),
    }


MAIN = ["uniform", "kkt", "greedy"]
STARTS, STDS = [1.5, 2.0, 2.5, 3.0, 3.5], [0.5, 1.0]
VARIANT_STARTS = [(2.5, 0.5), (3.0, 0.5)]  # where the prototype saw the allocators differ (DESIGN §7)


def cells(seeds: int, variants: list[str]) -> list[tuple[str, str, int, float, float]]:
    """The three allocators on the whole sweep; the option variants on the critical starts and the matrix games."""
    main = [v for v in variants if v in MAIN]
    extra = [v for v in variants if v not in MAIN]
    sweep = [("differential", v, s, a, d) for s, a, d, v in itertools.product(range(seeds), STARTS, STDS, main)]
    options = [("differential", v, s, a, d) for s, (a, d), v in itertools.product(range(seeds), VARIANT_STARTS, extra)]
    matrix = [(g, v, s, 0.0, 1.0) for s, g, v in itertools.product(range(seeds), ["climbing", "penalty"], variants)]
    return matrix + sweep + options


def key(record: dict[str, Any]) -> tuple:
    return (record["game"], record["variant"], record["seed"], record["init_action"], record["init_std"])


def table(records: list[dict[str, Any]], variants: list[str]) -> str:
    lines = [
        "| game | start | std | variant | seeds | reach global | final return | iterations to 99% (median) | "
        "KL spent / budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["game"], r["init_action"], r["init_std"], r["variant"]), []).append(r)
    order = {v: i for i, v in enumerate(variants)}
    for (game, start, std, variant), rs in sorted(groups.items(), key=lambda kv: (*kv[0][:3], order.get(kv[0][3], 99))):
        finals = np.array([r["final_return"] for r in rs])
        settled = [settled_iteration(*trajectory_rewards(r)) for r in rs]
        hits = [i for i in settled if i is not None]
        kl = [r["kl_fraction"] for r in rs if r["kl_fraction"] is not None]
        start_cell = f"{start}" if game == "differential" else "-"
        std_cell = f"{std}" if game == "differential" else "-"
        reach = np.mean([r["global"] for r in rs])
        lines.append(
            f"| {game} | {start_cell} | {std_cell} | {variant} | {len(rs)} | {reach:.0%} | "
            f"{finals.mean():.3f} ± {finals.std():.3f} | {np.median(hits) if hits else '-'} | {np.mean(kl):.0%} |"
        )
    return "\n".join(lines)


def figure(records: list[dict[str, Any]], init_action: float, init_std: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, 7, 281)
    a1, a2 = np.meshgrid(grid, grid)
    reward = differential_reward(np.stack([a1.ravel(), a2.ravel()], axis=1)).reshape(a1.shape)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    mesh = ax.pcolormesh(a1, a2, reward, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="R(a1, a2)")
    colors = {"uniform": ("red", "HATRPO"), "greedy": ("blue", "HATRPO-G"), "kkt": ("lime", "HATRPO-W")}
    for variant, (color, label) in colors.items():
        selected = [
            r
            for r in records
            if r["game"] == "differential"
            and r["variant"] == variant
            and r["init_action"] == init_action
            and r["init_std"] == init_std
        ]
        if not selected:
            continue
        for r in selected:
            run = np.array(r["trajectory"])
            ax.plot(run[:, 0], run[:, 1], color=color, alpha=0.15, linewidth=0.8)
        # a mean over seeds that split between the two optima would cross the valley: one mean per outcome
        for reached, style in ((True, "-"), (False, "--")):
            group = [np.array(r["trajectory"]) for r in selected if r["global"] == reached]
            if group:
                mean = np.mean(group, axis=0)
                outcome = "global" if reached else "local"
                ax.plot(
                    mean[:, 0],
                    mean[:, 1],
                    style,
                    color=color,
                    linewidth=2.2,
                    label=f"{label}: {len(group)}/{len(selected)} seeds to the {outcome} optimum",
                )
    ax.plot([5.19], [5.0], "w*", markersize=12)
    ax.plot([1.12], [1.0], "wx", markersize=9)
    ax.set_xlabel("a1")
    ax.set_ylabel("a2")
    ax.set_title(f"Differential game, start {init_action}, std {init_std}")
    ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explain(records: list[dict[str, Any]], iterations: int = 10) -> str:
    """Who got the budget in the first iterations, for the seeds that escaped and those that did not.

    For each allocator: the share of the joint budget given to agent 0 (the action ``a1``, pulled
    toward the local optimum's narrow ``a1`` peak) and to agent 1 (``a2``), how much of each
    threshold the line search realised, how often each agent moved first, and the ratio of their
    potentials ``c_0 / c_1``.
    """
    lines = [
        f"First {iterations} iterations. share = threshold / budget; used = realised KL / threshold.",
        "| variant | outcome | seeds | share a1 | share a2 | used a1 | used a2 | a1 first | c_a1 / c_a2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in MAIN:
        for escaped in (True, False):
            runs = [r for r in records if r["variant"] == variant and r["global"] == escaped]
            if not runs:
                continue
            share: dict[str, list[float]] = {"agent_0": [], "agent_1": []}
            used: dict[str, list[float]] = {"agent_0": [], "agent_1": []}
            first, ratio = [], []
            for run in runs:
                for allocation in run["allocations"][:iterations]:
                    by_agent = {a["agent"]: a for a in allocation}
                    for agent in share:
                        entry = by_agent[agent]
                        share[agent].append(entry["threshold"] / (SETTINGS["target_kl"] * len(allocation)))
                        if entry["threshold"] > 0:
                            used[agent].append(entry["kl"] / entry["threshold"])
                    first.append(by_agent["agent_0"]["position"] == 0)
                    if by_agent["agent_1"]["potential"] > 0:
                        ratio.append(by_agent["agent_0"]["potential"] / by_agent["agent_1"]["potential"])
            lines.append(
                f"| {variant} | {'global' if escaped else 'local'} | {len(runs)} "
                f"| {np.mean(share['agent_0']):.0%} | {np.mean(share['agent_1']):.0%} "
                f"| {np.mean(used['agent_0']):.0%} | {np.mean(used['agent_1']):.0%} "
                f"| {np.mean(first):.0%} | {np.median(ratio):.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only print the table and draw the figures")
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--n-workers", type=int, default=1)
    parser.add_argument(
        "--explain",
        nargs=2,
        type=float,
        metavar=("START", "STD"),
        help="rerun one differential start with every iteration's allocation logged and print who got the budget",
    )
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    args.results.parent.mkdir(parents=True, exist_ok=True)

    def load() -> list[dict[str, Any]]:
        if not args.results.exists():
            return []
        return [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]

    if args.explain:
        init_action, init_std = args.explain
        path = args.results.with_name(f"paper_games_allocations_{init_action}_{init_std}.jsonl")
        stored = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        done_keys = {(r["variant"], r["seed"]) for r in stored}
        with path.open("a") as f:
            for seed, variant in itertools.product(range(args.seeds), MAIN):
                if (variant, seed) not in done_keys:
                    record = run_one("differential", variant, seed, init_action, init_std, allocations=True)
                    stored.append(record)
                    f.write(json.dumps(record) + "\n")
        print(explain(stored))
        return
    if not args.report:
        done = {key(r) for r in load()}
        todo = [c for i, c in enumerate(cells(args.seeds, args.variants)) if i % args.n_workers == args.worker]
        todo = [c for c in todo if (c[0], c[1], c[2], c[3], c[4]) not in done]
        start = time.perf_counter()
        for i, (game, variant, seed, init_action, init_std) in enumerate(todo):
            record = run_one(game, variant, seed, init_action, init_std)
            with args.results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if i % 20 == 0:
                elapsed = time.perf_counter() - start
                print(f"{i + 1}/{len(todo)} runs, {elapsed:.0f} s", flush=True)
    records = load()
    print(table(records, args.variants))
    DOCS.mkdir(exist_ok=True)
    for init_action, init_std in [(2.5, 0.5), (3.0, 0.5), (1.5, 1.0)]:
        figure(records, init_action, init_std, DOCS / f"differential_start{init_action}_std{init_std}.png")


if __name__ == "__main__":
    main()
