"""Observation, state, value, advantage and reward normalisation: what a user relies on."""

import functools

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from pettingzoo import ParallelEnv
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.running_mean_std import RunningMeanStd

from sb3_hatrpo import HATRPO
from sb3_hatrpo.normalization import RewardScaler, RunningNormalizer
from sb3_hatrpo.policies import Actor

TINY = dict(n_steps=64, batch_size=32, n_critic_updates=2, cg_max_steps=5, policy_kwargs=dict(net_arch=[16]))


class OffsetEnv(ParallelEnv):
    """Two agents whose observations sit far from 0 (mean 100 / -50, std 5 / 0.1); state = both, 4 values.

    ``late`` joins only on odd steps; on the other steps it is absent (its padding is zeros).
    Reward: -|action of ``early``| summed over 16 steps.
    """

    metadata = {"name": "offset_v0", "render_modes": []}

    def __init__(self) -> None:
        self.possible_agents = ["early", "late"]
        self.agents: list[str] = []
        self.rng = np.random.default_rng(0)
        self.t = 0

    @functools.cache  # noqa: B019
    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(-np.inf, np.inf, (2,), np.float32)

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {
            "early": (100 + 5 * self.rng.standard_normal(2)).astype(np.float32),
            "late": (-50 + 0.1 * self.rng.standard_normal(2)).astype(np.float32),
        }
        return {a: obs[a] for a in self.agents}

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.t = 0
        self.agents = ["early"]
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        reward = -abs(float(actions["early"][0]))
        done = self.t >= 16
        self.agents = [] if done else (["early", "late"] if self.t % 2 else ["early"])
        current = list(actions)
        obs = self._obs()
        rewards = {a: reward for a in current}
        terminations = {a: False for a in current}
        truncations = {a: done or a not in self.agents for a in current}
        return obs, rewards, terminations, truncations, {a: {} for a in current}


def test_running_normalizer_matches_sb3s_statistics_and_clips():
    normalizer = RunningNormalizer((3,), clip=5.0)
    reference = RunningMeanStd(shape=(3,))
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = rng.normal([1.0, -20.0, 300.0], [0.5, 2.0, 40.0], size=(50, 3))
        normalizer.update(batch)
        reference.update(batch)
    np.testing.assert_allclose(normalizer.mean.numpy(), reference.mean)
    np.testing.assert_allclose(normalizer.var.numpy(), reference.var)
    x = th.tensor([[1.0, -20.0, 300.0], [1e6, -1e6, 300.0]])
    out = normalizer(x)
    expected = (x.double().numpy() - reference.mean) / np.sqrt(reference.var + 1e-8)
    np.testing.assert_allclose(out[0].numpy(), expected[0], atol=1e-4)
    assert out[1].tolist()[:2] == [5.0, -5.0]


def test_a_constant_input_normalises_to_zero_not_to_inf():
    normalizer = RunningNormalizer((2,))
    for _ in range(3):
        normalizer.update(np.full((10, 2), 3.7))
    out = normalizer(th.full((4, 2), 3.7))
    assert th.isfinite(out).all() and out.abs().max() < 0.01
    normalizer.var.zero_()  # the limit of a long constant stream: epsilon keeps 0 / 0 away
    normalizer.mean.fill_(3.7)
    out = normalizer(th.full((4, 2), 3.7, dtype=th.float64))
    assert th.isfinite(out).all() and out.abs().max() < 1e-6


def test_model_learns_the_statistics_of_alive_observations_only_and_predict_takes_raw_obs(tmp_path):
    model = HATRPO("MlpPolicy", OffsetEnv, n_envs=2, seed=0, **TINY)
    model.learn(256)
    early = model.policy.actor("early").obs_normalizer
    late = model.policy.actor("late").obs_normalizer
    assert early is not None and late is not None
    assert early.mean.numpy() == pytest.approx([100, 100], abs=1.0)
    # late's zero padding on the steps it was absent would drag its mean toward 0
    assert late.mean.numpy() == pytest.approx([-50, -50], abs=0.1)
    assert float(late.var.max()) < 0.1
    assert model.policy.critic.state_normalizer is not None

    raw = {"early": np.array([105.0, 95.0], np.float32), "late": np.array([-50.1, -49.9], np.float32)}
    counts = (float(early.count), float(late.count))
    actions, _ = model.predict(raw, deterministic=True)
    for _ in range(5):
        model.predict(raw)
    assert (float(early.count), float(late.count)) == counts  # frozen in predict
    # the same action as normalising by hand and calling the network without its normaliser
    actor = model.policy.actor("early")
    with th.no_grad():
        features = early(th.as_tensor(raw["early"])[None])
        mean = actor.action_net(actor.mlp_extractor.policy_net(features))
    np.testing.assert_allclose(actions["early"], np.clip(mean.numpy()[0], -1, 1), atol=1e-6)

    model.save(tmp_path / "model")
    loaded = HATRPO.load(tmp_path / "model")
    again, _ = loaded.predict(raw, deterministic=True)
    np.testing.assert_array_equal(again["early"], actions["early"])
    np.testing.assert_array_equal(again["late"], actions["late"])
    assert th.equal(loaded.policy.actor("early").obs_normalizer.mean, early.mean)


def test_the_policy_that_sampled_a_rollout_is_the_trust_regions_old_policy():
    """Statistics stay fixed during a rollout and its update; they change only after it."""

    class Watch(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.means: list[np.ndarray] = []

        def _on_step(self) -> bool:
            self.means.append(self.model.policy.actor("early").obs_normalizer.mean.numpy().copy())
            return True

    watch = Watch()
    model = HATRPO("MlpPolicy", OffsetEnv, n_envs=1, seed=0, **{**TINY, "n_steps": 32})
    model.learn(64, callback=watch)
    first, second = watch.means[:32], watch.means[32:]
    assert all(np.array_equal(m, first[0]) for m in first)
    assert all(np.array_equal(m, second[0]) for m in second)
    assert not np.array_equal(first[0], second[0])  # updated between the two iterations


def test_normalisation_can_be_turned_off():
    model = HATRPO("MlpPolicy", OffsetEnv, seed=0, normalize_observation=False, **TINY)
    assert model.policy.actor("early").obs_normalizer is None
    assert model.policy.critic.state_normalizer is None


def test_discrete_observations_are_not_normalised():
    actor = Actor(spaces.Discrete(4), spaces.Discrete(2), [8], normalize_observation=True)
    assert actor.obs_normalizer is None


def test_value_normaliser_round_trip_with_a_large_mean():
    """The critic learns normalised targets and _values gives them back in return units."""
    model = HATRPO("MlpPolicy", OffsetEnv, seed=0, **{**TINY, "n_critic_updates": 300, "learning_rate": 3e-3})
    states = th.randn(256, 4)
    returns = 100.0 + 2.0 * states[:, 0]
    model._train_critic(states, returns)
    raw = model.policy.predict_values(states).detach()
    assert abs(float(raw.mean())) < 0.5  # trained on normalised targets, not on ~100
    values = model._values(states.numpy())
    np.testing.assert_allclose(values, returns.numpy(), atol=1.0)  # de-normalised back to ~100


def test_advantages_are_normalised_before_the_trust_region_step():
    model = HATRPO("MlpPolicy", OffsetEnv, seed=0, **TINY)
    model.learn(64)
    data = model.rollout_buffer.get()
    scaled = type(data)(**{**data.__dict__, "advantages": data.advantages * 1000 + 7})
    potential = model.make_planner(data).direction("early").potential
    assert model.make_planner(scaled).direction("early").potential == pytest.approx(potential, rel=1e-3)


def test_reward_scaler_divides_by_the_return_std_and_resets_at_episode_ends():
    scaler = RewardScaler(n_envs=2, gamma=0.9)
    dones = np.array([False, True])
    out = [scaler(np.array([10.0, 10.0]), dones) for _ in range(200)]
    assert np.all(np.isfinite(out))
    # env 1 ends every step, env 0 never: env 0's discounted return grows to 100, env 1's stays 10
    assert scaler.returns[1] == 0.0 and scaler.returns[0] == pytest.approx(100.0, rel=1e-6)
    std = np.sqrt(scaler.stats.var)
    np.testing.assert_allclose(out[-1], np.array([10.0, 10.0]) / std, rtol=1e-5)


def test_reward_normalisation_leaves_logged_returns_raw():
    model = HATRPO("MlpPolicy", OffsetEnv, seed=0, normalize_reward=True, **TINY)
    model.learn(128)
    assert model.reward_scaler is not None
    assert float(np.abs(model.rollout_buffer.rewards).max()) < 10.0
    logged = [info["r"] for info in model.ep_info_buffer]
    assert logged and min(logged) < -1.0  # 16 steps of -|a|: raw episode returns, not scaled ones


def test_a_model_saved_before_normalisation_existed_loads_and_trains_as_it_was(tmp_path, monkeypatch):
    """Old zips have no normalize_observation key and SB3's max_grad_norm 0.0: no normaliser, no frozen critic."""
    import json
    import zipfile

    model = HATRPO("MlpPolicy", OffsetEnv, seed=0, normalize_observation=False, **TINY)
    model.learn(64)
    model.save(tmp_path / "new.zip")
    old = tmp_path / "old.zip"
    with zipfile.ZipFile(tmp_path / "new.zip") as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "data":
                data = json.loads(content)
                data.pop("normalize_observation")
                data["max_grad_norm"] = 0.0
                content = json.dumps(data).encode()
            target.writestr(item, content)
    loaded = HATRPO.load(old, env=OffsetEnv)
    assert loaded.normalize_observation is False
    assert loaded.policy.actor("early").obs_normalizer is None
    raw = {"early": np.array([105.0, 95.0], np.float32)}
    np.testing.assert_array_equal(
        loaded.predict(raw, deterministic=True)[0]["early"], model.predict(raw, deterministic=True)[0]["early"]
    )
    clips = []
    monkeypatch.setattr(th.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: clips.append(args[1:]))
    before = [p.detach().clone() for p in loaded.policy.critic.parameters()]
    loaded.learn(64)
    assert clips == []  # SB3's 0.0 means no clipping, not clipping every gradient to norm 0
    assert any(not th.equal(a, b) for a, b in zip(before, loaded.policy.critic.parameters()))
