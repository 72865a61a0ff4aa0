"""Tune HATRPO's hyperparameters with Optuna: ``python -m sb3_hatrpo.tune --env games:differential --n-trials 20``.

rl-zoo's flags. Each trial samples hyperparameters (:func:`~sb3_hatrpo.zoo.hyperparams_opt.sample_hatrpo_params`;
``-params`` fixes some instead), trains for ``-n`` timesteps and evaluates deterministically
``--n-evaluations`` times, reporting each mean return to the pruner. A trial whose training diverges
(NaN) is pruned and the study goes on. At the end the best trial is printed and written as a YAML
block ready for ``zoo_configs/hatrpo.yml``, with the trials as CSV and Optuna's history and importance
plots.

**Several machines.** The study lives in an Optuna storage: by default a SQLite file
(``<log folder>/hatrpo/optuna.db``, fine for one machine); with ``--storage postgresql://user:pass@host/db``
(or MySQL) any number of ``tune`` processes, on any machines, share one study: start the same command
everywhere. ``--max-total-trials`` bounds the study's total across workers. Give each worker its own
``--seed`` (or none) so their samplers differ.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sb3_hatrpo.extras import require
from sb3_hatrpo.zoo.utils import (
    ALGO,
    CLIError,
    HelpFormatter,
    add_allow_import_argument,
    env_folder_name,
    positive_timesteps,
    run_cli,
    set_num_threads,
)

__all__ = ["TuneResult", "main", "make_parser", "open_storage", "run"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_hatrpo.tune",
        description="Optuna hyperparameter search for HATRPO; several processes/machines can share one study.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--env", required=True, help="env id")
    parser.add_argument("--allocator", default=None, help="tune only this allocator's options (default: sample it)")
    parser.add_argument(
        "-n", "--n-timesteps", type=positive_timesteps, default=None, help="budget of each trial; default: the config's"
    )
    parser.add_argument("-f", "--log-folder", default="logs", help="root folder of the reports (and the SQLite file)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler and of the trials; default: random")
    parser.add_argument("-conf", "--conf-file", default=None, help="config file (the base hyperparameters)")
    parser.add_argument(
        "-params", "--hyperparams", nargs="+", default=[], metavar="KEY:VALUE", help="fixed (not sampled) values"
    )
    parser.add_argument("--env-kwargs", nargs="+", default=[], metavar="KEY:VALUE", help="extra make_env arguments")
    parser.add_argument("--n-trials", type=int, default=None, help="trials this process runs; default: 10")
    parser.add_argument(
        "--max-total-trials", type=int, default=None, help="stop when the study holds this many trials (all workers)"
    )
    parser.add_argument("--n-jobs", type=int, default=1, help="trials run in parallel threads in this process")
    parser.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    parser.add_argument("--pruner", choices=["median", "halving", "none"], default="median")
    parser.add_argument("--n-startup-trials", type=int, default=10, help="random trials before TPE / pruning starts")
    parser.add_argument("--n-evaluations", type=int, default=5, help="evaluations per trial (pruning points)")
    parser.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation")
    parser.add_argument("--n-envs", type=int, default=None, help="env copies; default: the config's")
    parser.add_argument("--vec-env", choices=["dummy", "subproc"], default="dummy")
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL; default sqlite:///<log folder>/hatrpo/optuna.db"
    )
    parser.add_argument("--study-name", default=None, help="study name; default: hatrpo_<env>[_<allocator>]")
    parser.add_argument("--no-optim-plots", action="store_true", help="skip the history/importance plots")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="torch CPU threads; small MLPs run fastest on 1 (threads spin on a busy machine); 0: torch's default",
    )
    parser.add_argument(
        "--verbose", type=int, default=1, help="0 quiet, 1 one line per trial, 2 Optuna's logs and error tracebacks"
    )
    add_allow_import_argument(parser)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------------


def _masked(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def _first_line(error: BaseException) -> str:
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0].strip()


def _with_driver(url: str) -> str:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; use psycopg2 when only it is installed."""
    import importlib.util

    if (
        url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg") is None
        and importlib.util.find_spec("psycopg2") is not None
    ):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def open_storage(url: str, retries: int = 5) -> Any:
    """An Optuna ``RDBStorage`` with heartbeats (a crashed worker's trial is marked failed, not left running).

    :param url: ``sqlite:///path``, ``postgresql://user:password@host:port/db``, ``mysql+pymysql://...``
    :param retries: attempts when several workers create the schema at the same moment
    :raises CLIError: one line, for an unreachable server, a missing driver or a bad URL
    """
    import warnings

    import optuna
    import sqlalchemy.exc

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}  # wait for the file lock of another worker
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        engine_kwargs["pool_pre_ping"] = True
    driver_url = _with_driver(url)
    for attempt in range(retries):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                return optuna.storages.RDBStorage(
                    driver_url, engine_kwargs=engine_kwargs, heartbeat_interval=30, grace_period=120
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.InternalError):
            # Another worker is creating the tables right now.
            if attempt == retries - 1:
                raise
            time.sleep(0.5 + random.random())
        except sqlalchemy.exc.OperationalError as error:
            raise CLIError(f"cannot reach the Optuna storage {_masked(url)}: {_first_line(error)}") from None
        except ImportError as error:
            cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
            raise CLIError(
                f"cannot open the Optuna storage {_masked(url)}: no database driver{cause}; install it "
                "(PostgreSQL: pip install psycopg2-binary) or name one in the URL (postgresql+psycopg2://...)"
            ) from None
        except sqlalchemy.exc.DatabaseError as error:  # e.g. SQLite: "file is not a database"
            raise CLIError(
                f"cannot open the Optuna storage {_masked(url)}: {_first_line(error)}; point --storage at an Optuna "
                "database (a new file is created) or a database server"
            ) from None
        except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as error:
            raise CLIError(f"cannot open the Optuna storage {_masked(url)}: {_first_line(error)}") from None
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------------------


def _trial_eval_callback_class() -> type:
    from sb3_hatrpo.callbacks import MultiAgentEvalCallback

    class TrialEvalCallback(MultiAgentEvalCallback):
        """Evaluate, report each mean return to the trial, stop when the pruner says so or on NaN."""

        def __init__(self, eval_env: Any, trial: Any, **kwargs: Any) -> None:
            super().__init__(eval_env, **kwargs)
            self.trial = trial
            self.eval_idx = 0
            self.is_pruned = False

        def _on_step(self) -> bool:
            if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
                super().evaluate()
                self.eval_idx += 1
                if not math.isfinite(self.last_mean_reward):
                    self.is_pruned = True
                    return False
                self.trial.report(self.last_mean_reward, self.eval_idx)
                if self.trial.should_prune():
                    self.is_pruned = True
                    return False
            return True

    return TrialEvalCallback


@dataclass
class _Objective:
    args: argparse.Namespace
    base: dict[str, Any]
    fixed: dict[str, Any]
    env_kwargs: dict[str, Any]
    n_timesteps: int
    worker: str
    # A broken env (not a bad sample): the study stops and the command reports it as its error
    fatal: BaseException | None = None

    def __call__(self, trial: Any) -> float:
        import optuna

        from sb3_hatrpo.hatrpo import HATRPO
        from sb3_hatrpo.vec_env import EnvOutputError
        from sb3_hatrpo.zoo.config import merge_overrides, prepare_hyperparams
        from sb3_hatrpo.zoo.exp_manager import EVAL_SEED_OFFSET, build_vec_env
        from sb3_hatrpo.zoo.hyperparams_opt import sample_hatrpo_params

        trial.set_user_attr("worker", self.worker)
        sampled = sample_hatrpo_params(trial, allocator=self.args.allocator, fixed=self.fixed)
        hyperparams = merge_overrides({**self.base, **sampled}, self.fixed)
        hyperparams["n_timesteps"] = self.n_timesteps
        if self.args.n_envs is not None:
            hyperparams["n_envs"] = self.args.n_envs
        trial.set_user_attr("hyperparams", hyperparams)
        prepared = prepare_hyperparams(hyperparams, self.args.allow_import)
        seed = (self.args.seed + trial.number) if self.args.seed is not None else random.randrange(2**31 - 1)
        env = build_vec_env(self.args.env, prepared, prepared.n_envs, seed, self.args.vec_env, self.env_kwargs)
        eval_env = build_vec_env(self.args.env, prepared, 1, seed + EVAL_SEED_OFFSET, "dummy", self.env_kwargs)
        try:
            model = HATRPO(prepared.policy, env, seed=seed, device=self.args.device, verbose=0, **prepared.model_kwargs)
            eval_freq = max(self.n_timesteps // max(self.args.n_evaluations, 1) // prepared.n_envs, 1)
            callback = _trial_eval_callback_class()(
                eval_env, trial, n_eval_episodes=self.args.eval_episodes, eval_freq=eval_freq, verbose=0
            )
            try:
                model.learn(self.n_timesteps, callback=callback)
                if callback.is_pruned:
                    raise optuna.TrialPruned(f"pruned after evaluation {callback.eval_idx}")
                if not callback.evaluations_n_updates or callback.evaluations_n_updates[-1] != model._n_updates:
                    callback.evaluate()  # the final model, not the one before its last update
            except EnvOutputError as error:
                # A broken env, not a bad sample: every trial would fail the same way. Stop the study (this trial
                # counts as pruned, so the study stays resumable) and report the error once.
                self.fatal = error
                trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
                trial.study.stop()
                raise optuna.TrialPruned(f"the env is broken: {error}") from None
            except (AssertionError, ValueError, FloatingPointError) as error:
                # Diverged (NaN advantages, observations or distribution parameters): prune, keep the study going.
                trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
                raise optuna.TrialPruned(f"training failed: {type(error).__name__}: {error}") from None
        finally:
            env.close()
            eval_env.close()
        value = float(callback.last_mean_reward)
        if not math.isfinite(value):
            trial.set_user_attr("error", "non-finite evaluation return")
            raise optuna.TrialPruned("non-finite evaluation return")
        return value


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What a ``tune`` process did and found."""

    study_name: str
    storage: str
    report_dir: Path
    trial_numbers: list[int]
    best_value: float | None
    best_hyperparams: dict[str, Any] | None
    yaml_path: Path | None


def _write_report(study: Any, env_id: str, report_dir: Path, plots: bool) -> tuple[Path | None, Any]:
    import optuna
    import yaml

    report_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    with open(report_dir / "trials.csv", "w", newline="") as file:
        names = sorted({name for t in trials for name in t.params})
        writer = csv.writer(file)
        writer.writerow(["number", "state", "value", "worker", "duration_s", *names])
        for t in trials:
            duration = t.duration.total_seconds() if t.duration is not None else ""
            writer.writerow(
                [t.number, t.state.name, t.value, t.user_attrs.get("worker", ""), duration]
                + [t.params.get(n, "") for n in names]
            )
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        return None, None
    best = study.best_trial
    hyperparams = _rounded(dict(best.user_attrs.get("hyperparams", best.params)))
    block = {env_id: hyperparams}
    header = (
        f"# Best trial {best.number} of study {study.study_name!r}: mean return {best.value:.6g}\n"
        f"# (tuned with n_timesteps {hyperparams.get('n_timesteps')}; raise it for a full run)\n"
    )
    yaml_path = report_dir / "best_hyperparams.yml"
    yaml_path.write_text(header + yaml.safe_dump(block, sort_keys=True, default_flow_style=None))
    if plots:
        _save_plots(study, report_dir, len(completed))
    return yaml_path, best


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits, for a readable config."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value != 0.0:
        return float(f"{value:.6g}")
    return value


def _save_plots(study: Any, report_dir: Path, n_completed: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm
    except ImportError:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for name, plot in (("history", ovm.plot_optimization_history), ("importance", ovm.plot_param_importances)):
            if name == "importance" and n_completed < 2:
                continue
            try:
                axes = plot(study)
                figure: Any = axes.figure if hasattr(axes, "figure") else plt.gcf()
                figure.tight_layout()
                figure.savefig(report_dir / f"{name}.png", dpi=100)
                plt.close(figure)
            except Exception as error:  # importance needs varied parameters
                print(f"Could not draw the {name} plot: {error}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: exit status 0, or 2 with a one-line error.

    :param argv: the arguments (default ``sys.argv[1:]``)
    """
    run(argv)


def run(argv: Sequence[str] | None = None) -> TuneResult:
    """:func:`main` for Python callers: returns what this process ran and the study's best trial (:class:`TuneResult`).

    :param argv: the command's arguments
    """
    args = make_parser().parse_args(argv)
    set_num_threads(args.num_threads)

    def body() -> TuneResult:
        modules = ["optuna", "yaml", *([] if args.no_optim_plots else ["matplotlib"])]
        require(modules, "python -m sb3_hatrpo.tune")  # before any storage or report folder is created
        return _tune(args)

    return run_cli("sb3_hatrpo.tune", body, traceback=args.verbose >= 2)


def _tune(args: argparse.Namespace) -> TuneResult:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from sb3_hatrpo.validation import check_device, check_hyperparameters
    from sb3_hatrpo.zoo.config import ConfigError, canonical_allocator, get_hyperparams, merge_overrides, parse_params
    from sb3_hatrpo.zoo.config import prepare_hyperparams as _prepare
    from sb3_hatrpo.zoo.utils import check_writable_folder

    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose >= 2 else optuna.logging.WARNING)
    for flag in ("n_evaluations", "eval_episodes", "n_jobs"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.allocator:
        args.allocator = canonical_allocator(args.allocator)
    fixed = parse_params(args.hyperparams, "-params")
    env_kwargs = parse_params(args.env_kwargs, "--env-kwargs")
    base, source = get_hyperparams(args.env, args.conf_file)
    # Fail on a bad env id or config before any storage is touched.
    prepared = _prepare(merge_overrides(base, fixed), args.allow_import)
    check_device(args.device, owner="--device")
    check_hyperparameters(**prepared.model_kwargs)  # fixed values every trial would fail on
    check_writable_folder(args.log_folder)
    n_timesteps = args.n_timesteps or prepared.n_timesteps
    if not n_timesteps:
        raise ConfigError(f"No n_timesteps for {args.env!r} in {source}: pass -n/--n-timesteps")
    from sb3_hatrpo.envs import make_env

    make_env(args.env, **{**prepared.env_kwargs, **env_kwargs}).close()
    # The sampler's choices replace the config's allocator options and network.
    base = {k: v for k, v in base.items() if k not in ("allocator_kwargs", "n_timesteps")}

    log_path = Path(args.log_folder) / ALGO
    study_name = args.study_name or f"hatrpo_{env_folder_name(args.env)}" + (
        f"_{args.allocator}" if args.allocator else ""
    )
    storage_url = args.storage or f"sqlite:///{(log_path / 'optuna.db').as_posix()}"
    storage = open_storage(storage_url)

    if args.sampler == "tpe":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            n_startup_trials=args.n_startup_trials, seed=args.seed, multivariate=True, constant_liar=True
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=args.seed)
    if args.pruner == "median":
        pruner: optuna.pruners.BasePruner = optuna.pruners.MedianPruner(
            n_startup_trials=args.n_startup_trials, n_warmup_steps=args.n_evaluations // 3
        )
    elif args.pruner == "halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4, min_early_stopping_rate=0)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )
    worker = f"{socket.gethostname()}:{os.getpid()}"
    mine: list[int] = []

    def on_trial_end(study: Any, trial: Any) -> None:
        mine.append(trial.number)
        if args.verbose >= 1:
            value = f"{trial.value:.6g}" if trial.value is not None else "-"
            reason = trial.user_attrs.get("error", "")
            print(f"[{worker}] trial {trial.number} {trial.state.name.lower()}: {value} {reason}".rstrip(), flush=True)

    counted = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
    callbacks: list[Any] = [on_trial_end]
    n_trials = args.n_trials
    run_trials = True
    if args.max_total_trials is not None:
        # Running trials count too: otherwise every worker would overshoot by one.
        if len(study.get_trials(deepcopy=False, states=counted)) >= args.max_total_trials:
            print(f"Study {study_name!r} already holds {args.max_total_trials} trials: nothing to run")
            run_trials = False
        callbacks.append(MaxTrialsCallback(args.max_total_trials, states=counted))
    elif n_trials is None:
        n_trials = 10
    if args.verbose >= 1:
        print(
            f"Study {study_name!r} in {_masked(storage_url)} ({source}); worker {worker}; "
            f"{n_trials if n_trials is not None else 'up to --max-total-trials'} trials of {n_timesteps} timesteps"
        )
    objective = _Objective(args, base, fixed, env_kwargs, int(n_timesteps), worker)
    if run_trials:
        try:
            study.optimize(objective, n_trials=n_trials, n_jobs=args.n_jobs, callbacks=callbacks, gc_after_trial=True)
        except KeyboardInterrupt:
            print("Interrupted: reporting the trials so far", file=sys.stderr)
        if objective.fatal is not None:
            raise objective.fatal

    report_dir = log_path / f"tune_{study_name}"
    yaml_path, best = _write_report(study, args.env, report_dir, plots=not args.no_optim_plots)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    summary = ", ".join(
        f"{sum(s == state for s in states)} {state.name.lower()}" for state in TrialState if state in states
    )
    print(f"Study {study_name!r}: {len(states)} trials ({summary}); this worker ran {len(mine)}: {sorted(mine)}")
    if best is None:
        print("No completed trial yet: no best hyperparameters")
        return TuneResult(study_name, storage_url, report_dir, sorted(mine), None, None, None)
    print(f"Best trial {best.number}: mean return {best.value:.6g}")
    for key, value in sorted(best.params.items()):
        print(f"    {key}: {value}")
    assert yaml_path is not None
    print(f"Hyperparameters for zoo_configs/hatrpo.yml ({yaml_path}):\n")
    print(yaml_path.read_text())
    return TuneResult(
        study_name=study_name,
        storage=storage_url,
        report_dir=report_dir,
        trial_numbers=sorted(mine),
        best_value=float(best.value) if best.value is not None and np.isfinite(best.value) else None,
        best_hyperparams=dict(best.user_attrs.get("hyperparams", {})),
        yaml_path=yaml_path,
    )


if __name__ == "__main__":
    main()
