"""The trust-region step of one agent (DESIGN §4): KL, CG direction, line search, factor M."""

import math

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import (
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
)
from torch.nn.utils import parameters_to_vector

from sb3_hatrpo.allocators import UniformAllocator
from sb3_hatrpo.policies import Actor
from sb3_hatrpo.trust_region import TrustRegionPlanner, mean_kl
from tests.problems import make_problem, planner_for


# --------------------------------------------------------------------- KL
def test_kl_of_diagonal_gaussians_matches_closed_form():
    m1, m2 = th.tensor([[0.0, 1.0], [0.5, -0.5]]), th.tensor([[0.3, 0.7], [0.0, 0.0]])
    log_s1, log_s2 = th.tensor([0.1, -0.4]), th.tensor([-0.2, 0.3])
    old = DiagGaussianDistribution(2).proba_distribution(m1, log_s1)
    new = DiagGaussianDistribution(2).proba_distribution(m2, log_s2)
    s1, s2 = log_s1.exp(), log_s2.exp()
    closed = (th.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5).sum(dim=1)
    alive = th.tensor([1.0, 1.0])
    assert mean_kl(old, new, alive).item() == pytest.approx(closed.mean().item(), rel=1e-6)
    # samples where the agent did not act do not count
    assert mean_kl(old, new, th.tensor([1.0, 0.0])).item() == pytest.approx(closed[0].item(), rel=1e-6)


def test_kl_of_categoricals_matches_closed_form():
    p_logits, q_logits = th.tensor([[0.0, 1.0, -1.0]]), th.tensor([[0.5, 0.0, 0.2]])
    old = CategoricalDistribution(3).proba_distribution(p_logits)
    new = CategoricalDistribution(3).proba_distribution(q_logits)
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    closed = (p * (p / q).log()).sum()
    assert mean_kl(old, new, th.ones(1)).item() == pytest.approx(closed.item(), rel=1e-6)

    # MultiDiscrete: the KL of independent sub-actions adds up
    multi_old = MultiCategoricalDistribution([3, 3]).proba_distribution(th.cat([p_logits, q_logits], dim=1))
    multi_new = MultiCategoricalDistribution([3, 3]).proba_distribution(th.cat([q_logits, q_logits], dim=1))
    assert mean_kl(multi_old, multi_new, th.ones(1)).item() == pytest.approx(closed.item(), rel=1e-6)


# -------------------------------------------------------------- direction
def test_conjugate_gradient_direction_matches_a_direct_solve():
    problem = make_problem(n_agents=1, net_arch=(4,))
    actor, obs, alive = problem[0]["agent_0"], problem[1]["agent_0"], problem[3]["agent_0"]
    damping = 0.1
    theta_old = parameters_to_vector(actor.parameters()).detach().clone()
    n_params = theta_old.numel()
    planner = planner_for(problem, cg_max_steps=4 * n_params, cg_damping=damping)
    direction = planner.direction("agent_0")

    # The damped Fisher matrix written out: the Hessian of the mean KL at the old parameters.
    with th.no_grad():
        old = actor.distribution(obs)
    wrapped = _DistributionOf(actor)

    def kl_of_theta(theta: th.Tensor) -> th.Tensor:
        return mean_kl(old, th.func.functional_call(wrapped, _unflatten(actor, theta), (obs,)), alive)

    fisher = th.autograd.functional.hessian(kl_of_theta, theta_old) + damping * th.eye(n_params)
    expected = th.linalg.solve(fisher, direction.gradient)
    assert th.allclose(direction.direction, expected, rtol=1e-3, atol=1e-5)
    assert direction.curvature == pytest.approx(float(expected @ fisher @ expected), rel=1e-3)
    # potential c = g^T x / sqrt(x^T F x) = sqrt(g^T F^-1 g) when CG converges
    assert direction.potential == pytest.approx(math.sqrt(float(direction.gradient @ expected)), rel=1e-3)


class _DistributionOf(th.nn.Module):
    """Wraps an actor so functional_call returns its distribution."""

    def __init__(self, actor: Actor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, obs: th.Tensor):
        return self.actor.distribution(obs)


def _unflatten(actor: Actor, theta: th.Tensor) -> dict[str, th.Tensor]:
    chunks, start = {}, 0
    for name, p in actor.named_parameters():
        chunks[f"actor.{name}"] = theta[start : start + p.numel()].view(p.shape)
        start += p.numel()
    return chunks


# ------------------------------------------------------------------- step
@pytest.mark.parametrize(
    "action_space",
    [spaces.Box(-1.0, 1.0, (2,), np.float32), spaces.Discrete(4), spaces.MultiDiscrete([3, 2])],
    ids=["box", "discrete", "multidiscrete"],
)
@pytest.mark.parametrize("threshold", [1e-4, 1e-2, 0.1])
def test_accepted_steps_respect_their_threshold(action_space, threshold):
    problem = make_problem(action_space=action_space, seed=3)
    planner = planner_for(problem, total_kl=2 * threshold)
    for agent in planner.agents:
        result = planner.step(planner.direction(agent), threshold)
        if result.accepted:
            assert result.kl <= threshold
            assert planner.kl_of(agent) == pytest.approx(result.kl, rel=1e-5, abs=1e-9)
            assert result.improvement > 0
        else:
            assert planner.kl_of(agent) == 0.0


def test_uncommitted_step_measures_and_restores():
    problem = make_problem(seed=1)
    planner = planner_for(problem)
    before = parameters_to_vector(problem[0]["agent_0"].parameters()).clone()
    result = planner.step(planner.direction("agent_0"), 0.01, commit=False)
    assert result.accepted and result.kl > 0
    assert th.equal(parameters_to_vector(problem[0]["agent_0"].parameters()), before)
    assert planner.factor_version == 0


def test_predicted_improvement_is_potential_times_sqrt_two_delta():
    planner = planner_for(make_problem(seed=2))
    direction = planner.direction("agent_1")
    result = planner.step(direction, 0.005)
    assert result.predicted_improvement == pytest.approx(direction.potential * math.sqrt(2 * 0.005))
    # A small step: the first-order prediction is close to the actual improvement.
    assert result.accepted
    assert result.improvement == pytest.approx(result.predicted_improvement * result.step_fraction, rel=0.3)


def test_factor_is_the_product_of_the_updated_agents_ratios():
    problem = make_problem(n_agents=3, seed=4)
    advantages = problem[4]
    planner = planner_for(problem, total_kl=0.03)
    results = UniformAllocator().update_agents(planner, np.random.default_rng(0))
    assert sum(r.accepted for r in results) >= 2
    expected = advantages.clone()
    for result in results:
        if result.accepted:
            expected = expected * planner.log_ratio_of(result.agent).exp()
    assert th.allclose(planner.factor, expected, rtol=1e-5, atol=1e-7)


def test_a_moved_agents_stale_direction_is_refused():
    planner = planner_for(make_problem(seed=5))
    stale = planner.direction("agent_1")
    assert planner.step(planner.direction("agent_0"), 0.01).accepted
    with pytest.raises(RuntimeError, match="recompute"):
        planner.step(stale, 0.01)


# ----------------------------------------------------------- Krylov reuse
DAMPING = 1e-3


def _recomputed_direction(krylov_rtol, seed=6):
    """Agent 1's direction after agent 0 moved, and the planner that computed it."""
    problem = make_problem(n_agents=2, n=512, seed=seed, net_arch=(64, 64))  # CG does not converge in 10 steps
    # little damping: the Fisher matrix is ill-conditioned, so 10 CG steps do not converge
    planner = planner_for(problem, cg_max_steps=10, cg_damping=DAMPING, krylov_rtol=krylov_rtol)
    data = planner._data["agent_1"]
    calls = []
    original = data.fisher_vector_product
    data.fisher_vector_product = lambda vector, damping: calls.append(1) or original(vector, damping)
    first = planner.direction("agent_1")  # cold solve, with M = A_hat
    cold_products = len(calls)
    assert planner.step(planner.direction("agent_0"), 0.01).accepted  # M changes
    recomputed = planner.direction("agent_1")
    new_products = len(calls) - cold_products
    data.fisher_vector_product = original
    return planner, first, recomputed, new_products, cold_products


def _fresh_direction(planner, agent, cg_max_steps):
    """A from-scratch solve for the planner's current M, on copies of the same actors and data."""
    data = planner._data[agent]
    fresh = TrustRegionPlanner(
        {agent: data.actor},
        {agent: data.observations},
        {agent: data.actions},
        {agent: data.alive},
        planner.factor,
        total_kl=planner.total_kl,
        cg_max_steps=cg_max_steps,
        cg_damping=DAMPING,
        krylov_rtol=None,
    )
    return fresh.direction(agent), fresh._data[agent]


def test_recomputed_direction_reuses_the_krylov_basis_and_meets_its_tolerance():
    planner, first, reused, new_products, cold_products = _recomputed_direction(krylov_rtol=0.05)
    assert not th.equal(reused.gradient, first.gradient)  # M changed, so g did
    # a cold solve costs up to cg_max_steps + 2 Fisher-vector products; the reuse far fewer
    assert new_products <= cold_products // 2
    exact, data = _fresh_direction(planner, "agent_1", cg_max_steps=500)
    residual = reused.gradient - data.fisher_vector_product(reused.direction, damping=DAMPING)
    assert float(residual.norm()) <= 0.05 * float(reused.gradient.norm()) * 1.001
    cosine = float(reused.direction @ exact.direction) / float(reused.direction.norm() * exact.direction.norm())
    assert cosine > 0.99
    assert reused.potential == pytest.approx(exact.potential, rel=0.01)
    assert reused.curvature == pytest.approx(
        float(reused.direction @ data.fisher_vector_product(reused.direction, DAMPING)), rel=1e-4
    )


def test_krylov_rtol_zero_solves_as_accurately_as_the_cold_solve():
    planner, _, reused, _, _ = _recomputed_direction(krylov_rtol=0.0)
    data = planner._data["agent_1"]
    fresh, fresh_data = _fresh_direction(planner, "agent_1", cg_max_steps=10)
    residual = reused.gradient - fresh_data.fisher_vector_product(reused.direction, damping=DAMPING)
    fresh_residual = fresh.gradient - fresh_data.fisher_vector_product(fresh.direction, damping=DAMPING)
    cold = data.cold_relative_residual * float(reused.gradient.norm())
    assert float(residual.norm()) <= max(cold, float(fresh_residual.norm())) * 1.01


def test_krylov_tolerance_is_relative_to_the_new_gradient():
    """The same problem with M scaled by 1000: an absolute tolerance from the cold solve would stop at once."""
    problem = make_problem(n_agents=2, n=512, seed=6, net_arch=(64, 64))
    actors, obs, actions, alive, advantages = problem
    planner = TrustRegionPlanner(
        actors,
        obs,
        actions,
        alive,
        advantages * 1e-3,
        total_kl=0.02,
        cg_max_steps=10,
        cg_damping=DAMPING,
        krylov_rtol=0.05,
    )
    planner.direction("agent_1")  # cold solve with a tiny gradient
    assert planner.step(planner.direction("agent_0"), 0.01).accepted
    planner.correction = planner.correction * 1e3  # a much larger gradient for the recomputation
    reused = planner.direction("agent_1")
    data = planner._data["agent_1"]
    residual = reused.gradient - data.fisher_vector_product(reused.direction, damping=DAMPING)
    allowed = max(0.05, data.cold_relative_residual) * float(reused.gradient.norm())
    assert float(residual.norm()) <= allowed * 1.001


def test_without_krylov_reuse_every_direction_is_solved_from_scratch():
    planner, _, recomputed, new_products, cold_products = _recomputed_direction(krylov_rtol=None)
    assert planner._data["agent_1"].krylov_vectors == []  # nothing recorded when nothing will reuse it
    assert new_products == cold_products  # CG's first residual, its steps and the curvature product
    fresh, _ = _fresh_direction(planner, "agent_1", cg_max_steps=10)
    assert th.allclose(recomputed.gradient, fresh.gradient)


def test_krylov_rtol_must_be_non_negative():
    with pytest.raises(ValueError, match="krylov_rtol"):
        planner_for(make_problem(), krylov_rtol=-0.1)


# ------------------------------------------------------- one alive-mask convention (DESIGN §5.3c)
def _half_dead_problem(dead_actions: float, dead_advantage: float = 0.0):
    """agent_0 is absent on the second half of the samples; there its actions and advantages are garbage."""
    actors, obs, actions, alive, advantages = make_problem(n_agents=2, n=256, seed=3)
    alive = dict(alive)
    alive["agent_0"] = th.cat([th.ones(128), th.zeros(128)])
    actions = dict(actions)
    actions["agent_0"] = actions["agent_0"].clone()
    actions["agent_0"][128:] = dead_actions
    advantages = advantages.clone()
    advantages[128:] += dead_advantage
    return actors, obs, actions, alive, advantages


def test_rows_where_an_agent_is_absent_change_neither_its_gradient_nor_the_factor():
    results = []
    for garbage in (0.0, 50.0):
        problem = _half_dead_problem(dead_actions=garbage)
        # identical actor parameters in both runs
        for actor in problem[0].values():
            th.manual_seed(0)
            for p in actor.parameters():
                p.data.normal_(0, 0.3)
        planner = planner_for(problem, normalize_advantage=True)
        direction = planner.direction("agent_0")
        result = planner.step(direction, 0.01)
        assert result.accepted
        results.append((direction.gradient.clone(), planner.correction.clone(), planner.kl_of("agent_0")))
    (g_a, m_a, kl_a), (g_b, m_b, kl_b) = results
    assert th.allclose(g_a, g_b, atol=1e-7)
    assert th.allclose(m_a, m_b, atol=1e-6)
    assert kl_a == pytest.approx(kl_b, rel=1e-6)
    # M only multiplies the samples where the moved agent acted
    assert th.equal(m_a[128:], th.ones(128))
    assert not th.allclose(m_a[:128], th.ones(128))


def test_each_agents_advantages_are_normalised_over_its_own_alive_samples():
    problem = _half_dead_problem(dead_actions=0.0, dead_advantage=100.0)
    planner = planner_for(problem, normalize_advantage=True)
    own = planner.factor_of("agent_0")[:128]
    assert float(own.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(own.std()) == pytest.approx(1.0, rel=1e-4)
    everyone = planner.factor_of("agent_1")  # alive everywhere: normalised over all samples
    assert float(everyone.mean()) == pytest.approx(0.0, abs=1e-5)
    # the surrogate of agent_0 averages over its alive samples, like its KL: the garbage half is invisible
    clean = planner_for(_half_dead_problem(dead_actions=0.0, dead_advantage=0.0), normalize_advantage=True)
    assert th.allclose(planner.factor_of("agent_0")[:128], clean.factor_of("agent_0")[:128], atol=1e-5)


def test_scaling_the_advantages_leaves_normalised_directions_unchanged():
    problem = make_problem(n_agents=2, seed=7)
    scaled = (*problem[:4], problem[4] * 1000.0 + 5.0)
    direction = planner_for(problem, normalize_advantage=True).direction("agent_0")
    direction_scaled = planner_for(scaled, normalize_advantage=True).direction("agent_0")
    assert direction_scaled.potential == pytest.approx(direction.potential, rel=1e-4)
    unnormalised = planner_for(scaled, normalize_advantage=False).direction("agent_0")
    assert unnormalised.potential > 100 * direction.potential


def test_accept_ratio_rejects_steps_that_fall_short_of_the_prediction():
    planner = planner_for(make_problem(seed=2), total_kl=0.05, line_search_accept_ratio=0.0)
    plain = planner.step(planner.direction("agent_1"), 0.05, commit=False)
    strict = planner_for(make_problem(seed=2), total_kl=0.05, line_search_accept_ratio=0.999)
    result = strict.step(strict.direction("agent_1"), 0.05, commit=False)
    assert plain.accepted
    # the plain step falls short of its linear prediction, so the strict search must not accept it
    assert plain.improvement < 0.999 * plain.predicted_improvement * plain.step_fraction
    assert not (result.accepted and result.step_fraction == plain.step_fraction)
    if result.accepted:
        assert result.improvement > 0.999 * result.predicted_improvement * result.step_fraction
