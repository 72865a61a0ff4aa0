"""GAE against a hand-worked example with a truncation and a termination."""

import numpy as np
import pytest
from gymnasium import spaces

from sb3_hatrpo.buffers import MultiAgentRolloutBuffer, compute_gae


def test_gae_bootstraps_through_truncation_but_not_termination():
    gamma, lam = 0.5, 0.5
    # env 0: truncated after step 1 (final state worth 10), terminated after step 3
    # env 1: no episode end; bootstrapped from last_values = 8
    rewards = np.array([[1, 0], [1, 0], [1, 0], [1, 1]], dtype=np.float32)
    values = np.array([[1, 0], [2, 0], [3, 0], [4, 0]], dtype=np.float32)
    dones = np.array([[0, 0], [1, 0], [0, 0], [1, 0]], dtype=bool)
    truncation_values = np.array([[0, 0], [10, 0], [0, 0], [0, 0]], dtype=np.float32)
    last_values = np.array([5, 8], dtype=np.float32)
    advantages, returns = compute_gae(rewards, values, dones, last_values, truncation_values, gamma, lam)
    # env 0, worked backwards:
    # t=3 terminated: delta = 1 - 4 = -3                         A = -3
    # t=2:            delta = 1 + .5*4 - 3 = 0                   A = 0 + .25*(-3) = -0.75
    # t=1 truncated:  delta = 1 + .5*10 - 2 = 4 (next row ignored) A = 4
    # t=0:            delta = 1 + .5*2 - 1 = 1                   A = 1 + .25*4 = 2
    # env 1: t=3 delta = 1 + .5*8 = 5; earlier deltas 0, each step back multiplies by .25
    expected = np.array([[2, 0.078125], [4, 0.3125], [-0.75, 1.25], [-3, 5]], dtype=np.float32)
    np.testing.assert_allclose(advantages, expected, rtol=1e-6)
    np.testing.assert_allclose(returns, expected + values, rtol=1e-6)


def test_buffer_flattens_agents_and_places_truncation_values():
    obs_spaces = spaces.Dict({"a": spaces.Box(-1, 1, (2,)), "b": spaces.Box(-1, 1, (3,))})
    act_spaces = spaces.Dict({"a": spaces.Box(-1, 1, (1,)), "b": spaces.Discrete(3)})
    buffer = MultiAgentRolloutBuffer(3, obs_spaces, act_spaces, state_dim=4, n_envs=2, gamma=0.5, gae_lambda=1.0)
    for t in range(3):
        buffer.add(
            {"a": np.full((2, 2), t), "b": np.full((2, 3), t)},
            np.full((2, 4), t),
            np.array([[True, True], [True, t < 2]]),
            {"a": np.full((2, 1), 0.5), "b": np.array([t, 2])},
            np.ones(2),
            np.array([t == 1, False]),
        )
        if t == 1:
            buffer.add_truncation(0, np.zeros(4))
    assert buffer.full
    buffer.compute_returns_and_advantage(np.zeros((3, 2)), np.zeros(2), np.array([6.0]))
    assert buffer.truncation_values[1, 0] == 6.0
    # env 0 step 1: r + gamma V(final) = 1 + 3
    assert buffer.returns[1, 0] == pytest.approx(4.0)
    data = buffer.get()
    assert data.observations["a"].shape == (6, 2) and data.observations["b"].shape == (6, 3)
    assert data.actions["b"].tolist() == [0, 2, 1, 2, 2, 2]
    assert data.alive["b"].tolist() == [1, 1, 1, 1, 1, 0]
    with pytest.raises(RuntimeError, match="full"):
        buffer.add({}, np.zeros((2, 4)), np.zeros((2, 2)), {}, np.zeros(2), np.zeros(2))


def test_without_truncation_bootstrap_the_truncated_step_gets_zero_advantage():
    """HARL's use_proper_time_limits: the truncated step teaches nothing; earlier steps bootstrap from V(s_t)."""
    rewards = np.array([[1.0], [1.0], [1.0]], np.float32)
    values = np.array([[0.5], [0.6], [0.7]], np.float32)
    dones = np.array([[False], [False], [True]])
    truncated = np.array([[False], [False], [True]])
    advantages, returns = compute_gae(
        rewards,
        values,
        dones,
        np.zeros(1, np.float32),
        np.array([[0], [0], [9.0]], np.float32),
        0.9,
        1.0,
        truncated=truncated,
    )
    assert advantages[2, 0] == 0.0 and returns[2, 0] == pytest.approx(0.7)
    # step 1: r + gamma V(s_2) - V(s_1), and nothing flows back from the truncated step
    assert advantages[1, 0] == pytest.approx(1.0 + 0.9 * 0.7 - 0.6)
    bootstrapped, _ = compute_gae(
        rewards, values, dones, np.zeros(1, np.float32), np.array([[0], [0], [9.0]], np.float32), 0.9, 1.0
    )
    assert bootstrapped[2, 0] == pytest.approx(1.0 + 0.9 * 9.0 - 0.7)
