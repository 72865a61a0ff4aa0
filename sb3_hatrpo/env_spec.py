"""How a model's env was made (an env id, its ``env_kwargs`` and wrapper), so a saved model can rebuild it.

``make_vec_env`` records the id, keyword arguments and wrapper on the vectorised env it makes from an id;
``HATRPO`` copies them and saves them with the model. ``HATRPO.load(path, env=<the same id>)`` then applies the
saved ``env_kwargs`` (the caller's override them), ``model.make_env()`` builds new copies, and a space mismatch
names the ``env_kwargs`` that differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EnvSpec", "kwargs_difference", "mismatch_hint"]


@dataclass
class EnvSpec:
    """An env id with the keyword arguments and wrapper it was made with.

    :param env_id: The id for :func:`sb3_hatrpo.envs.make_env`.
    :param env_kwargs: Its keyword arguments.
    :param wrapper: Applied to each ParallelEnv (e.g. the zoo config's ``env_wrapper``), or None.
    """

    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    wrapper: Callable[[Any], Any] | None = None

    @classmethod
    def of(cls, env: Any) -> EnvSpec | None:
        """The spec recorded on a vectorised env by ``make_vec_env`` (None if it was not made from an id).

        :param env: A vectorised env (or anything: None is returned for envs without a spec).
        """
        spec = getattr(env, "env_spec", None)
        return spec if isinstance(spec, EnvSpec) else None

    def with_kwargs(self, overrides: Mapping[str, Any] | None) -> EnvSpec:
        """A copy whose ``env_kwargs`` are updated by ``overrides``.

        :param overrides: Keyword arguments replacing or adding to the recorded ones.
        """
        return EnvSpec(self.env_id, {**self.env_kwargs, **(overrides or {})}, self.wrapper)


def kwargs_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keyword arguments that differ, as ``"key=saved (model) vs current (env)"`` strings.

    :param saved: The model's env_kwargs.
    :param current: The env's.
    """
    differences = []
    for key in sorted(set(saved) | set(current), key=str):
        mine = repr(saved[key]) if key in saved else "unset"
        theirs = repr(current[key]) if key in current else "unset"
        if mine != theirs:
            differences.append(f"{key}={mine} (model) vs {theirs} (env)")
    return differences


def mismatch_hint(saved: EnvSpec | None, env: Any, model_path: Any = None) -> str:
    """What to tell a user whose env's spaces differ from a saved model's: the env_kwargs that differ.

    :param saved: The model's env spec (None for a model saved without one).
    :param env: The vectorised env the model was loaded with.
    :param model_path: The model file, to point to the run's ``config.yml`` when the model has no spec.
    :return: A sentence to append to the error message ("" when there is nothing to add).
    """
    current = EnvSpec.of(env)
    if saved is None:
        config = _run_config(model_path)
        if config is not None:
            return (
                f" The run's env settings are in {config}: pass its env_kwargs, e.g. "
                "HATRPO.load(path, env=env_id, env_kwargs={...})."
            )
        return ""
    if current is not None and current.env_id == saved.env_id:
        differences = kwargs_difference(saved.env_kwargs, current.env_kwargs)
        if differences:
            return f" The env_kwargs differ: {'; '.join(differences)}."
        return ""
    return (
        f" The model was trained on {saved.env_id!r} with env_kwargs {saved.env_kwargs}; "
        f"model.make_env() builds that env, or pass env={saved.env_id!r} to load()."
    )


def _run_config(model_path: Any) -> Path | None:
    """``<run>/<env>/config.yml`` next to a model file of rl-zoo's layout, if there is one."""
    if not isinstance(model_path, str | Path):
        return None
    run_dir = Path(model_path).parent
    configs = sorted(run_dir.glob("*/config.yml"))
    return configs[0] if configs else None
