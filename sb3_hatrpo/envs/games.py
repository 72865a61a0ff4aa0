"""The paper's one-step cooperative games as PettingZoo ``ParallelEnv``\\s (DESIGN §6).

Every game here has one step per episode: after ``step()`` every agent is terminated and
``env.agents`` is empty, so a vectorised env auto-resets after each joint action. All agents
receive the same team reward, observe a constant (there is nothing to observe in a one-shot
game) and the global ``state()`` is that same constant. Agents are named ``agent_0``, ``agent_1``, ...

* :class:`DifferentialGame`: the bimodal continuous game with a local optimum near the start.
* :class:`MatrixGame`, :func:`climbing_game`, :func:`penalty_game`: classic cooperative
  matrix games with a coordination trap.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from pettingzoo import ParallelEnv

# Observation and state of every game: a constant, so the policy is just its bias.
_CONSTANT_OBS = 1.0


def _agent_names(n_agents: int) -> list[str]:
    return [f"agent_{i}" for i in range(n_agents)]


def _normal_pdf(x: np.ndarray, mean: float | np.ndarray, std: float | np.ndarray) -> np.ndarray:
    """Density of ``Normal(mean, std)`` at ``x`` (numpy only: scipy is not a runtime dependency)."""
    z = (x - mean) / std
    return np.exp(-0.5 * z * z) / (std * math.sqrt(2.0 * math.pi))


class _OneShotGame(ParallelEnv[str, np.ndarray, Any]):
    """Shared one-step episode logic: constant observations, team reward, everyone done after one step.

    Subclasses set the action spaces and implement :meth:`_team_reward`.

    :param n_agents: Number of agents.
    """

    metadata: dict[str, Any] = {"name": "one_shot_game", "render_modes": []}

    def __init__(self, n_agents: int) -> None:
        if n_agents < 1:
            raise ValueError(f"n_agents must be >= 1, got {n_agents}")
        self.possible_agents: list[str] = _agent_names(n_agents)
        self.agents: list[str] = []
        self.render_mode: str | None = None
        # Spaces live in dicts: PettingZoo requires observation_space(agent) to return the same object each call.
        self.observation_spaces: dict[str, spaces.Space] = {
            agent: spaces.Box(low=_CONSTANT_OBS, high=_CONSTANT_OBS, shape=(1,), dtype=np.float32)
            for agent in self.possible_agents
        }
        self.action_spaces: dict[str, spaces.Space] = {}
        self.state_space = spaces.Box(low=_CONSTANT_OBS, high=_CONSTANT_OBS, shape=(1,), dtype=np.float32)
        self.np_random, _ = seeding.np_random(None)

    def observation_space(self, agent: str) -> spaces.Space:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Space:
        return self.action_spaces[agent]

    def state(self) -> np.ndarray:
        """The global state: the same constant as the observations.

        :return: Array of shape ``state_space.shape``.
        """
        return np.full(self.state_space.shape, _CONSTANT_OBS, dtype=np.float32)

    def _observations(self) -> dict[str, np.ndarray]:
        return {agent: np.full((1,), _CONSTANT_OBS, dtype=np.float32) for agent in self.possible_agents}

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        """Start a new (one-step) episode.

        :param seed: Seeds ``np_random``; the games themselves are deterministic.
        :param options: Unused, accepted for API compatibility.
        :return: Observations and infos for every agent.
        """
        if seed is not None:
            self.np_random, _ = seeding.np_random(seed)
        self.agents = list(self.possible_agents)
        return self._observations(), {agent: {} for agent in self.agents}

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[
        dict[str, np.ndarray],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        """Play the joint action; the episode ends with this step.

        :param actions: One action per agent in ``possible_agents``.
        :return: Observations, rewards, terminations, truncations, infos; ``env.agents`` is empty afterwards.
        """
        if not self.agents:
            raise RuntimeError(f"{type(self).__name__}.step() called on a finished episode: call reset() first")
        missing = [agent for agent in self.possible_agents if agent not in actions]
        if missing:
            raise ValueError(f"every agent acts in this game; missing actions for {missing}")
        reward, joint_action = self._team_reward([actions[agent] for agent in self.possible_agents])
        agents = self.agents
        self.agents = []
        info = {"joint_action": joint_action}
        return (
            self._observations(),
            dict.fromkeys(agents, reward),
            dict.fromkeys(agents, True),
            dict.fromkeys(agents, False),
            {agent: dict(info) for agent in agents},
        )

    def _team_reward(self, actions: list[Any]) -> tuple[float, np.ndarray]:
        """Team reward of a joint action, and the joint action actually played (recorded in the infos)."""
        raise NotImplementedError

    def render(self) -> None:
        """Nothing to render (``metadata["render_modes"]`` is empty)."""
        return None

    def close(self) -> None:
        pass


def differential_reward(joint_action: np.ndarray) -> np.ndarray:
    """Team reward of the differential game for joint actions already offset and clipped to ``[0, 7]``.

    ``R(a) = 10 * N(a; 5, sigma_g) + 0.1 * a_0 + 5.3 * N(a; 1, 1)`` where ``N(a; m, s)`` is the product over
    agents of 1-D normal densities ``pdf(a_i; m, s_i)``; the global peak's sigmas are ``(1, 3, 1, 3, ...)``
    and the local peak's all 1. For two agents this is the paper's
    ``10 N(5, 5; 1, 3) + 0.1 a1 + 5.3 N(1, 1; 1, 1)``.

    :param joint_action: Array of shape ``(..., n_agents)``.
    :return: Rewards of shape ``joint_action.shape[:-1]``.
    """
    a = np.asarray(joint_action, dtype=np.float64)
    n_agents = a.shape[-1]
    global_std = np.where(np.arange(n_agents) % 2 == 0, 1.0, 3.0)
    global_peak = np.prod(_normal_pdf(a, DifferentialGame.GLOBAL_MEAN, global_std), axis=-1)
    local_peak = np.prod(_normal_pdf(a, DifferentialGame.LOCAL_MEAN, 1.0), axis=-1)
    return (
        DifferentialGame.GLOBAL_WEIGHT * global_peak
        + DifferentialGame.LINEAR_WEIGHT * a[..., 0]
        + DifferentialGame.LOCAL_WEIGHT * local_peak
    )


class DifferentialGame(_OneShotGame):
    """The bimodal differential game of the paper (one step, continuous actions, team reward).

    Two agents: ``R(a1, a2) = 10 N(5, 5; 1, 3) + 0.1 a1 + 5.3 N(1, 1; 1, 1)``, with ``N(m1, m2; s1, s2)``
    the product of two 1-D normal densities. Maxima on ``[0, 7]^2`` (numerical): global
    ``R = 1.0400`` at ``(5.192, 5.000)``, local ``R = 0.9496`` at ``(1.120, 1.000)``.

    With ``n_agents > 2`` the global peak is centred at 5 for every agent with per-agent sigmas
    ``(1, 3, 1, 3, ...)``, the local peak at 1 with sigma 1 for every agent, the coefficients stay
    (10, 0.1, 5.3) and the linear term ``0.1 * a_0`` stays on agent 0 only. The peaks are products of
    more densities, so the reward values shrink with ``n_agents`` (see :func:`differential_reward`).

    Each agent's action is a 1-D ``Box``; the env plays ``clip(action + init_action, 0, 7)``, so a
    fresh zero-mean policy starts near ``init_action`` (default 1.5: near the local optimum). The
    Box is ``[-init_action, 7 - init_action]``: exactly the actions that map onto ``[0, 7]``, so a
    Gaussian policy whose samples are clipped to the Box bounds can reach the whole game domain.
    Observation and state: the constant 1 (shape ``(1,)``). The played joint action is in
    ``infos[agent]["joint_action"]``.

    :param n_agents: Number of agents (>= 1; the paper uses 2).
    :param init_action: Offset added to every action before clipping to ``[0, 7]``.
    """

    metadata: dict[str, Any] = {"name": "differential_game", "render_modes": []}

    ACTION_LOW = 0.0
    ACTION_HIGH = 7.0
    GLOBAL_WEIGHT = 10.0
    GLOBAL_MEAN = 5.0
    LINEAR_WEIGHT = 0.1
    LOCAL_WEIGHT = 5.3
    LOCAL_MEAN = 1.0

    def __init__(self, n_agents: int = 2, init_action: float = 1.5) -> None:
        super().__init__(n_agents)
        self.n_agents = n_agents
        self.init_action = float(init_action)
        low, high = self.ACTION_LOW - self.init_action, self.ACTION_HIGH - self.init_action
        self.action_spaces = {
            agent: spaces.Box(low=low, high=high, shape=(1,), dtype=np.float32) for agent in self.possible_agents
        }

    def game_action(self, action: Any) -> float:
        """The action actually played for a raw policy action: offset by ``init_action``, clipped to ``[0, 7]``.

        :param action: A scalar or a one-element array.
        """
        value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        return float(np.clip(value + self.init_action, self.ACTION_LOW, self.ACTION_HIGH))

    def _team_reward(self, actions: list[Any]) -> tuple[float, np.ndarray]:
        joint_action = np.array([self.game_action(action) for action in actions], dtype=np.float64)
        return float(differential_reward(joint_action)), joint_action


class MatrixGame(_OneShotGame):
    """A two-agent cooperative matrix game: agent 0 picks the row, agent 1 the column, both get the entry.

    Actions are ``Discrete(n_rows)`` and ``Discrete(n_cols)``; observation and state are the constant 1
    (shape ``(1,)``); the team reward is ``payoff[a0, a1]``. The played joint action is in
    ``infos[agent]["joint_action"]``.

    :param payoff: The payoff matrix, shape ``(n_rows, n_cols)``.
    :param name: The env's ``metadata["name"]``.
    """

    metadata: dict[str, Any] = {"name": "matrix_game", "render_modes": []}

    def __init__(self, payoff: np.ndarray, name: str = "matrix_game") -> None:
        payoff = np.array(payoff, dtype=np.float64)
        if payoff.ndim != 2 or min(payoff.shape) < 1:
            raise ValueError(f"payoff must be a non-empty 2-D matrix, got shape {payoff.shape}")
        super().__init__(n_agents=2)
        self.payoff = payoff
        # Instance-level metadata so climbing and penalty games report their own names.
        self.metadata = {"name": name, "render_modes": []}
        self.action_spaces = {
            agent: spaces.Discrete(n) for agent, n in zip(self.possible_agents, payoff.shape, strict=True)
        }

    @property
    def optimal_value(self) -> float:
        """The best team reward of any joint action."""
        return float(self.payoff.max())

    @property
    def optimal_joint_actions(self) -> list[tuple[int, int]]:
        """Every joint action reaching :attr:`optimal_value`."""
        return [(int(i), int(j)) for i, j in np.argwhere(self.payoff == self.payoff.max())]

    def _team_reward(self, actions: list[Any]) -> tuple[float, np.ndarray]:
        joint_action = np.array([int(np.asarray(action).reshape(-1)[0]) for action in actions], dtype=np.int64)
        for agent, action, n in zip(self.possible_agents, joint_action, self.payoff.shape, strict=True):
            if not 0 <= action < n:
                raise ValueError(f"action {action} of {agent} is outside Discrete({n})")
        return float(self.payoff[joint_action[0], joint_action[1]]), joint_action


CLIMBING_PAYOFF = np.array([[11.0, -30.0, 0.0], [-30.0, 7.0, 6.0], [0.0, 0.0, 5.0]])


def climbing_game() -> MatrixGame:
    """The climbing game (Claus & Boutilier, 1998): ``[[11, -30, 0], [-30, 7, 6], [0, 0, 5]]``.

    Optimum 11 at joint action ``(0, 0)``; the trap is that miscoordinating around it costs -30, so
    independent learners drift to ``(1, 1)`` (7) or ``(2, 2)`` (5).

    :return: A :class:`MatrixGame` named ``climbing_game``.
    """
    return MatrixGame(CLIMBING_PAYOFF, name="climbing_game")


def penalty_game(k: float = -100.0) -> MatrixGame:
    """The penalty game: ``[[k, 0, 10], [0, 2, 0], [10, 0, k]]`` with a miscoordination penalty ``k <= 0``.

    Optimum 10 at joint actions ``(0, 2)`` and ``(2, 0)``; the safe choice ``(1, 1)`` gives 2, and
    picking different optimal actions costs ``k``.

    :param k: The penalty (default -100).
    :return: A :class:`MatrixGame` named ``penalty_game``.
    """
    payoff = np.array([[k, 0.0, 10.0], [0.0, 2.0, 0.0], [10.0, 0.0, k]], dtype=np.float64)
    return MatrixGame(payoff, name="penalty_game")
