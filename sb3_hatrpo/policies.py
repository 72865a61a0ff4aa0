"""Per-agent actors and the centralised critic of HATRPO.

Every agent has its own actor (no parameter sharing: agents may have different
observation and action spaces); one critic values the global state. The networks are
SB3's building blocks: ``MlpExtractor`` for the hidden layers and SB3's
distributions for the action heads.
"""

from __future__ import annotations

import copy
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
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        net_arch: list[int],
        activation_fn: type[nn.Module] = nn.Tanh,
        log_std_init: float = 0.0,
        ortho_init: bool = True,
    ) -> None:
        super().__init__()
        self.observation_space = observation_space
        self.action_space = action_space
        features_dim = get_flattened_obs_dim(observation_space)
        # Only the "pi" branch is used; vf=[] builds no layers.
        self.mlp_extractor = MlpExtractor(features_dim, dict(pi=net_arch, vf=[]), activation_fn)
        self.action_dist = make_proba_distribution(action_space)
        self.log_std: nn.Parameter | None = None
        # split sizes of the logits of a MultiDiscrete action, None otherwise
        self._nvec = [int(n) for n in action_space.nvec] if isinstance(action_space, spaces.MultiDiscrete) else None
        if isinstance(self.action_dist, DiagGaussianDistribution):
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
        return features.flatten(start_dim=1).float()

    def distribution(self, obs: th.Tensor) -> Distribution:
        """A fresh SB3 distribution for a batch of observations ``(n, *obs_shape)``.

        SB3's distribution objects are stateful, so each call returns its own copy: a
        distribution kept as "old policy" is never overwritten by a later call.
        """
        features = self._features(obs)
        latent = self.mlp_extractor.forward_actor(features)
        dist = copy.copy(self.action_dist)
        if isinstance(dist, DiagGaussianDistribution):
            assert self.log_std is not None
            return dist.proba_distribution(self.action_net(latent), self.log_std)
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
        if self.log_std is not None:
            return out if deterministic else out + self.log_std.exp() * th.randn_like(out)
        logits = out.split(self._nvec, dim=1) if self._nvec is not None else (out,)
        if deterministic:
            picks = [chunk.argmax(dim=1) for chunk in logits]
        else:
            picks = [th.multinomial(chunk.softmax(dim=1), 1).squeeze(1) for chunk in logits]
        return th.stack(picks, dim=1) if self._nvec is not None else picks[0]


class CentralCritic(nn.Module):
    """State-value function on the global state (the centralised critic of CTDE).

    :param state_dim: size of the flat global state
    :param net_arch: hidden layer sizes
    :param activation_fn: activation between hidden layers
    :param ortho_init: orthogonal initialisation (sqrt(2) hidden, 1 output)
    """

    def __init__(
        self, state_dim: int, net_arch: list[int], activation_fn: type[nn.Module] = nn.Tanh, ortho_init: bool = True
    ) -> None:
        super().__init__()
        self.mlp_extractor = MlpExtractor(state_dim, dict(pi=[], vf=net_arch), activation_fn)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if ortho_init:
            self.mlp_extractor.apply(lambda m: BasePolicy.init_weights(m, gain=np.sqrt(2)))
            self.value_net.apply(lambda m: BasePolicy.init_weights(m, gain=1.0))

    def forward(self, states: th.Tensor) -> th.Tensor:
        """Values ``(n,)`` of global states ``(n, state_dim)`` (normalised if the algorithm normalises values)."""
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
    ) -> None:
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
        self.agents: list[str] = list(observation_space.spaces)
        for agent in self.agents:
            check_action_space(agent, action_space[agent])
        pi_arch, vf_arch = _split_net_arch(net_arch)
        self.actors = nn.ModuleDict(
            {
                agent: Actor(
                    observation_space[agent], action_space[agent], pi_arch, activation_fn, log_std_init, ortho_init
                )
                for agent in self.agents
            }
        )
        self.critic = CentralCritic(int(np.prod(state_space.shape)), vf_arch, activation_fn, ortho_init)
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
            lr_schedule=lambda _: 0.0,  # the algorithm re-creates the schedule; needed only to build
        )
        return data

    def actor(self, agent: str) -> Actor:
        """The actor of ``agent`` (typed access to ``actors``)."""
        actor = self.actors[agent]
        assert isinstance(actor, Actor)
        return actor

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
