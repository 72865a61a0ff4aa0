"""Torch's CPU thread count while a model trains or predicts, set for the call and restored afterwards.

HATRPO's networks are small MLPs: a forward/backward pass is far too short to split across threads, and on a
busy machine torch's extra threads spin waiting for cores, which made training 4-25x slower than on one thread
(``benchmarks/threads.py``). So the algorithm runs on ``DEFAULT_NUM_THREADS`` CPU threads unless told otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch as th

__all__ = ["DEFAULT_NUM_THREADS", "check_num_threads", "torch_threads"]

DEFAULT_NUM_THREADS = 1


def check_num_threads(num_threads: int | None) -> None:
    """Raise ``ValueError`` unless ``num_threads`` is None or a positive integer.

    :param num_threads: The thread count to check.
    """
    if num_threads is None:
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None (torch's setting), got {num_threads!r}")


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``, then restore the previous count.

    :param num_threads: Threads for the block; None leaves torch's setting alone.
    """
    previous = th.get_num_threads()
    if num_threads is None or num_threads == previous:
        yield
        return
    th.set_num_threads(num_threads)
    try:
        yield
    finally:
        th.set_num_threads(previous)
