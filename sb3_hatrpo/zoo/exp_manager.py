"""The experiment manager behind ``python -m sb3_hatrpo.train``: config -> envs -> model -> callbacks -> run folder.

Folder layout (rl-zoo's)::

    <log folder>/hatrpo/<env>_<id>/
        <env>.zip                    final model
        best_model.zip               best deterministic evaluation
        rl_model_<steps>_steps.zip   checkpoints (--save-freq)
        evaluations.npz              timesteps, results, ep_lengths (as SB3's EvalCallback)
        progress.csv                 every SB3 logger record (rollout/, train/<agent>/..., eval/)
        <env>/config.yml             the hyperparameters used (config form, reusable as an entry)
        <env>/args.yml               the command's arguments, resolved (seed, exp id, env id ...)
        <env>/command.txt            the command line
        wandb/                       the W&B run (--track; offline by default: ``wandb sync <run>/wandb/offline-run-*``)

where ``<env>`` is :func:`~sb3_hatrpo.zoo.utils.env_folder_name` of the env id (``:`` -> ``-``).
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
from stable_baselines3.common.logger import Logger, make_output_format

from sb3_hatrpo.callbacks import MultiAgentEvalCallback
from sb3_hatrpo.hatrpo import HATRPO
from sb3_hatrpo.validation import check_device
from sb3_hatrpo.vec_env import MultiAgentVecEnv, make_vec_env
from sb3_hatrpo.zoo.config import (
    ConfigError,
    PreparedHyperparams,
    canonical_allocator,
    get_hyperparams,
    prepare_hyperparams,
)
from sb3_hatrpo.zoo.console import ShortTableFormat
from sb3_hatrpo.zoo.utils import ALGO, check_writable_folder, env_folder_name, new_run_folder

__all__ = ["EVAL_SEED_OFFSET", "ExperimentManager", "TrainResult", "build_vec_env", "configure_logger"]

# The eval env is seeded apart from the training env, so evaluations do not replay training episodes.
EVAL_SEED_OFFSET = 10_000


def build_vec_env(
    env_id: str,
    prepared: PreparedHyperparams,
    n_envs: int,
    seed: int | None,
    vec_env: str = "dummy",
    env_kwargs: dict[str, Any] | None = None,
) -> MultiAgentVecEnv:
    """``n_envs`` copies of ``env_id`` with the config's ``env_kwargs`` (updated by ``env_kwargs``) and wrapper."""
    kwargs = {**prepared.env_kwargs, **(env_kwargs or {})}
    return make_vec_env(
        env_id, n_envs=n_envs, seed=seed, vec_env_cls=vec_env, wrapper=prepared.env_wrapper, env_kwargs=kwargs
    )


def configure_logger(folder: Path, verbose: int, tensorboard_folder: Path | None = None) -> Logger:
    """SB3 logger writing ``progress.csv`` in ``folder``, TensorBoard if asked, and to stdout: the short table
    (:class:`~sb3_hatrpo.zoo.console.ShortTableFormat`) with ``verbose=1``, SB3's full one with 2."""
    formats = [make_output_format("csv", str(folder))]
    if verbose == 1:
        formats.insert(0, ShortTableFormat())
    elif verbose >= 2:
        formats.insert(0, make_output_format("stdout", str(folder)))
    if tensorboard_folder is not None:
        formats.append(make_output_format("tensorboard", str(tensorboard_folder)))
    return Logger(str(folder), formats)


@dataclass
class TrainResult:
    """What a training run produced (returned by :meth:`ExperimentManager.run`)."""

    run_dir: Path
    model_path: Path
    exp_id: int
    num_timesteps: int
    train_seconds: float
    eval_returns: list[float]
    eval_lengths: list[int]
    last_allocation: list[dict[str, Any]] = field(default_factory=list)
    kl_budget: float = 0.0
    wandb_summary: dict[str, Any] | None = None  # the W&B run's summary (last value of every key), with --track
    wandb_config: dict[str, Any] | None = None

    @property
    def steps_per_second(self) -> float:
        return self.num_timesteps / self.train_seconds if self.train_seconds > 0 else float("nan")


class ExperimentManager:
    """Read the config of an env, build envs and model, train with callbacks, save in rl-zoo's layout.

    Hyperparameters: the config entry of ``env_id`` over ``default``, then ``params`` (``-params``),
    then the explicit flags ``allocator``, ``n_envs`` and ``n_timesteps``.

    :param env_id: env id for :func:`sb3_hatrpo.envs.make_env`
    :param allocator: overrides the config's allocator (its per-allocator options are used)
    :param n_timesteps: training budget; <= 0 takes the config's
    :param log_folder: the root of the run folders (``<log_folder>/hatrpo/<env>_<id>``)
    :param seed: seed of model and envs; None draws one (saved in ``args.yml``)
    :param conf_file: config file; default the package's ``zoo_configs/hatrpo.yml``
    :param params: hyperparameter overrides (config form)
    :param env_kwargs: extra ``make_env`` keyword arguments (over the config's; saved in ``config.yml``)
    :param eval_freq: evaluate every this many timesteps (<= 0: only at the end)
    :param eval_episodes: episodes per evaluation, and of the final evaluation
    :param n_eval_envs: copies of the eval env
    :param save_freq: checkpoint every this many timesteps (<= 0: none)
    :param n_envs: overrides the config's ``n_envs``
    :param vec_env: ``"dummy"`` or ``"subproc"``
    :param device: torch device
    :param verbose: 0 quiet, 1 SB3's tables and the summary, 2 debug
    :param tensorboard_log: also write TensorBoard files under this folder
    :param track: log to Weights & Biases
    :param wandb_project: W&B project
    :param wandb_entity: W&B entity (team or user)
    :param wandb_mode: ``"offline"`` (default: no account needed), ``"online"`` or ``"disabled"``
    :param wandb_tags: W&B tags
    :param progress: show a progress bar
    :param log_interval: dump the logger every this many iterations
    :param command: the command line, for ``command.txt``
    :param cli_args: the parsed arguments, for ``args.yml``
    :param allow_imports: modules besides the allow-list whose callables the config's ``env_wrapper`` may
        name (``--allow-import``); see :data:`sb3_hatrpo.zoo.config.ALLOWED_IMPORTS`
    """

    def __init__(
        self,
        env_id: str,
        allocator: str | None = None,
        n_timesteps: int = -1,
        log_folder: str | Path = "logs",
        seed: int | None = None,
        conf_file: str | Path | None = None,
        params: dict[str, Any] | None = None,
        env_kwargs: dict[str, Any] | None = None,
        eval_freq: int = 25_000,
        eval_episodes: int = 5,
        n_eval_envs: int = 1,
        save_freq: int = -1,
        n_envs: int | None = None,
        vec_env: str = "dummy",
        device: str = "auto",
        verbose: int = 1,
        tensorboard_log: str | Path | None = None,
        track: bool = False,
        wandb_project: str = "sb3-hatrpo",
        wandb_entity: str | None = None,
        wandb_mode: str = "offline",
        wandb_tags: list[str] | None = None,
        progress: bool = True,
        log_interval: int = 1,
        command: str | None = None,
        cli_args: dict[str, Any] | None = None,
        allow_imports: list[str] | tuple[str, ...] = (),
    ) -> None:
        # Flags are checked before anything is built or written: a typo leaves no run folder behind.
        check_device(device, owner="--device")
        if log_interval < 1:
            raise ConfigError(f"--log-interval must be at least 1 (iterations between logs), got {log_interval}")
        if eval_episodes < 1:
            raise ConfigError(f"--eval-episodes must be at least 1, got {eval_episodes}")
        if n_eval_envs < 1:
            raise ConfigError(f"--n-eval-envs must be at least 1, got {n_eval_envs}")
        self.env_id = env_id
        self.env_folder = env_folder_name(env_id)
        self.allocator = canonical_allocator(allocator) if allocator else None
        self.n_timesteps = n_timesteps
        self.log_path = Path(log_folder) / ALGO
        self.seed = int(np.random.randint(2**31 - 1)) if seed is None or seed < 0 else int(seed)
        self.conf_file = conf_file
        self.params = dict(params or {})
        self.env_kwargs = dict(env_kwargs or {})
        self.eval_freq = eval_freq
        self.eval_episodes = eval_episodes
        self.n_eval_envs = n_eval_envs
        self.save_freq = save_freq
        self.n_envs_flag = n_envs
        self.vec_env = vec_env
        self.device = device
        self.verbose = verbose
        self.tensorboard_log = Path(tensorboard_log) if tensorboard_log else None
        self.track = track
        self.wandb_project = wandb_project
        self.wandb_entity = wandb_entity
        self.wandb_mode = wandb_mode
        self.wandb_tags = list(wandb_tags or [])
        self.progress = progress
        self.log_interval = log_interval
        self.command = command or shlex.join([sys.executable, "-m", "sb3_hatrpo.train", *sys.argv[1:]])
        self.cli_args = dict(cli_args or {})
        self.allow_imports = tuple(allow_imports)
        check_writable_folder(log_folder)

        self.hyperparams: dict[str, Any] = {}
        self.config_source = ""
        self.prepared: PreparedHyperparams | None = None
        self.n_envs = 1
        self.total_timesteps = 0
        self.run_dir: Path | None = None
        self.exp_id = 0
        self.env: MultiAgentVecEnv | None = None
        self.eval_env: MultiAgentVecEnv | None = None
        self.eval_callback: MultiAgentEvalCallback | None = None
        self.wandb_run: Any = None
        self._artifact_dir: Path | None = None

    # ------------------------------------------------------------------ config
    def read_hyperparams(self) -> dict[str, Any]:
        """The run's hyperparameters in config form (config entry, ``-params``, then flags)."""
        hyperparams, source = get_hyperparams(self.env_id, self.conf_file, self.params)
        if self.allocator is not None:
            configured = hyperparams.get("allocator", "uniform")
            options = hyperparams.get("allocator_kwargs")
            flat = isinstance(options, dict) and options and not _per_allocator(options)
            if flat and canonical_allocator(configured) != self.allocator and "allocator_kwargs" not in self.params:
                # Options of another allocator would be rejected by this one.
                print(
                    f"Note: --allocator {self.allocator} replaces the config's {configured!r}: "
                    f"its allocator_kwargs {options} are not used",
                    file=sys.stderr,
                )
                hyperparams.pop("allocator_kwargs")
            hyperparams["allocator"] = self.allocator
            source += f", --allocator {self.allocator}"
        if self.env_kwargs:
            # Saved with the config, so enjoy rebuilds the same env
            hyperparams["env_kwargs"] = {**(hyperparams.get("env_kwargs") or {}), **self.env_kwargs}
            source += ", --env-kwargs"
        if self.n_envs_flag is not None:
            hyperparams["n_envs"] = self.n_envs_flag
        if self.n_timesteps is not None and self.n_timesteps > 0:
            hyperparams["n_timesteps"] = self.n_timesteps
        self.hyperparams = hyperparams
        self.config_source = source
        self.prepared = prepare_hyperparams(hyperparams, self.allow_imports)
        if self.prepared.n_timesteps is None:
            raise ConfigError(f"No n_timesteps for {self.env_id!r} in {source}: pass -n/--n-timesteps")
        self.n_envs = self.prepared.n_envs
        self.total_timesteps = self.prepared.n_timesteps
        return hyperparams

    # ------------------------------------------------------------------ set-up
    def setup_experiment(self) -> HATRPO:
        """Read the config, build the envs and the model, then create the run folder and its files."""
        self.read_hyperparams()
        assert self.prepared is not None
        self.env = build_vec_env(self.env_id, self.prepared, self.n_envs, self.seed, self.vec_env)
        try:
            self.eval_env = build_vec_env(
                self.env_id, self.prepared, self.n_eval_envs, self.seed + EVAL_SEED_OFFSET, "dummy"
            )
            model = HATRPO(
                self.prepared.policy,
                self.env,
                seed=self.seed,
                device=self.device,
                verbose=self.verbose,
                **self.prepared.model_kwargs,
            )
        except BaseException:
            self.close()
            raise
        # Only now that everything is valid: no empty run folders from typos.
        self.run_dir, self.exp_id = new_run_folder(self.log_path, self.env_folder)
        self._save_config()
        tb_folder = self.tensorboard_log / f"{self.env_folder}_{self.exp_id}" if self.tensorboard_log else None
        model.set_logger(configure_logger(self.run_dir, self.verbose, tb_folder))
        if self.verbose >= 1:
            print(f"Hyperparameters: {self.config_source}")
            print(f"Run folder: {self.run_dir}")
        return model

    def _save_config(self) -> None:
        assert self.run_dir is not None
        meta = self.run_dir / self.env_folder
        meta.mkdir(parents=True, exist_ok=True)
        with open(meta / "config.yml", "w") as file:
            yaml.safe_dump(_yaml_safe(self.hyperparams), file, sort_keys=True)
        args = {
            **_yaml_safe(self.cli_args),
            "env": self.env_id,
            "seed": self.seed,
            "exp_id": self.exp_id,
            "allocator": self.hyperparams.get("allocator", "uniform"),
            "n_timesteps": self.total_timesteps,
            "n_envs": self.n_envs,
            "config_source": self.config_source,
        }
        with open(meta / "args.yml", "w") as file:
            yaml.safe_dump(args, file, sort_keys=True)
        (meta / "command.txt").write_text(self.command + "\n")

    def create_callbacks(self, model: HATRPO) -> list[BaseCallback]:
        """Evaluation (always: it also runs the final evaluation), checkpoints and W&B if asked."""
        assert self.run_dir is not None and self.eval_env is not None
        callbacks: list[BaseCallback] = []
        self.eval_callback = MultiAgentEvalCallback(
            self.eval_env,
            n_eval_episodes=self.eval_episodes,
            eval_freq=max(self.eval_freq // self.n_envs, 1) if self.eval_freq > 0 else -1,
            log_path=self.run_dir,
            best_model_save_path=self.run_dir,
            deterministic=True,
            verbose=self.verbose,
        )
        callbacks.append(self.eval_callback)
        if self.save_freq > 0:
            callbacks.append(
                CheckpointCallback(
                    save_freq=max(self.save_freq // self.n_envs, 1),
                    save_path=str(self.run_dir),
                    name_prefix="rl_model",
                    verbose=self.verbose,
                )
            )
        if self.track:
            callbacks.append(self._wandb_callback())
        return callbacks

    def _wandb_callback(self) -> BaseCallback:
        import wandb

        from sb3_hatrpo.callbacks import WandbCallback

        assert self.run_dir is not None
        allocator = self.hyperparams.get("allocator", "uniform")
        config = {
            "env_id": self.env_id,
            "n_timesteps": self.total_timesteps,
            "exp_id": self.exp_id,
            "run_dir": str(self.run_dir),
            "config_source": self.config_source,
            "hyperparams": _yaml_safe(self.hyperparams),
        }
        self.wandb_run = wandb.init(
            project=self.wandb_project,
            entity=self.wandb_entity,
            mode=self.wandb_mode,  # type: ignore[arg-type]
            name=f"{self.env_folder}__{allocator}__{self.seed}__{self.exp_id}",
            group=f"{self.env_folder}__{allocator}",
            tags=[ALGO, allocator, *self.wandb_tags],
            config=config,
            sync_tensorboard=False,
            reinit="finish_previous",
            dir=str(self.run_dir),  # <run>/wandb/, next to the rest of the run
        )
        # The model files uploaded as artifacts: W&B copies them into its own folder, so they live in a temporary
        # folder (removed by close()) rather than as a second copy of the model in the run folder
        self._artifact_dir = Path(tempfile.mkdtemp(prefix="sb3_hatrpo_artifacts_"))
        return WandbCallback(
            verbose=self.verbose,
            model_save_path=str(self._artifact_dir),
            model_save_freq=max(self.save_freq // self.n_envs, 1) if self.save_freq > 0 else 0,
            config=config,
        )

    # ------------------------------------------------------------------ run
    def learn(self, model: HATRPO, callbacks: list[BaseCallback]) -> float:
        """Train; returns the wall-clock seconds."""
        start = time.perf_counter()
        try:
            model.learn(
                self.total_timesteps,
                callback=CallbackList(callbacks),
                log_interval=self.log_interval,
                progress_bar=self.progress,
            )
        except KeyboardInterrupt:
            # rl-zoo's behaviour: keep what was learnt so far
            print("Interrupted: saving the model trained so far", file=sys.stderr)
        return time.perf_counter() - start

    def final_evaluation(self, model: HATRPO) -> tuple[list[float], list[int]]:
        """Deterministic evaluation of the final model, appended to ``evaluations.npz``."""
        assert self.eval_callback is not None
        callback = self.eval_callback
        n_updates = int(getattr(model, "_n_updates", 0))
        if not callback.evaluations_n_updates or callback.evaluations_n_updates[-1] != n_updates:
            callback.num_timesteps = model.num_timesteps
            callback.evaluate()
        return list(callback.evaluations_results[-1]), list(callback.evaluations_length[-1])

    def save_trained_model(self, model: HATRPO) -> Path:
        """Save the final model as ``<run>/<env>.zip``."""
        assert self.run_dir is not None
        path = self.run_dir / f"{self.env_folder}.zip"
        model.save(path)
        return path

    def close(self) -> None:
        """Close the envs and finish the W&B run."""
        for env in (self.env, self.eval_env):
            if env is not None:
                env.close()
        self.env = self.eval_env = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self._artifact_dir is not None:
            shutil.rmtree(self._artifact_dir, ignore_errors=True)
            self._artifact_dir = None

    def run(self) -> TrainResult:
        """Set up, train, save, evaluate; returns what the summary needs."""
        model = self.setup_experiment()
        try:
            callbacks = self.create_callbacks(model)
            seconds = self.learn(model, callbacks)
            model_path = self.save_trained_model(model)
            returns, lengths = self.final_evaluation(model)
            if self.wandb_run is not None:
                self.wandb_run.summary.update(
                    {
                        "final/eval_mean_return": float(np.mean(returns)),
                        "final/eval_std_return": float(np.std(returns)),
                        "final/steps_per_second": model.num_timesteps / seconds if seconds > 0 else 0.0,
                    }
                )
            assert self.run_dir is not None
            wandb_summary = wandb_config = None
            if self.wandb_run is not None:
                # Read before finish(): offline runs write no wandb-summary.json
                wandb_summary = dict(self.wandb_run.summary)
                wandb_config = dict(self.wandb_run.config)
            return TrainResult(
                run_dir=self.run_dir,
                model_path=model_path,
                exp_id=self.exp_id,
                num_timesteps=model.num_timesteps,
                train_seconds=seconds,
                eval_returns=returns,
                eval_lengths=lengths,
                last_allocation=[dict(r) for r in model.last_allocation],
                kl_budget=model.joint_kl_budget,
                wandb_summary=wandb_summary,
                wandb_config=wandb_config,
            )
        finally:
            self.close()


def _per_allocator(options: dict[str, Any]) -> bool:
    from sb3_hatrpo.allocators import ALLOCATORS

    return all(isinstance(k, str) and k.lower() in ALLOCATORS for k in options)


def _yaml_safe(value: Any) -> Any:
    """Plain YAML types only (classes by name, tuples as lists, paths as strings)."""
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, type):
        return value.__name__
    return repr(value)
