"""Tests of the env registry (make_env, as_parallel_env, list_envs) and the paper's games."""

from __future__ import annotations

import sys
import textwrap
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.test import parallel_api_test, parallel_seed_test

from sb3_hatrpo.envs import (
    KNOWN_PREFIXES,
    DifferentialGame,
    MatrixGame,
    as_parallel_env,
    climbing_game,
    differential_reward,
    global_state,
    list_envs,
    make_env,
    penalty_game,
    state_space_of,
)
from sb3_hatrpo.envs.registry import MAMUJOCO_AGENT_CONFS

MAMUJOCO_IDS = [
    "mamujoco:HalfCheetah-2x3",
    "mamujoco:HalfCheetah-6x1",
    "mamujoco:Walker2d-2x3",
    "mamujoco:Ant-4x2",
    "mamujoco:Hopper-3x1",
]
GAME_IDS = ["games:differential", "games:climbing", "games:penalty"]


def _needs_extra(env_id: str) -> None:
    """Skip (rather than fail) when the optional extra behind an id is not installed."""
    if env_id.startswith("mamujoco:"):
        pytest.importorskip("gymnasium_robotics")
    elif env_id.startswith("mpe:"):
        pytest.importorskip("mpe2")


def test_list_envs() -> None:
    ids = list_envs()
    assert set(MAMUJOCO_IDS + GAME_IDS + ["mpe:simple_spread_v3", "mpe:simple_speaker_listener_v4"]) == set(ids)
    assert set(list_envs(available_only=True)) <= set(ids)
    assert all(any(env_id.startswith(prefix) for prefix in KNOWN_PREFIXES) for env_id in ids)


@pytest.mark.parametrize("env_id", list_envs())
def test_parallel_api(env_id: str) -> None:
    _needs_extra(env_id)
    env = make_env(env_id)
    assert isinstance(env, ParallelEnv)
    # MuJoCo steps are the slow part: a few cycles are enough to exercise the API.
    parallel_api_test(env, num_cycles=5 if env_id.startswith("mamujoco:") else 30)
    env.reset(seed=0)
    assert np.all(np.isfinite(env.state()))
    env.close()


@pytest.mark.parametrize("env_id", list_envs())
def test_global_state_agrees_with_state_space(env_id: str) -> None:
    _needs_extra(env_id)
    env = make_env(env_id)
    obs, _ = env.reset(seed=0)
    assert global_state(env, obs).shape == state_space_of(env).shape
    env.close()


@pytest.mark.parametrize("env_id", MAMUJOCO_IDS)
def test_mamujoco_state_matches_single_agent_env(env_id: str) -> None:
    pytest.importorskip("gymnasium_robotics")
    env = make_env(env_id)
    env.reset(seed=0)
    state = env.state()
    assert state.shape == env.single_agent_env.observation_space.shape
    n_agents = int(env_id.split("-")[1].split("x")[0])
    assert len(env.possible_agents) == n_agents
    env.close()


def test_mamujoco_known_confs_construct() -> None:
    pytest.importorskip("gymnasium_robotics")
    ids = [f"mamujoco:{scenario}-{conf}" for scenario, confs in MAMUJOCO_AGENT_CONFS.items() for conf in confs]
    for env_id in [*ids, "mamujoco:ManySegmentSwimmer-2x1"]:
        env = make_env(env_id)
        env.reset(seed=0)
        assert env.state().shape == env.single_agent_env.observation_space.shape, env_id
        env.close()


def test_mamujoco_kwargs_pass_through() -> None:
    pytest.importorskip("gymnasium_robotics")
    env = make_env("mamujoco:HalfCheetah-2x3", render_mode="rgb_array", agent_obsk=0)
    assert env.single_agent_env.render_mode == "rgb_array"
    assert env.agent_obsk == 0
    env.close()


def test_mpe_speaker_listener_heterogeneous() -> None:
    pytest.importorskip("mpe2")
    env = make_env("mpe:simple_speaker_listener_v4", continuous_actions=True)
    speaker, listener = env.possible_agents
    assert env.observation_space(speaker).shape != env.observation_space(listener).shape
    assert env.action_space(speaker).shape != env.action_space(listener).shape
    assert isinstance(env.action_space(speaker), spaces.Box)
    env.reset(seed=0)
    assert env.state().shape == (env.observation_space(speaker).shape[0] + env.observation_space(listener).shape[0],)


def test_mpe_kwargs_pass_through() -> None:
    pytest.importorskip("mpe2")
    env = make_env("mpe:simple_spread_v3", N=2, max_cycles=7, continuous_actions=False)
    assert len(env.possible_agents) == 2
    assert isinstance(env.action_space(env.possible_agents[0]), spaces.Discrete)
    env.reset(seed=0)
    for _ in range(7):
        assert env.agents, "the episode must last max_cycles steps"
        _, _, _, truncations, _ = env.step({agent: env.action_space(agent).sample() for agent in env.agents})
    assert all(truncations.values()) and not env.agents


# ---------------------------------------------------------------- games


def _play(env: ParallelEnv, actions: dict[str, np.ndarray]) -> float:
    env.reset(seed=0)
    _, rewards, terminations, truncations, _ = env.step(actions)
    assert all(terminations.values()) and not any(truncations.values())
    assert env.agents == []
    assert len(set(rewards.values())) == 1, "team reward: every agent gets the same"
    return next(iter(rewards.values()))


@pytest.mark.parametrize("env_id", GAME_IDS)
def test_games_api_clean_and_deterministic(env_id: str) -> None:
    env = make_env(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel_api_test(env, num_cycles=3)
    parallel_seed_test(lambda: make_env(env_id), num_cycles=3)
    assert env.possible_agents == ["agent_0", "agent_1"]
    assert env.metadata["render_modes"] == [] and env.metadata["name"]
    assert env.state_space.contains(env.state())
    obs, _ = env.reset(seed=1)
    assert all(env.observation_space(agent).contains(o) for agent, o in obs.items())


def test_one_step_per_episode() -> None:
    env = DifferentialGame()
    env.reset(seed=0)
    env.step({agent: np.zeros(1, dtype=np.float32) for agent in env.agents})
    assert env.agents == []
    with pytest.raises(RuntimeError, match="reset"):
        env.step({agent: np.zeros(1, dtype=np.float32) for agent in env.possible_agents})
    env.reset()
    with pytest.raises(ValueError, match="agent_1"):
        env.step({"agent_0": np.zeros(1, dtype=np.float32)})


def test_differential_game_known_points() -> None:
    env = make_env("games:differential")
    offset = env.init_action
    assert offset == 1.5
    # The env adds init_action, so the policy action for a game action g is g - init_action.
    global_r = _play(env, {"agent_0": np.array([5.19 - offset]), "agent_1": np.array([5.00 - offset])})
    local_r = _play(env, {"agent_0": np.array([1.12 - offset]), "agent_1": np.array([1.00 - offset])})
    assert global_r == pytest.approx(1.040, abs=5e-4)
    assert local_r == pytest.approx(0.950, abs=5e-4)
    # A fresh zero-mean policy plays init_action, near the local optimum.
    assert _play(env, {agent: np.zeros(1) for agent in env.possible_agents}) == pytest.approx(
        float(differential_reward(np.array([1.5, 1.5])))
    )


def test_differential_game_true_maxima() -> None:
    grid = np.arange(0.0, 7.0 + 1e-9, 0.01)
    a1, a2 = np.meshgrid(grid, grid, indexing="ij")
    rewards = differential_reward(np.stack([a1, a2], axis=-1))
    i, j = np.unravel_index(rewards.argmax(), rewards.shape)
    assert (grid[i], grid[j]) == pytest.approx((5.19, 5.00), abs=0.011)
    assert rewards.max() == pytest.approx(1.040, abs=5e-4)
    # The local optimum: the best point of the lower-left quadrant.
    lower = rewards[: len(grid) // 2, : len(grid) // 2]
    i, j = np.unravel_index(lower.argmax(), lower.shape)
    assert (grid[i], grid[j]) == pytest.approx((1.12, 1.00), abs=0.011)
    assert lower.max() == pytest.approx(0.9496, abs=5e-4)


def test_differential_game_action_bounds_and_clipping() -> None:
    env = DifferentialGame(init_action=1.5)
    space = env.action_space("agent_0")
    assert isinstance(space, spaces.Box) and space.shape == (1,)
    assert space.low[0] == pytest.approx(-1.5) and space.high[0] == pytest.approx(5.5)
    env.reset(seed=0)
    _, _, _, _, infos = env.step({"agent_0": np.array([100.0]), "agent_1": np.array([-100.0])})
    np.testing.assert_allclose(infos["agent_0"]["joint_action"], [7.0, 0.0])


def test_differential_game_three_agents() -> None:
    env = make_env("games:differential", n_agents=3, init_action=0.0)
    assert env.possible_agents == ["agent_0", "agent_1", "agent_2"]
    parallel_api_test(env, num_cycles=3)
    peak = _play(env, {agent: np.array([5.0]) for agent in env.possible_agents})
    # Global sigmas (1, 3, 1), linear term on agent 0 only; the local peak is negligible at 5.
    density = 1 / np.sqrt(2 * np.pi)
    assert peak == pytest.approx(10 * density * (density / 3) * density + 0.5, abs=1e-6)
    local = _play(env, {agent: np.array([1.0]) for agent in env.possible_agents})
    assert local == pytest.approx(5.3 * density**3 + 0.1, abs=1e-4)


def test_matrix_games_payoffs() -> None:
    climbing = make_env("games:climbing")
    expected = np.array([[11, -30, 0], [-30, 7, 6], [0, 0, 5]])
    assert all(isinstance(climbing.action_space(agent), spaces.Discrete) for agent in climbing.possible_agents)
    for i in range(3):
        for j in range(3):
            assert _play(climbing, {"agent_0": i, "agent_1": np.int64(j)}) == expected[i, j]
    assert climbing.optimal_value == 11 and climbing.optimal_joint_actions == [(0, 0)]

    penalty = make_env("games:penalty", k=-50)
    assert _play(penalty, {"agent_0": 0, "agent_1": 0}) == -50
    assert _play(penalty, {"agent_0": 2, "agent_1": 0}) == 10
    assert _play(penalty, {"agent_0": 1, "agent_1": 1}) == 2
    assert penalty.optimal_joint_actions == [(0, 2), (2, 0)]
    assert penalty_game().payoff[2, 2] == -100
    assert climbing_game().metadata["name"] != penalty.metadata["name"]

    with pytest.raises(ValueError, match="Discrete"):
        _play(MatrixGame(np.eye(2)), {"agent_0": 0, "agent_1": 2})


# ---------------------------------------------------------------- bad inputs and user envs


@pytest.mark.parametrize("env_id", ["HalfCheetah-2x3", "gym:CartPole-v1", "no_such_module_xyz:make"])
def test_unknown_prefix_lists_prefixes(env_id: str) -> None:
    with pytest.raises(ValueError) as info:
        make_env(env_id)
    assert env_id in str(info.value)
    assert all(prefix in str(info.value) for prefix in KNOWN_PREFIXES)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"HalfCheetah-2x3.*Walker2d-2x3"):
        make_env("mamujoco:Cheetah-2x3")
    with pytest.raises(ValueError, match="HalfCheetah-6x1"):
        make_env("mamujoco:HalfCheetah-3x2")
    with pytest.raises(ValueError, match="differential, climbing, penalty"):
        make_env("games:prisoners_dilemma")
    pytest.importorskip("mpe2")
    with pytest.raises(ValueError, match="simple_spread_v3"):
        make_env("mpe:simple_sprad_v3")


def test_missing_extras_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)
    monkeypatch.setitem(sys.modules, "mpe2", None)
    with pytest.raises(ImportError, match=r'pip install "sb3_hatrpo\[mujoco\]"'):
        make_env("mamujoco:HalfCheetah-2x3")
    with pytest.raises(ImportError, match=r'pip install "sb3_hatrpo\[mpe\]"'):
        make_env("mpe:simple_spread_v3")


@pytest.fixture()
def user_module(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A small importable module with env factories, as a user would write."""
    (tmp_path / "my_user_envs.py").write_text(
        textwrap.dedent(
            """
            import gymnasium
            from sb3_hatrpo.envs import penalty_game

            def make_penalty(k=-100.0):
                return penalty_game(k=k)

            def make_gym():
                return gymnasium.make("CartPole-v1")

            class Factories:
                penalty = staticmethod(make_penalty)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_user_envs"


def test_entry_point_user_factory(user_module: str) -> None:
    env = make_env(f"{user_module}:make_penalty", k=-7)
    assert isinstance(env, MatrixGame) and env.payoff[0, 0] == -7
    assert isinstance(make_env(f"{user_module}:Factories.penalty"), MatrixGame)
    with pytest.raises(ValueError, match="no attribute"):
        make_env(f"{user_module}:nope")
    with pytest.raises(TypeError, match=r"make_gym.*TimeLimit"):
        make_env(f"{user_module}:make_gym")


def test_entry_point_aec_env_is_converted() -> None:
    pytest.importorskip("mpe2")
    env = make_env("mpe2.simple_spread_v3:env", N=2, max_cycles=5)
    assert isinstance(env, ParallelEnv)
    assert len(env.possible_agents) == 2
    parallel_api_test(env, num_cycles=5)


def test_as_parallel_env() -> None:
    game = DifferentialGame()
    assert as_parallel_env(game) is game
    cartpole = gymnasium.make("CartPole-v1")
    with pytest.raises(TypeError, match=r"TimeLimit.*ParallelEnv or AEC env.*factory.*id string"):
        as_parallel_env(cartpole)
    with pytest.raises(TypeError, match="str"):
        as_parallel_env("games:differential")
