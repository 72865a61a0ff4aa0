"""Small trust-region problems shared by the unit tests: tiny actors on random data."""

import numpy as np
import torch as th
from gymnasium import spaces

from sb3_hatrpo.policies import Actor
from sb3_hatrpo.trust_region import TrustRegionPlanner

OBS_SPACE = spaces.Box(-1.0, 1.0, (3,), np.float32)


def make_problem(
    n_agents: int = 2, n: int = 256, seed: int = 0, action_space: spaces.Space | None = None, net_arch=(8,)
) -> tuple[dict, dict, dict, dict, th.Tensor]:
    """Tiny actors on random data, with an advantage that rewards a direction of each agent's action."""
    th.manual_seed(seed)
    action_space = action_space or spaces.Box(-1.0, 1.0, (2,), np.float32)
    actors, obs, actions, alive = {}, {}, {}, {}
    for i in range(n_agents):
        agent = f"agent_{i}"
        actors[agent] = Actor(OBS_SPACE, action_space, list(net_arch), log_std_init=-0.5)
        obs[agent] = th.rand(n, 3) * 2 - 1
        with th.no_grad():
            actions[agent] = actors[agent].distribution(obs[agent]).sample()
        alive[agent] = th.ones(n)
    score = sum(actions[a].float().reshape(n, -1)[:, 0] * (i + 1) for i, a in enumerate(actors))
    advantages = (score - score.mean()) / score.std()
    return actors, obs, actions, alive, advantages


def planner_for(problem, total_kl=0.02, **kwargs) -> TrustRegionPlanner:
    actors, obs, actions, alive, advantages = problem
    return TrustRegionPlanner(actors, obs, actions, alive, advantages, total_kl=total_kl, **kwargs)
