"""Weighted and regularised pairwise DPO variants (docs/objectives.md, "Weighted and regularised objectives").

Every objective here is DPO's Bradley-Terry logistic loss (Rafailov et al., 2023, eq. 7) with one change: a
per-pair weight read from a declared extra (MADPO, Sem-DPO), a smoothed preference probability (SmPO), an SFT
regulariser (SFT-DPO), separate temperatures for the two log-ratios (Flex-DPO) or token-level reward guidance
(TGDPO). Notation of docs/objectives.md: z = L_theta(y) - L_ref(y) summed over the completion tokens,
Delta = z_w - z_l, beta the KL strength (default 0.1). Losses are batch means of per-pair losses.

Extras (declared in the registry, so a trainer can ask `get_spec(name).extras` what to compute) are read with
`require_extra`, which raises one ValueError naming the objective and the missing or mis-shaped field. Extras are
data, not parameters: every weight computed from them is wrapped in `stop_gradient`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.logprobs import sequence_logprobs
from jaxalign.losses.common import check_hyperparameter, check_objective_beta, log_ratios
from jaxalign.losses.dpo import implicit_reward_metrics
from jaxalign.losses.registry import PairwiseInputs, register

Metrics = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------------------------
# extras


def require_extra(objective: str, extras: dict, name: str, shape: tuple, what: str) -> jax.Array:
    """`extras[name]` checked to have `shape` (static shapes; an entry None accepts any non-zero size); one clear
    ValueError otherwise. `what` says what the array is, so the message tells a trainer what to supply."""
    expected = "[" + ", ".join("m" if d is None else str(d) for d in shape) + "]"
    if name not in extras:
        present = ", ".join(sorted(extras)) or "none"
        raise ValueError(
            f"{objective}: inputs.extras[{name!r}] is missing; {objective} needs {what}, shape {expected} "
            f"(extras present: {present})"
        )
    value = jnp.asarray(extras[name])
    ok = value.ndim == len(shape) and all(
        (d is None and s > 0) or s == d for s, d in zip(value.shape, shape)
    )
    if not ok:
        raise ValueError(
            f"{objective}: inputs.extras[{name!r}] must have shape {expected} ({what}), got {list(value.shape)}"
        )
    return value


def check_extra_values(objective: str, name: str, value: jax.Array, ok, expected: str) -> None:
    """Range check of a concrete extra (skipped for traced values, which cannot be inspected eagerly)."""
    if isinstance(value, jax.core.Tracer):
        return
    array = np.asarray(value, dtype=np.float64)
    bad = ~ok(array)
    if np.any(bad):
        first = array[bad].ravel()[0]
        raise ValueError(f"{objective}: inputs.extras[{name!r}] must satisfy {expected}; found {first!r}")


def _finite(x):
    return np.isfinite(x)


def _pairs(inputs: PairwiseInputs) -> int:
    return inputs.chosen_mask.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# objectives


@register("madpo", extras=("reward_margin",))
def madpo(inputs: PairwiseInputs, beta: float = 0.1, temperature: float = 1.0):
    """MADPO, margin-adaptive DPO ("Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference
    Optimization", 2025): a per-pair weight from a Bradley-Terry reward model's margin h = r(y_w) - r(y_l),

        loss = w(h) * -logsig(beta * Delta),   w(h) = 2 * sigmoid(-h / T),  no gradient through w.

    The paper (abstract; the loss -w(h) logsig(beta Delta) with h from a fixed,
    separately trained reward model is confirmed by a secondary summary of the paper) requires a continuous weight
    that is larger for hard (small- or negative-margin) pairs and smaller for easy ones; its exact w was not
    retrieved, so this smooth,
    decreasing form is OUR CHOICE: w(0) = 1 (plain DPO on a pair the reward model cannot separate), w -> 2 for
    pairs the reward model ranks the other way, w -> 0 for very easy pairs. T > 0 (`temperature`, default 1.0)
    sets how fast the weight decays in reward units.

    Extras: "reward_margin" [pairs], h = r(y_w) - r(y_l) from a reward model trained first (e.g.
    `jaxalign.algorithms.reward_model`). Metrics add "weight/mean", "weight/min", "weight/max".
    """
    check_objective_beta("madpo", beta)
    check_hyperparameter("madpo", "temperature", temperature, lambda t: t > 0 and np.isfinite(t), "temperature > 0")
    h = require_extra("madpo", inputs.extras, "reward_margin", (_pairs(inputs),),
                      "the reward model's margin r(y_w) - r(y_l) per pair")
    check_extra_values("madpo", "reward_margin", h, _finite, "finite values")
    weight = jax.lax.stop_gradient(2.0 * jax.nn.sigmoid(-h.astype(jnp.float32) / temperature))
    z_w, z_l = log_ratios(inputs)
    per_pair = weight * -jax.nn.log_sigmoid(beta * (z_w - z_l))
    metrics = implicit_reward_metrics(z_w, z_l, beta)
    metrics |= {"weight/mean": jnp.mean(weight), "weight/min": jnp.min(weight), "weight/max": jnp.max(weight)}
    return jnp.mean(per_pair), metrics


@register("sem_dpo", extras=("semantic_distance",))
def sem_dpo(inputs: PairwiseInputs, beta: float = 0.1, alpha: float = 1.0):
    """Sem-DPO ("Sem-DPO: Mitigating Semantic Inconsistency in Preference Optimization for Prompt Engineering",
    2025; from the paper): DPO weighted per pair by the semantic closeness of the winning completion
    to the original input,

        loss = exp(-alpha * d) * -logsig(beta * Delta),   d = d_cos(e(x), e(y_w)) = 1 - cos(e(x), e(y_w)),

    e a (frozen) text embedding, no gradient through the weight. alpha = 0 is plain DPO (`sigmoid`) exactly;
    alpha >= 0 (default 1.0, our choice: the abstract gives no value). d must lie in [0, 2] (checked when concrete).

    Extras: "semantic_distance" [pairs], the cosine distance between the embeddings of the prompt and the chosen
    completion (computed by the trainer with any sentence embedding). Metrics add "weight/mean".
    """
    check_objective_beta("sem_dpo", beta)
    check_hyperparameter("sem_dpo", "alpha", alpha, lambda a: a >= 0 and np.isfinite(a), "alpha >= 0")
    d = require_extra("sem_dpo", inputs.extras, "semantic_distance", (_pairs(inputs),),
                      "the cosine distance d_cos(e(x), e(y_w)) per pair")
    check_extra_values("sem_dpo", "semantic_distance", d, lambda v: (v >= 0) & (v <= 2),
                       "0 <= d <= 2 (a cosine distance)")
    weight = jax.lax.stop_gradient(jnp.exp(-alpha * d.astype(jnp.float32)))
    z_w, z_l = log_ratios(inputs)
    per_pair = weight * -jax.nn.log_sigmoid(beta * (z_w - z_l))
    return jnp.mean(per_pair), implicit_reward_metrics(z_w, z_l, beta) | {"weight/mean": jnp.mean(weight)}


@register("smpo", extras=("preference_probability",))
def smpo(inputs: PairwiseInputs, beta: float = 0.1, gamma: float = 1.0):
    """SmPO, smoothed preference optimisation ("Smoothed Preference Optimization via ReNoise Inversion for Aligning
    Diffusion Models with Varied Human Preferences", Lu et al., 2025; from the paper):

        loss = -logsig((2 * alpha - gamma) * beta * Delta),

    alpha = the smoothed probability (from a reward model) that y_w is preferred to y_l, gamma a sensitivity factor.
    The abstract says the binary label is replaced by a smoothed preference distribution and the likelihoods are
    averaged "such that the loss approaches zero [goes flat] when preferences are similar". A secondary summary of
    the paper (its eqs. 8-9, not read in the original) gives the smoothed densities p(y_w)^alpha p(y_l)^(gamma-alpha)
    / Z and the loss above. With gamma = 1 this is the normalised geometric mean of the two labels,
    sig(x)^alpha sig(-x)^(1-alpha) / (same + swapped) = sig((2 alpha - 1) x), hence the default gamma = 1.0 (our
    choice; the paper's value was not retrieved): alpha = 1 is plain DPO, alpha = 0.5 gives a constant loss log 2
    with zero gradient, alpha < 0.5 reverses the pair. In general the loss is flat wherever 2 alpha = gamma (so
    "alpha = 0.5, gamma = 0" is NOT flat: it is DPO). gamma must be >= 0.

    Extras: "preference_probability" [pairs], alpha in [0, 1] (e.g. sig(r(y_w) - r(y_l)) from a reward model).
    """
    check_objective_beta("smpo", beta)
    check_hyperparameter("smpo", "gamma", gamma, lambda g: g >= 0 and np.isfinite(g), "gamma >= 0")
    alpha = require_extra("smpo", inputs.extras, "preference_probability", (_pairs(inputs),),
                          "the smoothed probability alpha that y_w is preferred, per pair")
    check_extra_values("smpo", "preference_probability", alpha, lambda v: (v >= 0) & (v <= 1), "0 <= alpha <= 1")
    scale = jax.lax.stop_gradient(2.0 * alpha.astype(jnp.float32) - gamma)
    z_w, z_l = log_ratios(inputs)
    per_pair = -jax.nn.log_sigmoid(scale * beta * (z_w - z_l))
    return jnp.mean(per_pair), implicit_reward_metrics(z_w, z_l, beta) | {"scale/mean": jnp.mean(scale)}


@register("sft_dpo")
def sft_dpo(inputs: PairwiseInputs, beta: float = 0.1, sft_weight: float = 1.0):
    """SFT-DPO ("3D-Properties: Identifying Challenges in DPO and Charting a Path Forward", Yan et al., 2024;
    from the paper): L_DPO + lambda * NLL(y_w), a regulariser against the drastic drop of the chosen
    (and rejected) likelihoods.

    NLL(y_w) here is, per pair, the chosen completion's token-mean negative log-likelihood -L(y_w)/|y_w| (0 for an
    empty completion), averaged over pairs. That is the normalisation of `dpo_loss_fn(sft_weight=...)` in
    jaxalign.train.step, and unlike a batch token mean (the registered `sft`, TRL's) it is a per-pair loss, so
    gradient accumulation stays exact (not batch-coupled). lambda = `sft_weight` >= 0, default 1.0 (our choice).
    Metrics add "nll" and "loss/preference".
    """
    check_objective_beta("sft_dpo", beta)
    check_hyperparameter("sft_dpo", "sft_weight", sft_weight, lambda w: w >= 0 and np.isfinite(w), "sft_weight >= 0")
    z_w, z_l = log_ratios(inputs)
    preference = -jax.nn.log_sigmoid(beta * (z_w - z_l))
    nll = -sequence_logprobs(inputs.policy_chosen, inputs.chosen_mask, average=True)
    metrics = implicit_reward_metrics(z_w, z_l, beta) | {"nll": jnp.mean(nll), "loss/preference": jnp.mean(preference)}
    return jnp.mean(preference + sft_weight * nll), metrics


@register("flex_dpo", beta_aliases={"beta_chosen": lambda beta: beta, "beta_rejected": lambda beta: beta})
def flex_dpo(inputs: PairwiseInputs, beta_chosen: float = 0.1, beta_rejected: float = 0.1):
    """Flex-DPO ("3D-Properties", Yan et al., 2024; from the paper): separate KL strengths for the
    chosen and the rejected log-ratio, -logsig(beta_w * z_w - beta_l * z_l).

    With beta_w = beta_l = beta it is DPO exactly (the defaults, 0.1 each). A larger beta_l than beta_w makes the
    loss saturate sooner on the rejected side, which slows the collapse of the rejected likelihood. Both > 0.
    Metrics: rewards/chosen = beta_w z_w, rewards/rejected = beta_l z_l, their margin, and the convention's
    accuracy mean(z_w > z_l).
    """
    check_hyperparameter("flex_dpo", "beta_chosen", beta_chosen, lambda b: b > 0 and np.isfinite(b), "beta_chosen > 0")
    check_hyperparameter("flex_dpo", "beta_rejected", beta_rejected, lambda b: b > 0 and np.isfinite(b),
                         "beta_rejected > 0")
    z_w, z_l = log_ratios(inputs)
    chosen, rejected = beta_chosen * z_w, beta_rejected * z_l
    per_pair = -jax.nn.log_sigmoid(chosen - rejected)
    metrics = {
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/margin": jnp.mean(chosen - rejected),
        "rewards/accuracy": jnp.mean((z_w > z_l).astype(jnp.float32)),
    }
    return jnp.mean(per_pair), metrics


@register("tgdpo", extras=("guidance_chosen", "guidance_rejected"))
def tgdpo(inputs: PairwiseInputs, beta: float = 0.1, alpha: float = 0.5, guidance_beta: Any = None):
    """TGDPO, DPO with token-level reward guidance (Zhu et al., 2025, "TGDPO: Harnessing Token-Level Reward
    Guidance for Enhancing Direct Preference Optimization"; from the paper, the practical guidance
    from an induced DPO reward):

        loss = -logsig( sum_t beta (1 + a rhat_w,t) rho_w,t  -  sum_t beta (1 - a rhat_l,t) rho_l,t ),

    rho_t = logp_theta(y_t) - logp_ref(y_t) per completion token, rhat_t = beta_g * (logp_guide(y_t) - logp_ref(y_t))
    the dense implicit reward of a previously trained DPO policy (the guide), no gradient. Tokens the guide rewards
    get a larger KL-strength on the chosen side and a smaller one on the rejected side. beta = 0.1, a = `alpha` =
    0.5 (the paper's settings); beta_g = `guidance_beta` defaults to beta. With the guide equal to
    the reference (rhat = 0) or a = 0 it is DPO (`sigmoid`) exactly.

    Extras: "guidance_chosen" and "guidance_rejected", the guide policy's per-token log-probs [pairs, time] of the
    chosen and rejected completions, aligned with (and the same shape as) the policy's. Metrics add
    "guidance/chosen" and "guidance/rejected" (mean over completion tokens of rhat).
    """
    check_objective_beta("tgdpo", beta)
    check_hyperparameter("tgdpo", "alpha", alpha, lambda a: a >= 0 and np.isfinite(a), "alpha >= 0")
    if guidance_beta is None:
        guidance_beta = beta
    check_hyperparameter("tgdpo", "guidance_beta", guidance_beta, lambda b: b > 0 and np.isfinite(b),
                         "guidance_beta > 0")
    guide_w = require_extra("tgdpo", inputs.extras, "guidance_chosen", tuple(inputs.policy_chosen.shape),
                            "the guide policy's per-token log-probs of the chosen completions")
    guide_l = require_extra("tgdpo", inputs.extras, "guidance_rejected", tuple(inputs.policy_rejected.shape),
                            "the guide policy's per-token log-probs of the rejected completions")
    mask_w = inputs.chosen_mask.astype(jnp.float32)
    mask_l = inputs.rejected_mask.astype(jnp.float32)
    rhat_w = jax.lax.stop_gradient(guidance_beta * (guide_w - inputs.reference_chosen) * mask_w)
    rhat_l = jax.lax.stop_gradient(guidance_beta * (guide_l - inputs.reference_rejected) * mask_l)
    rho_w = (inputs.policy_chosen - inputs.reference_chosen) * mask_w
    rho_l = (inputs.policy_rejected - inputs.reference_rejected) * mask_l
    chosen = jnp.sum(beta * (1.0 + alpha * rhat_w) * rho_w, axis=-1)
    rejected = jnp.sum(beta * (1.0 - alpha * rhat_l) * rho_l, axis=-1)
    logits = chosen - rejected
    z_w, z_l = log_ratios(inputs)
    metrics = implicit_reward_metrics(z_w, z_l, beta)
    metrics |= {
        "guidance/chosen": jnp.sum(rhat_w) / jnp.maximum(jnp.sum(mask_w), 1.0),
        "guidance/rejected": jnp.sum(rhat_l) / jnp.maximum(jnp.sum(mask_l), 1.0),
    }
    return jnp.mean(-jax.nn.log_sigmoid(logits)), metrics
