"""Masters-Sardina baselines: the LDP against a brute force over every cell, pi_d4 / pi_d1 / honest paths."""
import itertools

import numpy as np
import pytest

from agents.deceptive_paths import baselines, maps, metrics

# 5x5 open grid, S bottom middle, G top left, D top right: rmp = (4 + 6 - 6) / 2 = 2, so t = (0, 2).
OPEN = "G...D\n.....\n.....\n.....\n..S..\n"


def brute_force_ldp(grid):
    """Every cell scored with plain Python: the deceptive cells (cost difference of G not strictly smallest) closest
    to G, and among them those with the cheapest path S -> cell -> G."""
    to_g, to_d, to_s = (grid.distances_from(c) for c in (grid.goal, grid.decoy, grid.start))
    d_sg, d_sd = to_s[grid.goal], to_s[grid.decoy]
    deceptive = [(r, c) for r, c in itertools.product(*map(range, grid.shape))
                 if to_s[r, c] >= 0 and not (to_g[r, c] - d_sg < to_d[r, c] - d_sd)]
    closest = min(to_g[cell] for cell in deceptive)
    at_closest = [cell for cell in deceptive if to_g[cell] == closest]
    cheapest = min(to_s[cell] for cell in at_closest)
    return closest, sorted(cell for cell in at_closest if to_s[cell] == cheapest)


def check_walk(grid, path, source, target):
    assert path[0] == source and path[-1] == target
    for (r, c), (nr, nc) in zip(path[:-1], path[1:]):
        assert abs(r - nr) + abs(c - nc) == 1 and not grid.walls[nr, nc]


def test_hand_computed_ldp_and_paths():
    grid = maps.parse_map(OPEN)
    assert baselines.radius_of_maximum_probability(4, 6, 6) == 2
    assert baselines.last_deceptive_point(grid) == (0, 2)
    assert baselines.pi_d4(grid) == [(4, 2), (3, 2), (2, 2), (1, 2), (0, 2), (0, 1), (0, 0)]
    # Shortest-path ties go up first, so the honest path happens to be pi_d4 here; pi_d1 visits D.
    assert baselines.honest_path(grid) == baselines.pi_d4(grid)
    assert baselines.pi_d1(grid) == [(4, 2), (3, 2), (2, 2), (1, 2), (0, 2), (0, 3), (0, 4), (0, 3), (0, 2),
                                     (0, 1), (0, 0)]
    # The decoy on a shortest S-G path: rmp = d(D, G), the LDP is D itself.
    on_the_way = maps.parse_map("G.D.S\n")
    assert baselines.last_deceptive_point(on_the_way) == (0, 2)


def shipped_and_random_small_maps():
    grids = maps.load_map_set("train_8x8") + maps.load_map_set("test_8x8")
    grids += [maps.random_map(seed, 6, 7, density=0.3, min_distance=2) for seed in range(20)]
    return grids


def test_ldp_matches_brute_force_over_all_cells():
    for grid in shipped_and_random_small_maps():
        t = baselines.last_deceptive_point(grid)
        closest, cells = brute_force_ldp(grid)
        to_g = grid.distances_from(grid.goal)
        assert to_g[t] == closest, grid.source
        assert t == cells[0], grid.source
        # On a bipartite grid rmp is an integer and equals the brute-force distance.
        d = {k: grid.distances_from(getattr(grid, k)) for k in ("start", "goal")}
        rmp = baselines.radius_of_maximum_probability(int(to_g[grid.decoy]), int(d["start"][grid.goal]),
                                                      int(d["start"][grid.decoy]))
        assert rmp == closest


def test_pi_d4_deceives_until_the_ldp_then_is_truthful():
    for grid in shipped_and_random_small_maps():
        t = baselines.last_deceptive_point(grid)
        path = baselines.pi_d4(grid)
        check_walk(grid, path, grid.start, grid.goal)
        d_s, d_g = grid.distances_from(grid.start), grid.distances_from(grid.goal)
        assert len(path) - 1 == d_s[t] + d_g[t]  # cost-optimal through t
        favoured = metrics.true_goal_favoured(grid, path)
        last_deceptive = max(i for i, f in enumerate(favoured) if not f)
        assert path[last_deceptive] == t, grid.source
        honest = baselines.honest_path(grid)
        check_walk(grid, honest, grid.start, grid.goal)
        assert len(honest) - 1 == d_s[grid.goal]
        d1 = baselines.pi_d1(grid)
        check_walk(grid, d1, grid.start, grid.goal)
        assert grid.decoy in d1 and len(d1) - 1 == metrics.max_budget(grid)


def test_pi_d4_is_at_least_as_deceptive_as_honest_on_the_test_maps():
    for name in ("test_8x8", "test_16x16"):
        for grid in maps.load_map_set(name):
            budget = metrics.max_budget(grid)
            honest = metrics.path_metrics(grid, baselines.honest_path(grid), budget)
            d4 = metrics.path_metrics(grid, baselines.pi_d4(grid), budget)
            assert d4.goal_reached and honest.goal_reached
            assert d4.truthful_from >= honest.truthful_from  # the LDP is the latest possible
            assert d4.length_over_budget <= 1.0
    table = baselines.evaluate_baselines(maps.load_map_set("test_8x8"))
    assert set(table) == {"honest", "pi_d1", "pi_d4"} and table["pi_d1"]["length_over_budget"] == 1.0
    assert table["pi_d4"]["deceptive_fraction"] >= table["honest"]["deceptive_fraction"]


def test_unreachable_target_is_an_error():
    grid = maps.GridMap(np.array([[False, True, False]]), (0, 0), (0, 2), (0, 0), source="cut.txt")
    with pytest.raises(ValueError, match="cut.txt: no path from \\(0, 0\\) to \\(0, 2\\)"):
        baselines.shortest_path(grid, (0, 0), (0, 2))
