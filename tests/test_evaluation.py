"""``evaluate_policy``: SB3's semantics for multi-agent envs of every accepted kind."""

from __future__ import annotations

import numpy as np
import pytest

from sb3_hatrpo import HATRPO
from sb3_hatrpo.envs import climbing_game, make_env
from sb3_hatrpo.evaluation import evaluate_policy
from sb3_hatrpo.vec_env import make_vec_env

TINY = dict(n_steps=32, batch_size=32, n_critic_updates=1, policy_kwargs=dict(net_arch=[16]), seed=0)


@pytest.fixture(scope="module")
def climbing_model() -> HATRPO:
    model = HATRPO("MlpPolicy", "games:climbing", **TINY)
    model.learn(64)
    return model


def deterministic_payoff(model: HATRPO) -> float:
    obs = {agent: np.ones((1, 1), dtype=np.float32) for agent in model.agents}
    actions, _ = model.predict(obs, deterministic=True)
    return float(climbing_game().payoff[int(actions["agent_0"][0]), int(actions["agent_1"][0])])


@pytest.mark.parametrize("kind", ["id", "instance", "factory", "vec_env"])
def test_every_env_kind_gives_the_deterministic_payoff(climbing_model: HATRPO, kind: str) -> None:
    env = {
        "id": "games:climbing",
        "instance": climbing_game(),
        "factory": climbing_game,
        "vec_env": make_vec_env("games:climbing", n_envs=2),
    }[kind]
    mean, std = evaluate_policy(climbing_model, env, n_eval_episodes=4)
    assert mean == pytest.approx(deterministic_payoff(climbing_model)) and std == 0.0


def test_episode_rewards_and_even_spread_over_copies() -> None:
    pytest.importorskip("mpe2")
    model = HATRPO("MlpPolicy", "mpe:simple_spread_v3", **TINY)
    env = make_vec_env("mpe:simple_spread_v3", n_envs=2, seed=1)
    episode_ends: list[int] = []

    def callback(local_vars: dict, _globals: dict) -> None:
        if local_vars["dones"][local_vars["i"]]:
            episode_ends.append(int(local_vars["i"]))

    returns, lengths = evaluate_policy(model, env, n_eval_episodes=3, return_episode_rewards=True, callback=callback)
    assert isinstance(returns, list) and len(returns) == 3 and lengths == [25, 25, 25]
    assert sorted(episode_ends) == [0, 1, 1]  # copy i runs (3 + i) // 2 episodes
    env.close()


def test_episode_count_targets_follow_sb3() -> None:
    """Copy i runs (n + i) // n_envs episodes, as SB3's evaluate_policy: 5 episodes on 2 copies -> 2 and 3."""
    model = HATRPO("MlpPolicy", "games:differential", **TINY)
    env = make_vec_env("games:differential", n_envs=2)
    per_copy = [0, 0]

    def callback(local_vars: dict, _globals: dict) -> None:
        if local_vars["dones"][local_vars["i"]]:
            per_copy[local_vars["i"]] += 1

    returns, lengths = evaluate_policy(model, env, n_eval_episodes=5, return_episode_rewards=True, callback=callback)
    assert per_copy == [2, 3] and len(returns) == 5 and lengths == [1] * 5


def test_returns_match_a_manual_rollout() -> None:
    """The reported return is the sum of the team rewards of the episode."""
    model = HATRPO("MlpPolicy", "games:differential", **TINY)
    env = make_env("games:differential")
    obs, _ = env.reset(seed=0)
    actions, _ = model.predict({a: np.asarray(o) for a, o in obs.items()}, deterministic=True)
    _, rewards, *_ = env.step(actions)
    mean, std = evaluate_policy(model, "games:differential", n_eval_episodes=2)
    assert mean == pytest.approx(float(rewards["agent_0"]), rel=1e-5) and std == pytest.approx(0.0, abs=1e-7)


def test_a_different_env_is_rejected_naming_the_agent(climbing_model: HATRPO) -> None:
    with pytest.raises(ValueError, match="Agent 'agent_0': the env's action space Box"):
        evaluate_policy(climbing_model, "games:differential")
    model = HATRPO("MlpPolicy", "games:differential", **TINY)
    with pytest.raises(ValueError, match=r"unknown to the model \['agent_2'\]"):
        evaluate_policy(model, make_env("games:differential", n_agents=3))


def test_bad_arguments_and_reward_threshold(climbing_model: HATRPO) -> None:
    with pytest.raises(ValueError, match="n_eval_episodes must be at least 1"):
        evaluate_policy(climbing_model, "games:climbing", n_eval_episodes=0)
    payoff = deterministic_payoff(climbing_model)
    evaluate_policy(climbing_model, "games:climbing", n_eval_episodes=1, reward_threshold=payoff)
    with pytest.raises(AssertionError, match="Mean return below threshold"):
        evaluate_policy(climbing_model, "games:climbing", n_eval_episodes=1, reward_threshold=payoff + 1)


def test_saved_model_evaluates_the_same_after_loading(climbing_model: HATRPO, tmp_path) -> None:  # type: ignore[no-untyped-def]
    climbing_model.save(tmp_path / "m")
    loaded = HATRPO.load(tmp_path / "m.zip", env="games:climbing")
    assert evaluate_policy(loaded, "games:climbing", n_eval_episodes=2) == evaluate_policy(
        climbing_model, "games:climbing", n_eval_episodes=2
    )
