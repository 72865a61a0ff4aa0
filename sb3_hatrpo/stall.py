"""A warning when training runs but no agent moves: every line search rejected its step for many iterations.

That happens with a KL budget too small for the line search to find an improving step, too few
line-search tries, or a surrogate that never improves; the loss curves then look normal while the
policies stay where they started.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["NoUpdateWarning", "StallDetector"]


class NoUpdateWarning(UserWarning):
    """No agent's trust-region step was accepted for ``patience`` consecutive iterations."""


class StallDetector:
    """Counts consecutive iterations without an accepted step and warns once when there are ``patience``.

    :param patience: iterations without any accepted step before the warning
    """

    def __init__(self, patience: int = 10) -> None:
        self.patience = patience
        self.idle_iterations = 0
        self.warned = False

    def update(self, results: Sequence[Any], settings: str) -> None:
        """Record one iteration.

        :param results: the iteration's ``StepResult``s (anything with ``accepted``)
        :param settings: the model's relevant settings, quoted in the warning
        """
        if any(result.accepted for result in results):
            self.idle_iterations = 0
            return
        self.idle_iterations += 1
        if self.idle_iterations >= self.patience and not self.warned:
            self.warned = True
            warnings.warn(
                f"No agent's trust-region step was accepted in the last {self.idle_iterations} iterations: the "
                f"policies are not changing ({settings}). Raise target_kl (or total_kl) or line_search_max_iter, "
                "or check that the advantages carry signal (rewards not constant).",
                NoUpdateWarning,
                stacklevel=2,
            )
