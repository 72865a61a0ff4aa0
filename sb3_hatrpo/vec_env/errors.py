"""The error the vectorised envs raise for NaN or infinite env outputs, and the hint its messages end with."""

from __future__ import annotations

NON_FINITE_HINT = (
    "Hint: the env itself produced it, e.g. an unstable simulation (extreme actions, a diverging physics step) "
    "or a division by zero in its observation/reward code; reproduce it on the bare env with the same seed, "
    "or sanitise its outputs with a wrapper."
)


class NonFiniteError(ValueError):
    """A NaN or infinite observation, state or reward (a ``ValueError``; subprocess workers re-raise it as is)."""


class EnvOutputError(ValueError):
    """An env copy returned something its declared spaces or ``possible_agents`` do not allow: an agent name
    outside ``possible_agents``, no agents after ``reset()``, an observation of the wrong shape, type or range."""


class EnvTimeoutError(TimeoutError):
    """A subprocess env worker did not answer within the ``step_timeout`` of its vectorised env."""


# Errors a worker sends back by name so that the main process raises the same type (others become RuntimeError).
WORKER_ERRORS: dict[str, type[Exception]] = {"NonFiniteError": NonFiniteError, "EnvOutputError": EnvOutputError}
