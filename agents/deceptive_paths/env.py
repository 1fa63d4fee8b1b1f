"""The deceptive path-planning environment: functional, jittable and vmappable (rl/env.py's protocol).

Fatemi, Suttle and Sadler, AAMAS 2024. An episode runs on one map of a padded map set (`maps.MapArrays`, stacked):
the agent starts at S, its true goal is G, the observer also knows a decoy D. At reset a map is drawn uniformly
(or given, `reset_to`) and the time budget is

    T_max ~ U{d(s, g), ..., d(s, decoy) + d(decoy, g)}     (integers, both ends included),

or, with `params.budget_fraction = f >= 0`, T_max = d(s, g) + round(f (d(s, decoy) + d(decoy, g) - d(s, g))) for
the tunability curve. Actions 0..3 move up, right, down, left; a move into a wall, the border or padding is masked
in the observation and, if taken anyway, leaves the agent in place (time still runs, so every episode ends).

Rewards of one step into node n at time t (t moves made, including this one):

    +goal_reward (1) on reaching G;  timeout_penalty (-0.5) when t reaches T_max away from G;
    + deceptiveness * bonus(n, t), zero if n was already visited (staying in place counts as a revisit).

`deceptiveness` is the curriculum coefficient (the running goal-reach rate), passed in through the params. The bonus
(static, `bonus=`):
    exaggeration  -(P(g | path) - P(decoy | path)) 0.95^t, P from the value-difference observer
                  P(g) proportional to exp(V_g(s_t) - V_g(s_0)), V_g = 0.99^d(., g) - c (1 - 0.99^d) / 0.01, the
                  value under a cost c = `params.value_step_cost` per move (`observer.value_posterior`; 0.05 by
                  default, as in the authors' code; c = 0 is the paper's V_g = 0.99^d);
    ambiguity     (d_gd - |d(n, g) - d(n, decoy)|) / d_gd 0.95^t, d_gd = d(g, decoy) (`observer.ambiguity_score`);
    none          0.
An episode ends (terminated: remaining time is observed, so the state is terminal, not truncated) at G or when
t = T_max.

The decoy can move once: with `params.decoy_move_step = m >= 1`, after the m-th move the decoy is the map's
`moved_decoy` (distances precomputed in `MapArrays`), for the observation and the bonus from then on.

Observation: the ego-graph of radius k (static `ego_radius`) around the agent, the cells within k moves, in a fixed
padded layout of M = 2k^2 + 2k + 1 slots (the diamond |dr| + |dc| <= k; a cell outside it cannot be within k moves).
Slot 0 is the agent, slots 1..4 its neighbours up, right, down, left (so the action mask is the validity of slots
1..4), then the rest by distance. Per slot, float [M, 9]:

    [visited, d(., goal), d(., decoy), remaining time T_max - t, valid, adj_0, adj_1, adj_2, adj_3]

where adj_a is the slot of the ego neighbour one move in direction a (-1 if absent or outside the ego-graph); invalid
slots hold zero features and no edges. `split_observation` returns the parts. The raw distances and time are not
scaled here; a network chooses its own normalisation.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from agents.deceptive_paths import observer
from agents.deceptive_paths.maps import MOVES, GridMap, MapArrays, load_map_set, stack_maps
from rl.env import Box, Discrete, Environment

BONUSES = ("exaggeration", "ambiguity", "none")
NUM_FEATURES = 4
OBS_COLUMNS = NUM_FEATURES + 1 + 4


@struct.dataclass
class EnvParams:
    """maps: a stacked `MapArrays` set; the rest are scalars (traced, so one jitted step serves every setting)."""

    maps: MapArrays
    deceptiveness: jax.Array = 1.0
    budget_fraction: jax.Array = -1.0
    decoy_move_step: jax.Array = -1
    goal_reward: jax.Array = 1.0
    timeout_penalty: jax.Array = -0.5
    bonus_discount: jax.Array = 0.95
    value_discount: jax.Array = 0.99
    value_step_cost: jax.Array = 0.05  # the authors' code; 0 is the paper's V_g = 0.99^d


@struct.dataclass
class EnvState:
    map_index: jax.Array
    position: jax.Array
    visited: jax.Array  # bool [N]
    time: jax.Array
    t_max: jax.Array
    decoy_moved: jax.Array


class ObservationParts(NamedTuple):
    features: jax.Array  # float [..., M, 4]: visited, d(goal), d(decoy), remaining time
    valid: jax.Array  # bool [..., M]
    adjacency: jax.Array  # int32 [..., M, 4]: ego slot of each neighbour, -1 if none
    action_mask: jax.Array  # bool [..., 4]


def make_params(maps: MapArrays | Sequence[GridMap], **kwargs) -> EnvParams:
    """EnvParams over a stacked map set (or a list of maps, stacked and padded to the largest)."""
    if not isinstance(maps, MapArrays):
        maps = stack_maps(list(maps))
    maps = jax.tree_util.tree_map(jnp.asarray, maps)
    floats = {k: jnp.float32(v) for k, v in kwargs.items() if k != "decoy_move_step"}
    ints = {"decoy_move_step": jnp.int32(kwargs["decoy_move_step"])} if "decoy_move_step" in kwargs else {}
    base = EnvParams(maps=maps)
    defaults = {"deceptiveness": jnp.float32(base.deceptiveness), "budget_fraction": jnp.float32(base.budget_fraction),
                "decoy_move_step": jnp.int32(base.decoy_move_step), "goal_reward": jnp.float32(base.goal_reward),
                "timeout_penalty": jnp.float32(base.timeout_penalty),
                "bonus_discount": jnp.float32(base.bonus_discount), "value_discount": jnp.float32(base.value_discount),
                "value_step_cost": jnp.float32(base.value_step_cost)}
    return EnvParams(maps=maps, **{**defaults, **floats, **ints})


@functools.lru_cache(maxsize=None)
def ego_layout(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int [M, 2], local adjacency int [M, 4]) of the radius-k diamond; slot 0 is (0, 0), slots 1..4 the
    moves in action order, then the other offsets by Manhattan distance, row, column."""
    if radius < 1:
        raise ValueError(f"ego_radius must be >= 1; got {radius}")
    rest = sorted(((dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)
                   if 2 <= abs(dr) + abs(dc) <= radius), key=lambda o: (abs(o[0]) + abs(o[1]), o))
    offsets = [(0, 0), *MOVES, *rest]
    slot = {o: i for i, o in enumerate(offsets)}
    adjacency = np.array([[slot.get((dr + mr, dc + mc), -1) for mr, mc in MOVES] for dr, dc in offsets], np.int32)
    return np.array(offsets, np.int32), adjacency


def split_observation(obs) -> ObservationParts:
    features = obs[..., :NUM_FEATURES]
    valid = obs[..., NUM_FEATURES] > 0.5
    adjacency = obs[..., NUM_FEATURES + 1:].astype(jnp.int32)
    return ObservationParts(features, valid, adjacency, valid[..., 1:5])


def action_mask(obs):
    """bool [..., 4]: which moves lead to a free cell."""
    return split_observation(obs).action_mask


class DeceptivePathEnv(Environment):
    """See the module docstring. `ego_radius` and `bonus` are static (they fix shapes and the traced program)."""

    def __init__(self, ego_radius: int = 2, bonus: str = "exaggeration"):
        if bonus not in BONUSES:
            raise ValueError(f"bonus must be one of {BONUSES}; got {bonus!r}")
        self.ego_radius = int(ego_radius)
        self.bonus = bonus
        self.offsets, self.local_adjacency = ego_layout(self.ego_radius)

    @property
    def num_slots(self) -> int:
        return len(self.offsets)

    @property
    def default_params(self) -> EnvParams:
        return make_params(load_map_set("train_8x8") + load_map_set("train_16x16"))

    def observation_space(self, params: EnvParams) -> Box:
        return Box(-1.0, np.inf, (self.num_slots, OBS_COLUMNS), jnp.float32)

    def action_space(self, params: EnvParams) -> Discrete:
        return Discrete(4)

    # -- episode start ------------------------------------------------------------------------------------------

    def budget_range(self, params: EnvParams, map_index):
        """(d(s, g), d(s, decoy) + d(decoy, g)) of map `map_index`: the range T_max is drawn from."""
        m = params.maps
        start, goal = m.start[map_index], m.goal[map_index]
        low = m.dist_goal[map_index, start]
        high = m.dist_decoy[map_index, start] + m.dist_decoy[map_index, goal]
        return low, high

    def initial_state(self, params: EnvParams, map_index, t_max) -> EnvState:
        num_cells = params.maps.free.shape[-1]
        start = params.maps.start[map_index]
        return EnvState(map_index=jnp.int32(map_index), position=start,
                        visited=jnp.zeros(num_cells, bool).at[start].set(True), time=jnp.int32(0),
                        t_max=jnp.int32(t_max), decoy_moved=jnp.bool_(False))

    def reset_to(self, key, params: EnvParams, map_index):
        low, high = self.budget_range(params, map_index)
        drawn = jax.random.randint(key, (), low, high + 1)
        fixed = low + jnp.round(params.budget_fraction * (high - low)).astype(jnp.int32)
        t_max = jnp.where(params.budget_fraction < 0, drawn, fixed)
        state = self.initial_state(params, map_index, t_max)
        return self.observe(state, params), state

    def reset(self, key, params: EnvParams):
        key_map, key_budget = jax.random.split(key)
        map_index = jax.random.randint(key_map, (), 0, params.maps.start.shape[0])
        return self.reset_to(key_budget, params, map_index)

    # -- dynamics -----------------------------------------------------------------------------------------------

    def decoy_distances(self, state: EnvState, params: EnvParams, cells):
        m = params.maps
        return jnp.where(state.decoy_moved, m.dist_moved_decoy[state.map_index, cells],
                         m.dist_decoy[state.map_index, cells])

    def step(self, key, state: EnvState, action, params: EnvParams):
        m, i = params.maps, state.map_index
        target = m.neighbours[i, state.position, action]
        position = jnp.where(target >= 0, target, state.position)
        revisit = state.visited[position]
        time = state.time + 1
        moves_now = (params.decoy_move_step >= 1) & (time == params.decoy_move_step)
        state = state.replace(position=position, visited=state.visited.at[position].set(True), time=time,
                              decoy_moved=state.decoy_moved | moves_now)
        at_goal = position == m.goal[i]
        timeout = (time >= state.t_max) & ~at_goal
        bonus = jnp.where(revisit, 0.0, self.deception_bonus(state, params))
        reward = (params.goal_reward * at_goal + params.timeout_penalty * timeout
                  + params.deceptiveness * bonus).astype(jnp.float32)
        done = at_goal | timeout
        info = {"terminated": done, "truncated": jnp.bool_(False), "reached_goal": at_goal, "timeout": timeout,
                "bonus": bonus, "revisit": revisit}
        return self.observe(state, params), state, reward, done, info

    def deception_bonus(self, state: EnvState, params: EnvParams):
        """The bonus of standing at `state.position` after `state.time` moves (before the revisit rule)."""
        if self.bonus == "none":
            return jnp.float32(0.0)
        m, i = params.maps, state.map_index
        here, start, goal = state.position, m.start[i], m.goal[i]
        discount = params.bonus_discount ** state.time.astype(jnp.float32)
        if self.bonus == "ambiguity":
            score = observer.ambiguity_score(m.dist_goal[i, here], self.decoy_distances(state, params, here),
                                             self.decoy_distances(state, params, goal))
        else:
            dist_node = jnp.stack([m.dist_goal[i, here], self.decoy_distances(state, params, here)])
            dist_start = jnp.stack([m.dist_goal[i, start], self.decoy_distances(state, params, start)])
            score = observer.exaggeration_score(observer.value_posterior(dist_node, dist_start,
                                                                         params.value_discount, params.value_step_cost))
        return (score * discount).astype(jnp.float32)

    # -- observation --------------------------------------------------------------------------------------------

    def ego_cells(self, state: EnvState, params: EnvParams):
        """int32 [M]: the grid cell in each ego slot, -1 where no cell is within `ego_radius` moves.

        Breadth-first within the diamond: a slot is filled from the slot one move back once that one is filled, so
        after k rounds exactly the cells at graph distance <= k are present (walls block, padding is a wall).
        """
        neighbours = params.maps.neighbours[state.map_index]
        back = self.local_adjacency[:, [2, 3, 0, 1]]  # the slot one move in the opposite direction
        cells = jnp.full(self.num_slots, -1, jnp.int32).at[0].set(state.position)
        for _ in range(self.ego_radius):
            parents = jnp.where(back >= 0, cells[np.maximum(back, 0)], -1)  # [M, 4]
            reached = jnp.where(parents >= 0, neighbours[jnp.maximum(parents, 0), np.arange(4)[None, :]], -1)
            cells = jnp.maximum(cells, reached.max(axis=1))
        return cells

    def observe(self, state: EnvState, params: EnvParams):
        m, i = params.maps, state.map_index
        cells = self.ego_cells(state, params)
        valid = cells >= 0
        safe = jnp.maximum(cells, 0)
        remaining = (state.t_max - state.time).astype(jnp.float32)
        features = jnp.stack([state.visited[safe].astype(jnp.float32), m.dist_goal[i, safe].astype(jnp.float32),
                              self.decoy_distances(state, params, safe).astype(jnp.float32),
                              jnp.broadcast_to(remaining, cells.shape)], axis=1)
        features = jnp.where(valid[:, None], features, 0.0)
        local = jnp.asarray(self.local_adjacency)
        linked = (local >= 0) & valid[:, None] & valid[jnp.maximum(local, 0)]
        adjacency = jnp.where(linked, local, -1).astype(jnp.float32)
        return jnp.concatenate([features, valid[:, None].astype(jnp.float32), adjacency], axis=1)
