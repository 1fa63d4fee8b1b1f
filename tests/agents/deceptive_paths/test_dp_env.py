"""The environment against a plain-Python reading of its rules: ego-graphs, masks, budgets, rewards, decoy move.

One parameter set (two 8x8 test maps and one 16x16, so the 8x8 ones are padded) and one jit of reset/step keep it
fast.
"""
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.deceptive_paths import maps
from agents.deceptive_paths.env import DeceptivePathEnv, ego_layout, make_params, split_observation

GRIDS = maps.load_map_set("test_8x8")[:2] + maps.load_map_set("test_16x16")[:1]
PARAMS = make_params(GRIDS)
ARRAYS = [maps.select_map(PARAMS.maps, i) for i in range(len(GRIDS))]
ENV = DeceptivePathEnv(ego_radius=2, bonus="exaggeration")
RESET_TO = jax.jit(ENV.reset_to)
STEP = jax.jit(ENV.step)


def within_k(arrays, cell, k):
    """{cell: hops} of the cells at most k moves away, by a plain BFS over the neighbour table."""
    seen, queue = {cell: 0}, collections.deque([cell])
    while queue:
        c = queue.popleft()
        if seen[c] == k:
            continue
        for n in arrays.neighbours[c]:
            if n >= 0 and int(n) not in seen:
                seen[int(n)] = seen[c] + 1
                queue.append(int(n))
    return seen


def reference_reward(arrays, position, visited, time, t_max, decoy_dists, bonus, deceptiveness, step_cost=0.0):
    """The reward rule written out in Python floats (module docstring of env.py)."""
    at_goal = position == arrays.goal
    timeout = time >= t_max and not at_goal
    reward = 1.0 * at_goal - 0.5 * timeout
    if position in visited or bonus == "none":
        return reward
    s, g = int(arrays.start), int(arrays.goal)
    d_g, d_d = float(arrays.dist_goal[position]), float(decoy_dists[position])
    if bonus == "ambiguity":
        score = (decoy_dists[g] - abs(d_g - d_d)) / decoy_dists[g]
    else:
        def value(d):  # reward -step_cost per move, +1 on arrival, discounted by 0.99: the sum written out
            return 0.99 ** d - step_cost * sum(0.99 ** k for k in range(int(d)))

        v = [value(d_g) - value(float(arrays.dist_goal[s])), value(d_d) - value(float(decoy_dists[s]))]
        p_true = math.exp(v[0]) / (math.exp(v[0]) + math.exp(v[1]))
        score = -(p_true - (1 - p_true))
    return reward + deceptiveness * score * 0.95 ** time


def test_ego_layout():
    offsets, adjacency = ego_layout(2)
    assert len(offsets) == 13 and offsets[:5].tolist() == [[0, 0], [-1, 0], [0, 1], [1, 0], [0, -1]]
    assert adjacency[0].tolist() == [1, 2, 3, 4] and adjacency[1, 2] == 0
    assert len(ego_layout(3)[0]) == 25
    with pytest.raises(ValueError, match="ego_radius must be >= 1"):
        ego_layout(0)
    with pytest.raises(ValueError, match="bonus must be one of"):
        DeceptivePathEnv(bonus="lying")


def test_ego_graph_matches_a_plain_bfs_on_random_walks():
    key = jax.random.PRNGKey(0)
    for index, arrays in enumerate(ARRAYS):
        obs, state = RESET_TO(key, PARAMS, index)
        for t in range(12):
            position = int(state.position)
            parts = split_observation(obs)
            cells = np.asarray(ENV.ego_cells(state, PARAMS))
            near = within_k(arrays, position, 2)
            assert set(cells[cells >= 0].tolist()) == set(near) and len(set(cells[cells >= 0])) == len(near)
            width = int(np.asarray(arrays.coords)[:, 1].max()) + 1
            for slot, cell in enumerate(cells):
                if cell < 0:
                    assert not parts.valid[slot] and not np.any(np.asarray(parts.features[slot]))
                    continue
                dr, dc = ENV.offsets[slot]
                assert cell == position + dr * width + dc  # the slot's offset is the cell's offset
                np.testing.assert_allclose(parts.features[slot], [
                    float(np.asarray(state.visited)[cell]), arrays.dist_goal[cell], arrays.dist_decoy[cell],
                    float(state.t_max - state.time)])
                for a in range(4):
                    linked = int(parts.adjacency[slot, a])
                    grid_next = int(arrays.neighbours[cell, a])
                    if linked >= 0:
                        assert cells[linked] == grid_next
                    else:
                        assert grid_next < 0 or grid_next not in near
            np.testing.assert_array_equal(parts.action_mask, np.asarray(arrays.neighbours[position]) >= 0)
            legal = np.flatnonzero(np.asarray(parts.action_mask))
            action = int(legal[(7 * t + index) % len(legal)])
            obs, state, *_ = STEP(key, state, action, PARAMS)


def test_budget_is_drawn_from_the_papers_range_or_set_by_a_fraction():
    arrays = ARRAYS[2]
    low = int(arrays.dist_goal[arrays.start])
    high = int(arrays.dist_decoy[arrays.start] + arrays.dist_decoy[arrays.goal])
    budgets = jax.vmap(lambda k: ENV.reset_to(k, PARAMS, 2)[1].t_max)(jax.random.split(jax.random.PRNGKey(1), 400))
    assert int(budgets.min()) == low and int(budgets.max()) == high
    for fraction in (0.0, 0.5, 1.0):
        _, state = RESET_TO(jax.random.PRNGKey(2), PARAMS.replace(budget_fraction=jnp.float32(fraction)), 2)
        assert int(state.t_max) == low + round(fraction * (high - low))
    indices = jax.vmap(lambda k: ENV.reset(k, PARAMS)[1].map_index)(jax.random.split(jax.random.PRNGKey(3), 300))
    assert set(np.asarray(indices).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("bonus, step_cost", [("exaggeration", 0.0), ("exaggeration", 0.05), ("ambiguity", 0.0),
                                              ("none", 0.0)])
def test_rewards_match_the_reference_along_random_episodes(bonus, step_cost):
    env = DeceptivePathEnv(ego_radius=1, bonus=bonus)
    reset_to, step = jax.jit(env.reset_to), jax.jit(env.step)
    params = PARAMS.replace(deceptiveness=jnp.float32(0.7), decoy_move_step=jnp.int32(3),
                            value_step_cost=jnp.float32(step_cost))
    rng = np.random.default_rng(0)
    checked_terminal = 0
    for episode in range(6):
        index = episode % len(ARRAYS)
        arrays = ARRAYS[index]
        obs, state = reset_to(jax.random.PRNGKey(episode), params, index)
        visited, done, t = {int(arrays.start)}, False, 0
        while not done:
            action = int(rng.integers(4))  # unmasked: a blocked move must leave the agent in place
            before = int(state.position)
            obs, state, reward, done, info = step(jax.random.PRNGKey(0), state, action, params)
            t += 1
            target = int(arrays.neighbours[before, action])
            assert int(state.position) == (target if target >= 0 else before)
            decoy_dists = arrays.dist_moved_decoy if t >= 3 else arrays.dist_decoy
            expected = reference_reward(arrays, int(state.position), visited, t, int(state.t_max), decoy_dists,
                                        bonus, 0.7, step_cost)
            assert float(reward) == pytest.approx(expected, abs=1e-5)
            np.testing.assert_allclose(split_observation(obs).features[0, 2], decoy_dists[int(state.position)])
            visited.add(int(state.position))
            assert bool(done) == (int(state.position) == arrays.goal or t >= int(state.t_max))
            assert bool(info["terminated"]) == bool(done) and not bool(info["truncated"])
        checked_terminal += 1
    assert checked_terminal == 6


def test_honest_path_at_the_tightest_budget_reaches_the_goal_on_the_last_step():
    from agents.deceptive_paths.baselines import honest_path
    grid, arrays = GRIDS[1], ARRAYS[1]
    params = PARAMS.replace(budget_fraction=jnp.float32(0.0), deceptiveness=jnp.float32(0.0))
    obs, state = RESET_TO(jax.random.PRNGKey(0), params, 1)
    width = int(np.asarray(arrays.coords)[:, 1].max()) + 1
    path = honest_path(grid)
    for t, ((r, c), (nr, nc)) in enumerate(zip(path[:-1], path[1:]), start=1):
        action = maps.MOVES.index((nr - r, nc - c))
        obs, state, reward, done, info = STEP(jax.random.PRNGKey(0), state, action, params)
        assert int(state.position) == nr * width + nc
        assert bool(done) == (t == len(path) - 1)
    assert float(reward) == 1.0 and bool(info["reached_goal"]) and not bool(info["timeout"])


def test_vmapped_steps_equal_single_steps():
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    obs, states = jax.vmap(ENV.reset, in_axes=(0, None))(keys, PARAMS)
    actions = jnp.array([0, 1, 2, 3])
    out = jax.vmap(ENV.step, in_axes=(0, 0, 0, None))(keys, states, actions, PARAMS)
    for i in range(4):
        single_state = jax.tree_util.tree_map(lambda x: x[i], states)
        o, s, r, d, _ = STEP(keys[i], single_state, int(actions[i]), PARAMS)
        np.testing.assert_array_equal(o, out[0][i])
        # The bonus is a difference of two close probabilities: jit and vmap may round it differently.
        assert float(r) == pytest.approx(float(out[2][i]), abs=1e-6) and bool(d) == bool(out[3][i])
    assert ENV.observation_space(PARAMS).shape == obs.shape[1:]
    assert ENV.action_space(PARAMS).n == 4


def test_random_masked_actions_never_pick_a_blocked_move():
    from agents.deceptive_paths.throughput import random_masked_action
    obs, _ = RESET_TO(jax.random.PRNGKey(0), PARAMS, 0)
    mask = np.asarray(split_observation(obs).action_mask)
    picks = jax.vmap(random_masked_action, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(1), 200), obs)
    assert set(np.asarray(picks).tolist()) == set(np.flatnonzero(mask).tolist())
