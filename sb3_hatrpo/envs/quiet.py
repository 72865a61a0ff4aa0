"""Targeted silencing of two notices every MaMuJoCo command printed, neither about anything the user can act on.

* gymnasium-robotics prints, on import, that its Adroit hand envs changed reward functions (not used here).
* MuJoCo warns, when compiling the HalfCheetah model, that the XML's ``settotalmass`` attribute is deprecated
  (gymnasium-robotics' asset, not ours).

Only messages containing these fragments are dropped; anything else is passed on unchanged.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Iterator

__all__ = [
    "ADROIT_NOTICE",
    "SETTOTALMASS_WARNING",
    "mujoco_warning_filter",
    "without_mujoco_warnings",
    "without_stderr_lines",
]

ADROIT_NOTICE = "environment's reward functions were updated in v1.2.1"
SETTOTALMASS_WARNING = "compiler attribute 'settotalmass' is deprecated"


@contextlib.contextmanager
def without_stderr_lines(*fragments: str) -> Iterator[None]:
    """Hold back what Python code writes to ``sys.stderr`` in the block; write it back without the lines that
    contain one of ``fragments``.

    :param fragments: Text identifying the lines to drop.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if not any(f in line for f in fragments)]
        if kept:
            sys.stderr.write("".join(kept))


def mujoco_warning_filter(fragments: tuple[str, ...], previous: Callable[[str], None] | None) -> Callable[[str], None]:
    """A MuJoCo warning handler dropping the messages with one of ``fragments`` and passing on the others.

    :param fragments: Text identifying the messages to drop.
    :param previous: The handler to pass the others to; None prints them as MuJoCo does.
    """

    def handler(message: str) -> None:
        if any(fragment in message for fragment in fragments):
            return
        if previous is not None:
            previous(message)
        else:
            print(f"WARNING: {message}", file=sys.stderr)

    return handler


@contextlib.contextmanager
def without_mujoco_warnings(*fragments: str) -> Iterator[None]:
    """Drop the MuJoCo warnings (``mju_warning``) that contain one of ``fragments`` during the block.

    :param fragments: Text identifying the warnings to drop.
    """
    import mujoco

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(mujoco_warning_filter(fragments, previous))
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)
