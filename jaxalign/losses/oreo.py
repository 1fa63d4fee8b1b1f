"""OREO objectives as pure functions: Wang et al. (2024), "Offline Reinforcement Learning for LLM Multi-Step
Reasoning" (OREO, arXiv:2412.16145); docs/algorithms.md, "OREO".

OREO learns a policy pi_theta and a critic V_phi from offline trajectories (x, y, R) with a sparse terminal reward R
by enforcing the soft Bellman equation of KL-regularised RL with the SFT model pi_ref as reference. With the
per-token log-ratio lr_t = log pi_theta(y_t | s_t) - log pi_ref(y_t | s_t) and a completion mask m, the two
objectives are

    A_t   = sum_{i >= t} m_i lr_i                                        (soft-Bellman advantage, no gradient)
    L_V   = mean_b [ sum_t s_t (beta A_t + V(s_t) - R)^2 / sum_t s_t ]                     (critic / value loss)
    L_pi  = mean_b [ sum_t s_t (beta (lr_t + sg sum_{i > t} m_i lr_i) + sg V(s_t) - R)^2 / sum_t s_t ]
            + alpha KL(pi_theta || pi_ref)                                      (actor / policy loss, token level)

where s is a state mask (`state_mask`: token level = the state before every response token, step level = the state
before every reasoning step, response level = the state after the prompt only) and sg is stop-gradient. The step-level
policy loss lets the gradient of each step's residual flow only through that step's own tokens; the response-level
loss is (V(s_0) - R + beta L(y))^2 with L(y) the summed log-ratio (`policy_residuals` defines all three precisely).

Conventions (jaxalign.logprobs, jaxalign.models.heads): every array is [batch, time] aligned with the tokens.
`logratio[:, t]` is the log-ratio of token t (policy minus reference per-token log-probs); `mask` is the completion
mask (1 on response tokens only, so left-padded prompts and right padding are both fine); `values[:, t]` is V(s_t), the
critic's value of the state *before* token t, i.e. `jaxalign.models.heads.state_values(critic_output, mask)` (the
critic's output at position t-1). Values and log-ratios outside the states/mask are never read (NaN there is
harmless). `reward` is [batch]. Every per-row mean divides by max(sum_t s_t, 1), so a row without any state (all
padding, or an empty completion) contributes exactly 0 to the batch mean, which still counts it (the mean is over all
B rows, as in mean_b above), and is counted in the metric "oreo/empty_rows".

Scope: these are the objectives only. They are NOT registered in `jaxalign.losses.registry` (their inputs, values
from a separate critic and a scalar reward per trajectory, are not PairwiseInputs/UnpairedInputs); the OREO trainer
loop (jaxalign/algorithms/oreo, to come) composes them. The ordering the paper prescribes is the trainer's job:
the critic is updated first with `oreo_value_loss`, and the actor's `oreo_policy_loss` receives the values V(s_t)
computed *before* that critic step. Both losses stop gradients on the other model's quantities, so either can be
differentiated on its own parameters without leaking into the other.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.losses.common import check_hyperparameter

Metrics = dict[str, jax.Array]
LEVELS = ("token", "step", "response")


# ------------------------------------------------------------------------------------------------------------------
# input checks (one ValueError per bad input)


def _check_level(objective: str, level: Any) -> None:
    if level not in LEVELS:
        raise ValueError(f"{objective}: level must be one of {LEVELS}, got {level!r}")


def _check_2d(objective: str, shape: tuple[int, ...], **arrays: Any) -> None:
    """All named arrays must have exactly `shape` ([batch, time])."""
    for name, array in arrays.items():
        if jnp.shape(array) != tuple(shape):
            raise ValueError(f"{objective}: {name} must have shape {tuple(shape)} (like mask, [batch, time]), "
                             f"got {jnp.shape(array)}")


def _check_reward(objective: str, reward: Any, batch: int) -> None:
    if jnp.shape(reward) != (batch,):
        raise ValueError(f"{objective}: reward must have shape ({batch},) (one terminal reward per row), "
                         f"got {jnp.shape(reward)}")


def _check_mask_2d(objective: str, mask: Any) -> None:
    if jnp.ndim(mask) != 2:
        raise ValueError(f"{objective}: mask must be 2-D [batch, time], got shape {jnp.shape(mask)}")


# ------------------------------------------------------------------------------------------------------------------
# advantage, states, residuals


def _reverse_cumsum(logratio: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_{i >= t} m_i lr_i at every position t (differentiable); masked-out entries are never read."""
    masked = jnp.where(mask.astype(bool), logratio.astype(jnp.float32), 0.0)
    return jax.lax.cumsum(masked, axis=1, reverse=True)


def soft_bellman_advantage(logratio: jax.Array, mask: jax.Array) -> jax.Array:
    """A_t = sum_{i >= t} m_i lr_i, the reverse cumulative sum of the masked log-ratios, under stop-gradient.

    OREO (Wang et al. 2024): with a sparse terminal reward the soft Bellman equation unrolled from
    s_t to the end of the trajectory reads V*(s_t) = R - beta sum_{i >= t} log pi*/pi_ref(a_i | s_i), so beta A_t is
    the KL-regularised "cost to go" that the critic must offset. Defined at every position t (a prompt position reads
    L(y) = sum_i m_i lr_i, a position after the completion reads 0); the losses read it only at states. [B, T] fp32.
    """
    _check_mask_2d("soft_bellman_advantage", mask)
    _check_2d("soft_bellman_advantage", jnp.shape(mask), logratio=logratio)
    return jax.lax.stop_gradient(_reverse_cumsum(logratio, mask))


def state_mask(completion_mask: jax.Array, level: str, step_starts: jax.Array | None = None) -> jax.Array:
    """s_t: 1 at the states whose Bellman residual OREO penalises, 0 elsewhere; [B, T] fp32 (Wang et al. 2024).

    Positions index the state *before* token t (the alignment of `heads.state_values`, whose V(s_t) is the critic's
    output at the token before t):
    - "token": s_t = m_t, the state before each response token (OREO's token-level MDP);
    - "step": the state before each reasoning step starts, i.e. position t where a step's first token sits
      (`step_starts[b, t]` true). The first response token always starts a step (the first step begins right after the
      prompt), whether or not `step_starts` marks it. Only response tokens can start a step: marks outside the
      completion mask raise a ValueError when the arrays are concrete (under jit they are dropped);
    - "response": only the state after the prompt, s_0 = the first response token.
    A row without response tokens has no state. `step_starts` is required for "step" and refused otherwise.
    """
    _check_level("state_mask", level)
    _check_mask_2d("state_mask", completion_mask)
    active = completion_mask.astype(bool)
    first = active & ~jnp.pad(active, ((0, 0), (1, 0)))[:, :-1]  # first response token (also after a gap)
    first = first & (jnp.cumsum(first, axis=1) == 1)  # only the very first one of the row
    if level != "step":
        if step_starts is not None:
            raise ValueError(f"state_mask: step_starts is only used at level 'step', got it with level {level!r}")
        return (active if level == "token" else first).astype(jnp.float32)
    if step_starts is None:
        raise ValueError("state_mask: level 'step' needs step_starts, a boolean [batch, time] marking each step's "
                         "first token")
    _check_2d("state_mask", jnp.shape(completion_mask), step_starts=step_starts)
    starts = jnp.asarray(step_starts).astype(bool)
    if not isinstance(starts, jax.core.Tracer) and not isinstance(active, jax.core.Tracer):
        outside = int(jnp.sum(starts & ~active))
        if outside:
            raise ValueError(f"state_mask: step_starts marks {outside} position(s) outside the completion mask; a step "
                             "can only start at a response token")
    return ((starts & active) | first).astype(jnp.float32)


def _next_state_index(states: jax.Array) -> jax.Array:
    """For every position t, the position of the next state strictly after t, or T if there is none. [B, T] int32."""
    width = states.shape[1]
    index = jnp.where(states.astype(bool), jnp.arange(width, dtype=jnp.int32), width)
    after = jnp.pad(index[:, 1:], ((0, 0), (0, 1)), constant_values=width)
    return jax.lax.cummin(after, axis=1, reverse=True)


def policy_residuals(logratio: jax.Array, values: jax.Array, mask: jax.Array, state_mask: jax.Array,
                     reward: jax.Array, beta: Any, level: str) -> jax.Array:
    """delta_t = beta (C_t + sg F_t) + sg V(s_t) - R at every state (0 elsewhere), [B, T] fp32: OREO's policy-side
    soft-Bellman residual (Wang et al. 2024). C_t carries the gradient, F_t does not:
    - "token": C_t = m_t lr_t and F_t = sum_{i > t} m_i lr_i (the token-level policy objective);
    - "step": C_t = sum_{t <= i < n(t)} m_i lr_i, the log-ratios of the current step, where n(t) is the next state
      after t (or the end), and F_t = sum_{i >= n(t)} m_i lr_i. So d delta_t / d lr_i = beta exactly when token i is
      a response token of the step that starts at t, and 0 for every token before t or in a later step;
    - "response": C_t = sum_{i >= t} m_i lr_i, F_t = 0; at the response-level state s_0 this is V(s_0) - R + beta L(y).
    In every case C_t + F_t = A_t, so the forward value equals the value loss's residual beta A_t + V(s_t) - R. The
    state mask should come from `state_mask(mask, level, ...)` with the same level (for "token" with the token-level
    mask n(t) = t + 1, so "step" with every token a step start equals "token").
    """
    _check_level("policy_residuals", level)
    _check_mask_2d("policy_residuals", mask)
    shape = jnp.shape(mask)
    _check_2d("policy_residuals", shape, logratio=logratio, values=values, state_mask=state_mask)
    _check_reward("policy_residuals", reward, shape[0])
    states = state_mask.astype(bool)
    total = _reverse_cumsum(logratio, mask)  # A_t with gradient
    if level == "token":
        current = jnp.where(mask.astype(bool), logratio.astype(jnp.float32), 0.0)
        future = jax.lax.stop_gradient(total - current)
    elif level == "step":
        padded = jnp.pad(total, ((0, 0), (0, 1)))  # A_T = 0
        after = jnp.take_along_axis(padded, _next_state_index(states), axis=1)  # A_{n(t)}
        current = total - after  # d/d lr_i = 1 - 1 = 0 exactly for i >= n(t)
        future = jax.lax.stop_gradient(after)
    else:
        current, future = total, jnp.zeros_like(total)
    value = jax.lax.stop_gradient(values.astype(jnp.float32))
    residual = beta * (current + future) + value - jax.lax.stop_gradient(reward.astype(jnp.float32))[:, None]
    return jnp.where(states, residual, 0.0)


def _row_mean_of_squares(residuals: jax.Array, states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean_b[sum_t s_t delta_t^2 / max(sum_t s_t, 1)], number of rows without a state)."""
    states = states.astype(bool)
    count = jnp.sum(states, axis=1)
    per_row = jnp.sum(jnp.where(states, residuals, 0.0) ** 2, axis=1) / jnp.maximum(count, 1).astype(jnp.float32)
    return jnp.mean(per_row), jnp.sum(count == 0).astype(jnp.float32)


def _first_state_values(values: jax.Array, states: jax.Array) -> jax.Array:
    """Mean over rows with a state of V at the row's first state (V(s_0) for token/step/response masks); 0 if none."""
    states = states.astype(bool)
    has = jnp.any(states, axis=1)
    first = jnp.take_along_axis(values.astype(jnp.float32), jnp.argmax(states, axis=1)[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(has, first, 0.0)) / jnp.maximum(jnp.sum(has), 1)


# ------------------------------------------------------------------------------------------------------------------
# the objectives


def oreo_value_loss(values: jax.Array, logratio: jax.Array, mask: jax.Array, state_mask: jax.Array,
                    reward: jax.Array, beta: Any) -> tuple[jax.Array, Metrics]:
    """OREO's critic objective (Wang et al. 2024, value loss):

        L_V = mean_b [ sum_t s_t (beta A_t + V(s_t) - R)^2 / sum_t s_t ],   A_t = sg sum_{i >= t} m_i lr_i.

    The gradient flows only into `values` (the log-ratios enter through the stop-gradient advantage and the reward is
    data). Rows without states contribute 0. Returns (loss, metrics): the loss, the mean V(s_0), the mean value over
    states, the mean reward and the number of rows without a state.
    """
    check_hyperparameter("oreo_value_loss", "beta", beta, lambda b: b > 0, "beta > 0 (the KL-penalty strength)")
    _check_mask_2d("oreo_value_loss", mask)
    shape = jnp.shape(mask)
    _check_2d("oreo_value_loss", shape, values=values, logratio=logratio, state_mask=state_mask)
    _check_reward("oreo_value_loss", reward, shape[0])
    states = state_mask.astype(bool)
    advantage = soft_bellman_advantage(logratio, mask)
    target = jax.lax.stop_gradient(reward.astype(jnp.float32))[:, None] - beta * advantage
    residual = jnp.where(states, values.astype(jnp.float32) - target, 0.0)
    loss, empty = _row_mean_of_squares(residual, states)
    count = jnp.sum(states)
    metrics = {
        "oreo/value_loss": loss,
        "oreo/value_start": _first_state_values(jax.lax.stop_gradient(values), states),
        "oreo/value_mean": jnp.sum(jnp.where(states, jax.lax.stop_gradient(values), 0.0)) / jnp.maximum(count, 1),
        "oreo/reward_mean": jnp.mean(reward.astype(jnp.float32)),
        "oreo/empty_rows": empty,
    }
    return loss, metrics


def token_kl(policy_logits: jax.Array, reference_logits: jax.Array) -> jax.Array:
    """KL(pi_theta || pi_ref) over the full vocabulary for the distribution that chooses token t, aligned to the
    tokens like `jaxalign.logprobs.token_logprobs`: kl[:, t] = sum_v p_v (log p_v - log q_v) with p, q the softmaxes
    of policy_logits[:, t-1] and reference_logits[:, t-1]; kl[:, 0] = 0. fp32, >= 0; the reference is frozen (no
    gradient). [B, T]. OREO's regulariser (Wang et al. 2024)."""
    if jnp.ndim(policy_logits) != 3 or jnp.shape(policy_logits) != jnp.shape(reference_logits):
        raise ValueError("token_kl: policy_logits and reference_logits must have the same shape [batch, time, vocab], "
                         f"got {jnp.shape(policy_logits)} and {jnp.shape(reference_logits)}")
    logp = jax.nn.log_softmax(policy_logits[:, :-1].astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(jax.lax.stop_gradient(reference_logits[:, :-1]).astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return jnp.pad(jnp.maximum(kl, 0.0), ((0, 0), (1, 0)))  # clamp the tiny negative rounding of identical rows


def _masked_token_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_{b,t} m x / max(sum_{b,t} m, 1): the mean over all response tokens of the batch (0 without any)."""
    active = mask.astype(bool)
    return jnp.sum(jnp.where(active, per_token, 0.0)) / jnp.maximum(jnp.sum(active), 1).astype(jnp.float32)


def full_vocab_kl(policy_logits: jax.Array, reference_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """KL(pi_theta || pi_ref): `token_kl` averaged over all response tokens of the batch (sum over masked tokens /
    their number; 0 when there are none). OREO's alpha-weighted regulariser (Wang et al. 2024)."""
    kl = token_kl(policy_logits, reference_logits)
    _check_2d("full_vocab_kl", kl.shape, mask=mask)
    return _masked_token_mean(kl, mask)


def oreo_policy_loss(logratio: jax.Array, values: jax.Array, mask: jax.Array, state_mask: jax.Array,
                     reward: jax.Array, beta: Any, alpha: Any = 0.0, kl_per_token: jax.Array | None = None,
                     level: str = "token") -> tuple[jax.Array, Metrics]:
    """OREO's actor objective (Wang et al. 2024, policy loss and its step-/response-level variants;
    docs/algorithms.md):

        L_pi = mean_b [ sum_t s_t delta_t^2 / sum_t s_t ] + alpha KL(pi_theta || pi_ref),

    with delta_t from `policy_residuals` at `level`: "token": beta (lr_t + sg sum_{i>t} lr_i) + sg V(s_t) - R;
    "step": the gradient of each step's residual flows only through the current step's tokens; "response":
    (V(s_0) - R + beta L(y))^2. Values (from the critic before its update: the trainer's job) and the reward enter under
    stop-gradient. KL is `kl_per_token` ([B, T], e.g. `token_kl`) averaged over the response tokens of the batch;
    it may be None only when alpha is 0. Returns (loss, metrics).
    """
    _check_level("oreo_policy_loss", level)
    check_hyperparameter("oreo_policy_loss", "beta", beta, lambda b: b > 0, "beta > 0 (the KL-penalty strength)")
    check_hyperparameter("oreo_policy_loss", "alpha", alpha, lambda a: a >= 0, "alpha >= 0 (the KL weight)")
    residuals = policy_residuals(logratio, values, mask, state_mask, reward, beta, level)
    states = state_mask.astype(bool)
    bellman, empty = _row_mean_of_squares(residuals, states)
    if kl_per_token is None:
        if isinstance(alpha, jax.core.Tracer) or float(alpha) != 0.0:
            raise ValueError("oreo_policy_loss: kl_per_token ([batch, time], e.g. token_kl(policy_logits, "
                             "reference_logits)) is required when alpha is not 0")
        kl = jnp.zeros((), jnp.float32)
    else:
        _check_2d("oreo_policy_loss", jnp.shape(mask), kl_per_token=kl_per_token)
        kl = _masked_token_mean(kl_per_token.astype(jnp.float32), mask)
    loss = bellman + alpha * kl
    metrics = {
        "oreo/policy_bellman": bellman,
        "oreo/kl": jax.lax.stop_gradient(kl),
        "oreo/logratio_mean": jax.lax.stop_gradient(_masked_token_mean(logratio.astype(jnp.float32), mask)),
        "oreo/empty_rows": empty,
    }
    return loss, metrics
