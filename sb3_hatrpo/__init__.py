"""sb3_hatrpo: HATRPO and its joint-KL-budget allocators for Stable-Baselines3 and PettingZoo."""

from pathlib import Path

from sb3_hatrpo.allocators import BaseAllocator, GreedyAllocator, KKTAllocator, UniformAllocator, kkt_thresholds
from sb3_hatrpo.evaluation import evaluate_policy
from sb3_hatrpo.hatrpo import HATRPO
from sb3_hatrpo.policies import HATRPOPolicy, MlpPolicy
from sb3_hatrpo.vec_env import MultiAgentVecEnv, make_vec_env

__version__ = (Path(__file__).parent / "version.txt").read_text().strip()

__all__ = [
    "HATRPO",
    "BaseAllocator",
    "GreedyAllocator",
    "HATRPOPolicy",
    "KKTAllocator",
    "MlpPolicy",
    "MultiAgentVecEnv",
    "UniformAllocator",
    "__version__",
    "evaluate_policy",
    "kkt_thresholds",
    "make_vec_env",
]
