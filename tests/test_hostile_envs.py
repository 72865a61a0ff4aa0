"""Hostile PettingZoo envs: each returns one kind of garbage (agent names it never declared, an empty reset,
observations of the wrong shape, type or range, a hang) and the vectorised env or the algorithm must stop with
an error naming the agent and the env copy, never train on it silently."""

import multiprocessing as mp
import time

import numpy as np
import pytest
from gymnasium import spaces
from pettingzoo import ParallelEnv

from sb3_hatrpo import HATRPO, make_vec_env
from sb3_hatrpo.vec_env import EnvOutputError, EnvTimeoutError, NonFiniteError, SubprocMultiAgentVecEnv

BOX3 = spaces.Box(-1.0, 1.0, (3,), np.float32)
TINY = dict(n_steps=16, batch_size=16, n_critic_updates=1, cg_max_steps=2, policy_kwargs=dict(net_arch=[8]))


class Hostile(ParallelEnv):
    """Two agents, ``a0`` and ``a1``; ``a1`` observes from ``space``. At step ``at`` (0 = the reset) of each
    episode it commits ``fault``; episodes last ``length`` steps. Only copies whose index is in ``faulty`` misbehave.

    :param fault: what goes wrong (see :meth:`_spoil`)
    :param value: the bad observation of ``a1``, for the faults ``"obs"``
    """

    metadata = {"name": "hostile_v0"}

    def __init__(self, fault=None, at=0, space=BOX3, value=None, length=4, copy=0, faulty=(0,)):
        self.possible_agents = ["a0", "a1"]
        self.spaces = {"a0": BOX3, "a1": space}
        self.fault = fault if copy in faulty else None
        self.at, self.value, self.length = at, value, length
        self.agents = []

    def observation_space(self, agent):
        return self.spaces[agent]

    def action_space(self, agent):
        return spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _good_obs(self):
        return {agent: self.spaces[agent].sample() for agent in self.agents}

    def _spoil(self, obs, rewards, terminations, truncations):
        fault = self.fault
        if fault == "rename":  # the env's runtime names differ from the declared ones
            self.agents = ["a0_x", "a1"]
            obs = {("a0_x" if a == "a0" else a): v for a, v in obs.items()}
        elif fault == "ghost_obs":
            obs = {**obs, "ghost": np.zeros(3, np.float32)}
        elif fault == "ghost_reward":
            rewards = {**rewards, "ghost": 1.0}
        elif fault == "ghost_termination":
            terminations = {**terminations, "ghost": False}
        elif fault == "no_agents":
            self.agents, obs = [], {}
        elif fault == "no_observations":
            obs = {}
        elif fault == "obs":
            obs = {**obs, "a1": self.value}
        elif fault == "not_a_dict":
            obs = list(obs.values())
        elif fault == "inf_reward":
            rewards = {a: float("inf") for a in rewards}
        elif fault == "huge_reward":  # finite, but the returns overflow float32
            rewards = {a: 3e38 for a in rewards}
        elif fault == "hang":
            time.sleep(60)
        return obs, rewards, terminations, truncations

    def reset(self, seed=None, options=None):
        self.t = 0
        self.agents = list(self.possible_agents)
        obs = self._good_obs()
        if self.at == 0:
            obs, *_ = self._spoil(obs, {}, {}, {})
        return obs, {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        done = self.t >= self.length
        obs = self._good_obs()
        rewards = {a: 1.0 for a in self.agents}
        terminations = {a: done for a in self.agents}
        truncations = {a: False for a in self.agents}
        if self.t == self.at or (self.fault == "huge_reward" and self.t > self.at):
            obs, rewards, terminations, truncations = self._spoil(obs, rewards, terminations, truncations)
        infos = {a: {} for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terminations, truncations, infos


class HostileWithState(Hostile):
    """Declares a 6-value global state; at step ``at`` its ``state()`` returns one value (NumPy would broadcast it)."""

    state_space = spaces.Box(-1.0, 1.0, (6,), np.float32)

    def state(self):
        return np.zeros(1 if self.fault == "short_state" and self.t == self.at else 6, np.float32)


class HostileFactory:
    """A picklable factory: copy ``i`` of ``n`` gets ``copy=i`` (so only the ``faulty`` copies misbehave)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.count = 0

    def __call__(self):
        env = Hostile(copy=self.count, **self.kwargs)
        self.count += 1
        return env


class ForkSubproc(SubprocMultiAgentVecEnv):
    """Subprocess workers started by fork: they need not import torch again (seconds per worker on a busy
    machine). The default start method is tested by test_subprocess_workers_raise_the_same_error_naming_the_copy."""

    def __init__(self, env_fns, reward_aggregation="mean", start_method=None, **kwargs):
        super().__init__(env_fns, reward_aggregation, start_method="fork", **kwargs)


def hostile_vec_env(n_envs=1, vec_env_cls="dummy", **kwargs):
    factory = HostileFactory(**kwargs)
    if vec_env_cls == "dummy":
        return make_vec_env(factory, n_envs=n_envs)
    # Subprocess copies each unpickle their own factory: give each its own copy index
    cls = ForkSubproc if vec_env_cls == "fork" else SubprocMultiAgentVecEnv
    fns = [_IndexedFactory(i, kwargs) for i in range(n_envs)]
    return cls(fns, step_timeout=kwargs.pop("step_timeout", None))


class _IndexedFactory:
    def __init__(self, index, kwargs):
        self.index, self.kwargs = index, {k: v for k, v in kwargs.items() if k != "step_timeout"}

    def __call__(self):
        return Hostile(copy=self.index, **self.kwargs)


def run_steps(env, n=6):
    env.reset()
    for _ in range(n):
        env.step({a: np.zeros((env.num_envs, 1), np.float32) for a in env.agents})


# ------------------------------------------------------------------------ agent names and resets
@pytest.mark.parametrize("at", [0, 2], ids=["at_reset", "at_step"])
@pytest.mark.parametrize(
    ("fault", "culprit", "where"),
    [
        ("rename", "'a0_x'", "env.agents"),
        ("ghost_obs", "'ghost'", "the observation dict"),
    ],
)
def test_agent_names_outside_possible_agents_are_named(fault, culprit, where, at):
    env = hostile_vec_env(n_envs=2, fault=fault, at=at, faulty=(1,))
    with pytest.raises(EnvOutputError, match=rf"Env copy 1 returned the agent\(s\) \[{culprit}\] in {where}"):
        run_steps(env)
    env.close()


@pytest.mark.parametrize(
    ("fault", "where"), [("ghost_reward", "the rewards"), ("ghost_termination", "the terminations")]
)
def test_unknown_agents_in_rewards_and_terminations_are_named(fault, where):
    env = hostile_vec_env(fault=fault, at=2)
    with pytest.raises(EnvOutputError, match=rf"\['ghost'\] in {where} at step 2 .*possible_agents are \['a0', 'a1'\]"):
        run_steps(env)


@pytest.mark.parametrize("fault", ["no_agents", "no_observations"])
@pytest.mark.parametrize("n_envs", [1, 2])
def test_a_reset_without_agents_is_an_error_not_endless_empty_episodes(fault, n_envs):
    env = hostile_vec_env(n_envs=n_envs, fault=fault, at=0, faulty=(n_envs - 1,))
    with pytest.raises(EnvOutputError, match=rf"Env copy {n_envs - 1}: reset\(\) returned no agents"):
        env.reset()


def test_observations_that_are_not_a_dict_are_named():
    env = hostile_vec_env(fault="not_a_dict", at=0)
    with pytest.raises(EnvOutputError, match="Env copy 0 returned observations of type list"):
        env.reset()


# ------------------------------------------------------------------------------- observations
UINT8 = spaces.Box(0, 255, (2, 2), np.uint8)


@pytest.mark.parametrize(
    ("space", "value", "problem"),
    [
        (BOX3, np.zeros(1, np.float32), r"shape \(1,\); its observation space needs shape \(3,\)"),
        (BOX3, np.zeros((3, 1), np.float32), r"shape \(3, 1\)"),
        (BOX3, np.zeros(4), r"shape \(4,\)"),
        (BOX3, 0.5, r"shape \(\)"),
        (BOX3, [0.1, 0.2], r"shape \(2,\)"),
        (BOX3, None, "None instead of an observation"),
        (BOX3, "abc", "not numbers"),
        (BOX3, [[1.0], [1.0, 2.0]], "not an array"),
        (UINT8, np.full((2, 2), 300.0), r"outside the range \[0, 255\] of uint8"),
        (UINT8, np.full((2, 2), -1), r"outside the range \[0, 255\] of uint8"),
        (UINT8, np.full((2, 2), 1.5), "non-integer values"),
        (UINT8, np.zeros((4,), np.uint8), r"shape \(4,\)"),
        (spaces.Discrete(4), 7, r"the value 7, outside Discrete\(4\)"),
        (spaces.Discrete(4), -1, "outside Discrete"),
        (spaces.Discrete(4, start=1), 0, "outside Discrete"),
        (spaces.Discrete(4), 2.5, "non-integer"),
        (spaces.Discrete(4), [1, 2], r"shape \(2,\); Discrete\(4\) needs a scalar"),
        (spaces.MultiDiscrete([3, 3]), [0, 5], "outside MultiDiscrete"),
        (spaces.MultiDiscrete([3, 3]), [0, 1, 2], r"shape \(3,\)"),
        (spaces.MultiBinary(3), [0, 2, 1], "outside MultiBinary"),
    ],
    ids=lambda x: repr(x)[:30],
)
@pytest.mark.parametrize("at", [0, 3], ids=["at_reset", "at_step"])
def test_observations_must_match_their_space_exactly(space, value, problem, at):
    env = hostile_vec_env(n_envs=2, fault="obs", at=at, space=space, value=value, faulty=(1,))
    with pytest.raises(EnvOutputError, match=rf"Agent 'a1' in env copy 1 returned .*{problem}") as error:
        run_steps(env)
    assert f"declared observation space {space}" in str(error.value)


@pytest.mark.parametrize(
    ("space", "value", "problem"),
    [
        (BOX3, np.zeros(1, np.float32), r"shape \(1,\)"),  # was broadcast into the terminal observation
        (BOX3, None, None),  # None at the end: the agent left, nothing to check
        (UINT8, np.full((2, 2), 300.0), r"outside the range \[0, 255\] of uint8"),
        (spaces.Discrete(4), 9, r"outside Discrete\(4\)"),
    ],
    ids=["short", "none", "uint8", "discrete"],
)
def test_the_last_observation_of_an_episode_is_checked_too(space, value, problem):
    env = hostile_vec_env(n_envs=2, fault="obs", at=4, length=4, space=space, value=value, faulty=(1,))
    if problem is None:
        run_steps(env)
        return
    with pytest.raises(EnvOutputError, match=rf"Agent 'a1' in env copy 1 returned .*{problem}.* last observation"):
        run_steps(env)


@pytest.mark.parametrize(
    ("space", "value"),
    [
        (BOX3, np.zeros(3)),  # float64 into a float32 Box: fine
        (BOX3, [0.1, 0.2, 0.3]),  # a list of the right length
        (BOX3, np.zeros(3, np.int32)),
        (UINT8, np.full((2, 2), 255.0)),  # integral floats in range
        (spaces.Discrete(4), np.int64(3)),
        (spaces.MultiBinary(3), np.array([0, 1, 1], np.int8)),
    ],
)
def test_valid_observations_of_another_type_still_pass(space, value):
    env = hostile_vec_env(fault="obs", at=2, space=space, value=value)
    run_steps(env)


@pytest.mark.parametrize("at", [2, 4], ids=["mid_episode", "last_step"])
def test_a_global_state_of_the_wrong_size_is_named(at):
    env = make_vec_env(lambda: HostileWithState(fault="short_state", at=at), n_envs=1)
    with pytest.raises(EnvOutputError, match=r"Env copy 0 .*global state|Env copy 0 .*env.state\(\) returned 1 values"):
        run_steps(env)


def test_a_nan_observation_is_non_finite_and_an_inf_reward_too():
    env = hostile_vec_env(fault="obs", at=2, value=np.array([0.0, np.nan, 0.0], np.float32))
    with pytest.raises(NonFiniteError, match="agent 'a1' in env copy 0"):
        run_steps(env)
    env = hostile_vec_env(fault="inf_reward", at=2)
    with pytest.raises(NonFiniteError, match=r"Non-finite reward .*agent 'a0'"):
        run_steps(env)


# --------------------------------------------------------------------------------- subprocesses
def test_subprocess_workers_raise_the_same_error_naming_the_copy():
    env = hostile_vec_env(n_envs=2, vec_env_cls="subproc", fault="rename", at=2, faulty=(1,))
    try:
        with pytest.raises(EnvOutputError, match=r"Env copy 1 returned the agent\(s\) \['a0_x'\]"):
            run_steps(env)
    finally:
        env.close()


def test_step_timeout_names_the_hung_worker_and_nothing_hangs():
    env = hostile_vec_env(n_envs=2, vec_env_cls="fork", fault="hang", at=2, faulty=(1,), step_timeout=1.0)
    start = time.monotonic()
    try:
        with pytest.raises(EnvTimeoutError, match=r"Env worker 1 \(pid \d+\) did not answer .* step_timeout=1.0 s"):
            run_steps(env)
        assert not env.processes[1].is_alive()
    finally:
        env.close()
    assert time.monotonic() - start < 15


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        (dict(step_timeout=1.0), "needs vec_env_cls='subproc'"),
        (dict(step_timeout=0, vec_env_cls="subproc"), "positive"),
    ],
)
def test_bad_step_timeouts_are_named(kwargs, culprit):
    with pytest.raises(ValueError, match=rf"step_timeout {culprit}|step_timeout must be a {culprit}"):
        make_vec_env(HostileFactory(), **kwargs)


# -------------------------------------------------------------------------------- through learn()
@pytest.mark.parametrize(
    ("fault", "at", "message"),
    [
        ("rename", 0, r"\['a0_x'\] in env.agents"),
        ("no_agents", 0, "reset\\(\\) returned no agents"),
        ("obs", 2, r"Agent 'a1' in env copy 0 returned an observation of shape \(1,\)"),
    ],
)
def test_learn_stops_instead_of_training_on_garbage(fault, at, message):
    model = HATRPO("MlpPolicy", HostileFactory(fault=fault, at=at, value=np.zeros(1, np.float32)), **TINY)
    with pytest.raises(EnvOutputError, match=message):
        model.learn(64)
    assert model.env.closed  # the model made this env: closed on failure


@pytest.mark.parametrize("normalize_value", [True, False])
def test_the_huge_reward_hint_does_not_suggest_what_is_already_on(normalize_value):
    model = HATRPO("MlpPolicy", HostileFactory(fault="huge_reward", at=2), normalize_value=normalize_value, **TINY)
    with pytest.raises(FloatingPointError, match="Non-finite advantages") as error:
        model.learn(16)
    assert ("normalize_value=True" in str(error.value)) is not normalize_value


def test_failed_learns_leave_no_worker_processes_behind():
    before = {p.pid for p in mp.active_children()}
    for _ in range(3):
        model = HATRPO(
            "MlpPolicy", HostileFactory(fault="obs", at=2, value=None), n_envs=2, vec_env_cls=ForkSubproc, **TINY
        )
        with pytest.raises(EnvOutputError, match="Agent 'a1' in env copy 0 returned None"):
            model.learn(64)
    deadline = time.monotonic() + 5
    while {p.pid for p in mp.active_children()} - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {p.pid for p in mp.active_children()} - before
    with pytest.raises(ValueError, match=r"env is closed .*model\.set_env"):
        model.learn(64)


def test_a_vec_env_the_caller_passed_stays_open_after_a_failed_learn():
    env = hostile_vec_env(fault="obs", at=2, value=None)
    model = HATRPO("MlpPolicy", env, **TINY)
    with pytest.raises(EnvOutputError):
        model.learn(64)
    assert not env.closed
    env.close()


def renamed_agents_env():
    """An env id for the command lines: ``tests.test_hostile_envs:renamed_agents_env``."""
    return Hostile(fault="rename", at=2)


def test_tune_stops_on_a_broken_env_instead_of_pruning_every_trial(tmp_path, capsys):
    from sb3_hatrpo.tune import run as main

    argv = ["--env", "tests.test_hostile_envs:renamed_agents_env", "-n", "32", "--n-trials", "3", "-f", str(tmp_path),
            "--n-evaluations", "1", "--eval-episodes", "1", "--no-optim-plots", "--verbose", "0", "--seed", "0",
            "-params", "n_steps:16", "batch_size:16"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "['a0_x'] in env.agents" in err
