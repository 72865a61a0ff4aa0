"""What a new user relies on in the first hour: thread count, the training budget, models that rebuild their env."""

from __future__ import annotations

import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_hatrpo import HATRPO, evaluate_policy, make_vec_env
from sb3_hatrpo.budget import DEFAULT_TOTAL_TIMESTEPS, check_total_timesteps, default_total_timesteps
from sb3_hatrpo.threads import torch_threads

TINY = dict(n_steps=32, batch_size=32, n_critic_updates=1, cg_max_steps=3, policy_kwargs=dict(net_arch=[8]))


class _RecordThreads(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def _on_step(self) -> bool:
        self.seen.add(th.get_num_threads())
        return True


# --- threads --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_threads", [1, 2, None])
def test_learn_runs_on_num_threads_and_restores_the_users_setting(num_threads):
    previous = th.get_num_threads()
    th.set_num_threads(3)  # the user's own choice: learn() must hand it back
    try:
        model = HATRPO("MlpPolicy", "games:differential", num_threads=num_threads, seed=0, **TINY)
        callback = _RecordThreads()
        model.learn(64, callback=callback)
        assert callback.seen == {3 if num_threads is None else num_threads}
        assert th.get_num_threads() == 3
        model.predict({agent: [0.0] for agent in model.agents})
        assert th.get_num_threads() == 3
    finally:
        th.set_num_threads(previous)


def test_default_is_one_thread_and_survives_save_load(tmp_path):
    model = HATRPO("MlpPolicy", "games:differential", seed=0, **TINY)
    assert model.num_threads == 1
    model.num_threads = 2
    model.save(tmp_path / "m.zip")
    assert HATRPO.load(tmp_path / "m.zip").num_threads == 2
    assert HATRPO.load(tmp_path / "m.zip", num_threads=None).num_threads is None


def test_torch_threads_restores_after_an_exception():
    previous = th.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(previous + 1):
        assert th.get_num_threads() == previous + 1
        raise RuntimeError
    assert th.get_num_threads() == previous


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_num_threads_fails_at_construction(bad):
    with pytest.raises(ValueError, match="num_threads"):
        HATRPO("MlpPolicy", "games:differential", num_threads=bad, **TINY)


# --- budget ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -5, 2.5, "100", True, float("nan")])
def test_learn_rejects_non_positive_and_non_integer_budgets(bad):
    model = HATRPO("MlpPolicy", "games:differential", **TINY)
    with pytest.raises(ValueError, match="total_timesteps must be a positive whole number"):
        model.learn(bad)
    assert model.num_timesteps == 0


def test_budget_accepts_whole_floats_and_numpy_integers():
    import numpy as np

    assert check_total_timesteps(1e6) == 1_000_000
    assert check_total_timesteps(np.int64(64)) == 64


def test_learn_without_a_budget_uses_the_zoo_config_for_a_known_id(monkeypatch):
    budget, source = default_total_timesteps("games:differential")
    assert budget == 20_000 and "hatrpo.yml" in source
    assert default_total_timesteps("mpe:simple_speaker_listener_v4")[0] == 10_000_000
    assert default_total_timesteps(None) == (DEFAULT_TOTAL_TIMESTEPS, "the default budget")
    assert default_total_timesteps("package.module:factory")[0] == DEFAULT_TOTAL_TIMESTEPS

    seen = {}

    def fake_learn(self, total_timesteps, **kwargs):
        seen["budget"] = total_timesteps
        return self

    monkeypatch.setattr("stable_baselines3.common.on_policy_algorithm.OnPolicyAlgorithm.learn", fake_learn)
    # the design card's literal usage; the budget is announced even with verbose=0
    with pytest.warns(UserWarning, match=r"trains 20,000 steps \(n_timesteps of 'games:differential'"):
        HATRPO("MlpPolicy", "games:differential", allocator="greedy", **TINY).learn()
    assert seen["budget"] == 20_000
    from sb3_hatrpo.envs import make_env

    with pytest.warns(UserWarning, match="trains 1,000,000 steps"):
        HATRPO("MlpPolicy", lambda: make_env("games:differential"), **TINY).learn()
    assert seen["budget"] == DEFAULT_TOTAL_TIMESTEPS


# --- the model remembers its env ------------------------------------------------------------------------------


def test_model_rebuilds_its_env_with_the_saved_env_kwargs(tmp_path):
    # agent_obsk=0 changes the observation shapes, as the zoo config does for MaMuJoCo
    env = make_vec_env("games:differential", n_envs=2, env_kwargs={"n_agents": 3})
    model = HATRPO("MlpPolicy", env, seed=0, **TINY)
    model.save(tmp_path / "m.zip")

    loaded = HATRPO.load(tmp_path / "m.zip", env="games:differential")  # saved env_kwargs applied
    assert loaded.agents == ["agent_0", "agent_1", "agent_2"]
    assert loaded.get_env().env_spec.env_kwargs == {"n_agents": 3}

    without_env = HATRPO.load(tmp_path / "m.zip")
    eval_env = without_env.make_env(seed=1)
    mean, _ = evaluate_policy(without_env, eval_env, n_eval_episodes=2)
    assert isinstance(mean, float)
    assert without_env.make_env(n_envs=2, init_action=3.0).num_envs == 2

    # an explicit override wins, and the mismatch error names the differing env_kwargs
    with pytest.raises(ValueError, match=r"env_kwargs differ: n_agents=3 \(model\) vs 2 \(env\)"):
        HATRPO.load(tmp_path / "m.zip", env="games:differential", env_kwargs={"n_agents": 2})


def test_mismatch_with_another_env_points_to_make_env(tmp_path):
    model = HATRPO("MlpPolicy", "games:differential", env_kwargs={"n_agents": 3}, **TINY)
    model.save(tmp_path / "m.zip")
    from sb3_hatrpo.envs import make_env

    with pytest.raises(
        ValueError, match=r"trained on 'games:differential' with env_kwargs \{'n_agents': 3\}.*make_env"
    ):
        HATRPO.load(tmp_path / "m.zip", env=lambda: make_env("games:differential"))


def test_model_saved_without_an_env_spec_points_to_the_runs_config(tmp_path):
    model = HATRPO("MlpPolicy", "games:differential", env_kwargs={"n_agents": 3}, **TINY)
    model.env_spec = None  # as a model saved before env specs were recorded
    run = tmp_path / "games-differential_1"
    (run / "games-differential").mkdir(parents=True)
    (run / "games-differential" / "config.yml").write_text("env_kwargs:\n  n_agents: 3\n")
    model.save(run / "games-differential.zip")
    with pytest.raises(ValueError, match=r"config\.yml: pass its env_kwargs"):
        HATRPO.load(run / "games-differential.zip", env="games:differential")
    with pytest.raises(ValueError, match="not made from an env id"):
        HATRPO.load(run / "games-differential.zip").make_env()


# --- command lines --------------------------------------------------------------------------------------------


def _train(tmp_path, *extra):
    from sb3_hatrpo.train import run

    return run(
        ["--env", "games:differential", "-f", str(tmp_path / "logs"), "--seed", "1", "--verbose", "0",
         "--no-progress", "-params", "n_steps:50", "batch_size:50", "n_critic_updates:1", *extra]
    )  # fmt: skip


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("budget", ["-5", "0", "2.5", "many"])
def test_cli_budget_must_be_a_positive_whole_number(command, budget, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"sb3_hatrpo.{command}")
    with pytest.raises(SystemExit) as exit_info:
        module.run(["--env", "games:differential", "-f", str(tmp_path / "logs"), "-n", budget])
    assert exit_info.value.code == 2
    assert "positive whole number" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("argv", "module_missing"),
    [
        (["train", "--env", "games:differential"], "tqdm"),  # the progress bar is on by default
        (["train", "--env", "games:differential", "--no-progress"], "yaml"),
        (["tune", "--env", "games:differential"], "optuna"),
        (["plot", "curves", "--env", "games:differential"], "matplotlib"),
        (["enjoy", "--env", "games:differential", "--record-video"], "imageio"),
    ],
)
def test_clis_name_the_extra_before_creating_anything(argv, module_missing, tmp_path, monkeypatch, capsys):
    import importlib
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "sb3_hatrpo.extras.importlib.util.find_spec",
        lambda name, *args: None if name == module_missing else real_find_spec(name, *args),
    )
    module = importlib.import_module(f"sb3_hatrpo.{argv[0]}")
    with pytest.raises(SystemExit) as exit_info:
        module.run([*argv[1:], "-f", str(tmp_path / "logs")])
    assert exit_info.value.code == 2
    assert 'pip install "sb3_hatrpo[zoo]"' in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()  # no empty run folder for enjoy to trip over later


@pytest.mark.parametrize("command", ["train", "enjoy", "tune"])
def test_help_states_each_default_once(command):
    import importlib
    import re

    text = importlib.import_module(f"sb3_hatrpo.{command}").make_parser().format_help()
    assert "(default: None)" not in text
    for option in " ".join(text.split()).split(" -"):  # one chunk per option
        assert len(re.findall(r"\(default|default:", option)) <= 1, option
    if command == "train":
        assert "run fastest on 1 (threads spin on a busy machine); 0: torch's default (default: 1)" in " ".join(
            text.split()
        )


def test_short_table_leaves_out_per_agent_figures():
    import io

    from sb3_hatrpo.zoo.console import ShortTableFormat

    out = io.StringIO()
    values = {"rollout/ep_rew_mean": 1.0, "train/agent_0/kl": 0.01, "train/total_kl": 0.02, "time/fps": 10}
    ShortTableFormat(out).write(values, {key: None for key in values})
    text = out.getvalue()
    assert "ep_rew_mean" in text and "total_kl" in text and "fps" in text
    assert "agent_0" not in text


def test_train_summary_prints_paths_on_one_line(tmp_path, capsys):
    result = _train(tmp_path, "-n", "50", "--verbose", "1")
    lines = capsys.readouterr().out.splitlines()
    assert f"model: {result.model_path}" in lines  # rich would wrap a long path when the output is piped


def test_enjoy_without_a_display_runs_without_rendering(tmp_path, monkeypatch, capsys):
    from sb3_hatrpo.enjoy import display_available, run

    _train(tmp_path, "-n", "100")
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not display_available()
    result = run(["--env", "games:differential", "-f", str(tmp_path / "logs"), "-n", "1"])
    assert len(result.returns) == 1
    assert "No display" in capsys.readouterr().err
    monkeypatch.setenv("DISPLAY", ":0")
    assert display_available()


def test_mp4_video_is_streamed_not_buffered(tmp_path):
    import tracemalloc

    import numpy as np

    from sb3_hatrpo.zoo.video import VideoWriter

    frame_bytes = 240 * 320 * 3
    writer = VideoWriter(tmp_path / "v.mp4", fps=30)
    tracemalloc.start()
    for i in range(150):
        writer.append(np.full((240, 320, 3), i, dtype=np.uint8))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    path = writer.close()
    assert path == tmp_path / "v.mp4" and path.stat().st_size > 0
    assert peak < 10 * frame_bytes  # a buffer of the frames would be 150 of them
    assert VideoWriter(tmp_path / "empty.mp4").close() is None


def test_video_falls_back_to_gif_without_ffmpeg(tmp_path, monkeypatch, capsys):
    import numpy as np

    from sb3_hatrpo.zoo import video

    monkeypatch.setattr(video, "has_ffmpeg", lambda: False)
    writer = video.VideoWriter(tmp_path / "v.mp4")
    for i in range(3):
        writer.append(np.full((16, 16, 3), 80 * i, dtype=np.uint8))
    assert writer.close() == tmp_path / "v.gif"
    assert 'pip install "sb3_hatrpo[zoo]"' in capsys.readouterr().err
    from PIL import Image

    with Image.open(tmp_path / "v.gif") as gif:
        assert gif.n_frames == 3


def test_model_from_make_train_reloads_by_env_id(tmp_path):
    # the zoo config's env_kwargs (here from --env-kwargs) are saved with the model
    result = _train(tmp_path, "-n", "50", "--env-kwargs", "n_agents:3")
    model = HATRPO.load(result.model_path, env="games:differential")
    assert model.agents == ["agent_0", "agent_1", "agent_2"]
    assert model.make_env().env_spec.env_kwargs["n_agents"] == 3


# --- quiet output ---------------------------------------------------------------------------------------------


def test_mamujoco_prints_neither_the_adroit_notice_nor_settotalmass():
    import subprocess
    import sys

    pytest.importorskip("gymnasium_robotics")
    code = "from sb3_hatrpo.envs import make_env; make_env('mamujoco:HalfCheetah-2x3').reset(seed=0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "Adroit" not in result.stderr + result.stdout
    assert "settotalmass" not in result.stderr + result.stdout


def test_only_the_targeted_messages_are_dropped(capsys):
    import sys

    from sb3_hatrpo.envs.quiet import mujoco_warning_filter, without_stderr_lines

    with without_stderr_lines("Adroit"):
        print("AdroitHand... reward functions were updated", file=sys.stderr)
        print("something else", file=sys.stderr)
    passed_on: list[str] = []
    handler = mujoco_warning_filter(("settotalmass",), passed_on.append)
    handler("compiler attribute 'settotalmass' is deprecated")
    handler("Nan, Inf or huge value in QACC")
    assert capsys.readouterr().err == "something else\n"
    assert passed_on == ["Nan, Inf or huge value in QACC"]
