"""The index-mapped MaMuJoCo env (sb3_hatrpo.envs.mamujoco_fast) against gymnasium-robotics' own code."""

import warnings

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi import MultiAgentMujocoEnv

from sb3_hatrpo.envs import make_env
from sb3_hatrpo.envs.mamujoco_fast import FastMultiAgentMujocoEnv

# Every shipped factorisation family: plain joints (HalfCheetah), extra_obs entries (Walker2d's and
# Hopper's clipped velocities, Swimmer's and Reacher's placeholders), body_fn clips of cfrc_ext (Ant),
# body categories (Humanoid), generated models (ManySegment*), deeper graphs (agent_obsk 2).
CASES = [
    ("HalfCheetah", "2x3", {}),
    ("HalfCheetah", "6x1", {"agent_obsk": 0}),
    ("HalfCheetah", "2x3", {"agent_obsk": 2}),
    ("Walker2d", "2x3", {}),
    ("Hopper", "3x1", {}),
    ("Ant", "4x2", {}),
    ("Ant", "2x4d", {}),
    ("Humanoid", "9|8", {}),
    ("Reacher", "2x1", {}),
    ("Swimmer", "2x1", {}),
    ("Pusher", "3p", {}),
    ("ManySegmentSwimmer", "5x2", {}),
    ("ManySegmentAnt", "2x3", {}),
    ("HalfCheetah", "2x3", {"local_categories": [["qpos", "qvel", "qfrc_actuator", "cvel", "cinert", "cfrc_ext"]] * 2}),
]


def _pair(scenario, conf, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MuJoCo's model warnings, the same for both
        return MultiAgentMujocoEnv(scenario, conf, **kwargs), FastMultiAgentMujocoEnv(scenario, conf, **kwargs)


@pytest.mark.parametrize("scenario,conf,kwargs", CASES, ids=lambda c: str(c))
def test_same_observations_actions_and_rewards_as_gymnasium_robotics(scenario, conf, kwargs):
    # Observations are compared with the original code on the same instance: gymnasium-robotics orders the
    # nodes of a depth through a set of Node objects, so two instances of some envs (Pusher) differ.
    slow, fast = _pair(scenario, conf, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the original code fails the test
        slow.reset(seed=3)
        obs_fast, _ = fast.reset(seed=3)
        assert fast._plan is not None and fast._action_index is not None  # the fast path is the one compared
        rng = np.random.default_rng(0)
        for _ in range(40):
            original = MultiAgentMujocoEnv._get_obs(fast)
            for agent in slow.possible_agents:
                assert obs_fast[agent].dtype == original[agent].dtype
                np.testing.assert_array_equal(obs_fast[agent], original[agent])
            actions = {a: rng.uniform(-1, 1, slow.action_space(a).shape) for a in slow.possible_agents}
            np.testing.assert_array_equal(
                fast.map_local_actions_to_global_action(actions),
                MultiAgentMujocoEnv.map_local_actions_to_global_action(fast, actions),
            )
            _, rew_slow, term_slow, trunc_slow, _ = slow.step(actions)
            obs_fast, rew_fast, term_fast, trunc_fast, _ = fast.step(actions)
            assert rew_fast == rew_slow and term_fast == term_slow and trunc_fast == trunc_slow
            if not slow.agents:
                slow.reset()
                obs_fast, _ = fast.reset()
    slow.close()
    fast.close()


def test_a_wrong_index_map_falls_back_to_the_original_code_with_a_warning():
    slow, fast = _pair("HalfCheetah", "2x3", {})
    fast._plan.pieces[1] = [piece[::-1] if isinstance(piece, np.ndarray) else piece for piece in fast._plan.pieces[1]]
    with pytest.warns(RuntimeWarning, match="build_obs"):
        obs_fast, _ = fast.reset(seed=1)
    assert fast._plan is None
    actions = {a: np.full(3, 0.3) for a in slow.possible_agents}
    for _ in range(2):
        original = MultiAgentMujocoEnv._get_obs(fast)
        for agent in slow.possible_agents:
            np.testing.assert_array_equal(obs_fast[agent], original[agent])
        obs_fast = fast.step(actions)[0]


def test_make_env_builds_the_fast_env_and_single_agent_mode_keeps_the_original():
    assert isinstance(make_env("mamujoco:HalfCheetah-2x3"), FastMultiAgentMujocoEnv)
    single = FastMultiAgentMujocoEnv("HalfCheetah", None, agent_obsk=None)
    obs, _ = single.reset(seed=0)
    assert single._plan is None
    assert obs[single.possible_agents[0]].shape == single.observation_space(single.possible_agents[0]).shape
