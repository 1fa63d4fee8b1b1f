"""Classical baselines on a grid map, computed exactly with BFS distances (NumPy, outside the jitted path).

- `honest_path`: a shortest path from S to G.
- Masters and Sardina, "Deceptive Path-Planning" (IJCAI 2017), with the decoy D as the bogus goal g_b and G as the
  real goal g_r. A node n is truthful when costdif(s, g_r, n) < costdif(s, g_b, n) (`observer.is_truthful`); the
  last deceptive point (LDP) of a path is its last node that is not truthful. Their radius of maximum probability
  (Section 4, the formula for the optimal LDP) is

      rmp = (optc(g_b, g_r) + optc(s, g_r) - optc(s, g_b)) / 2,

  the distance from g_r within which, along a shortest path from g_b to g_r, every node is truthful; the optimal
  LDP t is the node of such a path with optc(t, g_r) = rmp (the equality of the two cost differences solved on that
  path). On a 4-connected grid the graph is bipartite, so d(b, g) + d(s, g) + d(s, b) is even and rmp is an integer;
  and every deceptive node n satisfies d(n, g_r) >= rmp (from d(n, b) >= d(b, g_r) - d(n, g_r)), so t is also the
  deceptive node closest to g_r over the whole map -- the "latest" LDP any path can have, which is what the tests
  check by brute force over all cells. Among several such nodes we take the one with the cheapest path through it
  (smallest d(s, t)), then the first in row-major order.
- `pi_d4`: the cost-optimal path through t (a shortest path S -> t, then t -> G); `pi_d1`: simulation, a shortest
  path to the decoy, then on to G.

Shortest paths are deterministic: from each node, the first move in the order up, right, down, left that gets one
step closer to the target.
"""
from __future__ import annotations

import numpy as np

from agents.deceptive_paths.maps import MOVES, GridMap, bfs_distances

Cell = tuple[int, int]


def shortest_path(grid: GridMap, source: Cell, target: Cell) -> list[Cell]:
    """Cells from `source` to `target` inclusive along a shortest 4-connected path (ties: up, right, down, left)."""
    to_target = bfs_distances(grid.walls, target)
    if to_target[source] < 0:
        raise ValueError(f"{grid.source}: no path from {source} to {target}")
    path = [source]
    h, w = grid.shape
    while path[-1] != target:
        r, c = path[-1]
        for dr, dc in MOVES:
            nr, nc = r + dr, c + dc
            if 0 <= nr < h and 0 <= nc < w and to_target[nr, nc] == to_target[r, c] - 1:
                path.append((nr, nc))
                break
    return path


def honest_path(grid: GridMap) -> list[Cell]:
    return shortest_path(grid, grid.start, grid.goal)


def radius_of_maximum_probability(d_decoy_goal: int, d_start_goal: int, d_start_decoy: int) -> float:
    """Masters and Sardina (2017), Section 4: rmp = (optc(g_b, g_r) + optc(s, g_r) - optc(s, g_b)) / 2."""
    return (d_decoy_goal + d_start_goal - d_start_decoy) / 2


def last_deceptive_point(grid: GridMap) -> Cell:
    """The optimal LDP t (module docstring): on a shortest decoy-goal path, d(t, G) = rmp, cheapest d(S, t)."""
    from_goal = bfs_distances(grid.walls, grid.goal)
    from_decoy = bfs_distances(grid.walls, grid.decoy)
    from_start = bfs_distances(grid.walls, grid.start)
    d_bg = int(from_goal[grid.decoy])
    rmp = radius_of_maximum_probability(d_bg, int(from_start[grid.goal]), int(from_start[grid.decoy]))
    radius = int(np.ceil(rmp))  # an integer already on a grid; ceil keeps t deceptive on other graphs
    on_geodesic = (from_goal >= 0) & (from_decoy + from_goal == d_bg)
    candidates = np.argwhere(on_geodesic & (from_goal == radius))
    best = min(candidates.tolist(), key=lambda rc: (from_start[rc[0], rc[1]], rc[0], rc[1]))
    return int(best[0]), int(best[1])


def pi_d4(grid: GridMap) -> list[Cell]:
    """Masters and Sardina's pi_d4: cost-optimal among the paths through the LDP."""
    t = last_deceptive_point(grid)
    return shortest_path(grid, grid.start, t) + shortest_path(grid, t, grid.goal)[1:]


def pi_d1(grid: GridMap) -> list[Cell]:
    """Masters and Sardina's pi_d1 (simulation): head for the decoy, then for the goal."""
    return shortest_path(grid, grid.start, grid.decoy) + shortest_path(grid, grid.decoy, grid.goal)[1:]


BASELINES = {"honest": honest_path, "pi_d1": pi_d1, "pi_d4": pi_d4}


def evaluate_baselines(grids, observer_name: str = "cost_difference") -> dict:
    """{baseline: `metrics.mean_metrics` over `grids`}, each path measured against the budget d(s, D) + d(D, G)."""
    from agents.deceptive_paths import metrics

    return {name: metrics.mean_metrics([metrics.path_metrics(g, plan(g), metrics.max_budget(g), observer_name)
                                        for g in grids])
            for name, plan in BASELINES.items()}
