"""Environment steps per second of the vmapped, auto-resetting environment under uniformly random masked moves.

One jitted `lax.scan` of `num_steps` steps over `num_envs` environments; compiled and run once before timing, so the
number is the steady-state rate (num_envs * num_steps / seconds). The policy's cost is not included here.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from agents.deceptive_paths.env import DeceptivePathEnv, EnvParams, action_mask
from rl.wrappers import AutoReset


def random_masked_action(key, obs):
    """A move drawn uniformly among the unmasked ones (every free cell has at least one, since S, G are linked)."""
    mask = action_mask(obs)
    return jax.random.categorical(key, jnp.where(mask, 0.0, -jnp.inf))


def make_random_rollout(env: DeceptivePathEnv, num_envs: int, num_steps: int):
    """jitted (key, params) -> (total reward, number of finished episodes) of a random masked rollout."""
    wrapped = AutoReset(env)

    def run(key, params: EnvParams):
        key_reset, key_run = jax.random.split(key)
        obs, state = jax.vmap(wrapped.reset, in_axes=(0, None))(jax.random.split(key_reset, num_envs), params)

        def one_step(carry, key_step):
            obs, state = carry
            key_act, key_env = jax.random.split(key_step)
            actions = jax.vmap(random_masked_action)(jax.random.split(key_act, num_envs), obs)
            obs, state, reward, done, _ = jax.vmap(wrapped.step, in_axes=(0, 0, 0, None))(
                jax.random.split(key_env, num_envs), state, actions, params)
            return (obs, state), (reward.sum(), done.sum())

        _, (rewards, dones) = jax.lax.scan(one_step, (obs, state), jax.random.split(key_run, num_steps))
        return rewards.sum(), dones.sum()

    return jax.jit(run)


def steps_per_second(env: DeceptivePathEnv, params: EnvParams, num_envs: int = 256, num_steps: int = 256,
                     seed: int = 0, repeats: int = 3) -> dict:
    """{"steps_per_second", "seconds", "episodes"}: the best of `repeats` timed runs after one compile run."""
    run = make_random_rollout(env, num_envs, num_steps)
    key = jax.random.PRNGKey(seed)
    jax.block_until_ready(run(key, params))
    best, episodes = float("inf"), 0
    for r in range(repeats):
        t0 = time.perf_counter()
        _, finished = jax.block_until_ready(run(jax.random.fold_in(key, r + 1), params))
        best = min(best, time.perf_counter() - t0)
        episodes = int(finished)
    return {"steps_per_second": num_envs * num_steps / best, "seconds": best, "episodes": episodes,
            "num_envs": num_envs, "num_steps": num_steps}
