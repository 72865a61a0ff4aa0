"""Per-agent actors and the centralised critic of HATRPO.

Every agent has its own actor (no parameter sharing: agents may have different
observation and action spaces); one critic values the global state. The networks are
SB3's building blocks: ``MlpExtractor`` for the hidden layers and SB3's
distributions for the action heads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import (
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
    make_proba_distribution,
)
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import get_flattened_obs_dim, preprocess_obs
from stable_baselines3.common.torch_layers import MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from sb3_hatrpo.action_spaces import check_action_space
from sb3_hatrpo.normalization import RunningNormalizer, apply_affine

STD_PARAMETRIZATIONS = ("log", "sigmoid")


def normalizable(space: spaces.Space) -> bool:
    """Whether observations of ``space`` get running mean/std normalisation: float ``Box`` spaces only.

    Images, one-hot (Discrete/MultiDiscrete/MultiBinary) and integer boxes are left as SB3 preprocesses them.
    """
    return isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.floating)


def with_layer_norm(net: nn.Sequential) -> nn.Sequential:
    """``net`` with a ``LayerNorm`` after every activation (HARL's ``MLPLayer``: Linear, activation, LayerNorm)."""
    layers: list[nn.Module] = []
    width = 0
    for layer in net:
        layers.append(layer)
        if isinstance(layer, nn.Linear):
            width = layer.out_features
        else:
            layers.append(nn.LayerNorm(width))
    return nn.Sequential(*layers)


def _split_net_arch(net_arch: list[int] | dict[str, list[int]] | None) -> tuple[list[int], list[int]]:
    """``net_arch`` as in SB3: a list used by actor and critic, or ``dict(pi=[...], vf=[...])``."""
    if net_arch is None:
        return [64, 64], [64, 64]
    if isinstance(net_arch, dict):
        unknown = set(net_arch) - {"pi", "vf"}
        if unknown:
            raise ValueError(f"net_arch keys must be 'pi' and/or 'vf', got {sorted(unknown)}")
        return list(net_arch.get("pi", [64, 64])), list(net_arch.get("vf", [64, 64]))
    return list(net_arch), list(net_arch)


class Actor(nn.Module):
    """The policy of one agent: flattened observation -> MLP -> SB3 action distribution.

    :param observation_space: the agent's observation space
    :param action_space: the agent's action space (Box, Discrete or MultiDiscrete)
    :param net_arch: hidden layer sizes
    :param activation_fn: activation between hidden layers
    :param log_std_init: initial log standard deviation (Box actions; state-independent)
    :param ortho_init: orthogonal initialisation with SB3's gains (sqrt(2) hidden, 0.01 head)
    :param normalize_observation: running mean/std normalisation of (float ``Box``) observations, inside the actor
    :param clip_observation: bound of the normalised observations
    :param std_parametrization: ``"log"``: ``std = exp(log_std)`` (SB3); ``"sigmoid"``:
        ``std = max_std * sigmoid(x)`` (HARL's ``std_y_coef * sigmoid(x / std_x_coef)``), which caps the std
    :param max_std: the cap of the ``"sigmoid"`` parametrisation (HARL's ``std_y_coef``, 0.5)
    :param layer_norm: a ``LayerNorm`` after every hidden layer (HARL's MLP)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        net_arch: list[int],
        activation_fn: type[nn.Module] = nn.Tanh,
        log_std_init: float = 0.0,
        ortho_init: bool = True,
        normalize_observation: bool = False,
        clip_observation: float = 10.0,
        std_parametrization: str = "log",
        max_std: float = 0.5,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        self.observation_space = observation_space
        self.action_space = action_space
        self.std_parametrization = std_parametrization
        self.max_std = float(max_std)
        self.obs_normalizer = (
            RunningNormalizer(tuple(observation_space.shape or ()), clip=clip_observation)
            if normalize_observation and normalizable(observation_space)
            else None
        )
        features_dim = get_flattened_obs_dim(observation_space)
        # Only the "pi" branch is used; vf=[] builds no layers.
        self.mlp_extractor = MlpExtractor(features_dim, dict(pi=net_arch, vf=[]), activation_fn)
        if layer_norm:
            self.mlp_extractor.policy_net = with_layer_norm(self.mlp_extractor.policy_net)
        self.action_dist = make_proba_distribution(action_space)
        self.log_std: nn.Parameter | None = None
        # split sizes of the logits of a MultiDiscrete action, None otherwise
        self._nvec = [int(n) for n in action_space.nvec] if isinstance(action_space, spaces.MultiDiscrete) else None
        if isinstance(self.action_dist, DiagGaussianDistribution):
            if std_parametrization == "sigmoid":
                initial_std = float(np.exp(log_std_init))
                if not 0.0 < initial_std < self.max_std:
                    raise ValueError(
                        f"std_parametrization='sigmoid' caps the std at max_std={self.max_std}, so the initial std "
                        f"exp(log_std_init) = {initial_std:.3g} must be below it: lower log_std_init or raise max_std"
                    )
                # the parameter x with max_std * sigmoid(x) = initial std
                log_std_init = float(np.log(initial_std / (self.max_std - initial_std)))
            self.action_net, self.log_std = self.action_dist.proba_distribution_net(
                latent_dim=self.mlp_extractor.latent_dim_pi, log_std_init=log_std_init
            )
        else:
            assert isinstance(self.action_dist, CategoricalDistribution | MultiCategoricalDistribution)
            self.action_net = self.action_dist.proba_distribution_net(latent_dim=self.mlp_extractor.latent_dim_pi)
        if ortho_init:
            self.mlp_extractor.apply(lambda m: BasePolicy.init_weights(m, gain=np.sqrt(2)))
            self.action_net.apply(lambda m: BasePolicy.init_weights(m, gain=0.01))

    def _features(self, obs: th.Tensor) -> th.Tensor:
        features = preprocess_obs(obs, self.observation_space)
        assert isinstance(features, th.Tensor)  # Dict observations are rejected when the env is checked
        features = features.float()
        if self.obs_normalizer is not None:
            features = self.obs_normalizer(features)
        return features.flatten(start_dim=1)

    def action_log_std(self) -> th.Tensor | None:
        """The log standard deviation of a Gaussian actor in either parametrisation (``None`` if categorical)."""
        if self.log_std is None:
            return None
        if self.std_parametrization == "sigmoid":
            return np.log(self.max_std) + nn.functional.logsigmoid(self.log_std)
        return self.log_std

    def distribution(self, obs: th.Tensor) -> Distribution:
        """A fresh SB3 distribution for a batch of observations ``(n, *obs_shape)``.

        SB3's distribution objects are stateful, so each call returns its own copy: a
        distribution kept as "old policy" is never overwritten by a later call.
        """
        features = self._features(obs)
        latent = self.mlp_extractor.forward_actor(features)
        dist = copy.copy(self.action_dist)
        if isinstance(dist, DiagGaussianDistribution):
            log_std = self.action_log_std()
            assert log_std is not None
            return dist.proba_distribution(self.action_net(latent), log_std)
        assert isinstance(dist, CategoricalDistribution | MultiCategoricalDistribution)
        return dist.proba_distribution(action_logits=self.action_net(latent))

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        return self.distribution(obs).get_actions(deterministic=deterministic)

    def sample(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        """Actions from the same distribution as :meth:`distribution`, without building distribution objects.

        The rollout hot path: one MLP pass and one draw. Gaussian: ``mean + std * N(0, 1)``;
        categorical: a draw from the softmax of each set of logits.
        """
        features = self._features(obs)
        out = self.action_net(self.mlp_extractor.policy_net(features))
        log_std = self.action_log_std()
        if log_std is not None:
            return out if deterministic else out + log_std.exp() * th.randn_like(out)
        logits = out.split(self._nvec, dim=1) if self._nvec is not None else (out,)
        if deterministic:
            picks = [chunk.argmax(dim=1) for chunk in logits]
        else:
            picks = [th.multinomial(chunk.softmax(dim=1), 1).squeeze(1) for chunk in logits]
        return th.stack(picks, dim=1) if self._nvec is not None else picks[0]

    def frozen_sampler(self) -> Callable[[th.Tensor, bool], th.Tensor]:
        """:meth:`sample` with the parameters and statistics of now, for one rollout.

        The same operations on the same values, so the same draws (tested), without ``nn.Module`` calls:
        the linear layers become ``addmm`` on detached weights, ReLU/Tanh their functions, and the
        observation normaliser's affine map and the std are read once. The caller rebuilds it whenever the
        actor or its statistics change (every rollout). Anything else (categorical actions, non-Box
        observations, custom layers) gets :meth:`sample` itself.
        """
        if self.log_std is None or not isinstance(self.observation_space, spaces.Box):
            return self.sample
        layers: list[Callable[[th.Tensor], th.Tensor]] = []
        for module in [*self.mlp_extractor.policy_net, self.action_net]:
            if isinstance(module, nn.Linear):
                weight_t = module.weight.detach().t()
                bias = module.bias.detach() if module.bias is not None else weight_t.new_zeros(module.out_features)
                layers.append(_linear(weight_t, bias))
            elif type(module) in _ACTIVATION_FUNCTIONS:
                layers.append(_ACTIVATION_FUNCTIONS[type(module)])
            elif isinstance(module, nn.LayerNorm | nn.ReLU | nn.Tanh | nn.ELU | nn.LeakyReLU | nn.SiLU | nn.GELU):
                layers.append(module)
            else:
                return self.sample
        normalizer = self.obs_normalizer
        affine = (*normalizer.affine(th.float32), normalizer.clip) if normalizer is not None else None
        log_std = self.action_log_std()
        assert log_std is not None
        std = log_std.detach().exp()

        def frozen_sample(obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
            x = obs.float()
            if affine is not None:
                x = apply_affine(x, *affine)
            x = x.flatten(start_dim=1)
            for layer in layers:
                x = layer(x)
            return x if deterministic else x + std * th.randn_like(x)

        return frozen_sample


def _linear(weight_t: th.Tensor, bias: th.Tensor) -> Callable[[th.Tensor], th.Tensor]:
    """``F.linear`` with the weight and bias of now: the ``addmm`` it computes, without the module call."""
    return lambda x: th.addmm(bias, x, weight_t)


# Activations whose module is only a call of a function: called directly in the rollout
_ACTIVATION_FUNCTIONS: dict[type[nn.Module], Callable[[th.Tensor], th.Tensor]] = {nn.ReLU: th.relu, nn.Tanh: th.tanh}


class CentralCritic(nn.Module):
    """State-value function on the global state (the centralised critic of CTDE).

    :param state_dim: size of the flat global state
    :param net_arch: hidden layer sizes
    :param activation_fn: activation between hidden layers
    :param ortho_init: orthogonal initialisation (sqrt(2) hidden, 1 output)
    :param normalize_state: running mean/std normalisation of the global state, inside the critic
    :param clip_state: bound of the normalised state
    :param layer_norm: a ``LayerNorm`` after every hidden layer (HARL's MLP)
    """

    def __init__(
        self,
        state_dim: int,
        net_arch: list[int],
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        normalize_state: bool = False,
        clip_state: float = 10.0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        self.state_normalizer = RunningNormalizer((state_dim,), clip=clip_state) if normalize_state else None
        self.mlp_extractor = MlpExtractor(state_dim, dict(pi=[], vf=net_arch), activation_fn)
        if layer_norm:
            self.mlp_extractor.value_net = with_layer_norm(self.mlp_extractor.value_net)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if ortho_init:
            self.mlp_extractor.apply(lambda m: BasePolicy.init_weights(m, gain=np.sqrt(2)))
            self.value_net.apply(lambda m: BasePolicy.init_weights(m, gain=1.0))

    def forward(self, states: th.Tensor) -> th.Tensor:
        """Values ``(n,)`` of global states ``(n, state_dim)`` (normalised if the algorithm normalises values)."""
        if self.state_normalizer is not None:
            states = self.state_normalizer(states)
        return self.value_net(self.mlp_extractor.forward_critic(states)).squeeze(-1)


class HATRPOPolicy(BasePolicy):
    """All actors (one per agent, in ``agents`` order) and the centralised critic.

    The actors are updated by the trust-region step, not by an optimiser; ``optimizer``
    holds only the critic's parameters.

    :param observation_space: ``spaces.Dict`` of per-agent observation spaces
    :param action_space: ``spaces.Dict`` of per-agent action spaces
    :param lr_schedule: critic learning-rate schedule
    :param state_space: flat ``Box`` of the global state
    :param net_arch: hidden layers, a list for actors and critic or ``dict(pi=[...], vf=[...])``
        (default ``[64, 64]`` for both)
    :param activation_fn: activation of all hidden layers
    :param log_std_init: initial log standard deviation of Gaussian actors
    :param ortho_init: orthogonal initialisation
    :param optimizer_class: critic optimiser
    :param optimizer_kwargs: extra critic optimiser arguments
    :param normalize_observation: running mean/std normalisation of each agent's (float ``Box``) observation
        and of the global state, inside the networks (saved with them; updated only by
        :meth:`update_normalizers`)
    :param clip_observation: bound of the normalised observations and state
    :param std_parametrization: ``"log"`` (SB3's ``exp(log_std)``) or ``"sigmoid"`` (HARL's
        ``max_std * sigmoid(x)``) for Gaussian actors
    :param max_std: the std cap of the ``"sigmoid"`` parametrisation
    :param layer_norm: a ``LayerNorm`` after every hidden layer of actors and critic (HARL's MLP)
    """

    observation_space: spaces.Dict
    action_space: spaces.Dict

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Dict,
        lr_schedule: Schedule,
        state_space: spaces.Box,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        log_std_init: float = 0.0,
        ortho_init: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        normalize_observation: bool = False,
        clip_observation: float = 10.0,
        std_parametrization: str = "log",
        max_std: float = 0.5,
        layer_norm: bool = False,
    ) -> None:
        if std_parametrization not in STD_PARAMETRIZATIONS:
            raise ValueError(f"std_parametrization must be one of {STD_PARAMETRIZATIONS}, got {std_parametrization!r}")
        if not (isinstance(clip_observation, int | float) and clip_observation > 0):
            raise ValueError(f"clip_observation must be a positive number, got {clip_observation!r}")
        if not isinstance(observation_space, spaces.Dict) or not isinstance(action_space, spaces.Dict):
            raise TypeError("HATRPOPolicy needs per-agent spaces: spaces.Dict observation and action spaces")
        if list(observation_space.spaces) != list(action_space.spaces):
            raise ValueError("observation and action spaces must list the same agents in the same order")
        super().__init__(
            observation_space, action_space, optimizer_class=optimizer_class, optimizer_kwargs=optimizer_kwargs
        )
        self.state_space = state_space
        self.net_arch = net_arch
        self.activation_fn = activation_fn
        self.log_std_init = log_std_init
        self.ortho_init = ortho_init
        self.normalize_observation = normalize_observation
        self.clip_observation = clip_observation
        self.std_parametrization = std_parametrization
        self.max_std = max_std
        self.layer_norm = layer_norm
        self.agents: list[str] = list(observation_space.spaces)
        for agent in self.agents:
            check_action_space(agent, action_space[agent])
        pi_arch, vf_arch = _split_net_arch(net_arch)
        self.actors = nn.ModuleDict(
            {
                agent: Actor(
                    observation_space[agent],
                    action_space[agent],
                    pi_arch,
                    activation_fn,
                    log_std_init,
                    ortho_init,
                    normalize_observation=normalize_observation,
                    clip_observation=clip_observation,
                    std_parametrization=std_parametrization,
                    max_std=max_std,
                    layer_norm=layer_norm,
                )
                for agent in self.agents
            }
        )
        self.critic = CentralCritic(
            int(np.prod(state_space.shape)),
            vf_arch,
            activation_fn,
            ortho_init,
            normalize_state=normalize_observation,
            clip_state=clip_observation,
            layer_norm=layer_norm,
        )
        self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
            self.critic.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            state_space=self.state_space,
            net_arch=self.net_arch,
            activation_fn=self.activation_fn,
            log_std_init=self.log_std_init,
            ortho_init=self.ortho_init,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
            normalize_observation=self.normalize_observation,
            clip_observation=self.clip_observation,
            std_parametrization=self.std_parametrization,
            max_std=self.max_std,
            layer_norm=self.layer_norm,
            lr_schedule=lambda _: 0.0,  # the algorithm re-creates the schedule; needed only to build
        )
        return data

    def actor(self, agent: str) -> Actor:
        """The actor of ``agent`` (typed access to ``actors``)."""
        actor = self.actors[agent]
        assert isinstance(actor, Actor)
        return actor

    def update_normalizers(
        self, observations: dict[str, th.Tensor], alive: dict[str, th.Tensor], states: th.Tensor
    ) -> None:
        """Fold a rollout into the observation and state statistics (no-op without normalisation).

        :param observations: per-agent observations ``(n, *obs_shape)``
        :param alive: per-agent 0/1 masks ``(n,)``: an absent agent's padding is not an observation
        :param states: global states ``(n, state_dim)``
        """
        for agent in self.agents:
            normalizer = self.actor(agent).obs_normalizer
            if normalizer is not None:
                normalizer.update(observations[agent][alive[agent] > 0])
        if self.critic.state_normalizer is not None:
            self.critic.state_normalizer.update(states)

    def predict_values(self, states: th.Tensor) -> th.Tensor:
        """Critic output for global states ``(n, state_dim)``."""
        return self.critic(states)

    @th.no_grad()
    def sample_actions(self, observations: dict[str, np.ndarray], deterministic: bool = False) -> dict[str, np.ndarray]:
        """Batched actions of every agent for batched observations ``{agent: (n, *obs_shape)}`` (no clipping).

        The rollout hot loop: one forward pass per agent, no validation.
        """
        return {
            agent: self.actor(agent)
            .sample(th.as_tensor(observations[agent], device=self.device), deterministic)
            .cpu()
            .numpy()
            for agent in self.agents
        }

    def rollout_sampler(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """:meth:`sample_actions` (stochastic) with every actor frozen as it is now (:meth:`Actor.frozen_sampler`).

        For one rollout: build it after the last change to the actors or their statistics.
        """
        samplers = {agent: self.actor(agent).frozen_sampler() for agent in self.agents}
        device = self.device

        def sample_rollout_actions(observations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with th.inference_mode():
                return {
                    agent: sampler(th.as_tensor(observations[agent], device=device), False).cpu().numpy()
                    for agent, sampler in samplers.items()
                }

        return sample_rollout_actions

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        raise NotImplementedError("HATRPOPolicy predicts per agent: use predict(), which takes {agent: obs}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("HATRPOPolicy has no joint forward pass: use predict() or sample_actions()")

    def predict(  # type: ignore[override]
        self,
        observation: dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...] | None]:
        """Actions for the agents present in ``observation``.

        :param observation: ``{agent: obs}`` for one env or ``{agent: (n, *obs_shape)}`` batched; agents
            that have left the episode are simply absent
        :param state: unused (no recurrent policies), kept for SB3 compatibility
        :param episode_start: unused, kept for SB3 compatibility
        :param deterministic: the mode of each action distribution instead of a sample
        :return: ``({agent: action}, None)`` for exactly the agents in ``observation``, inside each action space
        """
        if not isinstance(observation, dict):
            raise TypeError(
                f"predict() takes a dict {{agent: observation}}, got {type(observation).__name__}. "
                f"Agents of this model: {self.agents}"
            )
        unknown = [agent for agent in observation if agent not in self.actors]
        if unknown:
            raise ValueError(f"predict() got unknown agent(s) {unknown}; this model's agents are {self.agents}")
        self.set_training_mode(False)
        actions: dict[str, np.ndarray] = {}
        with th.no_grad():
            for agent, obs in observation.items():
                obs_array = np.asarray(obs)
                obs_space = self.observation_space[agent]
                expected = obs_space.shape or ()
                if obs_array.shape == expected:
                    batched = False
                    obs_array = obs_array[None]
                elif obs_array.shape[1:] == expected and obs_array.ndim == len(expected) + 1:
                    batched = True
                else:
                    raise ValueError(
                        f"predict(): observation of agent {agent!r} has shape {obs_array.shape}; "
                        f"expected {expected} (one env) or (n, {', '.join(map(str, expected))}) (batched)"
                    )
                action = self.actor(agent)(th.as_tensor(obs_array, device=self.device), deterministic).cpu().numpy()
                action_space = self.action_space[agent]
                if isinstance(action_space, spaces.Box):
                    action = np.clip(action, action_space.low, action_space.high).astype(action_space.dtype)
                actions[agent] = action if batched else action[0]
        return actions, state


MlpPolicy = HATRPOPolicy
"""The ``"MlpPolicy"`` alias: MLP actors on flat observations, MLP critic on the global state."""
