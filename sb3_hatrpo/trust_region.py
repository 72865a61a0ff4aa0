"""The trust-region step of one agent (DESIGN §4), shared by every allocator.

For agent ``i`` with old policy ``pi_old`` and the per-sample factor ``M``
(``M = A_hat`` before any agent moved; ``M <- M * pi_new / pi_old`` after each accepted
update, HATRPO's sequential correction, Kuba et al. 2022, Eq. 11):

* surrogate ``L(theta) = mean over alive samples of pi_theta(a|o) / pi_old(a|o) * M``
* constraint ``KL(theta) = mean over alive samples of KL(pi_old(.|o) || pi_theta(.|o))``

One alive-mask convention (DESIGN §5.3c, HARL's ``use_policy_active_masks``): the surrogate, the
KL, the advantage normalisation (``A_hat`` of agent ``i`` has mean 0 and std 1 over the samples
where ``i`` acted, as HARL's) and the factor ``M`` (only the ratios of samples where the moved
agent acted) all use the agent's own mask, so potentials and KL compare across agents that
are present for different fractions of the time.
* ``g = grad L``, ``F = Hessian of KL at theta_old + damping * I``, ``x = CG(F, g)``
* full step for threshold ``delta``: ``s = sqrt(2 delta / x^T F x) x``; predicted improvement
  ``g^T s = c sqrt(2 delta)`` with the potential ``c = g^T x / sqrt(x^T F x)``
* backtracking line search on ``s, beta s, beta^2 s, ...``: the first step with
  ``KL <= delta`` and a positive actual improvement is accepted (and, with
  ``line_search_accept_ratio`` ``r > 0``, an actual improvement above ``r`` times the predicted
  ``g^T (beta^k s)``, HARL's ``accept_ratio``), else nothing changes.

KKT and greedy recompute a waiting agent's direction after another agent moved (``M``
changed, so ``g`` did; the agent's Fisher matrix ``F`` did not). With ``krylov_rtol`` set the
recomputation starts from what the agent's earlier solves built: the Galerkin projection of
the new ``g`` onto the span of every vector ``v`` whose product ``F v`` is already known (the
Krylov basis), which costs no Fisher-vector product. Conjugate gradient continues on the
remaining residual only while the relative residual ``||g - F x|| / ||g||`` is above
``krylov_rtol`` (and above the relative residual the agent's first, cold solve reached).
``krylov_rtol=None`` solves from scratch.

Fisher-vector products ``F v`` (``fisher_product``): ``"analytic"`` (default) computes them for a
diagonal-Gaussian actor with a state-independent std from the KL's Hessian written out at
``theta_old`` (:class:`GaussianFisher`: ``J^T diag(w / std^2) J v`` on the mean network, a diagonal
block on the std parameter), one traced graph per agent and iteration; every other actor (categorical
actions), or ``"double_backward"``, takes sb3-contrib's and HARL's double backward through the KL.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch as th
from sb3_contrib.common.utils import conjugate_gradient_solver, flat_grad
from stable_baselines3.common.distributions import DiagGaussianDistribution, Distribution, kl_divergence
from stable_baselines3.common.torch_layers import MlpExtractor
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from sb3_hatrpo.policies import STD_PARAMETRIZATIONS, Actor
from sb3_hatrpo.validation import check_hyperparameters


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


def split_samples(n: int, n_folds: int, rng: np.random.Generator | None = None, n_envs: int = 1) -> list[th.Tensor]:
    """Sample indices of ``n_folds`` folds of a rollout of ``n`` samples in step-major order (``t * n_envs + env``).

    * ``n_envs >= n_folds`` (and ``n`` a multiple of ``n_envs``): whole envs per fold (env ``e`` in fold
      ``e * n_folds // n_envs``), so the folds are independent trajectories over the same time steps;
    * otherwise, without ``rng``: contiguous time blocks across all envs (folds share few episodes, but
      cover different phases of them);
    * with ``rng``: a random partition (folds share episodes: their noise is correlated).
    """
    if not 1 <= n_folds <= n:
        raise ValueError(f"need 1 <= n_folds <= n samples, got n_folds={n_folds}, n={n}")
    if rng is None and n_envs >= n_folds and n % n_envs == 0:
        group = (th.arange(n) % n_envs) * n_folds // n_envs
        return [th.nonzero(group == k).flatten() for k in range(n_folds)]
    order = th.as_tensor(rng.permutation(n)) if rng is not None else th.arange(n)
    return list(th.tensor_split(order, n_folds))


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


def check_krylov_rtol(krylov_rtol: float | None) -> None:
    """``ValueError`` unless ``krylov_rtol`` is ``None`` or a finite number >= 0."""
    if krylov_rtol is not None and not (math.isfinite(krylov_rtol) and krylov_rtol >= 0.0):
        raise ValueError(f"krylov_rtol must be a non-negative number or None, got {krylov_rtol!r}")


def check_fisher_product(fisher_product: str, owner: str = "TrustRegionPlanner") -> None:
    """``ValueError`` unless ``fisher_product`` is one of :data:`~sb3_hatrpo.validation.FISHER_PRODUCTS`."""
    check_hyperparameters(owner, fisher_product=fisher_product)


def normalize_on(values: th.Tensor, mask: th.Tensor) -> th.Tensor:
    """``(values - mean) / (std + 1e-8)`` with mean and std over the samples where ``mask > 0``."""
    selected = values[mask > 0]
    if selected.numel() < 2:
        return values - selected.mean() if selected.numel() else values
    return (values - selected.mean()) / (selected.std() + 1e-8)


class AllocatorContractError(ValueError):
    """An allocator asked the planner for a threshold that is not finite, negative, or beyond the joint budget."""


def check_allocator_threshold(threshold: float, remaining: float, total: float, allocator: str, agent: str) -> None:
    """The allocator contract: a finite threshold ``>= 0`` within what is left of the joint budget.

    :param threshold: the KL threshold asked for ``agent``
    :param remaining: the joint budget minus the KL of the steps already committed this iteration
    :param total: the joint budget ``delta_total``
    :param allocator: the allocator's class name, for the message
    :param agent: the agent the threshold is for
    :raises AllocatorContractError: naming the allocator, the agent, the threshold and the budget
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        problem = "is not a finite number"
    elif threshold < 0.0:
        problem = "is negative"
    elif threshold > remaining + 1e-6 * total + 1e-12:  # tolerance for rounding in the allocator's sums
        problem = f"exceeds what is left of the joint KL budget ({remaining:.6g} of {total:.6g})"
    else:
        return
    raise AllocatorContractError(
        f"Allocator {allocator} asked for the KL threshold {threshold!r} for agent {agent!r}, which {problem}. "
        "An allocator's thresholds must be finite, >= 0, and sum to at most planner.total_kl over the committed "
        "steps of an iteration; fix its update_agents()."
    )


# Where an Actor's action mean comes from: the parameters under these prefixes (``Actor.distribution``).
_MEAN_PATH = ("mlp_extractor.policy_net.", "action_net.")


class _ActionMean(nn.Module):
    """The mean of a Gaussian actor's action from its (normalised) features, as ``Actor.distribution`` computes it."""

    def __init__(self, actor: Actor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, features: th.Tensor) -> th.Tensor:
        return self.actor.action_net(self.actor.mlp_extractor.forward_actor(features))


def analytic_fisher_unsupported(actor: Actor, params: list[nn.Parameter]) -> str | None:
    """Why :class:`GaussianFisher` cannot compute ``actor``'s Fisher-vector products, or ``None`` if it can.

    It needs SB3's diagonal Gaussian with a state-independent std in a known parametrisation, the
    ``Actor`` methods that build it (a subclass overriding them may compute another distribution), and
    every trained parameter on the mean path or the std parameter.

    :param actor: the agent's actor
    :param params: the parameters the trust region moves (those with ``requires_grad``)
    """
    if not isinstance(actor, Actor):
        return f"{type(actor).__name__} is not an Actor"
    if type(actor.action_dist) is not DiagGaussianDistribution or actor.log_std is None:
        return f"the action distribution is {type(actor.action_dist).__name__}, not a diagonal Gaussian"
    if actor.std_parametrization not in STD_PARAMETRIZATIONS:
        return f"unknown std parametrisation {actor.std_parametrization!r}"
    for method in ("distribution", "action_log_std", "_features"):
        if getattr(type(actor), method) is not getattr(Actor, method):
            return f"{type(actor).__name__} overrides Actor.{method}"
    if type(actor.mlp_extractor).forward_actor is not MlpExtractor.forward_actor:
        return f"{type(actor.mlp_extractor).__name__} overrides MlpExtractor.forward_actor"
    names = {id(p): name for name, p in actor.named_parameters()}
    for p in params:
        name = names.get(id(p))
        if name is None or not (p is actor.log_std or name.startswith(_MEAN_PATH)):
            return f"the parameter {name!r} is neither on the action mean's path nor the std parameter"
    return None


class GaussianFisher:
    """Fisher-vector products of a diagonal-Gaussian actor with a state-independent std, without double backward.

    With ``w = alive / n_alive`` the weights of :func:`mean_kl`, ``mu`` the action mean (the mean
    network's parameters ``theta``), ``sigma = exp(l(x))`` the old std (``x`` the std parameter,
    ``l = x`` for ``"log"``, ``l = log(max_std) + logsigmoid(x)`` for ``"sigmoid"``, no clamp in
    either), the KL's gradient is 0 at ``theta_old`` and its Hessian there is exactly

        ``F = [[J^T diag(w / sigma^2) J, 0], [0, 2 sum(w) diag(l'(x)^2)]]``

    with ``J = d mu / d theta`` (``n * action_dim`` rows) and ``l'(x) = 1`` (``"log"``) or
    ``sigmoid(-x)`` (``"sigmoid"``): the mean/std cross terms carry a factor ``mu - mu_old = 0``.
    ``J v`` is the derivative of ``u -> J^T u`` (linear) along ``v``, so one graph of the mean network
    and its backward pass with ``create_graph``, built once, serves every product: ``J v`` is one
    backward pass through the backward graph, ``J^T (w / sigma^2 * J v)`` one through the forward graph.

    :param actor: the agent's actor (:func:`analytic_fisher_unsupported` returns ``None`` for it)
    :param params: the parameters the trust region moves, in the order of the product's vectors
    :param old_params: their old values, flat (the product is the Hessian there)
    :param observations: the agent's observations ``(n, *obs_shape)``
    :param alive: 0/1 float mask ``(n,)``
    :param old_std: the old policy's std ``(n, action_dim)``
    """

    def __init__(
        self,
        actor: Actor,
        params: list[nn.Parameter],
        old_params: th.Tensor,
        observations: th.Tensor,
        alive: th.Tensor,
        old_std: th.Tensor,
    ) -> None:
        self.sizes = [p.numel() for p in params]
        self.std_index = next((i for i, p in enumerate(params) if p is actor.log_std), None)
        self.mean_index = [i for i in range(len(params)) if i != self.std_index]
        names = {id(p): name for name, p in actor.named_parameters()}
        old = [chunk.view_as(p) for chunk, p in zip(old_params.detach().split(self.sizes), params, strict=True)]
        n_alive = alive.sum().clamp(min=1.0)
        with th.enable_grad():
            self.leaves = [old[i].detach().requires_grad_() for i in self.mean_index]
            with th.no_grad():  # the observation normaliser's statistics are no parameters
                features = actor._features(observations)
            self.mean = functional_call(
                _ActionMean(actor),
                {f"actor.{names[id(params[i])]}": leaf for i, leaf in zip(self.mean_index, self.leaves, strict=True)},
                (features,),
            )
            # J^T u for a free u: linear in u, its derivative along v is J v whatever u is
            self.cotangent = th.zeros_like(self.mean, requires_grad=True)
            self.transposed = th.autograd.grad(self.mean, self.leaves, self.cotangent, create_graph=True)
        self.weights = (alive / n_alive).unsqueeze(1) / old_std.detach().square()
        self.std_diagonal: th.Tensor | None = None
        if self.std_index is not None:
            x = old[self.std_index].detach()
            slope = th.sigmoid(-x) if actor.std_parametrization == "sigmoid" else th.ones_like(x)  # d log std / dx
            self.std_diagonal = (2.0 * slope.square() * (alive.sum() / n_alive)).flatten()

    def __call__(self, vector: th.Tensor) -> th.Tensor:
        """``F v`` (without damping) for a flat ``v`` over ``params``."""
        chunks = vector.detach().split(self.sizes)
        tangents = [chunks[i].view_as(leaf) for i, leaf in zip(self.mean_index, self.leaves, strict=True)]
        (jv,) = th.autograd.grad(self.transposed, self.cotangent, tangents, retain_graph=True)
        back = th.autograd.grad(self.mean, self.leaves, jv * self.weights, retain_graph=True)
        blocks = list(chunks)
        for i, block in zip(self.mean_index, back, strict=True):
            blocks[i] = block.flatten()
        if self.std_index is not None:
            assert self.std_diagonal is not None
            blocks[self.std_index] = self.std_diagonal * chunks[self.std_index]
        return th.cat(blocks)


class _AgentData:
    """One agent's rollout samples, advantages and frozen old policy."""

    def __init__(
        self,
        actor: Actor,
        observations: th.Tensor,
        actions: th.Tensor,
        alive: th.Tensor,
        advantages: th.Tensor,
        record_krylov: bool = False,
        fisher_product: str = "analytic",
    ) -> None:
        check_fisher_product(fisher_product)
        self.actor = actor
        self.params = [p for p in actor.parameters() if p.requires_grad]
        self.observations = observations
        self.actions = actions
        self.alive = alive
        self.n_alive = alive.sum().clamp(min=1.0)
        self.advantages = advantages
        with th.no_grad():
            self.old_distribution = actor.distribution(observations)
            self.old_log_prob = self.old_distribution.log_prob(actions)
            self.old_params = parameters_to_vector(self.params).clone()
        # How this agent's Fisher-vector products are computed: "analytic" only where the actor supports it;
        # why not, when it was asked for and is not
        self.fisher_fallback_reason = (
            analytic_fisher_unsupported(actor, self.params) if fisher_product == "analytic" else None
        )
        analytic = fisher_product == "analytic" and self.fisher_fallback_reason is None
        self.fisher_path = "analytic" if analytic else "double_backward"
        # The traced graph of either path, built at the first product and reused by every product and by
        # every direction computed for this agent until it moves: the KL's gradient with its graph
        # (double backward), or the mean network's graph and its backward (analytic).
        self._grad_kl: th.Tensor | None = None
        self._gaussian_fisher: GaussianFisher | None = None
        # Every v with its product (F + damping I) v: the Krylov basis later solves start from.
        self.krylov_vectors: list[th.Tensor] = []
        self.krylov_products: list[th.Tensor] = []
        self.record_krylov = record_krylov  # keep the vectors only when a later solve may reuse them
        self.cold_relative_residual: float | None = None  # ||g - F x|| / ||g|| of this agent's first solve

    def kl(self, distribution: Distribution) -> th.Tensor:
        return mean_kl(self.old_distribution, distribution, self.alive)

    def grad_kl(self) -> th.Tensor:
        if self._grad_kl is None:
            kl = self.kl(self.actor.distribution(self.observations))
            self._grad_kl = flat_grad(kl, self.params, create_graph=True, retain_graph=True)
        return self._grad_kl

    def gaussian_fisher(self) -> GaussianFisher:
        """The analytic product's traced graph (``fisher_path == "analytic"``), built at the first call."""
        if self._gaussian_fisher is None:
            normal = self.old_distribution.distribution
            assert isinstance(normal, th.distributions.Normal)  # a DiagGaussianDistribution's
            old_std = normal.stddev
            self._gaussian_fisher = GaussianFisher(
                self.actor, self.params, self.old_params, self.observations, self.alive, old_std
            )
        return self._gaussian_fisher

    def fisher_vector_product(self, vector: th.Tensor, damping: float) -> th.Tensor:
        """``(Hessian of KL at theta_old + damping I) v``, never forming the matrix; recorded for reuse.

        Analytic (:class:`GaussianFisher`) when ``fisher_path == "analytic"``, else the double backward
        ``grad (grad KL . v)``; both the exact Hessian at the old parameters.
        """
        if self.fisher_path == "analytic":
            product = self.gaussian_fisher()(vector) + damping * vector
        else:
            product = flat_grad(self.grad_kl() @ vector, self.params, retain_graph=True) + damping * vector
        if self.record_krylov:
            self.krylov_vectors.append(vector.detach().clone())
            self.krylov_products.append(product.detach())
        return product

    def galerkin(self, gradient: th.Tensor) -> tuple[th.Tensor, th.Tensor] | None:
        """``(x0, F x0)``: the solution of ``F x = g`` restricted to the recorded Krylov basis.

        ``x0 = Q (Q^T F Q)^-1 Q^T g`` with ``Q`` an orthonormal basis of the recorded vectors; its
        product with ``F`` is a combination of the recorded products, so this costs no new product.
        ``None`` if the projected system cannot be solved (the caller then solves from scratch).
        """
        vectors = th.stack(self.krylov_vectors, dim=1)
        products = th.stack(self.krylov_products, dim=1)
        u, sigma, vh = th.linalg.svd(vectors, full_matrices=False)
        keep = sigma > sigma[0] * 1e-6  # drop directions the recorded vectors do not really span
        basis = u[:, keep]
        basis_products = products @ (vh[keep].T / sigma[keep])
        gram = basis.T @ basis_products
        try:
            coefficients = th.linalg.solve(0.5 * (gram + gram.T), basis.T @ gradient)
        except RuntimeError:  # torch.linalg.LinAlgError: a singular projected system
            return None
        if not th.isfinite(coefficients).all():
            return None
        return basis @ coefficients, basis_products @ coefficients

    def set_params(self, vector: th.Tensor) -> None:
        vector_to_parameters(vector, self.params)


class TrustRegionPlanner:
    """Directions and steps of every agent for one iteration, and the factor ``M`` between them.

    :param actors: the agents' actors
    :param observations: per-agent observations ``(n, *obs_shape)``
    :param actions: per-agent actions
    :param alive: per-agent 0/1 float masks ``(n,)``
    :param advantages: team advantages ``(n,)``
    :param total_kl: the joint KL budget ``delta_total`` of this iteration
    :param normalize_advantage: give each agent the advantages normalised over its own alive samples
    :param cg_max_steps: conjugate-gradient iterations
    :param cg_damping: ``F + damping I``
    :param line_search_shrinking_factor: ``beta`` of the backtracking line search
    :param line_search_max_iter: step sizes tried before giving up
    :param line_search_accept_ratio: also require actual improvement > ratio * predicted improvement of the
        tried step (HARL's ``accept_ratio``, 0.5); 0 accepts any positive improvement within the threshold
    :param n_envs: envs interleaved in the samples' step-major order (``t * n_envs + env``); folds of the
        noise-aware allocators and the held-out probe then keep whole envs (:func:`split_samples`)
    :param krylov_rtol: recomputed directions start from the agent's earlier Krylov basis and add
        CG steps only while the relative residual ``||g - F x|| / ||g||`` exceeds this (see the module
        docstring); ``None`` solves every direction from scratch
    :param fisher_product: ``"analytic"``: Fisher-vector products of diagonal-Gaussian actors with a
        state-independent std from :class:`GaussianFisher`, the double backward for the others;
        ``"double_backward"``: the double backward for every actor (see the module docstring)
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
        normalize_advantage: bool = False,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        line_search_accept_ratio: float = 0.0,
        krylov_rtol: float | None = None,
        n_envs: int = 1,
        fisher_product: str = "analytic",
    ) -> None:
        check_krylov_rtol(krylov_rtol)
        check_fisher_product(fisher_product)
        self.fisher_product = fisher_product
        self.n_envs = n_envs
        self.agents = list(actors)
        self.line_search_accept_ratio = line_search_accept_ratio
        self.krylov_rtol = krylov_rtol
        self.total_kl = total_kl
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.normalize_advantage = normalize_advantage
        advantages = advantages.detach()
        self._data = {
            a: _AgentData(
                actors[a],
                observations[a],
                actions[a],
                alive[a],
                normalize_on(advantages, alive[a]) if normalize_advantage else advantages,
                record_krylov=krylov_rtol is not None,
                fisher_product=fisher_product,
            )
            for a in self.agents
        }
        self.advantages = advantages
        # M / A_hat: the product of the ratios pi_new / pi_old of the agents updated so far
        self.correction = th.ones_like(advantages)
        self.factor_version = 0
        self.updated: list[str] = []
        self.spent_kl = 0.0  # realised KL of the steps committed so far
        self.allocator_name = "custom"  # set by HATRPO, for the allocator-contract error

    @property
    def n_agents(self) -> int:
        return len(self.agents)

    @property
    def factor(self) -> th.Tensor:
        """``M`` on the planner's (un-normalised) advantages; an agent's own is :meth:`factor_of`."""
        return self.advantages * self.correction

    def factor_of(self, agent: str) -> th.Tensor:
        """``M`` of ``agent``: its (normalised) advantages times the ratios of the agents updated so far."""
        return self._data[agent].advantages * self.correction

    def _surrogate(self, data: _AgentData, log_prob: th.Tensor) -> th.Tensor:
        ratio = th.exp(log_prob - data.old_log_prob)
        return (data.alive * ratio * data.advantages * self.correction).sum() / data.n_alive

    def _old_surrogate(self, data: _AgentData) -> float:
        """``L(theta_old)``: the surrogate with every ratio 1, the baseline of an improvement."""
        return float((data.alive * data.advantages * self.correction).sum() / data.n_alive)

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
        solved = self._reuse_krylov(data, gradient, fvp)
        if solved is None:
            direction = conjugate_gradient_solver(fvp, gradient, max_iter=self.cg_max_steps).detach()
            product = fvp(direction).detach()
            data.cold_relative_residual = float(
                th.linalg.vector_norm(gradient - product) / th.linalg.vector_norm(gradient)
            )
        else:
            direction, product = solved
        curvature = float(direction @ product)
        if not math.isfinite(curvature) or curvature <= 0.0:
            return SearchDirection(agent, gradient, th.zeros_like(gradient), 0.0, 0.0, self.factor_version)
        potential = max(0.0, float(gradient @ direction)) / math.sqrt(curvature)
        return SearchDirection(agent, gradient, direction, curvature, potential, self.factor_version)

    def _reuse_krylov(
        self, data: _AgentData, gradient: th.Tensor, fvp: partial[th.Tensor]
    ) -> tuple[th.Tensor, th.Tensor] | None:
        """``(x, F x)`` from the agent's Krylov basis and a few more CG steps, or ``None`` to solve cold."""
        if self.krylov_rtol is None or data.cold_relative_residual is None:
            return None
        projected = data.galerkin(gradient)
        if projected is None:
            return None
        start, start_product = projected
        residual = gradient - start_product
        # relative to this gradient's norm: the cold solve's gradient had another scale
        tolerance = max(data.cold_relative_residual, self.krylov_rtol) * float(th.linalg.vector_norm(gradient))
        if float(th.linalg.vector_norm(residual)) <= tolerance:
            return start, start_product
        correction = conjugate_gradient_solver(fvp, residual, max_iter=self.cg_max_steps, residual_tol=tolerance**2)
        direction = (start + correction).detach()
        return direction, fvp(direction).detach()

    @property
    def n_samples(self) -> int:
        return int(self.advantages.shape[0])

    def subset(self, index: th.Tensor, **overrides: Any) -> TrustRegionPlanner:
        """A planner on the samples ``index`` only, same actors and settings (and the same budget).

        Built before any agent moved: its old policy is the actors' current parameters. Advantages are
        normalised over the subset's own samples when this planner normalises them. Used by the
        cross-fitted allocator (decisions on one half of the batch) and the held-out probe.

        :param index: sample indices in increasing order (a :func:`split_samples` fold)
        :param overrides: settings to change (e.g. ``cg_max_steps``); ``n_envs`` defaults to the envs
            the subset keeps whole, if it is a fold of whole envs, else 1
        """
        if self.updated:
            raise RuntimeError("a subset planner must be built before any agent moves")
        settings: dict[str, Any] = dict(
            total_kl=self.total_kl,
            normalize_advantage=self.normalize_advantage,
            cg_max_steps=self.cg_max_steps,
            cg_damping=self.cg_damping,
            line_search_shrinking_factor=self.line_search_shrinking_factor,
            line_search_max_iter=self.line_search_max_iter,
            line_search_accept_ratio=self.line_search_accept_ratio,
            krylov_rtol=self.krylov_rtol,
            fisher_product=self.fisher_product,
        )
        kept_envs = th.unique(index % self.n_envs).numel() if self.n_envs > 1 else 1
        whole_envs = kept_envs > 1 and index.numel() == kept_envs * (self.n_samples // self.n_envs)
        settings["n_envs"] = kept_envs if whole_envs else 1
        settings.update(overrides)
        data = self._data
        return TrustRegionPlanner(
            {a: data[a].actor for a in self.agents},
            {a: data[a].observations[index] for a in self.agents},
            {a: data[a].actions[index] for a in self.agents},
            {a: data[a].alive[index] for a in self.agents},
            self.advantages[index],
            **settings,
        )

    def fold_slopes(self, agent: str, vector: th.Tensor, folds: list[th.Tensor]) -> th.Tensor:
        """``g_k . v`` for each fold ``k``: the slope along ``v`` of ``agent``'s surrogate (current ``M``) on the fold.

        ``g_k = grad mean_{alive samples in fold k} ratio * M``. Computed for all folds at once from the
        per-sample slopes ``u_s = grad l_s . v`` (``l_s`` one sample's surrogate term): with weights
        ``w = 1``, ``u = d/dw [grad_theta(sum_s w_s l_s) . v]``, one double backward pass, the cost of one
        Fisher-vector product whatever the number of folds. The noise-aware allocators' estimates.

        :param agent: the agent, at its old parameters
        :param vector: ``v``, a direction in the agent's parameter space (e.g. its CG direction)
        :param folds: sample indices of each fold (:func:`split_samples`)
        :return: ``(n_folds,)``
        """
        data = self._data[agent]
        log_prob = data.actor.distribution(data.observations).log_prob(data.actions)
        per_sample = data.alive * th.exp(log_prob - data.old_log_prob) * data.advantages * self.correction
        weights = th.ones_like(per_sample, requires_grad=True)
        gradient = flat_grad((weights * per_sample).sum(), data.params, create_graph=True)
        (slopes,) = th.autograd.grad(gradient @ vector.detach(), weights)
        return th.stack([slopes[fold].sum() / data.alive[fold].sum().clamp(min=1.0) for fold in folds]).detach()

    @th.no_grad()
    def measure(self, direction: SearchDirection, threshold: float, fraction: float) -> tuple[float, float]:
        """``(improvement, KL)`` of the step ``fraction * s(threshold)``, no acceptance test; parameters restored.

        Greedy's common-fraction ratio re-measures candidates at one step fraction with it.
        """
        data = self._data[direction.agent]
        if not self.is_current(direction):
            raise RuntimeError(f"the direction of {direction.agent!r} is stale: recompute it")
        baseline = self._old_surrogate(data)
        data.set_params(data.old_params + fraction * direction.full_step(threshold))
        distribution = data.actor.distribution(data.observations)
        kl = float(data.kl(distribution))
        improvement = float(self._surrogate(data, distribution.log_prob(data.actions))) - baseline
        data.set_params(data.old_params)
        return improvement, kl

    @th.no_grad()
    def replay_improvements(self, order: list[str]) -> list[float]:
        """Surrogate improvement on this planner's samples of each agent's *current* parameters, in ``order``.

        Agent ``order[k]`` is scored with ``M`` built from the ratios of ``order[:k]`` (HATRPO's
        sequential correction), exactly as its step was scored where it was taken. The planner's own
        ``M`` is left alone. The held-out probe replays steps taken on another half of the batch.
        """
        correction = th.ones_like(self.advantages)
        improvements = []
        for agent in order:
            data = self._data[agent]
            ratio = th.exp(data.actor.distribution(data.observations).log_prob(data.actions) - data.old_log_prob)
            gain = (data.alive * (ratio - 1.0) * data.advantages * correction).sum() / data.n_alive
            improvements.append(float(gain))
            correction = correction * th.where(data.alive > 0, ratio, th.ones_like(ratio))
        return improvements

    def restore(self) -> None:
        """Every agent back at its old parameters (after steps taken for measurement only)."""
        for data in self._data.values():
            data.set_params(data.old_params)

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
        check_allocator_threshold(threshold, self.total_kl - self.spent_kl, self.total_kl, self.allocator_name, agent)
        predicted = direction.predicted_improvement(threshold) if threshold > 0 else 0.0
        result = StepResult(agent, threshold, 0.0, 0.0, predicted, False, 0.0, direction.potential)
        full_step = direction.full_step(threshold) if threshold > 0 else None
        if full_step is not None and bool(full_step.abs().max() > 0):
            baseline = self._old_surrogate(data)
            fraction = 1.0
            for _ in range(self.line_search_max_iter):
                data.set_params(data.old_params + fraction * full_step)
                distribution = data.actor.distribution(data.observations)
                log_prob = distribution.log_prob(data.actions)
                kl = float(data.kl(distribution))
                improvement = float(self._surrogate(data, log_prob)) - baseline
                # HARL's accept_ratio: the improvement must reach a share of the first-order prediction
                good_enough = improvement > self.line_search_accept_ratio * predicted * fraction
                if math.isfinite(kl) and kl <= threshold and improvement > 0.0 and good_enough:
                    result = StepResult(
                        agent, threshold, kl, improvement, predicted, True, fraction, direction.potential
                    )
                    break
                fraction *= self.line_search_shrinking_factor
        if result.accepted and commit:
            # M <- M * pi_new / pi_old on the samples where the agent acted
            ratio = th.exp(log_prob - data.old_log_prob)
            self.correction = self.correction * th.where(data.alive > 0, ratio, th.ones_like(ratio))
            self.factor_version += 1
            self.updated.append(agent)
            self.spent_kl += result.kl
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
