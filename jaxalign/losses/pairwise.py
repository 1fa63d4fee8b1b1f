"""Reference-based pairwise preference objectives (docs/objectives.md, "Reference-based pairwise objectives").

Every objective here has the semantics of the `loss_type` of the same name in TRL 1.16.0's `DPOTrainer`
(`trl/trainer/dpo_trainer.py`, `_compute_loss`), except `cdpo`, which TRL 1.16.0 no longer has as a loss_type
(its `sigmoid` ignores `label_smoothing`); `cdpo` is conservative DPO (Mitchell 2023).

Notation (docs/objectives.md, "Conventions"): L(y) = sum_t m_t logp_t over the completion, z = L_theta(y) - L_ref(y)
(summed), Delta = z_w - z_l, |y| = number of completion tokens (clamped to >= 1, as TRL does). All losses are batch
means of a per-pair loss. Hyper-parameters given as Python numbers are validated eagerly with one ValueError that
names the objective, the parameter and the value; traced values (e.g. a beta swept under jit) are not checked.

Loss modifiers (TRL 1.16.0 semantics, math in `jaxalign.losses.modifiers`) are keyword-only arguments, declared in
each registry entry and routed by `compute_objective(..., f_divergence=, f_alpha=, ld_alpha=, wpo=)`:

- f_divergence / f_alpha: objectives built on the reward difference (sigmoid, cdpo, robust, hinge, ipo, exo_pair,
  discopop, sigmoid_norm) use s(z_w) - s(z_l) instead of z_w - z_l (ipo / sigmoid_norm: s(z)/|y|); sft accepts and
  ignores it, as TRL does. The others (nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down) do not
  accept it (TRL raises there too).
- ld_alpha: every objective here; the LD-weighted sequence log-probs replace L(y) everywhere (also in aot's sorted
  margins and in the logged rewards), while ipo / sigmoid_norm still divide by the full |y| and sft's token mean
  reads the unweighted tokens (TRL's form).
- pair_weights (WPO through compute_objective(wpo=True)): every objective except aot / aot_unpaired, whose batch
  sort would misalign per-pair weights.

The registry entry `sigmoid` (plain DPO) lives in `jaxalign.losses.dpo`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxalign.losses.common import (
    check_hyperparameter,
    check_objective_beta,
    modified_scores,
    pair_mean,
    sequence_logps,
    smoothed_logistic,
)
from jaxalign.losses.dpo import implicit_reward_metrics, nll_per_token
from jaxalign.losses.modifiers import MODIFIERS
from jaxalign.losses.registry import PairwiseInputs, compute_objective, register

Metrics = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------------------------
# helpers

NO_F_DIVERGENCE = ("ld_alpha", "wpo")  # absolute-reward losses: the f-DPO log Z(x) term would not cancel
SORTED = ("ld_alpha",)  # batch-sorting losses: no per-pair weights either


def _lengths(inputs: PairwiseInputs) -> tuple[jax.Array, jax.Array]:
    """(|y_w|, |y_l|) clamped to >= 1, as TRL's ipo / sigmoid_norm do (never LD-weighted)."""
    n_w = jnp.sum(inputs.chosen_mask.astype(jnp.float32), axis=-1)
    n_l = jnp.sum(inputs.rejected_mask.astype(jnp.float32), axis=-1)
    return jnp.maximum(n_w, 1.0), jnp.maximum(n_l, 1.0)


def _finish(
    per_pair: jax.Array, z_chosen: jax.Array, z_rejected: jax.Array, beta: Any, pair_weights: Any = None
) -> tuple[jax.Array, Metrics]:
    return pair_mean(per_pair, pair_weights), implicit_reward_metrics(z_chosen, z_rejected, beta)


# ----------------------------------------------------------------------------------------------------------------
# objectives


@register("cdpo", modifiers=MODIFIERS)
def cdpo(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 0.1, *, f_divergence: str = "reverse_kl",
         f_alpha: float = 0.5, ld_alpha: float | None = None, pair_weights: jax.Array | None = None):
    """Conservative DPO (Mitchell, "A note on DPO with noisy preferences", 2023; cDPO):
    -(1-eps) logsig(beta*Delta) - eps logsig(-beta*Delta), i.e. DPO's eq. 7 with labels flipped w.p. eps.

    Not a TRL 1.16.0 loss_type (TRL's `sigmoid` ignores label_smoothing). eps in [0, 0.5]; default 0.1. It depends
    on the rewards only through their difference, so it accepts an f-divergence like `sigmoid` does.
    """
    check_objective_beta("cdpo", beta)
    check_hyperparameter("cdpo", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 0.5, "0 <= label_smoothing <= 0.5")
    s_w, s_l, z_w, z_l = modified_scores(
        "cdpo", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    return _finish(smoothed_logistic(beta * (s_w - s_l), label_smoothing), z_w, z_l, beta, pair_weights)


@register("robust", modifiers=MODIFIERS)
def robust(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 0.0, *,
           f_divergence: str = "reverse_kl", f_alpha: float = 0.5, ld_alpha: float | None = None,
           pair_weights: jax.Array | None = None):
    """Robust DPO (Chowdhury et al., 2024, "Provably Robust DPO", eq. 10 / TRL loss_type="robust"):
    [-(1-eps) logsig(beta*Delta) + eps logsig(-beta*Delta)] / (1 - 2 eps), the unbiased loss under label-flip rate
    eps in [0, 0.5). (TRL only warns outside that range; here it is an error.)
    """
    check_objective_beta("robust", beta)
    check_hyperparameter("robust", "label_smoothing", label_smoothing, lambda e: 0.0 <= e < 0.5, "0 <= label_smoothing < 0.5")
    s_w, s_l, z_w, z_l = modified_scores(
        "robust", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    x = beta * (s_w - s_l)
    per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) + label_smoothing * jax.nn.log_sigmoid(-x)) / (
        1.0 - 2.0 * label_smoothing
    )
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("hinge", modifiers=MODIFIERS)
def hinge(inputs: PairwiseInputs, beta: float = 0.1, *, f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
          ld_alpha: float | None = None, pair_weights: jax.Array | None = None):
    """SLiC-HF hinge loss (Zhao et al., 2023, eq. 2 calibration term; TRL loss_type="hinge"):
    relu(1 - beta*Delta), with 1/beta playing the role of the margin delta."""
    check_objective_beta("hinge", beta)
    s_w, s_l, z_w, z_l = modified_scores(
        "hinge", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    return _finish(jax.nn.relu(1.0 - beta * (s_w - s_l)), z_w, z_l, beta, pair_weights)


@register("ipo", modifiers=MODIFIERS)
def ipo(inputs: PairwiseInputs, beta: float = 0.1, *, f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
        ld_alpha: float | None = None, pair_weights: jax.Array | None = None):
    """IPO (Azar et al., 2023, eq. 17; TRL loss_type="ipo"): (z_w/|y_w| - z_l/|y_l| - 1/(2 beta))^2.

    The log-ratios are averaged per token (TRL's form, confirmed by the IPO authors); beta is the paper's tau.
    With modifiers: s(z)/|y| with the full |y| even under ld_alpha (TRL 1.16.0).
    """
    check_objective_beta("ipo", beta)
    s_w, s_l, z_w, z_l = modified_scores(
        "ipo", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    n_w, n_l = _lengths(inputs)
    per_pair = (s_w / n_w - s_l / n_l - 1.0 / (2.0 * beta)) ** 2
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("exo_pair", modifiers=MODIFIERS)
def exo_pair(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 1e-3, *,
             f_divergence: str = "reverse_kl", f_alpha: float = 0.5, ld_alpha: float | None = None,
             pair_weights: jax.Array | None = None):
    """EXO-pref (Ji et al., 2024, "Towards Efficient Exact Optimization of LM Alignment", eq. 16, K=2;
    TRL loss_type="exo_pair"): KL(q || p) with q = (sig(bD), sig(-bD)) and target p = (1-eps, eps):
    sig(bD)(logsig(bD) - log(1-eps)) + sig(-bD)(logsig(-bD) - log eps). Needs 0 < eps < 1; default 1e-3 (the
    paper's recommendation; TRL's default 0 raises there too).
    """
    check_objective_beta("exo_pair", beta)
    check_hyperparameter("exo_pair", "label_smoothing", label_smoothing, lambda e: 0.0 < e < 1.0, "0 < label_smoothing < 1")
    s_w, s_l, z_w, z_l = modified_scores(
        "exo_pair", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    x = beta * (s_w - s_l)
    per_pair = jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - jnp.log1p(-label_smoothing)) + jax.nn.sigmoid(-x) * (
        jax.nn.log_sigmoid(-x) - jnp.log(label_smoothing)
    )
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("nca_pair", modifiers=NO_F_DIVERGENCE)
def nca_pair(inputs: PairwiseInputs, beta: float = 0.1, *, ld_alpha: float | None = None,
             pair_weights: jax.Array | None = None):
    """NCA, pairwise (Chen et al., 2024, "Noise Contrastive Alignment", eq. 11 with K=1; TRL loss_type="nca_pair"):
    -logsig(b z_w) - 0.5 logsig(-b z_w) - 0.5 logsig(-b z_l). It optimises absolute rewards: the chosen gradient
    turns positive once sig(b z_w) > 2/3."""
    check_objective_beta("nca_pair", beta)
    _, _, z_w, z_l = modified_scores("nca_pair", inputs, ld_alpha=ld_alpha, pair_weights=pair_weights)
    rw, rl = beta * z_w, beta * z_l
    per_pair = -jax.nn.log_sigmoid(rw) - 0.5 * jax.nn.log_sigmoid(-rw) - 0.5 * jax.nn.log_sigmoid(-rl)
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("bco_pair", modifiers=NO_F_DIVERGENCE)
def bco_pair(inputs: PairwiseInputs, beta: float = 0.1, *, ld_alpha: float | None = None,
             pair_weights: jax.Array | None = None):
    """BCO, paired form without the running-mean shift (Jung et al., 2024, "Binary Classifier Optimization";
    TRL loss_type="bco_pair"): -logsig(b z_w) - logsig(-b z_l)."""
    check_objective_beta("bco_pair", beta)
    _, _, z_w, z_l = modified_scores("bco_pair", inputs, ld_alpha=ld_alpha, pair_weights=pair_weights)
    per_pair = -jax.nn.log_sigmoid(beta * z_w) - jax.nn.log_sigmoid(-beta * z_l)
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("sppo_hard", modifiers=NO_F_DIVERGENCE)
def sppo_hard(inputs: PairwiseInputs, beta: float = 0.1, *, ld_alpha: float | None = None,
              pair_weights: jax.Array | None = None):
    """SPPO with hard win probabilities (Wu et al., 2024, "Self-Play Preference Optimization", eq. 4.7 with P=1 for
    the winner and 0 for the loser; TRL loss_type="sppo_hard"): (z_w - 1/(2b))^2 + (z_l + 1/(2b))^2.
    It regresses each log-ratio to a target, so past the target (z_w > 1/(2b)) the chosen gradient flips sign."""
    check_objective_beta("sppo_hard", beta)
    _, _, z_w, z_l = modified_scores("sppo_hard", inputs, ld_alpha=ld_alpha, pair_weights=pair_weights)
    per_pair = (z_w - 0.5 / beta) ** 2 + (z_l + 0.5 / beta) ** 2
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("aot", batch_coupled=True, modifiers=SORTED)
def aot(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 0.0, *, ld_alpha: float | None = None):
    """AOT, paired (Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via Optimal Transport";
    TRL loss_type="aot"): d = sort_batch(L_th(y_w) - L_th(y_l)) - sort_batch(L_ref(y_w) - L_ref(y_l)),
    loss -(1-eps) logsig(b d) - eps logsig(-b d). The sort is over the batch (first-order stochastic dominance);
    the implicit-reward metrics use the unsorted z. eps in [0, 0.5].
    """
    check_objective_beta("aot", beta)
    check_hyperparameter("aot", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 0.5, "0 <= label_smoothing <= 0.5")
    _, _, z_w, z_l = modified_scores("aot", inputs, ld_alpha=ld_alpha)
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = sequence_logps(inputs, ld_alpha)
    d = jnp.sort(policy_chosen - policy_rejected, axis=0) - jnp.sort(reference_chosen - reference_rejected, axis=0)
    return _finish(smoothed_logistic(beta * d, label_smoothing), z_w, z_l, beta)


@register("aot_unpaired", batch_coupled=True, modifiers=SORTED)
def aot_unpaired(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 0.0, *,
                 ld_alpha: float | None = None):
    """AOT, unpaired (Melnyk et al., 2024; TRL loss_type="aot_unpaired"): d = sort_batch(z_w) - sort_batch(z_l),
    loss -(1-eps) logsig(b d) - eps logsig(-b d); eps in [0, 0.5]."""
    check_objective_beta("aot_unpaired", beta)
    check_hyperparameter(
        "aot_unpaired", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 0.5, "0 <= label_smoothing <= 0.5"
    )
    _, _, z_w, z_l = modified_scores("aot_unpaired", inputs, ld_alpha=ld_alpha)
    d = jnp.sort(z_w, axis=0) - jnp.sort(z_l, axis=0)
    return _finish(smoothed_logistic(beta * d, label_smoothing), z_w, z_l, beta)


@register("apo_zero", modifiers=NO_F_DIVERGENCE)
def apo_zero(inputs: PairwiseInputs, beta: float = 0.1, *, ld_alpha: float | None = None,
             pair_weights: jax.Array | None = None):
    """APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization", eq. 7; TRL loss_type="apo_zero"):
    1 - sig(b z_w) + sig(b z_l): raise the chosen likelihood, lower the rejected one."""
    check_objective_beta("apo_zero", beta)
    _, _, z_w, z_l = modified_scores("apo_zero", inputs, ld_alpha=ld_alpha, pair_weights=pair_weights)
    per_pair = 1.0 - jax.nn.sigmoid(beta * z_w) + jax.nn.sigmoid(beta * z_l)
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("apo_down", modifiers=NO_F_DIVERGENCE)
def apo_down(inputs: PairwiseInputs, beta: float = 0.1, *, ld_alpha: float | None = None,
             pair_weights: jax.Array | None = None):
    """APO-down (D'Oosterlinck et al., 2024, eq. 8; TRL loss_type="apo_down"): sig(b z_w) + 1 - sig(b (z_w - z_l)):
    lower the chosen likelihood and the rejected one more. The chosen gradient is b[sig'(b z_w) - sig'(b Delta)],
    positive (chosen pushed down) when |z_w| < |Delta|, e.g. near the reference."""
    check_objective_beta("apo_down", beta)
    _, _, z_w, z_l = modified_scores("apo_down", inputs, ld_alpha=ld_alpha, pair_weights=pair_weights)
    per_pair = jax.nn.sigmoid(beta * z_w) + 1.0 - jax.nn.sigmoid(beta * (z_w - z_l))
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("discopop", modifiers=MODIFIERS)
def discopop(inputs: PairwiseInputs, beta: float = 0.1, tau: float = 0.05, *, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5, ld_alpha: float | None = None, pair_weights: jax.Array | None = None):
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al., 2024, "Discovering Preference Optimization Algorithms
    with and for LLMs", eq. 5; TRL loss_type="discopop" with discopop_tau): x = b*Delta, m = sig(x/tau),
    loss (1-m)(-logsig x) + m exp(-x). Non-convex: for |x| below ~0.2 (tau=0.05) the modulation term dominates and
    the gradient pushes Delta down."""
    check_objective_beta("discopop", beta)
    check_hyperparameter("discopop", "tau", tau, lambda t: t > 0, "tau > 0")
    s_w, s_l, z_w, z_l = modified_scores(
        "discopop", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    x = beta * (s_w - s_l)
    m = jax.nn.sigmoid(x / tau)
    per_pair = (1.0 - m) * (-jax.nn.log_sigmoid(x)) + m * jnp.exp(-x)
    return _finish(per_pair, z_w, z_l, beta, pair_weights)


@register("sft", batch_coupled=True, modifiers=MODIFIERS)
def sft(inputs: PairwiseInputs, beta: float = 0.1, *, f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
        ld_alpha: float | None = None, pair_weights: jax.Array | None = None):
    """SFT term of TRL's loss_type="sft" (used beside a preference loss, e.g. RPO, Pang et al., 2024):
    -(mean of policy logp over all chosen completion tokens of the batch), the same scalar for every pair.
    beta only scales the logged implicit rewards. An all-padding batch gives 0 (the token count is clamped to 1).

    Modifiers, as TRL 1.16.0: an f_divergence is accepted and has no effect; ld_alpha changes only the logged
    rewards (the token mean reads the unweighted tokens); pair_weights w give loss * mean(w), i.e. the broadcast
    per-pair loss times w before the mean (TRL 1.16.0 means this but raises a RuntimeError there: it multiplies an
    expanded view in place).
    """
    check_objective_beta("sft", beta)
    _, _, z_w, z_l = modified_scores(
        "sft", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    total, count = nll_per_token(inputs.policy_chosen, inputs.chosen_mask)
    loss = total / jnp.maximum(count, 1.0)
    if pair_weights is not None:
        loss = pair_mean(jnp.broadcast_to(loss, z_w.shape), pair_weights)
    return loss, implicit_reward_metrics(z_w, z_l, beta)


@register("sigmoid_norm", modifiers=MODIFIERS)
def sigmoid_norm(inputs: PairwiseInputs, beta: float = 0.1, *, f_divergence: str = "reverse_kl",
                 f_alpha: float = 0.5, ld_alpha: float | None = None, pair_weights: jax.Array | None = None):
    """Length-normalised DPO (TRL loss_type="sigmoid_norm"; cf. the length-normalised ablation in SimPO, Meng et al.
    2024, here still with the reference): -logsig(b (z_w/|y_w| - z_l/|y_l|)).
    With modifiers: s(z)/|y| with the full |y| even under ld_alpha (TRL 1.16.0)."""
    check_objective_beta("sigmoid_norm", beta)
    s_w, s_l, z_w, z_l = modified_scores(
        "sigmoid_norm", inputs, f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, pair_weights=pair_weights
    )
    n_w, n_l = _lengths(inputs)
    return _finish(-jax.nn.log_sigmoid(beta * (s_w / n_w - s_l / n_l)), z_w, z_l, beta, pair_weights)


# ----------------------------------------------------------------------------------------------------------------
# combinations


def combine(
    inputs: PairwiseInputs,
    terms: Sequence[tuple[str, float, dict[str, Any]]],
    *,
    f_divergence: str | None = None,
    f_alpha: Any = 0.5,
    ld_alpha: Any = None,
    wpo: bool = False,
) -> tuple[jax.Array, Metrics]:
    """sum_k w_k * loss_k over registered objectives, each loss_k a batch mean (docs/objectives.md, "Conventions"),
    e.g. DPO + lambda*SFT = RPO (Pang et al. 2024); TRL's list-valued loss_type with loss_weights.

    `terms` is [(name, weight, kwargs), ...]. Metrics are namespaced "<name>/<metric>" plus "<name>/loss" (the
    unweighted term); a name used twice gets "<name>#<k>" (k = its position) for its later occurrences.

    Modifiers: the keyword arguments f_divergence, f_alpha, ld_alpha, wpo apply to EVERY term, as TRL 1.16.0
    applies its modifiers to every loss of a list loss_type (so, as in TRL, an f_divergence needs every term to
    accept one). Each term is evaluated through `compute_objective`, and a term's kwargs may override them for that
    term alone (e.g. ("sft", 0.3, {"wpo": False})).
    """
    if not terms:
        raise ValueError("combine needs at least one (name, weight, kwargs) term, got none")
    shared = {"f_divergence": f_divergence, "f_alpha": f_alpha, "ld_alpha": ld_alpha, "wpo": wpo}
    total = jnp.zeros((), jnp.float32)
    metrics: Metrics = {}
    for k, term in enumerate(terms):
        if not (isinstance(term, (tuple, list)) and len(term) == 3):
            raise ValueError(f"combine term {k} must be (name, weight, kwargs), got {term!r}")
        name, weight, kwargs = term
        check_hyperparameter(
            "combine", f"weight[{k}] ({name})", weight, lambda w: w == w and abs(w) != float("inf"), "finite"
        )
        loss, term_metrics = compute_objective(name, inputs, **{**shared, **dict(kwargs or {})})
        prefix = name if name not in {n for n, _, _ in terms[:k]} else f"{name}#{k}"
        total = total + weight * loss
        metrics[f"{prefix}/loss"] = loss
        metrics.update({f"{prefix}/{key}": value for key, value in term_metrics.items()})
    return total, metrics
