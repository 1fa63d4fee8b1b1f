"""The three loss modifiers of TRL 1.16.0's DPOTrainer, as small pure functions (docs/objectives.md, "Loss modifiers").

- f-divergence scores (f-DPO): the summed log-ratio z = L_theta(y) - L_ref(y) of each completion is replaced by a
  score s(z) before the chosen-minus-rejected difference is taken (`f_divergence_score`).
- Length desensitisation (LD-DPO): completion tokens past the shorter completion of a pair weigh `ld_alpha` in the
  sequence log-probs of policy and reference (`ld_token_weights`).
- WPO weighting: every pair's loss is multiplied by w(y_w) w(y_l), a no-gradient, length-normalised probability of
  the pair under the policy (`wpo_token_log_norm`, `wpo_sequence_weights`, `wpo_pair_weights`).

The objectives of `jaxalign.losses.dpo` / `jaxalign.losses.pairwise` accept these as keyword-only arguments
(`f_divergence`, `f_alpha`, `ld_alpha`, `pair_weights`); the one documented entry point that validates and routes them
is `jaxalign.losses.compute_objective(name, inputs, f_divergence=..., f_alpha=..., ld_alpha=..., wpo=...)`
(and `jaxalign.losses.pairwise.combine`, which passes them to every term). Which objective accepts which modifier is
declared in its registry entry (`ObjectiveSpec.modifiers`); anything else is one clear ValueError.

This module imports nothing from the rest of jaxalign, so `common` and `registry` can both use it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
MODIFIERS = ("f_divergence", "ld_alpha", "wpo")
WPO_EXTRAS = ("wpo_log_norm_chosen", "wpo_log_norm_rejected")

# TRL 1.16.0 clamps (a-1) z at 80 for float32/bfloat16 so that exp(.) stays finite; scores are computed in >= fp32.
ALPHA_DIVERGENCE_CLAMP = 80.0
# TRL 1.16.0 falls back to the reverse-KL limit s = z when |a - 1| < 1e-6.
ALPHA_DIVERGENCE_LIMIT_TOL = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# validation (one clear ValueError naming the objective, the modifier and the value; traced values pass)


def _is_tracer(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _real(value: Any) -> float | None:
    """float(value) for a real scalar, else None (bools and strings are not numbers here)."""
    if isinstance(value, (bool, str)) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)) or np.ndim(value):
        return None
    return float(value)


def check_f_divergence(objective: str, f_divergence: Any, f_alpha: Any = 0.5) -> None:
    """Validate an f-divergence name and its alpha coefficient for `objective`.

    f_divergence must be one of F_DIVERGENCES. f_alpha (TRL's `f_alpha_divergence_coef`) is read only by
    "alpha_divergence", where it must be a finite real in [0, 1]: the f-DPO paper (Wang et al. 2023, Table 1) uses
    alpha-divergences with alpha in (0, 1), TRL's coefficient a is 1 - alpha (a -> 1 is reverse KL, a = 0 forward
    KL), and for a > 1 the score is bounded below (f'(0) finite), which the f-DPO reparameterisation excludes.
    TRL 1.16.0 itself accepts any float. A non-default f_alpha with another f-divergence is an error rather than
    being ignored silently.
    """
    if not isinstance(f_divergence, str) or f_divergence not in F_DIVERGENCES:
        raise ValueError(
            f"{objective}: unknown f_divergence {f_divergence!r}; expected one of {', '.join(F_DIVERGENCES)}"
        )
    if _is_tracer(f_alpha):
        return
    value = _real(f_alpha)
    if value is None:
        raise ValueError(
            f"{objective}: f_alpha must be a real number (the alpha-divergence coefficient), got {f_alpha!r}"
        )
    if f_divergence != "alpha_divergence":
        if value != 0.5:
            raise ValueError(
                f"{objective}: f_alpha={f_alpha!r} is only used with f_divergence='alpha_divergence', "
                f"got f_divergence={f_divergence!r}"
            )
        return
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(
            f"{objective}: f_alpha (alpha_divergence coefficient) must satisfy 0 <= f_alpha <= 1, got {f_alpha!r}"
        )


def check_ld_alpha(objective: str, ld_alpha: Any) -> None:
    """ld_alpha is None (off) or a real in [0, 1] (TRL 1.16.0's documented range; 1 = no down-weighting)."""
    if ld_alpha is None or _is_tracer(ld_alpha):
        return
    value = _real(ld_alpha)
    if value is None or not (0.0 <= value <= 1.0):  # NaN fails the comparison too
        raise ValueError(f"{objective}: ld_alpha must be None or a real number in [0, 1], got {ld_alpha!r}")


def check_pair_weights(objective: str, pair_weights: Any, pairs: int) -> None:
    """pair_weights is None or an array of shape [pairs] (e.g. `wpo_pair_weights`)."""
    if pair_weights is None:
        return
    if not hasattr(pair_weights, "shape") or tuple(pair_weights.shape) != (pairs,):
        shape = getattr(pair_weights, "shape", type(pair_weights).__name__)
        raise ValueError(f"{objective}: pair_weights must be an array of shape ({pairs},) (one per pair), got {shape}")


# ----------------------------------------------------------------------------------------------------------------
# f-divergence scores


def f_divergence_score(z: jax.Array, f_divergence: str = "reverse_kl", f_alpha: Any = 0.5) -> jax.Array:
    """The f-DPO score s(z) of a summed log-ratio z = log pi_theta(y)/pi_ref(y) (TRL 1.16.0 semantics).

    Wang et al. (2023), "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints" (f-DPO; its main theorem, equation number not re-checked here): with an f-divergence regulariser
    the implicit reward is beta f'(pi/pi_ref) + const, so the DPO difference z_w - z_l becomes
    f'(e^{z_w}) - f'(e^{z_l}). Up to constants that cancel in that difference:

    - reverse_kl:       s = z                      (f'(u) = log u + 1; standard DPO)
    - forward_kl:       s = 1 - exp(-z)            (f'(u) = 1 - 1/u)
    - js_divergence:    s = log 2 + logsig(z)      (f'(u) = log(2u/(1+u)))
    - alpha_divergence: s = (exp((a-1) z) - 1)/(a-1), a = f_alpha (default 0.5); s = z when |a-1| < 1e-6 and
      (a-1) z clamped at 80 (exp stays finite; the gradient is zero beyond the clamp).

    Applied to each side's summed log-ratio, never per token and never to the difference (as TRL 1.16.0 does).
    Like TRL, forward_kl is not clamped: z below about -88 overflows float32. The non-identity scores are computed
    in at least float32; reverse_kl returns z unchanged.
    """
    if f_divergence == "reverse_kl":
        return z
    dtype = jnp.promote_types(jnp.result_type(z), jnp.float32)
    z = jnp.asarray(z, dtype)
    if f_divergence == "forward_kl":
        return -jnp.expm1(-z)
    if f_divergence == "js_divergence":
        return jnp.log(2.0).astype(dtype) + jax.nn.log_sigmoid(z)
    if f_divergence == "alpha_divergence":
        a = jnp.asarray(f_alpha, dtype)
        limit = jnp.abs(a - 1.0) < ALPHA_DIVERGENCE_LIMIT_TOL
        gap = jnp.where(limit, jnp.ones_like(a), a - 1.0)  # a safe denominator keeps the unused branch finite
        t = jnp.minimum(gap * z, ALPHA_DIVERGENCE_CLAMP)
        return jnp.where(limit, z, jnp.expm1(t) / gap)
    raise ValueError(f"unknown f_divergence {f_divergence!r}; expected one of {', '.join(F_DIVERGENCES)}")


# ----------------------------------------------------------------------------------------------------------------
# LD-DPO


def ld_token_weights(chosen_mask: jax.Array, rejected_mask: jax.Array, ld_alpha: Any) -> tuple[jax.Array, jax.Array]:
    """Per-token weights [pairs, time] of the length-desensitised sequence log-probs (TRL 1.16.0 semantics).

    Liu et al. (2024), "Length Desensitization in Direct Preference Optimization" (LD-DPO; its re-parameterised
    likelihood, equation number not re-checked here): log pi(y) = sum_{t <= l_p} logp_t + alpha sum_{t > l_p} logp_t
    with l_p = min(|y_w|, |y_l|), the same decomposition for the policy and the reference. Completion tokens are
    counted in mask order (a cumulative sum of the mask), so prompt tokens before the completion, a different offset
    on each side and holes in the mask are all handled: weight 1 for the first l_p completion tokens, ld_alpha for
    the rest, 0 outside the mask.
    Multiply a side's per-token log-probs by its weights and sum to get TRL's `shared + ld_alpha * tail`. The
    weights depend on both completions of a pair, so a trainer that caches reference SEQUENCE log-probs must cache
    the LD-weighted sums (TRL 1.16.0 does so in its precompute pass); cached per-token log-probs need nothing.
    """
    mask_w = jnp.asarray(chosen_mask, jnp.float32)
    mask_l = jnp.asarray(rejected_mask, jnp.float32)
    shared = jnp.minimum(jnp.sum(mask_w, axis=-1), jnp.sum(mask_l, axis=-1))[:, None]
    alpha = jnp.asarray(ld_alpha, jnp.float32)

    def weights(mask):
        position = jnp.cumsum(mask, axis=-1)  # 1-based index among the completion tokens
        return mask * jnp.where(position <= shared, 1.0, alpha)

    return weights(mask_w), weights(mask_l)


# ----------------------------------------------------------------------------------------------------------------
# WPO


def wpo_token_log_norm(logits: jax.Array) -> jax.Array:
    """log sum_v p_v^2 of each next-token distribution, aligned like `jaxalign.logprobs.token_logprobs` (no gradient).

    Position t holds the normaliser of softmax(logits[:, t-1]), the distribution that predicted token t, and 0 at
    t = 0. Input [batch, time, vocab], output [batch, time], float32. This is what TRL 1.16.0's fused LM head returns
    as `log_sum_sq_probs` for WPO; pass it to objectives as extras "wpo_log_norm_chosen" / "wpo_log_norm_rejected".
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    log_norm = jax.nn.logsumexp(2.0 * logp, axis=-1)
    return jax.lax.stop_gradient(jnp.pad(log_norm, ((0, 0), (1, 0))))


def wpo_sequence_weights(token_logps: jax.Array, token_log_norm: jax.Array, mask: jax.Array) -> jax.Array:
    """w(y) = exp(mean_t [logp_t - log sum_v p_v^2]) over the completion tokens, without gradient; shape [n].

    Zhou et al. (2024), "WPO: Enhancing RLHF with Weighted Preference Optimization", eq. 2 (as TRL cites it) with the
    sampling-aligned (greedy-normalised) token probabilities p_t / sum_v p_v^2, as TRL 1.16.0 computes it: the mean
    is over all |y| completion tokens (clamped to >= 1), the policy's raw per-token log-probs are used (never
    LD-weighted), and the weight is not clamped (p_t / sum_v p_v^2 can exceed 1, e.g. for an argmax token).
    """
    mask = jnp.asarray(mask, jnp.float32)
    length = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    aligned = jnp.sum((token_logps - token_log_norm) * mask, axis=-1) / length
    return jax.lax.stop_gradient(jnp.exp(aligned))


def wpo_pair_weights(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    chosen_mask: jax.Array,
    rejected_mask: jax.Array,
    extras: Mapping[str, jax.Array],
    objective: str = "wpo",
) -> jax.Array:
    """w(y_w) w(y_l) for every pair, shape [pairs], reading the normalisers from `extras` (WPO_EXTRAS).

    Zhou et al. (2024) weight each preference pair by the product of its two sequence weights (TRL 1.16.0:
    `per_sequence_loss *= chosen_weights * rejected_weights`). Raises one ValueError when an extra is missing or
    its shape differs from the log-probs it normalises.
    """
    missing = [name for name in WPO_EXTRAS if name not in extras]
    if missing:
        raise ValueError(
            f"{objective}: wpo=True needs inputs.extras {', '.join(repr(m) for m in missing)} ([pairs, time] "
            "log sum_v p_v^2 per token; compute them with jaxalign.losses.modifiers.wpo_token_log_norm(logits))"
        )
    weights = []
    for side, logps, mask in (("chosen", policy_chosen, chosen_mask), ("rejected", policy_rejected, rejected_mask)):
        log_norm = extras[f"wpo_log_norm_{side}"]
        if tuple(log_norm.shape) != tuple(logps.shape):
            raise ValueError(
                f"{objective}: extras['wpo_log_norm_{side}'] must have the shape of policy_{side} "
                f"{tuple(logps.shape)}, got {tuple(log_norm.shape)}"
            )
        weights.append(wpo_sequence_weights(logps, log_norm, mask))
    return weights[0] * weights[1]
