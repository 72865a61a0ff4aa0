"""Environment ids: ``make_env(env_id)`` turns a string into a PettingZoo ``ParallelEnv``.

Id forms (see :data:`KNOWN_PREFIXES`):

* ``"mamujoco:<Scenario>-<agent_conf>"``: Multi-Agent MuJoCo from ``gymnasium_robotics.mamujoco_v1``
  (optional extra ``mujoco``), e.g. ``mamujoco:HalfCheetah-2x3``.
* ``"mpe:<name>"``: a Multi Particle Environment from ``mpe2`` (optional extra ``mpe``),
  e.g. ``mpe:simple_spread_v3``.
* ``"games:<name>"``: the paper's games in :mod:`sb3_hatrpo.envs.games`
  (``differential``, ``climbing``, ``penalty``).
* ``"package.module:callable"``: any importable factory, called with the keyword arguments;
  it may return a ParallelEnv or an AEC env.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils.conversions import aec_to_parallel

from sb3_hatrpo.envs.games import DifferentialGame, climbing_game, penalty_game
from sb3_hatrpo.envs.quiet import ADROIT_NOTICE, SETTOTALMASS_WARNING, without_mujoco_warnings, without_stderr_lines

KNOWN_PREFIXES: tuple[str, ...] = ("mamujoco:", "mpe:", "games:", "package.module:callable")

# Agent factorisations gymnasium-robotics 1.4 defines (obsk.get_parts_and_edges), each checked to construct.
# CoupledHalfCheetah-1p1 is left out: it raises IndexError in gymnasium-robotics 1.4.2.
MAMUJOCO_AGENT_CONFS: dict[str, tuple[str, ...]] = {
    "HalfCheetah": ("2x3", "6x1"),
    "Ant": ("2x4", "2x4d", "4x2"),
    "Hopper": ("3x1",),
    "Walker2d": ("2x3",),
    "Humanoid": ("9|8",),
    "HumanoidStandup": ("9|8",),
    "Reacher": ("2x1",),
    "Pusher": ("3p",),
    "Swimmer": ("2x1",),
}
# Scenarios whose conf is any "<n_agents>x<segments_per_agent>" (the model file is generated to order).
MAMUJOCO_SEGMENTED_SCENARIOS: tuple[str, ...] = ("ManySegmentAnt", "ManySegmentSwimmer")
_SEGMENTED_CONF = re.compile(r"^[1-9]\d*x[1-9]\d*$")

GAMES: dict[str, Callable[..., ParallelEnv]] = {
    "differential": DifferentialGame,
    "climbing": climbing_game,
    "penalty": penalty_game,
}

# The envs the package ships and benchmarks (DESIGN §6), with the optional module each needs.
_SHIPPED_ENVS: dict[str, str | None] = {
    "games:differential": None,
    "games:climbing": None,
    "games:penalty": None,
    "mpe:simple_spread_v3": "mpe2",
    "mpe:simple_speaker_listener_v4": "mpe2",
    "mamujoco:HalfCheetah-2x3": "gymnasium_robotics",
    "mamujoco:HalfCheetah-6x1": "gymnasium_robotics",
    "mamujoco:Walker2d-2x3": "gymnasium_robotics",
    "mamujoco:Ant-4x2": "gymnasium_robotics",
    "mamujoco:Hopper-3x1": "gymnasium_robotics",
}


def list_envs(available_only: bool = False) -> list[str]:
    """The ids of the environments the package ships (the paper's benchmarks).

    :param available_only: Leave out the ids whose optional extra (``mujoco``, ``mpe``) is not installed.
    :return: Env ids accepted by :func:`make_env`.
    """
    return [
        env_id
        for env_id, module in _SHIPPED_ENVS.items()
        if not available_only or module is None or importlib.util.find_spec(module) is not None
    ]


def as_parallel_env(obj: Any) -> ParallelEnv:
    """Return ``obj`` as a PettingZoo ``ParallelEnv``.

    :param obj: A ``ParallelEnv`` (returned as it is) or an ``AECEnv`` (converted with PettingZoo's
        ``aec_to_parallel``).
    :return: The parallel env.
    :raises TypeError: For anything else, e.g. a single-agent gymnasium env.
    """
    if isinstance(obj, ParallelEnv):
        return obj
    if isinstance(obj, AECEnv):
        return aec_to_parallel(obj)
    raise TypeError(
        f"expected a PettingZoo environment, got {type(obj).__module__}.{type(obj).__qualname__}. "
        "Pass a PettingZoo ParallelEnv or AEC env, a zero-argument factory returning one, "
        "or an id string for sb3_hatrpo.envs.make_env (e.g. 'mamujoco:HalfCheetah-2x3', 'games:differential')."
    )


def make_env(env_id: str, **kwargs: Any) -> ParallelEnv:
    """Build a PettingZoo ``ParallelEnv`` from an id.

    :param env_id: ``"mamujoco:<Scenario>-<agent_conf>"``, ``"mpe:<name>"``, ``"games:<name>"`` or
        ``"package.module:callable"`` (see :data:`KNOWN_PREFIXES` and :func:`list_envs`).
    :param kwargs: Passed to the env constructor (e.g. ``render_mode`` or ``agent_obsk`` for MaMuJoCo,
        ``continuous_actions``, ``max_cycles`` or ``N`` for MPE, ``n_agents``, ``init_action`` or ``k``
        for the games).
    :return: The environment; AEC envs are converted with ``aec_to_parallel``.
    :raises ValueError: For an unknown id, listing the valid prefixes or names.
    :raises ImportError: When the optional extra an id needs is not installed.
    """
    if not isinstance(env_id, str):
        raise TypeError(f"env_id must be a string, got {type(env_id).__name__}")
    prefix, sep, name = env_id.partition(":")
    if not sep or not name:
        raise ValueError(_unknown_id_message(env_id))
    if prefix == "mamujoco":
        env = _make_mamujoco(env_id, name, kwargs)
    elif prefix == "mpe":
        env = _make_mpe(env_id, name, kwargs)
    elif prefix == "games":
        if name not in GAMES:
            raise ValueError(f"unknown game {name!r} in env id {env_id!r}; valid names: {', '.join(GAMES)}")
        env = _call(env_id, GAMES[name], kwargs)
    else:
        env = _make_from_entry_point(env_id, prefix, name, kwargs)
    try:
        return as_parallel_env(env)
    except TypeError as error:
        raise TypeError(f"make_env({env_id!r}) did not produce a PettingZoo env: {error}") from None


def _unknown_id_message(env_id: str) -> str:
    return (
        f"unknown env id {env_id!r}: it must start with one of the prefixes {', '.join(KNOWN_PREFIXES)} "
        f"(the package ships {', '.join(list_envs())})"
    )


def _mamujoco_known_ids() -> str:
    ids = [f"{scenario}-{conf}" for scenario, confs in MAMUJOCO_AGENT_CONFS.items() for conf in confs]
    ids += [f"{scenario}-<n>x<m>" for scenario in MAMUJOCO_SEGMENTED_SCENARIOS]
    return ", ".join(ids)


def _make_mamujoco(env_id: str, name: str, kwargs: dict[str, Any]) -> Any:
    scenario, _, agent_conf = name.partition("-")
    if scenario in MAMUJOCO_AGENT_CONFS:
        valid = agent_conf in MAMUJOCO_AGENT_CONFS[scenario]
    else:
        valid = scenario in MAMUJOCO_SEGMENTED_SCENARIOS and _SEGMENTED_CONF.match(agent_conf) is not None
    if not valid:
        raise ValueError(
            f"unknown MaMuJoCo scenario/agent_conf {name!r} in env id {env_id!r}; "
            f"known (mamujoco:<Scenario>-<agent_conf>): {_mamujoco_known_ids()}"
        )
    try:
        with without_stderr_lines(ADROIT_NOTICE):
            from gymnasium_robotics import mamujoco_v1  # noqa: F401  (checked even once the module below is loaded)

            from sb3_hatrpo.envs.mamujoco_fast import FastMultiAgentMujocoEnv
    except ImportError as error:
        raise ImportError(
            f'make_env({env_id!r}) needs gymnasium-robotics and mujoco: pip install "sb3_hatrpo[mujoco]" ({error})'
        ) from error
    # render_mode and the MaMuJoCo options (agent_obsk, ...) are keyword arguments of the constructor;
    # the subclass of gymnasium-robotics' env gives the same observations from precomputed index maps.
    with without_mujoco_warnings(SETTOTALMASS_WARNING):
        return _call(env_id, partial(FastMultiAgentMujocoEnv, scenario, agent_conf), kwargs)


def _mpe_names() -> list[str]:
    import mpe2

    return sorted(info.name for info in pkgutil.iter_modules(mpe2.__path__) if re.search(r"_v\d+$", info.name))


def _make_mpe(env_id: str, name: str, kwargs: dict[str, Any]) -> Any:
    try:
        import mpe2  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f'make_env({env_id!r}) needs mpe2 (MPE moved out of PettingZoo): pip install "sb3_hatrpo[mpe]" ({error})'
        ) from error
    if name not in _mpe_names():
        raise ValueError(f"unknown MPE env {name!r} in env id {env_id!r}; valid names: {', '.join(_mpe_names())}")
    module = importlib.import_module(f"mpe2.{name}")
    return _call(env_id, module.parallel_env, kwargs)


def _make_from_entry_point(env_id: str, module_name: str, attr_path: str, kwargs: dict[str, Any]) -> Any:
    dotted = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
    if not dotted.match(module_name) or not dotted.match(attr_path):
        raise ValueError(_unknown_id_message(env_id))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only the id's own module missing means a bad id; a missing dependency inside it is the user's to see.
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise ValueError(f"{_unknown_id_message(env_id)}; no module named {module_name!r}") from error
        raise
    factory: Any = module
    for attr in attr_path.split("."):
        try:
            factory = getattr(factory, attr)
        except AttributeError:
            raise ValueError(f"env id {env_id!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(factory):
        raise TypeError(f"env id {env_id!r}: {module_name}:{attr_path} is a {type(factory).__name__}, not callable")
    return _call(env_id, factory, kwargs)


class EnvKwargsError(TypeError, ValueError):
    """Keyword arguments an env constructor does not take (a ``TypeError`` as Python's, and a user error)."""


def _call(env_id: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """``factory(**kwargs)``; arguments it does not take raise :class:`EnvKwargsError` naming them and the valid ones.

    Checked against the signature first; constructors that pass ``**kwargs`` on (MaMuJoCo to gymnasium) are
    recognised by Python's own message, so a ``TypeError`` raised inside a working constructor stays a bug.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as error:
            valid = [
                name for name, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            raise EnvKwargsError(
                f"env {env_id!r} does not take the keyword arguments {sorted(kwargs)} ({error}); "
                f"its keyword arguments: {', '.join(valid) or 'none'}"
            ) from None
    try:
        return factory(**kwargs)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise EnvKwargsError(f"env {env_id!r}: {error} (check --env-kwargs / env_kwargs)") from None


__all__ = [
    "GAMES",
    "KNOWN_PREFIXES",
    "MAMUJOCO_AGENT_CONFS",
    "MAMUJOCO_SEGMENTED_SCENARIOS",
    "EnvKwargsError",
    "as_parallel_env",
    "list_envs",
    "make_env",
]
