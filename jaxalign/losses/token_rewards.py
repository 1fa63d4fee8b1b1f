"""Dense (per-token) implicit rewards of a DPO-trained policy: an analysis utility, not a training objective.

Rafailov et al. (2024), "From r to Q*: Your Language Model is Secretly a Q-Function" (docs/objectives.md,
"Token-level rewards"; recalled, not checked against the paper): in the token-level MDP, DPO's implicit reward
decomposes over tokens,

    rhat_t = beta * (log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)),

and its sum over the completion is the sequence-level implicit reward beta * z, z = L_theta(y) - L_ref(y). The
token with the lowest rhat_t is the one the policy "blames" for a rejected answer (credit assignment).

Arrays follow jaxalign.logprobs: per-token log-probs [batch, time] aligned to the tokens, a completion mask that is 1
on response tokens only. Everything here is pure and jit-able.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_implicit_rewards(policy_logps: jax.Array, reference_logps: jax.Array, mask: jax.Array,
                           beta: float = 0.1) -> jax.Array:
    """rhat_t = beta * (logp_theta - logp_ref) on completion tokens, exactly 0 elsewhere; shape [batch, time]."""
    return jnp.where(mask.astype(bool), beta * (policy_logps - reference_logps), 0.0)


def sequence_implicit_reward(policy_logps: jax.Array, reference_logps: jax.Array, mask: jax.Array,
                             beta: float = 0.1) -> jax.Array:
    """beta * z = beta * (L_theta(y) - L_ref(y)) per sequence, computed from the summed log-probs, shape [batch]."""
    mask = mask.astype(policy_logps.dtype)
    return beta * (jnp.sum(policy_logps * mask, axis=-1) - jnp.sum(reference_logps * mask, axis=-1))


def dense_reward_sum_gap(policy_logps: jax.Array, reference_logps: jax.Array, mask: jax.Array,
                         beta: float = 0.1) -> jax.Array:
    """|sum_t rhat_t - beta * z| per sequence: the check that the dense rewards decompose the sequence reward.

    Zero up to rounding whenever the log-probs are zero outside the mask or not (the mask is applied to both).
    """
    dense = dense_implicit_rewards(policy_logps, reference_logps, mask, beta)
    return jnp.abs(jnp.sum(dense, axis=-1) - sequence_implicit_reward(policy_logps, reference_logps, mask, beta))


def credit_assignment(policy_logps: jax.Array, reference_logps: jax.Array, mask: jax.Array,
                      beta: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """(index, rhat) of the lowest-reward completion token of each sequence: argmin_t rhat_t over masked tokens.

    Ties go to the earliest token. A sequence with no completion token gets index -1 and rhat 0. The index is a
    position in the time axis of the inputs (so it can be used to look up the token itself).
    """
    active = mask.astype(bool)
    dense = dense_implicit_rewards(policy_logps, reference_logps, mask, beta)
    masked = jnp.where(active, dense, jnp.inf)
    index = jnp.argmin(masked, axis=-1)
    value = jnp.take_along_axis(dense, index[:, None], axis=-1)[:, 0]
    has_tokens = jnp.any(active, axis=-1)
    return jnp.where(has_tokens, index, -1), jnp.where(has_tokens, value, 0.0)
