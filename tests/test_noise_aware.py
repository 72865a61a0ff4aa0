"""Noise-aware allocators (DESIGN §5.3b), the held-out probe, and the planner primitives they use."""

import numpy as np
import pytest
import torch as th
from torch.nn.utils import parameters_to_vector

from sb3_hatrpo import HATRPO
from sb3_hatrpo.allocators import KKTAllocator, make_allocator
from sb3_hatrpo.noise_aware import CrossFitAllocator, ShrunkKKTAllocator, empirical_bayes_shrinkage
from sb3_hatrpo.selection_bias import SelectionBiasProbe
from sb3_hatrpo.trust_region import split_samples
from tests.problems import make_problem, planner_for
from tests.test_allocators import identical_problem

NOISE_AWARE = {
    "kkt-shrink": lambda: ShrunkKKTAllocator(),
    "kkt-shrink-options": lambda: ShrunkKKTAllocator(n_folds=8, shrinkage=2.0, pass_unused_budget=True),
    "cross-fit": lambda: CrossFitAllocator(),
    "cross-fit-half-held-out": lambda: CrossFitAllocator(potential="half", step_on="held-out", tie_break="random"),
    "probe-greedy": lambda: SelectionBiasProbe("greedy", {"ratio": "common-fraction"}),
}


def weighted_problem(weights, n=256, seed=0):
    """As ``make_problem``, with agent ``i``'s first action dimension weighted by ``weights[i]`` (0: irrelevant)."""
    actors, obs, actions, alive, _ = make_problem(n_agents=len(weights), n=n, seed=seed)
    score = sum(w * actions[a][:, 0] for w, a in zip(weights, actors)) + 0.5 * th.randn(n)
    return actors, obs, actions, alive, (score - score.mean()) / score.std()


# ------------------------------------------------------------------ invariants (DESIGN §5.4)
@pytest.mark.parametrize("name", sorted(NOISE_AWARE))
def test_each_step_and_the_total_stay_inside_the_budget(name):
    for seed in range(3):
        planner = planner_for(make_problem(n_agents=3, seed=seed), total_kl=0.03)
        results = NOISE_AWARE[name]().update_agents(planner, np.random.default_rng(seed))
        assert sorted(r.agent for r in results) == planner.agents
        for r in results:
            if r.accepted:
                assert r.kl <= r.threshold
        assert sum(r.kl for r in results) <= planner.total_kl * (1 + 1e-9)
        if name in ("kkt-shrink", "cross-fit"):  # fixed thresholds (no budget passed on): they split the budget
            assert sum(r.threshold for r in results) == pytest.approx(planner.total_kl)


@pytest.mark.parametrize("name", ["kkt-shrink", "cross-fit"])
def test_one_agent_gets_the_whole_budget(name):
    planner = planner_for(make_problem(n_agents=1, seed=0), total_kl=0.02)
    results = make_allocator(name).update_agents(planner, np.random.default_rng(0))
    assert results[0].threshold == pytest.approx(0.02)


@pytest.mark.parametrize("name", ["kkt-shrink", "cross-fit"])
def test_identical_agents_get_identical_thresholds(name):
    planner = planner_for(identical_problem(n_agents=3), total_kl=0.03)
    results = make_allocator(name).update_agents(planner, np.random.default_rng(0))
    np.testing.assert_allclose([r.threshold for r in results], 0.01, rtol=1e-5)


def test_names_are_registered():
    assert isinstance(make_allocator("kkt-shrink", {"n_folds": 3}), ShrunkKKTAllocator)
    assert isinstance(make_allocator("cross-fit", {"step_on": "held-out"}), CrossFitAllocator)
    for bad in (dict(n_folds=1), dict(shrinkage=-1.0)):
        with pytest.raises(ValueError):
            ShrunkKKTAllocator(**bad)
    for bad in (dict(step_on="other"), dict(potential="full"), dict(min_kl_fraction=1.5)):
        with pytest.raises(ValueError):
            CrossFitAllocator(**bad)


# ------------------------------------------------------------------ shrinkage
def test_empirical_bayes_shrinkage():
    c = np.array([1.0, 2.0, 3.0, 4.0])
    # no noise: nothing moves; noise far above the spread: everything goes to the mean
    np.testing.assert_allclose(empirical_bayes_shrinkage(c, np.zeros(4))[0], c)
    np.testing.assert_allclose(empirical_bayes_shrinkage(c, np.full(4, 100.0))[0], np.full(4, 2.5))
    np.testing.assert_allclose(empirical_bayes_shrinkage(c, np.full(4, 100.0), strength=0.0)[0], c)
    # tau^2 = var(c) - mean(s^2) = 5/3 - 0.5; equal noise: one common weight tau^2 / (tau^2 + s^2)
    shrunk, weights = empirical_bayes_shrinkage(c, np.full(4, 0.5))
    tau2 = c.var(ddof=1) - 0.5
    np.testing.assert_allclose(weights, tau2 / (tau2 + 0.5))
    np.testing.assert_allclose(shrunk, 2.5 + weights * (c - 2.5))
    # the noisier of two equally extreme estimates moves further toward the mean
    shrunk, _ = empirical_bayes_shrinkage(np.array([0.0, 2.0, 2.0, 4.0]), np.array([0.1, 0.1, 0.1, 0.8]))
    assert 2.0 - shrunk[0] > shrunk[3] - 2.0
    # one estimate: nothing to shrink toward
    assert empirical_bayes_shrinkage(np.array([3.0]), np.array([9.0]))[0].tolist() == [3.0]


def test_fold_potentials_average_to_the_full_batch_potential():
    """The folds' gradients average to the batch gradient, so their potentials along x average to c."""
    planner = planner_for(make_problem(n_agents=2, seed=3), total_kl=0.02)
    for agent in planner.agents:
        d = planner.direction(agent)
        folds = split_samples(planner.n_samples, 4)
        fold_potentials = planner.fold_slopes(agent, d.direction, folds) / d.curvature**0.5
        assert float(fold_potentials.mean()) == pytest.approx(d.potential, rel=1e-4)
        assert float(fold_potentials.std()) > 0


def test_fold_slopes_are_the_folds_gradients_along_the_vector():
    planner = planner_for(make_problem(n_agents=2, seed=1, n=128), total_kl=0.02)
    folds = split_samples(planner.n_samples, 3)
    vector = th.randn(parameters_to_vector(planner._data["agent_0"].params).numel())
    slopes = planner.fold_slopes("agent_0", vector, folds)
    for fold, slope in zip(folds, slopes):
        gradient = planner.subset(fold).direction("agent_0").gradient  # same samples, same advantages
        assert float(slope) == pytest.approx(float(gradient @ vector), rel=1e-4, abs=1e-7)


def test_shrinkage_pulls_thresholds_toward_uniform_and_zero_shrinkage_is_kkt():
    spreads = {}
    for name, allocator in {
        "kkt": KKTAllocator(min_kl_fraction=0.0),
        "shrink0": ShrunkKKTAllocator(shrinkage=0.0, min_kl_fraction=0.0),
        "shrink": ShrunkKKTAllocator(min_kl_fraction=0.0),
    }.items():
        th.manual_seed(0)  # the same CG start for every allocator
        planner = planner_for(weighted_problem([1.0, 0.8, 0.6], n=96, seed=1), total_kl=0.03)
        thresholds = {r.agent: r.threshold for r in allocator.update_agents(planner, np.random.default_rng(0))}
        spreads[name] = (max(thresholds.values()) - min(thresholds.values()), thresholds)
    assert spreads["shrink0"][1] == pytest.approx(spreads["kkt"][1], rel=1e-6)
    assert spreads["shrink"][0] < 0.9 * spreads["kkt"][0]


# ------------------------------------------------------------------ cross-fitting
def test_cross_fitted_potential_of_an_irrelevant_agent_is_not_inflated_by_noise():
    """In-sample potentials are sqrt(g^T F^-1 g) >= 0 even for pure noise; the cross-fitted one is ~0."""
    in_sample, cross, relevant = [], [], []
    for seed in range(12):
        planner = planner_for(weighted_problem([0.0, 1.0], n=128, seed=seed), total_kl=0.02)
        in_sample.append(planner.direction("agent_0").potential)
        potentials, _ = CrossFitAllocator().cross_fitted_potentials(planner, np.random.default_rng(seed))
        cross.append(potentials["agent_0"])
        relevant.append(potentials["agent_1"])
    assert np.mean(cross) < 0.5 * np.mean(in_sample)
    assert np.mean(relevant) > 3 * np.mean(cross)


def test_cross_fit_half_potential_is_the_deciding_halfs_own():
    planner = planner_for(make_problem(n_agents=2, seed=0), total_kl=0.02)
    allocator = CrossFitAllocator(potential="half")
    th.manual_seed(5)
    potentials, held_out = allocator.cross_fitted_potentials(planner, np.random.default_rng(1))
    halves = split_samples(planner.n_samples, 2)
    choose = halves[1] if th.equal(held_out, halves[0]) else halves[0]
    th.manual_seed(5)
    deciding = planner.subset(choose, cg_max_steps=planner.cg_max_steps // 2)
    for agent in planner.agents:
        assert potentials[agent] == pytest.approx(deciding.direction(agent).potential, rel=1e-6)


# ------------------------------------------------------------------ planner primitives
def test_replay_reproduces_the_improvements_of_committed_steps():
    planner = planner_for(make_problem(n_agents=3, seed=2), total_kl=0.03)
    same_samples = planner.subset(th.arange(planner.n_samples))  # built at the old parameters
    results = KKTAllocator().update_agents(planner, np.random.default_rng(0))
    moved = [r for r in results if r.accepted]
    assert len(moved) == 3
    replayed = same_samples.replay_improvements([r.agent for r in moved])
    np.testing.assert_allclose(replayed, [r.improvement for r in moved], rtol=1e-5)


def test_measure_at_the_accepted_fraction_is_the_line_search_figure():
    planner = planner_for(make_problem(n_agents=2, seed=0), total_kl=0.02)
    d = planner.direction("agent_1")
    before = parameters_to_vector(planner._data["agent_1"].params).clone()
    candidate = planner.step(d, 0.01, commit=False)
    improvement, kl = planner.measure(d, 0.01, candidate.step_fraction)
    assert (improvement, kl) == pytest.approx((candidate.improvement, candidate.kl), rel=1e-6)
    assert th.equal(parameters_to_vector(planner._data["agent_1"].params), before)


def test_split_samples():
    folds = split_samples(10, 3)
    assert [f.tolist() for f in folds] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    shuffled = split_samples(10, 2, np.random.default_rng(0))
    assert sorted(th.cat(shuffled).tolist()) == list(range(10))
    with pytest.raises(ValueError):
        split_samples(3, 4)
    # 4 envs interleaved step-major (t * 4 + env): two folds of two whole envs each
    by_env = split_samples(12, 2, n_envs=4)
    assert [f.tolist() for f in by_env] == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
    assert [f.tolist() for f in split_samples(12, 4, n_envs=4)][1] == [1, 5, 9]
    assert [f.tolist() for f in split_samples(12, 3, n_envs=2)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_subset_of_whole_envs_keeps_its_env_layout():
    actors, obs, actions, alive, advantages = make_problem(n_agents=2, n=240, seed=0)
    planner = planner_for((actors, obs, actions, alive, advantages), total_kl=0.02, n_envs=4)
    halves = split_samples(planner.n_samples, 2, n_envs=planner.n_envs)
    assert planner.subset(halves[0]).n_envs == 2
    assert planner.subset(th.arange(100)).n_envs == 1  # a time block: no env layout


# ------------------------------------------------------------------ the held-out probe
def test_probe_leaves_the_wrapped_allocators_update_unchanged():
    outcomes = []
    for allocator in (KKTAllocator(), SelectionBiasProbe(KKTAllocator())):
        th.manual_seed(7)
        planner = planner_for(make_problem(n_agents=3, seed=4), total_kl=0.03)
        rng = np.random.default_rng(3)
        results = allocator.update_agents(planner, rng)
        params = th.cat([parameters_to_vector(planner._data[a].params) for a in planner.agents])
        outcomes.append(([(r.agent, r.threshold, r.kl, r.improvement) for r in results], params, rng.random()))
    assert outcomes[0][0] == outcomes[1][0]
    assert th.equal(outcomes[0][1], outcomes[1][1])
    assert outcomes[0][2] == outcomes[1][2]  # the iteration's generator was not consumed


def test_probe_scores_committed_steps_in_and_out_of_sample():
    probe = SelectionBiasProbe("greedy")
    planner = planner_for(make_problem(n_agents=3, seed=0, n=512), total_kl=0.03)
    probe.update_agents(planner, np.random.default_rng(0))
    figures = probe.diagnostics
    assert figures["selection/moved"] == len(probe.last_steps) > 0
    assert figures["selection/in_sample"] == pytest.approx(sum(s[1] for s in probe.last_steps))
    assert figures["selection/held_out"] == pytest.approx(sum(s[2] for s in probe.last_steps))
    assert figures["selection/optimism"] == pytest.approx(
        figures["selection/in_sample"] - figures["selection/held_out"]
    )
    assert figures["selection/kl_spent"] <= planner.total_kl * (1 + 1e-9)
    assert all(s[1] > 0 for s in probe.last_steps)  # accepted steps improve their own half


@pytest.mark.parametrize(
    "allocator", [SelectionBiasProbe("kkt"), "kkt-shrink", "cross-fit"], ids=["probe", "kkt-shrink", "cross-fit"]
)
def test_noise_aware_allocators_train_and_log(allocator):
    model = HATRPO(
        "MlpPolicy",
        "games:differential",
        allocator=allocator,
        n_steps=64,
        batch_size=64,
        n_critic_updates=1,
        cg_max_steps=5,
        seed=0,
        policy_kwargs=dict(net_arch=[8]),
    )
    model.learn(128)
    assert len(model.last_allocation) == 2
    if isinstance(allocator, SelectionBiasProbe):
        assert {"selection/in_sample", "selection/held_out"} <= set(model.allocator.diagnostics)
        assert "train/selection/held_out" in model.logger.name_to_value


def test_fully_shrunk_potentials_give_uniform_thresholds_in_a_random_order():
    firsts = set()
    for seed in range(10):
        planner = planner_for(identical_problem(n_agents=3), total_kl=0.03)
        allocator = ShrunkKKTAllocator()
        results = allocator.update_agents(planner, np.random.default_rng(seed))
        np.testing.assert_allclose([r.threshold for r in results], 0.01, rtol=1e-5)
        firsts.add(results[0].agent)
    assert allocator.diagnostics["shrink/mean_weight"] == pytest.approx(0.0)
    assert len(firsts) > 1  # not always possible_agents[0], as tie_break="order" would do
