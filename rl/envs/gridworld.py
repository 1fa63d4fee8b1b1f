"""A small stochastic gridworld with a finite horizon and integer rewards, where risk matters (functional JAX env).

The default layout (rows top to bottom; S start, G goal, ~ slippery, X pit, # wall, . floor):

    ......
    S~~~~G
    #XXXX#

Actions 0..3 move up, right, down, left; a move into a wall or off the grid leaves the agent in place. On a
slippery cell the intended move is replaced, with probability `slip_prob`, by a move down (the slip direction):
from the middle row that is into the pit. The goal and the pit are absorbing. Rewards are integers and depend on
the cell the step starts from: -1 on floor, start and slippery cells, 0 at the goal, -pit_cost in the pit. An
episode lasts exactly `horizon` steps (terminated at t = H: time-to-go is part of the observation, so the horizon
is part of the MDP, not a truncation); it also terminates on reaching the goal, after which every reward would be 0.

With horizon 12, slip 0.05 and pit_cost 1: the short path along the slippery row takes 5 moves (return -5) but
slips with probability 1 - 0.95^4 = 0.185 (return -12: a fall costs -1 per step until the horizon); the safe path
over the top row takes 7 (return -7, deterministic). The risk-neutral policy takes the short path (mean -6.30 >
-7) and has CVaR_0.1 = -12; the CVaR_0.1-optimal policy takes the safe path, CVaR_0.1 = -7.

Observation: float32 [num_cells + 1]: the one-hot cell, then the time-to-go (H - t) / H.
`agents.distributional_dp.mdp.gridworld_mdp` builds the same MDP as an exact tabular `FiniteMDP` (tested equal).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rl.env import Box, Discrete, Environment

DEFAULT_LAYOUT = (
    "......",
    "S~~~~G",
    "#XXXX#",
)
# (d_row, d_col) of actions up, right, down, left.
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))
SLIP_ACTION = 2  # down
CELL_CODES = {".": 0, "S": 0, "~": 1, "G": 2, "X": 3}  # floor, slippery, goal, pit; '#' is a wall (no cell)


@struct.dataclass
class GridworldParams:
    slip_prob: float = 0.05
    pit_cost: int = 1
    horizon: int = 12


@struct.dataclass
class GridworldState:
    cell: jax.Array  # int32 index into the non-wall cells (row-major)
    time: jax.Array  # steps taken, 0..H


def parse_layout(layout: Sequence[str]):
    """The non-wall cells in row-major order: (coordinates [C, 2], kinds [C], start index, next_cell [C, 4]).

    next_cell[c, a] is the cell a deterministic move a reaches from c (c itself when blocked)."""
    rows = len(layout)
    if rows == 0 or len({len(r) for r in layout}) != 1:
        raise ValueError(f"a gridworld layout needs rows of equal length; got {list(layout)!r}")
    coords, kinds, start = [], [], None
    for i, row in enumerate(layout):
        for j, ch in enumerate(row):
            if ch == "#":
                continue
            if ch not in CELL_CODES:
                raise ValueError(f"layout[{i}][{j}] = {ch!r}: expected one of '.S~GX#'")
            if ch == "S":
                if start is not None:
                    raise ValueError("a gridworld layout needs exactly one start 'S'; found several")
                start = len(coords)
            coords.append((i, j))
            kinds.append(CELL_CODES[ch])
    if start is None:
        raise ValueError("a gridworld layout needs exactly one start 'S'; found none")
    if CELL_CODES["G"] not in kinds:
        raise ValueError("a gridworld layout needs at least one goal 'G'")
    index = {c: k for k, c in enumerate(coords)}
    next_cell = np.array([[index.get((i + di, j + dj), k) for di, dj in MOVES] for k, (i, j) in enumerate(coords)],
                         np.int32)
    return np.array(coords, np.int32), np.array(kinds, np.int32), start, next_cell


class Gridworld(Environment[GridworldState, GridworldParams]):
    """The stochastic gridworld above; `layout` is static (part of the environment, not of params)."""

    def __init__(self, layout: Sequence[str] = DEFAULT_LAYOUT):
        self.layout = tuple(layout)
        self.coords, self.kinds, self.start, self.next_cell = parse_layout(self.layout)

    @property
    def num_cells(self) -> int:
        return len(self.kinds)

    @property
    def default_params(self) -> GridworldParams:
        return GridworldParams()

    @property
    def name(self) -> str:
        return "StochasticGridworld"

    def reset(self, key, params: GridworldParams):
        del key
        state = GridworldState(jnp.asarray(self.start, jnp.int32), jnp.zeros((), jnp.int32))
        return self.observation(state, params), state

    def step(self, key, state: GridworldState, action, params: GridworldParams):
        kinds = jnp.asarray(self.kinds)
        kind = kinds[state.cell]
        slipped = (kind == CELL_CODES["~"]) & (jax.random.uniform(key) < params.slip_prob)
        executed = jnp.where(slipped, SLIP_ACTION, action)
        absorbing = (kind == CELL_CODES["G"]) | (kind == CELL_CODES["X"])
        cell = jnp.where(absorbing, state.cell, jnp.asarray(self.next_cell)[state.cell, executed])
        reward = jnp.where(kind == CELL_CODES["G"], 0, jnp.where(kind == CELL_CODES["X"], -params.pit_cost, -1))
        new = GridworldState(cell.astype(jnp.int32), state.time + 1)
        terminated = (new.time >= params.horizon) | (kinds[new.cell] == CELL_CODES["G"])
        return (self.observation(new, params), new, reward.astype(jnp.float32), terminated,
                {"terminated": terminated, "truncated": jnp.zeros((), bool)})

    def observation(self, state: GridworldState, params: GridworldParams) -> jax.Array:
        one_hot = jax.nn.one_hot(state.cell, self.num_cells, dtype=jnp.float32)
        to_go = (params.horizon - state.time).astype(jnp.float32) / params.horizon
        return jnp.concatenate([one_hot, to_go[None]])

    def observation_space(self, params: GridworldParams) -> Box:
        return Box(low=0.0, high=1.0, shape=(self.num_cells + 1,), dtype=jnp.float32)

    def action_space(self, params: GridworldParams) -> Discrete:
        return Discrete(4)
