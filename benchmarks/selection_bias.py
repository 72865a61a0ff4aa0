"""Selection bias of each allocator: in-sample against held-out surrogate improvement (issue #8, item 1).

One model (the zoo config's settings, as ``benchmarks/mamujoco.py``) trains with uniform HATRPO;
on each of its next rollouts, every allocator variant is probed side by side with
:class:`sb3_hatrpo.selection_bias.SelectionBiasProbe`: it decides and steps on one time half of the
batch (two of the four envs, the same for every variant), and its committed steps are scored on that half
(in-sample) and on the other (held-out). Parameters are restored after each probe, so every variant
starts from the same policy on the same data. Prints, per variant, means over rollouts (± standard
error) of the summed improvement of its committed steps, in-sample and held-out, the share that
survives, the KL the half-batch run spent, and the held-out improvement per unit of KL.

    python benchmarks/selection_bias.py --env mamujoco:HalfCheetah-2x3 --rollouts 10 --warmup-steps 100000

Results are written to ``benchmarks/results/selection_bias/<env>.json`` (``--report`` reprints them).
``--potentials`` instead records every agent's in-sample, shrunk (``kkt-shrink``) and cross-fitted
(``cross-fit``) potential per rollout, into ``<env>_potentials.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import CallbackList

from sb3_hatrpo import HATRPO
from sb3_hatrpo.noise_aware import CrossFitAllocator, ShrunkKKTAllocator
from sb3_hatrpo.selection_bias import SelectionBiasProbe

try:  # run as a script (python benchmarks/selection_bias.py) or as a module
    from mamujoco import zoo_settings  # type: ignore[import-not-found]
except ImportError:
    from benchmarks.mamujoco import zoo_settings

RESULTS = Path(__file__).parent / "results" / "selection_bias"

# variant -> (allocator, allocator_kwargs); every variant with the zoo config's krylov_rtol
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform": ("uniform", {}),
    "kkt (paper W: no floor)": ("kkt", {"min_kl_fraction": 0.0}),
    "kkt (floor 0.5, default)": ("kkt", {}),
    "greedy (paper G)": ("greedy", {}),
    "greedy (common-fraction, random ties)": ("greedy", {"ratio": "common-fraction", "tie_break": "random"}),
    "kkt-shrink": ("kkt-shrink", {}),
    "cross-fit": ("cross-fit", {}),
}


def measure(env_id: str, rollouts: int, warmup_steps: int, seed: int) -> dict[str, list[dict[str, float]]]:
    """Per variant, the probe's figures on each rollout."""
    settings, n_envs = zoo_settings(env_id)
    model = HATRPO("MlpPolicy", env_id, n_envs=n_envs, seed=seed, allocator="uniform", **settings)
    model.learn(max(warmup_steps, 1))
    probes = {name: SelectionBiasProbe(allocator, kwargs) for name, (allocator, kwargs) in VARIANTS.items()}
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for k in range(rollouts):
        callback = CallbackList([])
        callback.init_callback(model)
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)  # type: ignore[arg-type]
        data = model.rollout_buffer.get()
        for name, probe in probes.items():
            planner = model.make_planner(data)
            record = probe.probe(planner, np.random.default_rng([seed, k]))  # the same half for every variant
            record["budget"] = planner.total_kl
            figures[name].append(record)
        model.train()  # move on with uniform
        print(f"rollout {k + 1}/{rollouts} done", flush=True)
    return figures


def potentials(env_id: str, rollouts: int, warmup_steps: int, seed: int) -> list[dict[str, Any]]:
    """Per rollout, every agent's in-sample potential, its shrunk value (``kkt-shrink``) and its
    cross-fitted value (``cross-fit``, full CG steps), with the model trained as :func:`measure`."""
    settings, n_envs = zoo_settings(env_id)
    model = HATRPO("MlpPolicy", env_id, n_envs=n_envs, seed=seed, allocator="uniform", **settings)
    model.learn(max(warmup_steps, 1))
    rows = []
    for k in range(rollouts):
        callback = CallbackList([])
        callback.init_callback(model)
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)  # type: ignore[arg-type]
        data = model.rollout_buffer.get()
        planner = model.make_planner(data)
        directions = {a: planner.direction(a) for a in planner.agents}
        shrink = ShrunkKKTAllocator()
        shrunk = shrink.adjust_potentials(planner, directions, np.random.default_rng([seed, k]))
        cross_fit = CrossFitAllocator(decision_cg_max_steps=model.cg_max_steps)
        cross, _ = cross_fit.cross_fitted_potentials(model.make_planner(data), np.random.default_rng([seed, k]))
        rows.append(
            {
                "in_sample": [directions[a].potential for a in planner.agents],
                "shrunk": [shrunk[a] for a in planner.agents],
                "cross_fitted": [cross[a] for a in planner.agents],
                **shrink.diagnostics,
            }
        )
        model.train()
        print(f"rollout {k + 1}/{rollouts}: {rows[-1]}", flush=True)
    return rows


def potentials_table(env_id: str, rows: list[dict[str, Any]]) -> str:
    mean = {key: float(np.mean([np.mean(r[key]) for r in rows])) for key in ("in_sample", "shrunk", "cross_fitted")}
    spread = {key: float(np.mean([np.std(r[key]) for r in rows])) for key in ("in_sample", "cross_fitted")}
    zeros = float(np.mean([np.mean(np.array(r["cross_fitted"]) == 0.0) for r in rows]))
    weight = float(np.mean([r["shrink/mean_weight"] for r in rows]))
    noise = float(np.mean([r["shrink/noise_to_spread"] for r in rows]))
    return (
        f"{env_id}, {len(rows)} rollouts (means over rollouts of the mean and the std across agents):\n"
        f"in-sample potential {mean['in_sample']:.3f} (spread {spread['in_sample']:.3f}); "
        f"cross-fitted {mean['cross_fitted']:.3f} (spread {spread['cross_fitted']:.3f}, "
        f"{zeros:.0%} clipped at 0); kkt-shrink weight {weight:.2f}, noise / spread {noise:.2f}"
    )


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {se:.4f}"


def table(env_id: str, figures: dict[str, list[dict[str, float]]]) -> str:
    n = len(next(iter(figures.values())))
    lines = [
        f"{env_id}, {n} rollouts (decisions and steps on one half of the envs, scored on both halves; mean ± s.e.)",
        "",
        "| variant | in-sample improvement | held-out improvement | held-out / in-sample | optimism "
        "(in - out) | KL spent / budget | held-out per unit KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in figures.items():
        ins = [r["selection/in_sample"] for r in rows]
        out = [r["selection/held_out"] for r in rows]
        kl = [r["selection/kl_spent"] / r["budget"] for r in rows]
        per_kl = [r["selection/held_out"] / max(r["selection/kl_spent"], 1e-12) for r in rows]
        share = sum(out) / sum(ins) if sum(ins) else float("nan")
        optimism = [a - b for a, b in zip(ins, out)]
        lines.append(
            f"| {name} | {mean_se(ins)} | {mean_se(out)} | {share:.0%} | {mean_se(optimism)} "
            f"| {statistics.mean(kl):.0%} | {statistics.mean(per_kl):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="mamujoco:HalfCheetah-2x3")
    parser.add_argument("--rollouts", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=100_000, help="uniform training before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="reprint the stored results, measure nothing")
    parser.add_argument(
        "--potentials", action="store_true", help="in-sample, shrunk and cross-fitted potentials per rollout instead"
    )
    args = parser.parse_args()
    th.set_num_threads(1)
    if args.potentials:
        path = args.results / f"{args.env.replace(':', '_')}_potentials.json"
        rows = (
            json.loads(path.read_text())
            if args.report
            else potentials(args.env, args.rollouts, args.warmup_steps, args.seed)
        )
        args.results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))
        print(potentials_table(args.env, rows))
        return
    path = args.results / f"{args.env.replace(':', '_')}.json"
    if args.report:
        print(table(args.env, json.loads(path.read_text())["figures"]))
        return
    figures = measure(args.env, args.rollouts, args.warmup_steps, args.seed)
    args.results.mkdir(parents=True, exist_ok=True)
    settings = {"rollouts": args.rollouts, "warmup_steps": args.warmup_steps, "seed": args.seed}
    path.write_text(json.dumps({"env": args.env, "settings": settings, "figures": figures}, indent=1))
    print(table(args.env, figures))


if __name__ == "__main__":
    main()
