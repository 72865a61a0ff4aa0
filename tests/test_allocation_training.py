"""Allocators inside real training runs: DESIGN §5.4 invariants every iteration, and who gets the budget."""

import functools

import numpy as np
import pytest
from gymnasium import spaces
from pettingzoo import ParallelEnv
from stable_baselines3.common.callbacks import BaseCallback

from sb3_hatrpo import HATRPO
from sb3_hatrpo.allocators import BaseAllocator, GreedyAllocator, KKTAllocator

TINY = dict(n_steps=64, batch_size=64, n_critic_updates=2, cg_max_steps=8, policy_kwargs=dict(net_arch=[16]))


class AllocationLog(BaseCallback):
    """Keeps ``model.last_allocation`` of every iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.iterations: list[list[dict]] = []

    def _on_rollout_start(self) -> None:
        if self.model.last_allocation:
            self.iterations.append(self.model.last_allocation)

    def _on_step(self) -> bool:
        return True


class NoEffectEnv(ParallelEnv):
    """One-step game: the team reward depends on ``worker``'s action only; ``idler``'s does nothing."""

    metadata = {"name": "no_effect_v0", "render_modes": []}

    def __init__(self) -> None:
        self.possible_agents = ["worker", "idler"]
        self.agents: list[str] = []

    @functools.cache  # noqa: B019
    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(0.0, 1.0, (1,), np.float32)

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Box:
        return spaces.Box(-3.0, 3.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        self.agents = list(self.possible_agents)
        return {a: np.ones(1, np.float32) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        reward = -float((actions["worker"][0] - 2.0) ** 2)
        self.agents = []
        return (
            {a: np.ones(1, np.float32) for a in self.possible_agents},
            {a: reward for a in self.possible_agents},
            {a: True for a in self.possible_agents},
            {a: False for a in self.possible_agents},
            {a: {} for a in self.possible_agents},
        )


@pytest.mark.parametrize("allocator", ["uniform", "kkt", "greedy"])
@pytest.mark.parametrize("env_id", ["games:differential", "mpe:simple_speaker_listener_v4"])
def test_kl_invariants_hold_every_iteration_of_a_real_run(allocator, env_id):
    env_kwargs = {"n_agents": 3} if env_id == "games:differential" else None
    model = HATRPO("MlpPolicy", env_id, env_kwargs=env_kwargs, allocator=allocator, seed=0, target_kl=0.02, **TINY)
    log = AllocationLog()
    model.learn(64 * 12, callback=log)
    assert len(log.iterations) >= 10
    budget = model.joint_kl_budget
    assert budget == pytest.approx(len(model.agents) * 0.02)
    for allocation in log.iterations:
        assert sorted(r["agent"] for r in allocation) == sorted(model.agents)
        assert [r["position"] for r in allocation] == list(range(len(model.agents)))
        for r in allocation:
            if r["accepted"]:
                assert 0.0 <= r["kl"] <= r["threshold"]
            else:
                assert r["kl"] == 0.0
        total = sum(r["kl"] for r in allocation)
        if allocator == "uniform":
            assert all(r["threshold"] == pytest.approx(0.02) for r in allocation)
        assert total <= budget * (1 + 1e-9)
    assert any(r["accepted"] for allocation in log.iterations for r in allocation)


def test_an_agent_without_effect_gets_almost_no_kkt_budget():
    model = HATRPO("MlpPolicy", NoEffectEnv, allocator="kkt", allocator_kwargs={"min_kl_fraction": 0.0}, seed=0, **TINY)
    log = AllocationLog()
    model.learn(64 * 12, callback=log)
    shares = [
        next(r["threshold"] for r in allocation if r["agent"] == "idler") / model.joint_kl_budget
        for allocation in log.iterations
    ]
    assert np.median(shares) < 0.1, shares
    # and it is updated after the worker, which has the larger potential
    assert np.mean([allocation[0]["agent"] == "worker" for allocation in log.iterations]) >= 0.8


def test_the_kkt_floor_guarantees_a_minimum_share():
    model = HATRPO("MlpPolicy", NoEffectEnv, allocator="kkt", allocator_kwargs={"min_kl_fraction": 0.4}, seed=0, **TINY)
    log = AllocationLog()
    model.learn(64 * 6, callback=log)
    floor = 0.4 * model.joint_kl_budget / 2
    for allocation in log.iterations:
        assert min(r["threshold"] for r in allocation) >= floor * (1 - 1e-9)


def test_greedy_updates_an_agent_without_effect_last_or_not_at_all():
    model = HATRPO("MlpPolicy", NoEffectEnv, allocator="greedy", seed=0, **TINY)
    log = AllocationLog()
    model.learn(64 * 12, callback=log)
    last_or_skipped = [
        next(r for r in allocation if r["agent"] == "idler")["position"] == 1
        or not next(r for r in allocation if r["agent"] == "idler")["accepted"]
        for allocation in log.iterations
    ]
    assert np.mean(last_or_skipped) >= 0.8


class ReverseOrderAllocator(BaseAllocator):
    """A custom allocator: agents in reverse order, two thirds of the budget to the first."""

    name = "reverse"

    def update_agents(self, planner, rng):
        order = planner.agents[::-1]
        shares = [2 / 3, 1 / 3]
        return [planner.step(planner.direction(a), planner.total_kl * s) for a, s in zip(order, shares)]


@pytest.mark.parametrize(
    ("allocator", "expected"),
    [("hatrpo", "UniformAllocator"), ("W", "KKTAllocator"), ("g", "GreedyAllocator"), ("hatrpo-g", "GreedyAllocator")],
)
def test_allocator_aliases_drive_training(allocator, expected):
    model = HATRPO("MlpPolicy", "games:differential", allocator=allocator, seed=0, **TINY)
    assert type(model.allocator).__name__ == expected
    model.learn(128)
    assert len(model.last_allocation) == 2


def test_a_custom_allocator_instance_drives_training_and_survives_save_load(tmp_path):
    model = HATRPO("MlpPolicy", "games:differential", allocator=ReverseOrderAllocator(), seed=0, **TINY)
    log = AllocationLog()
    model.learn(64 * 4, callback=log)
    for allocation in log.iterations:
        assert [r["agent"] for r in allocation] == ["agent_1", "agent_0"]
        assert allocation[0]["threshold"] == pytest.approx(2 / 3 * model.joint_kl_budget)
    model.save(tmp_path / "custom")
    assert isinstance(HATRPO.load(tmp_path / "custom").allocator, ReverseOrderAllocator)


def test_allocator_instances_keep_their_options():
    kkt = KKTAllocator(min_kl_fraction=0.2, pass_unused_budget=True, potential_smoothing=0.5)
    model = HATRPO("MlpPolicy", "games:differential", allocator=kkt, **TINY)
    assert model.allocator is kkt
    with pytest.raises(ValueError, match="allocator_kwargs are for allocator names"):
        HATRPO("MlpPolicy", "games:differential", allocator=GreedyAllocator(), allocator_kwargs={"eps": 1.0})
