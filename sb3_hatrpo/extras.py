"""Optional dependencies: check them before doing anything, and say which extra installs them."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = ["EXTRA_OF", "MissingExtraError", "require"]

# Importable module -> the extra of sb3_hatrpo that installs it
EXTRA_OF = {
    "yaml": "zoo",
    "optuna": "zoo",
    "matplotlib": "zoo",
    "rich": "zoo",
    "tqdm": "zoo",
    "imageio": "zoo",
    "imageio_ffmpeg": "zoo",
    "gymnasium_robotics": "mujoco",
    "mujoco": "mujoco",
    "mpe2": "mpe",
}
# The package each module comes in, where the names differ
_PACKAGE_OF = {"yaml": "pyyaml", "imageio_ffmpeg": "imageio-ffmpeg", "gymnasium_robotics": "gymnasium-robotics"}


class MissingExtraError(ImportError):
    """Optional dependencies are missing; the message names them and the ``pip install`` command."""


def missing(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported.

    :param modules: Importable module names.
    """
    return [name for name in modules if importlib.util.find_spec(name) is None]


def require(modules: Iterable[str], purpose: str) -> None:
    """Raise :class:`MissingExtraError` if any of ``modules`` is missing, naming the extra to install.

    :param modules: Importable module names (keys of :data:`EXTRA_OF`).
    :param purpose: What needs them, for the message (e.g. ``"python -m sb3_hatrpo.tune"``).
    """
    absent = missing(modules)
    if not absent:
        return
    extras = sorted({EXTRA_OF.get(name, "all") for name in absent})
    packages = ", ".join(_PACKAGE_OF.get(name, name) for name in absent)
    raise MissingExtraError(
        f"{purpose} needs {packages}, which {'is' if len(absent) == 1 else 'are'} not installed: "
        f'pip install "sb3_hatrpo[{",".join(extras)}]"'
    )
