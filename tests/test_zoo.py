"""The zoo: config files and their parsing, train / enjoy / tune / plot end to end on tiny budgets, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch import nn, optim

from sb3_hatrpo.envs import DifferentialGame, list_envs
from sb3_hatrpo.zoo.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    EnvWrapperChain,
    get_hyperparams,
    load_config,
    load_yaml,
    parse_params,
    parse_value,
    prepare_hyperparams,
    resolve_activation,
    resolve_optimizer,
    select_allocator_kwargs,
)
from sb3_hatrpo.zoo.utils import env_folder_name, get_latest_run_id, new_run_folder

REPO = Path(__file__).resolve().parent.parent
# Every zoo run in these tests: tiny rollouts, one-layer nets, quiet.
TINY = ["-params", "n_steps:50", "policy_kwargs:dict(net_arch=[16])", "n_critic_updates:1", "batch_size:50"]
QUIET = ["--verbose", "0", "--no-progress"]


class NaNRewardGame(DifferentialGame):
    """The differential game whose reward turns NaN after 60 steps: training diverges."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def _team_reward(self, actions):  # type: ignore[no-untyped-def]
        self.calls += 1
        reward, joint = super()._team_reward(actions)
        return (float("nan") if self.calls > 60 else reward), joint


def identity_wrapper(env, tag="x"):  # type: ignore[no-untyped-def]
    """A ParallelEnv wrapper for the env_wrapper tests: marks the env and returns it."""
    env.wrapped_with = tag
    return env


def train(tmp_path: Path, *extra: str, env: str = "games:differential") -> object:
    from sb3_hatrpo.train import run as main

    return main(["--env", env, "-f", str(tmp_path / "logs"), "--seed", "3", *QUIET, *TINY, *extra])


def error_of(capsys: pytest.CaptureFixture[str], func, argv: list[str]) -> str:  # type: ignore[no-untyped-def]
    """Run a command that must fail; return its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        func(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------------- config file


def test_shipped_config_covers_every_env_and_is_valid() -> None:
    assert DEFAULT_CONFIG_PATH.is_file(), "the package must find zoo_configs/hatrpo.yml (symlink)"
    assert (
        DEFAULT_CONFIG_PATH.parent == (REPO / "sb3_hatrpo" / "zoo_configs").resolve()
        or (REPO / "sb3_hatrpo" / "zoo_configs").is_symlink()
    )
    config = load_config()
    assert "default" in config
    assert set(list_envs()) <= set(config), f"missing entries: {set(list_envs()) - set(config)}"
    for env_id in config:
        hyperparams, _ = get_hyperparams(env_id)
        for allocator in ("uniform", "kkt", "greedy"):
            prepared = prepare_hyperparams({**hyperparams, "allocator": allocator})
            assert prepared.n_timesteps and prepared.n_timesteps > 0
            assert "allocator_kwargs" not in prepared.model_kwargs or isinstance(
                prepared.model_kwargs["allocator_kwargs"], dict
            )


def test_mamujoco_entries_follow_harl() -> None:
    """HARL's tuned kl_threshold per scenario, and a comment naming the HARL file of each entry."""
    expected = {
        "mamujoco:HalfCheetah-2x3": 0.01,
        "mamujoco:Walker2d-2x3": 0.01,
        "mamujoco:Ant-4x2": 0.005,
        "mamujoco:Hopper-3x1": 0.001,
        "mamujoco:HalfCheetah-6x1": 0.005,
    }
    text = DEFAULT_CONFIG_PATH.read_text()
    for env_id, target_kl in expected.items():
        hyperparams, _ = get_hyperparams(env_id)
        assert hyperparams["target_kl"] == target_kl
        assert hyperparams["policy_kwargs"]["net_arch"] == [128, 128, 128]
        assert "env_kwargs" not in hyperparams  # gymnasium-robotics' default agent_obsk=1, as HARL's reference run
        assert hyperparams["normalize_observation"] is True
        block = text.split(f"\n{env_id}:\n", 1)[1].split("\n\n", 1)[0]
        assert "HARL" in block, f"{env_id}: say where the values come from"


def test_yaml_reads_scientific_floats_and_reports_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("a:\n  learning_rate: 1e-3\n  n_timesteps: 2E5\n")
    assert load_yaml(path)["a"] == {"learning_rate": 1e-3, "n_timesteps": 2e5}
    path.write_text("a:\n  n_steps: 1\n  gamma: 0.9\n  n_steps: 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: .*duplicate key 'n_steps' \(first on line 2\)"):
        load_yaml(path)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("default:\n  n_steps: 64\n  policy_kwargs: {net_arch: [16\n  gamma: 0.9\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}:")
    line = int(message.split(":")[1])
    assert line in (3, 4), message  # the unclosed bracket (PyYAML reports where it noticed)
    assert "malformed YAML" in message


def test_unknown_config_key_names_line_and_lists_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "typo.yml"
    path.write_text("default:\n  n_steps: 64\ngames:differential:\n  gamma: 0.9\n  n_stepz: 64\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"{path}:5:" in message and "'n_stepz'" in message and "'games:differential'" in message
    assert "n_steps" in message and "target_kl" in message and "allocator_kwargs" in message


def test_unknown_policy_kwargs_key(tmp_path: Path) -> None:
    path = tmp_path / "pk.yml"
    path.write_text("default:\n  policy_kwargs:\n    net_arch: [16]\n    activation: relu\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: unknown policy_kwargs key 'activation'.*activation_fn"):
        load_config(path)


def test_entry_over_default_and_missing_entry(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("default:\n  n_steps: 64\n  gamma: 0.9\ngames:climbing:\n  gamma: 0.5\n")
    hyperparams, source = get_hyperparams("games:climbing", path)
    assert hyperparams == {"n_steps": 64, "gamma": 0.5}
    assert "games:climbing" in source
    hyperparams, _ = get_hyperparams("games:penalty", path)
    assert hyperparams == {"n_steps": 64, "gamma": 0.9}
    path.write_text("games:climbing:\n  gamma: 0.5\n")
    with pytest.raises(
        ConfigError, match=r"no entry for 'games:penalty' and no 'default' entry; entries: games:climbing"
    ):
        get_hyperparams("games:penalty", path)
    with pytest.raises(ConfigError, match=r"-params: unknown key\(s\) \['n_stepz'\]; valid keys: .*n_steps"):
        get_hyperparams("games:climbing", path, {"n_stepz": 3})


# ----------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("n_steps:64", {"n_steps": 64}),
        ("gamma:0.99", {"gamma": 0.99}),
        ("learning_rate:1e-3", {"learning_rate": 1e-3}),
        ("learning_rate:lin_1e-3", {"learning_rate": "lin_1e-3"}),
        ("allocator:kkt", {"allocator": "kkt"}),
        ("normalize_value:False", {"normalize_value": False}),
        ("total_kl:None", {"total_kl": None}),
        ("policy_kwargs.log_std_init:-0.5", {"policy_kwargs": {"log_std_init": -0.5}}),
        (
            "policy_kwargs:dict(net_arch=dict(pi=[16], vf=[32]), activation_fn=nn.ReLU, ortho_init=False)",
            {"policy_kwargs": {"net_arch": {"pi": [16], "vf": [32]}, "activation_fn": "nn.ReLU", "ortho_init": False}},
        ),
        ("allocator_kwargs:{'min_kl_fraction': 0.25}", {"allocator_kwargs": {"min_kl_fraction": 0.25}}),
        ("env_kwargs:dict(n_agents=3, init_action=2.5)", {"env_kwargs": {"n_agents": 3, "init_action": 2.5}}),
    ],
)
def test_parse_params(item: str, expected: dict) -> None:
    assert parse_params([item]) == expected


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("n_steps", "expected key:value"),
        ("n_steps:", "-params n_steps: empty value"),
        ("n_steps:[64, 64", "-params n_steps: cannot parse '\\[64, 64'"),
        ("n_steps:6a4", "-params n_steps: cannot parse '6a4'"),
        ("gamma:1+1", "is not a literal"),
        ("policy_kwargs:dict(net_arch=[16], activation_fn=nn.Bogus)", "unknown name 'nn.Bogus'"),
        ("x:__import__('os').system('touch pwned')", "is not a literal"),
        ("x:open('f')", "is not a literal"),
    ],
)
def test_parse_params_rejects_what_does_not_parse(item: str, message: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        parse_params([item])
    assert not (tmp_path / "pwned").exists()


def test_policy_kwargs_names_resolve_without_eval() -> None:
    for name in ("relu", "ReLU", "nn.ReLU", "th.nn.ReLU", "torch.nn.ReLU"):
        assert resolve_activation(name) is nn.ReLU
    assert resolve_activation("leaky_relu") is nn.LeakyReLU
    assert resolve_activation("tanh") is nn.Tanh
    assert resolve_optimizer("th.optim.RMSprop") is optim.RMSprop
    with pytest.raises(ConfigError, match=r"Unknown activation 'swish'; valid: .*ReLU.*Tanh"):
        resolve_activation("swish")
    prepared = prepare_hyperparams(
        {"policy_kwargs": "dict(net_arch=[64, 64], activation_fn=nn.ReLU, optimizer_class=th.optim.SGD)"}
    )
    assert prepared.model_kwargs["policy_kwargs"] == {
        "net_arch": [64, 64],
        "activation_fn": nn.ReLU,
        "optimizer_class": optim.SGD,
    }
    assert parse_value("nn.Tanh") == "nn.Tanh"


def test_schedules_types_and_allocator_options() -> None:
    prepared = prepare_hyperparams({"learning_rate": "lin_1e-3", "n_timesteps": 1e4, "n_steps": 64.0})
    schedule = prepared.model_kwargs["learning_rate"]
    assert schedule(1.0) == pytest.approx(1e-3) and schedule(0.5) == pytest.approx(5e-4)
    assert prepared.n_timesteps == 10_000 and prepared.model_kwargs["n_steps"] == 64
    for bad, message in [
        ({"learning_rate": "cos_1e-3"}, "learning_rate: expected a number or a schedule"),
        ({"learning_rate": "lin_x"}, "cannot read the initial value"),
        ({"n_steps": "abc"}, "n_steps must be a number, got 'abc'"),
        ({"n_steps": 1.5}, "n_steps must be an integer"),
        ({"normalize_value": "yes"}, "normalize_value must be true or false"),
        ({"allocator": "fancy"}, "Unknown allocator 'fancy'; valid names: .*greedy.*kkt.*uniform"),
        ({"n_envs": 0}, "n_envs must be at least 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            prepare_hyperparams(bad)
    per_allocator = {"kkt": {"min_kl_fraction": 0.3}, "greedy": {"eps": 1e-6}}
    assert select_allocator_kwargs(per_allocator, "w") == {"min_kl_fraction": 0.3}
    assert select_allocator_kwargs(per_allocator, "hatrpo") == {}
    assert select_allocator_kwargs({"min_kl_fraction": 0.3}, "kkt") == {"min_kl_fraction": 0.3}


def test_env_wrapper_chain() -> None:
    chain = EnvWrapperChain(
        ["tests.test_zoo.identity_wrapper", {"tests.test_zoo:identity_wrapper": {"tag": "y"}}], allow_imports=["tests"]
    )
    env = chain(DifferentialGame())
    assert env.wrapped_with == "y"
    with pytest.raises(ConfigError, match=r"env_wrapper 'supersuit\.no_such_wrapper' cannot be imported"):
        EnvWrapperChain("supersuit.no_such_wrapper")


def test_folder_names_and_experiment_ids(tmp_path: Path) -> None:
    assert env_folder_name("mamujoco:HalfCheetah-2x3") == "mamujoco-HalfCheetah-2x3"
    assert env_folder_name("mpe:simple_spread_v3") == "mpe-simple_spread_v3"
    assert env_folder_name("my.pkg:make env/v1") == "my.pkg-make-env-v1"
    assert get_latest_run_id(tmp_path, "games-differential") == 0
    first, first_id = new_run_folder(tmp_path, "games-differential")
    (tmp_path / "games-differential_7").mkdir()
    (tmp_path / "games-differential_x").mkdir()
    second, second_id = new_run_folder(tmp_path, "games-differential")
    assert (first_id, second_id) == (1, 8) and first.name == "games-differential_1" and second.is_dir()


# ----------------------------------------------------------------------------------------------- train -> enjoy -> plot


def test_train_enjoy_plot_differential(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sb3_hatrpo.enjoy import run as enjoy
    from sb3_hatrpo.plot import run as plot

    result = train(
        tmp_path, "--allocator", "greedy", "-n", "200", "--eval-freq", "100", "--save-freq", "100",
        "--eval-episodes", "2",
    )  # fmt: skip
    out = capsys.readouterr().out
    run = tmp_path / "logs" / "hatrpo" / "games-differential_1"
    assert result.run_dir == run
    for name in ("games-differential.zip", "best_model.zip", "rl_model_100_steps.zip", "rl_model_200_steps.zip"):
        assert (run / name).is_file(), name
    for name in ("config.yml", "args.yml", "command.txt"):
        assert (run / "games-differential" / name).is_file(), name
    config = yaml.safe_load((run / "games-differential" / "config.yml").read_text())
    assert config["allocator"] == "greedy" and config["n_steps"] == 50 and config["n_timesteps"] == 200
    assert config["policy_kwargs"] == {"net_arch": [16], "activation_fn": "tanh"}  # -params merged into the entry
    args = yaml.safe_load((run / "games-differential" / "args.yml").read_text())
    assert args["seed"] == 3 and args["env"] == "games:differential" and args["exp_id"] == 1
    assert "--allocator greedy" in (run / "games-differential" / "command.txt").read_text()

    with np.load(run / "evaluations.npz") as data:
        assert data["results"].shape == (3, 2)  # at 100, 200 and the final model after its last update
        assert list(data["timesteps"]) == [100, 200, 200]
        assert data["ep_lengths"].shape == (3, 2)
    header = (run / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("train/agent_0/threshold", "train/agent_1/kl", "train/agent_0/improvement", "train/agent_0/position"):
        assert key in header
    assert "train/kl_budget" in header and "rollout/ep_rew_mean" in header and "eval/mean_reward" in header

    # the summary: mean +- std return, steps/s, every agent's KL figures of the last iteration
    assert "+/-" in out and "steps/s" in out
    assert len(result.last_allocation) == 2
    for record in result.last_allocation:
        assert record["agent"] in out
    assert result.eval_returns == list(np.load(run / "evaluations.npz")["results"][-1])

    episodes = enjoy(["--env", "games:differential", "-f", str(tmp_path / "logs"), "-n", "3", "--no-render"])
    assert len(episodes.returns) == 3 and episodes.lengths == [1, 1, 1]
    assert episodes.model_path == run / "games-differential.zip"
    best = enjoy(["--env", "games:differential", "-f", str(tmp_path / "logs"), "-n", "1", "--load-best"])
    assert best.model_path.name == "best_model.zip"
    checkpoint = enjoy(
        ["--env", "games:differential", "-f", str(tmp_path / "logs"), "-n", "1", "--load-checkpoint", "100"]
    )
    assert checkpoint.model_path.name == "rl_model_100_steps.zip"
    capsys.readouterr()

    # a second run gets id 2; --exp-id picks a run
    train(tmp_path, "--allocator", "kkt", "-n", "100", "--eval-episodes", "1")
    assert (tmp_path / "logs" / "hatrpo" / "games-differential_2" / "games-differential.zip").is_file()
    first = enjoy(["--env", "games:differential", "-f", str(tmp_path / "logs"), "--exp-id", "1", "-n", "1"])
    assert first.model_path.parent == run

    curves = plot(["curves", "--env", "games:differential", "-f", str(tmp_path / "logs")])
    assert curves.is_file() and curves.stat().st_size > 1000
    kl = plot(["kl", "--env", "games:differential", "-f", str(tmp_path / "logs"), "--exp-id", "1"])
    assert kl == run / "kl_allocation.png" and kl.is_file()


def test_train_and_enjoy_mpe_heterogeneous_agents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mpe2")
    from sb3_hatrpo.enjoy import run as enjoy

    result = train(
        tmp_path, "--allocator", "kkt", "-n", "100", "--n-envs", "2", "--eval-episodes", "1",
        env="mpe:simple_speaker_listener_v4",
    )  # fmt: skip
    assert {r["agent"] for r in result.last_allocation} == {"speaker_0", "listener_0"}
    assert result.eval_lengths == [25]
    run = tmp_path / "logs" / "hatrpo" / "mpe-simple_speaker_listener_v4_1"
    assert yaml.safe_load((run / "mpe-simple_speaker_listener_v4" / "config.yml").read_text())["n_envs"] == 2
    episodes = enjoy(
        ["--env", "mpe:simple_speaker_listener_v4", "-f", str(tmp_path / "logs"), "-n", "2", "--no-render"]
    )
    assert episodes.lengths == [25, 25] and all(np.isfinite(episodes.returns))
    # the same seed as the training's final evaluation (training seed + 10000) reproduces its return
    replay = enjoy(["--env", "mpe:simple_speaker_listener_v4", "-f", str(tmp_path / "logs"), "-n", "1",
                    "--no-render", "--seed", "10003"])  # fmt: skip
    assert replay.returns == pytest.approx(result.eval_returns)
    video = enjoy(["--env", "mpe:simple_speaker_listener_v4", "-f", str(tmp_path / "logs"), "-n", "1",
                   "--record-video", str(tmp_path / "v.gif")])  # fmt: skip
    assert video.video_path == tmp_path / "v.gif" and video.video_path.stat().st_size > 0


def test_train_module_command_with_progress_bar_and_env_wrapper(tmp_path: Path) -> None:
    """``python -m sb3_hatrpo.train`` (the progress bar is on by default), a config with an env_wrapper."""
    conf = tmp_path / "conf.yml"
    conf.write_text(
        "games:differential:\n"
        "  n_timesteps: 100\n"
        "  n_steps: 50\n"
        "  batch_size: 50\n"
        "  n_critic_updates: 1\n"
        "  policy_kwargs: 'dict(net_arch=[16], activation_fn=nn.ReLU)'\n"
        "  env_wrapper: supersuit.clip_actions_v0\n"
        "  allocator: kkt\n"
        "  allocator_kwargs: {min_kl_fraction: 0.2}\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "sb3_hatrpo.train", "--env", "games:differential", "-conf", str(conf),
         "-f", str(tmp_path / "logs"), "--seed", "0", "--eval-episodes", "1", "--verbose", "0"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "steps/s" in completed.stdout and "agent_1" in completed.stdout
    run = tmp_path / "logs" / "hatrpo" / "games-differential_1"
    config = yaml.safe_load((run / "games-differential" / "config.yml").read_text())
    assert config["env_wrapper"] == "supersuit.clip_actions_v0" and config["allocator_kwargs"] == {
        "min_kl_fraction": 0.2
    }


# ----------------------------------------------------------------------------------------------- bad input


def test_train_rejects_unknown_env_ids_without_leaving_folders(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sb3_hatrpo.train import run as main

    err = error_of(capsys, main, ["--env", "games:diferential", "-f", str(tmp_path), *QUIET])
    assert "unknown game 'diferential'" in err and "differential, climbing, penalty" in err
    err = error_of(capsys, main, ["--env", "nonsense", "-f", str(tmp_path), *QUIET])
    assert "unknown env id 'nonsense'" in err and "mamujoco:" in err and "games:differential" in err
    assert not (tmp_path / "hatrpo").exists() or not any((tmp_path / "hatrpo").iterdir())


def test_train_reports_config_and_params_errors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sb3_hatrpo.train import run as main

    base = ["--env", "games:differential", "-f", str(tmp_path), *QUIET]
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("games:differential:\n  n_steps: [64\n")
    err = error_of(capsys, main, [*base, "-conf", str(bad_yaml)])
    assert f"{bad_yaml}:" in err and "malformed YAML" in err
    typo = tmp_path / "typo.yml"
    typo.write_text("games:differential:\n  n_steps: 64\n  targt_kl: 0.1\n")
    err = error_of(capsys, main, [*base, "-conf", str(typo)])
    assert f"{typo}:3: unknown key 'targt_kl'" in err and "target_kl" in err
    err = error_of(capsys, main, [*base, "-params", "n_steps:[64"])
    assert "-params n_steps: cannot parse" in err
    err = error_of(capsys, main, [*base, "-params", "n_steps:abc"])
    assert "n_steps must be a number, got 'abc'" in err
    err = error_of(capsys, main, [*base, "--allocator", "fancy"])
    assert "Unknown allocator 'fancy'" in err
    err = error_of(capsys, main, [*base, "-conf", str(tmp_path / "missing.yml")])
    assert "missing.yml not found" in err


def test_enjoy_without_a_trained_model(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sb3_hatrpo.enjoy import run as main

    err = error_of(capsys, main, ["--env", "games:differential", "-f", str(tmp_path), "--no-render"])
    assert "No trained 'games:differential' runs" in err and "sb3_hatrpo.train" in err
    run = tmp_path / "hatrpo" / "games-differential_1"
    (run / "games-differential").mkdir(parents=True)
    err = error_of(capsys, main, ["--env", "games:differential", "-f", str(tmp_path), "--no-render"])
    assert "No trained model games-differential.zip" in err and "holds no model" in err
    err = error_of(capsys, main, ["--env", "games:differential", "-f", str(tmp_path), "--exp-id", "4"])
    assert "No run games-differential_4" in err and "[1]" in err


def test_enjoy_with_a_different_env_names_the_agents(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sb3_hatrpo.enjoy import main as enjoy_command
    from sb3_hatrpo.enjoy import run as main

    train(tmp_path, "-n", "50", "--eval-episodes", "1", "--env-kwargs", "n_agents:3")
    logs = str(tmp_path / "logs")
    # main() is the console script's target: it returns None (exit status 0), not a result object
    assert enjoy_command(["--env", "games:differential", "-f", logs, "-n", "1", "--no-render"]) is None
    assert "1 episodes: return" in capsys.readouterr().out
    # the run's --env-kwargs are in its config.yml: enjoy rebuilt the 3-agent game; 2 agents is a different env
    err = error_of(capsys, main, ["--env", "games:differential", "-f", logs, "--env-kwargs", "n_agents:2"])
    assert "missing from the env ['agent_2']" in err and "differ from the model's" in err


# ----------------------------------------------------------------------------------------------- tune


def test_tune_sqlite_two_trials_writes_a_usable_config(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import optuna

    from sb3_hatrpo.tune import run as main

    logs = tmp_path / "logs"
    result = main(
        ["--env", "games:differential", "-n", "100", "--n-trials", "2", "-f", str(logs), "--seed", "0",
         "--n-evaluations", "2", "--eval-episodes", "1", "--sampler", "random", "--pruner", "none", *TINY]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert result.trial_numbers == [0, 1]
    storage = f"sqlite:///{logs / 'hatrpo' / 'optuna.db'}"
    study = optuna.load_study(study_name="hatrpo_games-differential", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(len(t.intermediate_values) == 2 for t in study.trials)  # reported to the pruner
    assert "Best trial" in out and "games:differential:" in out
    assert result.yaml_path is not None and (result.report_dir / "trials.csv").is_file()
    assert (result.report_dir / "history.png").is_file()

    block = load_config(result.yaml_path)  # valid config syntax and keys
    entry = block["games:differential"]
    assert entry["n_steps"] == 50 and entry["allocator"] in ("uniform", "kkt", "greedy")
    assert entry["policy_kwargs"] == {"net_arch": [16], "activation_fn": "tanh"}
    # ... and ready to train with
    trained = train(tmp_path, "-conf", str(result.yaml_path), "-n", "50", "--eval-episodes", "1")
    assert trained.last_allocation


def test_tune_prunes_diverging_trials_and_goes_on(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sb3_hatrpo.tune import run as main

    result = main(
        ["--env", "tests.test_zoo:NaNRewardGame", "-n", "150", "--n-trials", "2", "-f", str(tmp_path),
         "--n-evaluations", "1", "--eval-episodes", "1", "--pruner", "none", *TINY]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert result.trial_numbers == [0, 1] and result.best_value is None
    assert out.count("pruned") >= 2 and "non-finite" in out.lower()
    assert "No completed trial yet" in out


def test_tune_unreachable_storage_is_one_clear_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sb3_hatrpo.tune import run as main

    err = error_of(
        capsys,
        main,
        ["--env", "games:differential", "-n", "50", "--n-trials", "1", "-f", str(tmp_path),
         "--storage", "postgresql://optuna:secret@127.0.0.1:9/optuna"],
    )  # fmt: skip
    assert err.count("\n") == 1, err
    assert "cannot reach the Optuna storage postgresql://optuna:***@127.0.0.1:9/optuna" in err
    assert "secret" not in err
    err = error_of(
        capsys, main, ["--env", "games:differential", "-n", "50", "-f", str(tmp_path), "--storage", "nosuchdb://x"]
    )
    assert "cannot open the Optuna storage nosuchdb://x" in err


# ----------------------------------------------------------------------------------------------- plots


def _fake_run(folder: Path, timesteps: list[int], returns: list[float]) -> Path:
    folder.mkdir(parents=True)
    results = np.array(returns, dtype=float)[:, None].repeat(2, axis=1)
    np.savez(
        folder / "evaluations.npz", timesteps=np.array(timesteps), results=results, ep_lengths=np.ones_like(results)
    )
    return folder


def test_learning_curves_mean_and_std_over_seeds(tmp_path: Path) -> None:
    from sb3_hatrpo.zoo.run_plots import learning_curves, load_evaluations, plot_learning_curves

    runs = [_fake_run(tmp_path / f"run{seed}", [100, 200, 300, 300], [1.0 + offset, 2.0 + offset, 3.0 + offset,
            4.0 + offset]) for seed, offset in enumerate([0.0, 2.0])]  # fmt: skip
    steps, values = load_evaluations(runs[0])
    assert list(steps) == [100, 200, 300] and list(values) == [1.0, 2.0, 4.0]  # the last evaluation at 300 wins
    (curve,) = learning_curves({"kkt": runs})
    assert list(curve.steps) == [100, 200, 300] and list(curve.mean) == [2.0, 3.0, 5.0]
    assert list(curve.std) == [1.0, 1.0, 1.0] and curve.label == "kkt (n=2)"
    output = plot_learning_curves({"kkt": runs, "greedy": runs[:1]}, tmp_path / "curves.png")
    assert output.is_file()
    with pytest.raises(FileNotFoundError, match=r"No evaluations\.npz"):
        load_evaluations(tmp_path)


def test_learning_curves_keep_runs_of_different_lengths_apart(tmp_path: Path) -> None:
    from sb3_hatrpo.zoo.run_plots import learning_curves, plot_learning_curves

    long_a = _fake_run(tmp_path / "a", [10_000, 20_000], [1.0, 3.0])
    long_b = _fake_run(tmp_path / "b", [10_000, 20_000], [2.0, 5.0])
    short = _fake_run(tmp_path / "c", [4_096], [0.5])  # shorter than --eval-freq: its final evaluation only
    curves = {c.label: c for c in learning_curves({"greedy": [long_a, short, long_b]})}
    assert set(curves) == {"greedy (n=2, 20,000 steps)", "greedy: c"}
    long, alone = curves["greedy (n=2, 20,000 steps)"], curves["greedy: c"]
    assert list(long.steps) == [10_000, 20_000] and list(long.mean) == [1.5, 4.0]  # no point at 12,048
    assert list(alone.steps) == [4_096] and list(alone.mean) == [0.5] and list(alone.std) == [0.0]
    assert plot_learning_curves({"greedy": [long_a, short, long_b]}, tmp_path / "c.png").is_file()


def test_plot_axes_have_no_offset_labels() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sb3_hatrpo.zoo.run_plots import readable_axes

    figure, axis = plt.subplots()
    axis.plot([0, 10_000, 20_000], [0.94950, 0.949505, 0.94951])
    readable_axes(axis)
    figure.canvas.draw()
    assert axis.yaxis.get_offset_text().get_text() == ""
    assert axis.xaxis.get_offset_text().get_text() == ""
    assert "20k" in [label.get_text() for label in axis.get_xticklabels()]
    plt.close(figure)
