"""Checks of ``HATRPO``'s arguments and of ``learn()``'s, before anything is built.

Every rule names the argument, its valid range and the value it got, so a typo in a config or a
script fails at once with the fix in the message instead of crashing after the first rollout (or,
worse, training without ever updating). :func:`check_hyperparameters` takes keyword arguments:
an argument without a rule here passes unchecked, so a new ``HATRPO`` argument only needs a new
entry in :data:`RULES`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th

__all__ = [
    "FISHER_PRODUCTS",
    "MIN_KL",
    "RULES",
    "Rule",
    "check_device",
    "check_finite_observations",
    "check_hyperparameters",
    "check_learn_arguments",
]

# Below this a KL threshold cannot be resolved in float32: the step is so short that the surrogate's
# improvement rounds to 0, the line search rejects every step and training silently never updates.
MIN_KL = 1e-10

# How the trust region's Fisher-vector products are computed (sb3_hatrpo.trust_region): "analytic" where the
# actor supports it (diagonal Gaussian, state-independent std), else the double backward; or always the latter.
FISHER_PRODUCTS = ("analytic", "double_backward")


@dataclass(frozen=True)
class Rule:
    """The valid values of one numeric argument, or of one argument with a few named choices.

    :param kind: ``int``, ``float``, ``bool`` or ``str`` (with ``choices``)
    :param low: smallest valid value (None: unbounded)
    :param high: largest valid value (None: unbounded)
    :param low_open: ``low`` itself is invalid
    :param high_open: ``high`` itself is invalid
    :param allow_none: ``None`` is valid
    :param meaning: what the argument is, for the message
    :param choices: the valid strings (``kind=str``)
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_none: bool = False
    meaning: str = ""
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """``"an integer >= 1"``, ``"a number in (0, 1)"``, ... for the message."""
        if self.kind is bool:
            return "True or False"
        if self.kind is str:
            return (
                "one of " + ", ".join(repr(choice) for choice in self.choices) + (" or None" if self.allow_none else "")
            )
        noun = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = noun
        return text + (" or None" if self.allow_none else "")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is valid (type and range)."""
        if value is None:
            return self.allow_none
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and value in self.choices
        # bool is an int in Python; True as a KL threshold is a mistake, not 1
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        number = float(value)
        if not math.isfinite(number):
            return False
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return False
        return not (self.high is not None and (number > self.high or (self.high_open and number == self.high)))


RULES: dict[str, Rule] = {
    "learning_rate": Rule(float, 0.0, low_open=True, meaning="the critic's learning rate (or a schedule)"),
    "n_steps": Rule(int, 1, meaning="steps per env copy in each rollout"),
    "batch_size": Rule(int, 1, meaning="the critic's minibatch size"),
    "gamma": Rule(float, 0.0, 1.0, meaning="the discount factor"),
    "gae_lambda": Rule(float, 0.0, 1.0, meaning="GAE's lambda"),
    "cg_max_steps": Rule(int, 1, meaning="conjugate-gradient iterations per direction"),
    "cg_damping": Rule(float, 0.0, meaning="damping added to the Fisher matrix"),
    "krylov_rtol": Rule(float, 0.0, allow_none=True, meaning="relative residual of reused directions"),
    "fisher_product": Rule(str, choices=FISHER_PRODUCTS, meaning="how the Fisher-vector products are computed"),
    "line_search_shrinking_factor": Rule(
        float, 0.0, 1.0, low_open=True, high_open=True, meaning="the line search's step-size factor"
    ),
    "line_search_max_iter": Rule(int, 1, meaning="step sizes the line search tries"),
    "n_critic_updates": Rule(int, 1, meaning="critic epochs per rollout"),
    "normalize_advantage": Rule(bool),
    "target_kl": Rule(float, MIN_KL, meaning="the per-agent KL threshold"),
    "total_kl": Rule(float, MIN_KL, allow_none=True, meaning="the joint KL budget"),
    "normalize_value": Rule(bool),
    "line_search_accept_ratio": Rule(
        float, 0.0, 1.0, high_open=True, meaning="share of the predicted improvement a step must realise"
    ),
    "huber_delta": Rule(float, 0.0, low_open=True, meaning="the Huber loss's threshold"),
    "clip_range_vf": Rule(float, 0.0, low_open=True, allow_none=True, meaning="the critic's value clipping"),
    "max_grad_norm": Rule(float, 0.0, low_open=True, allow_none=True, meaning="the critic's gradient-norm clip"),
    "bootstrap_truncation": Rule(bool),
    "normalize_observation": Rule(bool),
    "clip_observation": Rule(float, 0.0, low_open=True, meaning="bound of the normalised observations"),
    "normalize_reward": Rule(bool),
    "n_envs": Rule(int, 1, meaning="env copies"),
    "stats_window_size": Rule(int, 1, meaning="episodes averaged for rollout/ep_rew_mean"),
    "verbose": Rule(int, 0, 2, meaning="0, 1 or 2"),
    "seed": Rule(int, 0, 2**32 - 1, allow_none=True, meaning="the random seed"),
    # learn()
    "total_timesteps": Rule(int, 1, meaning="env steps to train for, all copies together"),
    "log_interval": Rule(int, 1, allow_none=True, meaning="iterations between logger dumps"),
    "reset_num_timesteps": Rule(bool),
    "progress_bar": Rule(bool),
}


def _fail(owner: str, name: str, rule: Rule, value: Any) -> ValueError:
    meaning = f" ({rule.meaning})" if rule.meaning else ""
    return ValueError(f"{owner}: {name} must be {rule.describe()}{meaning}, got {value!r}")


def check_device(device: Any, owner: str = "HATRPO") -> None:
    """``ValueError`` naming ``device`` unless torch understands it (``"auto"``, ``"cpu"``, ``"cuda:0"``, ...).

    :param device: a ``torch.device`` or its name
    :param owner: who takes the argument, for the message
    """
    if isinstance(device, th.device) or device == "auto":
        return
    try:
        th.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"{owner}: device must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or another torch device, "
            f"got {device!r} ({str(error).splitlines()[0]})"
        ) from None


def check_hyperparameters(owner: str = "HATRPO", **arguments: Any) -> None:
    """Check every argument that has a rule in :data:`RULES`; ``ValueError`` naming the first bad one.

    ``learning_rate`` may also be a schedule (a callable); ``device`` must be a torch device.

    :param owner: who takes the arguments, for the message (``"HATRPO"``, ``"HATRPO.learn"``)
    :param arguments: the arguments by name; those without a rule are not checked
    :raises ValueError: ``"HATRPO: gamma must be a finite number in [0, 1] (the discount factor), got 1.5"``
    """
    for name, value in arguments.items():
        if name == "device":
            check_device(value, owner)
            continue
        rule = RULES.get(name)
        if rule is None or (name == "learning_rate" and callable(value)):
            continue
        if not rule.accepts(value):
            raise _fail(owner, name, rule, value)


def check_learn_arguments(
    total_timesteps: Any,
    log_interval: Any = 1,
    reset_num_timesteps: Any = True,
    progress_bar: Any = False,
    tb_log_name: Any = "HATRPO",
) -> None:
    """The checks of ``HATRPO.learn``'s arguments (``learn("100")`` or ``log_interval=0`` fail here, named).

    :param total_timesteps: env steps to train for
    :param log_interval: iterations between logger dumps
    :param reset_num_timesteps: start counting timesteps from 0
    :param progress_bar: show a progress bar
    :param tb_log_name: the TensorBoard run name
    """
    if not isinstance(tb_log_name, str):
        raise ValueError(f"HATRPO.learn: tb_log_name must be a string, got {tb_log_name!r}")
    check_hyperparameters(
        "HATRPO.learn",
        total_timesteps=total_timesteps,
        log_interval=log_interval,
        reset_num_timesteps=reset_num_timesteps,
        progress_bar=progress_bar,
    )


def check_finite_observations(observation: Any) -> None:
    """``ValueError`` naming the agent whose observation in ``{agent: obs}`` holds a NaN or an infinity.

    Non-numeric or non-dict input is left to the policy, which explains what it expects.

    :param observation: ``{agent: obs}`` as given to ``predict``
    """
    if not isinstance(observation, dict):
        return
    for agent, value in observation.items():
        array = np.asarray(value)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(
                f"predict(): the observation of agent {agent!r} is not finite ({array.ravel()[:8]}...): the env "
                "produced a NaN or an infinity; check it (or the wrapper that built this observation) first"
            )
