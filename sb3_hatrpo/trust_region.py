"""The trust-region step of one agent (DESIGN §4), shared by every allocator.

For agent ``i`` with old policy ``pi_old`` and the per-sample factor ``M``
(``M = A_hat`` before any agent moved; ``M <- M * pi_new / pi_old`` after each accepted
update, HATRPO's sequential correction, Kuba et al. 2022, Eq. 11):

* surrogate ``L(theta) = mean(alive * pi_theta(a|o) / pi_old(a|o) * M)``
* constraint ``KL(theta) = mean over alive samples of KL(pi_old(.|o) || pi_theta(.|o))``
* ``g = grad L``, ``F = Hessian of KL at theta_old + damping * I``, ``x = CG(F, g)``
* full step for threshold ``delta``: ``s = sqrt(2 delta / x^T F x) x``; predicted improvement
  ``g^T s = c sqrt(2 delta)`` with the potential ``c = g^T x / sqrt(x^T F x)``
* backtracking line search on ``s, beta s, beta^2 s, ...``: the first step with
  ``KL <= delta`` and a positive actual improvement is accepted, else nothing changes.

An allocator (``sb3_hatrpo.allocators``) decides thresholds and order through
:class:`TrustRegionPlanner`'s ``direction`` and ``step``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial

import torch as th
from sb3_contrib.common.utils import conjugate_gradient_solver, flat_grad
from stable_baselines3.common.distributions import Distribution, kl_divergence
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from sb3_hatrpo.policies import Actor


@dataclass(frozen=True)
class SearchDirection:
    """The natural-gradient direction of one agent for the factor ``M`` it was computed with.

    :param agent: the agent
    :param gradient: ``g``, gradient of the surrogate at the old parameters
    :param direction: ``x = CG(F, g)``
    :param curvature: ``x^T F x``
    :param potential: ``c = g^T x / sqrt(x^T F x)``, improvement per ``sqrt(2 delta)``
    :param factor_version: which ``M`` it belongs to (the planner's count of accepted updates)
    """

    agent: str
    gradient: th.Tensor
    direction: th.Tensor
    curvature: float
    potential: float
    factor_version: int

    def full_step(self, threshold: float) -> th.Tensor:
        """``s(delta) = sqrt(2 delta / x^T F x) x``, the step that reaches KL ~ delta to second order."""
        if self.curvature <= 0.0 or not math.isfinite(self.curvature):
            return th.zeros_like(self.direction)
        return math.sqrt(2.0 * threshold / self.curvature) * self.direction

    def predicted_improvement(self, threshold: float) -> float:
        """``g^T s(delta) = c sqrt(2 delta)``."""
        return self.potential * math.sqrt(2.0 * threshold)


@dataclass
class StepResult:
    """What one trust-region step of one agent did."""

    agent: str
    threshold: float
    kl: float  # realised KL of the accepted step (0 if rejected)
    improvement: float  # actual surrogate improvement of the accepted step (0 if rejected)
    predicted_improvement: float  # c * sqrt(2 threshold), for the full step
    accepted: bool
    step_fraction: float  # beta^k of the accepted step, 0 if rejected
    potential: float

    def as_record(self, position: int) -> dict[str, float | int | bool | str]:
        """The per-agent entry of ``HATRPO.last_allocation``."""
        record = asdict(self)
        record["position"] = position
        return record


def mean_kl(old: Distribution, new: Distribution, alive: th.Tensor) -> th.Tensor:
    """Mean over alive samples of ``KL(old || new)``, summed over action dimensions.

    :param old: the old policy's distribution on the samples
    :param new: the current policy's distribution on the same samples
    :param alive: 0/1 float mask ``(n,)``: samples where the agent acted
    """
    kl = kl_divergence(old, new)
    if kl.dim() > 1:
        kl = kl.sum(dim=tuple(range(1, kl.dim())))
    return (kl * alive).sum() / alive.sum().clamp(min=1.0)


class _AgentData:
    """One agent's rollout samples and frozen old policy."""

    def __init__(self, actor: Actor, observations: th.Tensor, actions: th.Tensor, alive: th.Tensor) -> None:
        self.actor = actor
        self.params = [p for p in actor.parameters() if p.requires_grad]
        self.observations = observations
        self.actions = actions
        self.alive = alive
        with th.no_grad():
            self.old_distribution = actor.distribution(observations)
            self.old_log_prob = self.old_distribution.log_prob(actions)
            self.old_params = parameters_to_vector(self.params).clone()
        # Gradient of the KL with its graph, reused by every Fisher-vector product and by
        # every direction computed for this agent until it moves.
        self._grad_kl: th.Tensor | None = None

    def kl(self, distribution: Distribution) -> th.Tensor:
        return mean_kl(self.old_distribution, distribution, self.alive)

    def grad_kl(self) -> th.Tensor:
        if self._grad_kl is None:
            kl = self.kl(self.actor.distribution(self.observations))
            self._grad_kl = flat_grad(kl, self.params, create_graph=True, retain_graph=True)
        return self._grad_kl

    def fisher_vector_product(self, vector: th.Tensor, damping: float) -> th.Tensor:
        """``(Hessian of KL at theta_old + damping I) v``, never forming the matrix."""
        product = flat_grad(self.grad_kl() @ vector, self.params, retain_graph=True)
        return product + damping * vector

    def set_params(self, vector: th.Tensor) -> None:
        vector_to_parameters(vector, self.params)


class TrustRegionPlanner:
    """Directions and steps of every agent for one iteration, and the factor ``M`` between them.

    :param actors: the agents' actors
    :param observations: per-agent observations ``(n, *obs_shape)``
    :param actions: per-agent actions
    :param alive: per-agent 0/1 float masks ``(n,)``
    :param advantages: team advantages ``(n,)`` (normalised or not: the algorithm decides)
    :param total_kl: the joint KL budget ``delta_total`` of this iteration
    :param cg_max_steps: conjugate-gradient iterations
    :param cg_damping: ``F + damping I``
    :param line_search_shrinking_factor: ``beta`` of the backtracking line search
    :param line_search_max_iter: step sizes tried before giving up
    """

    def __init__(
        self,
        actors: dict[str, Actor],
        observations: dict[str, th.Tensor],
        actions: dict[str, th.Tensor],
        alive: dict[str, th.Tensor],
        advantages: th.Tensor,
        *,
        total_kl: float,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
    ) -> None:
        self.agents = list(actors)
        self.total_kl = total_kl
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self._data = {a: _AgentData(actors[a], observations[a], actions[a], alive[a]) for a in self.agents}
        self.factor = advantages.detach().clone()  # M
        self.factor_version = 0
        self.updated: list[str] = []

    @property
    def n_agents(self) -> int:
        return len(self.agents)

    def _surrogate(self, data: _AgentData, log_prob: th.Tensor) -> th.Tensor:
        ratio = th.exp(log_prob - data.old_log_prob)
        return (data.alive * ratio * self.factor).mean()

    def direction(self, agent: str) -> SearchDirection:
        """Gradient, CG direction and potential of ``agent`` for the current ``M``."""
        data = self._data[agent]
        if agent in self.updated:
            raise RuntimeError(f"agent {agent!r} was already updated this iteration")
        log_prob = data.actor.distribution(data.observations).log_prob(data.actions)
        gradient = flat_grad(self._surrogate(data, log_prob), data.params).detach()
        fvp = partial(data.fisher_vector_product, damping=self.cg_damping)
        if not th.isfinite(gradient).all() or gradient.abs().max() == 0:
            zeros = th.zeros_like(gradient)
            return SearchDirection(agent, gradient, zeros, 0.0, 0.0, self.factor_version)
        direction = conjugate_gradient_solver(fvp, gradient, max_iter=self.cg_max_steps).detach()
        curvature = float(direction @ fvp(direction).detach())
        if not math.isfinite(curvature) or curvature <= 0.0:
            return SearchDirection(agent, gradient, th.zeros_like(gradient), 0.0, 0.0, self.factor_version)
        potential = max(0.0, float(gradient @ direction)) / math.sqrt(curvature)
        return SearchDirection(agent, gradient, direction, curvature, potential, self.factor_version)

    def is_current(self, direction: SearchDirection) -> bool:
        """Whether ``direction`` was computed with the current ``M`` (no agent has moved since)."""
        return direction.factor_version == self.factor_version

    @th.no_grad()
    def step(self, direction: SearchDirection, threshold: float, *, commit: bool = True) -> StepResult:
        """Line search along ``direction`` for the trust region ``KL <= threshold``.

        :param direction: from :meth:`direction` with the current ``M``
        :param threshold: the agent's KL threshold ``delta_i``
        :param commit: keep an accepted step and update ``M``; ``False`` only measures (greedy's candidates)
            and restores the old parameters
        :return: realised KL and actual improvement of the accepted step
        """
        agent = direction.agent
        data = self._data[agent]
        if not self.is_current(direction):
            raise RuntimeError(f"the direction of {agent!r} was computed before another agent moved: recompute it")
        predicted = direction.predicted_improvement(threshold) if threshold > 0 else 0.0
        result = StepResult(agent, threshold, 0.0, 0.0, predicted, False, 0.0, direction.potential)
        full_step = direction.full_step(threshold) if threshold > 0 else None
        if full_step is not None and bool(full_step.abs().max() > 0):
            baseline = float((data.alive * self.factor).mean())  # L(theta_old): every ratio is 1
            fraction = 1.0
            for _ in range(self.line_search_max_iter):
                data.set_params(data.old_params + fraction * full_step)
                distribution = data.actor.distribution(data.observations)
                log_prob = distribution.log_prob(data.actions)
                kl = float(data.kl(distribution))
                improvement = float(self._surrogate(data, log_prob)) - baseline
                if math.isfinite(kl) and kl <= threshold and improvement > 0.0:
                    result = StepResult(
                        agent, threshold, kl, improvement, predicted, True, fraction, direction.potential
                    )
                    break
                fraction *= self.line_search_shrinking_factor
        if result.accepted and commit:
            # M <- M * pi_new / pi_old on the samples where the agent acted
            ratio = th.exp(log_prob - data.old_log_prob)
            self.factor = self.factor * th.where(data.alive > 0, ratio, th.ones_like(ratio))
            self.factor_version += 1
            self.updated.append(agent)
        else:
            data.set_params(data.old_params)
        return result

    def skip(self, agent: str, threshold: float = 0.0) -> StepResult:
        """Record that ``agent`` keeps its old policy this iteration."""
        return StepResult(agent, threshold, 0.0, 0.0, 0.0, False, 0.0, 0.0)

    def kl_of(self, agent: str) -> float:
        """Current KL of ``agent`` from its old policy (tests and diagnostics)."""
        data = self._data[agent]
        with th.no_grad():
            return float(data.kl(data.actor.distribution(data.observations)))

    def log_ratio_of(self, agent: str) -> th.Tensor:
        """``log pi_current - log pi_old`` of ``agent`` on its samples (tests and diagnostics)."""
        data = self._data[agent]
        with th.no_grad():
            return data.actor.distribution(data.observations).log_prob(data.actions) - data.old_log_prob
