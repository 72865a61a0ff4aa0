"""Atomic file writes that leave nothing behind: write a hidden temporary file, rename it into place.

A writer holds an exclusive ``flock`` on its temporary file while it writes. A process killed in the
middle (SIGKILL, power loss) cannot remove its temporary file, but its lock dies with it, so the next
write to the same folder can tell an orphan (lock free) from a write in progress in another process
(lock held) and removes only the orphans.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # Windows: no orphan detection, temporary files of killed writers stay
    fcntl = None  # type: ignore[assignment]

__all__ = ["TMP_SUFFIX", "atomic_write", "remove_orphans"]

TMP_SUFFIX = ".tmp.zip"


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock of an open file without waiting; False if another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_orphans(folder: pathlib.Path, keep: str | None = None) -> list[pathlib.Path]:
    """Remove the temporary files of interrupted writes in ``folder`` (those whose writer's lock is gone).

    :param folder: where to look
    :param keep: a file name to leave alone (the caller's own temporary file)
    :return: the files removed
    """
    removed = []
    for candidate in folder.glob(f".*{TMP_SUFFIX}"):
        if candidate.name == keep:
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:  # gone already, or not ours to read
            continue
        try:
            if _try_lock(fd):
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
        finally:
            os.close(fd)
    return removed


def atomic_write(target: pathlib.Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary path)``, then rename the file onto ``target``; on any error remove it.

    :param target: the final path
    :param write: writes the complete file at the path it is given
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    try:
        _try_lock(fd)  # held until the file is renamed: marks it as a write in progress
        remove_orphans(target.parent, keep=pathlib.Path(tmp_name).name)
        write(tmp_name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; a saved model is an ordinary file
        os.replace(tmp_name, target)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
