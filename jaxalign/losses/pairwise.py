"""Reference-based pairwise preference objectives (METHODS.md section 1).

Every objective here has the semantics of the `loss_type` of the same name in TRL 1.16.0's `DPOTrainer`
(`trl/trainer/dpo_trainer.py`, `_compute_loss`), except `cdpo`, which TRL 1.16.0 no longer has as a loss_type
(its `sigmoid` ignores `label_smoothing`); `cdpo` is the conservative-DPO form of METHODS.md.

Notation (METHODS.md section 0): L(y) = sum_t m_t logp_t over the completion, z = L_theta(y) - L_ref(y) (summed),
Delta = z_w - z_l, |y| = number of completion tokens (clamped to >= 1, as TRL does). All losses are batch means of a
per-pair loss. Hyper-parameters given as Python numbers are validated eagerly with one ValueError that names the
objective, the parameter and the value; traced values (e.g. a beta swept under jit) are not checked.

The registry entry `sigmoid` (plain DPO) lives in `jaxalign.losses.dpo`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxalign.losses.common import check_hyperparameter, check_objective_beta, log_ratios, smoothed_logistic
from jaxalign.losses.dpo import implicit_reward_metrics, nll_per_token
from jaxalign.losses.registry import PairwiseInputs, get_objective, register

Metrics = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _lengths(inputs: PairwiseInputs) -> tuple[jax.Array, jax.Array]:
    """(|y_w|, |y_l|) clamped to >= 1, as TRL's ipo / sigmoid_norm do."""
    n_w = jnp.sum(inputs.chosen_mask.astype(jnp.float32), axis=-1)
    n_l = jnp.sum(inputs.rejected_mask.astype(jnp.float32), axis=-1)
    return jnp.maximum(n_w, 1.0), jnp.maximum(n_l, 1.0)


def _finish(per_pair: jax.Array, z_chosen: jax.Array, z_rejected: jax.Array, beta: Any) -> tuple[jax.Array, Metrics]:
    return jnp.mean(per_pair), implicit_reward_metrics(z_chosen, z_rejected, beta)


# ----------------------------------------------------------------------------------------------------------------
# objectives


@register("cdpo")
def cdpo(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 0.1):
    """Conservative DPO (Mitchell, "A note on DPO with noisy preferences", 2023; cDPO):
    -(1-eps) logsig(beta*Delta) - eps logsig(-beta*Delta), i.e. DPO's eq. 7 with labels flipped w.p. eps.

    Not a TRL 1.16.0 loss_type (TRL's `sigmoid` ignores label_smoothing). eps in [0, 0.5]; default 0.1.
    """
    check_objective_beta("cdpo", beta)
    check_hyperparameter("cdpo", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 0.5, "0 <= label_smoothing <= 0.5")
    z_w, z_l = log_ratios(inputs)
    return _finish(smoothed_logistic(beta * (z_w - z_l), label_smoothing), z_w, z_l, beta)


@register("robust")
def robust(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al., 2024, "Provably Robust DPO", eq. 10 / TRL loss_type="robust"):
    [-(1-eps) logsig(beta*Delta) + eps logsig(-beta*Delta)] / (1 - 2 eps), the unbiased loss under label-flip rate
    eps in [0, 0.5). (TRL only warns outside that range; here it is an error.)
    """
    check_objective_beta("robust", beta)
    check_hyperparameter("robust", "label_smoothing", label_smoothing, lambda e: 0.0 <= e < 0.5, "0 <= label_smoothing < 0.5")
    z_w, z_l = log_ratios(inputs)
    x = beta * (z_w - z_l)
    per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) + label_smoothing * jax.nn.log_sigmoid(-x)) / (
        1.0 - 2.0 * label_smoothing
    )
    return _finish(per_pair, z_w, z_l, beta)


@register("hinge")
def hinge(inputs: PairwiseInputs, beta: float = 0.1):
    """SLiC-HF hinge loss (Zhao et al., 2023, eq. 2 calibration term; TRL loss_type="hinge"):
    relu(1 - beta*Delta), with 1/beta playing the role of the margin delta."""
    check_objective_beta("hinge", beta)
    z_w, z_l = log_ratios(inputs)
    return _finish(jax.nn.relu(1.0 - beta * (z_w - z_l)), z_w, z_l, beta)


@register("ipo")
def ipo(inputs: PairwiseInputs, beta: float = 0.1):
    """IPO (Azar et al., 2023, eq. 17; TRL loss_type="ipo"): (z_w/|y_w| - z_l/|y_l| - 1/(2 beta))^2.

    The log-ratios are averaged per token (TRL's form, confirmed by the IPO authors); beta is the paper's tau.
    """
    check_objective_beta("ipo", beta)
    z_w, z_l = log_ratios(inputs)
    n_w, n_l = _lengths(inputs)
    per_pair = (z_w / n_w - z_l / n_l - 1.0 / (2.0 * beta)) ** 2
    return _finish(per_pair, z_w, z_l, beta)


@register("exo_pair")
def exo_pair(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 1e-3):
    """EXO-pref (Ji et al., 2024, "Towards Efficient Exact Optimization of LM Alignment", eq. 16, K=2;
    TRL loss_type="exo_pair"): KL(q || p) with q = (sig(bD), sig(-bD)) and target p = (1-eps, eps):
    sig(bD)(logsig(bD) - log(1-eps)) + sig(-bD)(logsig(-bD) - log eps). Needs 0 < eps < 1; default 1e-3 (the
    paper's recommendation; TRL's default 0 raises there too).
    """
    check_objective_beta("exo_pair", beta)
    check_hyperparameter("exo_pair", "label_smoothing", label_smoothing, lambda e: 0.0 < e < 1.0, "0 < label_smoothing < 1")
    z_w, z_l = log_ratios(inputs)
    x = beta * (z_w - z_l)
    per_pair = jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - jnp.log1p(-label_smoothing)) + jax.nn.sigmoid(-x) * (
        jax.nn.log_sigmoid(-x) - jnp.log(label_smoothing)
    )
    return _finish(per_pair, z_w, z_l, beta)


@register("nca_pair")
def nca_pair(inputs: PairwiseInputs, beta: float = 0.1):
    """NCA, pairwise (Chen et al., 2024, "Noise Contrastive Alignment", eq. 11 with K=1; TRL loss_type="nca_pair"):
    -logsig(b z_w) - 0.5 logsig(-b z_w) - 0.5 logsig(-b z_l). It optimises absolute rewards: the chosen gradient
    turns positive once sig(b z_w) > 2/3."""
    check_objective_beta("nca_pair", beta)
    z_w, z_l = log_ratios(inputs)
    rw, rl = beta * z_w, beta * z_l
    per_pair = -jax.nn.log_sigmoid(rw) - 0.5 * jax.nn.log_sigmoid(-rw) - 0.5 * jax.nn.log_sigmoid(-rl)
    return _finish(per_pair, z_w, z_l, beta)


@register("bco_pair")
def bco_pair(inputs: PairwiseInputs, beta: float = 0.1):
    """BCO, paired form without the running-mean shift (Jung et al., 2024, "Binary Classifier Optimization";
    TRL loss_type="bco_pair"): -logsig(b z_w) - logsig(-b z_l)."""
    check_objective_beta("bco_pair", beta)
    z_w, z_l = log_ratios(inputs)
    per_pair = -jax.nn.log_sigmoid(beta * z_w) - jax.nn.log_sigmoid(-beta * z_l)
    return _finish(per_pair, z_w, z_l, beta)


@register("sppo_hard")
def sppo_hard(inputs: PairwiseInputs, beta: float = 0.1):
    """SPPO with hard win probabilities (Wu et al., 2024, "Self-Play Preference Optimization", eq. 4.7 with P=1 for
    the winner and 0 for the loser; TRL loss_type="sppo_hard"): (z_w - 1/(2b))^2 + (z_l + 1/(2b))^2.
    It regresses each log-ratio to a target, so past the target (z_w > 1/(2b)) the chosen gradient flips sign."""
    check_objective_beta("sppo_hard", beta)
    z_w, z_l = log_ratios(inputs)
    per_pair = (z_w - 0.5 / beta) ** 2 + (z_l + 0.5 / beta) ** 2
    return _finish(per_pair, z_w, z_l, beta)


@register("aot", batch_coupled=True)
def aot(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 0.0):
    """AOT, paired (Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via Optimal Transport";
    TRL loss_type="aot"): d = sort_batch(L_th(y_w) - L_th(y_l)) - sort_batch(L_ref(y_w) - L_ref(y_l)),
    loss -(1-eps) logsig(b d) - eps logsig(-b d). The sort is over the batch (first-order stochastic dominance);
    the implicit-reward metrics use the unsorted z. eps in [0, 0.5].
    """
    check_objective_beta("aot", beta)
    check_hyperparameter("aot", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 0.5, "0 <= label_smoothing <= 0.5")
    policy_margin = inputs.sequence("policy_chosen") - inputs.sequence("policy_rejected")
    reference_margin = inputs.sequence("reference_chosen") - inputs.sequence("reference_rejected")
    d = jnp.sort(policy_margin, axis=0) - jnp.sort(reference_margin, axis=0)
    z_w, z_l = log_ratios(inputs)
    return _finish(smoothed_logistic(beta * d, label_smoothing), z_w, z_l, beta)


@register("aot_unpaired", batch_coupled=True)
def aot_unpaired(inputs: PairwiseInputs, beta: float = 0.1, label_smoothing: float = 0.0):
    """AOT, unpaired (Melnyk et al., 2024; TRL loss_type="aot_unpaired"): d = sort_batch(z_w) - sort_batch(z_l),
    loss -(1-eps) logsig(b d) - eps logsig(-b d); eps in [0, 0.5]."""
    check_objective_beta("aot_unpaired", beta)
    check_hyperparameter(
        "aot_unpaired", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 0.5, "0 <= label_smoothing <= 0.5"
    )
    z_w, z_l = log_ratios(inputs)
    d = jnp.sort(z_w, axis=0) - jnp.sort(z_l, axis=0)
    return _finish(smoothed_logistic(beta * d, label_smoothing), z_w, z_l, beta)


@register("apo_zero")
def apo_zero(inputs: PairwiseInputs, beta: float = 0.1):
    """APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization", eq. 7; TRL loss_type="apo_zero"):
    1 - sig(b z_w) + sig(b z_l): raise the chosen likelihood, lower the rejected one."""
    check_objective_beta("apo_zero", beta)
    z_w, z_l = log_ratios(inputs)
    per_pair = 1.0 - jax.nn.sigmoid(beta * z_w) + jax.nn.sigmoid(beta * z_l)
    return _finish(per_pair, z_w, z_l, beta)


@register("apo_down")
def apo_down(inputs: PairwiseInputs, beta: float = 0.1):
    """APO-down (D'Oosterlinck et al., 2024, eq. 8; TRL loss_type="apo_down"): sig(b z_w) + 1 - sig(b (z_w - z_l)):
    lower the chosen likelihood and the rejected one more. The chosen gradient is b[sig'(b z_w) - sig'(b Delta)],
    positive (chosen pushed down) when |z_w| < |Delta|, e.g. near the reference."""
    check_objective_beta("apo_down", beta)
    z_w, z_l = log_ratios(inputs)
    per_pair = jax.nn.sigmoid(beta * z_w) + 1.0 - jax.nn.sigmoid(beta * (z_w - z_l))
    return _finish(per_pair, z_w, z_l, beta)


@register("discopop")
def discopop(inputs: PairwiseInputs, beta: float = 0.1, tau: float = 0.05):
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al., 2024, "Discovering Preference Optimization Algorithms
    with and for LLMs", eq. 5; TRL loss_type="discopop" with discopop_tau): x = b*Delta, m = sig(x/tau),
    loss (1-m)(-logsig x) + m exp(-x). Non-convex: for |x| below ~0.2 (tau=0.05) the modulation term dominates and
    the gradient pushes Delta down."""
    check_objective_beta("discopop", beta)
    check_hyperparameter("discopop", "tau", tau, lambda t: t > 0, "tau > 0")
    z_w, z_l = log_ratios(inputs)
    x = beta * (z_w - z_l)
    m = jax.nn.sigmoid(x / tau)
    per_pair = (1.0 - m) * (-jax.nn.log_sigmoid(x)) + m * jnp.exp(-x)
    return _finish(per_pair, z_w, z_l, beta)


@register("sft", batch_coupled=True)
def sft(inputs: PairwiseInputs, beta: float = 0.1):
    """SFT term of TRL's loss_type="sft" (used beside a preference loss, e.g. RPO, Pang et al., 2024):
    -(mean of policy logp over all chosen completion tokens of the batch), the same scalar for every pair.
    beta only scales the logged implicit rewards. An all-padding batch gives 0 (the token count is clamped to 1)."""
    check_objective_beta("sft", beta)
    total, count = nll_per_token(inputs.policy_chosen, inputs.chosen_mask)
    z_w, z_l = log_ratios(inputs)
    return total / jnp.maximum(count, 1.0), implicit_reward_metrics(z_w, z_l, beta)


@register("sigmoid_norm")
def sigmoid_norm(inputs: PairwiseInputs, beta: float = 0.1):
    """Length-normalised DPO (TRL loss_type="sigmoid_norm"; cf. the length-normalised ablation in SimPO, Meng et al.
    2024, here still with the reference): -logsig(b (z_w/|y_w| - z_l/|y_l|))."""
    check_objective_beta("sigmoid_norm", beta)
    z_w, z_l = log_ratios(inputs)
    n_w, n_l = _lengths(inputs)
    return _finish(-jax.nn.log_sigmoid(beta * (z_w / n_w - z_l / n_l)), z_w, z_l, beta)


# ----------------------------------------------------------------------------------------------------------------
# combinations


def combine(
    inputs: PairwiseInputs, terms: Sequence[tuple[str, float, dict[str, Any]]]
) -> tuple[jax.Array, Metrics]:
    """sum_k w_k * loss_k over registered objectives (METHODS.md section 0: "Multiple losses combine as
    sum_k w_k * mean(loss_k)", e.g. DPO + lambda*SFT = RPO; TRL's list-valued loss_type with loss_weights).

    `terms` is [(name, weight, kwargs), ...]. Metrics are namespaced "<name>/<metric>" plus "<name>/loss" (the
    unweighted term); a name used twice gets "<name>#<k>" (k = its position) for its later occurrences.
    """
    if not terms:
        raise ValueError("combine needs at least one (name, weight, kwargs) term, got none")
    total = jnp.zeros((), jnp.float32)
    metrics: Metrics = {}
    for k, term in enumerate(terms):
        if not (isinstance(term, (tuple, list)) and len(term) == 3):
            raise ValueError(f"combine term {k} must be (name, weight, kwargs), got {term!r}")
        name, weight, kwargs = term
        check_hyperparameter("combine", f"weight[{k}] ({name})", weight, lambda w: w == w and abs(w) != float("inf"), "finite")
        loss, term_metrics = get_objective(name)(inputs, **dict(kwargs or {}))
        prefix = name if name not in {n for n, _, _ in terms[:k]} else f"{name}#{k}"
        total = total + weight * loss
        metrics[f"{prefix}/loss"] = loss
        metrics.update({f"{prefix}/{key}": value for key, value in term_metrics.items()})
    return total, metrics
