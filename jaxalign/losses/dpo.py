"""Direct Preference Optimization (Rafailov et al., 2023) and the SFT term used beside it."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses.common import check_hyperparameter, modified_scores, pair_mean, smoothed_logistic
from jaxalign.losses.modifiers import MODIFIERS
from jaxalign.losses.registry import PairwiseInputs, register


def implicit_reward_metrics(z_chosen: jax.Array, z_rejected: jax.Array, beta: float) -> dict[str, jax.Array]:
    """The metrics logged for every pairwise loss (docs/objectives.md, "Conventions"): beta*z for chosen and rejected,
    their margin and the pair accuracy mean(z_w > z_l)."""
    chosen, rejected = beta * z_chosen, beta * z_rejected
    return {
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/margin": jnp.mean(chosen - rejected),
        "rewards/accuracy": jnp.mean((z_chosen > z_rejected).astype(jnp.float32)),
    }


def check_beta(beta: float) -> None:
    """beta is the KL-regularisation strength; zero or negative values invert or remove the objective."""
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"dpo.beta must be a positive number (the KL-penalty strength), got {beta!r}")


@register("sigmoid", modifiers=MODIFIERS)
def sigmoid(
    inputs: PairwiseInputs,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    ld_alpha: float | None = None,
    pair_weights: jax.Array | None = None,
):
    """DPO loss, Rafailov et al. (2023), eq. 7: -log sigmoid(beta * (z_w - z_l)), z = L_theta(y) - L_ref(y).

    With the default label_smoothing eps = 0 this is TRL 1.16.0's loss_type="sigmoid" exactly. With eps > 0 it is
    the conservative form -(1-eps) logsig(bD) - eps logsig(-bD), the same as the registered `cdpo`; note that TRL
    1.16.0's `sigmoid` ignores label_smoothing (older TRL versions applied it like this). eps must lie in [0, 0.5].

    Modifiers (`jaxalign.losses.modifiers`, TRL 1.16.0 semantics): z_w - z_l becomes s(z_w) - s(z_l) for an
    f_divergence other than reverse_kl; ld_alpha LD-weights the sequence log-probs; pair_weights [pairs] (e.g. WPO)
    multiply the per-pair losses before the mean.
    """
    check_beta(beta)
    check_hyperparameter("sigmoid", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 0.5,
                         "0 <= label_smoothing <= 0.5")
    s_chosen, s_rejected, z_chosen, z_rejected = modified_scores(
        "sigmoid", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    per_pair = smoothed_logistic(beta * (s_chosen - s_rejected), label_smoothing)
    return pair_mean(per_pair, pair_weights), implicit_reward_metrics(z_chosen, z_rejected, beta)


def nll_per_token(token_logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -logp over masked tokens, number of masked tokens): the SFT loss before normalisation."""
    mask = mask.astype(jnp.float32)
    return -jnp.sum(token_logps * mask), jnp.sum(mask)
