"""Evaluate a trained multi-agent policy: SB3's ``evaluate_policy`` for ``{agent: obs}`` envs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from sb3_hatrpo.vec_env import MultiAgentVecEnv, make_vec_env

__all__ = ["evaluate_policy"]


def evaluate_policy(
    model: Any,
    env: Any,
    n_eval_episodes: int = 10,
    deterministic: bool = True,
    render: bool = False,
    callback: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    reward_threshold: float | None = None,
    return_episode_rewards: bool = False,
) -> tuple[float, float] | tuple[list[float], list[int]]:
    """Run ``n_eval_episodes`` episodes of the model's joint policy and return the team returns.

    Mirrors ``stable_baselines3.common.evaluation.evaluate_policy``: with several env copies, the
    episodes are spread evenly over them (copy ``i`` runs ``(n_eval_episodes + i) // n_envs``), so
    short episodes do not crowd out long ones. Returns and lengths are the env's own episode
    statistics (``info["episode"]``, written by :class:`~sb3_hatrpo.MultiAgentVecEnv` at every
    episode end), so they count every step regardless of wrappers.

    :param model: a :class:`~sb3_hatrpo.HATRPO` (anything with ``predict({agent: obs}, deterministic=...)``
        and, for the space check, ``observation_space``/``action_space`` dicts)
    :param env: a :class:`~sb3_hatrpo.MultiAgentVecEnv`, or anything ``HATRPO`` accepts (an env id, a
        PettingZoo env, a factory), vectorised here with one copy and closed afterwards
    :param n_eval_episodes: episodes to run
    :param deterministic: the mode of each agent's action distribution instead of a sample
    :param render: render copy 0 after every step
    :param callback: called after every step with ``locals()`` and ``globals()``, as SB3's
    :param reward_threshold: if given, raise ``AssertionError`` when the mean return is below it
    :param return_episode_rewards: return the per-episode returns and lengths instead of mean and std
    :return: ``(mean_return, std_return)``, or ``(returns, lengths)`` with ``return_episode_rewards``
    :raises ValueError: if the env's agents or spaces differ from the model's (the message names the agent)
    """
    if n_eval_episodes < 1:
        raise ValueError(f"n_eval_episodes must be at least 1, got {n_eval_episodes}")
    owns_env = not isinstance(env, MultiAgentVecEnv)
    vec_env: MultiAgentVecEnv = env if not owns_env else make_vec_env(env, n_envs=1)
    try:
        _check_spaces(model, vec_env)
        returns, lengths = _run_episodes(model, vec_env, n_eval_episodes, deterministic, render, callback)
    finally:
        if owns_env:
            vec_env.close()

    mean_return, std_return = float(np.mean(returns)), float(np.std(returns))
    if reward_threshold is not None:
        assert mean_return >= reward_threshold, (
            f"Mean return below threshold: {mean_return:.2f} < {reward_threshold:.2f}"
        )
    if return_episode_rewards:
        return returns, lengths
    return mean_return, std_return


def _check_spaces(model: Any, env: MultiAgentVecEnv) -> None:
    """Fail with the agent's name before any step if the model was trained on other spaces."""
    observation_space = getattr(model, "observation_space", None)
    action_space = getattr(model, "action_space", None)
    if observation_space is None or action_space is None or not hasattr(observation_space, "spaces"):
        return
    from sb3_hatrpo.hatrpo import check_agent_spaces

    state_space = getattr(model, "state_space", None)
    check_agent_spaces(
        env, observation_space, action_space, state_space if state_space is not None else env.state_space
    )


def _run_episodes(
    model: Any,
    env: MultiAgentVecEnv,
    n_eval_episodes: int,
    deterministic: bool,
    render: bool,
    callback: Callable[[dict[str, Any], dict[str, Any]], None] | None,
) -> tuple[list[float], list[int]]:
    n_envs = env.num_envs
    episode_counts = np.zeros(n_envs, dtype=int)
    episode_count_targets = np.array([(n_eval_episodes + i) // n_envs for i in range(n_envs)], dtype=int)
    current_rewards = np.zeros(n_envs)
    current_lengths = np.zeros(n_envs, dtype=int)
    returns: list[float] = []
    lengths: list[int] = []
    warned = False

    observations = env.reset()
    while (episode_counts < episode_count_targets).any():
        actions, _ = model.predict(observations, deterministic=deterministic)
        observations, rewards, dones, infos = env.step(actions)
        current_rewards += rewards
        current_lengths += 1
        for i in range(n_envs):
            if episode_counts[i] >= episode_count_targets[i]:
                continue
            if callback is not None:
                callback(locals(), globals())
            if dones[i]:
                episode = infos[i].get("episode")
                if episode is not None:
                    returns.append(float(episode["r"]))
                    lengths.append(int(episode["l"]))
                else:
                    if not warned:
                        warnings.warn(
                            "The env gave no info['episode'] at an episode end: returns are summed here instead "
                            "(they miss steps a wrapper may hide).",
                            stacklevel=3,
                        )
                        warned = True
                    returns.append(float(current_rewards[i]))
                    lengths.append(int(current_lengths[i]))
                episode_counts[i] += 1
                current_rewards[i] = 0.0
                current_lengths[i] = 0
        if render:
            env.render()
    return returns, lengths
