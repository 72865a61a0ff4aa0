"""Train HATRPO on one env from its zoo config: ``python -m sb3_hatrpo.train --env games:differential``.

Also installed as the ``sb3-hatrpo`` command. rl-zoo's flags and folder layout (see
:mod:`sb3_hatrpo.zoo.exp_manager`); at the end the final model is evaluated deterministically and a
summary is printed: mean +- std return, steps/s and the per-agent KL allocation of the last iteration.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from sb3_hatrpo.extras import require
from sb3_hatrpo.zoo.utils import (
    HelpFormatter,
    add_allow_import_argument,
    positive_timesteps,
    run_cli,
    set_num_threads,
)

__all__ = ["format_summary", "main", "make_parser", "run"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_hatrpo.train",
        description="Train HATRPO (uniform), HATRPO-W (kkt) or HATRPO-G (greedy) with the zoo's hyperparameters.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--env", required=True, help="env id, e.g. games:differential, mamujoco:HalfCheetah-2x3")
    parser.add_argument(
        "--allocator", default=None, help="uniform (hatrpo), kkt (w) or greedy (g); default: the config's"
    )
    parser.add_argument(
        "-n", "--n-timesteps", type=positive_timesteps, default=None, help="training budget; default: the config's"
    )
    parser.add_argument("-f", "--log-folder", default="logs", help="root of the run folders")
    parser.add_argument("--seed", type=int, default=-1, help="random seed; -1 draws one (saved in args.yml)")
    parser.add_argument("-conf", "--conf-file", default=None, help="config file; default: the package's hatrpo.yml")
    parser.add_argument(
        "-params",
        "--hyperparams",
        nargs="+",
        default=[],
        metavar="KEY:VALUE",
        help="override hyperparameters, e.g. n_steps:64 'policy_kwargs:dict(net_arch=[16])' learning_rate:lin_1e-3",
    )
    parser.add_argument(
        "--env-kwargs", nargs="+", default=[], metavar="KEY:VALUE", help="extra make_env arguments, e.g. n_agents:3"
    )
    parser.add_argument(
        "--eval-freq", type=int, default=25_000, help="evaluate every N timesteps (-1: only at the end)"
    )
    parser.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation")
    parser.add_argument("--n-eval-envs", type=int, default=1, help="copies of the eval env")
    parser.add_argument("--save-freq", type=int, default=-1, help="checkpoint every N timesteps (-1: none)")
    parser.add_argument("--n-envs", type=int, default=None, help="env copies; default: the config's")
    parser.add_argument("--vec-env", choices=["dummy", "subproc"], default="dummy", help="how the copies run")
    parser.add_argument("--device", default="auto", help="torch device")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="torch CPU threads; small MLPs run fastest on 1 (threads spin on a busy machine); 0: torch's default",
    )
    parser.add_argument("-tb", "--tensorboard-log", default=None, help="also write TensorBoard logs here")
    parser.add_argument("--log-interval", type=int, default=1, help="print the logger's table every N iterations")
    parser.add_argument(
        "--verbose",
        type=int,
        default=1,
        help="0 quiet, 1 short tables and summary, 2 full tables (per-agent figures) and tracebacks of errors",
    )
    add_allow_import_argument(parser)
    parser.add_argument("--track", action="store_true", help="log to Weights & Biases")
    parser.add_argument("--wandb-project", default="sb3-hatrpo", help="W&B project")
    parser.add_argument("--wandb-entity", default=None, help="W&B team or user")
    parser.add_argument(
        "--wandb-mode",
        choices=["offline", "online", "disabled"],
        default="offline",
        help="offline needs no account (sync later with `wandb sync`)",
    )
    parser.add_argument("--wandb-tags", nargs="*", default=[], help="W&B tags")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    return parser


def format_summary(result: Any, env_id: str, allocator: str, seed: int) -> str:
    """The end-of-training summary as plain text.

    :param result: a :class:`~sb3_hatrpo.zoo.exp_manager.TrainResult`
    :param env_id: the env id
    :param allocator: the allocator's name
    :param seed: the seed
    """
    returns = np.asarray(result.eval_returns, dtype=float)
    lengths = np.asarray(result.eval_lengths, dtype=float)
    lines = [
        f"== {env_id} | HATRPO allocator={allocator} | seed {seed} | run {result.run_dir} ==",
        f"trained {result.num_timesteps} timesteps in {result.train_seconds:.1f} s "
        f"({result.steps_per_second:.0f} steps/s)",
        f"deterministic evaluation, {len(returns)} episodes: return {returns.mean():.4g} +/- {returns.std():.4g}, "
        f"length {lengths.mean():.1f}",
    ]
    if result.last_allocation:
        spent = sum(float(r["kl"]) for r in result.last_allocation)
        lines.append(f"last iteration: KL budget {result.kl_budget:.4g}, spent {spent:.4g}")
        header = f"  {'agent':<16} {'position':>8} {'threshold':>10} {'KL':>10} {'improvement':>12} {'accepted':>8}"
        lines.append(header)
        for record in sorted(result.last_allocation, key=lambda r: r["position"]):
            lines.append(
                f"  {record['agent']:<16} {record['position']:>8d} {record['threshold']:>10.4g} "
                f"{record['kl']:>10.4g} {record['improvement']:>12.4g} {'yes' if record['accepted'] else 'no':>8}"
            )
    else:
        lines.append("last iteration: no update yet (budget smaller than one rollout?)")
    lines.append(f"model: {result.model_path}")
    return "\n".join(lines)


def _print_summary(result: Any, env_id: str, allocator: str, seed: int) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_summary(result, env_id, allocator, seed))
        return
    returns = np.asarray(result.eval_returns, dtype=float)
    console = Console()
    console.rule(f"{env_id} | allocator={allocator} | seed {seed}")
    console.print(
        f"trained [bold]{result.num_timesteps}[/] timesteps in {result.train_seconds:.1f} s "
        f"([bold]{result.steps_per_second:.0f}[/] steps/s)"
    )
    console.print(
        f"deterministic evaluation, {len(returns)} episodes: return [bold]{returns.mean():.4g} +/- {returns.std():.4g}"
        f"[/], length {np.mean(result.eval_lengths):.1f}"
    )
    if result.last_allocation:
        spent = sum(float(r["kl"]) for r in result.last_allocation)
        table = Table(title=f"last iteration: KL budget {result.kl_budget:.4g}, spent {spent:.4g}")
        for column in ("agent", "position", "threshold", "KL", "improvement", "accepted"):
            table.add_column(column, justify="left" if column == "agent" else "right")
        for record in sorted(result.last_allocation, key=lambda r: r["position"]):
            table.add_row(
                str(record["agent"]),
                str(record["position"]),
                f"{record['threshold']:.4g}",
                f"{record['kl']:.4g}",
                f"{record['improvement']:.4g}",
                "yes" if record["accepted"] else "no",
            )
        console.print(table)
    # Plain print: rich would wrap long paths mid-name when the output is piped
    print(f"run folder: {result.run_dir}\nmodel: {result.model_path}")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (and the ``sb3-hatrpo`` console script): exit status 0, or 2 with a one-line error.

    :param argv: the arguments (default ``sys.argv[1:]``)
    """
    run(argv)


def run(argv: Sequence[str] | None = None) -> Any:
    """:func:`main` for Python callers: returns the :class:`~sb3_hatrpo.zoo.exp_manager.TrainResult`.

    :param argv: the command's arguments
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    set_num_threads(args.num_threads)

    def body() -> Any:
        # Before anything is created: a missing extra must not leave an empty run folder behind
        require(["yaml", *(["tqdm", "rich"] if args.progress else [])], "python -m sb3_hatrpo.train")
        from sb3_hatrpo.zoo.config import parse_params
        from sb3_hatrpo.zoo.exp_manager import ExperimentManager

        manager = ExperimentManager(
            env_id=args.env,
            allocator=args.allocator,
            n_timesteps=args.n_timesteps or -1,
            log_folder=args.log_folder,
            seed=args.seed,
            conf_file=args.conf_file,
            params=parse_params(args.hyperparams, "-params"),
            env_kwargs=parse_params(args.env_kwargs, "--env-kwargs"),
            eval_freq=args.eval_freq,
            eval_episodes=args.eval_episodes,
            n_eval_envs=args.n_eval_envs,
            save_freq=args.save_freq,
            n_envs=args.n_envs,
            vec_env=args.vec_env,
            device=args.device,
            verbose=args.verbose,
            tensorboard_log=args.tensorboard_log,
            track=args.track,
            wandb_project=args.wandb_project,
            wandb_entity=args.wandb_entity,
            wandb_mode=args.wandb_mode,
            wandb_tags=args.wandb_tags,
            progress=args.progress,
            log_interval=args.log_interval,
            command=shlex.join(["python", "-m", "sb3_hatrpo.train", *argv_list]),
            cli_args=vars(args),
            allow_imports=args.allow_import,
        )
        result = manager.run()
        allocator = str(manager.hyperparams.get("allocator", "uniform"))
        if args.verbose >= 1:
            _print_summary(result, args.env, allocator, manager.seed)
        else:
            print(format_summary(result, args.env, allocator, manager.seed))
        return result

    return run_cli("sb3_hatrpo.train", body, traceback=args.verbose >= 2)


if __name__ == "__main__":
    main()
