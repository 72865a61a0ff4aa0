"""How one iteration's KL budget is split across agents, and in which order they move.

* :class:`UniformAllocator` — HATRPO (Kuba et al., 2022): every agent gets ``delta_total / n``
  (= ``target_kl``), in a fresh random order each iteration.
* :class:`KKTAllocator` — HATRPO-W (Shek, Shi, Tokekar, arXiv 2508.10340): thresholds from the
  KKT conditions of ``max sum_i c_i sqrt(2 delta_i) s.t. sum_i delta_i = delta_total``
  (water-filling, :func:`kkt_thresholds`), agents in descending order of potential.
* :class:`GreedyAllocator` — HATRPO-G (same paper): agents picked one at a time by
  improvement-to-divergence ratio, each spending part of what is left of the budget.

DESIGN §5 is the specification. A custom allocator subclasses :class:`BaseAllocator` and
implements :meth:`BaseAllocator.update_agents` with the planner's ``direction`` and ``step``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from sb3_hatrpo.trust_region import SearchDirection, StepResult, TrustRegionPlanner


def kkt_thresholds(potentials: np.ndarray | list[float], total_kl: float, min_kl: float = 0.0) -> np.ndarray:
    """Exact thresholds: ``max sum_i c_i sqrt(2 delta_i)`` s.t. ``sum_i delta_i = total_kl``, ``delta_i >= min_kl``.

    The objective is concave and the constraints linear, so the KKT conditions are
    sufficient. They give the water-filling solution ``delta_i = max(min_kl, c_i^2 s)``
    with ``s = 1 / (2 lambda^2)`` chosen so the thresholds sum to ``total_kl``. Sorting
    the ``c_i^2`` makes it exact in O(n log n): if the ``k`` largest are above the floor,
    ``s = (total_kl - (n - k) min_kl) / sum_{top k} c_i^2``. Without an active floor it is
    ``delta_i = total_kl c_i^2 / sum_j c_j^2``; if every ``c_i`` is 0 the split is uniform.

    :param potentials: the agents' potentials ``c_i >= 0``
    :param total_kl: the joint budget ``delta_total > 0``
    :param min_kl: the floor ``delta_min``, with ``n * min_kl <= total_kl``
    :return: thresholds ``delta_i``, in the order of ``potentials``
    """
    c = np.asarray(potentials, dtype=np.float64).reshape(-1)
    n = c.size
    if n == 0:
        raise ValueError("kkt_thresholds needs at least one potential")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError(f"potentials must be finite and non-negative, got {c.tolist()}")
    if not np.isfinite(total_kl) or total_kl <= 0:
        raise ValueError(f"total_kl must be a positive number, got {total_kl}")
    if not np.isfinite(min_kl) or min_kl < 0:
        raise ValueError(f"min_kl must be a non-negative number, got {min_kl}")
    if n * min_kl > total_kl * (1 + 1e-12):
        raise ValueError(
            f"infeasible floor: {n} agents x min_kl {min_kl} = {n * min_kl} exceeds total_kl {total_kl}; "
            "lower min_kl (or min_kl_fraction) or raise the budget"
        )
    weights = c**2
    if weights.sum() == 0.0:
        return np.full(n, total_kl / n)
    order = np.argsort(-weights, kind="stable")
    sorted_w = weights[order]
    prefix = np.cumsum(sorted_w)
    thresholds = np.full(n, min_kl)
    for k in range(1, n + 1):  # the k largest weights are above the floor
        if sorted_w[k - 1] == 0.0:
            break
        scale = (total_kl - (n - k) * min_kl) / prefix[k - 1]
        smallest_free_ok = sorted_w[k - 1] * scale >= min_kl
        largest_clamped_ok = k == n or sorted_w[k] * scale <= min_kl
        if smallest_free_ok and largest_clamped_ok:
            thresholds[order[:k]] = sorted_w[:k] * scale
            return thresholds
    # Only reached through rounding when every free weight sits on the floor: all at the floor.
    return np.full(n, total_kl / n)


TIE_BREAKS = ("order", "random")


def check_tie_break(tie_break: str) -> None:
    """``ValueError`` unless ``tie_break`` is one of :data:`TIE_BREAKS`."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")


def candidate_order(agents: list[str], tie_break: str, rng: np.random.Generator) -> list[str]:
    """The order in which equal scores are resolved: ``"order"`` keeps ``agents`` (``possible_agents``,
    the package's original behaviour: the first agent wins every tie), ``"random"`` permutes them with
    the iteration's generator so no agent is favoured by its position."""
    if tie_break == "random":
        return [agents[i] for i in rng.permutation(len(agents))]
    return list(agents)


def rank(scores: dict[str, float], tie_break: str, rng: np.random.Generator) -> list[str]:
    """Agents by descending score, ties resolved by :func:`candidate_order`.

    Scores equal to 6 significant digits are ties, with either ``tie_break``: conjugate gradient starts
    from a tiny random vector, so identical agents get potentials that differ around the 8th digit, which
    would otherwise decide every tie by that noise (``"order"`` would not give it to the first agent).
    """
    pool = candidate_order(list(scores), tie_break, rng)
    return sorted(pool, key=lambda a: -float(f"{scores[a]:.6g}"))  # stable: the first of equal scores stays first


class BaseAllocator(ABC):
    """Decides, every iteration, each agent's KL threshold and the order of the updates.

    Subclasses implement :meth:`update_agents`: call ``planner.direction(agent)`` for an agent's
    search direction under the current factor ``M`` and ``planner.step(direction, threshold)`` to
    move it (``commit=False`` to measure a candidate step and restore). Return one
    :class:`StepResult` per agent, in update order; agents left unchanged are recorded with
    ``planner.skip(agent)`` at the end.

    Example — every agent in a fixed order, with thresholds proportional to given weights::

        class WeightedAllocator(BaseAllocator):
            name = "weighted"

            def __init__(self, weights):
                self.weights = weights

            def update_agents(self, planner, rng):
                total = sum(self.weights[a] for a in planner.agents)
                return [
                    planner.step(planner.direction(a), planner.total_kl * self.weights[a] / total)
                    for a in planner.agents
                ]

        model = HATRPO("MlpPolicy", env, allocator=WeightedAllocator({"agent_0": 2, "agent_1": 1}))
    """

    name: ClassVar[str] = "custom"

    @abstractmethod
    def update_agents(self, planner: TrustRegionPlanner, rng: np.random.Generator) -> list[StepResult]:
        """Update the agents of one iteration.

        :param planner: directions and steps of every agent; ``planner.total_kl`` is the budget
        :param rng: the algorithm's generator (seeded with the model), for random orders
        :return: one result per agent, in update order
        """

    @property
    def diagnostics(self) -> dict[str, float]:
        """Figures of the last iteration beyond the per-agent records, logged as ``train/<key>`` (default none)."""
        return dict(getattr(self, "_diagnostics", {}))

    def get_config(self) -> dict[str, Any]:
        """Options of this allocator, for logs and configs (public attributes by default)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({options})"


class UniformAllocator(BaseAllocator):
    """HATRPO: threshold ``delta_total / n`` (= ``target_kl``) for every agent, random order (DESIGN §5.1).

    :param pass_unused_budget: give each later agent an equal share of what is left of the
        budget instead of ``delta_total / n`` (off: plain HATRPO)
    """

    name = "uniform"

    def __init__(self, pass_unused_budget: bool = False) -> None:
        self.pass_unused_budget = pass_unused_budget

    def update_agents(self, planner: TrustRegionPlanner, rng: np.random.Generator) -> list[StepResult]:
        order = [planner.agents[i] for i in rng.permutation(planner.n_agents)]
        remaining = planner.total_kl
        results = []
        for position, agent in enumerate(order):
            share = remaining / (len(order) - position) if self.pass_unused_budget else planner.total_kl / len(order)
            result = planner.step(planner.direction(agent), share)
            remaining -= result.kl
            results.append(result)
        return results


class KKTAllocator(BaseAllocator):
    """HATRPO-W: KKT (water-filling) thresholds from the agents' potentials (DESIGN §5.2).

    1. Every agent's direction and potential ``c_i`` with ``M = A_hat``.
    2. ``delta = kkt_thresholds(c, delta_total, min_kl_fraction * delta_total / n)``.
    3. Updates in descending order of ``c_i``, each direction recomputed with the current ``M``
       (the first agent, and any agent after rejected steps, reuses step 1's).

    :param min_kl_fraction: the floor ``delta_min = min_kl_fraction * delta_total / n``, in [0, 1].
        Potentials are squared, so batch noise is too: without a floor one agent can get almost
        no budget for an iteration (DESIGN §7).
    :param pass_unused_budget: after each update, re-solve the thresholds of the agents still to
        move with what is left of the budget (the line search rarely spends all of a threshold)
    :param potential_smoothing: exponential moving average of each agent's potential across
        iterations, ``c <- smoothing * c_prev + (1 - smoothing) * c``; 0 is the paper's version
    :param tie_break: order among equal potentials (equal to 6 significant digits): ``"order"``
        (``possible_agents``, a stable sort: the first agent wins, the package's original behaviour) or
        ``"random"`` (the iteration's generator)
    """

    name = "kkt"

    def __init__(
        self,
        min_kl_fraction: float = 0.5,
        pass_unused_budget: bool = False,
        potential_smoothing: float = 0.0,
        tie_break: str = "order",
    ) -> None:
        check_tie_break(tie_break)
        self.tie_break = tie_break
        if not 0.0 <= min_kl_fraction <= 1.0:
            raise ValueError(f"min_kl_fraction must be in [0, 1], got {min_kl_fraction}")
        if not 0.0 <= potential_smoothing < 1.0:
            raise ValueError(f"potential_smoothing must be in [0, 1), got {potential_smoothing}")
        self.min_kl_fraction = min_kl_fraction
        self.pass_unused_budget = pass_unused_budget
        self.potential_smoothing = potential_smoothing
        self._smoothed: dict[str, float] = {}

    def _smooth(self, potentials: dict[str, float]) -> dict[str, float]:
        if self.potential_smoothing == 0.0:
            return potentials
        beta = self.potential_smoothing
        for agent, c in potentials.items():
            previous = self._smoothed.get(agent)
            self._smoothed[agent] = c if previous is None else beta * previous + (1 - beta) * c
        return {agent: self._smoothed[agent] for agent in potentials}

    def adjust_potentials(
        self, planner: TrustRegionPlanner, directions: dict[str, SearchDirection], rng: np.random.Generator
    ) -> dict[str, float]:
        """The potentials the thresholds and the order are computed from: the directions' own here.

        Noise-aware subclasses (:mod:`sb3_hatrpo.noise_aware`) replace them, e.g. by shrunk estimates.
        """
        return {a: d.potential for a, d in directions.items()}

    def update_agents(self, planner: TrustRegionPlanner, rng: np.random.Generator) -> list[StepResult]:
        n = planner.n_agents
        directions: dict[str, SearchDirection] = {a: planner.direction(a) for a in planner.agents}
        potentials = self._smooth(self.adjust_potentials(planner, directions, rng))
        min_kl = self.min_kl_fraction * planner.total_kl / n
        thresholds = dict(
            zip(planner.agents, kkt_thresholds([potentials[a] for a in planner.agents], planner.total_kl, min_kl))
        )
        order = rank({a: potentials[a] for a in planner.agents}, self.tie_break, rng)
        remaining_budget = planner.total_kl
        results = []
        for position, agent in enumerate(order):
            if self.pass_unused_budget and position > 0:
                rest = order[position:]
                floor = min(min_kl, remaining_budget / len(rest))
                new = kkt_thresholds([potentials[a] for a in rest], max(remaining_budget, 1e-12), floor)
                thresholds.update(zip(rest, new))
            direction = directions[agent]
            if not planner.is_current(direction):
                direction = planner.direction(agent)
            result = planner.step(direction, float(thresholds[agent]))
            remaining_budget -= result.kl
            results.append(result)
        return results


class GreedyAllocator(BaseAllocator):
    """HATRPO-G: agents picked one at a time by improvement-to-divergence ratio (DESIGN §5.3).

    With budget ``B`` and remaining agents ``R``: every ``j`` in ``R`` tries a step with threshold
    ``B / |R|`` (parameters restored), giving improvement ``I_j``, KL ``k_j`` and accepted step
    fraction ``alpha_j`` (``beta^m`` after ``m`` backtracks). The best agent by its ratio ``rho_j``
    among those with ``I_j > 0`` moves with threshold ``B rho_j / sum_{I > 0} rho``; ``B`` loses its
    realised KL; repeat. Agents with no improving step keep their old policies this iteration.

    The ratio (``ratio=``):

    * ``"paper"``: ``rho_j = I_j / (k_j + eps)``, the paper's rule. Along one direction ``I`` grows like
      ``alpha`` and ``k`` like ``alpha^2``, so ``rho_j ~ 1 / alpha_j``: every backtrack multiplies an
      agent's ratio by ``1 / beta`` and the rule favours agents whose quadratic model failed (DESIGN §5.3).
    * ``"fraction-corrected"``: ``rho_j = alpha_j I_j / (k_j + eps)``, the ratio brought back to the
      full step (``alpha = 1``) under the same first/second-order scaling: with ``I = alpha r p``
      (``p`` the predicted improvement, ``r`` the realised share of it) and ``k = alpha^2 delta`` it
      is ``r p / delta``, which credits a step for how much of its prediction it realised, not for
      having backtracked. No extra cost.
    * ``"common-fraction"``: every eligible candidate re-measured (no acceptance test) at the smallest
      accepted fraction ``alpha* = min_j alpha_j``: ``rho_j = I_j(alpha*) / (k_j(alpha*) + eps)``. One
      extra surrogate/KL evaluation per candidate that backtracked less, no Fisher-vector product.

    Directions and candidate steps are reused while no agent has moved (after a rejected step).

    :param eps: added to the KL in the ratio, so a tiny step cannot get an unbounded ratio
    :param ratio: ``"paper"`` (default), ``"fraction-corrected"`` or ``"common-fraction"``
    :param tie_break: among equal ratios (equal to 6 significant digits), ``"order"``
        (``possible_agents``: the first wins, the package's original behaviour) or ``"random"`` (the
        iteration's generator)
    """

    name = "greedy"
    RATIOS: ClassVar[tuple[str, ...]] = ("paper", "fraction-corrected", "common-fraction")

    def __init__(self, eps: float = 1e-8, ratio: str = "paper", tie_break: str = "order") -> None:
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if ratio not in self.RATIOS:
            raise ValueError(f"ratio must be one of {self.RATIOS}, got {ratio!r}")
        check_tie_break(tie_break)
        self.eps = eps
        self.ratio = ratio
        self.tie_break = tie_break

    def _ratios(
        self,
        planner: TrustRegionPlanner,
        remaining: list[str],
        directions: dict[str, SearchDirection],
        candidates: dict[str, StepResult],
    ) -> dict[str, float]:
        """``rho_j`` of every candidate with an accepted, improving step."""
        eligible = [a for a in remaining if candidates[a].accepted and candidates[a].improvement > 0]
        if self.ratio == "paper":
            return {a: candidates[a].improvement / (candidates[a].kl + self.eps) for a in eligible}
        if self.ratio == "fraction-corrected":
            return {
                a: candidates[a].step_fraction * candidates[a].improvement / (candidates[a].kl + self.eps)
                for a in eligible
            }
        if not eligible:
            return {}
        common = min(candidates[a].step_fraction for a in eligible)
        ratios = {}
        for a in eligible:
            c = candidates[a]
            if c.step_fraction == common:
                improvement, kl = c.improvement, c.kl
            else:
                improvement, kl = planner.measure(directions[a], c.threshold, common)
            if improvement > 0:
                ratios[a] = improvement / (kl + self.eps)
        return ratios

    def update_agents(self, planner: TrustRegionPlanner, rng: np.random.Generator) -> list[StepResult]:
        budget = planner.total_kl
        remaining = list(planner.agents)
        results: list[StepResult] = []
        directions: dict[str, SearchDirection] = {}
        candidates: dict[str, StepResult] = {}
        while remaining and budget > 0:
            share = budget / len(remaining)
            for agent in remaining:
                if agent not in directions or not planner.is_current(directions[agent]):
                    directions[agent] = planner.direction(agent)
                    candidates.pop(agent, None)
                cached = candidates.get(agent)
                if cached is None or cached.threshold != share:
                    candidates[agent] = planner.step(directions[agent], share, commit=False)
            ratios = self._ratios(planner, remaining, directions, candidates)
            if not ratios:
                break
            chosen = rank(ratios, self.tie_break, rng)[0]
            threshold = min(budget, budget * ratios[chosen] / sum(ratios.values()))
            result = planner.step(directions[chosen], threshold)
            results.append(result)
            remaining.remove(chosen)
            budget -= result.kl  # a rejected step (possible at the rescaled threshold) spends nothing
        results.extend(planner.skip(agent) for agent in remaining)
        return results


ALLOCATORS: dict[str, type[BaseAllocator]] = {
    "uniform": UniformAllocator,
    "hatrpo": UniformAllocator,
    "kkt": KKTAllocator,
    "w": KKTAllocator,
    "hatrpo-w": KKTAllocator,
    "greedy": GreedyAllocator,
    "g": GreedyAllocator,
    "hatrpo-g": GreedyAllocator,
}


def make_allocator(allocator: str | BaseAllocator, allocator_kwargs: dict[str, Any] | None = None) -> BaseAllocator:
    """An allocator from a name or alias (``ALLOCATORS``) and options, or an instance as it is."""
    if isinstance(allocator, BaseAllocator):
        if allocator_kwargs:
            raise ValueError("allocator_kwargs are for allocator names; configure an allocator instance directly")
        return allocator
    if not isinstance(allocator, str) or allocator.lower() not in ALLOCATORS:
        raise ValueError(
            f"Unknown allocator {allocator!r}. Valid names: {', '.join(sorted(ALLOCATORS))}, "
            "or an instance of sb3_hatrpo.allocators.BaseAllocator"
        )
    cls = ALLOCATORS[allocator.lower()]
    try:
        return cls(**(allocator_kwargs or {}))
    except TypeError as error:
        raise ValueError(f"Bad allocator_kwargs for {cls.__name__}: {error}") from error


# The noise-aware allocators (beyond the paper) live in their own module and register here. Imported
# last: sb3_hatrpo.noise_aware subclasses the classes above.
from sb3_hatrpo.noise_aware import CrossFitAllocator, ShrunkKKTAllocator  # noqa: E402

ALLOCATORS.update({"kkt-shrink": ShrunkKKTAllocator, "cross-fit": CrossFitAllocator})
