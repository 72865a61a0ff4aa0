"""Environments: the id registry (``make_env``), PettingZoo conversion, the paper's games and the global state."""

from sb3_hatrpo.envs.games import (
    DifferentialGame,
    MatrixGame,
    climbing_game,
    differential_reward,
    penalty_game,
)
from sb3_hatrpo.envs.global_state import global_state, state_space_of
from sb3_hatrpo.envs.registry import KNOWN_PREFIXES, as_parallel_env, list_envs, make_env

__all__ = [
    "KNOWN_PREFIXES",
    "DifferentialGame",
    "MatrixGame",
    "as_parallel_env",
    "climbing_game",
    "differential_reward",
    "global_state",
    "list_envs",
    "make_env",
    "penalty_game",
    "state_space_of",
]
