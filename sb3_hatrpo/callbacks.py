"""Callbacks: Weights & Biases logging and deterministic multi-agent evaluation.

* :class:`WandbCallback` builds on ``wandb.integration.sb3.WandbCallback`` (whose own version logs
  scalars only through TensorBoard sync): it adds :class:`WandbOutputFormat` to the model's SB3
  logger, so every record (``rollout/``, ``train/<agent>/threshold``, ``eval/`` ...) reaches
  ``wandb.log`` with the timestep; logs every iteration's per-agent KL allocation as scalars and,
  at the end, as charts and a table; records the run config (hyperparameters, allocator, env,
  package versions); and uploads model checkpoints as artifacts.
* :class:`MultiAgentEvalCallback` is SB3's ``EvalCallback`` for multi-agent envs: deterministic
  evaluation on a separate env, ``best_model.zip`` and ``evaluations.npz``.
"""

from __future__ import annotations

import os
import platform
import re
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, EventCallback
from stable_baselines3.common.logger import KVWriter

from sb3_hatrpo.evaluation import evaluate_policy
from sb3_hatrpo.vec_env import MultiAgentVecEnv

__all__ = ["MultiAgentEvalCallback", "WandbCallback", "WandbOutputFormat", "package_versions"]

# Fields of HATRPO.last_allocation logged per agent (the rest are the agent and the accepted flag).
ALLOCATION_FIELDS = (
    "threshold",
    "kl",
    "improvement",
    "predicted_improvement",
    "position",
    "potential",
    "step_fraction",
)
# The logger's records of the same figures (HATRPO.train): the bridge leaves them to the allocation/ keys, which
# carry every iteration at its own timestep (SB3 dumps the logger before train(), so it misses the last one)
_ALLOCATION_RECORD = re.compile(r"^train/(kl_budget|total_kl|[^/]+/(" + "|".join(ALLOCATION_FIELDS) + r"|accepted))$")


def is_allocation_record(key: str) -> bool:
    """Whether a logger key is a figure :class:`WandbCallback` logs under ``allocation/`` (so not twice).

    :param key: An SB3 logger key.
    """
    return _ALLOCATION_RECORD.match(key) is not None


_VERSIONED_PACKAGES = (
    "sb3_hatrpo",
    "stable_baselines3",
    "sb3_contrib",
    "torch",
    "numpy",
    "gymnasium",
    "pettingzoo",
    "wandb",
    "optuna",
    "gymnasium_robotics",
    "mujoco",
    "mpe2",
)


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run depends on (those installed)."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
    return versions


# ---------------------------------------------------------------------------------------------------------------
# W&B
# ---------------------------------------------------------------------------------------------------------------


class WandbOutputFormat(KVWriter):
    """An SB3 logger output that sends every dump to ``run.log``, with ``global_step`` = the timestep.

    Numbers only (strings, videos and figures of other formats are skipped); keys excluded for
    ``"wandb"`` are left out, as SB3's formats do for their names, and so are the keys ``skip`` returns True for.

    :param run: the W&B run (``wandb.init(...)``)
    :param skip: keys logged by other means (``WandbCallback`` logs the allocation under ``allocation/``)
    """

    def __init__(self, run: Any, skip: Callable[[str], bool] | None = None) -> None:
        self.run = run
        self.skip = skip

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        data: dict[str, float] = {}
        for key, value in key_values.items():
            excluded = key_excluded.get(key)
            if (excluded is not None and "wandb" in excluded) or (self.skip is not None and self.skip(key)):
                continue
            if isinstance(value, bool | np.bool_):
                data[key] = float(value)
            elif isinstance(value, int | float | np.integer | np.floating):
                data[key] = float(value) if isinstance(value, float | np.floating) else int(value)
            elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
                data[key] = value.item()
        if data:
            self.run.log({**data, "global_step": int(step)})

    def close(self) -> None:
        """Nothing to close: the run belongs to whoever called ``wandb.init``."""


def _import_wandb_callback() -> type[BaseCallback]:
    try:
        from wandb.integration.sb3 import WandbCallback as _WandbCallback
    except ImportError as error:  # pragma: no cover - wandb is a dependency
        raise ImportError(f"WandbCallback needs wandb: pip install wandb ({error})") from error
    return _WandbCallback


class WandbCallback(_import_wandb_callback()):  # type: ignore[misc]
    """W&B logging for HATRPO: logger bridge, per-agent KL allocation, run config, checkpoints as artifacts.

    Call ``wandb.init(...)`` first (any mode: ``"online"``, ``"offline"``, ``"disabled"``).

    :param verbose: 0 silent, 2 prints each saved checkpoint
    :param model_save_path: folder for the checkpoint uploaded as an artifact (None: no checkpoints)
    :param model_save_freq: save and upload every this many callback calls (0: only at the end)
    :param gradient_save_freq: ``wandb.watch`` the networks every this many steps (0: off)
    :param log: what ``wandb.watch`` logs: ``"gradients"``, ``"parameters"``, ``"all"`` or None
    :param config: extra entries for the run config (env id, zoo settings ...)
    :param chart_freq: also log the allocation charts every this many iterations (0: only at the end)
    :param bridge_logger: add :class:`WandbOutputFormat` to the model's logger
    """

    def __init__(
        self,
        verbose: int = 0,
        model_save_path: str | None = None,
        model_save_freq: int = 0,
        gradient_save_freq: int = 0,
        log: str | None = None,
        config: dict[str, Any] | None = None,
        chart_freq: int = 0,
        bridge_logger: bool = True,
    ) -> None:
        super().__init__(
            verbose=verbose,
            model_save_path=model_save_path,
            model_save_freq=model_save_freq,
            gradient_save_freq=gradient_save_freq,
            log=log,
        )
        import wandb

        # wandb.run is set: the parent's __init__ raised otherwise
        self.run: Any = wandb.run
        self.extra_config = dict(config or {})
        self.chart_freq = chart_freq
        self.bridge_logger = bridge_logger
        self.allocation_history: list[dict[str, Any]] = []
        self._logged_updates = 0
        self._output_format: WandbOutputFormat | None = None
        self._last_saved_step = -1

    # -- set-up
    def _init_callback(self) -> None:
        # Not the parent's: it stringifies every attribute of the model (buffers, envs, observations)
        # into the config. run_config() records the hyperparameters instead.
        if self.gradient_save_freq > 0:
            import wandb

            wandb.watch(self.model.policy, log_freq=self.gradient_save_freq, log=self.log)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        self.run.config.update(self.run_config(), allow_val_change=True)
        if self.bridge_logger and not any(isinstance(f, WandbOutputFormat) for f in self.logger.output_formats):
            self._output_format = WandbOutputFormat(self.run, skip=is_allocation_record)
            self.logger.output_formats.append(self._output_format)
        self._logged_updates = int(getattr(self.model, "_n_updates", 0))

    def run_config(self) -> dict[str, Any]:
        """Hyperparameters, allocator and its options, agents, extra config and package versions."""
        model = self.model
        allocator = getattr(model, "allocator", None)
        config: dict[str, Any] = {"algo": type(model).__name__}
        for name in (
            "n_steps",
            "batch_size",
            "gamma",
            "gae_lambda",
            "cg_max_steps",
            "cg_damping",
            "fisher_product",
            "line_search_shrinking_factor",
            "line_search_max_iter",
            "n_critic_updates",
            "normalize_advantage",
            "normalize_value",
            "target_kl",
            "total_kl",
            "n_envs",
            "seed",
        ):
            if hasattr(model, name):
                config[name] = getattr(model, name)
        learning_rate = getattr(model, "learning_rate", None)
        config["learning_rate"] = learning_rate if isinstance(learning_rate, int | float) else repr(learning_rate)
        if allocator is not None:
            config["allocator"] = getattr(allocator, "name", type(allocator).__name__)
            config["allocator_kwargs"] = allocator.get_config() if hasattr(allocator, "get_config") else {}
        if hasattr(model, "joint_kl_budget"):
            config["kl_budget"] = model.joint_kl_budget
        if hasattr(model, "agents"):
            config["agents"] = list(model.agents)
            config["n_agents"] = len(model.agents)
        policy_kwargs = getattr(model, "policy_kwargs", None)
        if policy_kwargs:
            config["policy_kwargs"] = {
                key: (value.__name__ if isinstance(value, type) else value) for key, value in policy_kwargs.items()
            }
        config.update(self.extra_config)
        config["versions"] = package_versions()
        return config

    # -- allocation
    def _log_allocation(self) -> None:
        """Log the allocation of every iteration trained since the last call (HATRPO.train sets it)."""
        n_updates = int(getattr(self.model, "_n_updates", 0))
        allocation = getattr(self.model, "last_allocation", None)
        if n_updates <= self._logged_updates or not allocation:
            return
        self._logged_updates = n_updates
        step = int(self.model.num_timesteps)
        data: dict[str, Any] = {"global_step": step, "allocation/iteration": n_updates}
        for record in allocation:
            agent = record["agent"]
            for key in ALLOCATION_FIELDS:
                if key in record:
                    data[f"allocation/{agent}/{key}"] = float(record[key])
            data[f"allocation/{agent}/accepted"] = float(bool(record.get("accepted", False)))
            self.allocation_history.append({"iteration": n_updates, "timesteps": step, **record})
        data["allocation/total_kl"] = float(sum(float(r.get("kl", 0.0)) for r in allocation))
        if hasattr(self.model, "joint_kl_budget"):
            data["allocation/kl_budget"] = float(self.model.joint_kl_budget)
        self.run.log(data)
        if self.chart_freq > 0 and n_updates % self.chart_freq == 0:
            self.log_allocation_charts()

    def log_allocation_charts(self) -> None:
        """Line charts of each agent's threshold and realised KL over training, and the allocation table."""
        import wandb

        if not self.allocation_history:
            return
        columns = ["iteration", "timesteps", "agent", "position", "threshold", "kl", "improvement"]
        columns += ["predicted_improvement", "potential", "step_fraction", "accepted"]
        table = wandb.Table(
            columns=list[Any](columns), data=[[row.get(c) for c in columns] for row in self.allocation_history]
        )
        agents = list(dict.fromkeys(row["agent"] for row in self.allocation_history))
        charts: dict[str, Any] = {"allocation/table": table}
        for key, title in (("threshold", "KL threshold per agent"), ("kl", "Realised KL per agent")):
            xs, ys = [], []
            for agent in agents:
                rows = [row for row in self.allocation_history if row["agent"] == agent]
                xs.append([row["timesteps"] for row in rows])
                ys.append([float(row[key]) for row in rows])
            charts[f"allocation/{key}_chart"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=agents, title=title, xname="timesteps"
            )
        self.run.log({**charts, "global_step": int(self.model.num_timesteps)})

    def _on_rollout_start(self) -> None:
        # HATRPO.train() ran just before this rollout (SB3 dumps the logger before train()).
        self._log_allocation()

    def _on_training_end(self) -> None:
        self._log_allocation()
        self.log_allocation_charts()
        super()._on_training_end()  # saves and uploads the final model
        if self._output_format is not None and self._output_format in self.logger.output_formats:
            # The run may end before the logger: stop sending to it.
            self.logger.output_formats.remove(self._output_format)
            self._output_format = None

    # -- checkpoints
    def save_model(self) -> None:
        """Save the model and log it as a ``model`` artifact (aliases ``latest`` and ``step-<timesteps>``)."""
        import wandb

        step = int(self.model.num_timesteps)
        if step == self._last_saved_step:
            return  # the training end right after a periodic checkpoint
        self._last_saved_step = step
        self.model.save(self.path)
        artifact = wandb.Artifact(
            name=f"model-{self.run.id}",
            type="model",
            metadata={"timesteps": step, "algo": type(self.model).__name__},
        )
        artifact.add_file(self.path, name="model.zip")
        self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
        if self.verbose > 1:
            print(f"Saved and logged a model artifact at {step} timesteps ({self.path})")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


class MultiAgentEvalCallback(EventCallback):
    """Evaluate the joint policy every ``eval_freq`` calls on a separate env, as SB3's ``EvalCallback``.

    Writes ``evaluations.npz`` (``timesteps``, ``results``, ``ep_lengths``) to ``log_path`` and
    ``best_model.zip`` to ``best_model_save_path``; records ``eval/mean_reward``, ``eval/std_reward``
    and ``eval/mean_ep_length``.

    :param eval_env: a :class:`~sb3_hatrpo.MultiAgentVecEnv` or anything ``HATRPO`` accepts (vectorised here)
    :param callback_on_new_best: called when the mean return beats the best so far
    :param callback_after_eval: called after every evaluation
    :param n_eval_episodes: episodes per evaluation
    :param eval_freq: evaluate every this many callback calls (one call per vectorised step, so
        ``eval_freq * n_envs`` timesteps); <= 0 disables
    :param log_path: folder of ``evaluations.npz`` (None: not written)
    :param best_model_save_path: folder of ``best_model.zip`` (None: not saved)
    :param deterministic: evaluate the mode of each agent's distribution
    :param render: render the eval env
    :param verbose: 1 prints each evaluation
    :param warn: warn if the eval env is the training env
    """

    def __init__(
        self,
        eval_env: Any,
        callback_on_new_best: BaseCallback | None = None,
        callback_after_eval: BaseCallback | None = None,
        n_eval_episodes: int = 5,
        eval_freq: int = 10000,
        log_path: str | Path | None = None,
        best_model_save_path: str | Path | None = None,
        deterministic: bool = True,
        render: bool = False,
        verbose: int = 1,
        warn: bool = True,
    ) -> None:
        super().__init__(callback_after_eval, verbose=verbose)
        self.callback_on_new_best = callback_on_new_best
        if self.callback_on_new_best is not None:
            self.callback_on_new_best.parent = self
        self.eval_env: MultiAgentVecEnv = eval_env if isinstance(eval_env, MultiAgentVecEnv) else _vectorise(eval_env)
        self.n_eval_episodes = n_eval_episodes
        self.eval_freq = eval_freq
        self.best_mean_reward = -np.inf
        self.last_mean_reward = -np.inf
        self.deterministic = deterministic
        self.render = render
        self.warn = warn
        self.best_model_save_path = Path(best_model_save_path) if best_model_save_path is not None else None
        self.log_path = Path(log_path) / "evaluations.npz" if log_path is not None else None
        self.evaluations_results: list[list[float]] = []
        self.evaluations_timesteps: list[int] = []
        self.evaluations_length: list[list[int]] = []
        # Policy updates done when each evaluation ran: an evaluation during the last rollout sees the
        # model before its final update, at the same timestep count.
        self.evaluations_n_updates: list[int] = []

    def _init_callback(self) -> None:
        if self.warn and self.eval_env is self.training_env:
            warnings.warn(
                "The evaluation env is the training env: evaluations reset it mid-rollout. Pass a separate env.",
                stacklevel=2,
            )
        if self.best_model_save_path is not None:
            self.best_model_save_path.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.callback_on_new_best is not None:
            self.callback_on_new_best.init_callback(self.model)

    def _on_step(self) -> bool:
        if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
            return self.evaluate()
        return True

    def evaluate(self) -> bool:
        """Run one evaluation now; returns False if a child callback asks training to stop."""
        returns, lengths = evaluate_policy(
            self.model,
            self.eval_env,
            n_eval_episodes=self.n_eval_episodes,
            deterministic=self.deterministic,
            render=self.render,
            return_episode_rewards=True,
        )
        assert isinstance(returns, list) and isinstance(lengths, list)
        self.evaluations_timesteps.append(self.num_timesteps)
        self.evaluations_n_updates.append(int(getattr(self.model, "_n_updates", 0)))
        self.evaluations_results.append(returns)
        self.evaluations_length.append(lengths)
        if self.log_path is not None:
            np.savez(
                self.log_path,
                timesteps=np.asarray(self.evaluations_timesteps),
                results=np.asarray(self.evaluations_results),
                ep_lengths=np.asarray(self.evaluations_length),
            )
        mean_reward, std_reward = float(np.mean(returns)), float(np.std(returns))
        mean_length = float(np.mean(lengths))
        self.last_mean_reward = mean_reward
        if self.verbose >= 1:
            print(
                f"Eval num_timesteps={self.num_timesteps}, episode_reward={mean_reward:.2f} +/- {std_reward:.2f}, "
                f"episode_length={mean_length:.2f} +/- {np.std(lengths):.2f}"
            )
        self.logger.record("eval/mean_reward", mean_reward)
        self.logger.record("eval/std_reward", std_reward)
        self.logger.record("eval/mean_ep_length", mean_length)
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(self.num_timesteps)

        continue_training = True
        if mean_reward > self.best_mean_reward:
            if self.verbose >= 1:
                print("New best mean reward!")
            if self.best_model_save_path is not None:
                self.model.save(os.fspath(self.best_model_save_path / "best_model"))
            self.best_mean_reward = mean_reward
            if self.callback_on_new_best is not None:
                continue_training = self.callback_on_new_best.on_step()
        if self.callback is not None:
            continue_training = continue_training and self._on_event()
        return continue_training

    def update_child_locals(self, locals_: dict[str, Any]) -> None:
        if self.callback:
            self.callback.update_locals(locals_)


def _vectorise(env: Any) -> MultiAgentVecEnv:
    from sb3_hatrpo.vec_env import make_vec_env

    return make_vec_env(env, n_envs=1)
