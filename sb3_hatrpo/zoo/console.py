"""What ``python -m sb3_hatrpo.train`` prints while training: a short version of SB3's logger table."""

from __future__ import annotations

import sys
from typing import Any

from stable_baselines3.common.logger import HumanOutputFormat

__all__ = ["ShortTableFormat"]


class ShortTableFormat(HumanOutputFormat):
    """SB3's stdout table without the per-agent figures (``train/<agent>/...``).

    Those are two thirds of each table with two agents and grow with every agent; they stay in
    ``progress.csv`` (``plot kl`` draws them), W&B and TensorBoard, and the final summary prints the last
    iteration's. ``--verbose 2`` prints the full table.

    :param file: Where to print (default stdout).
    """

    def __init__(self, file: Any = None) -> None:
        super().__init__(file if file is not None else sys.stdout)

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        short = {key: value for key, value in key_values.items() if key.count("/") < 2}
        super().write(short, {key: key_excluded.get(key, ()) for key in short}, step)
