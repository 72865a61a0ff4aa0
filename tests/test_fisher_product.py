"""The analytic Fisher-vector product of Gaussian actors against sb3-contrib's double backward (trust_region.py)."""

import functools

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from pettingzoo import ParallelEnv
from torch import nn

from sb3_hatrpo import HATRPO
from sb3_hatrpo.policies import Actor
from sb3_hatrpo.trust_region import GaussianFisher, TrustRegionPlanner, _AgentData
from tests.problems import make_problem, planner_for

N = 300
OBS_DIM = 5


def _actor(action_space=None, seed=0, normalize=False, **kwargs) -> Actor:
    """A small actor whose stds differ per action dimension (a bug mixing up dimensions shows)."""
    th.manual_seed(seed)
    kwargs = {"net_arch": [16, 16], "activation_fn": nn.Tanh, "log_std_init": -1.2, **kwargs}
    actor = Actor(
        spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32),
        action_space or spaces.Box(-1.0, 1.0, (2,), np.float32),
        normalize_observation=normalize,
        **kwargs,
    )
    if actor.log_std is not None:
        with th.no_grad():
            actor.log_std.add_(0.3 * th.randn_like(actor.log_std))
            for p in actor.action_net.parameters():  # a mean head larger than ortho_init's 0.01 gain
                p.mul_(30.0)
    return actor


def _observations(seed=1) -> th.Tensor:
    generator = th.Generator().manual_seed(seed)
    return 3.0 * th.randn(N, OBS_DIM, generator=generator) + th.arange(OBS_DIM, dtype=th.float32)


def _both(actor: Actor, obs: th.Tensor, alive: th.Tensor) -> tuple[_AgentData, _AgentData]:
    """The same agent's data with the analytic product (where supported) and with the double backward."""
    with th.no_grad():
        actions = actor.distribution(obs).sample()
    advantages = th.randn(N)
    analytic = _AgentData(actor, obs, actions, alive, advantages, fisher_product="analytic")
    double = _AgentData(actor, obs, actions, alive, advantages, fisher_product="double_backward")
    return analytic, double


def _relative_error(actual: th.Tensor, expected: th.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def _check_products_agree(analytic: _AgentData, double: _AgentData, n_vectors: int = 3) -> None:
    """Relative error < 1e-5 on random vectors, on the whole product and on the std block and mean blocks alone.

    The std block has a few entries among hundreds: a wrong d log_std / dx would hide in the whole product's norm.
    Damping 0, so that ``damping * v`` does not dilute an error.
    """
    assert analytic.fisher_path == "analytic" and double.fisher_path == "double_backward"
    log_std = analytic.actor.log_std
    std_block = th.cat([th.full((p.numel(),), p is log_std) for p in analytic.params])
    assert std_block.any() and not std_block.all()
    generator = th.Generator().manual_seed(2)
    for _ in range(n_vectors):
        vector = th.randn(analytic.old_params.numel(), generator=generator)
        expected = double.fisher_vector_product(vector, damping=0.0)
        actual = analytic.fisher_vector_product(vector, damping=0.0)
        assert _relative_error(actual, expected) < 1e-5
        assert _relative_error(actual[std_block], expected[std_block]) < 1e-5
        assert _relative_error(actual[~std_block], expected[~std_block]) < 1e-5


@pytest.mark.parametrize(
    "options",
    [
        dict(std_parametrization="log"),
        dict(std_parametrization="sigmoid", max_std=0.5),
        dict(layer_norm=True),
        dict(activation_fn=nn.ReLU, std_parametrization="sigmoid", layer_norm=True),
        dict(action_space=spaces.Box(-1.0, 1.0, (4,), np.float32)),
        dict(action_space=spaces.Box(-1.0, 1.0, (2, 3), np.float32), std_parametrization="sigmoid"),
    ],
    ids=["log-std", "sigmoid-std", "layer-norm", "relu-sigmoid-layer-norm", "box-4", "box-2x3"],
)
def test_analytic_product_equals_the_double_backward(options):
    analytic, double = _both(_actor(**options), _observations(), th.ones(N))
    _check_products_agree(analytic, double)


def test_analytic_product_with_observation_normalisation():
    """Non-trivial statistics, some features clipped: the product must see the normalised features."""
    actor = _actor(normalize=True, std_parametrization="sigmoid")
    assert actor.obs_normalizer is not None
    actor.obs_normalizer.update(0.5 * th.randn(1000, OBS_DIM) - 2.0)  # obs are ~6 std away: clipping is active
    obs = _observations()
    assert (actor._features(obs).abs() == actor.obs_normalizer.clip).any()
    assert not (actor._features(obs).abs() == actor.obs_normalizer.clip).all()
    analytic, double = _both(actor, obs, th.ones(N))
    _check_products_agree(analytic, double)


def test_analytic_product_with_a_partially_dead_alive_mask():
    """Dead rows are weighted 0 and the weights divide by the alive count (the std block by their sum)."""
    alive = (th.arange(N) % 3 != 0).float()
    for parametrization in ("log", "sigmoid"):
        analytic, double = _both(_actor(std_parametrization=parametrization), _observations(), alive)
        _check_products_agree(analytic, double)
        # the dead rows' observations change nothing
        obs = _observations().clone()
        obs[alive == 0] = 100.0
        moved, _ = _both(_actor(std_parametrization=parametrization), obs, alive)
        vector = th.randn(analytic.old_params.numel())
        assert th.allclose(
            moved.fisher_vector_product(vector, 0.0), analytic.fisher_vector_product(vector, 0.0), rtol=1e-5, atol=1e-6
        )


def test_analytic_product_without_alive_samples_is_the_damping():
    analytic, double = _both(_actor(), _observations(), th.zeros(N))
    vector = th.randn(analytic.old_params.numel())
    assert th.equal(analytic.fisher_vector_product(vector, 0.1), 0.1 * vector)
    assert th.allclose(double.fisher_vector_product(vector, 0.1), 0.1 * vector)


def test_analytic_product_with_a_frozen_std():
    """A parameter without requires_grad is no trust-region parameter: the product covers the others."""
    actor = _actor(std_parametrization="sigmoid")
    actor.log_std.requires_grad_(False)
    analytic, double = _both(actor, _observations(), th.ones(N))
    assert analytic.fisher_path == "analytic" and analytic.old_params.numel() == double.old_params.numel()
    vector = th.randn(analytic.old_params.numel())
    expected = double.fisher_vector_product(vector, 0.0)
    assert _relative_error(analytic.fisher_vector_product(vector, 0.0), expected) < 1e-5


@pytest.mark.parametrize(
    "action_space", [spaces.Discrete(4), spaces.MultiDiscrete([3, 2])], ids=["discrete", "multi-discrete"]
)
def test_categorical_actors_fall_back_to_the_double_backward(action_space):
    actor = _actor(action_space=action_space)
    fallback, double = _both(actor, _observations(), (th.arange(N) % 4 != 0).float())
    assert fallback.fisher_path == "double_backward"
    assert "CategoricalDistribution" in fallback.fisher_fallback_reason
    vector = th.randn(fallback.old_params.numel())
    assert th.equal(fallback.fisher_vector_product(vector, 0.1), double.fisher_vector_product(vector, 0.1))
    assert fallback._gaussian_fisher is None


def test_actors_the_analytic_product_does_not_know_fall_back():
    class OtherDistribution(Actor):  # computes another distribution than the one GaussianFisher writes out
        def distribution(self, obs):
            return super().distribution(obs * 2.0)

    actor = OtherDistribution(spaces.Box(-1, 1, (OBS_DIM,), np.float32), spaces.Box(-1, 1, (2,), np.float32), [8])
    fallback, double = _both(actor, _observations(), th.ones(N))
    assert (
        fallback.fisher_path == "double_backward" and "overrides Actor.distribution" in fallback.fisher_fallback_reason
    )
    vector = th.randn(fallback.old_params.numel())
    assert th.equal(fallback.fisher_vector_product(vector, 0.1), double.fisher_vector_product(vector, 0.1))

    actor = _actor()
    actor.extra = nn.Linear(2, 2)  # a trained parameter off the action mean's path
    fallback, _ = _both(actor, _observations(), th.ones(N))
    assert fallback.fisher_path == "double_backward" and "'extra.weight'" in fallback.fisher_fallback_reason


def test_the_graph_is_traced_once_per_agent_and_holds_the_old_parameters(monkeypatch):
    """Every product of an agent (CG, the curvature, a recomputed direction) reuses one trace, at theta_old."""
    traces = []
    original = GaussianFisher.__init__

    def counting(self, *args, **kwargs):
        traces.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(GaussianFisher, "__init__", counting)
    planner = planner_for(make_problem(n_agents=2, net_arch=(8,)), cg_max_steps=6)
    data = planner._data["agent_0"]
    vector = th.randn(data.old_params.numel())
    first = data.fisher_vector_product(vector, 0.1)
    planner.direction("agent_0")
    planner.step(planner.direction("agent_0"), 0.01, commit=False)  # a measured step moves and restores
    data.set_params(data.old_params + 0.1)  # even with the actor moved, the product is F at theta_old
    assert th.equal(data.fisher_vector_product(vector, 0.1), first)
    data.set_params(data.old_params)
    assert len(traces) == 1
    planner.direction("agent_1")
    assert len(traces) == 2  # one per agent
    # traced first with the actor away from theta_old (the planner never does this): still F at theta_old
    same = planner_for(make_problem(n_agents=2, net_arch=(8,)))._data["agent_0"]
    same.set_params(same.old_params + 0.1)
    assert th.allclose(same.fisher_vector_product(vector, 0.1), first, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fisher_product", ["analytic", "double_backward"])
def test_krylov_reuse_records_the_products_of_either_path(fisher_product):
    problem = make_problem(n_agents=2, n=256, seed=6, net_arch=(32,))
    planner = planner_for(problem, cg_max_steps=8, cg_damping=1e-3, krylov_rtol=0.05, fisher_product=fisher_product)
    data = planner._data["agent_1"]
    assert data.fisher_path == fisher_product
    planner.direction("agent_1")
    recorded = len(data.krylov_vectors)
    assert recorded == 8 + 2 == len(data.krylov_products)  # CG's first residual, its steps, the curvature
    for vector, product in list(zip(data.krylov_vectors, data.krylov_products)):  # a copy: each product is recorded
        assert th.allclose(product, data.fisher_vector_product(vector, 1e-3), rtol=1e-5, atol=1e-7)
    assert len(data.krylov_vectors) == 2 * recorded
    assert planner.step(planner.direction("agent_0"), 0.01).accepted
    reused = planner.direction("agent_1")  # starts from the Galerkin projection on the recorded basis
    residual = reused.gradient - data.fisher_vector_product(reused.direction, 1e-3)
    assert float(residual.norm()) <= max(0.05, data.cold_relative_residual) * float(reused.gradient.norm()) * 1.001


def test_planner_rejects_an_unknown_fisher_product():
    with pytest.raises(ValueError, match=r"fisher_product must be one of 'analytic', 'double_backward'.*'fast'"):
        planner_for(make_problem(), fisher_product="fast")


def test_subset_planners_keep_the_fisher_product():
    planner = planner_for(make_problem(), fisher_product="double_backward")
    subset = planner.subset(th.arange(0, 256, 2))
    assert subset.fisher_product == "double_backward"
    assert all(data.fisher_path == "double_backward" for data in subset._data.values())


# ------------------------------------------------------------------------------ end to end
class MixedEnv(ParallelEnv):
    """A 3-dim Gaussian agent, a 2-dim Gaussian agent that leaves after 3 steps, a Discrete agent."""

    metadata = {"name": "mixed_v0", "render_modes": []}
    SPACES = {
        "mover": spaces.Box(-1.0, 1.0, (3,), np.float32),
        "leaver": spaces.Box(-1.0, 1.0, (2,), np.float32),
        "chooser": spaces.Discrete(3),
    }

    def __init__(self) -> None:
        self.possible_agents = list(self.SPACES)
        self.agents: list[str] = []
        self.t = 0
        self.rng = np.random.default_rng(0)

    @functools.cache  # noqa: B019 - PettingZoo's own examples cache spaces this way
    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(-np.inf, np.inf, (3,), np.float32)

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Space:
        return self.SPACES[agent]

    def _obs(self) -> dict[str, np.ndarray]:
        return {a: np.array([self.t / 8, *self.rng.normal(size=2)], np.float32) for a in self.agents}

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.t = 0
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        reward = -float(np.abs(actions["mover"] - 0.3).sum()) + float(actions["chooser"] == 1)
        if "leaver" in actions:
            reward -= float(np.abs(actions["leaver"]).sum())
        rewards = {a: reward for a in self.agents}
        terminations = {a: a == "leaver" and self.t >= 3 for a in self.agents}
        truncations = {a: self.t >= 8 for a in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return self._obs(), rewards, terminations, truncations, {a: {} for a in self.possible_agents}


TINY = dict(n_steps=64, n_envs=2, batch_size=64, n_critic_updates=2, cg_max_steps=8, seed=0)


def test_learn_gives_the_same_first_update_with_either_product(monkeypatch):
    """One iteration from the same seed: the same allocation, KL and parameters up to float rounding."""
    paths: dict[str, dict[str, str]] = {}
    original = TrustRegionPlanner.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        paths[self.fisher_product] = {agent: data.fisher_path for agent, data in self._data.items()}

    monkeypatch.setattr(TrustRegionPlanner, "__init__", recording)
    models = {}
    for fisher_product in ("analytic", "double_backward"):
        model = HATRPO(
            "MlpPolicy", MixedEnv, fisher_product=fisher_product, policy_kwargs=dict(net_arch=[32, 32]), **TINY
        )
        models[fisher_product] = model.learn(128)
    analytic, double = models["analytic"], models["double_backward"]
    assert paths["analytic"] == {"mover": "analytic", "leaver": "analytic", "chooser": "double_backward"}
    assert set(paths["double_backward"].values()) == {"double_backward"}
    assert any(record["accepted"] for record in analytic.last_allocation)
    for a, b in zip(analytic.last_allocation, double.last_allocation, strict=True):
        assert (a["agent"], a["accepted"], a["step_fraction"]) == (b["agent"], b["accepted"], b["step_fraction"])
        for key in ("kl", "improvement", "potential", "predicted_improvement"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    for agent in analytic.agents:
        theta_a = th.cat([p.detach().flatten() for p in analytic.policy.actor(agent).parameters()])
        theta_b = th.cat([p.detach().flatten() for p in double.policy.actor(agent).parameters()])
        assert th.allclose(theta_a, theta_b, rtol=1e-4, atol=1e-6), agent


def test_fisher_product_is_checked_and_survives_save_load(tmp_path):
    with pytest.raises(ValueError, match=r"HATRPO: fisher_product must be one of 'analytic', 'double_backward'"):
        HATRPO("MlpPolicy", "games:differential", fisher_product="Analytic")
    model = HATRPO("MlpPolicy", "games:differential", fisher_product="double_backward", n_steps=32, batch_size=32)
    assert HATRPO("MlpPolicy", "games:differential").fisher_product == "analytic"  # the default
    model.save(tmp_path / "model")
    loaded = HATRPO.load(tmp_path / "model", env="games:differential")
    assert loaded.fisher_product == "double_backward"
    planner = loaded.make_planner(_rollout(loaded))
    assert {data.fisher_path for data in planner._data.values()} == {"double_backward"}


def _rollout(model: HATRPO):
    model.learn(model.n_steps * model.n_envs)
    return model.rollout_buffer.get()
