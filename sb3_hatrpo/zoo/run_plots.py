"""Plots of training run folders (matplotlib, Agg backend: no display needed); ``python -m sb3_hatrpo.plot`` is
their command line.

* :func:`plot_learning_curves`: evaluation return over timesteps, one curve per group of runs (by default, per
  allocator) from each run's ``evaluations.npz``: mean +- std over the runs evaluated at the same timesteps, a
  line of its own for a run evaluated elsewhere (another budget or ``--eval-freq``).
* :func:`plot_kl_allocation`: per-agent KL thresholds and realised KL (and improvement, update
  position) over training, from a run's ``progress.csv`` (``train/<agent>/threshold`` ...).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Curve",
    "find_runs",
    "group_runs",
    "learning_curves",
    "load_evaluations",
    "plot_kl_allocation",
    "plot_learning_curves",
    "read_progress",
]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def _run_file(path: str | Path, name: str, hint: str) -> Path:
    """``path`` itself, or ``path / name`` when ``path`` is a run folder; ``FileNotFoundError`` if missing."""
    file = Path(path)
    if file.is_dir():
        file = file / name
    if not file.is_file():
        raise FileNotFoundError(f"No {name} in {file.parent} ({hint})")
    return file


def load_evaluations(run: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and mean evaluation return of a run (``evaluations.npz``, as SB3's ``EvalCallback`` writes).

    Evaluations at the same timestep (the final evaluation after the last update) keep the last one.

    :param run: the run folder or the ``.npz`` file
    :raises FileNotFoundError: if there is no ``evaluations.npz``
    """
    path = _run_file(run, "evaluations.npz", "train with evaluation to get one")
    with np.load(path) as data:
        timesteps = np.asarray(data["timesteps"], dtype=float)
        results = np.asarray(data["results"], dtype=float)
    means = results.reshape(len(timesteps), -1).mean(axis=1) if len(timesteps) else np.zeros(0)
    last: dict[float, float] = {}
    for t, m in zip(timesteps, means):
        last[float(t)] = float(m)
    steps = np.array(sorted(last))
    return steps, np.array([last[t] for t in steps])


def read_progress(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of an SB3 ``progress.csv`` as float arrays (NaN where a row has no value).

    :param path: the run folder or the ``progress.csv``
    :raises FileNotFoundError: if there is no ``progress.csv``
    """
    path = _run_file(path, "progress.csv", "the train command writes one")
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    columns: dict[str, np.ndarray] = {}
    for key in rows[0].keys() if rows else []:
        values = []
        for row in rows:
            try:
                values.append(float(row.get(key) or "nan"))
            except ValueError:
                values.append(math.nan)
        columns[key] = np.asarray(values)
    return columns


def find_runs(log_folder: str | Path, env_id: str) -> list[Path]:
    """The run folders of ``env_id`` under ``<log_folder>/hatrpo``, by experiment id."""
    from sb3_hatrpo.zoo.utils import ALGO, env_folder_name

    prefix = env_folder_name(env_id) + "_"
    root = Path(log_folder) / ALGO
    runs = [p for p in root.glob(f"{prefix}*") if p.is_dir() and p.name[len(prefix) :].isdigit()]
    return sorted(runs, key=lambda p: int(p.name[len(prefix) :]))


def _run_args(run: Path) -> dict[str, Any]:
    from sb3_hatrpo.zoo.config import load_yaml

    for args_file in run.glob("*/args.yml"):
        data = load_yaml(args_file)  # alias-bomb safe
        if isinstance(data, dict):
            return data
    return {}


def group_runs(runs: Iterable[str | Path], by: str = "allocator") -> dict[str, list[Path]]:
    """Group run folders into curves: by a key of their ``args.yml`` (``allocator``, ``env`` ...) or ``run``.

    :param runs: run folders
    :param by: the ``args.yml`` key, or ``"run"`` for one curve per run
    """
    groups: dict[str, list[Path]] = {}
    for run in map(Path, runs):
        label = run.name if by == "run" else str(_run_args(run).get(by, "?"))
        groups.setdefault(label, []).append(run)
    return groups


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Curve:
    """One line of a learning-curve plot: the mean and std over runs evaluated at the same timesteps.

    :param label: The legend entry.
    :param group: The group (e.g. allocator) it belongs to: curves of a group share a colour.
    :param steps: The timesteps of the evaluations.
    :param mean: Mean evaluation return over the runs, per timestep.
    :param std: Their standard deviation (0 for one run).
    :param runs: The run folders.
    """

    label: str
    group: str
    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    runs: list[Path]


def learning_curves(groups: Mapping[str, Sequence[str | Path]]) -> list[Curve]:
    """The curves of groups of runs: within a group, one curve per set of runs evaluated at the same timesteps.

    Runs are never interpolated onto each other: two runs evaluated at different timesteps (another budget or
    ``--eval-freq``) are two lines, each at its own timesteps, not a mean of unrelated points.

    :param groups: ``{label: [run folders]}``
    :raises FileNotFoundError: if a run has no ``evaluations.npz``
    """
    curves = []
    for label, runs in groups.items():
        by_grid: dict[tuple[float, ...], list[tuple[Path, np.ndarray]]] = {}
        for run in map(Path, runs):
            steps, values = load_evaluations(run)
            if len(steps):
                by_grid.setdefault(tuple(steps), []).append((run, values))
        for grid, members in by_grid.items():
            values = np.stack([v for _, v in members])
            if len(by_grid) == 1:
                name = f"{label} (n={len(members)})"
            elif len(members) == 1:
                name = f"{label}: {members[0][0].name}"
            else:
                name = f"{label} (n={len(members)}, {int(grid[-1]):,} steps)"
            curves.append(
                Curve(name, label, np.array(grid), values.mean(axis=0), values.std(axis=0), [r for r, _ in members])
            )
    return curves


def readable_axes(axis: Any) -> None:
    """Timesteps as 20k / 1.5M and plain numbers on the y-axis (no ``1e-5+9.495e-1`` offset label).

    :param axis: A matplotlib ``Axes``.
    """
    from matplotlib.ticker import EngFormatter, ScalarFormatter

    axis.xaxis.set_major_formatter(EngFormatter(sep=""))
    y_formatter = ScalarFormatter(useOffset=False)
    y_formatter.set_scientific(False)
    axis.yaxis.set_major_formatter(y_formatter)


def plot_learning_curves(
    groups: Mapping[str, Sequence[str | Path]] | Sequence[str | Path],
    output: str | Path,
    title: str | None = None,
) -> Path:
    """Evaluation return over timesteps, mean +- std over the runs (seeds) of each group (see :func:`learning_curves`).

    :param groups: ``{label: [run folders]}``, or a list of run folders (grouped by allocator)
    :param output: the PNG to write
    :param title: the figure title
    :return: the written file
    :raises FileNotFoundError: if a run has no ``evaluations.npz``
    :raises ValueError: if there are no runs
    """
    if not isinstance(groups, Mapping):
        groups = group_runs(groups)
    if not groups or not any(groups.values()):
        raise ValueError("No runs to plot")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    group_color = {label: colors[i % len(colors)] for i, label in enumerate(groups)}
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for curve in learning_curves(groups):
        index = seen[curve.group] = seen.get(curve.group, -1) + 1
        color = group_color[curve.group]
        # A marker on short curves: a run evaluated once (shorter than --eval-freq) is one visible point
        marker = "o" if len(curve.steps) < 20 else None
        axis.plot(curve.steps, curve.mean, color=color, linestyle=styles[index % len(styles)], marker=marker,
                  label=curve.label)  # fmt: skip
        if len(curve.runs) > 1:
            axis.fill_between(curve.steps, curve.mean - curve.std, curve.mean + curve.std, color=color, alpha=0.2)
    readable_axes(axis)
    axis.set_xlabel("timesteps")
    axis.set_ylabel("evaluation return (deterministic)")
    axis.set_title(title or "Learning curves (mean ± std over seeds)")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, output, plt)


def plot_kl_allocation(run: str | Path, output: str | Path | None = None, title: str | None = None) -> Path:
    """Per-agent KL thresholds and realised KL over training; improvement and update position below.

    :param run: a run folder or its ``progress.csv``
    :param output: the PNG to write (default ``<run>/kl_allocation.png``)
    :param title: the figure title
    :return: the written file
    :raises FileNotFoundError: without ``progress.csv``
    :raises ValueError: if the log holds no ``train/<agent>/threshold`` column (no iteration logged yet)
    """
    run = Path(run)
    columns = read_progress(run)
    agents = sorted(
        key[len("train/") : -len("/threshold")]
        for key in columns
        if key.startswith("train/") and key.endswith("/threshold")
    )
    if not agents:
        raise ValueError(f"No train/<agent>/threshold columns in {run}: no training iteration was logged yet")
    rows, x, x_label = _iteration_rows(columns, f"train/{agents[0]}/threshold")
    plt = _pyplot()
    figure, (ax_kl, ax_imp, ax_pos) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, agent in enumerate(agents):
        color = colors[i % len(colors)]
        ax_kl.plot(x, columns[f"train/{agent}/threshold"][rows], color=color, label=f"{agent} threshold")
        if f"train/{agent}/kl" in columns:
            ax_kl.plot(x, columns[f"train/{agent}/kl"][rows], color=color, linestyle="--", label=f"{agent} KL")
        if f"train/{agent}/improvement" in columns:
            ax_imp.plot(x, columns[f"train/{agent}/improvement"][rows], color=color, label=agent)
        if f"train/{agent}/position" in columns:
            ax_pos.step(x, columns[f"train/{agent}/position"][rows], color=color, where="post", label=agent)
    for key, style, label in (("train/kl_budget", ":", "joint budget"), ("train/total_kl", "-.", "total KL")):
        if key in columns:
            ax_kl.plot(x, columns[key][rows], color="black", linestyle=style, label=label)
    ax_kl.set_ylabel("KL")
    ax_kl.set_title(title or f"KL allocation per agent ({run.name if run.is_dir() else run.parent.name})")
    ax_kl.legend(fontsize="small", ncol=2)
    ax_imp.set_ylabel("surrogate improvement")
    ax_imp.legend(fontsize="small")
    ax_pos.set_ylabel("update position")
    ax_pos.set_xlabel(x_label)
    ax_pos.set_yticks(range(len(agents)))
    for axis in (ax_kl, ax_imp, ax_pos):
        axis.grid(alpha=0.3)
        readable_axes(axis)
    default = (run if run.is_dir() else run.parent) / "kl_allocation.png"
    return _save(figure, output or default, plt)


def _iteration_rows(columns: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows holding each iteration's ``train/`` records once, and their x: the timesteps trained on.

    SB3 dumps the logger before ``train()``, so a row's ``time/total_timesteps`` is a later rollout's;
    ``train/n_updates`` times the rollout size (total timesteps / iterations) is the iteration's own.
    """
    n = len(columns[key])
    has = ~np.isnan(columns[key])
    updates = columns.get("train/n_updates")
    if updates is None or np.isnan(updates[has]).any():
        x = columns.get("time/total_timesteps", np.arange(n, dtype=float))
        return np.flatnonzero(has), x[has], "timesteps"
    last_row: dict[float, int] = {}
    for row in np.flatnonzero(has):
        last_row[float(updates[row])] = int(row)  # the final evaluation's dump repeats the last iteration
    rows = np.array([last_row[u] for u in sorted(last_row)], dtype=int)
    x = np.array(sorted(last_row))
    steps, iterations = columns.get("time/total_timesteps"), columns.get("time/iterations")
    if steps is not None and iterations is not None:
        both = ~np.isnan(steps) & ~np.isnan(iterations) & (iterations > 0)
        if both.any():
            per_iteration = float(np.median(steps[both] / iterations[both]))
            return rows, x * per_iteration, "timesteps"
    return rows, x, "iteration"


def _save(figure: Any, output: str | Path, plt: Any) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
