"""Fisher-vector products: the analytic product of Gaussian actors against the double backward, ms per product.

On one rollout of MaMuJoCo HalfCheetah-2x3 with the zoo config's settings (``[128, 128, 128]`` ReLU
actors, sigmoid std, observation normalisation, 4 envs x 1000 steps = 4,000 samples), for each
agent and each ``fisher_product`` path: the time of one product once the agent's graph is traced, the
time of the trace itself (the first product minus a traced one: the KL gradient with its graph for
the double backward, the mean network's graph and its backward for the analytic product), and both
amortised over the products one direction takes (``cg_max_steps + 2``: CG's first residual, its
steps, the curvature). Paths alternate within each repeat, so drifts in machine load hit both alike.
``--variants`` also times two other ways to get ``J v`` (``torch.func.linearize``, traced once, and
``torch.func.jvp`` per product) with the same cached ``vjp`` for ``J^T u``.

    python benchmarks/fisher_product.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch as th
from torch.func import functional_call, jvp, linearize, vjp

from sb3_hatrpo import HATRPO, make_vec_env
from sb3_hatrpo.trust_region import TrustRegionPlanner, _ActionMean, _AgentData

try:  # run as a script (python benchmarks/fisher_product.py) or as a module
    from mamujoco import zoo_settings  # type: ignore[import-not-found]
except ImportError:
    from benchmarks.mamujoco import zoo_settings

ENV_ID = "mamujoco:HalfCheetah-2x3"
PATHS = ("double_backward", "analytic")


def rollout_planner_factory(seed: int) -> tuple[Callable[[str], TrustRegionPlanner], int]:
    """A factory of fresh planners (fresh traces) on one zoo-settings rollout, and the products per direction."""
    settings, n_envs = zoo_settings(ENV_ID)
    env = make_vec_env(ENV_ID, n_envs=n_envs, seed=seed)
    model = HATRPO("MlpPolicy", env, **{**settings, "seed": seed, "device": "cpu", "num_threads": None})
    model.learn(model.n_steps * n_envs)  # one rollout (its update also sets the observation statistics)
    data = model.rollout_buffer.get()
    env.close()
    return (lambda path: model.make_planner(data, fisher_product=path)), model.cg_max_steps + 2


def time_path(data: _AgentData, vectors: list[th.Tensor], damping: float) -> tuple[float, float]:
    """``(first product incl. the trace, median of the later products)`` in ms, on fresh agent data."""
    start = time.perf_counter()
    data.fisher_vector_product(vectors[0], damping)
    first = time.perf_counter() - start
    times = []
    for vector in vectors[1:]:
        start = time.perf_counter()
        data.fisher_vector_product(vector, damping)
        times.append(time.perf_counter() - start)
    return 1000 * first, 1000 * statistics.median(times)


def torch_func_variants(data: _AgentData, vectors: list[th.Tensor]) -> dict[str, tuple[float, float]]:
    """``{variant: (trace ms, ms per product)}`` for ``J v`` by ``linearize`` (traced once) or ``jvp`` (per product)."""
    actor = data.actor
    names = {id(p): name for name, p in actor.named_parameters()}
    sizes = [p.numel() for p in data.params]
    mean_keys = [f"actor.{names[id(p)]}" for p in data.params if p is not actor.log_std]
    std_index = next(i for i, p in enumerate(data.params) if p is actor.log_std)
    old = [c.view_as(p) for c, p in zip(data.old_params.split(sizes), data.params, strict=True)]
    primals = dict(zip(mean_keys, [t for i, t in enumerate(old) if i != std_index], strict=True))
    reference = data.gaussian_fisher()  # for the weights and the std block (and a check of the result)
    results = {}
    for variant in ("linearize", "jvp"):
        start = time.perf_counter()
        with th.no_grad():
            features = actor._features(data.observations)
        mean_of = _ActionMean(actor)

        def mean(params: dict[str, th.Tensor], mean_of=mean_of, features=features) -> th.Tensor:
            return functional_call(mean_of, params, (features,))

        _, transpose = vjp(mean, primals)
        linearized = linearize(mean, primals)[1] if variant == "linearize" else None
        trace = time.perf_counter() - start

        def product(vector: th.Tensor, linearized=linearized, transpose=transpose, mean=mean) -> th.Tensor:
            chunks = vector.split(sizes)
            tangents = dict(
                zip(mean_keys, [c.view_as(p) for i, (c, p) in enumerate(zip(chunks, old)) if i != std_index])
            )
            jv = linearized(tangents) if linearized is not None else jvp(mean, (primals,), (tangents,))[1]
            (back,) = transpose(jv * reference.weights)
            blocks = [back[key].flatten() for key in mean_keys]
            assert reference.std_diagonal is not None
            blocks.insert(std_index, reference.std_diagonal * chunks[std_index])
            return th.cat(blocks)

        times = []
        for vector in vectors:
            start = time.perf_counter()
            result = product(vector)
            times.append(time.perf_counter() - start)
        error = float((result - reference(vectors[-1])).norm() / reference(vectors[-1]).norm())
        assert error < 1e-5, (variant, error)
        results[variant] = (1000 * trace, 1000 * statistics.median(times[1:]))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="fresh traces per agent and path")
    parser.add_argument("--products", type=int, default=12, help="products timed per trace")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", action="store_true", help="also time torch.func linearize and jvp for J v")
    args = parser.parse_args(argv)
    th.set_num_threads(args.threads)
    # torch.func.linearize's constant folding warns about its own graph module
    warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node", category=UserWarning)
    make_planner, per_direction = rollout_planner_factory(args.seed)
    damping = make_planner("analytic").cg_damping
    agents = make_planner("analytic").agents
    generator = th.Generator().manual_seed(args.seed)
    first: dict[str, list[float]] = {path: [] for path in PATHS}
    later: dict[str, list[float]] = {path: [] for path in PATHS}
    variants: dict[str, list[tuple[float, float]]] = {"linearize": [], "jvp": []}
    errors = []
    for _ in range(args.repeats):
        for agent in agents:
            planners = {path: make_planner(path) for path in PATHS}
            n_params = planners["analytic"]._data[agent].old_params.numel()
            vectors = [th.randn(n_params, generator=generator) for _ in range(args.products + 1)]
            for path in PATHS:  # alternating
                data = planners[path]._data[agent]
                assert data.fisher_path == path
                trace_and_product, product = time_path(data, vectors, damping)
                first[path].append(trace_and_product)
                later[path].append(product)
            a, b = (planners[path]._data[agent].fisher_vector_product(vectors[0], 0.0) for path in PATHS)
            errors.append(float((b - a).norm() / a.norm()))
            if args.variants:
                for name, figures in torch_func_variants(planners["analytic"]._data[agent], vectors).items():
                    variants[name].append(figures)
    n_samples = make_planner("analytic").n_samples
    print(
        f"{ENV_ID}, zoo settings: {len(agents)} actors of {n_params:,} parameters, {n_samples:,} samples, "
        f"torch threads {args.threads}; medians of {args.repeats} traces x {len(agents)} agents, "
        f"{args.products} products each"
    )
    print(f"relative error analytic vs double backward (damping 0): max {max(errors):.1e}")
    header = f"{'path':20s} {'ms / product':>12s} {'trace ms':>9s} {f'ms / product, {per_direction} per trace':>30s}"
    print(header)
    amortised = {}
    for path in PATHS:
        product = statistics.median(later[path])
        trace = statistics.median(f - p for f, p in zip(first[path], later[path], strict=True))
        amortised[path] = product + trace / per_direction
        print(f"{path:20s} {product:12.2f} {trace:9.2f} {amortised[path]:30.2f}")
    for name, figures in variants.items():
        if figures:
            trace = statistics.median(t for t, _ in figures)
            product = statistics.median(p for _, p in figures)
            print(f"{'torch.func ' + name:20s} {product:12.2f} {trace:9.2f} {product + trace / per_direction:30.2f}")
    ratio = amortised["double_backward"] / amortised["analytic"]
    print(f"analytic / double backward, amortised: {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
