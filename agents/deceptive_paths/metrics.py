"""Deception metrics of a path, the same for every method (learned policy or classical baseline).

A path is the list of cells from the start, one cell a move; step t (1..T) is the path after its t-th move, and the
observer reads its last cell n_t (both observers in `observer` depend on the path only through n_t and s):

- goal_reached: the last cell is the true goal and the path fits the budget (T <= T_max);
- deceptive_fraction: the fraction of steps 1..T on which the observer does NOT strictly favour the true goal;
- truthful_from: the first step from which the true goal is strictly the most probable at every later step (the
  step after the path's last deceptive point), None if it is not favoured at the last step; truthful_from_fraction
  is truthful_from / T (Masters and Sardina's "path completion" at which deception ends);
- length_over_budget: T / T_max.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from agents.deceptive_paths import observer
from agents.deceptive_paths.maps import MOVES, GridMap, bfs_distances

OBSERVERS = ("cost_difference", "value")


@dataclasses.dataclass(frozen=True)
class PathMetrics:
    goal_reached: bool
    deceptive_fraction: float
    truthful_from: int | None
    truthful_from_fraction: float | None
    length_over_budget: float
    length: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_path(grid: GridMap, path: Sequence[tuple[int, int]]) -> None:
    """Raise ValueError unless `path` starts at S, has at least one move and moves one free cell at a time."""
    if len(path) < 2:
        raise ValueError(f"{grid.source}: a path needs at least one move; got {list(path)}")
    if tuple(path[0]) != grid.start:
        raise ValueError(f"{grid.source}: the path starts at {tuple(path[0])}, not at the start {grid.start}")
    h, w = grid.shape
    for t, (a, b) in enumerate(zip(path[:-1], path[1:]), start=1):
        (r, c), (nr, nc) = a, b
        if not (0 <= nr < h and 0 <= nc < w) or grid.walls[nr, nc] or (nr - r, nc - c) not in MOVES:
            raise ValueError(f"{grid.source}: step {t} of the path, {tuple(a)} -> {tuple(b)}, is not a move to an "
                             f"adjacent free cell")


def true_goal_favoured(grid: GridMap, path, observer_name: str = "cost_difference", decoy=None) -> np.ndarray:
    """bool [T + 1]: whether the observer strictly favours the true goal after each step (index 0: at the start).

    `decoy` overrides the map's decoy (to measure against a moved decoy)."""
    if observer_name not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}; got {observer_name!r}")
    decoy = grid.decoy if decoy is None else tuple(decoy)
    rows, cols = np.asarray(path).T
    to_goal, to_decoy = bfs_distances(grid.walls, grid.goal), bfs_distances(grid.walls, decoy)
    dist_node = bucketed(np.stack([to_goal[rows, cols], to_decoy[rows, cols]], axis=-1))
    dist_start = np.array([to_goal[grid.start], to_decoy[grid.start]])
    if observer_name == "cost_difference":
        return np.asarray(observer.is_truthful(dist_node, dist_start))[:len(rows)]
    return np.asarray(observer.favours_true_goal(observer.value_posterior(dist_node, dist_start)))[:len(rows)]


def bucketed(rows: np.ndarray, bucket: int = 64) -> np.ndarray:
    """`rows` padded (repeating its last row) to a multiple of `bucket` rows: the observer's eager JAX ops then
    compile once per bucket rather than once per path length; callers slice the result back."""
    extra = -len(rows) % bucket
    return np.concatenate([rows, np.repeat(rows[-1:], extra, axis=0)]) if extra else rows


def path_metrics(grid: GridMap, path, budget: int, observer_name: str = "cost_difference",
                 decoy=None) -> PathMetrics:
    check_path(grid, path)
    if budget < 1:
        raise ValueError(f"budget must be >= 1; got {budget}")
    favoured = true_goal_favoured(grid, path, observer_name, decoy)[1:]
    steps = len(favoured)
    truthful_from = None
    if favoured[-1]:
        deceptive_steps = np.flatnonzero(~favoured)
        truthful_from = int(deceptive_steps[-1]) + 2 if deceptive_steps.size else 1
    return PathMetrics(goal_reached=bool(tuple(path[-1]) == grid.goal and steps <= budget),
                       deceptive_fraction=float(np.mean(~favoured)), truthful_from=truthful_from,
                       truthful_from_fraction=None if truthful_from is None else truthful_from / steps,
                       length_over_budget=steps / budget, length=steps)


def max_budget(grid: GridMap) -> int:
    """d(s, decoy) + d(decoy, g): the top of the T_max range."""
    to_decoy = bfs_distances(grid.walls, grid.decoy)
    return int(to_decoy[grid.start] + to_decoy[grid.goal])


def mean_metrics(rows: Sequence[PathMetrics]) -> dict:
    """Means over paths; truthful_from_fraction over the paths where it is defined."""
    defined = [m.truthful_from_fraction for m in rows if m.truthful_from_fraction is not None]
    return {"goal_reach_rate": float(np.mean([m.goal_reached for m in rows])),
            "deceptive_fraction": float(np.mean([m.deceptive_fraction for m in rows])),
            "truthful_from_fraction": float(np.mean(defined)) if defined else None,
            "length_over_budget": float(np.mean([m.length_over_budget for m in rows])),
            "paths": len(rows)}
