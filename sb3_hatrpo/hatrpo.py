"""HATRPO: Heterogeneous-Agent Trust Region Policy Optimisation, in Stable-Baselines3's shape.

Kuba et al., "Trust Region Policy Optimisation in Multi-Agent Reinforcement Learning",
ICLR 2022; with the joint-KL-budget allocators of Shek, Shi, Tokekar, "Multi-Agent Trust
Region Policy Optimisation: A Joint Constraint Approach", arXiv 2508.10340 (AAMAS 2026).
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.save_util import load_from_zip_file, recursive_setattr
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance, get_system_info
from stable_baselines3.common.vec_env import VecEnv
from torch.nn import functional as F

from sb3_hatrpo.allocators import BaseAllocator, make_allocator
from sb3_hatrpo.atomic import atomic_write
from sb3_hatrpo.budget import check_total_timesteps, default_total_timesteps
from sb3_hatrpo.buffers import MultiAgentRolloutBuffer, RolloutData
from sb3_hatrpo.env_spec import EnvSpec, mismatch_hint
from sb3_hatrpo.normalization import RewardScaler
from sb3_hatrpo.policies import HATRPOPolicy, MlpPolicy
from sb3_hatrpo.stall import StallDetector
from sb3_hatrpo.threads import DEFAULT_NUM_THREADS, check_num_threads, torch_threads
from sb3_hatrpo.trust_region import TrustRegionPlanner
from sb3_hatrpo.validation import check_finite_observations, check_hyperparameters, check_learn_arguments
from sb3_hatrpo.vec_env import MultiAgentVecEnv, make_vec_env

SelfHATRPO = TypeVar("SelfHATRPO", bound="HATRPO")

# Options whose default differs from what models saved before them did (they had no such attribute).
BEHAVIOUR_BEFORE_OPTION: dict[str, Any] = {"normalize_observation": False}

# Per-sample critic losses (prediction, target, Huber threshold): reduced after the optional value clipping.
VALUE_LOSSES: dict[str, Callable[[th.Tensor, th.Tensor, float], th.Tensor]] = {
    "mse": lambda prediction, target, _: F.mse_loss(prediction, target, reduction="none"),
    "huber": lambda prediction, target, delta: F.huber_loss(prediction, target, reduction="none", delta=delta),
}


class HATRPO(OnPolicyAlgorithm):
    """HATRPO with a pluggable KL allocator (uniform = HATRPO, ``kkt`` = HATRPO-W, ``greedy`` = HATRPO-G).

    Each agent has its own actor; a centralised critic values the global state. Every
    iteration the allocator decides each agent's KL threshold and the order in which the
    agents take their trust-region steps; each step maximises the surrogate corrected by
    the agents already updated (the factor ``M``, Kuba et al. 2022, Eq. 11).

    Hyperparameter names follow sb3-contrib's ``TRPO`` where the concept is the same.

    :param policy: ``"MlpPolicy"`` or a :class:`HATRPOPolicy` subclass
    :param env: a PettingZoo ``ParallelEnv`` (or AEC env), a zero-argument factory returning one, an id
        for :func:`sb3_hatrpo.envs.make_env` (``"mamujoco:HalfCheetah-2x3"``), or a ``MultiAgentVecEnv``
    :param learning_rate: critic learning rate, a constant or a schedule of the remaining progress (1 -> 0)
    :param n_steps: steps per env copy in each rollout (the batch is ``n_steps * n_envs``)
    :param batch_size: critic minibatch size
    :param gamma: discount factor
    :param cg_max_steps: conjugate-gradient iterations for each search direction
    :param cg_damping: damping added to the Fisher matrix, ``F + cg_damping * I``
    :param krylov_rtol: when KKT or greedy recompute an agent's direction after another agent
        moved (``M`` changed, the agent's Fisher matrix did not), start from the Galerkin projection
        on the Krylov basis of its earlier solves (no Fisher-vector product) and add CG steps only
        while the relative residual ``||g - F x|| / ||g||`` exceeds ``krylov_rtol``. ``None`` (default)
        recomputes every direction from scratch, as the paper: on HalfCheetah 6x1 ``0.05`` cut greedy's
        Fisher-vector products from 252 to ~100 per iteration, but its worst potential was 7% off a
        200-step solve (``benchmarks/allocator_cost.py``). No effect on the uniform allocator.
    :param line_search_shrinking_factor: step-size factor ``beta`` of the backtracking line search
    :param line_search_max_iter: step sizes tried by the line search
    :param line_search_accept_ratio: the line search also requires the actual surrogate improvement to exceed
        this share of the first-order prediction of the tried step (HARL's ``accept_ratio``: 0.5); 0 accepts
        any positive improvement within the threshold (DESIGN §4)
    :param n_critic_updates: critic epochs per rollout
    :param value_loss: ``"mse"`` or ``"huber"`` (HARL's, with ``huber_delta``) for the critic
    :param huber_delta: the Huber loss's threshold (HARL: 10)
    :param clip_range_vf: clip the critic's new predictions to within this of the rollout's (in the
        normalised value space) and take the larger loss, as SB3's PPO and HARL (0.2); ``None``: no clipping
    :param max_grad_norm: clip the critic's gradient norm (HARL: 10); ``None``: no clipping
    :param bootstrap_truncation: bootstrap a truncated episode (time limit) with the value of its final
        state; ``False`` gives its last step advantage 0 instead (HARL's ``use_proper_time_limits``)
    :param gae_lambda: GAE's bias-variance trade-off
    :param normalize_advantage: normalise the advantages of each rollout (mean 0, std 1)
    :param target_kl: the per-agent KL threshold of plain HATRPO
    :param total_kl: the joint KL budget ``delta_total`` of every allocator; default
        ``n_agents * target_kl``, so all allocators spend the same total KL
    :param allocator: ``"uniform"`` (alias ``"hatrpo"``), ``"kkt"`` (``"w"``), ``"greedy"`` (``"g"``)
        or a :class:`sb3_hatrpo.allocators.BaseAllocator` instance
    :param allocator_kwargs: options of a named allocator (e.g. ``{"min_kl_fraction": 0.5}``)
    :param normalize_value: train the critic on returns normalised with a running mean/std
    :param normalize_observation: running mean/std normalisation (clipped) of every agent's float ``Box``
        observation and of the global state, kept inside the networks: saved in the zip and applied by
        ``predict``, so every caller passes raw observations. The statistics are updated from each
        rollout after its update (never in ``predict`` or evaluation). SB3's ``VecNormalize(norm_obs=True)``
        and HARL's input LayerNorm play this role elsewhere.
    :param clip_observation: bound of the normalised observations and state (``VecNormalize``'s ``clip_obs``)
    :param normalize_reward: divide the rewards the critic and the advantages see by the running std of the
        discounted return (``VecNormalize``'s ``norm_reward``); logged episode returns stay raw
    :param n_envs: env copies when ``env`` is not already vectorised
    :param vec_env_cls: ``"dummy"`` (one process) or ``"subproc"`` (one process per copy)
    :param env_kwargs: keyword arguments of ``make_env`` when ``env`` is an id
    :param stats_window_size: episodes averaged for ``rollout/ep_rew_mean``
    :param tensorboard_log: TensorBoard log folder (None: no TensorBoard)
    :param policy_kwargs: ``net_arch``, ``activation_fn``, ``log_std_init``, ``ortho_init``, optimiser options
    :param verbose: 0 silent, 1 training figures, 2 debug
    :param seed: seed of torch, numpy, the envs and the update order
    :param device: ``"cpu"``, ``"cuda"`` or ``"auto"``
    :param _init_setup_model: build the networks now (False when loading)
    :param num_threads: torch CPU threads while this model learns and predicts (set for the call, then
        restored); default 1, the fastest for these small MLPs (``benchmarks/threads.py``); None leaves
        torch's setting alone (e.g. for large networks, or on a GPU)
    :param fisher_product: how the Fisher-vector products ``F v`` of CG are computed. ``"analytic"``
        (default): for actors with a diagonal-Gaussian action (``Box``) and a state-independent std,
        ``J^T diag(w / std^2) J v`` on the mean network plus a diagonal std block, the exact Hessian of
        the KL at the old parameters from one traced graph per agent and iteration
        (:class:`sb3_hatrpo.trust_region.GaussianFisher`); categorical actors fall back to the double
        backward. ``"double_backward"``: sb3-contrib's and HARL's ``grad (grad KL . v)`` for every actor.
        Both give the same product up to float rounding; the analytic one is faster
        (``benchmarks/fisher_product.py``).
    """

    policy_aliases: ClassVar[dict[str, type[HATRPOPolicy]]] = {"MlpPolicy": MlpPolicy}  # type: ignore[assignment]
    policy: HATRPOPolicy  # type: ignore[assignment]
    rollout_buffer: MultiAgentRolloutBuffer  # type: ignore[assignment]
    env: MultiAgentVecEnv | None

    def __init__(
        self,
        policy: str | type[HATRPOPolicy],
        env: Any,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        krylov_rtol: float | None = None,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        line_search_accept_ratio: float = 0.0,
        n_critic_updates: int = 10,
        value_loss: str = "mse",
        huber_delta: float = 10.0,
        clip_range_vf: float | None = None,
        max_grad_norm: float | None = None,
        bootstrap_truncation: bool = True,
        gae_lambda: float = 0.95,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        total_kl: float | None = None,
        allocator: str | BaseAllocator = "uniform",
        allocator_kwargs: dict[str, Any] | None = None,
        normalize_value: bool = True,
        normalize_observation: bool = True,
        clip_observation: float = 10.0,
        normalize_reward: bool = False,
        n_envs: int = 1,
        vec_env_cls: str | type[MultiAgentVecEnv] = "dummy",
        env_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        num_threads: int | None = DEFAULT_NUM_THREADS,
        fisher_product: str = "analytic",
    ) -> None:
        # Checked before anything is built, so a typo costs nothing.
        check_num_threads(num_threads)
        check_hyperparameters(
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            krylov_rtol=krylov_rtol,
            fisher_product=fisher_product,
            line_search_shrinking_factor=line_search_shrinking_factor,
            line_search_max_iter=line_search_max_iter,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            total_kl=total_kl,
            normalize_value=normalize_value,
            line_search_accept_ratio=line_search_accept_ratio,
            huber_delta=huber_delta,
            clip_range_vf=clip_range_vf,
            max_grad_norm=max_grad_norm,
            bootstrap_truncation=bootstrap_truncation,
            normalize_observation=normalize_observation,
            clip_observation=clip_observation,
            normalize_reward=normalize_reward,
            n_envs=n_envs,
            stats_window_size=stats_window_size,
            verbose=verbose,
            seed=seed,
            device=device,
        )
        if value_loss not in VALUE_LOSSES:
            raise ValueError(f"HATRPO: value_loss must be one of {sorted(VALUE_LOSSES)}, got {value_loss!r}")
        self.allocator = make_allocator(allocator, allocator_kwargs)
        if isinstance(policy, str):
            if policy not in self.policy_aliases:
                raise ValueError(f"Unknown policy {policy!r}; valid: {sorted(self.policy_aliases)} or a class")
            policy = self.policy_aliases[policy]
        owned_env: MultiAgentVecEnv | None = None
        if env is not None and not isinstance(env, MultiAgentVecEnv):
            env = owned_env = self._to_vec_env(
                env, n_envs=n_envs, seed=seed, vec_env_cls=vec_env_cls, env_kwargs=env_kwargs
            )

        super().__init__(
            policy,  # type: ignore[arg-type]  # HATRPOPolicy is not an ActorCriticPolicy
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=0.0,
            vf_coef=0.0,
            max_grad_norm=0.0,
            use_sde=False,
            sde_sample_freq=-1,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        self.batch_size = batch_size
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.krylov_rtol = krylov_rtol
        self.fisher_product = fisher_product
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.line_search_accept_ratio = line_search_accept_ratio
        self.n_critic_updates = n_critic_updates
        self.value_loss = value_loss
        self.huber_delta = huber_delta
        self.clip_range_vf = clip_range_vf
        self.max_grad_norm = max_grad_norm  # type: ignore[assignment]  # SB3 declares float
        self.bootstrap_truncation = bootstrap_truncation
        self.normalize_advantage = normalize_advantage
        self.target_kl = float(target_kl)
        self.total_kl = total_kl
        self.normalize_value = normalize_value
        self.normalize_observation = normalize_observation
        self.clip_observation = clip_observation
        self.normalize_reward = normalize_reward
        self.value_normalizer: RunningMeanStd | None = None
        self.reward_scaler: RewardScaler | None = None
        self.last_allocation: list[dict[str, Any]] = []
        self.state_space: spaces.Box | None = None
        self._order_rng = np.random.default_rng(seed)
        self._last_states: np.ndarray | None = None
        self._last_alive: np.ndarray | None = None
        self._stall = StallDetector()
        # The vectorised env this model built itself (from an id, a factory or a ParallelEnv): a failed learn()
        # closes it, so its worker processes do not outlive the failure. A MultiAgentVecEnv passed in is the caller's.
        self._owned_env = owned_env
        self.num_threads = num_threads
        # How the env was made, saved with the model (see make_env)
        self.env_spec: EnvSpec | None = EnvSpec.of(self.env)
        if self.env is not None:
            self.state_space = self.env.state_space
            if self.n_steps * self.n_envs < 2:
                if owned_env is not None:
                    owned_env.close()
                raise ValueError(
                    f"n_steps * n_envs = {self.n_steps} * {self.n_envs} < 2: advantages cannot be normalised "
                    "and the critic has nothing to fit; use a larger n_steps"
                )
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _to_vec_env(
        env: Any,
        n_envs: int = 1,
        seed: int | None = None,
        vec_env_cls: str | type[MultiAgentVecEnv] = "dummy",
        env_kwargs: dict[str, Any] | None = None,
    ) -> MultiAgentVecEnv:
        if isinstance(env, MultiAgentVecEnv):
            return env
        if isinstance(env, VecEnv):
            raise TypeError(
                f"HATRPO needs a multi-agent env, got the single-agent VecEnv {type(env).__name__}. "
                "Pass a PettingZoo ParallelEnv, a factory returning one, an env id, or sb3_hatrpo.make_vec_env(...)"
            )
        return make_vec_env(env, n_envs=n_envs, seed=seed, vec_env_cls=vec_env_cls, env_kwargs=env_kwargs)

    @staticmethod
    def _wrap_env(env: GymEnv, verbose: int = 0, monitor_wrapper: bool = True) -> VecEnv:
        # SB3 would wrap a gym env in DummyVecEnv; multi-agent envs are converted by _to_vec_env.
        if not isinstance(env, MultiAgentVecEnv):
            raise TypeError(
                f"HATRPO needs a MultiAgentVecEnv here, got {type(env).__name__}; see sb3_hatrpo.make_vec_env"
            )
        return env

    @property
    def agents(self) -> list[str]:
        """Agent names, in the order of the observation/action space dicts."""
        return list(self.observation_space.spaces)  # type: ignore[attr-defined]

    @property
    def joint_kl_budget(self) -> float:
        """``delta_total``: ``total_kl`` if given, else ``n_agents * target_kl``."""
        return float(self.total_kl) if self.total_kl is not None else len(self.agents) * self.target_kl

    def set_random_seed(self, seed: int | None = None) -> None:
        super().set_random_seed(seed)
        if seed is not None:
            self._order_rng = np.random.default_rng(seed)

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        assert self.state_space is not None, "the global state space is unknown: pass an env"
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space,
            self.action_space,
            self.lr_schedule,
            state_space=self.state_space,
            normalize_observation=self.normalize_observation,
            clip_observation=self.clip_observation,
            **self.policy_kwargs,
        )
        self.policy = self.policy.to(self.device)
        self.rollout_buffer = MultiAgentRolloutBuffer(
            self.n_steps,
            self.observation_space,  # type: ignore[arg-type]
            self.action_space,  # type: ignore[arg-type]
            state_dim=int(np.prod(self.state_space.shape)),
            n_envs=self.n_envs,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            device=self.device,
            bootstrap_truncation=self.bootstrap_truncation,
        )
        if self.normalize_value and self.value_normalizer is None:
            self.value_normalizer = RunningMeanStd(shape=())
        if self.normalize_reward and self.reward_scaler is None:
            self.reward_scaler = RewardScaler(self.n_envs, self.gamma)

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        resets = reset_num_timesteps or self._last_obs is None
        result = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        if resets or self._last_states is None:
            assert self.env is not None
            self._last_states = self.env.states.copy()
            self._last_alive = self.env.alive.copy()
        return result

    # --------------------------------------------------------------- rollouts
    def _values(self, states: np.ndarray) -> np.ndarray:
        """Denormalised critic values of a batch of global states."""
        with th.no_grad():
            values = self.policy.predict_values(th.as_tensor(states, device=self.device)).cpu().numpy()
        if self.value_normalizer is not None:
            values = values * np.sqrt(self.value_normalizer.var + 1e-8) + self.value_normalizer.mean
        return values.astype(np.float32)

    def collect_rollouts(  # type: ignore[override]
        self,
        env: MultiAgentVecEnv,
        callback: BaseCallback,
        rollout_buffer: MultiAgentRolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """Step the envs ``n_rollout_steps`` times with every agent's current policy, then compute GAE.

        Only sampling happens per step; old log-probabilities and values are computed in
        batches afterwards, since neither actors nor critic change during the rollout.
        """
        assert self._last_obs is not None and self._last_states is not None and self._last_alive is not None
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()

        n_steps = 0
        sample_actions = self.policy.rollout_sampler()  # the actors are frozen until the next train()
        while n_steps < n_rollout_steps:
            # The env clips Box actions; the buffer keeps the sampled ones, whose log-probs the update needs.
            actions = sample_actions(self._last_obs)  # type: ignore[arg-type]
            new_obs, rewards, dones, infos = env.step(actions)
            self.num_timesteps += env.num_envs

            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1

            if self.reward_scaler is not None:
                rewards = self.reward_scaler(rewards, dones)
            rollout_buffer.add(self._last_obs, self._last_states, self._last_alive, actions, rewards, dones)  # type: ignore[arg-type]
            for idx in np.flatnonzero(dones):
                if infos[idx].get("TimeLimit.truncated", False):
                    rollout_buffer.add_truncation(int(idx), infos[idx]["terminal_state"])

            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_states = env.states.copy()
            self._last_alive = env.alive.copy()
            self._last_episode_starts = dones

        values = self._values(rollout_buffer.states.reshape(-1, rollout_buffer.states.shape[-1]))
        last_values = self._values(self._last_states)
        truncation_values = (
            self._values(np.stack([state for _, _, state in rollout_buffer.truncations]))
            if rollout_buffer.truncations
            else np.zeros(0, dtype=np.float32)
        )
        rollout_buffer.compute_returns_and_advantage(
            values.reshape(rollout_buffer.values.shape), last_values, truncation_values
        )
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    # ----------------------------------------------------------------- update
    def _train_critic(self, states: th.Tensor, returns: th.Tensor) -> list[float]:
        """``n_critic_updates`` epochs of minibatch regression on the (normalised) returns."""
        if self.value_normalizer is not None:
            self.value_normalizer.update(returns.cpu().numpy())
            mean, std = float(self.value_normalizer.mean), float(np.sqrt(self.value_normalizer.var + 1e-8))
            targets = (returns - mean) / std
        else:
            targets = returns
        loss_fn = VALUE_LOSSES[self.value_loss]
        if self.clip_range_vf is not None:
            with th.no_grad():
                old_predictions = self.policy.predict_values(states)  # the critic that valued this rollout
        losses = []
        n = states.shape[0]
        for _ in range(self.n_critic_updates):
            for batch in th.randperm(n, device=self.device).split(self.batch_size):
                predictions = self.policy.predict_values(states[batch])
                loss = loss_fn(predictions, targets[batch], self.huber_delta)
                if self.clip_range_vf is not None:
                    # PPO's (and HARL's) clipped value loss: the larger of the clipped and the plain loss
                    old = old_predictions[batch]
                    clipped = old + (predictions - old).clamp(-self.clip_range_vf, self.clip_range_vf)
                    loss = th.maximum(loss, loss_fn(clipped, targets[batch], self.huber_delta))
                loss = loss.mean()
                self.policy.optimizer.zero_grad()
                loss.backward()
                if self.max_grad_norm:  # None, or SB3's 0.0 in models saved before the option: no clipping
                    th.nn.utils.clip_grad_norm_(self.policy.critic.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
                losses.append(loss.item())
        return losses

    def make_planner(self, data: RolloutData, **overrides: Any) -> TrustRegionPlanner:
        """The trust-region planner of one iteration on a rollout, with this model's settings.

        :param data: the rollout (``rollout_buffer.get()``)
        :param overrides: planner arguments to change (e.g. ``krylov_rtol``, ``cg_max_steps``), for diagnostics
        """
        advantages = data.advantages
        if not th.isfinite(advantages).all():
            fixes = "a lower learning_rate or scaled rewards" + (
                "" if self.normalize_value else ", or normalize_value=True"
            )
            raise FloatingPointError(
                f"Non-finite advantages: the critic diverged or the env returned extreme rewards. Try {fixes}."
            )
        settings: dict[str, Any] = dict(
            total_kl=self.joint_kl_budget,
            normalize_advantage=self.normalize_advantage,
            line_search_accept_ratio=self.line_search_accept_ratio,
            cg_max_steps=self.cg_max_steps,
            cg_damping=self.cg_damping,
            line_search_shrinking_factor=self.line_search_shrinking_factor,
            line_search_max_iter=self.line_search_max_iter,
            krylov_rtol=self.krylov_rtol,
            fisher_product=self.fisher_product,
            n_envs=self.n_envs,  # folds of whole envs for the noise-aware allocators
        )
        settings.update(overrides)
        actors = {agent: self.policy.actor(agent) for agent in self.policy.agents}
        return TrustRegionPlanner(actors, data.observations, data.actions, data.alive, advantages, **settings)

    def train(self) -> None:
        """Critic regression, then the actors' trust-region steps in the allocator's order."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        data = self.rollout_buffer.get()
        planner = self.make_planner(data)  # checks the advantages before any update
        value_losses = self._train_critic(data.states, data.returns)
        planner.allocator_name = type(self.allocator).__name__  # named when it breaks the budget contract
        results = self.allocator.update_agents(planner, self._order_rng)
        # After the update, so that the policy that sampled this rollout is exactly the trust region's old policy.
        self.policy.update_normalizers(data.observations, data.alive, data.states)
        self._stall.update(
            results,
            f"joint KL budget {planner.total_kl:g}, line_search_max_iter={self.line_search_max_iter}, "
            f"allocator {type(self.allocator).__name__}",
        )
        self.last_allocation = [result.as_record(position) for position, result in enumerate(results)]
        self._n_updates += 1

        budget = planner.total_kl
        spent = sum(r.kl for r in results)
        for record in self.last_allocation:
            prefix = f"train/{record['agent']}/"
            for key in ("threshold", "kl", "improvement", "predicted_improvement", "position", "potential"):
                self.logger.record(prefix + key, record[key])
            self.logger.record(prefix + "accepted", float(record["accepted"]))
            log_std = self.policy.actor(record["agent"]).action_log_std()
            if log_std is not None:
                self.logger.record(prefix + "std", float(log_std.detach().exp().mean()))
        self.logger.record("train/kl_budget", budget)
        self.logger.record("train/total_kl", spent)
        self.logger.record("train/kl_spent_fraction", spent / budget)
        self.logger.record("train/value_loss", float(np.mean(value_losses)) if value_losses else 0.0)
        self.logger.record(
            "train/explained_variance",
            float(explained_variance(data.values.cpu().numpy(), data.returns.cpu().numpy())),
        )
        for key, value in self.allocator.diagnostics.items():  # e.g. SelectionBiasProbe's held-out figures
            self.logger.record(f"train/{key}", value)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def learn(
        self: SelfHATRPO,
        total_timesteps: int | None = None,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "HATRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfHATRPO:
        """Train for ``total_timesteps`` env steps (summed over the env copies), on ``num_threads`` threads.

        If training fails with an exception, the env this model created itself (from an id, a factory or a
        ParallelEnv) is closed (its worker processes end) and the log files SB3 opened are closed; the exception
        is re-raised. ``KeyboardInterrupt`` closes nothing: training can continue or the model be saved.

        :param total_timesteps: the budget, a positive whole number; default: the zoo config's ``n_timesteps``
            when the model was made from a known env id, else 1,000,000 (``sb3_hatrpo.budget``)
        :param callback: SB3 callback(s) called at every step
        :param log_interval: dump the logger every this many iterations
        :param tb_log_name: TensorBoard run name
        :param reset_num_timesteps: start the timestep count from 0 (False to continue)
        :param progress_bar: show a progress bar (needs tqdm and rich: the ``zoo`` extra)
        """
        if total_timesteps is None:
            total_timesteps, source = default_total_timesteps(self.env_spec.env_id if self.env_spec else None)
            # Also with verbose=0: a budget nobody chose may be hours of training
            warnings.warn(f"learn() without total_timesteps trains {total_timesteps:,} steps ({source})", stacklevel=2)
        total_timesteps = check_total_timesteps(total_timesteps)
        check_learn_arguments(total_timesteps, log_interval, reset_num_timesteps, progress_bar, tb_log_name)
        if self.env is not None and getattr(self.env, "closed", False):
            raise ValueError(
                "This model's env is closed (a failed learn() closes the env the model created): give it a new one "
                "with model.set_env(sb3_hatrpo.make_vec_env(...))"
            )
        if progress_bar:
            from sb3_hatrpo.extras import require

            require(["tqdm", "rich"], "progress_bar=True")
        with torch_threads(self._threads()):
            try:
                return super().learn(
                    total_timesteps=total_timesteps,
                    callback=callback,
                    log_interval=log_interval,
                    tb_log_name=tb_log_name,
                    reset_num_timesteps=reset_num_timesteps,
                    progress_bar=progress_bar,
                )
            except Exception:
                self._close_after_failure()
                raise

    def _close_after_failure(self) -> None:
        """Close what ``learn()`` and the constructor opened: the model's own env and SB3's log files."""
        if self._owned_env is not None and self.env is self._owned_env:
            self._owned_env.close()
        logger = getattr(self, "_logger", None)  # None if the first reset failed
        if logger is not None and not self._custom_logger:
            logger.close()

    def predict(  # type: ignore[override]
        self,
        observation: dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...] | None]:
        """Actions for the agents in ``observation`` (``{agent: obs}``, one env or batched), on ``num_threads``
        threads; see the policy's. ``ValueError`` naming the agent for a NaN or infinite observation."""
        check_finite_observations(observation)
        with torch_threads(self._threads()):
            return self.policy.predict(observation, state, episode_start, deterministic)

    def _threads(self) -> int | None:
        # getattr: models saved before num_threads existed
        return getattr(self, "num_threads", DEFAULT_NUM_THREADS) if self.device.type == "cpu" else None

    def make_env(
        self, n_envs: int = 1, seed: int | None = None, vec_env_cls: str = "dummy", **env_kwargs: Any
    ) -> MultiAgentVecEnv:
        """New copies of the env this model was made with (its id, ``env_kwargs`` and wrapper, saved with it).

        ``HATRPO.load(path)`` without an env, then ``evaluate_policy(model, model.make_env())``.

        :param n_envs: copies
        :param seed: seed of the copies' first reset (copy ``i`` gets ``seed + i``)
        :param vec_env_cls: ``"dummy"`` or ``"subproc"``
        :param env_kwargs: override the saved keyword arguments (e.g. ``render_mode="rgb_array"``)
        :raises ValueError: if the model was not made from an env id
        """
        spec = getattr(self, "env_spec", None)
        if spec is None:
            raise ValueError(
                "This model was not made from an env id (or was saved before env ids were recorded), so it cannot "
                "rebuild its env: create it yourself, e.g. make_vec_env(env_id, env_kwargs={...})."
            )
        spec = spec.with_kwargs(env_kwargs)
        return make_vec_env(
            spec.env_id, n_envs=n_envs, seed=seed, vec_env_cls=vec_env_cls, wrapper=spec.wrapper,
            env_kwargs=spec.env_kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------ save / load
    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_states", "_last_alive", "_stall", "_owned_env"]

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Any = None,
        include: Any = None,
    ) -> None:
        """Save to SB3's zip format, atomically: written to a temporary file, then renamed into place.

        Temporary files left in the folder by a save that was killed are removed.
        """
        if isinstance(path, io.BufferedIOBase):
            super().save(path, exclude=exclude, include=include)
            return
        target = pathlib.Path(path)
        if target.suffix == "":
            target = target.with_suffix(".zip")  # SB3's convention
        atomic_write(target, lambda tmp_name: super(HATRPO, self).save(tmp_name, exclude=exclude, include=include))

    @classmethod
    def load(
        cls: type[SelfHATRPO],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: Any = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfHATRPO:
        """Load a saved model; with ``env``, check every agent's spaces against it first.

        **Only load files you trust.** As with every SB3 model, the zip holds pickled Python objects
        (spaces, schedules, the policy class) and loading it runs them: a planted file runs its code.
        The file is read once.

        :param path: the ``.zip`` written by :meth:`save`
        :param env: the env to continue training or evaluating on (anything ``HATRPO`` accepts);
            ``ValueError`` naming the agent if its spaces differ from the saved ones
        :param device: where to put the networks
        :param custom_objects: replace saved objects that cannot be unpickled (SB3's option)
        :param print_system_info: print the saving and the current system's versions
        :param force_reset: reset the env before training resumes
        :param kwargs: attributes to change after loading (e.g. ``n_envs`` when ``env`` is an id,
            ``num_threads``); ``env_kwargs`` are keyword arguments of ``make_env`` when ``env`` is an id: with the
            id the model was made from, they update the saved ones (which apply by default)
        :raises FileNotFoundError: no file at ``path`` (nor ``path.zip``)
        :raises ValueError: naming the file, when it is not a complete HATRPO model (truncated, corrupted, foreign)
        """
        if isinstance(path, str | pathlib.Path):
            candidates = [pathlib.Path(path), pathlib.Path(f"{path}.zip")]
            existing = next((p for p in candidates if p.is_file()), None)
            if existing is None:
                raise FileNotFoundError(f"No saved HATRPO model at {path} (nor {path}.zip)")
            if not zipfile.is_zipfile(existing):
                raise ValueError(f"{existing} is not a model saved by HATRPO.save(): it is not a zip file (corrupted?)")
            if not _ends_with_zip_directory(existing):
                raise ValueError(
                    f"{existing} is truncated: the file ends before the zip directory of a model saved by "
                    "HATRPO.save() (an interrupted copy or download?); use a complete copy or another checkpoint"
                )
            path = existing
        if print_system_info:
            print("== CURRENT SYSTEM INFO ==")
            get_system_info()
        data, params, pytorch_variables = read_model_file(path, device, custom_objects, print_system_info)
        data.get("policy_kwargs", {}).pop("device", None)  # ours, not the saving machine's
        if "policy_kwargs" in kwargs and kwargs["policy_kwargs"] != data.get("policy_kwargs"):
            raise ValueError(
                f"policy_kwargs {kwargs['policy_kwargs']} differ from the saved ones {data.get('policy_kwargs')}"
            )
        owned = env is not None and not isinstance(env, MultiAgentVecEnv)
        if env is not None:
            n_envs = kwargs.pop("n_envs", 1)
            env_kwargs = kwargs.pop("env_kwargs", None)
            saved_spec = data.get("env_spec") if isinstance(data.get("env_spec"), EnvSpec) else None
            if isinstance(env, str) and saved_spec is not None and saved_spec.env_id == env:
                # The same id: the env the model was trained on, unless env_kwargs say otherwise
                spec = saved_spec.with_kwargs(env_kwargs)
                env = make_vec_env(env, n_envs=n_envs, wrapper=spec.wrapper, env_kwargs=spec.env_kwargs)
            else:
                env = cls._to_vec_env(env, n_envs=n_envs, env_kwargs=env_kwargs)
            try:
                check_agent_spaces(env, data["observation_space"], data["action_space"], data["state_space"])
            except ValueError as error:
                if owned:  # ours: its workers must not outlive the error
                    env.close()
                raise ValueError(f"{error}.{mismatch_hint(saved_spec, env, path)}") from None
            if force_reset:
                data["_last_obs"] = None  # the env is reset before training (SB3 issue 597)
            data["n_envs"] = env.num_envs
        model = cls(policy=data["policy_class"], env=env, device=device, _init_setup_model=False)
        # A model saved before an option existed keeps the behaviour it was trained with.
        model.__dict__.update({key: value for key, value in BEHAVIOUR_BEFORE_OPTION.items() if key not in data})
        model.__dict__.update(data)
        model.__dict__.update(kwargs)
        model._setup_model()
        try:
            model.set_parameters(params, exact_match=True, device=device)
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(
                f"{_describe_source(path)}: its parameters do not fit the saved networks ({_first_line(error)}); "
                "the file is corrupted or was not written by HATRPO.save()"
            ) from None
        for name, variable in (pytorch_variables or {}).items():
            if variable is not None:
                recursive_setattr(model, f"{name}.data", variable.data)
        if env is not None:
            model._last_states = None
            model._last_alive = None
            model._owned_env = env if owned else None
        return model


def _ends_with_zip_directory(path: pathlib.Path) -> bool:
    """Whether the file ends with its zip end-of-directory record (plus its comment).

    A truncated model zip can still look like a zip: the ``.pth`` entries are zips themselves, and
    ``zipfile`` then reads the directory of the last one it finds, which lists no model entries.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        file.seek(max(0, size - (22 + 65535)))  # the record is 22 bytes plus a comment of at most 64 KiB
        tail = file.read()
    position = tail.rfind(b"PK\x05\x06")
    if position < 0 or position + 22 > len(tail):
        return False
    comment_length = int.from_bytes(tail[position + 20 : position + 22], "little")
    return position + 22 + comment_length == len(tail)


def _describe_source(path: Any) -> str:
    return str(path) if isinstance(path, str | pathlib.Path) else f"the model file object {path!r}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def read_model_file(
    path: str | pathlib.Path | io.BufferedIOBase,
    device: th.device | str = "auto",
    custom_objects: dict[str, Any] | None = None,
    print_system_info: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """SB3's ``load_from_zip_file``, once, with every way a file can be broken turned into one ``ValueError``.

    :param path: the zip (or an open binary file)
    :param device: where to put the tensors
    :param custom_objects: SB3's replacements for saved objects
    :param print_system_info: print the saving system's versions
    :return: ``(data, params, pytorch_variables)``
    :raises ValueError: naming the file and what is wrong with it
    """
    where = _describe_source(path)
    try:
        data, params, pytorch_variables = load_from_zip_file(
            path, device=device, custom_objects=custom_objects, print_system_info=print_system_info
        )
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: its 'data' entry is not valid JSON ({error}); the file is corrupted") from None
    # torch's weights-only unpickler meets random bytes with whatever its parser hits: IndexError, AssertionError, ...
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        pickle.UnpicklingError,
        RuntimeError,
        KeyError,
        OSError,
        IndexError,
        AssertionError,
        TypeError,
        AttributeError,
    ) as error:
        raise ValueError(
            f"{where} cannot be read as a HATRPO model ({type(error).__name__}: {_first_line(error)}); "
            "the file is truncated or corrupted: save it again or use another checkpoint"
        ) from None
    except ValueError as error:  # SB3: "the file ... wasn't a zip-file"
        raise ValueError(f"{where} cannot be read as a HATRPO model: {_first_line(error)}") from None
    if not data or "observation_space" not in data or "state_space" not in data or "policy_class" not in data:
        what = "no 'data' entry" if not data else "no per-agent spaces and policy"
        raise ValueError(f"{where} does not hold a HATRPO model ({what} in the zip; saved by another algorithm?)")
    if not params or "policy" not in params:
        raise ValueError(f"{where} holds no network parameters (policy.pth is missing); the file is incomplete")
    return data, params, pytorch_variables


def check_agent_spaces(
    env: MultiAgentVecEnv, observation_space: spaces.Dict, action_space: spaces.Dict, state_space: spaces.Box
) -> None:
    """Raise ``ValueError`` naming the agent whose spaces differ between a saved model and ``env``."""
    saved_agents = list(observation_space.spaces)
    env_agents = list(env.observation_space.spaces)
    missing = [a for a in saved_agents if a not in env_agents]
    extra = [a for a in env_agents if a not in saved_agents]
    if missing or extra:
        raise ValueError(
            f"The env's agents {env_agents} differ from the model's {saved_agents}: "
            f"missing from the env {missing}, unknown to the model {extra}"
        )
    for agent in saved_agents:
        for kind, saved, current in (
            ("observation", observation_space[agent], env.observation_space[agent]),
            ("action", action_space[agent], env.action_space[agent]),
        ):
            if saved != current:
                raise ValueError(f"Agent {agent!r}: the env's {kind} space {current} differs from the model's {saved}")
    if env.state_space != state_space:
        raise ValueError(f"The env's global state space {env.state_space} differs from the model's {state_space}")


__all__ = ["HATRPO", "MlpPolicy", "check_agent_spaces", "read_model_file"]
