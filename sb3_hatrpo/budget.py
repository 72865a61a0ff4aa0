"""The training budget of ``HATRPO.learn()`` and ``train -n``: its default and its check."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["DEFAULT_TOTAL_TIMESTEPS", "check_total_timesteps", "default_total_timesteps"]

# The zoo config's ``default`` entry has the same value
DEFAULT_TOTAL_TIMESTEPS = 1_000_000


def check_total_timesteps(value: Any, name: str = "total_timesteps") -> int:
    """``value`` as an ``int``; ``ValueError`` unless it is a positive whole number (``1e6`` is accepted).

    :param value: The budget.
    :param name: How the message calls it.
    :return: The budget as an ``int``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive whole number of timesteps, got {value!r}")
    if not float(value).is_integer() or value <= 0:
        raise ValueError(f"{name} must be a positive whole number of timesteps, got {value!r}")
    return int(float(value))


def default_total_timesteps(env_id: str | None) -> tuple[int, str]:
    """The budget for ``learn()`` without one, and where it comes from.

    :param env_id: The env id the model was made from (None if it was not made from an id).
    :return: The zoo config's ``n_timesteps`` for a known env id, else :data:`DEFAULT_TOTAL_TIMESTEPS`; and a
        description of the source for messages.
    """
    if env_id is not None:
        try:
            from sb3_hatrpo.zoo.config import DEFAULT_CONFIG_PATH, load_yaml
        except ImportError:  # pyyaml missing: no config to read
            pass
        else:
            entry = (load_yaml(DEFAULT_CONFIG_PATH) or {}).get(env_id)
            if isinstance(entry, dict) and entry.get("n_timesteps") is not None:
                return int(float(entry["n_timesteps"])), f"n_timesteps of {env_id!r} in the zoo config hatrpo.yml"
    return DEFAULT_TOTAL_TIMESTEPS, "the default budget"
