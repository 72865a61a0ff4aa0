"""Bad inputs a hostile or careless user gives the algorithm and its files: each is rejected with the
error type and a message naming the culprit (argument, agent, allocator, file), and nothing is lost."""

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from sb3_hatrpo import HATRPO
from sb3_hatrpo.allocators import BaseAllocator
from sb3_hatrpo.stall import NoUpdateWarning
from sb3_hatrpo.trust_region import AllocatorContractError

TINY = dict(n_steps=32, batch_size=32, n_critic_updates=1, cg_max_steps=3, policy_kwargs=dict(net_arch=[8]))
ENV = "games:climbing"


# --------------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize(
    ("argument", "value", "valid"),
    [
        ("batch_size", 0, ">= 1"),
        ("batch_size", 2.5, "integer"),
        ("n_steps", -4, ">= 1"),
        ("cg_damping", -0.1, ">= 0"),
        ("cg_max_steps", 0, ">= 1"),
        ("fisher_product", "fast", "one of 'analytic', 'double_backward'"),
        ("gamma", 1.5, "[0, 1]"),
        ("gae_lambda", -1, "[0, 1]"),
        ("line_search_shrinking_factor", 2, "(0, 1)"),
        ("line_search_shrinking_factor", 0.0, "(0, 1)"),
        ("line_search_max_iter", 0, ">= 1"),
        ("n_critic_updates", -1, ">= 1"),
        ("target_kl", True, "finite number"),
        ("target_kl", float("nan"), "finite number"),
        ("total_kl", 1e-300, ">= 1e-10"),
        ("learning_rate", 0.0, "> 0"),
        ("learning_rate", "fast", "finite number"),
        ("normalize_advantage", "yes", "True or False"),
        ("stats_window_size", 0, ">= 1"),
        ("seed", -3, "[0, "),
        ("n_envs", 0, ">= 1"),
    ],
)
def test_every_numeric_argument_is_checked_at_construction(argument, value, valid):
    with pytest.raises(ValueError) as error:
        HATRPO("MlpPolicy", ENV, **{**TINY, argument: value})
    message = str(error.value)
    assert f"{argument} must be" in message and valid in message and repr(value) in message


def test_a_bogus_device_is_named():
    with pytest.raises(ValueError, match=r"device must be .* got 'bogus'"):
        HATRPO("MlpPolicy", ENV, device="bogus", **TINY)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        (dict(total_timesteps="100"), "total_timesteps must be a positive whole number.*got '100'"),
        (dict(total_timesteps=0), "total_timesteps must be a positive whole number.*got 0"),
        (
            dict(total_timesteps=64, log_interval=0),
            r"HATRPO\.learn: log_interval must be an integer >= 1 or None.*got 0",
        ),
        (dict(total_timesteps=64, progress_bar="no"), r"HATRPO\.learn: progress_bar must be True or False"),
    ],
)
def test_learn_arguments_are_checked(kwargs, culprit):
    model = HATRPO("MlpPolicy", ENV, **TINY)
    with pytest.raises(ValueError, match=culprit):
        model.learn(**kwargs)
    assert model.num_timesteps == 0


# ---------------------------------------------------------------------------- allocator contract
class _FixedThresholds(BaseAllocator):
    """Asks for one fixed threshold for every agent, whatever the budget."""

    def __init__(self, threshold):
        self.threshold = threshold

    def update_agents(self, planner, rng):
        return [planner.step(planner.direction(agent), self.threshold) for agent in planner.agents]


@pytest.mark.parametrize(
    ("threshold", "problem"),
    [(float("nan"), "not a finite number"), (-0.01, "is negative"), (67.0, "exceeds what is left")],
)
def test_the_planner_enforces_the_allocator_contract(threshold, problem):
    model = HATRPO("MlpPolicy", ENV, allocator=_FixedThresholds(threshold), total_kl=0.02, **TINY)
    with pytest.raises(AllocatorContractError, match=rf"Allocator _FixedThresholds .*agent '.*'.*{problem}"):
        model.learn(32)


def test_thresholds_within_the_budget_pass_and_the_spent_kl_stays_within_it():
    model = HATRPO("MlpPolicy", ENV, allocator=_FixedThresholds(0.01), total_kl=0.02, seed=0, **TINY)
    model.learn(64)
    assert sum(record["kl"] for record in model.last_allocation) <= 0.02


# ------------------------------------------------------------------------------- no accepted step
class _NeverMoves(BaseAllocator):
    def update_agents(self, planner, rng):
        return [planner.step(planner.direction(agent), 0.0) for agent in planner.agents]


def test_warns_once_when_no_step_is_accepted_for_ten_iterations():
    model = HATRPO("MlpPolicy", ENV, allocator=_NeverMoves(), **TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(32 * 9)
        assert not [w for w in caught if issubclass(w.category, NoUpdateWarning)]
        model.learn(32 * 6, reset_num_timesteps=False)
    stalls = [w for w in caught if issubclass(w.category, NoUpdateWarning)]
    assert len(stalls) == 1
    assert "last 10 iterations" in str(stalls[0].message) and "line_search_max_iter" in str(stalls[0].message)


# ------------------------------------------------------------------------------------- predict
def test_predict_names_the_agent_with_a_nan_observation():
    model = HATRPO("MlpPolicy", ENV, **TINY)
    agents = model.agents
    obs = {agent: np.zeros(model.observation_space[agent].shape, np.float32) for agent in agents}
    obs[agents[1]] = obs[agents[1]] + np.nan
    with pytest.raises(ValueError, match=rf"agent '{agents[1]}' is not finite"):
        model.predict(obs)


# ------------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "good.zip"
    HATRPO("MlpPolicy", ENV, seed=0, **TINY).save(path)
    return path


def _rewrite(source: Path, target: Path, replace: dict) -> Path:
    """Copy a model zip with some entries replaced (bytes) or removed (None)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            if name in replace:
                if replace[name] is not None:
                    new.writestr(name, replace[name])
            else:
                new.writestr(name, old.read(name))
    return target


def _corrupt(kind: str, good: Path, target: Path) -> Path:
    raw = good.read_bytes()
    if kind == "cut_half":
        target.write_bytes(raw[: len(raw) // 2])
    elif kind == "cut_still_a_zip":  # cut where zipfile still finds a directory (of a .pth zip inside)
        for percent in range(20, 99):
            target.write_bytes(raw[: len(raw) * percent // 100])
            if zipfile.is_zipfile(target):
                break
        assert zipfile.is_zipfile(target)
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "text":
        target.write_text("not a model\n")
    elif kind == "broken_json":
        _rewrite(good, target, {"data": b'{"policy_class": '})
    elif kind.startswith("garbage_pth"):
        # random bytes reach different corners of torch's unpickler; several fixed seeds cover more than one
        seed = int(kind.rsplit("_", 1)[1]) if kind[-1].isdigit() else 0
        _rewrite(good, target, {"policy.pth": np.random.default_rng(seed).bytes(300)})
    elif kind == "no_policy":
        _rewrite(good, target, {"policy.pth": None})
    elif kind == "no_data":
        _rewrite(good, target, {"data": None})
    elif kind == "foreign":
        _rewrite(good, target, {"data": b'{"gamma": 0.99}'})
    elif kind == "wrong_params":
        import torch

        _rewrite(good, target, {"policy.pth": _torch_bytes(torch, {"w": torch.zeros(2)})})
    return target


def _torch_bytes(torch, obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("cut_half", "is truncated|not a zip file"),
        ("cut_still_a_zip", "is truncated: the file ends before the zip directory"),
        ("empty", "not a zip file"),
        ("text", "not a zip file"),
        ("broken_json", "'data' entry is not valid JSON"),
        *[(f"garbage_pth_{seed}", "truncated or corrupted") for seed in range(12)],
        ("no_policy", "policy.pth is missing"),
        ("no_data", "no 'data' entry"),
        ("foreign", "does not hold a HATRPO model"),
        ("wrong_params", "parameters do not fit"),
    ],
)
def test_every_broken_model_file_is_one_clear_error_naming_it(kind, says, saved_model, tmp_path):
    bad = _corrupt(kind, saved_model, tmp_path / f"{kind}.zip")
    with pytest.raises(ValueError, match=says) as error:
        HATRPO.load(bad)
    assert str(bad) in str(error.value)


def test_load_runs_a_planted_payload_once_not_twice(saved_model, tmp_path):
    """Loading runs pickles (documented); it reads the file once, so a payload runs once."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"echo x >> {marker}",))

    with zipfile.ZipFile(saved_model) as archive:
        data = json.loads(archive.read("data"))
    data["planted"] = {":type:": "x", ":serialized:": base64.b64encode(cloudpickle.dumps(Payload())).decode()}
    planted = _rewrite(saved_model, tmp_path / "planted.zip", {"data": json.dumps(data).encode()})
    HATRPO.load(planted)
    assert marker.read_text().count("x") == 1


def test_a_killed_save_leaves_an_orphan_the_next_save_removes_and_the_old_model_still_loads(saved_model, tmp_path):
    target = tmp_path / "model.zip"
    target.write_bytes(saved_model.read_bytes())
    script = textwrap.dedent(
        f"""
        import os, signal
        from sb3_hatrpo import HATRPO
        from stable_baselines3.common.base_class import BaseAlgorithm
        def die(self, path, *args, **kwargs):
            open(path, "wb").write(b"half a model")
            os.kill(os.getpid(), signal.SIGKILL)
        BaseAlgorithm.save = die
        HATRPO("MlpPolicy", "{ENV}", n_steps=32).save({str(target)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    orphans = list(tmp_path.glob(".model.zip.*.tmp.zip"))
    assert len(orphans) == 1
    HATRPO.load(target)  # the old model is intact
    HATRPO("MlpPolicy", ENV, **TINY).save(tmp_path / "other.zip")
    assert not orphans[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip", "other.zip"]


def test_a_save_in_progress_elsewhere_is_not_removed(tmp_path):
    """Another process's temporary file (its lock held) survives a save to the same folder."""
    busy = tmp_path / ".model.zip.abc.tmp.zip"
    busy.write_bytes(b"being written")
    script = (
        f"import fcntl, time; f = open({str(busy)!r}); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        HATRPO("MlpPolicy", ENV, **TINY).save(tmp_path / "model.zip")
        assert busy.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_save_that_fails_keeps_the_old_model_and_leaves_no_temporary_file(saved_model, tmp_path, monkeypatch):
    from stable_baselines3.common.base_class import BaseAlgorithm

    target = tmp_path / "model.zip"
    target.write_bytes(saved_model.read_bytes())

    def disk_full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BaseAlgorithm, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        HATRPO("MlpPolicy", ENV, **TINY).save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["model.zip"]
    HATRPO.load(target)
