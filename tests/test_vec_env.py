"""The vectorised multi-agent envs (``sb3_hatrpo.vec_env``) and the global state (``sb3_hatrpo.envs.global_state``)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest
from gymnasium import spaces
from pettingzoo import ParallelEnv
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv

from sb3_hatrpo.envs.global_state import global_state, state_space_of
from sb3_hatrpo.vec_env import (
    DummyMultiAgentVecEnv,
    MultiAgentVecEnv,
    SubprocMultiAgentVecEnv,
    make_vec_env,
)


class ToyEnv(ParallelEnv):
    """Two agents: ``a`` (Box actions) and ``b`` (Discrete actions), observations ``[t, noise, agent index]``.

    :param max_steps: Truncation after this many steps.
    :param terminate_at: Step at which every agent is terminated.
    :param leave_at: Step at which agent ``b`` is terminated while ``a`` goes on.
    :param rewards: Rewards of ``a`` and ``b``.
    :param nan_obs_at: Step at which ``b`` observes NaN.
    :param nan_reward_at: Step at which ``a`` gets a NaN reward.
    :param crash_at: Step at which ``step`` raises ``ZeroDivisionError``.
    :param action_space_a: Replaces the action space of ``a``.
    :param with_state: Declare a ``state_space`` and implement ``state()``.
    """

    metadata = {"name": "toy_v0", "render_modes": ["rgb_array"]}

    def __init__(
        self,
        max_steps: int = 5,
        terminate_at: int | None = None,
        leave_at: int | None = None,
        rewards: tuple[float, float] = (1.0, 1.0),
        nan_obs_at: int | None = None,
        nan_reward_at: int | None = None,
        crash_at: int | None = None,
        action_space_a: spaces.Space | None = None,
        with_state: bool = True,
        render_mode: str | None = None,
    ) -> None:
        self.possible_agents = ["a", "b"]
        self.agents = list(self.possible_agents)
        self.max_steps = max_steps
        self.terminate_at = terminate_at
        self.leave_at = leave_at
        self.rewards = dict(zip(self.possible_agents, rewards))
        self.nan_obs_at = nan_obs_at
        self.nan_reward_at = nan_reward_at
        self.crash_at = crash_at
        self.render_mode = render_mode
        self._obs_space = spaces.Box(-np.inf, np.inf, (3,), np.float64)
        self._act_spaces = {
            "a": action_space_a or spaces.Box(-1.0, 1.0, (2,), np.float32),
            "b": spaces.Discrete(3),
        }
        if with_state:
            self.state_space = spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self._rng = np.random.default_rng()
        self.received: list[dict[str, Any]] = []
        self.t = 0
        self.noise = 0.0

    def observation_space(self, agent: str) -> spaces.Space:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Space:
        return self._act_spaces[agent]

    def state(self) -> np.ndarray:
        if not hasattr(self, "state_space"):
            raise NotImplementedError
        return np.array([self.t, self.noise, len(self.agents), 7.0], dtype=np.float32)

    def _obs(self) -> dict[str, np.ndarray]:
        return {agent: np.array([self.t, self.noise, i], dtype=np.float64) for i, agent in enumerate(self.agents)}

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.t = 0
        self.noise = float(self._rng.uniform())
        self.agents = list(self.possible_agents)
        return self._obs(), {agent: {} for agent in self.agents}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        self.received.append(dict(actions))
        self.t += 1
        if self.t == self.crash_at:
            raise ZeroDivisionError(f"boom at step {self.t}")
        obs = self._obs()
        if self.t == self.nan_obs_at:
            obs["b"][0] = np.nan
        rewards = {agent: self.rewards[agent] for agent in self.agents}
        if self.t == self.nan_reward_at:
            rewards["a"] = float("nan")
        terminations = {agent: self.t == self.terminate_at for agent in self.agents}
        truncations = {agent: self.t >= self.max_steps for agent in self.agents}
        if self.t == self.leave_at:
            terminations["b"] = True
        infos = {agent: {"t": self.t} for agent in self.agents}
        self.agents = [agent for agent in self.agents if not (terminations[agent] or truncations[agent])]
        return obs, rewards, terminations, truncations, infos

    def render(self) -> np.ndarray:
        return np.full((4, 6, 3), self.t, dtype=np.uint8)


def toy_actions(n_envs: int, a: float = 0.5, b: int = 1) -> dict[str, np.ndarray]:
    return {"a": np.full((n_envs, 2), a, dtype=np.float32), "b": np.full(n_envs, b, dtype=np.int64)}


def dummy(n_envs: int = 2, **kwargs: Any) -> DummyMultiAgentVecEnv:
    return DummyMultiAgentVecEnv([lambda: ToyEnv(**kwargs) for _ in range(n_envs)])


def halfcheetah() -> ParallelEnv:
    from gymnasium_robotics import mamujoco_v1

    return mamujoco_v1.parallel_env("HalfCheetah", "2x3")


# --- reset / step ---------------------------------------------------------------------------------------------


def test_reset_and_step_shapes_and_dtypes():
    vec = dummy(3)
    assert vec.agents == ["a", "b"]
    assert list(vec.observation_space.keys()) == ["a", "b"]
    assert vec.observation_space["a"] == spaces.Box(-np.inf, np.inf, (3,), np.float32)
    assert vec.action_space["b"] == spaces.Discrete(3)
    assert vec.state_space == spaces.Box(-np.inf, np.inf, (4,), np.float32)
    obs = vec.reset()
    for agent in vec.agents:
        assert obs[agent].shape == (3, 3) and obs[agent].dtype == np.float32
    assert vec.states.shape == (3, 4) and vec.states.dtype == np.float32
    assert vec.alive.shape == (3, 2) and vec.alive.dtype == bool and vec.alive.all()
    obs, rewards, dones, infos = vec.step(toy_actions(3))
    assert obs["b"].shape == (3, 3) and obs["b"].dtype == np.float32
    np.testing.assert_array_equal(obs["b"][:, 0], 1.0)  # t
    np.testing.assert_array_equal(obs["b"][:, 2], 1.0)  # agent index
    assert rewards.shape == (3,) and rewards.dtype == np.float32
    assert dones.shape == (3,) and dones.dtype == bool and not dones.any()
    assert len(infos) == 3 and infos[0]["agent_infos"] == {"a": {"t": 1}, "b": {"t": 1}}
    np.testing.assert_array_equal(vec.states[:, [0, 2, 3]], [[1, 2, 7]] * 3)
    vec.close()
    vec.close()  # twice is fine


def test_heterogeneous_mpe_and_mamujoco_spaces():
    from mpe2 import simple_speaker_listener_v4

    vec = make_vec_env(lambda: simple_speaker_listener_v4.parallel_env(), n_envs=2, seed=0)
    obs = vec.reset()
    assert obs["speaker_0"].shape == (2, 3) and obs["listener_0"].shape == (2, 11)
    assert vec.state_space.shape == (14,) and vec.states.shape == (2, 14)
    _, rewards, _, _ = vec.step({"speaker_0": np.array([0, 2]), "listener_0": np.array([[1], [4]])})
    assert rewards.dtype == np.float32
    vec.close()

    vec = DummyMultiAgentVecEnv([halfcheetah])
    assert vec.state_space.shape == (17,) and vec.observation_space["agent_0"].dtype == np.float32
    vec.reset()
    assert vec.states.shape == (1, 17) and np.abs(vec.states).sum() > 0
    vec.close()


# --- episode ends ---------------------------------------------------------------------------------------------


def test_truncation_auto_resets_with_terminal_infos():
    vec = dummy(2, max_steps=3)
    vec.reset()
    for _ in range(2):
        obs, _, dones, infos = vec.step(toy_actions(2))
        assert not dones.any() and "terminal_observation" not in infos[0]
    obs, _, dones, infos = vec.step(toy_actions(2))
    assert dones.all()
    info = infos[1]
    assert info["TimeLimit.truncated"] is True
    terminal = info["terminal_observation"]
    assert set(terminal) == {"a", "b"} and terminal["b"].dtype == np.float32
    np.testing.assert_array_equal(terminal["b"][[0, 2]], [3.0, 1.0])
    assert info["terminal_state"].dtype == np.float32
    np.testing.assert_array_equal(info["terminal_state"][[0, 2]], [3.0, 0.0])  # t, no agents left
    assert info["episode"]["r"] == pytest.approx(3.0) and info["episode"]["l"] == 3 and info["episode"]["t"] >= 0
    # The returned observations and states are the first of the next episode
    np.testing.assert_array_equal(obs["a"][:, 0], 0.0)
    np.testing.assert_array_equal(vec.states[:, 0], 0.0)
    assert vec.alive.all()
    assert vec.reset_infos[1] == {"a": {}, "b": {}}


def test_termination_has_no_time_limit_flag():
    vec = dummy(1, terminate_at=2, rewards=(2.0, 2.0))
    vec.reset()
    vec.step(toy_actions(1))
    _, rewards, dones, infos = vec.step(toy_actions(1))
    assert dones[0] and rewards[0] == 2.0
    assert "TimeLimit.truncated" not in infos[0]
    assert infos[0]["episode"]["r"] == pytest.approx(4.0) and infos[0]["episode"]["l"] == 2


def test_agent_leaving_mid_episode():
    vec = DummyMultiAgentVecEnv([lambda: ToyEnv(with_state=False), lambda: ToyEnv(leave_at=1, with_state=False)])
    assert vec.state_space.shape == (6,)  # no state: the two observations end to end
    vec.reset()
    obs, _, dones, _ = vec.step(toy_actions(2))
    assert not dones.any()
    np.testing.assert_array_equal(vec.alive, [[True, True], [True, False]])
    np.testing.assert_array_equal(obs["b"][1], 0.0)
    np.testing.assert_array_equal(obs["b"][0], [1.0, obs["b"][0][1], 1.0])
    np.testing.assert_array_equal(vec.states[1, 3:], 0.0)  # b's part of the concatenated state
    # b's action is not passed to the env that lost it, and a missing action for it is fine there
    vec.step({"a": np.zeros((2, 2), np.float32), "b": np.array([2, 2])})
    assert set(vec.envs[1].received[-1]) == {"a"} and set(vec.envs[0].received[-1]) == {"a", "b"}
    with pytest.raises(ValueError, match="No action for agent 'b'"):
        vec.step({"a": np.zeros((2, 2), np.float32)})


def test_reward_aggregation_mean_and_sum():
    for aggregation, expected in (("mean", 2.0), ("sum", 4.0)):
        vec = DummyMultiAgentVecEnv([lambda: ToyEnv(rewards=(1.0, 3.0))], reward_aggregation=aggregation)
        vec.reset()
        assert vec.step(toy_actions(1))[1][0] == expected
    # Identical (cooperative) rewards: that value, whatever the aggregation
    vec = DummyMultiAgentVecEnv([lambda: ToyEnv(rewards=(2.5, 2.5))], reward_aggregation="sum")
    vec.reset()
    assert vec.step(toy_actions(1))[1][0] == 2.5
    with pytest.raises(ValueError, match="reward_aggregation"):
        DummyMultiAgentVecEnv([ToyEnv], reward_aggregation="max")


def test_box_actions_clipped_and_discrete_as_integers():
    vec = DummyMultiAgentVecEnv([lambda: ToyEnv(action_space_a=spaces.Box(-1.0, 2.0, (2,), np.float32))])
    vec.reset()
    vec.step({"a": np.array([[5.0, -3.0]]), "b": np.array([[2.0]])})  # float64 in, wrong shape for b
    received = vec.envs[0].received[-1]
    np.testing.assert_array_equal(received["a"], [2.0, -1.0])
    assert received["a"].dtype == np.float32
    assert isinstance(received["b"], (int, np.integer)) and received["b"] == 2


# --- errors ---------------------------------------------------------------------------------------------------


def test_nan_observation_names_agent_copy_and_step():
    vec = DummyMultiAgentVecEnv([lambda: ToyEnv(), lambda: ToyEnv(nan_obs_at=2)])
    vec.reset()
    vec.step(toy_actions(2))
    with pytest.raises(ValueError, match=r"observation for agent 'b' in env copy 1 at step 2 .*Hint"):
        vec.step(toy_actions(2))
    # On the last step of an episode it is caught in the terminal observation
    vec = DummyMultiAgentVecEnv([lambda: ToyEnv(max_steps=1, nan_obs_at=1)])
    vec.reset()
    with pytest.raises(ValueError, match=r"agent 'b' in env copy 0 at step 1 "):
        vec.step(toy_actions(1))


def test_nan_reward_names_agent_copy_and_step():
    vec = DummyMultiAgentVecEnv([lambda: ToyEnv(), lambda: ToyEnv(nan_reward_at=3)])
    vec.reset()
    vec.step(toy_actions(2))
    vec.step(toy_actions(2))
    with pytest.raises(ValueError, match=r"reward \(agent 'a': nan\) in env copy 1 at step 3 "):
        vec.step(toy_actions(2))


def test_unsupported_action_spaces_rejected_at_construction():
    dict_space = spaces.Dict({"x": spaces.Discrete(2)})
    with pytest.raises(ValueError, match=r"Agent 'a' .*Dict.*supported action spaces: Box"):
        DummyMultiAgentVecEnv([lambda: ToyEnv(action_space_a=dict_space)])
    with pytest.raises(ValueError, match=r"Agent 'a' .*infinite bounds"):
        DummyMultiAgentVecEnv([lambda: ToyEnv(action_space_a=spaces.Box(-np.inf, np.inf, (2,)))])
    with pytest.raises(ValueError, match=r"Agent 'a' has the action space .* in env copy 1"):
        DummyMultiAgentVecEnv(
            [lambda: ToyEnv(), lambda: ToyEnv(action_space_a=spaces.Box(-2.0, 2.0, (2,), np.float32))]
        )
    env = ToyEnv()
    with pytest.raises(ValueError, match="same env instance"):
        DummyMultiAgentVecEnv([lambda: env, lambda: env])


# --- seeding --------------------------------------------------------------------------------------------------


def test_seeding_gives_identical_first_observations():
    first = make_vec_env(ToyEnv, n_envs=2, seed=3).reset()
    second = make_vec_env(ToyEnv, n_envs=2, seed=3).reset()
    np.testing.assert_array_equal(first["a"], second["a"])
    assert first["a"][0, 1] != first["a"][1, 1]  # seed + index per copy
    vec = make_vec_env(ToyEnv, n_envs=2, seed=4)
    assert vec.reset()["a"][0, 1] != first["a"][0, 1]
    # The seeds are used once, as in SB3's DummyVecEnv
    vec.seed(3)
    np.testing.assert_array_equal(vec.reset()["a"], first["a"])
    assert vec.reset()["a"][0, 1] != first["a"][0, 1]


# --- subprocesses ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_subproc_matches_dummy_on_halfcheetah():
    subproc = make_vec_env(halfcheetah, n_envs=2, seed=0, vec_env_cls="subproc")
    try:
        reference = make_vec_env(halfcheetah, n_envs=2, seed=0)
        np.testing.assert_array_equal(subproc.reset()["agent_1"], reference.reset()["agent_1"])
        rng = np.random.default_rng(0)
        for _ in range(10):
            actions = {agent: rng.normal(size=(2, 3)).astype(np.float32) for agent in reference.agents}
            obs, rewards, dones, infos = subproc.step(actions)
            obs_ref, rewards_ref, dones_ref, infos_ref = reference.step(actions)
            np.testing.assert_array_equal(dones, dones_ref)
            for agent in reference.agents:
                np.testing.assert_array_equal(obs[agent], obs_ref[agent])
            np.testing.assert_array_equal(rewards, rewards_ref)
            np.testing.assert_array_equal(subproc.states, reference.states)
            np.testing.assert_array_equal(subproc.alive, reference.alive)
            assert infos[0]["agent_infos"] == infos_ref[0]["agent_infos"]
        assert isinstance(subproc, VecEnv)
        assert subproc.env_is_wrapped(Monitor) == [False, False]
        assert subproc.get_attr("possible_agents", indices=1) == [["agent_0", "agent_1"]]
        assert subproc.has_attr("single_agent_env") and not subproc.has_attr("nope")
        np.testing.assert_array_equal(subproc.env_method("state", indices=[0])[0].astype(np.float32), subproc.states[0])
    finally:
        subproc.close()
    subproc.close()


@pytest.mark.timeout(60)
def test_subproc_worker_exception_raises_runtime_error_naming_it():
    vec = SubprocMultiAgentVecEnv([lambda: ToyEnv(), lambda: ToyEnv(crash_at=2)])
    try:
        vec.reset()
        vec.step(toy_actions(2))
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"(?s)worker 1 raised ZeroDivisionError.*boom at step 2.*Traceback"):
            vec.step(toy_actions(2))
        assert time.monotonic() - start < 10
        # Non-finite values stay ValueErrors across the pipe; attributes round-trip
        vec.set_attr("nan_reward_at", 1, indices=0)
        assert vec.get_attr("nan_reward_at") == [1, None]
        vec.reset()
        with pytest.raises(ValueError, match=r"agent 'a': nan\) in env copy 0 at step 1"):
            vec.step(toy_actions(2))
    finally:
        vec.close()


@pytest.mark.timeout(60)
def test_subproc_killed_worker_gives_clear_error():
    vec = SubprocMultiAgentVecEnv([ToyEnv, ToyEnv])
    try:
        vec.reset()
        os.kill(vec.processes[0].pid, signal.SIGKILL)
        vec.processes[0].join(timeout=10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"worker 0 .*died"):
            vec.step(toy_actions(2))
        assert time.monotonic() - start < 10
    finally:
        vec.close()
    assert not any(process.is_alive() for process in vec.processes)


@pytest.mark.timeout(60)
def test_subproc_env_creation_error_names_worker():
    def broken() -> ParallelEnv:
        raise OSError("no such model file")

    with pytest.raises(RuntimeError, match=r"worker 0 raised OSError while creating the env: no such model file"):
        SubprocMultiAgentVecEnv([broken])


# --- SB3 compatibility, make_vec_env, rendering ---------------------------------------------------------------


def test_sb3_vec_env_interface():
    vec = dummy(2)
    assert isinstance(vec, VecEnv) and isinstance(vec, MultiAgentVecEnv)
    assert vec.env_is_wrapped(Monitor) == [False, False]
    assert vec.seed(10) == [10, 11]
    assert vec.get_attr("max_steps") == [5, 5]
    vec.set_attr("max_steps", 2, indices=[1])
    assert vec.get_attr("max_steps") == [5, 2]
    assert vec.env_method("action_space", "b", indices=0) == [spaces.Discrete(3)]
    assert vec.has_attr("received") and not vec.has_attr("nope")


def test_make_vec_env_inputs():
    env = ToyEnv()
    vec = make_vec_env(env)
    assert isinstance(vec, DummyMultiAgentVecEnv) and vec.envs[0] is env
    assert make_vec_env(vec) is vec
    copies = make_vec_env(env, n_envs=2)
    assert copies.envs[0] is env and copies.envs[1] is not env and copies.num_envs == 2
    vec = make_vec_env(ToyEnv, n_envs=2, env_kwargs={"max_steps": 7}, reward_aggregation="sum")
    assert vec.get_attr("max_steps") == [7, 7] and vec.reward_aggregation == "sum"
    wrapped = []
    vec = make_vec_env(
        "games:differential", wrapper=lambda e: wrapped.append(e) or e, vec_env_cls=DummyMultiAgentVecEnv
    )
    assert len(wrapped) == 1 and vec.num_envs == 1
    vec.reset()
    with pytest.raises(ValueError, match="vec_env_cls"):
        make_vec_env(ToyEnv, vec_env_cls="threads")
    with pytest.raises(TypeError):
        make_vec_env(42)


def test_render_and_render_mode():
    vec = DummyMultiAgentVecEnv([lambda: ToyEnv(render_mode="rgb_array")] * 2)
    vec.reset()
    vec.step(toy_actions(2))
    frame = vec.render()
    assert frame is not None and frame.shape == (4, 6, 3) and frame[0, 0, 0] == 1
    assert len(vec.get_images()) == 2
    from gymnasium_robotics import mamujoco_v1

    # MaMuJoCo keeps its render mode on the single-agent env
    vec = DummyMultiAgentVecEnv([lambda: mamujoco_v1.parallel_env("HalfCheetah", "2x3", render_mode="rgb_array")])
    assert vec.render_mode == "rgb_array"


# --- global state ---------------------------------------------------------------------------------------------


def test_global_state_sources():
    env = halfcheetah()
    assert state_space_of(env) == spaces.Box(-np.inf, np.inf, (17,), np.float32)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(global_state(env, obs), env.state().astype(np.float32))

    # No state: flattened observations end to end (Discrete one-hot), zeros for absent agents
    class Mixed(ToyEnv):
        def observation_space(self, agent: str) -> spaces.Space:
            return spaces.Discrete(3) if agent == "b" else super().observation_space(agent)

    env = Mixed(with_state=False)
    assert state_space_of(env).shape == (6,) and state_space_of(env).dtype == np.float32
    value = global_state(env, {"a": np.array([1.0, 2.0, 3.0]), "b": 2})
    np.testing.assert_array_equal(value, [1, 2, 3, 0, 0, 1])
    np.testing.assert_array_equal(global_state(env, {"b": 0}), [0, 0, 0, 1, 0, 0])
    assert global_state(env, {"b": 0}).dtype == np.float32


@pytest.mark.parametrize(
    "space",
    [
        spaces.Dict({"x": spaces.Discrete(2)}),
        spaces.MultiBinary(3),
        spaces.Box(-np.inf, np.inf, (2,)),
        spaces.Box(np.array([-1.0, -np.inf], dtype=np.float32), np.array([1.0, 1.0], dtype=np.float32)),
    ],
)
def test_policy_and_vec_env_reject_the_same_action_spaces_with_the_same_message(space):
    # One source of truth: a space the vec env accepted but the policy rejected (or the reverse) would fail here
    from sb3_hatrpo.policies import HATRPOPolicy

    with pytest.raises(ValueError) as from_vec_env:
        DummyMultiAgentVecEnv([lambda: ToyEnv(action_space_a=space)])
    with pytest.raises(ValueError) as from_policy:
        HATRPOPolicy(
            spaces.Dict({"a": spaces.Box(-1, 1, (3,))}),
            spaces.Dict({"a": space}),
            lambda _: 1e-3,
            state_space=spaces.Box(-1, 1, (3,)),
        )
    assert str(from_vec_env.value) == str(from_policy.value)
    assert "Agent 'a'" in str(from_policy.value)
