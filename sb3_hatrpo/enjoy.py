"""Watch or evaluate a trained run: ``python -m sb3_hatrpo.enjoy --env games:differential -f logs``.

Finds the run in rl-zoo's layout (``<log folder>/hatrpo/<env>_<id>``, ``--exp-id 0`` = the latest),
rebuilds the env with the config that trained it (its ``env_kwargs`` and ``env_wrapper``), loads the
model (checking every agent's spaces against the env), runs ``-n`` episodes and prints each episode's
return and length, then their mean +- std. ``--record-video`` streams the rendered frames to an mp4
(``imageio-ffmpeg``, in the ``zoo`` extra) or a gif (:mod:`sb3_hatrpo.zoo.video`). Without a display (Linux,
no ``DISPLAY``/``WAYLAND_DISPLAY``) it does not open a window: it says so and runs without rendering.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sb3_hatrpo.extras import require
from sb3_hatrpo.zoo.utils import (
    CLIError,
    HelpFormatter,
    add_allow_import_argument,
    env_folder_name,
    find_run,
    run_cli,
    set_num_threads,
)

__all__ = ["EnjoyResult", "display_available", "find_model", "main", "make_parser", "run"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_hatrpo.enjoy",
        description="Run a trained HATRPO model for some episodes and report the returns.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--env", required=True, help="env id the model was trained on")
    parser.add_argument("-f", "--log-folder", default="logs", help="root of the run folders")
    parser.add_argument("--exp-id", type=int, default=0, help="experiment id; 0: the latest run")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--load-best", action="store_true", help="load best_model.zip")
    group.add_argument("--load-checkpoint", type=int, metavar="N", help="load the checkpoint rl_model_N_steps.zip")
    group.add_argument("--load-last-checkpoint", action="store_true", help="load the latest checkpoint")
    parser.add_argument("-n", "--n-episodes", type=int, default=5, help="episodes to run")
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="act with each distribution's mode (--no-deterministic samples)",
    )
    parser.add_argument("--no-render", action="store_true", help="do not render")
    parser.add_argument(
        "--record-video",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the frames to PATH (.mp4 or .gif); default <run>/videos/<env>.mp4 (gif without ffmpeg)",
    )
    parser.add_argument("--fps", type=int, default=30, help="frames per second of the video")
    parser.add_argument("--env-kwargs", nargs="+", default=[], metavar="KEY:VALUE", help="override make_env arguments")
    parser.add_argument("--seed", type=int, default=0, help="seed of the env")
    parser.add_argument("--device", default="auto", help="torch device")
    parser.add_argument("--verbose", type=int, default=1, help="2: tracebacks of errors")
    add_allow_import_argument(parser, "let the run's config.yml name env_wrapper callables of MODULE")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="torch CPU threads; small MLPs run fastest on 1 (threads spin on a busy machine); 0: torch's default",
    )
    return parser


def find_model(run_dir: Path, env_id: str, load_best: bool = False, checkpoint: int | None = None,
               last_checkpoint: bool = False) -> Path:  # fmt: skip
    """The model file of a run folder.

    :raises CLIError: if it is missing, listing the models that are there
    """
    checkpoints = {
        int(m.group(1)): p
        for p in run_dir.glob("rl_model_*_steps.zip")
        if (m := re.match(r"rl_model_(\d+)_steps", p.stem))
    }
    if load_best:
        path = run_dir / "best_model.zip"
    elif checkpoint is not None:
        path = run_dir / f"rl_model_{checkpoint}_steps.zip"
        if not path.is_file():
            raise CLIError(
                f"No checkpoint at {checkpoint} steps in {run_dir}; checkpoints: {sorted(checkpoints) or 'none'}"
            )
    elif last_checkpoint:
        if not checkpoints:
            raise CLIError(f"No checkpoints (rl_model_<N>_steps.zip) in {run_dir}: train with --save-freq")
        path = checkpoints[max(checkpoints)]
    else:
        path = run_dir / f"{env_folder_name(env_id)}.zip"
    if not path.is_file():
        models = sorted(p.name for p in run_dir.glob("*.zip"))
        found = f"models there: {', '.join(models)}" if models else "it holds no model (*.zip)"
        raise CLIError(
            f"No trained model {path.name} in {run_dir} (training unfinished or interrupted?); {found}. "
            "Use --load-best, --load-checkpoint N or another --exp-id."
        )
    return path


@dataclass
class EnjoyResult:
    """Episode returns and lengths of an ``enjoy`` run, and the video written (if any)."""

    returns: list[float]
    lengths: list[int]
    model_path: Path
    video_path: Path | None = None


def _render_modes(env_id: str, env_kwargs: dict[str, Any]) -> list[str]:
    """The render modes the env declares (MaMuJoCo declares them on its single-agent env)."""
    from sb3_hatrpo.envs import make_env

    env = make_env(env_id, **env_kwargs)
    try:
        metadata = getattr(env, "metadata", None) or {}
        modes = list(metadata.get("render_modes", []))
        inner = getattr(env, "single_agent_env", None)
        if not modes and inner is not None:
            modes = list((getattr(inner, "metadata", None) or {}).get("render_modes", []))
        return modes
    finally:
        env.close()


def display_available() -> bool:
    """Whether a window can open: on Linux, an X11 or Wayland display is set; elsewhere assumed.

    Without one, GLFW (MuJoCo's ``human`` rendering) aborts the process with a C assertion.
    """
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: exit status 0, or 2 with a one-line error.

    :param argv: the arguments (default ``sys.argv[1:]``)
    """
    run(argv)


def run(argv: Sequence[str] | None = None) -> EnjoyResult:
    """:func:`main` for Python callers: returns the episodes' returns and lengths (:class:`EnjoyResult`).

    :param argv: the command's arguments
    """
    args = make_parser().parse_args(argv)
    set_num_threads(args.num_threads)

    def body() -> EnjoyResult:
        require(["yaml", *(["imageio"] if args.record_video is not None else [])], "python -m sb3_hatrpo.enjoy")
        return _enjoy(args)

    return run_cli("sb3_hatrpo.enjoy", body, traceback=args.verbose >= 2)


def _enjoy(args: argparse.Namespace) -> EnjoyResult:
    from sb3_hatrpo.hatrpo import HATRPO
    from sb3_hatrpo.validation import check_device
    from sb3_hatrpo.vec_env import make_vec_env
    from sb3_hatrpo.zoo.config import get_hyperparams, load_yaml, parse_params, prepare_hyperparams

    if args.n_episodes < 1:
        raise CLIError(f"-n/--n-episodes must be at least 1, got {args.n_episodes}")
    check_device(args.device, owner="--device")
    if not args.no_render and args.record_video is None and not display_available():
        print(
            "No display (DISPLAY is not set): not rendering. Use --record-video to write a video instead, "
            "or --no-render to skip this check.",
            file=sys.stderr,
        )
        args.no_render = True
    if args.record_video is not None and not os.environ.get("DISPLAY"):
        # Off-screen MuJoCo rendering without a display needs EGL (glfw, the default, needs X11).
        os.environ.setdefault("MUJOCO_GL", "egl")
    run_dir = find_run(args.log_folder, args.env, args.exp_id)
    model_path = find_model(run_dir, args.env, args.load_best, args.load_checkpoint, args.load_last_checkpoint)

    config_path = run_dir / env_folder_name(args.env) / "config.yml"
    if config_path.is_file():
        hyperparams = load_yaml(config_path) or {}
    else:
        warnings.warn(f"{config_path} is missing: using the zoo config's env settings", stacklevel=2)
        hyperparams, _ = get_hyperparams(args.env)
    if not isinstance(hyperparams, dict):
        raise CLIError(f"{config_path}: expected a mapping of hyperparameters, got {type(hyperparams).__name__}")
    prepared = prepare_hyperparams(hyperparams, args.allow_import)
    env_kwargs = {**prepared.env_kwargs, **parse_params(args.env_kwargs, "--env-kwargs")}

    render_mode: str | None = None
    if args.record_video is not None or not args.no_render:
        wanted = "rgb_array" if args.record_video is not None else "human"
        modes = _render_modes(args.env, env_kwargs)
        if wanted in modes:
            render_mode = wanted
        elif args.record_video is not None or modes:
            print(f"Note: {args.env} cannot render in {wanted!r} mode (its modes: {modes}); not rendering",
                  file=sys.stderr)  # fmt: skip
    if render_mode is not None:
        env_kwargs["render_mode"] = render_mode

    try:
        env = make_vec_env(args.env, n_envs=1, seed=args.seed, wrapper=prepared.env_wrapper, env_kwargs=env_kwargs)
    except Exception as error:
        if render_mode is None:
            raise
        print(f"Cannot create the env with render_mode={render_mode!r} ({error}); not rendering", file=sys.stderr)
        env_kwargs.pop("render_mode")
        render_mode = None
        env = make_vec_env(args.env, n_envs=1, seed=args.seed, wrapper=prepared.env_wrapper, env_kwargs=env_kwargs)
    video = None
    if render_mode == "rgb_array":
        from sb3_hatrpo.zoo.video import VideoWriter

        target = (
            Path(args.record_video) if args.record_video else run_dir / "videos" / f"{env_folder_name(args.env)}.mp4"
        )
        video = VideoWriter(target, args.fps)
    video_path = None
    try:
        # seed: else loading re-seeds the env with the training seed (rl-zoo passes it the same way)
        model = HATRPO.load(model_path, env=env, device=args.device, seed=args.seed)
        print(f"Loaded {model_path} ({', '.join(model.agents)})")
        returns, lengths = _run(model, env, args.n_episodes, args.deterministic, render_mode, video)
    finally:
        env.close()
        if video is not None:
            video_path = video.close()
    if video is not None:
        if video_path is not None:
            print(f"Video: {video_path} ({video.n_frames} frames)")
        else:
            print("No frames were rendered: no video written", file=sys.stderr)

    r, length = np.asarray(returns), np.asarray(lengths)
    print(
        f"{len(r)} episodes: return {r.mean():.4g} +/- {r.std():.4g}, length {length.mean():.1f} +/- {length.std():.1f}"
    )
    return EnjoyResult(returns=returns, lengths=lengths, model_path=model_path, video_path=video_path)


def _run(
    model: Any, env: Any, n_episodes: int, deterministic: bool, render_mode: str | None, video: Any
) -> tuple[list[float], list[int]]:
    returns: list[float] = []
    lengths: list[int] = []
    observations = env.reset()
    episode_return, episode_length = 0.0, 0
    render = render_mode is not None
    while len(returns) < n_episodes:
        actions, _ = model.predict(observations, deterministic=deterministic)
        observations, rewards, dones, infos = env.step(actions)
        episode_return += float(rewards[0])
        episode_length += 1
        if render:
            try:
                frame = env.render()
            except Exception as error:  # e.g. no display for "human"
                print(
                    f"Rendering failed ({error.__class__.__name__}: {error}); continuing without. Without a display "
                    "use --record-video, or MUJOCO_GL=egl/osmesa (MuJoCo), SDL_VIDEODRIVER=dummy (pygame)",
                    file=sys.stderr,
                )
                render = False
            else:
                if video is not None and frame is not None:
                    video.append(np.asarray(frame))
        if dones[0]:
            episode = infos[0].get("episode", {})
            returns.append(float(episode.get("r", episode_return)))
            lengths.append(int(episode.get("l", episode_length)))
            print(f"episode {len(returns)}: return {returns[-1]:.4g}, length {lengths[-1]}")
            episode_return, episode_length = 0.0, 0
    return returns, lengths


if __name__ == "__main__":
    main()
