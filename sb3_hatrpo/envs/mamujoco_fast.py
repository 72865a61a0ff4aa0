"""Multi-Agent MuJoCo with precomputed observation and action index maps.

``gymnasium_robotics``' ``MultiAgentMujocoEnv`` rebuilds every agent's observation each step by walking
its joint graph in Python (``obsk.build_obs``: a loop over depths, nodes and categories) and maps the
agents' actions to the robot's one by one with NaN checks. On HalfCheetah 2x3 that is about half of the
env's step time, more than the physics. The graph never changes, so :class:`FastMultiAgentMujocoEnv`
walks it once, at construction, and keeps for each agent a list of *pieces*: index arrays into the
concatenated raw MuJoCo arrays (``qpos``, ``qvel``, ...), and the few entries that are computed by a
node's own function (``extra_obs``, ``body_fn``: clips, empty placeholders), called as
``build_obs`` calls them. The values, their order and their dtype are those of ``build_obs``; the
first observation of every env is also built the slow way and compared (a mismatch, e.g. from a
future gymnasium-robotics change, switches the env back to the original code with a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi import MultiAgentMujocoEnv

# MuJoCo arrays build_obs reads per joint (by qpos/qvel ids) or per body (cvel, cinert, cfrc_ext rows)
JOINT_CATEGORIES = {"qpos": "qpos_ids", "qvel": "qvel_ids", "qfrc_actuator": "qvel_ids"}
BODY_CATEGORIES = ("cvel", "cinert", "cfrc_ext")

# A piece of an observation: indices into the flat source vector, or a function of the MuJoCo data
Piece = np.ndarray | Callable[[Any], np.ndarray]


class _ObservationPlan:
    """Every agent's observation as pieces of one flat vector of the MuJoCo arrays it needs."""

    def __init__(
        self,
        data: Any,
        k_dicts: list[dict[int, list[Any]]],
        local_categories: list[list[str]],
        global_nodes: list[Any],
        global_categories: tuple[str, ...],
    ) -> None:
        self.categories: list[str] = []  # the MuJoCo arrays concatenated into the flat source, in order
        self._offsets: dict[str, int] = {}
        self._data = data
        self.pieces = [
            _merge(self._agent_pieces(k_dict, local_categories, global_nodes, global_categories)) for k_dict in k_dicts
        ]

    def _index(self, category: str, local: Any) -> np.ndarray:
        """Flat-source indices of ``getattr(data, category)[local]`` (negative ids count from the end)."""
        if local is None:
            raise TypeError(f"a node without {category} ids")  # build_obs would read the whole array
        array = np.asarray(getattr(self._data, category))
        if category not in self._offsets:
            self._offsets[category] = sum(np.asarray(getattr(self._data, c)).size for c in self.categories)
            self.categories.append(category)
        positions = np.arange(array.size).reshape(array.shape)[local]
        return self._offsets[category] + np.ravel(positions)

    def _agent_pieces(
        self,
        k_dict: dict[int, list[Any]],
        local_categories: list[list[str]],
        global_nodes: list[Any],
        global_categories: tuple[str, ...],
    ) -> list[Piece]:
        # The walk of obsk.build_obs (live path: body_fn applied), producing indices instead of values.
        pieces: list[Piece] = []
        seen: dict[str, set[int]] = {}
        for k in sorted(k_dict):
            for node in k_dict[k]:
                for category in local_categories[k]:
                    pieces.extend(self._node_pieces(node, category, seen, in_global_part=False))
        seen = {}
        for category in global_categories:
            for node in global_nodes:
                pieces.extend(self._node_pieces(node, category, seen, in_global_part=True))
        return pieces

    def _node_pieces(self, node: Any, category: str, seen: dict[str, set[int]], in_global_part: bool) -> list[Piece]:
        if category in node.extra_obs:
            piece = _extra_obs_piece(node.extra_obs[category])
            # An entry empty now is empty always: the observation space's size was fixed from these functions
            return [piece] if piece(self._data).size else []
        if category in JOINT_CATEGORIES:
            return [self._index(category, getattr(node, JOINT_CATEGORIES[category]))]
        if category not in BODY_CATEGORIES and not in_global_part:
            return []  # build_obs skips other categories in the local part; the global part reads bodies
        pieces: list[Piece] = []
        for body in node.bodies:
            if body in seen.setdefault(category, set()):
                continue
            seen[category].add(body)
            if node.body_fn is None:
                pieces.append(self._index(category, body))
            else:
                pieces.append(_body_fn_piece(node.body_fn, category, body))
        return pieces

    def source(self, data: Any) -> np.ndarray:
        """The flat vector the index pieces point into."""
        return np.concatenate([np.ravel(getattr(data, c)) for c in self.categories]) if self.categories else np.zeros(0)

    def observation(self, agent_id: int, data: Any, source: np.ndarray) -> np.ndarray:
        parts = [source[p] if isinstance(p, np.ndarray) else p(data) for p in self.pieces[agent_id]]
        return np.concatenate(parts) if len(parts) != 1 else parts[0]


def _extra_obs_piece(function: Callable[[Any], Any]) -> Callable[[Any], np.ndarray]:
    return lambda data: np.ravel(np.asarray(function(data).tolist(), dtype=np.float64))


def _body_fn_piece(body_fn: Callable[[int, Any], Any], category: str, body: int) -> Callable[[Any], np.ndarray]:
    return lambda data: np.ravel(np.asarray(body_fn(body, getattr(data, category)[body].tolist()), dtype=np.float64))


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Consecutive index pieces become one (an observation of plain joints is then one fancy index)."""
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, np.ndarray) and merged and isinstance(merged[-1], np.ndarray):
            merged[-1] = np.concatenate([merged[-1], piece])
        else:
            merged.append(piece)
    return merged


class FastMultiAgentMujocoEnv(MultiAgentMujocoEnv):
    """``MultiAgentMujocoEnv`` with the same observations and actions, computed from precomputed indices.

    Takes the constructor arguments of ``gymnasium_robotics.mamujoco_v1.parallel_env``. Single-agent
    mode (``agent_obsk=None``) and any factorisation the index maps cannot express use the original code.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plan: _ObservationPlan | None = None
        self._action_index: list[tuple[np.ndarray, np.ndarray | slice]] | None = None
        self._verified = False
        if self.agent_obsk is None:
            return
        data = self.single_agent_env.unwrapped.data
        try:
            self._plan = _ObservationPlan(
                data, self.k_dicts, self.local_categories, self.mujoco_globals, self.global_categories
            )
        except (KeyError, IndexError, TypeError, ValueError):
            self._plan = None
        self._action_index = self._build_action_index()

    def _build_action_index(self) -> list[tuple[np.ndarray, np.ndarray | slice]] | None:
        """Per agent ``(global ids, local ids)``; None unless every robot action is set exactly once."""
        size = self.single_agent_env.action_space.shape[0]
        count = np.zeros(size, dtype=int)
        index = []
        for partition in self.agent_action_partitions:
            global_ids, local_ids = [], []
            for local, part in enumerate(partition):
                ids = np.ravel(np.asarray(part.act_ids, dtype=int)) % size
                global_ids.extend(ids)
                local_ids.extend([local] * len(ids))
                np.add.at(count, ids, 1)
            local_index = np.asarray(local_ids, dtype=int)
            # the usual case, one robot action per agent action in order: no gather of the agent's action
            identity = np.array_equal(local_index, np.arange(len(partition)))
            index.append((np.asarray(global_ids, dtype=int), slice(None) if identity else local_index))
        return index if np.all(count == 1) else None  # otherwise the original's assertions explain it

    def map_local_actions_to_global_action(self, actions: dict[str, np.ndarray]) -> np.ndarray:
        if self._action_index is None:
            return super().map_local_actions_to_global_action(actions)
        global_action = np.empty(self.single_agent_env.action_space.shape[0])
        for agent, (global_ids, local_ids) in zip(self.possible_agents, self._action_index, strict=True):
            global_action[global_ids] = np.asarray(actions[agent])[local_ids]  # a slice(None) view when in order
        return global_action

    def _get_obs(self) -> dict[str, np.ndarray]:
        if self._plan is None:
            return super()._get_obs()
        data = self.single_agent_env.unwrapped.data
        source = self._plan.source(data)
        observations = {
            agent: self._plan.observation(agent_id, data, source) for agent_id, agent in enumerate(self.possible_agents)
        }
        if not self._verified:
            self._verify(observations)
        return observations

    def _verify(self, observations: dict[str, np.ndarray]) -> None:
        """Compare the first observations with the original code's; fall back to it on any difference."""
        expected = super()._get_obs()
        for agent, value in expected.items():
            fast = observations[agent]
            if fast.shape != value.shape or fast.dtype != value.dtype or not np.array_equal(fast, value):
                warnings.warn(
                    f"sb3_hatrpo's MaMuJoCo observation index map differs from gymnasium-robotics' build_obs for "
                    f"{agent}; using the original (slower) code for this env.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._plan = None
                observations.update(expected)
                break
        self._verified = True
