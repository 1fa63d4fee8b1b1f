"""Helpers shared by the objective families: hyper-parameter checks, log-ratios and their f-divergence scores,
the (optionally pair-weighted) batch mean, the smoothed logistic loss."""
from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses import modifiers
from jaxalign.losses.registry import PairwiseInputs


def check_hyperparameter(objective: str, name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    """Raise one clear ValueError when a Python-number hyper-parameter is out of range (tracers pass through)."""
    if isinstance(value, jax.core.Tracer):
        return  # traced (e.g. swept under jit): cannot be checked eagerly
    if isinstance(value, (bool, str)) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)) or np.ndim(value):
        raise ValueError(f"{objective}.{name} must be a real number ({expected}), got {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{objective}.{name} must satisfy {expected}, got {value!r}")


def check_objective_beta(objective: str, beta: Any) -> None:
    check_hyperparameter(objective, "beta", beta, lambda b: b > 0, "beta > 0 (the KL-penalty strength)")


def log_ratios(inputs: PairwiseInputs, ld_alpha: Any = None) -> tuple[jax.Array, jax.Array]:
    """(z_w, z_l): summed policy-minus-reference completion log-probs of chosen and rejected, shape [pairs].

    With `ld_alpha` (LD-DPO, see `modifiers.ld_token_weights`) the completion tokens past the shorter completion
    of each pair weigh ld_alpha in all four sequence log-probs (TRL 1.16.0 semantics); None leaves them at 1.
    """
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = sequence_logps(inputs, ld_alpha)
    return policy_chosen - reference_chosen, policy_rejected - reference_rejected


def sequence_logps(inputs: PairwiseInputs, ld_alpha: Any = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(L_theta(y_w), L_theta(y_l), L_ref(y_w), L_ref(y_l)), each [pairs]; LD-weighted when ld_alpha is not None."""
    names = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")
    if ld_alpha is None:
        return tuple(inputs.sequence(name) for name in names)  # type: ignore[return-value]
    w_chosen, w_rejected = modifiers.ld_token_weights(inputs.chosen_mask, inputs.rejected_mask, ld_alpha)
    weights = {"chosen": w_chosen, "rejected": w_rejected}
    return tuple(jnp.sum(getattr(inputs, n) * weights[n.split("_")[1]], axis=-1) for n in names)  # type: ignore


def modified_scores(
    objective: str,
    inputs: PairwiseInputs,
    *,
    f_divergence: str = "reverse_kl",
    f_alpha: Any = 0.5,
    ld_alpha: Any = None,
    pair_weights: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`scores` after validating the modifier arguments an objective received (one ValueError naming `objective`)."""
    modifiers.check_f_divergence(objective, f_divergence, f_alpha)
    modifiers.check_ld_alpha(objective, ld_alpha)
    modifiers.check_pair_weights(objective, pair_weights, inputs.chosen_mask.shape[0])
    return scores(inputs, f_divergence, f_alpha, ld_alpha)


def scores(
    inputs: PairwiseInputs, f_divergence: str = "reverse_kl", f_alpha: Any = 0.5, ld_alpha: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(s(z_w), s(z_l), z_w, z_l): the f-divergence scores of the (optionally LD-weighted) summed log-ratios and the
    log-ratios themselves (the implicit-reward metrics use z, as TRL 1.16.0 logs them). See
    `modifiers.f_divergence_score`; the default reverse_kl gives s(z) = z."""
    z_chosen, z_rejected = log_ratios(inputs, ld_alpha)
    s_chosen = modifiers.f_divergence_score(z_chosen, f_divergence, f_alpha)
    s_rejected = modifiers.f_divergence_score(z_rejected, f_divergence, f_alpha)
    return s_chosen, s_rejected, z_chosen, z_rejected


def pair_mean(per_pair: jax.Array, pair_weights: jax.Array | None = None) -> jax.Array:
    """mean_i(w_i * loss_i), the batch mean with optional per-pair weights (e.g. WPO's w(y_w) w(y_l))."""
    if pair_weights is None:
        return jnp.mean(per_pair)
    return jnp.mean(per_pair * pair_weights)


def smoothed_logistic(logits: jax.Array, eps: Any) -> jax.Array:
    """-(1-eps) logsig(x) - eps logsig(-x): the label-smoothed (conservative) logistic loss."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
