"""The action spaces HATRPO supports: one check shared by the policies and the vectorised envs."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

SUPPORTED_ACTION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete)
SUPPORTED_ACTION_SPACES_TEXT = "Box with finite bounds (diagonal Gaussian), Discrete or MultiDiscrete (categorical)"


def check_action_space(agent: str, action_space: spaces.Space) -> None:
    """Raise a ``ValueError`` naming the agent if HATRPO cannot act in its action space.

    :param agent: The agent's name (for the message).
    :param action_space: Its action space.
    """
    if not isinstance(action_space, SUPPORTED_ACTION_SPACES):
        raise ValueError(
            f"Agent {agent!r} has the action space {action_space}, which is not supported; supported action spaces: "
            f"{SUPPORTED_ACTION_SPACES_TEXT}. Flatten Dict/Tuple action spaces with a wrapper first."
        )
    if isinstance(action_space, spaces.Box) and not (
        np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))
    ):
        # Gaussian samples are clipped to the bounds before stepping
        raise ValueError(
            f"Agent {agent!r} has the action space {action_space} with infinite bounds; actions are clipped to the "
            "bounds before stepping, so they must be finite (rescale the actions in a wrapper)."
        )
