"""Plot training runs: ``python -m sb3_hatrpo.plot curves|kl ...`` (PNG files, no display needed).

* ``curves``: learning curves (mean +- std over seeds) of every run of ``--env`` in ``-f``, one curve
  per allocator (``--group-by``), or of the run folders given with ``--runs``; runs evaluated at other
  timesteps get lines of their own.

The plotting functions are in :mod:`sb3_hatrpo.zoo.run_plots`.
* ``kl``: per-agent KL thresholds, realised KL, improvement and update order of one run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from sb3_hatrpo.extras import require
from sb3_hatrpo.zoo.utils import ALGO, CLIError, env_folder_name, find_run, run_cli

__all__ = ["main", "make_parser", "run"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_hatrpo.plot", description="Plot learning curves and KL allocations of training runs."
    )
    parser.add_argument("--verbose", type=int, default=1, help="2: tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)
    curves = commands.add_parser("curves", help="evaluation return over timesteps, mean +- std over seeds")
    curves.add_argument("--env", help="env id: plot all its runs in the log folder")
    curves.add_argument("-f", "--log-folder", default="logs")
    curves.add_argument("--runs", nargs="+", default=None, help="run folders (instead of --env)")
    curves.add_argument("--group-by", default="allocator", help="args.yml key that makes a curve, or 'run'")
    curves.add_argument("-o", "--output", default=None, help="PNG; default <log>/hatrpo/plots/<env>_curves.png")
    kl = commands.add_parser("kl", help="per-agent KL thresholds and realised KL of one run")
    kl.add_argument("--env", help="env id (with -f and --exp-id)")
    kl.add_argument("-f", "--log-folder", default="logs")
    kl.add_argument("--exp-id", type=int, default=0, help="0: the latest run")
    kl.add_argument("--run", default=None, help="a run folder (instead of --env)")
    kl.add_argument("-o", "--output", default=None, help="PNG; default <run>/kl_allocation.png")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: exit status 0, or 2 with a one-line error.

    :param argv: the arguments (default ``sys.argv[1:]``)
    """
    run(argv)


def run(argv: Sequence[str] | None = None) -> Path:
    """:func:`main` for Python callers: returns the written PNG.

    :param argv: the command's arguments
    """
    args = make_parser().parse_args(argv)

    def body() -> Path:
        require(["matplotlib", "yaml"], "python -m sb3_hatrpo.plot")
        return _plot(args)

    return run_cli("sb3_hatrpo.plot", body, traceback=args.verbose >= 2)


def _plot(args: argparse.Namespace) -> Path:
    from sb3_hatrpo.zoo.run_plots import find_runs, group_runs, plot_kl_allocation, plot_learning_curves

    if args.command == "curves":
        if args.runs:
            runs = [Path(r) for r in args.runs]
            default = Path(args.log_folder) / ALGO / "plots" / "curves.png"
        elif args.env:
            runs = find_runs(args.log_folder, args.env)
            if not runs:
                raise CLIError(f"No runs of {args.env!r} in {Path(args.log_folder) / ALGO}")
            default = Path(args.log_folder) / ALGO / "plots" / f"{env_folder_name(args.env)}_curves.png"
        else:
            raise CLIError("curves: give --env (and -f) or --runs")
        output = plot_learning_curves(
            group_runs(runs, args.group_by), args.output or default, title=f"{args.env or ''} learning curves".strip()
        )
    else:
        if args.run:
            run = Path(args.run)
        elif args.env:
            run = find_run(args.log_folder, args.env, args.exp_id)
        else:
            raise CLIError("kl: give --env (and -f, --exp-id) or --run")
        output = plot_kl_allocation(run, args.output)
    print(f"Wrote {output}")
    return output


if __name__ == "__main__":
    main()
