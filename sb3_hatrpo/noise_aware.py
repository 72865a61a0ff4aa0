"""Noise-aware allocation (DESIGN §5.3b; beyond the paper): allocators that do not chase batch noise.

A potential ``c_i`` (DESIGN §4) is an estimate from one batch. KKT's thresholds go with ``c_i^2``
and its order with ``c_i``, so an agent whose gradient happens to be large on this batch gets
more of the budget and moves first; the step it then takes is fitted to the same batch (winner's
curse). Two remedies, each a :class:`~sb3_hatrpo.allocators.BaseAllocator`:

* :class:`ShrunkKKTAllocator` (``"kkt-shrink"``): estimate each potential's sampling variance from
  folds of the batch (whole envs) and shrink the potentials toward their mean by it (James-Stein / Efron-Morris
  empirical Bayes) before KKT water-filling and ordering.
* :class:`CrossFitAllocator` (``"cross-fit"``): decide thresholds and order from *cross-fitted*
  potentials (the natural-gradient direction of one half of the batch scored by the gradient of the
  other half), then take the steps on the whole batch (or only on the other half) with those
  thresholds fixed.

Both keep DESIGN §5.4: thresholds come from :func:`~sb3_hatrpo.allocators.kkt_thresholds`, so they
are feasible, sum to the budget, are equal for agents with equal (adjusted) potentials and give a
single agent the whole budget; every step is the planner's line search, so its KL stays within its
threshold.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch as th

from sb3_hatrpo.allocators import (
    BaseAllocator,
    KKTAllocator,
    check_tie_break,
    kkt_thresholds,
    rank,
)
from sb3_hatrpo.trust_region import SearchDirection, StepResult, TrustRegionPlanner, split_samples


def empirical_bayes_shrinkage(
    estimates: np.ndarray, variances: np.ndarray, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Shrink noisy estimates toward their mean by their noise (James-Stein / Efron-Morris).

    Model: ``c_hat_i ~ N(c_i, s_i^2)`` with ``c_i ~ N(m, tau^2)``. With ``m = mean(c_hat)`` and
    ``tau^2 = max(0, var(c_hat) - mean(s^2))`` (method of moments; ``var`` with ``ddof=1``), the
    posterior mean is

        ``c_tilde_i = m + w_i (c_hat_i - m)``,  ``w_i = tau^2 / (tau^2 + strength * s_i^2)``.

    Equal variances give the positive-part James-Stein estimator's form; a noisier estimate is pulled
    further toward the mean. ``w_i = 1`` when ``tau^2 + s_i^2 = 0`` (nothing to shrink) and with one
    estimate (no mean to shrink toward). The result is a convex combination of non-negative numbers
    when the estimates are, so it stays a valid potential.

    :param estimates: ``c_hat_i``
    :param variances: ``s_i^2 >= 0``, the sampling variance of each estimate
    :param strength: multiplies the variances (0: no shrinkage, 1: the estimator above)
    :return: ``(c_tilde, w)``
    """
    c = np.asarray(estimates, dtype=np.float64)
    s2 = strength * np.asarray(variances, dtype=np.float64)
    if c.size < 2:
        return c.copy(), np.ones_like(c)
    mean = float(c.mean())
    tau2 = max(0.0, float(c.var(ddof=1)) - float(s2.mean()))
    denominator = tau2 + s2
    weights = np.where(denominator > 0, tau2 / np.where(denominator > 0, denominator, 1.0), 1.0)
    return mean + weights * (c - mean), weights


class ShrunkKKTAllocator(KKTAllocator):
    """HATRPO-W on shrunk potentials: KKT water-filling of ``c_tilde`` instead of ``c`` (DESIGN §5.3b).

    1. Every agent's full-batch direction ``x_i = CG(F_i, g_i)`` and potential
       ``c_i = g_i^T x_i / sqrt(x_i^T F_i x_i)`` (as :class:`~sb3_hatrpo.allocators.KKTAllocator`).
    2. The batch is cut into ``K = n_folds`` folds: groups of whole envs when the rollout has at least
       ``K`` envs (independent trajectories), else time blocks
       (:func:`~sb3_hatrpo.trust_region.split_samples`). Each fold's gradient ``g_ik`` gives a fold
       potential along the same direction (all folds from one double backward pass,
       :meth:`~sb3_hatrpo.trust_region.TrustRegionPlanner.fold_slopes`),

           ``c_ik = g_ik^T x_i / sqrt(x_i^T F_i x_i)``,

       the delta-method linearisation of ``c = sqrt(g^T F^-1 g)`` around ``g_i`` (``dc = x^T dg / c``).
       The full-batch potential is the mean of the fold potentials, so its variance is estimated by
       ``s_i^2 = var_k(c_ik) / K``.
    3. ``c_tilde = empirical_bayes_shrinkage(c, s^2, shrinkage)``:
       ``c_tilde_i = m + w_i (c_i - m)``, ``w_i = tau^2 / (tau^2 + shrinkage s_i^2)``,
       ``tau^2 = max(0, var_i(c_i) - mean_i(s_i^2))``.
    4. ``delta = kkt_thresholds(c_tilde, delta_total, delta_min)`` and updates in descending ``c_tilde``,
       as KKT. When the agents' potentials differ by less than their noise (``tau^2 = 0``) every
       ``c_tilde_i`` is the mean and the split is uniform (above the floor).

    Cost: about one Fisher-vector product per agent (whatever ``K``), next to the ``cg_max_steps + 2``
    of its direction.

    :param n_folds: folds of the batch for the variance estimate (``>= 2``)
    :param shrinkage: multiplies the variances in the weights (0 is plain KKT, 1 the estimator above)
    :param min_kl_fraction: see :class:`~sb3_hatrpo.allocators.KKTAllocator`
    :param pass_unused_budget: see :class:`~sb3_hatrpo.allocators.KKTAllocator`
    :param potential_smoothing: see :class:`~sb3_hatrpo.allocators.KKTAllocator` (applied after shrinkage)
    :param tie_break: see :class:`~sb3_hatrpo.allocators.KKTAllocator`; ``"random"`` by default here,
        because full shrinkage makes every potential exactly the mean, and ``"order"`` would then
        always move ``possible_agents[0]`` first where uniform HATRPO draws a random order
    """

    name = "kkt-shrink"

    def __init__(
        self,
        n_folds: int = 4,
        shrinkage: float = 1.0,
        min_kl_fraction: float = 0.5,
        pass_unused_budget: bool = False,
        potential_smoothing: float = 0.0,
        tie_break: str = "random",
    ) -> None:
        super().__init__(min_kl_fraction, pass_unused_budget, potential_smoothing, tie_break)
        if n_folds < 2:
            raise ValueError(f"n_folds must be at least 2, got {n_folds}")
        if not (math.isfinite(shrinkage) and shrinkage >= 0):
            raise ValueError(f"shrinkage must be a non-negative number, got {shrinkage}")
        self.n_folds = n_folds
        self.shrinkage = shrinkage

    def adjust_potentials(
        self, planner: TrustRegionPlanner, directions: dict[str, SearchDirection], rng: np.random.Generator
    ) -> dict[str, float]:
        agents = planner.agents
        raw = np.array([directions[a].potential for a in agents])
        folds = split_samples(planner.n_samples, min(self.n_folds, planner.n_samples), n_envs=planner.n_envs)
        variances = np.zeros(len(agents))
        for i, agent in enumerate(agents):
            d = directions[agent]
            if d.potential <= 0.0 or d.curvature <= 0.0:
                continue  # a zero direction: nothing to estimate, the potential is exactly 0
            fold_potentials = planner.fold_slopes(agent, d.direction, folds).numpy() / math.sqrt(d.curvature)
            variances[i] = float(np.var(fold_potentials, ddof=1)) / len(folds)
        shrunk, weights = empirical_bayes_shrinkage(raw, variances, self.shrinkage)
        shrunk = np.maximum(shrunk, 0.0)
        self._diagnostics = {
            "shrink/mean_weight": float(weights.mean()),
            "shrink/noise_to_spread": float(np.sqrt(variances.mean()) / (raw.std() + 1e-12)),
        }
        return dict(zip(agents, shrunk.tolist()))


class CrossFitAllocator(BaseAllocator):
    """Thresholds and order decided on one half of the batch, steps on the other data (DESIGN §5.3b).

    The batch is cut into two halves ``A`` and ``B``, of whole envs when the rollout has two or more, else
    of time (which is which: the iteration's generator).

    1. On ``A`` alone (a sub-planner, ``M = A_hat``): each agent's direction ``x_i^A = CG(F_i^A, g_i^A)``,
       with ``decision_cg_max_steps`` conjugate-gradient steps (default half the planner's: the
       decision needs the potential's size, not a precise direction).
    2. The gradient of ``B``, ``g_i^B``, scores it (the slope ``g_i^B . x_i^A``, about one Fisher-vector
       product): the *cross-fitted potential*

           ``c_i^cf = max(0, g_i^B . x_i^A) / sqrt(x_i^A . F_i^A x_i^A)``,

       the first-order improvement on ``B`` per ``sqrt(2 delta)`` of the step fitted on ``A``. Its
       numerator has expectation ``g_i^T E[x_i^A]`` with no term from ``B``'s noise, whereas the
       in-sample ``c_i^2 = g^T F^-1 g`` is inflated by ``tr(F^-1 Cov(g))``: a noisier agent does not
       look stronger.
       With ``potential="half"`` the decision uses ``A`` alone instead: ``c_i^A = g_i^A . x_i^A /
       sqrt(x_i^A . F_i^A x_i^A)``, the in-sample potential of half the batch.
    3. ``delta = kkt_thresholds(c, delta_total, delta_min)`` and the order is descending ``c``: both
       fixed before any step.
    4. ``step_on="full"``: each agent steps on the whole batch (direction with the current ``M``, as
       uniform HATRPO) with its fixed threshold. ``step_on="held-out"``: the steps use ``B`` only;
       with ``potential="half"`` the decision and the steps then share no sample.

    Cost: one half-batch direction with half the CG steps per agent on top of uniform's ``n``
    full-batch directions (about a quarter of a direction each: a Fisher-vector product's cost scales
    with the samples), and one slope.

    :param min_kl_fraction: floor ``delta_min = min_kl_fraction * delta_total / n`` (as KKT)
    :param potential: ``"cross"`` (``c^cf``, default) or ``"half"`` (``c^A``)
    :param step_on: ``"full"`` (default) or ``"held-out"``
    :param tie_break: among equal potentials, ``"random"`` (default: cross-fitted potentials clipped at
        0 tie often) or ``"order"`` (``possible_agents``)
    :param decision_cg_max_steps: CG steps of the half-batch directions; ``None``: half the planner's
    """

    name = "cross-fit"
    STEP_ON: ClassVar[tuple[str, ...]] = ("full", "held-out")
    POTENTIALS: ClassVar[tuple[str, ...]] = ("cross", "half")

    def __init__(
        self,
        min_kl_fraction: float = 0.5,
        potential: str = "cross",
        step_on: str = "full",
        tie_break: str = "random",
        decision_cg_max_steps: int | None = None,
    ) -> None:
        if decision_cg_max_steps is not None and decision_cg_max_steps < 1:
            raise ValueError(f"decision_cg_max_steps must be a positive integer or None, got {decision_cg_max_steps}")
        self.decision_cg_max_steps = decision_cg_max_steps
        if not 0.0 <= min_kl_fraction <= 1.0:
            raise ValueError(f"min_kl_fraction must be in [0, 1], got {min_kl_fraction}")
        if potential not in self.POTENTIALS:
            raise ValueError(f"potential must be one of {self.POTENTIALS}, got {potential!r}")
        self.potential = potential
        if step_on not in self.STEP_ON:
            raise ValueError(f"step_on must be one of {self.STEP_ON}, got {step_on!r}")
        check_tie_break(tie_break)
        self.min_kl_fraction = min_kl_fraction
        self.step_on = step_on
        self.tie_break = tie_break

    def cross_fitted_potentials(
        self, planner: TrustRegionPlanner, rng: np.random.Generator
    ) -> tuple[dict[str, float], th.Tensor]:
        """The deciding potential of every agent (steps 1-2), before any agent moves, and the held-out half."""
        halves = split_samples(planner.n_samples, 2, n_envs=planner.n_envs)
        first = int(rng.integers(2))
        choose, held_out = halves[first], halves[1 - first]
        steps = self.decision_cg_max_steps or max(1, planner.cg_max_steps // 2)
        deciding = planner.subset(choose, cg_max_steps=steps)
        potentials = {}
        for agent in planner.agents:
            d = deciding.direction(agent)
            if d.curvature <= 0.0 or d.potential <= 0.0:
                potentials[agent] = 0.0
                continue
            if self.potential == "half":
                potentials[agent] = d.potential
                continue
            slope = float(planner.fold_slopes(agent, d.direction, [held_out])[0])  # g^B . x^A
            potentials[agent] = max(0.0, slope) / math.sqrt(d.curvature)
        return potentials, held_out

    def update_agents(self, planner: TrustRegionPlanner, rng: np.random.Generator) -> list[StepResult]:
        potentials, held_out = self.cross_fitted_potentials(planner, rng)
        min_kl = self.min_kl_fraction * planner.total_kl / planner.n_agents
        values = kkt_thresholds([potentials[a] for a in planner.agents], planner.total_kl, min_kl)
        thresholds = dict(zip(planner.agents, values.tolist()))
        order = rank(potentials, self.tie_break, rng)
        stepping = planner if self.step_on == "full" else planner.subset(held_out)
        results = [stepping.step(stepping.direction(agent), thresholds[agent]) for agent in order]
        self._diagnostics = {"cross_fit/zero_potentials": float(sum(v == 0.0 for v in potentials.values()))}
        return results
