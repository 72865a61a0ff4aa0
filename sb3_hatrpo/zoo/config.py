"""Hyperparameter files in rl-zoo's format: loading, validation, overrides and conversion to ``HATRPO`` arguments.

A config file maps env ids (plus ``default``) to ``HATRPO`` keyword arguments and the zoo keys
(:data:`ZOO_KEYS`). An env's entry is layered over ``default`` (top-level keys only). Values stay in a
YAML-serialisable *config form* (``"lin_1e-3"``, ``activation_fn: relu``) until
:func:`prepare_hyperparams` turns them into Python objects, so the exact config of a run can be saved
as it is.

Configs are data: they come from files other people write (a shared ``-conf`` file, a run's saved
``config.yml``, a tuning study's ``best_hyperparams.yml``). Nothing is ``eval``-ed: ``policy_kwargs``
strings such as ``"dict(net_arch=[64, 64], activation_fn=nn.ReLU)"`` are parsed with :mod:`ast`, class
names come from fixed tables, and the one import path a config may hold (``env_wrapper``) must lie in
:data:`ALLOWED_IMPORTS` or be allowed explicitly (``allow_imports`` / ``--allow-import``), checked
before anything is imported. YAML anchors and aliases are limited (:data:`MAX_YAML_NODES`).
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from stable_baselines3.common.utils import LinearSchedule
from torch import nn, optim

__all__ = [
    "ALLOWED_IMPORTS",
    "DEFAULT_CONFIG_PATH",
    "MAX_YAML_NODES",
    "ZOO_KEYS",
    "ConfigError",
    "EnvWrapperChain",
    "PreparedHyperparams",
    "canonical_allocator",
    "check_import_allowed",
    "get_hyperparams",
    "hyperparam_keys",
    "load_config",
    "load_yaml",
    "merge_overrides",
    "parse_params",
    "parse_value",
    "prepare_hyperparams",
    "resolve_activation",
    "resolve_optimizer",
]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
# The package's copy (a symlink to the repository's zoo_configs/ in a checkout, real files in a wheel).
DEFAULT_CONFIG_PATH = _PACKAGE_DIR / "zoo_configs" / "hatrpo.yml"

# Keys of a config entry that are not HATRPO arguments (rl-zoo's names).
ZOO_KEYS: dict[str, str] = {
    "n_timesteps": "training budget in env steps (all copies together), e.g. !!float 1e6",
    "n_envs": "env copies stepped together",
    "policy": "policy name (MlpPolicy)",
    "policy_kwargs": "net_arch, activation_fn, log_std_init, ortho_init, optimizer_class, optimizer_kwargs",
    "env_kwargs": "keyword arguments of make_env (e.g. agent_obsk for MaMuJoCo)",
    "env_wrapper": "import path(s) of ParallelEnv wrappers, e.g. supersuit.clip_actions_v0",
}
# HATRPO arguments the command lines set themselves (flags), not configs.
_CLI_ONLY = {"self", "policy", "env", "_init_setup_model", "seed", "verbose", "tensorboard_log", "vec_env_cls"}

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leakyrelu": nn.LeakyReLU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
_OPTIMIZERS: dict[str, type[optim.Optimizer]] = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "rmsprop": optim.RMSprop,
    "sgd": optim.SGD,
}
_CLASS_PREFIXES = ("torch.nn.", "th.nn.", "nn.", "torch.optim.", "th.optim.", "optim.")

# Modules (and their submodules) whose callables a config may name without an explicit opt-in:
# SuperSuit's and PettingZoo's wrappers and this package. Anything else could run arbitrary code
# (``pydoc.pipepager`` runs a shell command; importing a module runs its import-time code).
ALLOWED_IMPORTS = ("supersuit", "pettingzoo.utils.wrappers", "pettingzoo.utils.conversions", "sb3_hatrpo")
# Nodes of a YAML document after expanding its aliases: a real config has a few hundred; an alias bomb
# (a dozen lines of nested aliases) expands to billions and would take all memory.
MAX_YAML_NODES = 100_000


class ConfigError(ValueError):
    """A config file, entry or override that cannot be used; the message says where and what is valid."""


# ---------------------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------------------


class _LinedDict(dict):
    """A mapping from YAML that remembers the line of each key (for error messages)."""

    lines: dict[Any, int]


class _ZooLoader(yaml.SafeLoader):
    """Safe YAML plus: ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``), duplicate keys are errors, key lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = _LinedDict()
        mapping.lines = {}
        self.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in mapping:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first on line {mapping.lines[key]})",
                    key_node.start_mark,
                )
            mapping[key] = self.construct_object(value_node, deep=deep)
            mapping.lines[key] = key_node.start_mark.line + 1
        return mapping

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node, self.name)
        return node


def _check_expanded_size(root: yaml.Node, name: str) -> None:
    """``ConfigError`` if the document, with every alias expanded, has more than :data:`MAX_YAML_NODES` nodes.

    Sizes are memoised per node, so a bomb is measured in time linear in its text, never expanded.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:  # a recursive alias (&a [*a]): infinite
            raise ConfigError(f"{name}: a YAML alias refers to itself; configs cannot be recursive")
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        on_path.discard(key)
        sizes[key] = min(total, MAX_YAML_NODES + 1)
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"{name}: the YAML document expands to more than {MAX_YAML_NODES} values through its aliases "
                "(&anchor / *alias); a hyperparameter file needs far fewer: remove the nested aliases"
            )
        return total

    size(root)


_ZooLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
# Build nested mappings eagerly so they are _LinedDicts too.
_ZooLoader.add_constructor(
    "tag:yaml.org,2002:map",
    lambda loader, node: loader.construct_mapping(node, deep=True),
)


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file with the zoo's loader.

    :param path: the file
    :return: the parsed document (mappings remember their key lines)
    :raises ConfigError: ``<file>:<line>:<column>: <problem>`` for malformed YAML or duplicate keys
    :raises FileNotFoundError: if the file does not exist
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} not found")
    text = path.read_text()
    try:
        loader = _ZooLoader(text)
        loader.name = str(path)
        try:
            return loader.get_single_data()  # a SafeLoader subclass: no arbitrary objects
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(part for part in (error.context, error.problem) if part)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML document is nested too deeply") from None


def _line_of(mapping: Any, key: Any) -> int | None:
    return getattr(mapping, "lines", {}).get(key)


def _where(path: Path | str, mapping: Any, key: Any) -> str:
    line = _line_of(mapping, key)
    return f"{path}:{line}" if line is not None else str(path)


# ---------------------------------------------------------------------------------------------------------------
# Valid keys
# ---------------------------------------------------------------------------------------------------------------


def _hatrpo_signature() -> inspect.Signature:
    from sb3_hatrpo.hatrpo import HATRPO

    return inspect.signature(HATRPO.__init__)


def hyperparam_keys() -> list[str]:
    """Every key a config entry may hold: ``HATRPO`` arguments (but those set by flags) and :data:`ZOO_KEYS`."""
    algo = [name for name in _hatrpo_signature().parameters if name not in _CLI_ONLY]
    return sorted(set(algo) | set(ZOO_KEYS))


def _policy_kwarg_keys() -> list[str]:
    from sb3_hatrpo.policies import HATRPOPolicy

    skip = {"self", "observation_space", "action_space", "lr_schedule", "state_space"}
    return [name for name in inspect.signature(HATRPOPolicy.__init__).parameters if name not in skip]


def canonical_allocator(name: str) -> str:
    """The canonical name (``uniform``, ``kkt``, ``greedy``) of an allocator name or alias.

    :raises ConfigError: for an unknown name, listing the valid ones
    """
    from sb3_hatrpo.allocators import ALLOCATORS

    if not isinstance(name, str) or name.lower() not in ALLOCATORS:
        raise ConfigError(f"Unknown allocator {name!r}; valid names: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name.lower()].name


# ---------------------------------------------------------------------------------------------------------------
# Values without eval
# ---------------------------------------------------------------------------------------------------------------


def _strip_class_prefix(name: str) -> str:
    for prefix in _CLASS_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def resolve_activation(name: str | type[nn.Module]) -> type[nn.Module]:
    """``"relu"``, ``"ReLU"``, ``"nn.ReLU"``, ``"th.nn.ReLU"`` or ``"torch.nn.ReLU"`` -> ``nn.ReLU``.

    :raises ConfigError: for an unknown name, listing the valid ones
    """
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name
    key = _strip_class_prefix(str(name)).lower().replace("_", "")
    if key not in _ACTIVATIONS:
        valid = ", ".join(sorted({cls.__name__ for cls in _ACTIVATIONS.values()}))
        raise ConfigError(f"Unknown activation {name!r}; valid: {valid} (as 'relu', 'nn.ReLU', ...)")
    return _ACTIVATIONS[key]


def resolve_optimizer(name: str | type[optim.Optimizer]) -> type[optim.Optimizer]:
    """``"adam"``, ``"Adam"``, ``"th.optim.Adam"`` ... -> ``torch.optim.Adam``.

    :raises ConfigError: for an unknown name, listing the valid ones
    """
    if isinstance(name, type) and issubclass(name, optim.Optimizer):
        return name
    key = _strip_class_prefix(str(name)).lower()
    if key not in _OPTIMIZERS:
        valid = ", ".join(cls.__name__ for cls in _OPTIMIZERS.values())
        raise ConfigError(f"Unknown optimizer {name!r}; valid: {valid} (as 'adam', 'th.optim.Adam', ...)")
    return _OPTIMIZERS[key]


def _is_class_name(name: str) -> bool:
    key = _strip_class_prefix(name)
    return key.lower().replace("_", "") in _ACTIVATIONS or key.lower() in _OPTIMIZERS


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.expr, text: str) -> Any:
    """Evaluate a literal, ``dict(k=v, ...)`` or a known class name; nothing else."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand, text)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    elif isinstance(node, ast.List | ast.Tuple):
        items = [_literal(item, text) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    elif isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise ValueError("'**' is not supported")
        return {_literal(k, text): _literal(v, text) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    elif isinstance(node, ast.Call) and _dotted(node.func) == "dict" and not node.args:
        if any(kw.arg is None for kw in node.keywords):
            raise ValueError("'**' is not supported")
        return {kw.arg: _literal(kw.value, text) for kw in node.keywords}
    elif isinstance(node, ast.Name | ast.Attribute):
        name = _dotted(node)
        if name is not None and _is_class_name(name):
            return name  # resolved to a class by prepare_hyperparams
        raise ValueError(f"unknown name {name!r} (only activation and optimizer names such as nn.ReLU are known)")
    segment = ast.get_source_segment(text, node) or type(node).__name__
    raise ValueError(f"{segment!r} is not a literal (numbers, strings, lists, dicts, dict(...), True/False/None)")


_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-:/]*$")


def parse_value(text: str, where: str = "value") -> Any:
    """Parse one value of a ``-params``/``--env-kwargs`` override or a ``policy_kwargs`` string, without ``eval``.

    Python literals (``64``, ``1e-3``, ``[64, 64]``, ``{'a': 1}``, ``True``, ``None``), ``dict(k=v)`` and
    activation/optimizer names (``nn.ReLU``) are understood; a bare word such as ``kkt`` or ``lin_1e-3``
    is a string.

    :param text: the value as typed
    :param where: what is being parsed, for the error message
    :raises ConfigError: if the value does not parse
    """
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"{where}: empty value")
    # A bare word is a string (allocator:kkt, policy:MlpPolicy, learning_rate:lin_1e-3), unless it is
    # True/False/None or an activation/optimizer name.
    if _BARE_WORD.match(stripped) and stripped not in ("True", "False", "None") and not _is_class_name(stripped):
        return stripped
    try:
        tree = ast.parse(stripped, mode="eval")
    except SyntaxError as error:
        raise ConfigError(f"{where}: cannot parse {text!r}: {error.msg}") from None
    try:
        return _literal(tree.body, stripped)
    except ValueError as error:
        raise ConfigError(f"{where}: cannot parse {text!r}: {error}") from None


def parse_params(items: Iterable[str] | None, what: str = "-params") -> dict[str, Any]:
    """``["n_steps:64", "policy_kwargs:dict(net_arch=[16])"]`` -> ``{"n_steps": 64, ...}``.

    A dotted key (``policy_kwargs.net_arch:[16]``) sets one entry of a nested mapping.

    :param items: ``key:value`` strings
    :param what: the flag, for error messages
    :raises ConfigError: for an item without ``key:`` or a value that does not parse
    """
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        key = key.strip()
        if not sep or not re.match(r"^[A-Za-z_][\w.]*$", key):
            raise ConfigError(f"{what}: expected key:value (e.g. n_steps:64), got {item!r}")
        parsed = parse_value(value, where=f"{what} {key}")
        target = result
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{what}: {key!r} sets a key inside {parent!r}, which is not a mapping")
        target[leaf] = parsed
    return result


# ---------------------------------------------------------------------------------------------------------------
# Files and entries
# ---------------------------------------------------------------------------------------------------------------


def _check_entry(path: Path, name: str, entry: Any, container: Any) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{_where(path, container, name)}: entry {name!r} must be a mapping of hyperparameters, "
            f"got {type(entry).__name__}"
        )
    valid = hyperparam_keys()
    for key in entry:
        if key not in valid:
            raise ConfigError(
                f"{_where(path, entry, key)}: unknown key {key!r} in entry {name!r}; valid keys: {', '.join(valid)}"
            )
    if isinstance(entry.get("policy_kwargs"), dict):
        _check_policy_kwargs(entry["policy_kwargs"], path, name)


def _check_policy_kwargs(kwargs: dict[str, Any], path: Path | None = None, entry: str | None = None) -> None:
    valid = _policy_kwarg_keys()
    for key in kwargs:
        if key not in valid:
            where = _where(path, kwargs, key) if path is not None else "policy_kwargs"
            in_entry = f" in entry {entry!r}" if entry is not None else ""
            raise ConfigError(f"{where}: unknown policy_kwargs key {key!r}{in_entry}; valid: {', '.join(valid)}")


def load_config(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Read and validate a whole config file (every entry's keys).

    :param path: the file; default the package's ``zoo_configs/hatrpo.yml``
    :return: ``{entry name: hyperparameters}``
    :raises ConfigError: malformed YAML or an unknown key, with file and line
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must map env ids to hyperparameters, got {type(data).__name__}")
    for name, entry in data.items():
        _check_entry(path, str(name), entry, data)
    return data


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``base``; a nested mapping from a dotted key updates the existing mapping."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and key in merged and key != "allocator_kwargs":
            current = merged[key]
            if isinstance(current, str) and key == "policy_kwargs":
                current = parse_value(current, where="policy_kwargs")
            if isinstance(current, dict):
                merged[key] = {**current, **value}
                continue
        merged[key] = value
    return merged


def get_hyperparams(
    env_id: str, conf_file: str | Path | None = None, params: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """The hyperparameters of ``env_id``: its entry over ``default``, then the ``params`` overrides.

    :param env_id: the env id (the entry's key)
    :param conf_file: the config file; default the package's ``zoo_configs/hatrpo.yml``
    :param params: overrides (from :func:`parse_params`)
    :return: the hyperparameters in config form (plain dicts) and a description of their source
    :raises ConfigError: if neither the env nor ``default`` has an entry (lists the entries), or a key is unknown
    """
    path = Path(conf_file) if conf_file is not None else DEFAULT_CONFIG_PATH
    config = load_config(path)
    if env_id not in config and "default" not in config:
        raise ConfigError(
            f"{path}: no entry for {env_id!r} and no 'default' entry; entries: {', '.join(map(str, config)) or 'none'}"
        )
    hyperparams: dict[str, Any] = _plain(config.get("default") or {})
    source = f"{path} [default]"
    if env_id in config and env_id != "default":
        hyperparams.update(_plain(config[env_id]))
        source = f"{path} [{env_id}]" + (" over [default]" if "default" in config else "")
    if params:
        valid = hyperparam_keys()
        unknown = [key for key in params if key not in valid]
        if unknown:
            raise ConfigError(f"-params: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
        hyperparams = merge_overrides(hyperparams, params)
        source += " with -params overrides"
    return hyperparams, source


def _plain(value: Any) -> Any:
    """Deep copy with plain dicts (for saving and comparing)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------------------------
# Config form -> Python objects
# ---------------------------------------------------------------------------------------------------------------


def check_import_allowed(path: str, allow_imports: Iterable[str] = (), what: str = "env_wrapper") -> None:
    """``ConfigError`` unless the module of ``path`` is in :data:`ALLOWED_IMPORTS` or ``allow_imports``.

    A module is allowed when it equals an entry or is a submodule of one. Checked before any import,
    so a refused module's import-time code never runs.

    :param path: ``"module.callable"`` or ``"module:callable"``
    :param allow_imports: modules the user allowed explicitly (``--allow-import``)
    :param what: the config key, for the message
    """
    module = path.replace(":", ".").rpartition(".")[0]
    allowed = (*ALLOWED_IMPORTS, *allow_imports)
    if not any(module == prefix or module.startswith(prefix + ".") for prefix in allowed):
        raise ConfigError(
            f"{what} {path!r}: configs may only name callables of {', '.join(ALLOWED_IMPORTS)}; importing "
            f"{module or path!r} would run its code. If you trust it, allow it explicitly: "
            f"--allow-import {module or path} (Python: allow_imports=[{(module or path)!r}])"
        )


class EnvWrapperChain:
    """ParallelEnv wrappers given by import path, applied in order (picklable for subprocess envs).

    :param spec: ``"supersuit.clip_actions_v0"``, ``{"pkg.wrapper": {kwargs}}`` or a list of these
    :param allow_imports: modules besides :data:`ALLOWED_IMPORTS` whose callables may be named
    """

    def __init__(self, spec: str | dict[str, Any] | list[Any], allow_imports: Iterable[str] = ()) -> None:
        items = spec if isinstance(spec, list) else [spec]
        self.allow_imports = tuple(allow_imports)
        self.wrappers: list[tuple[str, dict[str, Any]]] = []
        for item in items:
            if isinstance(item, str):
                self.wrappers.append((item, {}))
            elif isinstance(item, dict) and len(item) == 1:
                (name, kwargs), *_ = item.items()
                if kwargs is not None and not isinstance(kwargs, dict):
                    raise ConfigError(f"env_wrapper {name!r}: its arguments must be a mapping, got {kwargs!r}")
                self.wrappers.append((str(name), dict(kwargs or {})))
            else:
                raise ConfigError(
                    f"env_wrapper: expected 'module.wrapper', {{'module.wrapper': {{kwargs}}}} or a list, got {item!r}"
                )
        for name, _ in self.wrappers:
            self._resolve(name)  # fail now, not in a worker process

    def _resolve(self, name: str) -> Callable[..., Any]:
        module_name, sep, attr = name.replace(":", ".").rpartition(".")
        if not sep or not module_name:
            raise ConfigError(f"env_wrapper {name!r}: expected an import path such as supersuit.clip_actions_v0")
        allowed = getattr(self, "allow_imports", ())  # chains pickled before the attribute existed
        check_import_allowed(name, allowed)
        try:
            wrapper = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"env_wrapper {name!r} cannot be imported: {error}") from None
        if not callable(wrapper) or isinstance(wrapper, type(importlib)):
            raise ConfigError(f"env_wrapper {name!r} is not callable")
        # A name re-exported by an allowed module (``sb3_hatrpo.x.os``-style) must also be defined in one
        defined_in = getattr(wrapper, "__module__", None) or ""
        check_import_allowed(f"{defined_in}.{attr}", allowed, what=f"env_wrapper {name!r} is defined as")
        return wrapper

    def __call__(self, env: Any) -> Any:
        for name, kwargs in self.wrappers:
            try:
                env = self._resolve(name)(env, **kwargs)
            except TypeError as error:  # wrong or missing keyword arguments: a config error
                raise ConfigError(f"env_wrapper {name!r} with {kwargs}: {error}") from None
        return env

    def __repr__(self) -> str:
        return f"EnvWrapperChain({self.wrappers!r})"


@dataclass
class PreparedHyperparams:
    """Hyperparameters split into what ``HATRPO`` takes and what the zoo uses itself."""

    model_kwargs: dict[str, Any]
    n_timesteps: int | None = None
    n_envs: int = 1
    policy: str = "MlpPolicy"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    env_wrapper: EnvWrapperChain | None = None


def _schedule(value: Any, key: str) -> Any:
    if isinstance(value, str):
        if not value.startswith("lin_"):
            raise ConfigError(f"{key}: expected a number or a schedule 'lin_<initial value>', got {value!r}")
        try:
            initial = float(value[len("lin_") :])
        except ValueError:
            raise ConfigError(f"{key}: cannot read the initial value of schedule {value!r} (e.g. lin_1e-3)") from None
        # rl-zoo's lin_<x>: x * progress_remaining
        return LinearSchedule(initial, 0.0, 1.0)
    return value


def _check_number(key: str, value: Any, kind: type, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
    if kind is int:
        if float(value) != int(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def prepare_hyperparams(hyperparams: dict[str, Any], allow_imports: Iterable[str] = ()) -> PreparedHyperparams:
    """Config form -> ``HATRPO`` keyword arguments and zoo settings, checking types.

    Schedules (``lin_1e-3``) become SB3 schedules, ``policy_kwargs`` strings are parsed and class names
    resolved, ``env_wrapper`` becomes an :class:`EnvWrapperChain`.

    :param hyperparams: from :func:`get_hyperparams` (not modified)
    :param allow_imports: modules besides :data:`ALLOWED_IMPORTS` that ``env_wrapper`` may name
    :raises ConfigError: for a value of the wrong type, or an import path that is not allowed
    """
    values = _plain(hyperparams)
    prepared = PreparedHyperparams(model_kwargs={})
    n_timesteps = values.pop("n_timesteps", None)
    if n_timesteps is not None:
        prepared.n_timesteps = _check_number("n_timesteps", n_timesteps, int)
        if prepared.n_timesteps <= 0:
            raise ConfigError(f"n_timesteps must be positive, got {n_timesteps!r}")
    n_envs = values.pop("n_envs", 1)
    prepared.n_envs = _check_number("n_envs", n_envs, int)
    if prepared.n_envs < 1:
        raise ConfigError(f"n_envs must be at least 1, got {n_envs!r}")
    prepared.policy = values.pop("policy", "MlpPolicy")
    env_kwargs = values.pop("env_kwargs", None) or {}
    if not isinstance(env_kwargs, dict):
        raise ConfigError(f"env_kwargs must be a mapping, got {env_kwargs!r}")
    prepared.env_kwargs = env_kwargs
    wrapper = values.pop("env_wrapper", None)
    prepared.env_wrapper = EnvWrapperChain(wrapper, allow_imports) if wrapper else None

    policy_kwargs = values.pop("policy_kwargs", None)
    if isinstance(policy_kwargs, str):
        policy_kwargs = parse_value(policy_kwargs, where="policy_kwargs")
    if policy_kwargs is not None:
        if not isinstance(policy_kwargs, dict):
            raise ConfigError(f"policy_kwargs must be a mapping or 'dict(...)', got {policy_kwargs!r}")
        _check_policy_kwargs(policy_kwargs)
        policy_kwargs = dict(policy_kwargs)
        if "activation_fn" in policy_kwargs:
            policy_kwargs["activation_fn"] = resolve_activation(policy_kwargs["activation_fn"])
        if "optimizer_class" in policy_kwargs:
            policy_kwargs["optimizer_class"] = resolve_optimizer(policy_kwargs["optimizer_class"])
        values["policy_kwargs"] = policy_kwargs

    if "allocator" in values:
        values["allocator"] = canonical_allocator(values["allocator"])
    allocator_kwargs = values.get("allocator_kwargs")
    if allocator_kwargs is not None and not isinstance(allocator_kwargs, dict):
        raise ConfigError(f"allocator_kwargs must be a mapping, got {allocator_kwargs!r}")
    if allocator_kwargs:
        values["allocator_kwargs"] = select_allocator_kwargs(allocator_kwargs, values.get("allocator", "uniform"))

    defaults = {name: p.default for name, p in _hatrpo_signature().parameters.items()}
    for key, value in list(values.items()):
        default = defaults.get(key, inspect.Parameter.empty)
        if key == "learning_rate":
            values[key] = _schedule(value, key)
            if not callable(values[key]):
                values[key] = _check_number(key, value, float)
        elif key == "total_kl":
            values[key] = _check_number(key, value, float, allow_none=True)
        elif isinstance(default, bool):
            values[key] = _check_number(key, value, bool)
        elif isinstance(default, int):
            values[key] = _check_number(key, value, int)
        elif isinstance(default, float):
            values[key] = _check_number(key, value, float)
    prepared.model_kwargs = values
    return prepared


def select_allocator_kwargs(allocator_kwargs: dict[str, Any], allocator: str) -> dict[str, Any]:
    """The options of ``allocator`` from a config's ``allocator_kwargs``.

    Two forms: flat options of the entry's allocator (``{min_kl_fraction: 0.5}``), or options per
    allocator (``{kkt: {min_kl_fraction: 0.5}, greedy: {eps: 1.0e-8}}``), which lets ``--allocator``
    switch allocators without options of the wrong one.

    :param allocator_kwargs: either form
    :param allocator: the allocator that will be used (name or alias)
    """
    from sb3_hatrpo.allocators import ALLOCATORS

    if allocator_kwargs and all(isinstance(k, str) and k.lower() in ALLOCATORS for k in allocator_kwargs):
        chosen = canonical_allocator(allocator)
        for name, options in allocator_kwargs.items():
            if canonical_allocator(name) == chosen:
                if options is not None and not isinstance(options, dict):
                    raise ConfigError(f"allocator_kwargs.{name} must be a mapping, got {options!r}")
                return dict(options or {})
        return {}
    return dict(allocator_kwargs)
