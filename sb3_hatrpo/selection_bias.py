"""Selection bias of an allocator, measured: in-sample against held-out surrogate improvement (issue #8).

An allocator that picks agents and thresholds from statistics of the batch its steps then train on
sees an *in-sample* improvement that is partly noise (winner's curse). :class:`SelectionBiasProbe`
wraps any allocator and, every iteration, measures how much of that improvement survives on samples
the decisions did not see:

1. the batch is cut into two halves, each of whole envs when the rollout has two envs or more
   (independent trajectories over the same time steps; :func:`~sb3_hatrpo.trust_region.split_samples`),
   else two time halves; a copy of the wrapped allocator runs on half ``A`` alone
   (its own planner: directions, choices, line searches, all from ``A``), with a copy of the
   iteration's generator;
2. each step it committed is scored on ``A`` (its in-sample improvement ``I_i^A``, the line search's
   own figure) and on ``B`` (``I_i^B``, :meth:`~sb3_hatrpo.trust_region.TrustRegionPlanner.replay_improvements`,
   with HATRPO's sequential correction ``M`` built from ``B``'s ratios in the same order);
3. every agent goes back to its old parameters, the generators' states are restored, and the
   wrapped allocator runs on the whole batch exactly as it would without the probe.

``optimism = sum_i I_i^A - sum_i I_i^B`` is the part of the in-sample gain that did not generalise.
Uniform HATRPO has some (each step is fitted to its own batch); the difference between an
allocator's optimism and uniform's is its selection bias. The figures are for decisions on *half*
a batch, so their noise is about ``sqrt(2)`` times that of the full-batch decisions.

Off by default (nothing is measured unless the allocator is wrapped). When on, it costs about one
extra iteration's update on half the samples.

    model = HATRPO("MlpPolicy", env, allocator=SelectionBiasProbe("greedy"))
    model.learn(...)
    model.allocator.diagnostics   # {"selection/in_sample": ..., "selection/held_out": ..., ...}
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch as th

from sb3_hatrpo.allocators import BaseAllocator, make_allocator
from sb3_hatrpo.trust_region import StepResult, TrustRegionPlanner, split_samples


class SelectionBiasProbe(BaseAllocator):
    """Runs ``allocator`` unchanged, and beside it measures its selection bias on held-out samples.

    Per iteration, :attr:`diagnostics` (logged as ``train/selection/...``) holds ``in_sample`` and
    ``held_out`` (the sums over committed steps of ``I_i^A`` and ``I_i^B``), their difference
    ``optimism``, ``kl_spent`` (realised KL of the half-batch run) and ``moved`` (its accepted steps);
    :attr:`last_steps` holds ``(agent, in_sample, held_out, threshold, kl)`` per committed step, in order.

    :param allocator: the allocator to probe, a name or an instance
    :param allocator_kwargs: options of a named allocator
    """

    name = "probe"

    def __init__(self, allocator: str | BaseAllocator = "uniform", allocator_kwargs: dict[str, Any] | None = None):
        self.allocator = make_allocator(allocator, allocator_kwargs)
        self.last_steps: list[tuple[str, float, float, float, float]] = []

    def get_config(self) -> dict[str, Any]:
        return {"allocator": self.allocator.name, **self.allocator.get_config()}

    def probe(self, planner: TrustRegionPlanner, rng: np.random.Generator) -> dict[str, float]:
        """Steps 1-2 of the module docstring on ``planner``'s batch; every agent restored afterwards."""
        shadow_rng = copy.deepcopy(rng)
        torch_state = th.random.get_rng_state()
        halves = split_samples(planner.n_samples, 2, n_envs=planner.n_envs)
        first = int(shadow_rng.integers(2))
        choosing = planner.subset(halves[first])
        held_out = planner.subset(halves[1 - first])  # built now: its old policy is the current one
        try:
            results = copy.deepcopy(self.allocator).update_agents(choosing, shadow_rng)
            moved = [r for r in results if r.accepted]
            replayed = held_out.replay_improvements([r.agent for r in moved])
        finally:
            planner.restore()
            th.random.set_rng_state(torch_state)
        self.last_steps = [(r.agent, r.improvement, b, r.threshold, r.kl) for r, b in zip(moved, replayed)]
        in_sample = float(sum(r.improvement for r in moved))
        held = float(sum(replayed))
        return {
            "selection/in_sample": in_sample,
            "selection/held_out": held,
            "selection/optimism": in_sample - held,
            "selection/kl_spent": float(sum(r.kl for r in moved)),
            "selection/moved": float(len(moved)),
        }

    def update_agents(self, planner: TrustRegionPlanner, rng: np.random.Generator) -> list[StepResult]:
        self._diagnostics = self.probe(planner, rng)
        results = self.allocator.update_agents(planner, rng)
        self._diagnostics.update(self.allocator.diagnostics)
        return results
