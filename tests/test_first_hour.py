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


def test_learn_without_a_budget_uses_the_zoo_config_for_a_known_id(monkeypatch, capsys):
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
    # the design card's literal usage
    HATRPO("MlpPolicy", "games:differential", allocator="greedy", verbose=1, **TINY).learn()
    assert seen["budget"] == 20_000
    assert "20,000" in capsys.readouterr().out
    from sb3_hatrpo.envs import make_env

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
