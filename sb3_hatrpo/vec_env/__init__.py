"""Vectorised PettingZoo ParallelEnvs: ``n_envs`` copies stepped as one SB3 ``VecEnv``.

Observations, actions and their spaces are dicts keyed by agent; rewards are one team reward per copy; a copy
whose episode ends is reset at once (SB3's auto-reset) and the step's ``infos`` describe the episode that ended.
See ``docs/internals.md`` ("Vectorised environments") for the contract.

One module per role:

* ``layout``: what each agent's observation and action look like once vectorised, and the preallocated storage;
* ``runner``: one copy, stepped and auto-reset, writing into its storage views;
* ``base``: :class:`MultiAgentVecEnv`, the contract shared by both implementations;
* ``dummy``: :class:`DummyMultiAgentVecEnv`, every copy in this process;
* ``worker``: the subprocess side (byte codec of step messages, worker loop);
* ``subproc``: :class:`SubprocMultiAgentVecEnv`, one worker process per copy;
* ``factory``: :func:`make_vec_env`;
* ``checks``: env outputs against the declared spaces and ``possible_agents``;
* ``errors``: :class:`NonFiniteError`, :class:`EnvOutputError`, :class:`EnvTimeoutError`.
"""

from sb3_hatrpo.action_spaces import SUPPORTED_ACTION_SPACES
from sb3_hatrpo.vec_env.base import REWARD_AGGREGATIONS, MultiAgentVecEnv
from sb3_hatrpo.vec_env.dummy import DummyMultiAgentVecEnv
from sb3_hatrpo.vec_env.errors import EnvOutputError, EnvTimeoutError, NonFiniteError
from sb3_hatrpo.vec_env.factory import make_vec_env
from sb3_hatrpo.vec_env.subproc import SubprocMultiAgentVecEnv

__all__ = [
    "REWARD_AGGREGATIONS",
    "SUPPORTED_ACTION_SPACES",
    "DummyMultiAgentVecEnv",
    "EnvOutputError",
    "EnvTimeoutError",
    "MultiAgentVecEnv",
    "NonFiniteError",
    "SubprocMultiAgentVecEnv",
    "make_vec_env",
]
