"""Actors: the rollout's fast sampler and the trust region's distribution are the same policy."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from sb3_hatrpo.policies import Actor

OBS = spaces.Box(-1.0, 1.0, (3,), np.float32)


@pytest.mark.parametrize(
    "action_space, kwargs",
    [
        (spaces.Box(-1.0, 1.0, (2,), np.float32), dict(log_std_init=-0.7)),
        (spaces.Box(-1.0, 1.0, (2,), np.float32), dict(log_std_init=-1.5, std_parametrization="sigmoid")),
        (spaces.Discrete(4), {}),
        (spaces.MultiDiscrete([3, 2]), {}),
    ],
    ids=["gaussian", "gaussian-sigmoid-std", "categorical", "multi-categorical"],
)
def test_sample_and_distribution_define_the_same_distribution(action_space, kwargs):
    th.manual_seed(0)
    actor = Actor(OBS, action_space, [16], ortho_init=False, **kwargs)
    obs = th.full((20_000, 3), 0.3)
    with th.no_grad():
        samples = actor.sample(obs)
        distribution = actor.distribution(obs[:1])
        modes = actor.sample(obs[:1], deterministic=True)
        assert th.equal(modes, distribution.mode())
        if isinstance(action_space, spaces.Box):
            mean, std = distribution.distribution.mean[0], distribution.distribution.stddev[0]
            assert th.allclose(samples.mean(0), mean, atol=4 * float(std.max()) / np.sqrt(20_000))
            assert th.allclose(samples.std(0), std, rtol=0.03)
        else:
            # the empirical frequencies of each categorical match the distribution's probabilities
            columns = samples.reshape(20_000, -1)
            probabilities = (
                [distribution.distribution.probs[0]]
                if isinstance(action_space, spaces.Discrete)
                else [d.probs[0] for d in distribution.distribution]
            )
            for column, probs in zip(columns.T, probabilities):
                counts = th.bincount(column, minlength=len(probs)).float() / 20_000
                assert th.allclose(counts, probs, atol=0.015)
        # and the log-probabilities the trust region uses are those of the sampled actions' law
        assert th.isfinite(actor.distribution(obs[:100]).log_prob(samples[:100])).all()


def test_sigmoid_std_starts_at_exp_log_std_init_and_never_exceeds_max_std():
    actor = Actor(OBS, spaces.Box(-1.0, 1.0, (2,), np.float32), [8], log_std_init=-1.0, std_parametrization="sigmoid")
    assert th.allclose(actor.action_log_std().exp(), th.full((2,), float(np.exp(-1.0))), rtol=1e-5)
    with th.no_grad():
        actor.log_std.fill_(50.0)
    assert float(actor.action_log_std().detach().exp().max()) <= 0.5
    with pytest.raises(ValueError, match="max_std"):
        Actor(OBS, spaces.Box(-1.0, 1.0, (2,), np.float32), [8], log_std_init=0.0, std_parametrization="sigmoid")


def test_layer_norm_follows_every_hidden_layer_of_actors_and_critic():
    from torch import nn

    from sb3_hatrpo.policies import CentralCritic

    actor = Actor(OBS, spaces.Discrete(3), [16, 8], activation_fn=nn.ReLU, layer_norm=True)
    kinds = [type(m).__name__ for m in actor.mlp_extractor.policy_net]
    assert kinds == ["Linear", "ReLU", "LayerNorm", "Linear", "ReLU", "LayerNorm"]
    assert [m.normalized_shape for m in actor.mlp_extractor.policy_net if isinstance(m, nn.LayerNorm)] == [(16,), (8,)]
    critic = CentralCritic(5, [12], layer_norm=True)
    assert isinstance(critic.mlp_extractor.value_net[-1], nn.LayerNorm)
    assert critic(th.randn(4, 5)).shape == (4,)


@pytest.mark.parametrize(
    "observation_space, kwargs",
    [
        (OBS, dict(log_std_init=-0.7)),
        (OBS, dict(log_std_init=-1.5, std_parametrization="sigmoid", activation_fn=th.nn.Tanh)),
        (OBS, dict(layer_norm=True, activation_fn=th.nn.ELU)),
        (spaces.Box(-5.0, 5.0, (2, 3), np.float64), dict(normalize_observation=True)),
    ],
    ids=["relu-log-std", "tanh-sigmoid-std", "layer-norm-elu", "2d-float64-normalised"],
)
def test_frozen_sampler_draws_exactly_what_sample_draws(observation_space, kwargs):
    th.manual_seed(0)
    actor = Actor(observation_space, spaces.Box(-1.0, 1.0, (2,), np.float32), [16, 16], **kwargs)
    if actor.obs_normalizer is not None:  # statistics far from (0, 1), so a skipped normalisation shows
        actor.obs_normalizer.update(np.random.default_rng(0).normal(100.0, 7.0, (50, *observation_space.shape)))
    with th.no_grad():
        actor.log_std += 0.1  # a trained std, not the initial one
    obs = th.as_tensor(np.random.default_rng(1).normal(size=(8, *observation_space.shape)) + 100.0)
    frozen = actor.frozen_sampler()
    assert frozen != actor.sample  # the fast path is the one compared
    for deterministic in (False, True):
        th.manual_seed(3)
        with th.no_grad():
            expected = actor.sample(obs, deterministic)
        th.manual_seed(3)
        with th.inference_mode():
            assert th.equal(frozen(obs, deterministic), expected)


def test_frozen_sampler_falls_back_to_sample_for_categorical_actions():
    actor = Actor(OBS, spaces.Discrete(3), [8])
    assert actor.frozen_sampler() == actor.sample
