"""Helpers shared by the command lines: rl-zoo's folder layout and one-line errors."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "ALGO",
    "CLIError",
    "HelpFormatter",
    "add_allow_import_argument",
    "check_writable_folder",
    "env_folder_name",
    "find_run",
    "get_latest_run_id",
    "new_run_folder",
    "positive_timesteps",
    "run_cli",
    "set_num_threads",
]

# rl-zoo's layout: <log folder>/<algo>/<env>_<exp id>/
ALGO = "hatrpo"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


class CLIError(Exception):
    """An error a command line reports as one line, without a traceback."""


def env_folder_name(env_id: str) -> str:
    """A file-system-safe, recognisable folder name for an env id: ``mamujoco:HalfCheetah-2x3`` ->
    ``mamujoco-HalfCheetah-2x3`` (``:`` and anything unsafe become ``-``)."""
    name = _UNSAFE.sub("-", env_id).strip("-.")
    return name or "env"


def _run_ids(log_path: Path, env_folder: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{re.escape(env_folder)}_(\d+)$")
    ids: dict[int, Path] = {}
    if log_path.is_dir():
        for entry in log_path.iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_dir():
                ids[int(match.group(1))] = entry
    return ids


def get_latest_run_id(log_path: str | Path, env_folder: str) -> int:
    """The highest experiment id under ``log_path`` for ``env_folder`` (0 if none), as rl-zoo's."""
    ids = _run_ids(Path(log_path), env_folder)
    return max(ids) if ids else 0


def new_run_folder(log_path: str | Path, env_folder: str) -> tuple[Path, int]:
    """Create ``<log_path>/<env_folder>_<latest + 1>``; safe when several processes start at once."""
    log_path = Path(log_path)
    log_path.mkdir(parents=True, exist_ok=True)
    exp_id = get_latest_run_id(log_path, env_folder) + 1
    while True:
        folder = log_path / f"{env_folder}_{exp_id}"
        try:
            folder.mkdir()  # atomic: another process that got there first makes us take the next id
            return folder, exp_id
        except FileExistsError:
            exp_id += 1


def find_run(log_folder: str | Path, env_id: str, exp_id: int = 0) -> Path:
    """The run folder of ``env_id`` with ``exp_id`` (0: the latest).

    :raises CLIError: if there is no such run, saying which runs exist
    """
    env_folder = env_folder_name(env_id)
    log_path = Path(log_folder) / ALGO
    ids = _run_ids(log_path, env_folder)
    if not ids:
        others = sorted(p.name for p in log_path.iterdir() if p.is_dir()) if log_path.is_dir() else []
        hint = f"; runs there: {', '.join(others)}" if others else ""
        raise CLIError(
            f"No trained {env_id!r} runs in {log_path} (expected folders {env_folder}_<id>){hint}. "
            f"Train one with: python -m sb3_hatrpo.train --env {env_id} -f {log_folder}"
        )
    if exp_id == 0:
        return ids[max(ids)]
    if exp_id not in ids:
        raise CLIError(f"No run {env_folder}_{exp_id} in {log_path}; experiment ids there: {sorted(ids)}")
    return ids[exp_id]


def check_writable_folder(folder: str | Path, flag: str = "-f/--log-folder") -> None:
    """``CLIError`` unless ``folder`` exists as a writable directory or can be created.

    :param folder: the folder runs will be written to
    :param flag: the command-line flag that set it, for the message
    """
    path = Path(folder)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise CLIError(f"{flag} {folder}: {existing} is a file, not a folder; pass a folder")
    try:  # a real write: os.access says yes to root on a read-only mount
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".sb3_hatrpo_write_test"):
            pass
    except OSError as error:
        raise CLIError(
            f"{flag} {folder}: cannot write in {existing} ({error.strerror or error}); pass a writable folder"
        ) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except for help texts that already say what their default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "default:" in help_text or action.default is None:  # "...; default: the config's"
            return help_text
        return super()._get_help_string(action)


def add_allow_import_argument(
    parser: argparse.ArgumentParser, source: str = "let the config's env_wrapper name callables of MODULE"
) -> None:
    """``--allow-import MODULE`` (repeatable): the opt-in for ``env_wrapper`` callables outside the allow-list.

    :param parser: the command's parser
    :param source: what the flag allows, the start of the help text
    """
    parser.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE",
        help=f"{source} (trusted code only; see docs/zoo.md)",
    )


def positive_timesteps(text: str) -> int:
    """argparse ``type`` of ``-n/--n-timesteps``: a positive whole number (``1e6`` accepted).

    :param text: The command-line value.
    """
    from sb3_hatrpo.budget import check_total_timesteps

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of timesteps, got {text!r}") from None
    try:
        return check_total_timesteps(value, "the budget")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of timesteps, got {text!r}") from None


def set_num_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` if ``n > 0`` (rl-zoo's ``--num-threads``)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


def _fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(
    prog: str, body: Callable[[], Any], expected: Sequence[type[BaseException]] = (), traceback: bool = False
) -> Any:
    """Run a command's body; report user errors (bad config, env, files) as one line and exit 2.

    Other exceptions are bugs and keep their traceback. ``traceback=True`` (``--verbose 2``) or
    ``SB3_HATRPO_TRACEBACK=1`` shows the traceback of user errors too.

    :param prog: the command's name for the message
    :param body: the command
    :param expected: extra exception types that are user errors
    :param traceback: re-raise user errors with their traceback instead of the one line
    """
    from sb3_hatrpo.zoo.config import ConfigError

    user_errors: tuple[type[BaseException], ...] = (
        CLIError,
        ConfigError,
        ValueError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
        ImportError,
        *expected,
    )
    try:
        return body()
    except user_errors as error:
        if traceback or os.environ.get("SB3_HATRPO_TRACEBACK"):
            raise
        message = str(error).strip() or type(error).__name__
        # One line: a worker's traceback or a long list of valid keys stays out of the terminal
        _fail(prog, " ".join(message.split("\n\n")[0].split()))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
