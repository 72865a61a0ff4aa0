"""Allocators (DESIGN §5): the exact KKT thresholds, and each allocator on the planner."""

import numpy as np
import pytest
from scipy.optimize import minimize

from sb3_hatrpo.allocators import (
    ALLOCATORS,
    BaseAllocator,
    GreedyAllocator,
    KKTAllocator,
    UniformAllocator,
    kkt_thresholds,
    make_allocator,
    rank,
)
from tests.problems import make_problem, planner_for


def objective(potentials: np.ndarray, thresholds: np.ndarray) -> float:
    return float(np.sum(potentials * np.sqrt(2 * thresholds)))


def slsqp_thresholds(potentials: np.ndarray, total: float, floor: float) -> np.ndarray:
    n = len(potentials)
    best = None
    for start in (np.full(n, total / n), potentials**2 / np.sum(potentials**2) * total):
        start = np.maximum(start, floor)
        start = start * total / start.sum()
        res = minimize(
            lambda d: -objective(potentials, np.maximum(d, 0.0)),
            start,
            method="SLSQP",
            bounds=[(floor, total)] * n,
            constraints=[{"type": "eq", "fun": lambda d: d.sum() - total}],
            options={"ftol": 1e-14, "maxiter": 1000},
        )
        if best is None or -res.fun > -best.fun:
            best = res
    return best.x


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("floor_fraction", [0.0, 0.3, 0.8])
def test_kkt_thresholds_are_feasible_and_optimal(seed, floor_fraction):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 8))
    # spread potentials over orders of magnitude so floors become active
    potentials = np.exp(rng.normal(0.0, 1.5, n))
    total = float(rng.uniform(0.005, 0.1))
    floor = floor_fraction * total / n
    thresholds = kkt_thresholds(potentials, total, floor)
    assert thresholds.sum() == pytest.approx(total, rel=1e-12)
    assert np.all(thresholds >= floor - 1e-15)
    reference = slsqp_thresholds(potentials, total, floor)
    ours, theirs = objective(potentials, thresholds), objective(potentials, reference)
    assert ours >= theirs * (1 - 1e-6)


def test_kkt_floor_becomes_active_for_small_potentials():
    thresholds = kkt_thresholds([3.0, 2.0, 0.01], total_kl=0.03, min_kl=0.002)
    assert thresholds[2] == pytest.approx(0.002)
    # the free agents split the rest in proportion to c^2
    assert thresholds[0] / thresholds[1] == pytest.approx(9 / 4)
    assert thresholds.sum() == pytest.approx(0.03)
    # a much stronger first agent pushes the second onto the floor too
    np.testing.assert_allclose(kkt_thresholds([10.0, 1.0, 0.01], 0.03, 0.002), [0.026, 0.002, 0.002])


def test_kkt_without_floor_is_proportional_to_squared_potentials():
    c = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(kkt_thresholds(c, 0.14), 0.14 * c**2 / np.sum(c**2))


def test_kkt_equal_potentials_give_equal_thresholds():
    np.testing.assert_allclose(kkt_thresholds([0.7, 0.7, 0.7, 0.7], 0.04, 0.001), np.full(4, 0.01))


def test_kkt_one_agent_gets_the_whole_budget():
    assert kkt_thresholds([0.3], 0.05).tolist() == [0.05]
    assert kkt_thresholds([0.0], 0.05, 0.05).tolist() == [0.05]


def test_kkt_all_zero_potentials_split_uniformly():
    np.testing.assert_allclose(kkt_thresholds([0.0, 0.0, 0.0], 0.03), np.full(3, 0.01))


@pytest.mark.parametrize(
    ("potentials", "total", "floor", "match"),
    [
        ([1.0, np.nan], 0.1, 0.0, "finite"),
        ([1.0, -0.1], 0.1, 0.0, "non-negative"),
        ([1.0, 1.0], 0.0, 0.0, "total_kl"),
        ([1.0, 1.0], 0.1, 0.06, "infeasible floor"),
    ],
)
def test_kkt_thresholds_reject_bad_input(potentials, total, floor, match):
    with pytest.raises(ValueError, match=match):
        kkt_thresholds(potentials, total, floor)


# ------------------------------------------------------------- allocators
@pytest.mark.parametrize(
    "allocator",
    [
        UniformAllocator(),
        UniformAllocator(pass_unused_budget=True),
        KKTAllocator(),
        KKTAllocator(0.0, True, 0.5),
        GreedyAllocator(),
    ],
    ids=["uniform", "uniform-pass", "kkt", "kkt-options", "greedy"],
)
def test_every_allocator_keeps_each_step_and_the_total_inside_the_budget(allocator):
    for seed in range(3):
        planner = planner_for(make_problem(n_agents=3, seed=seed), total_kl=0.03)
        results = allocator.update_agents(planner, np.random.default_rng(seed))
        assert sorted(r.agent for r in results) == planner.agents
        for r in results:
            if r.accepted:
                assert r.kl <= r.threshold
        assert sum(r.kl for r in results) <= planner.total_kl * (1 + 1e-9)


def test_uniform_threshold_is_the_per_agent_share_and_order_is_random():
    orders = set()
    for seed in range(8):
        planner = planner_for(make_problem(n_agents=3, seed=0), total_kl=0.03)
        results = UniformAllocator().update_agents(planner, np.random.default_rng(seed))
        assert [r.threshold for r in results] == pytest.approx([0.01] * 3)
        orders.add(tuple(r.agent for r in results))
    assert len(orders) > 1


def test_kkt_orders_by_potential_and_feeds_the_strong_agent():
    # make_problem weights agent i's action by (i + 1): agent_2 matters most
    planner = planner_for(make_problem(n_agents=3, seed=0), total_kl=0.03)
    results = KKTAllocator(min_kl_fraction=0.1).update_agents(planner, np.random.default_rng(0))
    assert results[0].agent == "agent_2"
    thresholds = {r.agent: r.threshold for r in results}
    assert thresholds["agent_2"] > thresholds["agent_1"] > thresholds["agent_0"]


def test_every_allocator_gives_a_single_agent_the_whole_budget():
    for name in ("uniform", "kkt", "greedy"):
        planner = planner_for(make_problem(n_agents=1, seed=0), total_kl=0.02)
        results = make_allocator(name).update_agents(planner, np.random.default_rng(0))
        assert results[0].threshold == pytest.approx(0.02)


def test_make_allocator_names_aliases_and_errors():
    assert isinstance(make_allocator("hatrpo"), UniformAllocator)
    assert isinstance(make_allocator("W"), KKTAllocator)
    assert isinstance(make_allocator("g"), GreedyAllocator)
    assert make_allocator("kkt", {"min_kl_fraction": 0.2}).min_kl_fraction == 0.2
    custom = GreedyAllocator(eps=1e-3)
    assert make_allocator(custom) is custom
    with pytest.raises(ValueError, match=r"Valid names: .*greedy.*kkt.*uniform"):
        make_allocator("ppo")
    with pytest.raises(ValueError, match="Bad allocator_kwargs"):
        make_allocator("greedy", {"min_kl_fraction": 0.1})
    with pytest.raises(ValueError, match="min_kl_fraction"):
        KKTAllocator(min_kl_fraction=2.0)
    assert set(ALLOCATORS) >= {"uniform", "hatrpo", "kkt", "w", "greedy", "g"}
    assert issubclass(KKTAllocator, BaseAllocator)


# ------------------------------------------------ greedy's rule, on a scripted planner
class _Direction:
    def __init__(self, agent: str, version: int) -> None:
        self.agent, self.factor_version, self.potential = agent, version, 1.0


class ScriptedPlanner:
    """A planner whose steps are known in closed form: improvement ``c sqrt(delta)``, KL ``k delta``.

    The order of ``agents`` puts the best ratio (``c / k``) in the middle, the largest improvement first.
    """

    def __init__(self, total_kl: float = 0.03) -> None:
        self.agents = ["strong_but_costly", "efficient", "weak"]
        self.coefficients = {"strong_but_costly": (3.0, 1.0), "efficient": (2.0, 0.25), "weak": (1.0, 0.5)}
        self.total_kl = total_kl
        self.version = 0
        self.committed: list[tuple[str, float]] = []

    @property
    def n_agents(self) -> int:
        return len(self.agents)

    def direction(self, agent: str) -> _Direction:
        return _Direction(agent, self.version)

    def is_current(self, direction: _Direction) -> bool:
        return direction.factor_version == self.version

    def candidate(self, agent: str, threshold: float) -> tuple[float, float]:
        c, k = self.coefficients[agent]
        return c * np.sqrt(threshold), k * threshold

    def step(self, direction: _Direction, threshold: float, *, commit: bool = True):
        from sb3_hatrpo.trust_region import StepResult

        improvement, kl = self.candidate(direction.agent, threshold)
        if commit:
            self.committed.append((direction.agent, threshold))
            self.version += 1
        return StepResult(direction.agent, threshold, kl, improvement, improvement, True, 1.0, 1.0)

    def skip(self, agent: str, threshold: float = 0.0):
        from sb3_hatrpo.trust_region import StepResult

        return StepResult(agent, threshold, 0.0, 0.0, 0.0, False, 0.0, 0.0)


def test_greedy_moves_the_best_improvement_to_kl_ratio_first_not_the_first_or_the_largest():
    planner = ScriptedPlanner()
    GreedyAllocator().update_agents(planner, np.random.default_rng(0))
    # ratios at the share B/3: c sqrt(d) / (k d) -> 3/1 : 2/0.25 : 1/0.5 = 3 : 8 : 2
    assert [agent for agent, _ in planner.committed] == ["efficient", "strong_but_costly", "weak"]


def test_greedy_threshold_is_the_budget_times_the_chosen_ratio_share():
    planner = ScriptedPlanner(total_kl=0.03)
    GreedyAllocator(eps=1e-12).update_agents(planner, np.random.default_rng(0))
    share = 0.03 / 3
    ratios = {}
    for agent in planner.agents:
        improvement, kl = planner.candidate(agent, share)
        ratios[agent] = improvement / kl
    expected_first = 0.03 * ratios["efficient"] / sum(ratios.values())
    assert planner.committed[0][1] == pytest.approx(expected_first, rel=1e-9)
    assert planner.committed[0][1] != pytest.approx(share)  # not the plain B / |R|
    # second round: what is left of the budget, shared among the two remaining agents by their ratios
    left = 0.03 - planner.candidate("efficient", expected_first)[1]
    ratios2 = {}
    for agent in ("strong_but_costly", "weak"):
        improvement, kl = planner.candidate(agent, left / 2)
        ratios2[agent] = improvement / kl
    expected_second = left * ratios2["strong_but_costly"] / sum(ratios2.values())
    assert planner.committed[1][1] == pytest.approx(expected_second, rel=1e-9)


# ------------------------------------------- greedy's biases (issue #8), on scripted planners
class BacktrackingPlanner(ScriptedPlanner):
    """Steps along each direction: improvement ``alpha c sqrt(delta)``, KL ``alpha^2 k delta`` at fraction ``alpha``.

    The line search tries ``alpha = 1, 0.8, 0.64, ...`` and accepts the first ``alpha <= alpha_max`` of
    the agent: ``"backtracker"``'s quadratic model fails until ``alpha = 0.64`` (two backtracks).
    Under the paper's ratio ``I / k ~ c / (alpha sqrt(delta))`` it then looks better than
    ``"steady"`` (0.9 / 0.64 = 1.41 > 1) although at any common step it is worse (0.9 < 1).
    """

    def __init__(self, total_kl: float = 0.03) -> None:
        super().__init__(total_kl)
        self.agents = ["backtracker", "steady", "weak"]
        self.coefficients = {"backtracker": (0.9, 1.0), "steady": (1.0, 1.0), "weak": (0.3, 1.0)}
        self.alpha_max = {"backtracker": 0.64, "steady": 1.0, "weak": 1.0}

    def at(self, agent: str, threshold: float, fraction: float) -> tuple[float, float]:
        c, k = self.coefficients[agent]
        return fraction * c * np.sqrt(threshold), fraction**2 * k * threshold

    def step(self, direction, threshold: float, *, commit: bool = True):
        from sb3_hatrpo.trust_region import StepResult

        fraction = 1.0
        while fraction > self.alpha_max[direction.agent] + 1e-12:
            fraction *= 0.8
        improvement, kl = self.at(direction.agent, threshold, fraction)
        if commit:
            self.committed.append((direction.agent, threshold))
            self.version += 1
        return StepResult(direction.agent, threshold, kl, improvement, improvement, True, fraction, 1.0)

    def measure(self, direction, threshold: float, fraction: float) -> tuple[float, float]:
        return self.at(direction.agent, threshold, fraction)


def test_paper_ratio_rewards_a_backtracked_line_search():
    """The documented bias of the paper's rule, kept as ratio="paper": the backtracker moves first."""
    planner = BacktrackingPlanner()
    GreedyAllocator(ratio="paper").update_agents(planner, np.random.default_rng(0))
    assert planner.committed[0][0] == "backtracker"


@pytest.mark.parametrize("ratio", ["fraction-corrected", "common-fraction"])
def test_common_step_ratio_does_not_reward_backtracking(ratio):
    planner = BacktrackingPlanner()
    GreedyAllocator(ratio=ratio).update_agents(planner, np.random.default_rng(0))
    assert [agent for agent, _ in planner.committed] == ["steady", "backtracker", "weak"]
    # the chosen share: B rho / sum rho with the corrected ratios 1 : 0.9 : 0.3 (both rules agree here)
    assert planner.committed[0][1] == pytest.approx(0.03 * 1.0 / 2.2, rel=1e-6)


def test_common_fraction_equals_the_paper_ratio_when_nobody_backtracks():
    orders = []
    for ratio in ("paper", "fraction-corrected", "common-fraction"):
        planner = ScriptedPlanner()
        GreedyAllocator(ratio=ratio).update_agents(planner, np.random.default_rng(0))
        orders.append(planner.committed)
    assert orders[0] == orders[1] == orders[2]


class TwinPlanner(ScriptedPlanner):
    """Two identical agents and a weak one: greedy's first pick is a tie."""

    def __init__(self) -> None:
        super().__init__()
        self.agents = ["first", "second", "weak"]
        self.coefficients = {"first": (2.0, 1.0), "second": (2.0, 1.0), "weak": (1.0, 1.0)}


def test_greedy_ties_go_to_the_first_agent_unless_broken_at_random():
    firsts = {tie_break: set() for tie_break in ("order", "random")}
    for seed in range(16):
        for tie_break in firsts:
            planner = TwinPlanner()
            GreedyAllocator(tie_break=tie_break).update_agents(planner, np.random.default_rng(seed))
            firsts[tie_break].add(planner.committed[0][0])
    assert firsts["order"] == {"first"}
    assert firsts["random"] == {"first", "second"}


def identical_problem(n_agents: int = 3, n: int = 256, seed: int = 0):
    """``n_agents`` copies of one agent (same actor weights, observations and actions)."""
    import copy

    actors, obs, actions, alive, _ = make_problem(n_agents=1, n=n, seed=seed)
    one = "agent_0"
    actors = {f"agent_{i}": copy.deepcopy(actors[one]) for i in range(n_agents)}
    obs = {a: obs[one].clone() for a in actors}
    actions = {a: actions[one].clone() for a in actors}
    alive = {a: alive[one].clone() for a in actors}
    score = actions[one][:, 0]
    return actors, obs, actions, alive, (score - score.mean()) / score.std()


def test_kkt_ties_go_to_the_first_agent_unless_broken_at_random():
    firsts = {tie_break: set() for tie_break in ("order", "random")}
    for seed in range(12):
        for tie_break in firsts:
            planner = planner_for(identical_problem(), total_kl=0.03)
            results = KKTAllocator(tie_break=tie_break).update_agents(planner, np.random.default_rng(seed))
            firsts[tie_break].add(results[0].agent)
    assert firsts["order"] == {"agent_0"}
    assert len(firsts["random"]) > 1


def test_rank_treats_scores_equal_to_six_digits_as_ties_in_either_mode():
    rng = np.random.default_rng(0)
    # CG's random start: identical agents differ around the 8th digit; "order" still gives the tie to the first
    assert rank({"a": 0.3740594, "b": 0.37405941, "c": 0.1}, "order", rng) == ["a", "b", "c"]
    assert rank({"b": 0.37405941, "a": 0.3740594}, "order", rng) == ["b", "a"]
    # a difference in the 6th significant digit is not a tie
    assert rank({"a": 0.374059, "b": 0.374060}, "order", rng) == ["b", "a"]
    assert rank({"a": 0.374059, "b": 0.374060}, "random", rng) == ["b", "a"]
    firsts = {rank({"a": 1.0, "b": 1.00000001}, "random", np.random.default_rng(seed))[0] for seed in range(20)}
    assert firsts == {"a", "b"}


def test_greedy_and_kkt_reject_unknown_options():
    with pytest.raises(ValueError, match="ratio"):
        GreedyAllocator(ratio="backtracked")
    with pytest.raises(ValueError, match="tie_break"):
        GreedyAllocator(tie_break="last")
    with pytest.raises(ValueError, match="tie_break"):
        KKTAllocator(tie_break="alphabetical")


@pytest.mark.parametrize("seed", range(20))
def test_kkt_floor_that_does_not_bind_changes_no_bit(seed):
    # The study counts the package-default KKT (floor 0.5) as the paper's W on runs where the floor
    # never bound (benchmarks/mamujoco.py floor_bindings): that needs identical thresholds, not close ones.
    rng = np.random.default_rng(seed)
    potentials = rng.uniform(0.5, 1.5, size=int(rng.integers(2, 11)))
    total = 0.01 * potentials.size
    free = kkt_thresholds(potentials, total_kl=total)
    floor = 0.99 * free.min()  # below every free threshold: the floor does not bind
    assert np.array_equal(kkt_thresholds(potentials, total_kl=total, min_kl=floor), free)
    # and a floor above the smallest free threshold does change them
    assert not np.array_equal(kkt_thresholds(potentials, total_kl=total, min_kl=1.01 * free.min()), free)
