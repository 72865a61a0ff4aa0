"""HATRPO: Heterogeneous-Agent Trust Region Policy Optimisation, in Stable-Baselines3's shape.

Kuba et al., "Trust Region Policy Optimisation in Multi-Agent Reinforcement Learning",
ICLR 2022; with the joint-KL-budget allocators of Shek, Shi, Tokekar, "Multi-Agent Trust
Region Policy Optimisation: A Joint Constraint Approach", arXiv 2508.10340 (AAMAS 2026).
"""

from __future__ import annotations

import io
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance
from stable_baselines3.common.vec_env import VecEnv
from torch.nn import functional as F

from sb3_hatrpo.allocators import BaseAllocator, make_allocator
from sb3_hatrpo.buffers import MultiAgentRolloutBuffer, RolloutData
from sb3_hatrpo.normalization import RewardScaler
from sb3_hatrpo.policies import HATRPOPolicy, MlpPolicy
from sb3_hatrpo.trust_region import TrustRegionPlanner, check_krylov_rtol
from sb3_hatrpo.vec_env import MultiAgentVecEnv, make_vec_env

SelfHATRPO = TypeVar("SelfHATRPO", bound="HATRPO")

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
        while the relative residual ``||g - F x|| / ||g||`` exceeds ``krylov_rtol``. ``None``
        recomputes every direction from scratch. No effect on the uniform allocator.
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
        krylov_rtol: float | None = 0.05,
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
    ) -> None:
        # Checked before anything is built, so a typo costs nothing.
        if not (isinstance(target_kl, int | float) and np.isfinite(target_kl) and target_kl > 0):
            raise ValueError(f"target_kl must be a positive number, got {target_kl!r}")
        if total_kl is not None and not (np.isfinite(total_kl) and total_kl > 0):
            raise ValueError(f"total_kl must be a positive number or None, got {total_kl!r}")
        check_krylov_rtol(krylov_rtol)
        if value_loss not in VALUE_LOSSES:
            raise ValueError(f"value_loss must be one of {sorted(VALUE_LOSSES)}, got {value_loss!r}")
        self.allocator = make_allocator(allocator, allocator_kwargs)
        if isinstance(policy, str):
            if policy not in self.policy_aliases:
                raise ValueError(f"Unknown policy {policy!r}; valid: {sorted(self.policy_aliases)} or a class")
            policy = self.policy_aliases[policy]
        if env is not None and not isinstance(env, MultiAgentVecEnv):
            env = self._to_vec_env(env, n_envs=n_envs, seed=seed, vec_env_cls=vec_env_cls, env_kwargs=env_kwargs)

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
        if self.env is not None:
            self.state_space = self.env.state_space
            if self.n_steps * self.n_envs < 2:
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
        while n_steps < n_rollout_steps:
            # The env clips Box actions; the buffer keeps the sampled ones, whose log-probs the update needs.
            actions = self.policy.sample_actions(self._last_obs)  # type: ignore[arg-type]
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
                if self.max_grad_norm is not None:
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
            raise FloatingPointError(
                "Non-finite advantages: the critic diverged or the env returned extreme rewards. "
                "Try normalize_value=True, a lower learning_rate, or scale the rewards."
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
        results = self.allocator.update_agents(planner, self._order_rng)
        # After the update, so that the policy that sampled this rollout is exactly the trust region's old policy.
        self.policy.update_normalizers(data.observations, data.alive, data.states)
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
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "HATRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfHATRPO:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    # ------------------------------------------------------------ save / load
    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_states", "_last_alive"]

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Any = None,
        include: Any = None,
    ) -> None:
        """Save to SB3's zip format, atomically: written to a temporary file, then renamed into place."""
        if isinstance(path, io.BufferedIOBase):
            super().save(path, exclude=exclude, include=include)
            return
        target = pathlib.Path(path)
        if target.suffix == "":
            target = target.with_suffix(".zip")  # SB3's convention
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.zip", dir=target.parent)
        os.close(fd)
        try:
            super().save(tmp_name, exclude=exclude, include=include)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; a saved model is an ordinary file
            os.replace(tmp_name, target)
        except BaseException:
            pathlib.Path(tmp_name).unlink(missing_ok=True)
            raise

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

        :param path: the ``.zip`` written by :meth:`save`
        :param env: the env to continue training or evaluating on (anything ``HATRPO`` accepts);
            ``ValueError`` naming the agent if its spaces differ from the saved ones
        :param device: where to put the networks
        :param custom_objects: replace saved objects that cannot be unpickled (SB3's option)
        :param print_system_info: print the saving and the current system's versions
        :param force_reset: reset the env before training resumes
        :param kwargs: attributes to change after loading (e.g. ``n_envs`` when ``env`` is an id)
        """
        if isinstance(path, str | pathlib.Path):
            candidates = [pathlib.Path(path), pathlib.Path(f"{path}.zip")]
            existing = next((p for p in candidates if p.is_file()), None)
            if existing is None:
                raise FileNotFoundError(f"No saved HATRPO model at {path} (nor {path}.zip)")
            if not zipfile.is_zipfile(existing):
                raise ValueError(f"{existing} is not a model saved by HATRPO.save(): it is not a zip file (corrupted?)")
            path = existing
        try:
            data, _, _ = load_from_zip_file(path, device="cpu", custom_objects=custom_objects, load_data=True)
        except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError) as error:
            raise ValueError(f"Could not read a HATRPO model from {path}: {error} (corrupted file?)") from error
        if not data or "observation_space" not in data or "state_space" not in data:
            raise ValueError(f"{path} does not hold a HATRPO model (no per-agent spaces found)")
        if env is not None:
            n_envs = kwargs.pop("n_envs", 1)
            env = cls._to_vec_env(env, n_envs=n_envs, env_kwargs=kwargs.pop("env_kwargs", None))
            check_agent_spaces(env, data["observation_space"], data["action_space"], data["state_space"])
        if isinstance(path, io.BufferedIOBase):
            path.seek(0)
        model = super().load(
            path,
            env=env,
            device=device,
            custom_objects=custom_objects,
            print_system_info=print_system_info,
            force_reset=force_reset,
            **kwargs,
        )
        if env is not None:
            model._last_states = None
            model._last_alive = None
        return model


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


__all__ = ["HATRPO", "MlpPolicy", "check_agent_spaces"]
