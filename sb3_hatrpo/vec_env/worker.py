"""The subprocess side: the byte codec of step messages and the worker loop running one copy."""

from __future__ import annotations

import pickle
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper

from sb3_hatrpo.vec_env.errors import WORKER_ERRORS
from sb3_hatrpo.vec_env.layout import _DISCRETE, _describe, _Layout, _Storage
from sb3_hatrpo.vec_env.runner import _CopyRunner

# A step message (both ways) starts with this 8-byte tag, then raw arrays; everything else is pickled (and starts
# with pickle's PROTO opcode 0x80, so the first byte tells them apart). Raw bytes instead of pickled arrays cut the
# per-step cost of a worker by about a factor of ten.
_STEP_BYTE = ord("S")
_STEP_TAG = b"S" + bytes(7)


def _padded(n_bytes: int) -> int:
    """``n_bytes`` rounded up to a multiple of 8, so every array in a message is aligned."""
    return -(-n_bytes // 8) * 8


class _PipeCodec:
    """Packs actions (main to worker) and a copy's stored outputs (worker to main) as raw bytes.

    :param layout: The storage plan both sides share.
    """

    def __init__(self, layout: _Layout) -> None:
        offset = len(_STEP_TAG)
        # Actions: per agent (offset, count, dtype, shape, is_discrete)
        self.action_parts: list[tuple[int, int, np.dtype, tuple[int, ...], bool]] = []
        for spec in layout.actions:
            count = int(np.prod(spec.shape, dtype=np.int64))
            self.action_parts.append((offset, count, spec.dtype, spec.shape, spec.kind == _DISCRETE))
            offset += _padded(count * spec.dtype.itemsize)
        self.action_size = offset
        # Reply: flat row, alive row, the other observations, then the pickled rest
        offset = len(_STEP_TAG)
        self.flat_offset = offset
        self.flat_count = layout.flat_width
        offset += _padded(4 * layout.flat_width)
        self.alive_offset = offset
        self.alive_count = len(layout.agents)
        offset += _padded(len(layout.agents))
        self.other_parts: list[tuple[int, int, np.dtype, tuple[int, ...]]] = []
        for obs_spec in layout.obs:
            if not obs_spec.in_flat:
                self.other_parts.append((offset, obs_spec.size, obs_spec.dtype, obs_spec.shape))
                offset += _padded(obs_spec.size * obs_spec.dtype.itemsize)
        self.tail_offset = offset

    def action_buffer(self, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """A ``(n, action_size)`` byte buffer (tag included) and, per agent, its typed ``(n, *shape)`` view."""
        buffer = np.zeros((n, self.action_size), dtype=np.uint8)
        buffer[:, : len(_STEP_TAG)] = np.frombuffer(_STEP_TAG, dtype=np.uint8)
        views = []
        for offset, count, dtype, shape, _ in self.action_parts:
            raw = buffer[:, offset : offset + count * dtype.itemsize]
            views.append(raw.view(dtype).reshape((n, *shape)))
        return buffer, views

    def decode_actions(self, message: bytes) -> list[Any]:
        # A writable copy: the env gets fresh arrays it may modify
        data = bytearray(message)
        actions: list[Any] = []
        for offset, count, dtype, shape, is_discrete in self.action_parts:
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            actions.append(array[0] if is_discrete else array.reshape(shape))
        return actions

    def encode_reply(self, storage: _Storage, tail: Any) -> bytes:
        parts = [_STEP_TAG, storage.flat[0].tobytes()]
        parts.append(bytes(self.alive_offset - self.flat_offset - 4 * self.flat_count))
        parts.append(storage.alive[0].tobytes())
        parts.append(bytes(_padded(self.alive_count) - self.alive_count))
        for (_, array), (_, count, dtype, _) in zip(storage.others, self.other_parts):
            parts.append(array[0].tobytes())
            parts.append(bytes(_padded(count * dtype.itemsize) - count * dtype.itemsize))
        parts.append(pickle.dumps(tail, protocol=pickle.HIGHEST_PROTOCOL))
        return b"".join(parts)

    def decode_reply(self, message: bytes, storage: _Storage, i: int) -> Any:
        storage.flat[i] = np.frombuffer(message, dtype=np.float32, count=self.flat_count, offset=self.flat_offset)
        storage.alive[i] = np.frombuffer(message, dtype=np.bool_, count=self.alive_count, offset=self.alive_offset)
        for (_, array), (offset, count, dtype, shape) in zip(storage.others, self.other_parts):
            array[i] = np.frombuffer(message, dtype=dtype, count=count, offset=offset).reshape(shape)
        return pickle.loads(memoryview(message)[self.tail_offset :])


def _plain_infos(agent_infos: Any) -> Any:
    """The agent infos with top-level NumPy scalars as Python scalars (pickled ten times faster).

    Dicts shared between agents (MaMuJoCo gives every agent the same one) stay shared.
    """
    if not isinstance(agent_infos, dict):
        return agent_infos
    converted: dict[int, Any] = {}
    out = {}
    for agent, info in agent_infos.items():
        plain = converted.get(id(info))
        if plain is None:
            if isinstance(info, dict):
                plain = {key: value.item() if isinstance(value, np.generic) else value for key, value in info.items()}
            else:
                plain = info
            converted[id(info)] = plain
        out[agent] = plain
    return out


def _error_payload(error: BaseException, context: str) -> tuple[str, str, str, bool, str]:
    # The 4th entry: the main process re-raises the error as the same type (see WORKER_ERRORS)
    return (
        type(error).__name__,
        str(error),
        traceback.format_exc(),
        type(error).__name__ in WORKER_ERRORS,
        context,
    )


def _worker(remote: Connection, parent_remote: Connection, env_fn_wrapper: CloudpickleWrapper, index: int) -> None:
    """One copy in its own process.

    Steps are raw byte messages (see :class:`_PipeCodec`); other commands are pickled ``(command, data)`` answered
    with ``("ok", result)``; any exception is answered with ``("error", ...)``.
    """
    parent_remote.close()
    env: Any = None
    runner: _CopyRunner | None = None
    storage: _Storage | None = None
    codec: _PipeCodec | None = None
    try:
        env = env_fn_wrapper.var()
        description = _describe(env, index)
    except Exception as error:
        remote.send(("error", _error_payload(error, "while creating the env")))
        remote.close()
        return
    remote.send(("ok", description))
    while True:
        try:
            message = remote.recv_bytes()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        command = "step"
        try:
            if message[0] == _STEP_BYTE:
                assert runner is not None and storage is not None and codec is not None
                reward, done, info, reset_info = runner.step(codec.decode_actions(message))
                info["agent_infos"] = _plain_infos(info["agent_infos"])
                remote.send_bytes(codec.encode_reply(storage, (reward, done, info, reset_info)))
                continue
            command, data = pickle.loads(message)
            if command == "reset":
                assert runner is not None and storage is not None and codec is not None
                reset_info = runner.reset(*data)
                remote.send_bytes(codec.encode_reply(storage, reset_info))
            elif command == "setup":
                layout, reward_aggregation, t_start = data
                storage = _Storage(layout, 1)
                codec = _PipeCodec(layout)
                runner = _CopyRunner(env, index, layout, storage.copy_views(0), reward_aggregation, t_start)
                remote.send(("ok", None))
            elif command == "render":
                remote.send(("ok", env.render()))
            elif command == "get_attr":
                remote.send(("ok", getattr(env, data)))
            elif command == "has_attr":
                remote.send(("ok", hasattr(env, data)))
            elif command == "set_attr":
                setattr(env, data[0], data[1])
                remote.send(("ok", None))
            elif command == "env_method":
                name, args, kwargs = data
                remote.send(("ok", getattr(env, name)(*args, **kwargs)))
            elif command == "close":
                env.close()
                remote.send(("ok", None))
                break
            else:
                raise NotImplementedError(f"Unknown command {command!r}")
        except KeyboardInterrupt:
            break
        except Exception as error:
            try:
                remote.send(("error", _error_payload(error, f"in {command}()")))
            except (OSError, ValueError):
                break
    remote.close()
