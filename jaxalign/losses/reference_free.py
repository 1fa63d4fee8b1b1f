"""Reference-free preference objectives: SimPO, CPO, AlphaPO, ORPO and ASFT (docs/objectives.md, "Reference-free").

None of these uses a reference model: the `reference_*` fields of `PairwiseInputs` are ignored.

Conventions shared by every objective here:
- L(y) = sum_t m_t logp_t is the summed completion log-prob, Lbar(y) = L(y) / |y| the average one.
- An empty completion (mask all zero) has L(y) = 0 and, by definition, Lbar(y) := 0 (log-prob of the empty
  string under a length-normalised model is 0; dividing by max(|y|, 1) gives exactly that). Its token log-probs
  get zero gradient, so such a pair gives a finite loss and finite gradients.
- NLL terms (CPO, ORPO) are TRL's `nn.CrossEntropyLoss()` normalisation: the sum of -logp over every chosen
  completion token in the batch divided by the number of those tokens (a batch token mean, not a mean of
  per-sequence means); 0 if the batch holds no chosen token at all.
- Logged rewards are beta * (the reward the objective compares), as TRL's CPOTrainer/ORPOTrainer log them;
  rewards/accuracy is mean(reward_w > reward_l) (ties count as wrong).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxalign.losses.dpo import implicit_reward_metrics
from jaxalign.losses.registry import PairwiseInputs, register

# AlphaPO reward: below this |alpha| the reward is evaluated by its Taylor series around alpha = 0 (SimPO's Lbar).
ALPHAPO_SMALL_ALPHA = 1e-6
# AlphaPO reward: the exponent -alpha*Lbar is clamped here so exp() stays finite in float32 (as f-DPO's alpha case).
ALPHAPO_MAX_EXPONENT = 80.0
# ORPO/ASFT: Lbar is clamped to at most this value before log(1 - exp(Lbar)), which is -inf at Lbar = 0 (an empty
# completion, or a completion whose float32 token log-probs saturated to 0). p = exp(-1e-12) is 1 to far below
# float32 resolution, so the clamp changes no representable probability; it only keeps values and gradients finite.
MAX_AVG_LOGP = -1e-12


def _check(objective: str, name: str, value, ok: bool, expected: str) -> None:
    """One clear error per bad hyper-parameter (docs/architecture.md, "Principles"). Traced values are not checked."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and not ok):
        raise ValueError(f"{objective}.{name} must be {expected}, got {value!r}")


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(objective: str, name: str, value) -> None:
    _check(objective, name, value, _is_num(value) and math.isfinite(value) and value > 0, "a finite number > 0")


def _check_nonnegative(objective: str, name: str, value) -> None:
    _check(objective, name, value, _is_num(value) and math.isfinite(value) and value >= 0, "a finite number >= 0")


def _check_label_smoothing(objective: str, value) -> None:
    _check(objective, "label_smoothing", value, _is_num(value) and 0 <= value < 0.5, "a number in [0, 0.5)")


def average_logp(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """Lbar(y) = L(y) / |y| per pair; Lbar := 0 for an empty completion."""
    mask = mask.astype(token_logps.dtype)
    return jnp.sum(token_logps * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def chosen_nll(inputs: PairwiseInputs) -> jax.Array:
    """TRL's NLL of the chosen completions: batch token mean of -logp over chosen completion tokens (0 if none)."""
    mask = inputs.chosen_mask.astype(inputs.policy_chosen.dtype)
    return -jnp.sum(inputs.policy_chosen * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) below
    -log 2. Both branches are evaluated on safe inputs so the unused one cannot inject NaN gradients."""
    x = jnp.minimum(x, MAX_AVG_LOGP)
    near_zero = x > -math.log(2.0)
    x_near = jnp.where(near_zero, x, -1.0)
    x_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def log_odds(avg_logp: jax.Array) -> jax.Array:
    """log(p / (1 - p)) with p = exp(Lbar) (Lbar clamped to <= MAX_AVG_LOGP)."""
    x = jnp.minimum(avg_logp, MAX_AVG_LOGP)
    return x - log1mexp(x)


def alphapo_reward(avg_logp: jax.Array, alpha) -> jax.Array:
    """AlphaPO reward r = (1 - p^-alpha) / alpha = -expm1(-alpha*Lbar) / alpha, p = exp(Lbar).

    For |alpha| < ALPHAPO_SMALL_ALPHA the series Lbar - alpha*Lbar^2/2 is used (alpha -> 0 gives SimPO's Lbar);
    the exponent -alpha*Lbar is clamped at ALPHAPO_MAX_EXPONENT.
    """
    alpha = jnp.asarray(alpha, dtype=avg_logp.dtype)
    small = jnp.abs(alpha) < ALPHAPO_SMALL_ALPHA
    safe_alpha = jnp.where(small, 1.0, alpha)
    exponent = jnp.minimum(-safe_alpha * avg_logp, ALPHAPO_MAX_EXPONENT)
    exact = -jnp.expm1(exponent) / safe_alpha
    series = avg_logp - 0.5 * alpha * avg_logp**2
    return jnp.where(small, series, exact)


def _bt_loss(logits: jax.Array, label_smoothing) -> jax.Array:
    """Per-pair Bradley-Terry loss with conservative label smoothing, as TRL's CPOTrainer sigmoid/simpo."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)


def _logp_metrics(chosen: jax.Array, rejected: jax.Array) -> dict[str, jax.Array]:
    return {"logps/chosen": jnp.mean(chosen), "logps/rejected": jnp.mean(rejected)}


@register("simpo", family="reference_free")
def simpo(inputs: PairwiseInputs, beta: float = 2.0, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0):
    """SimPO, Meng et al. (2024), eq. 6: -log sigmoid(beta * (Lbar(y_w) - Lbar(y_l)) - gamma), gamma = ratio * beta.

    The margin is parameterised by gamma/beta as in the authors' code (`gamma_beta_ratio`); TRL's CPOTrainer with
    loss_type="simpo" takes the absolute margin instead (simpo_gamma = gamma_beta_ratio * beta). label_smoothing eps
    gives -(1-eps) logsig(x) - eps logsig(-x), as TRL. Metrics: rewards = beta * Lbar.
    """
    _check_positive("simpo", "beta", beta)
    _check_nonnegative("simpo", "gamma_beta_ratio", gamma_beta_ratio)
    _check_label_smoothing("simpo", label_smoothing)
    avg_w = average_logp(inputs.policy_chosen, inputs.chosen_mask)
    avg_l = average_logp(inputs.policy_rejected, inputs.rejected_mask)
    per_pair = _bt_loss(beta * (avg_w - avg_l) - gamma_beta_ratio * beta, label_smoothing)
    metrics = implicit_reward_metrics(avg_w, avg_l, beta) | _logp_metrics(avg_w, avg_l)
    return jnp.mean(per_pair), metrics


@register("cpo", family="reference_free", batch_coupled=True)
def cpo(inputs: PairwiseInputs, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0):
    """CPO, Xu et al. (2024), eq. 3 + behaviour-cloning term: -log sigmoid(beta * (L(y_w) - L(y_l))) + alpha * NLL(y_w).

    L is the summed completion log-prob (TRL's CPOTrainer, loss_type="sigmoid"); NLL(y_w) is the batch token mean
    of -logp over all chosen completion tokens (TRL's cross entropy on the chosen labels), weighted by alpha
    (TRL's cpo_alpha). Metrics: rewards = beta * L, nll, and the preference term alone (loss/preference).
    """
    _check_positive("cpo", "beta", beta)
    _check_nonnegative("cpo", "alpha", alpha)
    _check_label_smoothing("cpo", label_smoothing)
    sum_w = inputs.sequence("policy_chosen")
    sum_l = inputs.sequence("policy_rejected")
    preference = jnp.mean(_bt_loss(beta * (sum_w - sum_l), label_smoothing))
    nll = chosen_nll(inputs)
    metrics = implicit_reward_metrics(sum_w, sum_l, beta) | _logp_metrics(sum_w, sum_l)
    metrics |= {"nll": nll, "loss/preference": preference}
    return preference + alpha * nll, metrics


@register("alphapo", family="reference_free")
def alphapo(
    inputs: PairwiseInputs,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    alpha: float = 0.25,
    label_smoothing: float = 0.0,
):
    """AlphaPO, Gupta et al. (2025): SimPO with the reward r = (1 - p^-alpha) / alpha, p = exp(Lbar(y)):
    -log sigmoid(beta * (r_w - r_l) - gamma), gamma = gamma_beta_ratio * beta.

    alpha -> 0 recovers SimPO exactly (|alpha| < 1e-6 uses the series r = Lbar - alpha Lbar^2 / 2). Same as TRL's
    CPOTrainer with loss_type="alphapo" (simpo + alpha, cpo_alpha = 0). alpha may be negative (the paper sweeps
    both signs); the default 0.25 is this library's choice. Metrics: rewards = beta * r.
    """
    _check_positive("alphapo", "beta", beta)
    _check_nonnegative("alphapo", "gamma_beta_ratio", gamma_beta_ratio)
    _check("alphapo", "alpha", alpha, _is_num(alpha) and math.isfinite(alpha), "a finite number")
    _check_label_smoothing("alphapo", label_smoothing)
    avg_w = average_logp(inputs.policy_chosen, inputs.chosen_mask)
    avg_l = average_logp(inputs.policy_rejected, inputs.rejected_mask)
    r_w, r_l = alphapo_reward(avg_w, alpha), alphapo_reward(avg_l, alpha)
    per_pair = _bt_loss(beta * (r_w - r_l) - gamma_beta_ratio * beta, label_smoothing)
    metrics = implicit_reward_metrics(r_w, r_l, beta) | _logp_metrics(avg_w, avg_l)
    return jnp.mean(per_pair), metrics


@register("orpo", family="reference_free", batch_coupled=True)
def orpo(inputs: PairwiseInputs, beta: float = 0.1):
    """ORPO, Hong et al. (2024), eqs. 6-7: NLL(y_w) - beta * log sigmoid(log_odds), with
    log_odds = log odds(y_w) - log odds(y_l) = (Lbar_w - Lbar_l) - (log1mexp(Lbar_w) - log1mexp(Lbar_l)).

    beta is the paper's lambda. log1mexp is the two-branch stable form (as TRL's ORPOTrainer); Lbar is clamped to
    <= -1e-12 first so Lbar = 0 (empty or saturated completions) stays finite. NLL(y_w) is the batch token mean
    over chosen completion tokens; TRL's decoder-only ORPOTrainer also counts the prompt tokens in its NLL, which
    this log-prob-only interface cannot see. Metrics as TRL: rewards = beta * Lbar, nll,
    log_odds_ratio = mean(logsig(log_odds)), log_odds_chosen = mean(log_odds).
    """
    _check_positive("orpo", "beta", beta)
    avg_w = average_logp(inputs.policy_chosen, inputs.chosen_mask)
    avg_l = average_logp(inputs.policy_rejected, inputs.rejected_mask)
    odds = log_odds(avg_w) - log_odds(avg_l)
    ratio = jax.nn.log_sigmoid(odds)
    nll = chosen_nll(inputs)
    metrics = implicit_reward_metrics(avg_w, avg_l, beta) | _logp_metrics(avg_w, avg_l)
    metrics |= {"nll": nll, "log_odds_ratio": jnp.mean(ratio), "log_odds_chosen": jnp.mean(odds)}
    return nll - beta * jnp.mean(ratio), metrics


@register("asft", family="reference_free", batch_coupled=True)
def asft(inputs: PairwiseInputs, beta: float = 0.1, lam: float = 1.0):
    """ASFT (Aligned Supervised Fine-Tuning through Absolute Likelihood), in a form not checked against the paper:
    mean over pairs of -Lbar(y_w) + lam * [-log sigmoid(beta * logit p_w) - log sigmoid(-beta * logit p_l)],
    p = exp(Lbar(y)), logit p = Lbar - log1mexp(Lbar).

    UNVERIFIED: this form follows one public implementation, not a check against the paper; confirm before relying
    on it. Unlike CPO/ORPO the SFT term here is the per-pair average log-prob, averaged over pairs. Lbar is clamped
    to <= -1e-12 as in ORPO. Metrics: rewards = beta * logit p, nll = mean(-Lbar(y_w)).
    """
    _check_positive("asft", "beta", beta)
    _check_nonnegative("asft", "lam", lam)
    avg_w = average_logp(inputs.policy_chosen, inputs.chosen_mask)
    avg_l = average_logp(inputs.policy_rejected, inputs.rejected_mask)
    logit_w, logit_l = log_odds(avg_w), log_odds(avg_l)
    absolute = -jax.nn.log_sigmoid(beta * logit_w) - jax.nn.log_sigmoid(-beta * logit_l)
    per_pair = -avg_w + lam * absolute
    metrics = implicit_reward_metrics(logit_w, logit_l, beta) | _logp_metrics(avg_w, avg_l)
    metrics |= {"nll": jnp.mean(-avg_w), "loss/absolute": jnp.mean(absolute)}
    return jnp.mean(per_pair), metrics
