"""``SubprocMultiAgentVecEnv``: one worker process per copy (the main-process side of the pipe protocol)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import select
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper, VecEnvIndices, VecEnvStepReturn

from sb3_hatrpo.vec_env.base import MultiAgentVecEnv
from sb3_hatrpo.vec_env.errors import WORKER_ERRORS, EnvTimeoutError
from sb3_hatrpo.vec_env.worker import _STEP_BYTE, _PipeCodec, _worker


class SubprocMultiAgentVecEnv(MultiAgentVecEnv):
    """One worker process per copy (see :class:`MultiAgentVecEnv`), like SB3's ``SubprocVecEnv``.

    Worth it when one env step is expensive compared with a round trip through a pipe (MaMuJoCo with several
    copies) and there are free cores. An exception in a worker raises a ``RuntimeError`` here naming the worker
    and the original exception (with its traceback); non-finite values still raise ``ValueError``; a worker that
    died raises a ``RuntimeError`` naming the worker and its exit code. Nothing hangs on a dead worker: the main
    process waits on the pipe and on the process at once. NumPy scalars in the env's per-agent infos arrive as
    Python scalars.

    :param env_fns: One factory per copy, each returning a new PettingZoo ``ParallelEnv``; pickled with cloudpickle.
    :param reward_aggregation: ``"mean"`` (default) or ``"sum"``: the team reward when the agents' rewards
        differ (identical rewards give that value either way).
    :param start_method: The multiprocessing start method; ``"forkserver"`` where available, else ``"spawn"``.
        With those two, the script creating the env must be guarded by ``if __name__ == "__main__":``.
    :param close_timeout: Seconds to wait for the workers to exit on ``close()`` before terminating them.
    :param step_timeout: Seconds a worker may take to answer a ``reset()`` or ``step()``; a worker that takes
        longer (a hung env) is terminated and :class:`~sb3_hatrpo.vec_env.errors.EnvTimeoutError` names it.
        ``None`` (default): wait as long as the worker lives.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Any]],
        reward_aggregation: str = "mean",
        start_method: str | None = None,
        close_timeout: float = 5.0,
        step_timeout: float | None = None,
    ) -> None:
        if step_timeout is not None and not (isinstance(step_timeout, int | float) and step_timeout > 0):
            raise ValueError(f"step_timeout must be a positive number of seconds or None, got {step_timeout!r}")
        self.closed = False
        self.waiting = False
        self.close_timeout = close_timeout
        self.step_timeout = step_timeout
        self.remotes: list[Connection] = []
        self.processes: list[Any] = []
        self._pollers: list[Any] = []
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(start_method)
        try:
            for i, env_fn in enumerate(env_fns):
                remote, work_remote = context.Pipe()
                process = context.Process(  # type: ignore[attr-defined]
                    target=_worker,
                    args=(work_remote, remote, CloudpickleWrapper(env_fn), i),
                    daemon=True,  # if the main process dies, the workers go with it
                    name=f"sb3_hatrpo-env-{i}",
                )
                process.start()
                work_remote.close()
                self.remotes.append(remote)
                self.processes.append(process)
                self._pollers.append(_make_poller(remote, process))
            descriptions = [self._receive(i) for i in range(len(self.remotes))]
            super().__init__(descriptions, reward_aggregation)
            self._codec = _PipeCodec(self._layout)
            self._action_bytes, self._action_views = self._codec.action_buffer(self.num_envs)
            for i in range(self.num_envs):
                self._send(i, ("setup", (self._layout, reward_aggregation, self._t_start)))
            for i in range(self.num_envs):
                self._receive(i)
        except BaseException:
            self.close()
            raise

    # --- communication --------------------------------------------------------------------------------------

    def _died(self, i: int, error: BaseException | None = None) -> RuntimeError:
        process = self.processes[i]
        process.join(timeout=1.0)
        exitcode = process.exitcode
        how = f"exit code {exitcode}" if exitcode is None or exitcode >= 0 else f"killed by signal {-exitcode}"
        message = (
            f"Env worker {i} (pid {process.pid}) died ({how}) without answering: it was killed, or the env crashed "
            "the process (e.g. a segfault or running out of memory)."
        )
        return RuntimeError(message)

    def _receive_bytes(self, i: int, timeout: float | None = None, what: str = "") -> bytes:
        """The next message of worker ``i``; raises if it died (or takes longer than ``timeout`` s) instead of
        blocking forever."""
        remote, process, poller = self.remotes[i], self.processes[i], self._pollers[i]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not poller(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))):
            if not process.is_alive():
                raise self._died(i)
            if deadline is not None and time.monotonic() >= deadline:
                process.terminate()  # it would answer late and desynchronise the pipe; the env is unusable now
                process.join(timeout=1.0)
                raise EnvTimeoutError(
                    f"Env worker {i} (pid {process.pid}) did not answer {what} within step_timeout={timeout} s: its "
                    "env hangs (an endless loop, a deadlock or a blocking call). The worker was terminated; close() "
                    "this vectorised env and make a new one (or raise step_timeout if the env is just slow)."
                )
        try:
            return remote.recv_bytes()
        except (EOFError, OSError) as error:
            raise self._died(i) from error

    def _raise_reply(self, i: int, message: bytes) -> Any:
        """Unpickle a non-step reply: its payload if ``"ok"``, else raise the worker's error."""
        status, payload = pickle.loads(message)
        if status == "ok":
            return payload
        name, text, worker_traceback, known, context = payload
        if known:  # a user error with a complete message (non-finite or invalid env output): same type
            raise WORKER_ERRORS[name](text)
        raise RuntimeError(f"Env worker {i} raised {name} {context}: {text}\n\nWorker traceback:\n{worker_traceback}")

    def _receive(self, i: int) -> Any:
        return self._raise_reply(i, self._receive_bytes(i))

    def _receive_step(self, i: int) -> Any:
        """A step or reset reply: stores the arrays of copy ``i`` and returns the pickled rest."""
        message = self._receive_bytes(i, self.step_timeout, "a step or reset")
        if message[0] != _STEP_BYTE:
            return self._raise_reply(i, message)
        return self._codec.decode_reply(message, self._storage, i)

    def _receive_all_steps(self) -> list[Any]:
        """Every worker's step reply; on an error the others are still read, keeping the pipes in step."""
        results: list[Any] = []
        first_error: BaseException | None = None
        for i in range(self.num_envs):
            try:
                results.append(self._receive_step(i))
            except (RuntimeError, ValueError, TimeoutError) as error:
                results.append(None)
                if first_error is None:
                    first_error = error
        if first_error is not None:
            raise first_error
        return results

    def _send(self, i: int, message: Any, raw: bool = False) -> None:
        try:
            if raw:
                self.remotes[i].send_bytes(message)
            else:
                self.remotes[i].send(message)
        except (OSError, EOFError) as error:
            raise self._died(i) from error

    # --- VecEnv -------------------------------------------------------------------------------------------------

    def reset(self) -> dict[str, np.ndarray]:
        """Reset every copy (with the seeds/options set by ``seed()``/``set_options()``, used once).

        :return: ``{agent: (num_envs, *obs_shape)}``.
        """
        for i, arguments in enumerate(self._reset_arguments()):
            self._send(i, ("reset", arguments))
        for i, reset_info in enumerate(self._receive_all_steps()):
            self.reset_infos[i] = reset_info
        return self._finish()

    def _step_async(self, actions: list[np.ndarray]) -> None:
        for view, array in zip(self._action_views, actions):
            view[...] = array
        # Set first: if a send fails, close() still collects the answers of the workers that got theirs
        self.waiting = True
        for i, row in enumerate(self._action_bytes):
            self._send(i, row.tobytes(), raw=True)

    def step_wait(self) -> VecEnvStepReturn:
        """Collect the step started by ``step_async``."""
        self.waiting = False
        return self._collect(self._receive_all_steps())

    def close(self) -> None:
        """Stop the workers: ask each to close its env, wait up to ``close_timeout`` s, terminate stragglers.

        Safe to call twice, after a worker died, and from ``__del__``.
        """
        if getattr(self, "closed", True):
            return
        self.closed = True
        remotes = getattr(self, "remotes", [])
        processes = getattr(self, "processes", [])
        for remote, process in zip(remotes, processes):
            if self.waiting and process.is_alive() and remote.poll(self.close_timeout):
                with contextlib.suppress(EOFError, OSError):  # the answer of an unfinished step_async
                    remote.recv_bytes()
            if process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    remote.send(("close", None))
        self.waiting = False
        deadline = time.monotonic() + self.close_timeout
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=1.0)
        for remote in remotes:
            remote.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit module globals may already be gone
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass

    def _request(self, command: str, data: Any, indices: VecEnvIndices) -> list[Any]:
        targets = list(self._get_indices(indices))
        for i in targets:
            self._send(i, (command, data))
        return [self._receive(i) for i in targets]

    def _render(self, index: int) -> Any:
        return self._request("render", None, index)[0]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """``getattr`` on each ParallelEnv copy (the values are pickled back).

        :param attr_name: The attribute.
        :param indices: The copies (all by default).
        :return: One value per copy.
        """
        return self._request("get_attr", attr_name, indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """``setattr`` on each ParallelEnv copy.

        :param attr_name: The attribute.
        :param value: Its new value (pickled to the workers).
        :param indices: The copies (all by default).
        """
        self._request("set_attr", (attr_name, value), indices)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a method of each ParallelEnv copy.

        :param method_name: The method.
        :param method_args: Its positional arguments.
        :param indices: The copies (all by default).
        :param method_kwargs: Its keyword arguments.
        :return: One result per copy.
        """
        return self._request("env_method", (method_name, method_args, method_kwargs), indices)

    def has_attr(self, attr_name: str) -> bool:
        """Whether every copy has the attribute (without pickling its value).

        :param attr_name: The attribute.
        :return: True if all copies have it.
        """
        return all(self._request("has_attr", attr_name, None))


def _make_poller(remote: Connection, process: Any) -> Callable[[float], bool]:
    """A function waiting up to ``timeout`` s until ``remote`` is readable or ``process`` has exited.

    It returns True when there is something to read. Registered once (``select.poll``) rather than building a
    selector per call as ``Connection.poll`` does: that is a measurable part of a step.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        fd = remote.fileno()
        poller.register(fd, select.POLLIN)
        poller.register(process.sentinel, select.POLLIN)

        def poll(timeout: float) -> bool:
            # Only the sentinel firing means the process exited: False, and the caller sees it is not alive
            return any(event_fd == fd for event_fd, _ in poller.poll(timeout * 1000.0))

        return poll

    def wait_any(timeout: float) -> bool:  # Windows
        return remote in wait([remote, process.sentinel], timeout=timeout)

    return wait_any
