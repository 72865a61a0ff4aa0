"""Hostile configs and command lines: configs are data (no import outside the allow-list, no alias bombs),
and every user error of train/enjoy/tune/plot is one line on stderr, exit 2, before any run folder exists."""

import sys
import time
from pathlib import Path

import pytest

from sb3_hatrpo.zoo.config import ConfigError, EnvWrapperChain, load_yaml, prepare_hyperparams

ENV = "games:differential"
QUIET = ["--verbose", "0", "--no-progress", "--eval-freq", "-1", "--eval-episodes", "1"]
TINY = ["-params", "n_steps:32", "policy_kwargs:dict(net_arch=[8])", "n_critic_updates:1", "batch_size:32"]

BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
games:differential:
  n_steps: 64
  env_kwargs: {x: *i}
"""


def one_line_error(capsys, command, argv) -> str:
    """Run a command that must fail as a user error: exit 2, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def no_run_folders(logs: Path) -> bool:
    return not (logs / "hatrpo").exists() or not [p for p in (logs / "hatrpo").iterdir() if p.is_dir()]


@pytest.fixture
def plant_module(tmp_path, monkeypatch):
    """A module of ours on sys.path whose import writes a marker file; its ``wrap`` is an identity wrapper."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_wrappers.py").write_text(
        f"open({str(marker)!r}, 'a').write('x')\n\ndef wrap(env):\n    return env\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "planted_wrappers", raising=False)
    return marker


# ------------------------------------------------------------------------------ configs are data
@pytest.mark.parametrize(
    "spec",
    [
        {"pydoc.pipepager": {"cmd": "touch {marker}"}},
        "os.system",
        "subprocess:run",
        "this.s",
        ["supersuit.clip_actions_v0", "builtins.exec"],
    ],
)
def test_env_wrapper_outside_the_allow_list_is_refused_before_import(spec, tmp_path):
    marker = tmp_path / "ran"
    if isinstance(spec, dict):
        spec = {key: {"cmd": value["cmd"].format(marker=marker)} for key, value in spec.items()}
    modules_before = set(sys.modules)
    with pytest.raises(ConfigError, match=r"env_wrapper '.*': configs may only name.*--allow-import"):
        prepare_hyperparams({"env_wrapper": spec})
    assert not marker.exists()
    assert "this" not in set(sys.modules) - modules_before  # its import-time code did not run


def test_a_callable_re_exported_by_an_allowed_module_is_refused():
    # sb3_hatrpo.zoo.config imports stable-baselines3's LinearSchedule: the path is allowed, its origin is not
    with pytest.raises(ConfigError, match=r"is defined as 'stable_baselines3\..*LinearSchedule'"):
        EnvWrapperChain("sb3_hatrpo.zoo.config.LinearSchedule")


def test_allow_imports_opts_in_and_only_then_imports(plant_module):
    with pytest.raises(ConfigError, match=r"--allow-import planted_wrappers"):
        EnvWrapperChain("planted_wrappers.wrap")
    assert not plant_module.exists()
    chain = EnvWrapperChain("planted_wrappers.wrap", allow_imports=["planted_wrappers"])
    assert chain("env") == "env" and plant_module.exists()


def test_wrong_wrapper_arguments_name_the_wrapper():
    chain = prepare_hyperparams({"env_wrapper": {"supersuit.clip_actions_v0": {"bogus": 1}}}).env_wrapper
    from sb3_hatrpo.envs import make_env

    with pytest.raises(ConfigError, match=r"env_wrapper 'supersuit.clip_actions_v0' with \{'bogus': 1\}"):
        chain(make_env(ENV))
    with pytest.raises(ConfigError, match=r"env_wrapper 'supersuit.clip_actions_v0': its arguments must be"):
        EnvWrapperChain({"supersuit.clip_actions_v0": [1, 2]})


def test_a_yaml_alias_bomb_is_refused_fast_and_named(tmp_path):
    bomb = tmp_path / "bomb.yml"
    bomb.write_text(BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"{bomb}: the YAML document expands to more than 100000 values"):
        load_yaml(bomb)
    assert time.perf_counter() - start < 2.0


def test_a_recursive_yaml_alias_is_refused(tmp_path):
    loop = tmp_path / "loop.yml"
    loop.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=rf"{loop}: a YAML alias refers to itself"):
        load_yaml(loop)


def test_ordinary_anchors_still_work(tmp_path):
    config = tmp_path / "ok.yml"
    config.write_text("base: &base {n_steps: 64}\ngames:differential: *base\n")
    assert load_yaml(config)["games:differential"] == {"n_steps": 64}


# --------------------------------------------------------------------------------- train: exit 2
@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--device", "bogus"], "--device: device must be .* got 'bogus'"),
        (["--env-kwargs", "foo:1"], r"does not take the keyword arguments \['foo'.*n_agents, init_action"),
        (["--log-interval", "0"], "--log-interval must be at least 1"),
        (["-params", "batch_size:0"], "batch_size must be an integer >= 1.*got 0"),
        (["-params", "gamma:1.5"], r"gamma must be a finite number in \[0, 1\].*got 1.5"),
        (["-params", "env_wrapper:pydoc.pipepager"], "env_wrapper 'pydoc.pipepager': configs may only name"),
        (["-params", "env_wrapper:supersuit.no_such_wrapper"], "env_wrapper 'supersuit.no_such_wrapper' cannot be"),
    ],
)
def test_train_user_errors_are_one_line_exit_2_and_leave_no_run_folder(extra, culprit, tmp_path, capsys):
    import re

    from sb3_hatrpo.train import run as main

    logs = tmp_path / "logs"
    err = one_line_error(capsys, main, ["--env", ENV, "-f", str(logs), "-n", "64", *QUIET, *extra])
    assert re.search(culprit, err), err
    assert no_run_folders(logs)


def test_train_with_a_log_folder_under_a_file_is_one_line(tmp_path, capsys):
    from sb3_hatrpo.train import run as main

    blocker = tmp_path / "file"
    blocker.write_text("")
    err = one_line_error(capsys, main, ["--env", ENV, "-f", str(blocker / "logs"), "-n", "64", *QUIET])
    assert f"-f/--log-folder {blocker / 'logs'}: {blocker} is a file" in err


def test_train_with_a_planted_conf_file_runs_nothing(tmp_path, capsys):
    from sb3_hatrpo.train import run as main

    marker = tmp_path / "pwned"
    conf = tmp_path / "evil.yml"
    conf.write_text(f'games:differential:\n  env_wrapper: {{"pydoc.pipepager": {{"cmd": "touch {marker}"}}}}\n')
    err = one_line_error(capsys, main, ["--env", ENV, "-f", str(tmp_path / "logs"), "-conf", str(conf), *QUIET])
    assert "pydoc.pipepager" in err and "--allow-import pydoc" in err
    assert not marker.exists()


def test_train_allow_import_flag_opts_in(plant_module, tmp_path, capsys):
    from sb3_hatrpo.train import run as main

    argv = ["--env", ENV, "-f", str(tmp_path / "logs"), "-n", "32", *QUIET, *TINY, "env_wrapper:planted_wrappers.wrap"]
    one_line_error(capsys, main, argv)
    assert not plant_module.exists()
    result = main([*argv, "--allow-import", "planted_wrappers"])
    assert plant_module.exists() and result.num_timesteps == 32


def test_verbose_2_shows_the_traceback_instead(tmp_path):
    from sb3_hatrpo.train import run as main

    with pytest.raises(ValueError, match="batch_size must be"):
        main(["--env", ENV, "-f", str(tmp_path), "-n", "64", *QUIET, "--verbose", "2", "-params", "batch_size:0"])


def test_train_with_a_yaml_bomb_conf_is_one_line(tmp_path, capsys):
    from sb3_hatrpo.train import run as main

    bomb = tmp_path / "bomb.yml"
    bomb.write_text(BOMB)
    err = one_line_error(capsys, main, ["--env", ENV, "-f", str(tmp_path / "logs"), "-conf", str(bomb), *QUIET])
    assert f"{bomb}: the YAML document expands" in err


# ------------------------------------------------------------------------------ enjoy, plot, tune
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from sb3_hatrpo.train import run as main

    logs = tmp_path_factory.mktemp("trained") / "logs"
    main(["--env", ENV, "-f", str(logs), "-n", "32", "--seed", "1", *QUIET, *TINY])
    return logs


def test_enjoy_refuses_a_planted_saved_config(trained_run, tmp_path, capsys):
    import shutil

    from sb3_hatrpo.enjoy import run as main

    logs = tmp_path / "logs"
    shutil.copytree(trained_run, logs)
    config = next(logs.glob("hatrpo/*/*/config.yml"))
    marker = tmp_path / "pwned"
    config.write_text(config.read_text() + f'env_wrapper: {{"pydoc.pipepager": {{"cmd": "touch {marker}"}}}}\n')
    err = one_line_error(capsys, main, ["--env", ENV, "-f", str(logs), "--no-render", "-n", "1"])
    assert "pydoc.pipepager" in err and not marker.exists()


def test_enjoy_bad_device_and_corrupted_model_are_one_line(trained_run, tmp_path, capsys):
    import shutil

    from sb3_hatrpo.enjoy import run as main

    logs = tmp_path / "logs"
    shutil.copytree(trained_run, logs)
    argv = ["--env", ENV, "-f", str(logs), "--no-render", "-n", "1"]
    assert "got 'bogus'" in one_line_error(capsys, main, [*argv, "--device", "bogus"])
    model = next(logs.glob("hatrpo/*/games-differential.zip"))
    model.write_bytes(model.read_bytes()[:300])
    assert str(model) in one_line_error(capsys, main, argv)


def test_plot_with_a_bomb_in_args_yml_is_one_line(trained_run, tmp_path, capsys):
    import shutil

    from sb3_hatrpo.plot import run as main

    logs = tmp_path / "logs"
    shutil.copytree(trained_run, logs)
    args = next(logs.glob("hatrpo/*/*/args.yml"))
    args.write_text(BOMB)
    err = one_line_error(capsys, main, ["curves", "--env", ENV, "-f", str(logs)])
    assert f"{args}: the YAML document expands" in err


def test_tune_storage_that_is_not_a_database_and_the_study_resumes(tmp_path, capsys):
    """A failed tune invocation loses nothing: the study in the database resumes where it was."""
    import optuna

    from sb3_hatrpo.tune import run as main

    db = tmp_path / "study.db"
    argv = ["--env", "games:climbing", "-n", "32", "--n-trials", "1", "-f", str(tmp_path), "--seed", "0",
            "--n-evaluations", "1", "--eval-episodes", "1", "--sampler", "random", "--pruner", "none",
            "--no-optim-plots", "--verbose", "0", "--study-name", "s", *TINY]  # fmt: skip
    main([*argv, "--storage", f"sqlite:///{db}"])
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("these are my notes, not a database\n" * 100)
    err = one_line_error(capsys, main, [*argv, "--storage", f"sqlite:///{not_a_db}"])
    assert "cannot open the Optuna storage" in err and "not a database" in err
    err = one_line_error(capsys, main, [*argv, "--storage", f"sqlite:///{db}", "-params", "gamma:2"])
    assert "gamma" in err
    main([*argv, "--storage", f"sqlite:///{db}"])
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert [t.number for t in study.trials] == [0, 1]
    assert not_a_db.read_text().startswith("these are my notes")
