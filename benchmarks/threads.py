"""Torch threads for HATRPO's small MLPs: wall time of the same training at 1 and 2 threads, idle and busy.

The README quick start's settings (MPE speaker-listener, 4 copies, KKT), ``--timesteps`` steps per run, the thread
counts interleaved in every repeat. ``--busy N`` runs N processes spinning on the CPU meanwhile, as another job
on the machine would::

    python benchmarks/threads.py --timesteps 16384 --repeats 3            # as the machine is
    python benchmarks/threads.py --timesteps 16384 --repeats 3 --busy 2   # with 2 extra busy processes
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np

from sb3_hatrpo import HATRPO, make_vec_env


def _spin(stop: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def train_seconds(num_threads: int, timesteps: int) -> float:
    """Wall time of ``learn(timesteps)`` from a fresh model, envs made beforehand."""
    env = make_vec_env("mpe:simple_speaker_listener_v4", n_envs=4, seed=0)
    model = HATRPO(
        "MlpPolicy",
        env,
        allocator="kkt",
        allocator_kwargs={"min_kl_fraction": 0.5},
        target_kl=0.01,
        seed=0,
        num_threads=num_threads,
    )
    start = time.perf_counter()
    model.learn(timesteps)
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--busy", type=int, default=0, help="extra processes spinning on the CPU meanwhile")
    args = parser.parse_args(argv)
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for process in spinners:
        process.start()
    try:
        times: dict[int, list[float]] = {n: [] for n in args.threads}
        for _ in range(args.repeats):
            for n in args.threads:
                times[n].append(train_seconds(n, args.timesteps))
    finally:
        stop.set()
        for process in spinners:
            process.join()
    load = os.getloadavg()[0]
    print(f"{args.timesteps} steps, {args.busy} extra busy processes, load average {load:.1f}, {os.cpu_count()} CPUs")
    base = float(np.median(times[args.threads[0]]))
    for n in args.threads:
        median = float(np.median(times[n]))
        runs = ", ".join(f"{t:.1f}" for t in times[n])
        print(f"  {n} thread(s): {median:6.1f} s median ({runs})  {median / base:.2f}x")


if __name__ == "__main__":
    main()
