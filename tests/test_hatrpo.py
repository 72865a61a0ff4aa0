"""HATRPO end to end: real benchmarks, learning, save/load, seeds, callbacks and bad input."""

import functools
import zipfile

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from pettingzoo import ParallelEnv
from stable_baselines3.common.callbacks import CheckpointCallback

from sb3_hatrpo import HATRPO, make_vec_env
from sb3_hatrpo.envs import make_env

TINY = dict(n_steps=64, batch_size=32, n_critic_updates=2, cg_max_steps=5, policy_kwargs=dict(net_arch=[16]))


class LeavingEnv(ParallelEnv):
    """Two agents; ``leaver`` leaves after 3 steps, ``stayer`` plays 8. Reward: -|action - 0.5| of the stayer."""

    metadata = {"name": "leaving_v0", "render_modes": []}

    def __init__(self) -> None:
        self.possible_agents = ["stayer", "leaver"]
        self.agents: list[str] = []
        self.t = 0

    @functools.cache  # noqa: B019 - PettingZoo's own examples cache spaces this way
    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (2,), np.float32)

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Box(-1.0, 1.0, (1,), np.float32) if agent == "stayer" else spaces.Discrete(2)

    def _obs(self) -> dict[str, np.ndarray]:
        return {a: np.array([self.t / 8, 1.0], np.float32) for a in self.agents}

    def reset(self, seed=None, options=None):
        self.agents = list(self.possible_agents)
        self.t = 0
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        reward = -abs(float(actions["stayer"][0]) - 0.5)
        rewards = {a: reward for a in self.agents}
        terminations = {a: a == "leaver" and self.t >= 3 for a in self.agents}
        truncations = {a: self.t >= 8 for a in self.agents}
        infos = {a: {} for a in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return self._obs(), rewards, terminations, truncations, infos


def all_params(model: HATRPO) -> th.Tensor:
    return th.cat([p.detach().flatten() for p in model.policy.parameters()])


def mean_team_reward(model: HATRPO, env_id: str, n: int = 200, **env_kwargs) -> float:
    vec = make_vec_env(env_id, n_envs=n, seed=123, env_kwargs=env_kwargs)
    obs = vec.reset()
    actions, _ = model.predict(obs, deterministic=False)
    _, rewards, _, _ = vec.step(actions)
    vec.close()
    return float(rewards.mean())


# ------------------------------------------------------------ benchmarks
def test_learns_on_mamujoco_halfcheetah_with_subprocess_envs():
    model = HATRPO("MlpPolicy", "mamujoco:HalfCheetah-2x3", n_envs=2, vec_env_cls="subproc", seed=0, **TINY)
    model.learn(256)
    assert model.num_timesteps == 256
    assert [r["agent"] for r in sorted(model.last_allocation, key=lambda r: r["agent"])] == ["agent_0", "agent_1"]
    for record in model.last_allocation:
        assert set(record) >= {
            "agent",
            "position",
            "threshold",
            "kl",
            "improvement",
            "predicted_improvement",
            "accepted",
        }
    model.env.close()


def test_learns_on_heterogeneous_discrete_mpe_speaker_listener():
    model = HATRPO("MlpPolicy", "mpe:simple_speaker_listener_v4", seed=0, **TINY)
    assert model.action_space["speaker_0"] == spaces.Discrete(3)
    assert model.action_space["listener_0"] == spaces.Discrete(5)
    model.learn(192)
    assert len(model.last_allocation) == 2
    actions, _ = model.predict({"listener_0": np.zeros(11, np.float32)}, deterministic=True)
    assert list(actions) == ["listener_0"] and model.action_space["listener_0"].contains(actions["listener_0"])


@pytest.mark.parametrize("allocator", ["uniform", "kkt", "greedy"])
def test_return_clearly_improves_on_the_penalty_game(allocator):
    # Random joint actions score (2*(-100) + 2*10 + 2) / 9 = -19.8 on average; the optima score 10 and the
    # risk-free equilibrium (1, 1) scores 2: independent learners typically settle there.
    model = HATRPO("MlpPolicy", "games:penalty", allocator=allocator, seed=1, **{**TINY, "n_steps": 128})
    before = mean_team_reward(model, "games:penalty")
    model.learn(128 * 25)
    after = mean_team_reward(model, "games:penalty")
    assert before < -10
    assert after >= 1.9, f"{allocator}: mean reward {before:.1f} -> {after:.1f}"


def test_return_improves_on_the_differential_game():
    model = HATRPO("MlpPolicy", "games:differential", allocator="greedy", seed=0, **{**TINY, "n_steps": 128})
    before = mean_team_reward(model, "games:differential")
    model.learn(128 * 20)
    after = mean_team_reward(model, "games:differential")
    # the policy starts at the offset 1.5 with std 1 and climbs the local peak (R = 0.95)
    assert after > before + 0.2, f"{before:.3f} -> {after:.3f}"


def test_an_agent_leaving_mid_episode():
    model = HATRPO("MlpPolicy", LeavingEnv, n_envs=2, seed=0, **TINY)
    model.learn(128)
    alive = model.rollout_buffer.alive
    assert alive[..., 0].all() and not alive[..., 1].all() and alive[..., 1].any()
    # The leaver's padding rows (after it left) must not count: garbage actions there change nothing.
    data = model.rollout_buffer.get()
    dead = data.alive["leaver"] == 0
    garbage = {**data.actions, "leaver": th.where(dead, 1 - data.actions["leaver"], data.actions["leaver"])}
    directions = []
    for actions in (data.actions, garbage):
        planner = model.make_planner(type(data)(**{**data.__dict__, "actions": actions}))
        directions.append(planner.direction("leaver"))
    assert th.allclose(directions[0].gradient, directions[1].gradient)
    assert directions[0].potential == pytest.approx(directions[1].potential)
    for record in model.last_allocation:
        assert not record["accepted"] or record["kl"] <= record["threshold"]
    actions, _ = model.predict({"stayer": np.zeros(2, np.float32)})
    assert list(actions) == ["stayer"]


@pytest.mark.parametrize(
    "options",
    [
        dict(value_loss="huber", huber_delta=1.0),
        dict(clip_range_vf=0.2, max_grad_norm=0.5),
        dict(bootstrap_truncation=False, line_search_accept_ratio=0.5),
        dict(policy_kwargs=dict(net_arch=[16], std_parametrization="sigmoid", log_std_init=-1.2)),
    ],
    ids=["huber", "clipped-critic", "harl-truncation-and-accept-ratio", "sigmoid-std"],
)
def test_harl_options_train_and_survive_save_load(tmp_path, options):
    model = HATRPO("MlpPolicy", "games:differential", seed=0, **{**TINY, **options})
    model.learn(128)
    model.save(tmp_path / "m")
    loaded = HATRPO.load(tmp_path / "m")
    for key, value in options.items():
        if key != "policy_kwargs":
            assert getattr(loaded, key) == value
    assert loaded.policy.std_parametrization == model.policy.std_parametrization
    obs = {"agent_0": np.ones(1, np.float32), "agent_1": np.ones(1, np.float32)}
    expected, _ = model.predict(obs, deterministic=True)
    actual, _ = loaded.predict(obs, deterministic=True)
    for agent in obs:
        np.testing.assert_array_equal(actual[agent], expected[agent])


def test_clipped_critic_moves_its_predictions_less_per_update():
    """One rollout, the same critic, a huge learning rate: clipping bounds how far predictions move."""
    moved = {}
    for clip in (None, 0.05):
        model = HATRPO("MlpPolicy", "games:differential", seed=0, **{**TINY, "learning_rate": 0.05}, clip_range_vf=clip)
        states = th.randn(64, model.state_space.shape[0])
        returns = 50 * th.randn(64)
        before = model.policy.predict_values(states).detach()
        model.value_normalizer = None  # raw targets, far from the predictions
        model._train_critic(states, returns)
        moved[clip] = float((model.policy.predict_values(states).detach() - before).abs().mean())
    assert moved[0.05] < 0.5 * moved[None]


# ------------------------------------------------------------- predict
def test_predict_single_and_batched_inside_the_action_spaces():
    model = HATRPO("MlpPolicy", "games:differential", seed=0, **TINY)
    single, state = model.predict({"agent_0": np.ones(1, np.float32), "agent_1": np.ones(1, np.float32)})
    assert state is None and single["agent_0"].shape == (1,)
    batched, _ = model.predict({"agent_0": np.ones((5, 1), np.float32)}, deterministic=True)
    assert batched["agent_0"].shape == (5, 1)
    assert model.action_space["agent_0"].contains(single["agent_0"])
    np.testing.assert_allclose(batched["agent_0"], np.repeat(batched["agent_0"][:1], 5, axis=0), atol=1e-6)


def test_predict_rejects_unknown_agents_and_wrong_shapes():
    model = HATRPO("MlpPolicy", "games:differential", seed=0, **TINY)
    with pytest.raises(ValueError, match=r"unknown agent.*'agent_9'.*agent_0"):
        model.predict({"agent_9": np.ones(1)})
    with pytest.raises(ValueError, match=r"agent 'agent_0' has shape \(3,\); expected \(1,\)"):
        model.predict({"agent_0": np.ones(3)})
    with pytest.raises(TypeError, match="dict"):
        model.predict(np.ones(1))


# ----------------------------------------------------------- save / load
@pytest.mark.parametrize("allocator", ["uniform", "kkt", "greedy"])
def test_save_load_gives_identical_actions_and_training_continues(tmp_path, allocator):
    kwargs = {"min_kl_fraction": 0.25, "pass_unused_budget": True} if allocator == "kkt" else None
    model = HATRPO(
        "MlpPolicy",
        "games:differential",
        allocator=allocator,
        allocator_kwargs=kwargs,
        seed=0,
        total_kl=0.05,
        krylov_rtol=0.02,
        **TINY,
    )
    model.learn(128)
    model.save(tmp_path / "model")
    assert (tmp_path / "model.zip").is_file()
    assert not list(tmp_path.glob("*.tmp*")), "the temporary file of the atomic save was left behind"
    loaded = HATRPO.load(tmp_path / "model", env="games:differential")
    obs = {"agent_0": np.ones((4, 1), np.float32), "agent_1": np.ones((4, 1), np.float32)}
    expected, _ = model.predict(obs, deterministic=True)
    actual, _ = loaded.predict(obs, deterministic=True)
    for agent in expected:
        np.testing.assert_array_equal(expected[agent], actual[agent])
    assert type(loaded.allocator) is type(model.allocator)
    assert loaded.allocator.get_config() == model.allocator.get_config()
    assert loaded.total_kl == 0.05 and loaded.joint_kl_budget == 0.05
    assert loaded.krylov_rtol == 0.02
    assert loaded.value_normalizer is not None
    assert loaded.value_normalizer.count == model.value_normalizer.count
    for a, b in zip(
        loaded.policy.optimizer.state_dict()["state"].values(), model.policy.optimizer.state_dict()["state"].values()
    ):
        assert th.equal(a["exp_avg"], b["exp_avg"])
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 256
    # without an env: prediction only
    HATRPO.load(tmp_path / "model.zip").predict(obs)


def test_load_checks_every_agents_spaces(tmp_path):
    model = HATRPO("MlpPolicy", "games:differential", seed=0, **TINY)
    model.save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match=r"Agent 'agent_0': the env's action space .* differs"):
        HATRPO.load(tmp_path / "model.zip", env=lambda: make_env("games:differential", init_action=3.0))
    with pytest.raises(ValueError, match=r"Agent 'agent_0': the env's action space Discrete\(3\) differs"):
        HATRPO.load(tmp_path / "model.zip", env="games:climbing")
    with pytest.raises(ValueError, match=r"unknown to the model \['agent_2'\]"):
        HATRPO.load(tmp_path / "model.zip", env=lambda: make_env("games:differential", n_agents=3))


def test_load_rejects_missing_and_corrupted_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No saved HATRPO model"):
        HATRPO.load(tmp_path / "nothing")
    (tmp_path / "text.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="not a zip file"):
        HATRPO.load(tmp_path / "text.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(ValueError, match="HATRPO model"):
        HATRPO.load(tmp_path / "other.zip")


# ---------------------------------------------------------------- seeds
@pytest.mark.parametrize("allocator", ["uniform", "greedy"])
def test_same_seed_gives_bit_identical_parameters(allocator):
    def run(seed: int) -> th.Tensor:
        model = HATRPO("MlpPolicy", "mamujoco:HalfCheetah-2x3", allocator=allocator, n_envs=2, seed=seed, **TINY)
        model.learn(256)
        return all_params(model)

    first, second, other = run(3), run(3), run(4)
    assert th.equal(first, second)
    assert not th.equal(first, other)


# ------------------------------------------------------------- callbacks
def test_checkpoint_callback_and_progress_bar(tmp_path):
    model = HATRPO("MlpPolicy", "games:climbing", seed=0, **TINY)
    checkpoint = CheckpointCallback(save_freq=64, save_path=str(tmp_path), name_prefix="hatrpo")
    model.learn(192, callback=checkpoint, progress_bar=True)
    saved = sorted(p.name for p in tmp_path.glob("hatrpo_*_steps.zip"))
    assert saved == ["hatrpo_128_steps.zip", "hatrpo_192_steps.zip", "hatrpo_64_steps.zip"]
    HATRPO.load(tmp_path / "hatrpo_128_steps.zip", env="games:climbing")


# ------------------------------------------------------------- bad input
def test_bad_hyperparameters_fail_before_any_work():
    with pytest.raises(ValueError, match=r"target_kl must be a finite number >= 1e-10.*got 0\.0"):
        HATRPO("MlpPolicy", "games:climbing", target_kl=0.0)
    with pytest.raises(ValueError, match=r"total_kl must be .* or None.*got -1\.0"):
        HATRPO("MlpPolicy", "games:climbing", total_kl=-1.0)
    with pytest.raises(ValueError, match=r"n_steps \* n_envs = 1 \* 1 < 2"):
        HATRPO("MlpPolicy", "games:climbing", n_steps=1)
    with pytest.raises(ValueError, match=r"Unknown allocator 'ppo'\. Valid names"):
        HATRPO("MlpPolicy", "games:climbing", allocator="ppo")
    with pytest.raises(ValueError, match="Unknown policy"):
        HATRPO("CnnPolicy", "games:climbing")
    with pytest.raises(ValueError, match=r"krylov_rtol must be a finite number >= 0 or None.*got -0\.1"):
        HATRPO("MlpPolicy", "games:climbing", krylov_rtol=-0.1)


def test_bad_envs_are_named():
    import gymnasium as gym

    with pytest.raises(ValueError, match="mamujoco:"):
        HATRPO("MlpPolicy", "HalfCheetah-v5")
    with pytest.raises(TypeError, match=r"CartPole|TimeLimit|gymnasium"):
        HATRPO("MlpPolicy", gym.make("CartPole-v1"))
    from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env

    with pytest.raises(TypeError, match="single-agent VecEnv"):
        HATRPO("MlpPolicy", sb3_make_vec_env("CartPole-v1", n_envs=1))


class DictActionEnv(LeavingEnv):
    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Dict({"move": spaces.Discrete(2)})


class NanRewardEnv(LeavingEnv):
    def step(self, actions):
        obs, rewards, terminations, truncations, infos = super().step(actions)
        if self.t == 2:
            rewards = {a: float("nan") for a in rewards}
        return obs, rewards, terminations, truncations, infos


def test_unsupported_action_spaces_and_non_finite_values_are_named():
    with pytest.raises(ValueError, match=r"stayer.*Dict"):
        HATRPO("MlpPolicy", DictActionEnv, **TINY)
    model = HATRPO("MlpPolicy", NanRewardEnv, **TINY)
    with pytest.raises(ValueError, match=r"(?i)reward.*(stayer|leaver).*step"):
        model.learn(64)
