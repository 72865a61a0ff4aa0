"""Checks of what an env copy returns against what it declared: agent names and observations.

NumPy would otherwise accept much that is wrong: a ``(1,)`` observation is broadcast into a ``(3,)``
slot, ``300.0`` is stored in a ``uint8`` as ``44``, an agent named outside ``possible_agents`` is
silently treated as absent. Each check returns ``None`` for a valid value, or a short description of
the problem that :class:`~sb3_hatrpo.vec_env.runner._CopyRunner` turns into an :class:`EnvOutputError`
naming the agent and the env copy. The common case (an ndarray of the declared shape) costs one type
and one shape comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium import spaces

from sb3_hatrpo.vec_env.errors import EnvOutputError

__all__ = ["EnvOutputError", "ObservationCheck", "observation_check", "unknown_agents"]

ObservationCheck = Callable[[Any], "str | None"]


def _describe_value(value: Any) -> str:
    text = " ".join(repr(value).split())  # one line: arrays print over several
    return text if len(text) <= 80 else text[:77] + "..."


def _as_array(value: Any) -> tuple[np.ndarray | None, str | None]:
    """``value`` as an array of numbers, or the reason it is not one."""
    if value is None:
        return None, "None instead of an observation"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:  # ragged lists
        return None, f"{_describe_value(value)}, which is not an array ({error})"
    if array.dtype.kind not in "biuf":
        return None, f"{_describe_value(value)} of dtype {array.dtype}, not numbers"
    return array, None


def _integer_problem(array: np.ndarray, low: Any, high: Any, what: str) -> str | None:
    """Values outside ``[low, high]`` or not whole numbers, for integer spaces (which would store them wrapped)."""
    if array.size == 0:
        return None
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            return f"the non-finite values {_describe_value(array)}"
        if not (array == np.round(array)).all():
            return f"the non-integer values {_describe_value(array)} for {what}"
    if (array < low).any() or (array > high).any():
        return f"the values {_describe_value(array)}, outside {what}"
    return None


def observation_check(space: spaces.Space) -> ObservationCheck:
    """The check of one agent's observations for its (vectorised) observation space.

    :param space: a ``Box``, ``Discrete``, ``MultiDiscrete`` or ``MultiBinary`` space
    :return: a function of an observation giving ``None`` if it is valid, else what is wrong with it
    """
    shape = tuple(space.shape or ())

    def shape_problem(array: np.ndarray) -> str | None:
        if array.shape != shape:
            return f"an observation of shape {array.shape}; its observation space needs shape {shape}"
        return None

    if isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.floating):

        def check_float_box(value: Any) -> str | None:
            if type(value) is np.ndarray and value.dtype.kind in "biuf":  # the common case first
                return None if value.shape == shape else shape_problem(value)
            array, problem = _as_array(value)
            return problem if array is None else shape_problem(array)

        return check_float_box

    if isinstance(space, spaces.Box):  # integer Box (images): values must fit the dtype, else they wrap
        dtype = np.dtype(space.dtype)
        info = np.iinfo(dtype) if dtype.kind in "iu" else None
        what = f"the range [{info.min}, {info.max}] of {dtype}" if info is not None else f"{dtype}"

        def check_int_box(value: Any) -> str | None:
            array, problem = _as_array(value)
            if array is None:
                return problem
            problem = shape_problem(array)
            if problem is None and info is not None and array.dtype != dtype:  # same dtype: in range by construction
                problem = _integer_problem(array, info.min, info.max, what)
            return problem

        return check_int_box

    if isinstance(space, spaces.Discrete):
        first, last = int(space.start), int(space.start + space.n - 1)
        what_discrete = f"{space} (integers {first}..{last})"

        def check_discrete(value: Any) -> str | None:
            if isinstance(value, int | np.integer) and not isinstance(value, bool):
                return None if first <= value <= last else f"the value {value!r}, outside {what_discrete}"
            array, problem = _as_array(value)
            if array is None:
                return problem
            if array.shape != ():
                return f"an observation of shape {array.shape}; {space} needs a scalar"
            return _integer_problem(array, first, last, what_discrete)

        return check_discrete

    if isinstance(space, spaces.MultiDiscrete | spaces.MultiBinary):
        low_md: Any
        high_md: Any
        if isinstance(space, spaces.MultiBinary):
            low_md, high_md, what_md = 0, 1, f"{space} (0 or 1)"
        else:
            low_md, high_md = space.start, space.start + space.nvec - 1
            what_md = f"{space}"

        def check_multi(value: Any) -> str | None:
            array, problem = _as_array(value)
            if array is None:
                return problem
            return shape_problem(array) or _integer_problem(array, low_md, high_md, what_md)

        return check_multi

    raise TypeError(f"no observation check for {space}")  # the layout accepts no other space


def unknown_agents(names: Any, known: frozenset[str]) -> list[str]:
    """The names in ``names`` that are not ``possible_agents``, in their order.

    :param names: agent names the env returned (``env.agents``, the keys of a step's dicts)
    :param known: the env's ``possible_agents``
    """
    return [name for name in names if name not in known]
