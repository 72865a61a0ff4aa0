"""Callbacks: the W&B bridge (offline, keys checked in process), the multi-agent EvalCallback, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wandb
from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback
from stable_baselines3.common.logger import configure

from sb3_hatrpo import HATRPO
from sb3_hatrpo.callbacks import MultiAgentEvalCallback, WandbCallback, WandbOutputFormat, package_versions

TINY = dict(n_steps=50, batch_size=50, n_critic_updates=1, policy_kwargs=dict(net_arch=[16]), seed=0)


def tiny_model(tmp_path: Path, env: str = "games:differential", **kwargs: Any) -> HATRPO:
    model = HATRPO("MlpPolicy", env, **{**TINY, **kwargs})
    model.set_logger(configure(str(tmp_path), ["csv"]))
    return model


class FakeRun:
    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(data)


def test_output_format_sends_numbers_with_the_timestep() -> None:
    run = FakeRun()
    writer = WandbOutputFormat(run)
    writer.write(
        {"train/a": 1.5, "train/n": np.int64(3), "train/ok": True, "train/name": "x", "tb_only": 2.0},
        {"tb_only": ("wandb", "tensorboard"), "train/a": None},  # type: ignore[dict-item]
        step=96,
    )
    assert run.logged == [{"train/a": 1.5, "train/n": 3, "train/ok": 1.0, "global_step": 96}]
    writer.write({"train/name": "x"}, {}, step=97)
    assert len(run.logged) == 1  # nothing numeric: nothing logged


def test_wandb_offline_logs_logger_allocation_config_and_artifacts(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run = wandb.init(project="sb3-hatrpo-tests", mode="offline", dir=str(tmp_path))
    artifacts: list[Any] = []
    log_artifact = run.log_artifact

    def spy(artifact: Any, aliases: list[str] | None = None, **kwargs: Any) -> Any:
        artifacts.append((artifact, aliases))
        return log_artifact(artifact, aliases=aliases, **kwargs)

    monkeypatch.setattr(run, "log_artifact", spy)
    try:
        model = tiny_model(tmp_path, allocator="kkt", allocator_kwargs={"min_kl_fraction": 0.3})
        callback = WandbCallback(
            model_save_path=str(tmp_path / "models"), model_save_freq=100, config={"env_id": "games:differential"}
        )
        model.learn(200, callback=callback)

        summary = dict(run.summary)
        for key in (
            "rollout/ep_rew_mean",  # SB3 logger records, through the bridge
            "train/agent_0/std",
            "train/value_loss",
            "allocation/agent_0/threshold",  # the allocation of every iteration
            "allocation/agent_1/kl",
            "allocation/agent_0/improvement",
            "allocation/agent_1/position",
            "allocation/agent_0/accepted",
            "allocation/total_kl",
            "allocation/kl_budget",
            "global_step",
        ):
            assert key in summary, f"{key} not logged; logged: {sorted(summary)}"
        # each figure once: the logger's copies of the allocation figures are not sent
        for key in ("train/agent_0/threshold", "train/agent_1/kl", "train/kl_budget", "train/total_kl"):
            assert key not in summary, key
        assert summary["global_step"] == model.num_timesteps == 200
        assert summary["allocation/kl_budget"] == pytest.approx(0.02)
        last = {r["agent"]: r for r in model.last_allocation}
        assert summary["allocation/agent_1/threshold"] == pytest.approx(last["agent_1"]["threshold"])
        assert any(key.startswith("allocation/threshold_chart") for key in summary), sorted(summary)
        assert any(key.startswith("allocation/table") for key in summary)

        # every iteration, including the last (trained after SB3's last logger dump)
        iterations = sorted({row["iteration"] for row in callback.allocation_history})
        assert iterations == [1, 2, 3, 4] == list(range(1, model._n_updates + 1))

        config = dict(run.config)
        assert config["allocator"] == "kkt"
        assert config["allocator_kwargs"]["min_kl_fraction"] == 0.3
        assert config["target_kl"] == 0.01 and config["n_steps"] == 50 and config["agents"] == ["agent_0", "agent_1"]
        assert config["env_id"] == "games:differential"
        assert config["versions"]["sb3_hatrpo"] == package_versions()["sb3_hatrpo"]
        assert {"torch", "stable_baselines3", "python"} <= set(config["versions"])

        # checkpoints at 100 and 200 steps (= the end), as model artifacts
        models = [(a, aliases) for a, aliases in artifacts if a.type == "model"]
        assert [aliases for _, aliases in models] == [["latest", "step-100"], ["latest", "step-200"]]
        assert models[0][0].metadata["timesteps"] == 100
        assert (tmp_path / "models" / "model.zip").is_file()
        HATRPO.load(tmp_path / "models" / "model.zip")
        # the bridge leaves the logger when training ends
        assert not any(isinstance(f, WandbOutputFormat) for f in model.logger.output_formats)
    finally:
        run.finish()


def test_wandb_disabled_mode_is_silent(tmp_path: Path) -> None:
    run = wandb.init(project="sb3-hatrpo-tests", mode="disabled")
    try:
        model = tiny_model(tmp_path)
        model.learn(100, callback=WandbCallback(model_save_path=str(tmp_path / "m")))
        assert (tmp_path / "m" / "model.zip").is_file()
    finally:
        run.finish()


def test_wandb_callback_needs_a_run() -> None:
    wandb.finish()
    with pytest.raises(wandb.Error, match=r"wandb\.init"):
        WandbCallback()


def test_eval_callback_writes_evaluations_and_best_model(tmp_path: Path) -> None:
    model = tiny_model(tmp_path, allocator="greedy")
    callback = MultiAgentEvalCallback(
        "games:differential", n_eval_episodes=3, eval_freq=50, log_path=tmp_path, best_model_save_path=tmp_path,
        verbose=0,
    )  # fmt: skip
    checkpoints = CheckpointCallback(save_freq=100, save_path=str(tmp_path / "ckpt"), name_prefix="rl_model")
    model.learn(150, callback=CallbackList([callback, checkpoints]))
    with np.load(tmp_path / "evaluations.npz") as data:
        assert list(data["timesteps"]) == [50, 100, 150]
        assert data["results"].shape == (3, 3) and data["ep_lengths"].shape == (3, 3)
        assert np.all(data["ep_lengths"] == 1)
        # deterministic: one-step game, constant observation -> the same return in every episode
        assert np.allclose(data["results"], data["results"][:, :1])
    assert (tmp_path / "best_model.zip").is_file()
    assert callback.best_mean_reward == pytest.approx(np.max(np.load(tmp_path / "evaluations.npz")["results"]))
    assert (tmp_path / "ckpt" / "rl_model_100_steps.zip").is_file()
    progress = (tmp_path / "progress.csv").read_text().splitlines()[0]
    assert "eval/mean_reward" in progress and "eval/mean_ep_length" in progress


def test_eval_callback_on_a_different_env_names_the_agent(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    callback = MultiAgentEvalCallback("games:climbing", n_eval_episodes=1, eval_freq=50, verbose=0)
    with pytest.raises(ValueError, match="Agent 'agent_0': the env's action space Discrete"):
        model.learn(50, callback=callback)


def test_train_command_tracks_to_wandb_offline(tmp_path: Path) -> None:
    from sb3_hatrpo.train import run as main

    result = main(
        ["--env", "games:climbing", "--allocator", "greedy", "-n", "100", "-f", str(tmp_path), "--seed", "1",
         "--track", "--wandb-mode", "offline", "--eval-freq", "50", "--eval-episodes", "1", "--save-freq", "50",
         "--verbose", "0", "--no-progress", "-params", "n_steps:50", "batch_size:50", "n_critic_updates:1"]
    )  # fmt: skip
    summary, config = result.wandb_summary, result.wandb_config
    assert summary is not None and config is not None
    for key in ("eval/mean_reward", "train/value_loss", "allocation/agent_1/kl", "final/eval_mean_return"):
        assert key in summary, f"{key} not logged; logged: {sorted(summary)}"
    assert "train/agent_0/threshold" not in summary  # logged once, as allocation/agent_0/threshold
    # the W&B run lives in the run folder, and no second copy of the model is left there
    assert list((result.run_dir / "wandb").glob("offline-run-*"))
    assert not (result.run_dir / "artifacts").exists()
    assert summary["final/eval_mean_return"] == pytest.approx(np.mean(result.eval_returns))
    assert config["env_id"] == "games:climbing" and config["allocator"] == "greedy"
    assert config["hyperparams"]["n_steps"] == 50 and config["exp_id"] == 1
    assert wandb.run is None  # finished
