"""Optuna search spaces for HATRPO (rl-zoo's ``hyperparams_opt.py`` for this package).

:func:`sample_hatrpo_params` returns hyperparameters in *config form* (what ``zoo_configs/hatrpo.yml``
holds: ``activation_fn: tanh``, ``net_arch: [64, 64]``), so the best trial can be written out as a
config entry and goes through :func:`sb3_hatrpo.zoo.config.prepare_hyperparams` like any config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

__all__ = ["HYPERPARAMS_SAMPLER", "NET_ARCHS", "sample_hatrpo_params"]

NET_ARCHS: dict[str, list[int]] = {"tiny": [32], "small": [64, 64], "medium": [128, 128], "large": [128, 128, 128]}


def sample_hatrpo_params(
    trial: optuna.Trial, allocator: str | None = None, fixed: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sample HATRPO hyperparameters: trust region, allocator and its options, rollout, critic, CG, network.

    Ranges: ``target_kl`` log-uniform in [1e-3, 5e-2] (HARL's tuned values 0.001-0.01 inside it);
    ``allocator`` among uniform / kkt / greedy with their options; ``n_steps``, ``gamma``,
    ``gae_lambda``; the critic's ``learning_rate``, ``n_critic_updates`` and ``batch_size``;
    ``cg_max_steps``; ``net_arch`` and ``activation_fn``.

    :param trial: the Optuna trial (or ``optuna.trial.FixedTrial`` to rebuild a trial's hyperparameters)
    :param allocator: sample only this allocator's options instead of the allocator itself
    :param fixed: hyperparameters that are not sampled (e.g. from ``-params``); ``policy_kwargs`` in it
        fixes the network
    :return: hyperparameters in config form
    """
    from sb3_hatrpo.zoo.config import canonical_allocator

    fixed = fixed or {}
    params: dict[str, Any] = {}

    def choose(name: str, sample: Callable[[], Any]) -> None:
        if name not in fixed:
            params[name] = sample()

    choose("target_kl", lambda: trial.suggest_float("target_kl", 1e-3, 5e-2, log=True))
    if allocator is None and "allocator" in fixed:
        allocator = str(fixed["allocator"])
    if allocator is None:
        allocator = str(trial.suggest_categorical("allocator", ["uniform", "kkt", "greedy"]))
        params["allocator"] = allocator
    allocator = canonical_allocator(allocator)
    if "allocator_kwargs" not in fixed:
        options: dict[str, Any] = {}
        if allocator == "kkt":
            options["min_kl_fraction"] = trial.suggest_float("min_kl_fraction", 0.0, 1.0)
            options["pass_unused_budget"] = trial.suggest_categorical("kkt_pass_unused_budget", [False, True])
            options["potential_smoothing"] = trial.suggest_categorical("potential_smoothing", [0.0, 0.5, 0.9])
        elif allocator == "greedy":
            options["eps"] = trial.suggest_float("eps", 1e-8, 1e-3, log=True)
        else:
            options["pass_unused_budget"] = trial.suggest_categorical("uniform_pass_unused_budget", [False, True])
        params["allocator_kwargs"] = options

    choose("n_steps", lambda: trial.suggest_categorical("n_steps", [64, 128, 256, 512, 1024, 2048]))
    choose("gamma", lambda: trial.suggest_categorical("gamma", [0.9, 0.95, 0.98, 0.99, 0.995, 0.999]))
    choose("gae_lambda", lambda: trial.suggest_categorical("gae_lambda", [0.8, 0.9, 0.92, 0.95, 0.98, 0.99, 1.0]))
    choose("learning_rate", lambda: trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True))
    choose("n_critic_updates", lambda: trial.suggest_categorical("n_critic_updates", [1, 5, 10, 20]))
    choose("batch_size", lambda: trial.suggest_categorical("batch_size", [32, 64, 128, 256, 512]))
    choose("cg_max_steps", lambda: trial.suggest_categorical("cg_max_steps", [5, 10, 15, 20, 25, 30]))
    if "policy_kwargs" not in fixed:
        net_arch = str(trial.suggest_categorical("net_arch", list(NET_ARCHS)))
        activation = str(trial.suggest_categorical("activation_fn", ["tanh", "relu"]))
        params["policy_kwargs"] = {"net_arch": list(NET_ARCHS[net_arch]), "activation_fn": activation}
    return params


HYPERPARAMS_SAMPLER: dict[str, Callable[..., dict[str, Any]]] = {"hatrpo": sample_hatrpo_params}
