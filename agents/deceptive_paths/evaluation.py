"""Evaluating a trained policy next to the classical baselines, with the same observer and metrics.

`policy_paths` runs the policy (greedy by default) for one episode on every map of a padded set at a fixed budget
fraction, optionally with the decoy moving after `decoy_move_step` moves, in one jitted, vmapped scan; it returns
the visited cells. `compare_methods` measures those paths, the honest shortest path and Masters and Sardina's pi_d4
(`baselines`) with `metrics.path_metrics` against the same budget

    T_max = d(s, g) + round(f (d(s, decoy) + d(decoy, g) - d(s, g)))        (`env.DeceptivePathEnv.reset_to`),

so the three rows of a table differ only in the path. `posterior_along` is the observer's P(true goal | path) after
every step (for the plots).
"""
from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from agents.deceptive_paths import baselines, metrics, observer
from agents.deceptive_paths.env import DeceptivePathEnv, EnvParams, make_params
from agents.deceptive_paths.maps import GridMap, bfs_distances, choose_moved_decoy, stack_maps
from rl.wrappers import AutoReset


def budget(grid: GridMap, fraction: float) -> int:
    """The env's fixed-fraction budget, in plain Python (`env.DeceptivePathEnv.reset_to`)."""
    to_goal, to_decoy = bfs_distances(grid.walls, grid.goal), bfs_distances(grid.walls, grid.decoy)
    low, high = int(to_goal[grid.start]), int(to_decoy[grid.start] + to_decoy[grid.goal])
    return low + int(np.round(fraction * (high - low)))


def eval_params(grids: Sequence[GridMap], padded_shape: tuple[int, int] | None = None) -> EnvParams:
    return make_params(stack_maps(list(grids), padded_shape))


@functools.partial(jax.jit, static_argnames=("network", "ego_radius", "bonus", "max_steps", "greedy"))
def _episodes(network, ego_radius: int, bonus: str, params, env_params: EnvParams, key, max_steps: int,
              greedy: bool):
    # The environment is rebuilt from its static settings (it hashes by identity) so that every caller with the
    # same network, map shapes and length shares one compilation.
    env = DeceptivePathEnv(ego_radius, bonus)
    num_maps = env_params.maps.start.shape[0]

    def episode(map_index, key):
        key_reset, key_run = jax.random.split(key)
        obs, state = env.reset_to(key_reset, env_params, map_index)

        def one_step(carry, step_key):
            obs, state, alive = carry
            logits, _ = network.apply(params, obs)
            action = jnp.argmax(logits) if greedy else jax.random.categorical(step_key, logits)
            next_obs, next_state, _, done, _ = env.step(step_key, state, action, env_params)
            state = jax.tree_util.tree_map(lambda a, b: jnp.where(alive, a, b), next_state, state)
            obs = jnp.where(alive, next_obs, obs)
            return (obs, state, alive & ~done), (state.position, alive)

        _, (positions, moved) = jax.lax.scan(one_step, (obs, state, jnp.bool_(True)),
                                                         jax.random.split(key_run, max_steps))
        return jnp.concatenate([state.position[None], positions]), moved.sum(), state.t_max

    return jax.vmap(episode)(jnp.arange(num_maps), jax.random.split(key, num_maps))


def policy_paths(network, params, env: DeceptivePathEnv, grids: Sequence[GridMap], env_params: EnvParams,
                 budget_fraction: float, decoy_move_step: int = -1, greedy: bool = True, seed: int = 0,
                 max_steps: int | None = None) -> list[list[tuple[int, int]]]:
    """One episode per map of `env_params` (built from `grids`, in order): the cells visited, start included."""
    max_steps = max_steps or max(budget(g, 1.0) for g in grids)
    run_params = env_params.replace(budget_fraction=jnp.float32(budget_fraction),
                                    decoy_move_step=jnp.int32(decoy_move_step))
    positions, lengths, t_max = jax.device_get(_episodes(network, env.ego_radius, env.bonus, params, run_params,
                                                         jax.random.key(seed), max_steps, greedy))
    width = int(np.asarray(env_params.maps.coords)[0, :, 1].max()) + 1  # of the padded grid
    paths = []
    for i, grid in enumerate(grids):
        if int(t_max[i]) != budget(grid, budget_fraction):
            raise RuntimeError(f"{grid.source}: the env's budget {int(t_max[i])} != {budget(grid, budget_fraction)}")
        cells = positions[i, :int(lengths[i]) + 1]
        paths.append([(int(c) // width, int(c) % width) for c in cells])
    return paths


def compare_methods(grids: Sequence[GridMap], policy_cells: Sequence[list] | None, budget_fraction: float,
                    observer_name: str = "cost_difference", moved_decoy: bool = False) -> dict:
    """{method: metrics.mean_metrics} for the policy's paths (if given), honest and pi_d4, at one budget fraction;
    with `moved_decoy` every path is measured against the map's moved decoy (`maps.choose_moved_decoy`)."""
    rows: dict[str, list] = {}
    methods = {"honest": baselines.honest_path, "pi_d4": baselines.pi_d4}
    for i, grid in enumerate(grids):
        decoy = choose_moved_decoy(grid) if moved_decoy else None
        paths = {name: plan(grid) for name, plan in methods.items()}
        if policy_cells is not None:
            paths = {"policy": policy_cells[i], **paths}
        for name, path in paths.items():
            rows.setdefault(name, []).append(metrics.path_metrics(grid, path, budget(grid, budget_fraction),
                                                                  observer_name, decoy))
    return {name: metrics.mean_metrics(r) for name, r in rows.items()}


def deceptive_fraction_after(grid: GridMap, path, step: int, observer_name: str, decoy=None) -> float | None:
    """The fraction of the steps after move `step` on which the observer does not favour the true goal."""
    favoured = metrics.true_goal_favoured(grid, path, observer_name, decoy)[step + 1:]
    return float(np.mean(~favoured)) if len(favoured) else None


def posterior_along(grid: GridMap, path, decoy=None, beta: float = 1.0) -> np.ndarray:
    """float [T + 1]: the cost-difference observer's P(true goal | path) at the start and after every move.

    With the prefix cost added back (Ramirez and Geffner's difference, `observer.cost_difference_posterior`'s
    `path_cost`): without it both goals' sigmoids saturate near 1 once the path has come close to them and the
    posterior reads 0.5 everywhere; which goal is most probable is the same either way."""
    decoy = grid.decoy if decoy is None else tuple(decoy)
    to_goal, to_decoy = bfs_distances(grid.walls, grid.goal), bfs_distances(grid.walls, decoy)
    rows, cols = np.asarray(path).T
    dist_node = metrics.bucketed(np.stack([to_goal[rows, cols], to_decoy[rows, cols]], axis=-1))
    dist_start = np.array([to_goal[grid.start], to_decoy[grid.start]])
    cost = np.minimum(np.arange(len(dist_node)), len(rows) - 1)
    return np.asarray(observer.cost_difference_posterior(dist_node, dist_start, beta, cost))[:len(rows), 0]


def policy_steps_per_second(network, params, env: DeceptivePathEnv, env_params: EnvParams, num_envs: int,
                            num_steps: int, seed: int = 0, repeats: int = 2) -> dict:
    """Environment steps per second of `num_envs` vmapped, auto-resetting environments acting with the policy
    (sampled), one jitted scan of `num_steps` steps; compiled and run once before timing, best of `repeats`."""
    wrapped = AutoReset(env)

    @jax.jit
    def run(key):
        key_reset, key_run = jax.random.split(key)
        obs, state = jax.vmap(wrapped.reset, in_axes=(0, None))(jax.random.split(key_reset, num_envs), env_params)

        def one_step(carry, key_step):
            obs, state = carry
            key_act, key_env = jax.random.split(key_step)
            logits, _ = network.apply(params, obs)
            actions = jax.random.categorical(key_act, logits)
            obs, state, reward, done, _ = jax.vmap(wrapped.step, in_axes=(0, 0, 0, None))(
                jax.random.split(key_env, num_envs), state, actions, env_params)
            return (obs, state), done.sum()

        _, dones = jax.lax.scan(one_step, (obs, state), jax.random.split(key_run, num_steps))
        return dones.sum()

    key = jax.random.key(seed)
    jax.block_until_ready(run(key))
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(jax.random.fold_in(key, r + 1)))
        best = min(best, time.perf_counter() - start)
    return {"steps_per_second": num_envs * num_steps / best, "seconds": best, "num_envs": num_envs,
            "num_steps": num_steps}
