"""Rollout collection: a batch of functional environments stepped in lock-step by one lax.scan.

A policy is a pure function `policy_fn(policy_params, obs [N, ...], key) -> (action [N, ...], extras)`, where
`extras` is a dict of per-environment arrays the learner wants back (log-probabilities, values). The environment
must reset itself (wrap it in `rl.wrappers.AutoReset`, usually inside `rl.wrappers.EpisodeStats`).

The result is a time-major `Transition` ([T, N, ...] leaves). `rl.wrappers.GymnasiumDriver` produces the same
layout from gymnasium environments stepped on the host, so learners consume both alike.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from rl.env import Environment

PolicyFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict]]


@struct.dataclass
class Transition:
    """One step of N environments (or T steps, time-major, after a rollout).

    `next_obs` is the observation the step reached *before* any auto-reset (what value bootstraps need); `info`
    carries the wrappers' extras (e.g. `episode_return` / `episode_length`, valid where `done`).
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    next_obs: jax.Array
    extras: dict = struct.field(default_factory=dict)
    info: dict = struct.field(default_factory=dict)

    @property
    def done(self) -> jax.Array:
        return jnp.logical_or(self.terminated, self.truncated)


def reset_envs(env: Environment, env_params, key: jax.Array, num_envs: int):
    """Reset `num_envs` independent copies: returns (obs [N, ...], state with [N, ...] leaves)."""
    return jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs), env_params)


def step_envs(env: Environment, env_params, key: jax.Array, state, action):
    """One step of every copy, each with its own key."""
    keys = jax.random.split(key, action.shape[0])
    return jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, state, action, env_params)


def rollout(env: Environment, env_params, policy_fn: PolicyFn, policy_params, env_state, obs: jax.Array,
            key: jax.Array, num_steps: int):
    """Collect `num_steps` steps of every environment with lax.scan.

    Returns ((env_state, obs) to continue from, Transition with [num_steps, N, ...] leaves).
    """

    def one_step(carry, step_key):
        state, current_obs = carry
        key_policy, key_env = jax.random.split(step_key)
        action, extras = policy_fn(policy_params, current_obs, key_policy)
        next_obs, state, reward, _, info = step_envs(env, env_params, key_env, state, action)
        info = dict(info)
        terminated, truncated = info.pop("terminated"), info.pop("truncated")
        final_obs = info.pop("final_observation", next_obs)
        transition = Transition(obs=current_obs, action=action, reward=reward.astype(jnp.float32),
                                terminated=terminated, truncated=truncated, next_obs=final_obs, extras=extras,
                                info=info)
        return (state, next_obs), transition

    (env_state, obs), transitions = jax.lax.scan(one_step, (env_state, obs), jax.random.split(key, num_steps))
    return (env_state, obs), transitions


def completed_episode_stats(transitions: Transition) -> dict[str, jax.Array]:
    """Mean return and length of the episodes that ended in a rollout (needs `rl.wrappers.EpisodeStats`), and how
    many ended; the means are NaN when none did."""
    done = transitions.done.astype(jnp.float32)
    count = done.sum()
    mean = lambda x: jnp.where(count > 0, (x * done).sum() / jnp.maximum(count, 1.0), jnp.nan)  # noqa: E731
    return {"episode_return": mean(transitions.info["episode_return"]),
            "episode_length": mean(transitions.info["episode_length"].astype(jnp.float32)),
            "episodes": count}


def evaluate_episodes(env: Environment, env_params, policy_fn: PolicyFn, policy_params, key: jax.Array,
                      num_episodes: int, max_steps: int) -> dict[str, jax.Array]:
    """Run `num_episodes` independent episodes (one per environment copy, no auto-reset) for at most `max_steps`
    steps; returns per-episode `return`, `length` and `finished` (False when the episode outlasted max_steps)."""
    key_reset, key_run = jax.random.split(key)
    obs, state = reset_envs(env, env_params, key_reset, num_episodes)
    zeros = jnp.zeros(num_episodes, jnp.float32)

    def one_step(carry, step_key):
        state, obs, total, length, alive = carry
        key_policy, key_env = jax.random.split(step_key)
        action, _ = policy_fn(policy_params, obs, key_policy)
        obs, state, reward, done, _ = step_envs(env, env_params, key_env, state, action)
        total = total + jnp.where(alive, reward, 0.0)
        length = length + alive.astype(jnp.int32)
        return (state, obs, total, length, alive & ~done), None

    carry = (state, obs, zeros, jnp.zeros(num_episodes, jnp.int32), jnp.ones(num_episodes, bool))
    (_, _, total, length, alive), _ = jax.lax.scan(one_step, carry, jax.random.split(key_run, max_steps))
    return {"return": total, "length": length, "finished": ~alive}


def scan_updates(update: Callable, state: Any, length: int) -> tuple[Any, dict]:
    """`length` updates in one lax.scan: (final state, metrics stacked over updates); every agent's `run`."""
    return jax.lax.scan(lambda carry, _: update(carry), state, None, length=length)
