"""The observers against numbers computed by hand on three tiny maps (goals on the last axis, true goal first)."""
import numpy as np
import pytest

from agents.deceptive_paths import maps, observer


def dists(grid, cell):
    """([d(n, G), d(n, D)], [d(S, G), d(S, D)]) by BFS."""
    to_g, to_d = grid.distances_from(grid.goal), grid.distances_from(grid.decoy)
    return np.array([to_g[cell], to_d[cell]]), np.array([to_g[grid.start], to_d[grid.start]])


def test_corridor_one_step_towards_the_goal():
    # D . S . G : after one move right, d(n, G) = 1, d(S, G) = 2, d(n, D) = 3, d(S, D) = 2.
    grid = maps.parse_map("D.S.G\n")
    node, start = dists(grid, (0, 3))
    np.testing.assert_array_equal(node, [1, 3])
    np.testing.assert_array_equal(start, [2, 2])
    np.testing.assert_allclose(observer.cost_difference(node, start), [-1.0, 1.0])
    # 1 / (1 + e^-1) = 0.7310586 and 1 / (1 + e^1) = 0.2689414 already sum to 1.
    np.testing.assert_allclose(observer.cost_difference_posterior(node, start), [0.7310586, 0.2689414], atol=1e-6)
    # V_G: 0.99^1 - 0.99^2 = 0.0099; V_D: 0.99^3 - 0.99^2 = -0.009801; P(G) = 1 / (1 + e^-0.019701) = 0.5049251.
    np.testing.assert_allclose(observer.value_posterior(node, start), [0.5049251, 0.4950749], atol=1e-6)
    np.testing.assert_allclose(observer.exaggeration_score(observer.value_posterior(node, start)), -0.0098502,
                               atol=1e-6)
    assert bool(observer.is_truthful(node, start))
    # Ambiguity: d_gd = 4; |1 - 3| = 2 -> (4 - 2) / 4 = 0.5; at the start |2 - 2| = 0 -> 1.
    assert float(observer.ambiguity_score(1, 3, 4)) == 0.5
    assert float(observer.ambiguity_score(2, 2, 4)) == 1.0
    # Standing still at the start: no evidence, both observers are uniform.
    np.testing.assert_allclose(observer.cost_difference_posterior(start, start), [0.5, 0.5])
    np.testing.assert_allclose(observer.value_posterior(start, start), [0.5, 0.5])


def test_prefix_cost_changes_the_numbers_not_the_ranking():
    # S . G / . # . / D . . : from S to (0, 1), d(n, G) = 1, d(n, D) = 3, d(S, G) = 2, d(S, D) = 2.
    grid = maps.parse_map("S.G\n.#.\nD..\n")
    node, start = dists(grid, (0, 1))
    np.testing.assert_array_equal(node, [1, 3])
    # With the prefix cost 1: costdif = [0, 2]; sigmoid(0) = 0.5, sigmoid(-2) = 0.1192029; P(G) = 0.5 / 0.6192029 = 0.8074897.
    with_prefix = observer.cost_difference_posterior(node, start, path_cost=1.0)
    np.testing.assert_allclose(with_prefix, [0.8074897, 0.1925103], atol=1e-6)
    assert bool(observer.favours_true_goal(with_prefix))
    assert bool(observer.favours_true_goal(observer.cost_difference_posterior(node, start)))
    # beta = 2 without the prefix: 1 / (1 + e^-2) = 0.8807971, 1 / (1 + e^2) = 0.1192029 (sum 1).
    np.testing.assert_allclose(observer.cost_difference_posterior(node, start, beta=2.0), [0.8807971, 0.1192029],
                               atol=1e-6)


def test_a_move_towards_both_goals_is_deceptive():
    # Open 3x3, S = (0, 0), G = (2, 1), D = (1, 2): moving right brings both goals one step closer.
    grid = maps.parse_map("S..\n..D\n.G.\n")
    node, start = dists(grid, (0, 1))
    np.testing.assert_array_equal(node, [2, 2])
    np.testing.assert_array_equal(start, [3, 3])
    np.testing.assert_allclose(observer.cost_difference(node, start), [-1.0, -1.0])
    assert not bool(observer.is_truthful(node, start))  # a tie is deceptive
    np.testing.assert_allclose(observer.value_posterior(node, start), [0.5, 0.5])
    assert not bool(observer.favours_true_goal(observer.value_posterior(node, start)))
    assert float(observer.exaggeration_score(observer.value_posterior(node, start))) == pytest.approx(0.0)
    # Moving down instead: d(n, G) = 2, d(n, D) = 2 as well -- the same tie; at (1, 1) G is 1 away, D is 1 away.
    node, _ = dists(grid, (1, 1))
    np.testing.assert_array_equal(node, [1, 1])
    # At (2, 0): d(n, G) = 1 (costdif -2), d(n, D) = 3 (costdif 0): truthful, P(G) = (1/(1+e^-2)) / (that + 1/2).
    node, _ = dists(grid, (2, 0))
    assert bool(observer.is_truthful(node, start))
    np.testing.assert_allclose(observer.cost_difference_posterior(node, start)[0], 0.8807971 / 1.3807971, atol=1e-6)


def test_batched_inputs_keep_their_leading_axes():
    node = np.array([[[1, 3], [2, 2]], [[0, 4], [3, 1]]])
    start = np.array([2, 2])
    assert observer.cost_difference_posterior(node, start).shape == (2, 2, 2)
    np.testing.assert_array_equal(observer.is_truthful(node, start), [[True, False], [True, False]])


def _value_iteration(grid, goal, gamma, step_cost, sweeps=200):
    """Bellman's optimality equation on the grid graph by plain value iteration: V(goal) = 1,
    V(n) = max over free neighbours n' of (-step_cost + gamma V(n'))."""
    walls = grid.walls
    value = np.full(walls.shape, -np.inf)
    value[goal] = 1.0
    for _ in range(sweeps):
        new = value.copy()
        for r, c in zip(*np.nonzero(~walls)):
            if (r, c) == goal:
                continue
            around = [value[r + dr, c + dc] for dr, dc in ((-1, 0), (0, 1), (1, 0), (0, -1))
                      if 0 <= r + dr < walls.shape[0] and 0 <= c + dc < walls.shape[1] and not walls[r + dr, c + dc]]
            new[r, c] = max(-step_cost + gamma * v for v in around)
        value = new
    return value


@pytest.mark.parametrize("gamma, step_cost", [(0.99, 0.0), (0.99, 0.05), (1.0, 0.05)])
def test_goal_value_is_the_bellman_value_of_the_grid(gamma, step_cost):
    grid = maps.parse_map("S..#....\n.#.#.##.\n.#...#..\n...#.D.G\n")
    distances = grid.distances_from(grid.goal)
    free = distances >= 0
    expected = _value_iteration(grid, grid.goal, gamma, step_cost)
    np.testing.assert_allclose(observer.goal_value(distances[free], gamma, step_cost), expected[free], rtol=1e-5,
                               atol=1e-6)


def test_a_step_cost_sharpens_the_value_observer():
    # The corridor D . S . G after one move right (first test). With c = 0.05, V(d) = 0.99^d - 5 (1 - 0.99^d)
    # = 6 0.99^d - 5, so V_G changes by 6 (0.99 - 0.99^2) = 0.0594 and V_D by 6 (0.99^3 - 0.99^2) = -0.058806:
    # P(G) = sigmoid(0.118206) = 0.5295171, against 0.5049251 without the step cost.
    node, start = dists(maps.parse_map("D.S.G\n"), (0, 3))
    np.testing.assert_allclose(observer.value_posterior(node, start, step_cost=0.05), [0.5295171, 0.4704829],
                               atol=1e-6)
    np.testing.assert_allclose(observer.value_posterior(node, start, step_cost=0.0), [0.5049251, 0.4950749], atol=1e-6)
