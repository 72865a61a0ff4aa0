"""Running mean/std normalisation of observations, global states and rewards, kept inside the model.

SB3 users get input normalisation from ``VecNormalize`` (rl-zoo turns it on for MuJoCo), HARL
from an input LayerNorm (``use_feature_normalization``). Here the statistics live in the
networks as buffers, so they are saved in the model zip's ``policy.pth`` and applied by every
forward pass: ``predict``, PettingZoo's own loop, ``evaluate_policy``, ``enjoy`` and a reloaded
model all take raw observations.

The statistics change only when the algorithm calls :meth:`RunningNormalizer.update` with a
rollout's samples, after that rollout's update: within an iteration the policy that sampled
the actions and the "old policy" of the trust-region step are the same function, so the
importance ratios start at exactly 1. Evaluation and ``predict`` never change them.
"""

from __future__ import annotations

import numpy as np
import torch as th
from stable_baselines3.common.running_mean_std import RunningMeanStd
from torch import nn


class RunningNormalizer(nn.Module):
    """``clip((x - mean) / sqrt(var + epsilon), -clip, clip)`` with SB3's running statistics.

    :param shape: shape of one input (without the batch dimension)
    :param clip: bound of the normalised values (``VecNormalize``'s ``clip_obs``)
    :param epsilon: added to the variance; a constant input (the paper's games) becomes 0
    """

    mean: th.Tensor
    var: th.Tensor
    count: th.Tensor

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.clip = float(clip)
        self.epsilon = float(epsilon)
        stats = RunningMeanStd(shape=shape)
        # float64 buffers: they are state_dict entries (saved with the policy) but no parameters.
        self.register_buffer("mean", th.as_tensor(stats.mean))
        self.register_buffer("var", th.as_tensor(stats.var))
        self.register_buffer("count", th.tensor(stats.count, dtype=th.float64))
        # (mean, 1 / std) in the input's dtype, derived from the buffers: the rollout's hot path pays
        # one subtraction, one product and a clamp. Dropped whenever the buffers change.
        self._affine: tuple[th.Tensor, th.Tensor] | None = None

    def affine(self, dtype: th.dtype) -> tuple[th.Tensor, th.Tensor]:
        """``(mean, 1 / std)`` of the current statistics in ``dtype`` (cached until they change)."""
        if self._affine is None or self._affine[0].dtype != dtype:
            self._affine = (self.mean.to(dtype), th.rsqrt(self.var + self.epsilon).to(dtype))
        return self._affine

    def forward(self, x: th.Tensor) -> th.Tensor:
        return apply_affine(x, *self.affine(x.dtype), self.clip)

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(), ...: the cached tensors follow the buffers
        self._affine = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict: new statistics
        self._affine = None
        super()._load_from_state_dict(*args, **kwargs)

    @th.no_grad()
    def update(self, batch: np.ndarray | th.Tensor) -> None:
        """Fold a batch ``(n, *shape)`` into the statistics (SB3's parallel mean/variance update)."""
        array = batch.detach().cpu().numpy() if isinstance(batch, th.Tensor) else np.asarray(batch)
        if array.shape[0] == 0:
            return
        stats = RunningMeanStd(shape=tuple(self.mean.shape))
        stats.mean, stats.var, stats.count = self.mean.cpu().numpy(), self.var.cpu().numpy(), float(self.count)
        stats.update(array.reshape((array.shape[0], *self.mean.shape)).astype(np.float64))
        self.mean.copy_(th.as_tensor(stats.mean))
        self.var.copy_(th.as_tensor(stats.var))
        self.count.fill_(stats.count)
        self._affine = None

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mean.shape)}, clip={self.clip}, epsilon={self.epsilon}"


def apply_affine(x: th.Tensor, mean: th.Tensor, inv_std: th.Tensor, clip: float) -> th.Tensor:
    """``clamp((x - mean) / std, -clip, clip)``: the normalisation itself, for frozen statistics too."""
    return th.clamp((x - mean) * inv_std, -clip, clip)


class RewardScaler:
    """``VecNormalize``'s reward scaling: divide rewards by the running std of the discounted return.

    Only what the critic and the advantages see is scaled; episode returns in the logs stay raw.

    :param n_envs: env copies (one discounted return each)
    :param gamma: the discount of the return whose std scales the rewards
    :param clip: bound of the scaled rewards (``VecNormalize``'s ``clip_reward``)
    :param epsilon: added to the variance
    """

    def __init__(self, n_envs: int, gamma: float, clip: float = 10.0, epsilon: float = 1e-8) -> None:
        self.stats = RunningMeanStd(shape=())
        self.returns = np.zeros(n_envs, dtype=np.float64)
        self.gamma = gamma
        self.clip = clip
        self.epsilon = epsilon

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """Scale one step's rewards ``(n_envs,)``, updating the statistics first (as ``VecNormalize``)."""
        if self.returns.shape != rewards.shape:  # the number of env copies changed (a new env was set)
            self.returns = np.zeros(rewards.shape, dtype=np.float64)
        self.returns = self.returns * self.gamma + rewards
        self.stats.update(self.returns)
        self.returns[dones] = 0.0
        scaled = rewards / np.sqrt(self.stats.var + self.epsilon)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)
