"""Return estimators over time-major rollouts ([T, ...] arrays), with episode boundaries inside the segment.

Conventions shared by both estimators, for the transition at step t (s_t, a_t, r_t, s'_t):
- `terminated[t]`: s'_t is terminal, so its value is 0 and nothing is bootstrapped from it.
- `truncated[t]`: the episode was cut (time limit) at s'_t, which is not terminal: bootstrap from V(s'_t), but the
  trace of later steps (which belong to the next episode after an auto-reset) must not flow back into step t.
- `next_values[t]` = V(s'_t), the value of the state the transition actually reached, *before* any auto-reset
  (`rl.wrappers.AutoReset` keeps that observation in `info["final_observation"]`). It is only read where the chain
  is cut: at truncations, and at t = T - 1 when the segment ends mid-episode (the usual "last value" bootstrap).
  When the rollout has no truncations, `shifted_next_values(values, last_value)` builds it from V(s_{t+1}).

Treating a truncation as a termination (as many implementations do) biases returns near the time limit down;
passing `truncated` and the pre-reset `next_values` removes that bias.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def shifted_next_values(values: jax.Array, last_value: jax.Array) -> jax.Array:
    """V(s_{t+1}) for t < T-1 and `last_value` = V(s_T) at the end: `next_values` when nothing is truncated."""
    return jnp.concatenate([values[1:], last_value[None]], axis=0)


def generalized_advantage_estimation(rewards, values, next_values, terminated, truncated, gamma: float,
                                     lam: float) -> tuple[jax.Array, jax.Array]:
    """GAE(gamma, lambda) (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", eq. 16), computed backwards with lax.scan:

        delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t)
        A_t     = delta_t + gamma lambda (1 - done_t) A_{t+1},   done_t = terminated_t or truncated_t,  A_T = 0

    Returns (advantages, value targets = advantages + values), both shaped like `rewards`.
    """
    not_terminal = 1.0 - terminated.astype(rewards.dtype)
    not_done = 1.0 - jnp.logical_or(terminated, truncated).astype(rewards.dtype)
    deltas = rewards + gamma * not_terminal * next_values - values

    def backward(advantage, xs):
        delta, cont = xs
        advantage = delta + gamma * lam * cont * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(rewards[0]), (deltas, not_done), reverse=True)
    return advantages, advantages + values


def monte_carlo_returns(rewards, next_values, terminated, truncated, gamma: float) -> jax.Array:
    """Discounted returns G_t = sum_k gamma^k r_{t+k} within each episode (Sutton & Barto 2018, eq. 3.9), with a
    bootstrap where the episode is cut rather than ended:

        G_t = r_t + gamma * (0            if terminated_t
                             V(s'_t)      if truncated_t, or t = T - 1 (the segment ends mid-episode)
                             G_{t+1}      otherwise)

    Pass `next_values` = 0 for pure Monte-Carlo returns that never bootstrap. Equal to GAE with lambda = 1 plus V.
    """
    not_terminal = 1.0 - terminated.astype(rewards.dtype)
    cut = jnp.logical_or(terminated, truncated)

    def backward(following, xs):
        reward, next_value, cont, is_cut = xs
        ret = reward + gamma * cont * jnp.where(is_cut, next_value, following)
        return ret, ret

    _, returns = jax.lax.scan(backward, next_values[-1], (rewards, next_values, not_terminal, cut), reverse=True)
    return returns
