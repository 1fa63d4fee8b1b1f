"""Listwise and ranked preference objectives over K scored candidates per prompt (docs/objectives.md, "Listwise").

Every objective here takes `ListwiseInputs`: per-token log-probs `policy`/`reference` [P, K, T], completion masks
[P, K, T], `scores` [P, K] (higher is better, e.g. ARITH's graded `score`) and `valid` [P, K].

Conventions shared by all four objectives (written once here, relied on by the tests):

- z_k = L_theta(y_k) - L_ref(y_k), the summed completion log-ratio (docs/objectives.md, "Conventions").
- A candidate with valid = 0 is removed before anything is computed: its log-probs, mask and score (even NaN or
  inf) never reach the loss, the metrics or the gradients.
- Only strict preferences carry signal: the pairs (i, j) with score_i > score_j among valid candidates. Tied
  candidates are never pushed apart, and a prompt without a single strict pair (all valid candidates tie, or fewer
  than two are valid) contributes nothing; it is counted in the metric "prompts/tied".
- The loss is the mean of the per-prompt losses over the prompts that contribute ("prompts/used"); a batch in
  which no prompt contributes gives loss 0 with finite, zero gradients.
- Metrics (implicit reward r_k, the objective's own scale: beta*z, z/tau or TPO's beta*R), over used prompts:
  "rewards/best" and "rewards/worst" (the top- and bottom-scored candidate, ties to the lower index),
  "rewards/margin" (best - worst), "rewards/accuracy" (share of strict pairs the rewards order correctly),
  "rewards/mean" (over valid candidates), and the counts "prompts/used", "prompts/tied".
- Hyper-parameters given as Python values are validated eagerly (one ValueError naming objective, parameter and
  value); missing or mis-shaped extras raise a ValueError naming the objective and the field.

Gains for the DCG-style weights (RankDPO, TPO) are G_k = 2^(s_k - s_min) - 1 with s_min the prompt's lowest valid
score: NDCG needs non-negative gains and ARITH scores go down to -0.5. The shift leaves the set of strict pairs
unchanged, makes the weights invariant to adding a constant to all scores, and equals the plain 2^s - 1 whenever
the worst candidate scores 0. Ranks are 1-based, D(rank) = log2(1 + rank), and ties in a ranking are broken by
candidate index (lower index first); only positions, never pair membership, depend on that tie-break.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses.common import check_hyperparameter, check_objective_beta
from jaxalign.losses.registry import ListwiseInputs, register

Metrics = dict[str, jax.Array]

ADPO_TARGETS = ("pairwise", "top1", "plackett_luce", "smoothed")
RANKDPO_RANK_BY = ("policy", "scores")


# ----------------------------------------------------------------------------------------------------------------
# shared pieces


class _Prepared:
    """Masked quantities every listwise objective needs (all [P, K] or [P, K, K], float32 unless said)."""

    def __init__(self, inputs: ListwiseInputs):
        self.valid = jnp.asarray(inputs.valid) > 0  # bool [P, K]
        self.token_mask = (jnp.asarray(inputs.mask) > 0) & self.valid[..., None]  # bool [P, K, T]
        policy = jnp.where(self.token_mask, inputs.policy, 0.0)
        reference = jnp.where(self.token_mask, inputs.reference, 0.0)
        self.token_log_ratio = policy - reference  # [P, K, T], exactly 0 outside valid completions
        self.z = jnp.sum(self.token_log_ratio, axis=-1)
        self.scores = jnp.where(self.valid, inputs.scores, 0.0).astype(jnp.float32)
        pair_valid = self.valid[:, :, None] & self.valid[:, None, :]
        # better[p, i, j]: candidate i is strictly preferred to candidate j (both valid)
        self.better = pair_valid & (self.scores[:, :, None] > self.scores[:, None, :])
        self.used = jnp.any(self.better, axis=(1, 2))  # bool [P]
        self.num_used = jnp.sum(self.used.astype(jnp.float32))

    def mean_over_used(self, per_prompt: jax.Array) -> jax.Array:
        """Mean of the per-prompt losses over contributing prompts; 0 when none contributes."""
        total = jnp.sum(jnp.where(self.used, per_prompt, 0.0))
        return total / jnp.maximum(self.num_used, 1.0)

    def top_index(self) -> jax.Array:
        """Index of the top-scored valid candidate per prompt (ties: lowest index)."""
        return jnp.argmax(jnp.where(self.valid, self.scores, -jnp.inf), axis=1)

    def bottom_index(self) -> jax.Array:
        return jnp.argmin(jnp.where(self.valid, self.scores, jnp.inf), axis=1)

    def ranks(self, values: jax.Array) -> jax.Array:
        """0-based rank of each valid candidate by `values`, descending, ties broken by lower index first."""
        k = values.shape[1]
        earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [i, j]: j < i
        ahead = (values[:, None, :] > values[:, :, None]) | ((values[:, None, :] == values[:, :, None]) & earlier)
        ahead = ahead & self.valid[:, None, :] & self.valid[:, :, None]
        return jnp.sum(ahead, axis=2)

    def inverse_discount(self, values: jax.Array) -> jax.Array:
        """1 / D(rank) = 1 / log2(1 + rank) with 1-based ranks by `values` (0 for invalid candidates)."""
        rank = self.ranks(values).astype(jnp.float32) + 1.0
        return jnp.where(self.valid, 1.0 / jnp.log2(1.0 + rank), 0.0)

    def gains(self) -> jax.Array:
        """G_k = 2^(s_k - s_min) - 1 (module docstring); 0 for invalid candidates."""
        s_min = jnp.min(jnp.where(self.valid, self.scores, jnp.inf), axis=1, keepdims=True)
        s_min = jnp.where(jnp.isfinite(s_min), s_min, 0.0)
        return jnp.where(self.valid, jnp.exp2(self.scores - s_min) - 1.0, 0.0)

    def metrics(self, rewards: jax.Array) -> Metrics:
        rewards = jax.lax.stop_gradient(rewards)
        used_f = self.used.astype(jnp.float32)
        n_used = jnp.maximum(self.num_used, 1.0)
        rows = jnp.arange(rewards.shape[0])
        best = rewards[rows, self.top_index()]
        worst = rewards[rows, self.bottom_index()]
        strict = self.better & self.used[:, None, None]
        correct = strict & (rewards[:, :, None] > rewards[:, None, :])
        candidates = self.valid & self.used[:, None]
        return {
            "rewards/best": jnp.sum(best * used_f) / n_used,
            "rewards/worst": jnp.sum(worst * used_f) / n_used,
            "rewards/margin": jnp.sum((best - worst) * used_f) / n_used,
            "rewards/accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(strict), 1),
            "rewards/mean": jnp.sum(jnp.where(candidates, rewards, 0.0)) / jnp.maximum(jnp.sum(candidates), 1),
            "prompts/used": self.num_used,
            "prompts/tied": jnp.sum(1.0 - used_f),
        }


def _masked_log_softmax(logits: jax.Array, member: jax.Array) -> jax.Array:
    """log softmax of `logits` over the entries where `member` is True (last axis); 0 elsewhere.

    Non-members are replaced by a large finite negative number (not -inf) so that a row with no member at all still
    has finite values and gradients (they are masked to 0 by the caller)."""
    very_negative = jnp.asarray(jnp.finfo(jnp.float32).min / 4, logits.dtype)
    masked = jnp.where(member, logits, very_negative)
    return jnp.where(member, masked - jax.nn.logsumexp(masked, axis=-1, keepdims=True), 0.0)


def _check_choice(objective: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{objective}.{name} must be one of {choices}, got {value!r}")


def _check_flag(objective: str, name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{objective}.{name} must be True or False, got {value!r}")


def _check_positive_int_or_none(objective: str, name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{objective}.{name} must be None or an integer >= 1, got {value!r}")


def _extra(inputs: ListwiseInputs, objective: str, field: str, trailing: int) -> jax.Array:
    """inputs.extras[field], checked to be [P, K, T] (+ `trailing` more axes)."""
    if field not in inputs.extras:
        raise ValueError(
            f"{objective} needs inputs.extras[{field!r}] (see the objective's docstring); extras present: "
            f"{sorted(inputs.extras)}"
        )
    value = inputs.extras[field]
    expected = tuple(inputs.mask.shape)
    if np.ndim(value) != 3 + trailing or tuple(np.shape(value))[:3] != expected:
        raise ValueError(
            f"{objective}: inputs.extras[{field!r}] must have shape {expected}{' + (D,)' if trailing else ''} "
            f"(prompts, K, time{', hidden' if trailing else ''}), got {tuple(np.shape(value))}"
        )
    return value


# ----------------------------------------------------------------------------------------------------------------
# objectives


@register("plackett_luce", family="listwise")
def plackett_luce(inputs: ListwiseInputs, beta: float = 0.1, top_k: int | None = None):
    """DPO's Plackett-Luce objective (Rafailov et al., 2023, eq. 18 / appendix A.3):
    -sum_k log( exp(r_tau(k)) / sum_{j >= k} exp(r_tau(j)) ), r = beta*z, tau the ranking of the candidates by score.

    Ties (only the strict order is used): a tie expresses no preference, so tied candidates never appear in each
    other's denominators. The term of candidate k is -log(e^{r_k} / (e^{r_k} + sum_{j: s_j < s_k} e^{r_j})), which
    is exactly eq. 18 when no scores tie and is invariant to how a tie is ordered; the bottom tie group has no
    strictly worse candidate and contributes 0 (as eq. 18's last term, log 1, does).

    top_k (None = the full list): keep only the terms of candidates whose position, counted as the number of valid
    candidates scored strictly higher, is < top_k (the top-k truncated PL likelihood; with no ties, the first top_k
    factors of eq. 18). With K = 2 this is sigmoid DPO, -logsig(beta (z_w - z_l)).
    """
    check_objective_beta("plackett_luce", beta)
    _check_positive_int_or_none("plackett_luce", "top_k", top_k)
    prep = _Prepared(inputs)
    r = beta * prep.z
    k = r.shape[1]
    in_set = prep.better | jnp.eye(k, dtype=bool)[None]  # row k: {k} and the candidates strictly worse than k
    log_prob = _masked_log_softmax(jnp.broadcast_to(r[:, None, :], in_set.shape), in_set)
    term = -jnp.diagonal(log_prob, axis1=1, axis2=2)  # [P, K]
    include = prep.valid & jnp.any(prep.better, axis=2)
    if top_k is not None:
        position = jnp.sum(prep.better, axis=1)  # valid candidates scored strictly higher
        include = include & (position < top_k)
    per_prompt = jnp.sum(jnp.where(include, term, 0.0), axis=1)
    return prep.mean_over_used(per_prompt), prep.metrics(r)


@register("rankdpo", family="listwise")
def rankdpo(inputs: ListwiseInputs, beta: float = 0.1, rank_by: str = "policy"):
    """RankDPO (Karthik et al., 2024, "Scalable Ranked Preference Optimization for Text-to-Image Generation"): a
    DCG-weighted sum of pairwise DPO losses over all ordered pairs with score_i > score_j,
    sum_ij w_ij * -logsig(beta (z_i - z_j)) / sum_ij w_ij, with w_ij = |G_i - G_j| * |1/D(rank_i) - 1/D(rank_j)|
    (LambdaLoss-style; gains and D as in the module docstring), per prompt.

    rank_by="policy" (default): ranks come from the current implicit rewards beta*z (the model's own ranking, as in
    LambdaLoss, which the paper's weighting follows [unverified: from memory of the paper, the abstract does not
    say]), so pairs that involve the model's current top positions weigh most. rank_by="scores": ranks from the
    scores (a fixed weight per pair). The weights are constants: no gradient flows through them. The paper's
    diffusion implicit reward is replaced by the language-model one, beta*z. With K = 2 this is sigmoid DPO.
    """
    check_objective_beta("rankdpo", beta)
    _check_choice("rankdpo", "rank_by", rank_by, RANKDPO_RANK_BY)
    prep = _Prepared(inputs)
    r = beta * prep.z
    rank_values = jax.lax.stop_gradient(r) if rank_by == "policy" else prep.scores
    inv_disc = prep.inverse_discount(rank_values)
    gain = prep.gains()
    weight = (jnp.abs(gain[:, :, None] - gain[:, None, :]) * jnp.abs(inv_disc[:, :, None] - inv_disc[:, None, :]))
    weight = jax.lax.stop_gradient(jnp.where(prep.better, weight, 0.0))
    pair_loss = -jax.nn.log_sigmoid(r[:, :, None] - r[:, None, :])
    weight_sum = jnp.sum(weight, axis=(1, 2))
    per_prompt = jnp.sum(jnp.where(prep.better, weight * pair_loss, 0.0), axis=(1, 2)) / jnp.where(
        weight_sum > 0, weight_sum, 1.0
    )
    return prep.mean_over_used(per_prompt), prep.metrics(r)


def step_ids_from_separators(tokens: jax.Array, mask: jax.Array, separator_id: int) -> jax.Array:
    """TPO's "step_ids" for completions whose steps are separated by one token (ARITH: ';').

    tokens, mask: [..., T]. The step index of a completion token is the number of separators before it in the
    completion, so a separator belongs to the step it closes and a trailing EOS to the last step; -1 outside the
    completion (mask = 0). Aligned with the per-token log-probs when `tokens`/`mask` are (targets, completion mask).
    """
    mask = jnp.asarray(mask) > 0
    is_sep = (jnp.asarray(tokens) == separator_id) & mask
    before = jnp.cumsum(is_sep.astype(jnp.int32), axis=-1) - is_sep.astype(jnp.int32)
    return jnp.where(mask, before, -1)


@register("tpo", family="listwise", extras=("step_ids", "hidden"))
def tpo(inputs: ListwiseInputs, beta: float = 0.5, adaptive_weights: bool = True, released_code_form: bool = False,
        max_steps: int | None = None):
    """TPO, Tree Preference Optimization (Liao et al., 2025, "TPO: Aligning Large Language Models with
    Multi-branch & Multi-step Preference Trees"), the paper's form by default:

      r_k(y)  = mean of the token log-ratios log pi_theta - log pi_ref over the tokens of step k of y;
      w_k(y)  = 1 + cos(hbar_k(y), hbar_k(y_0))   (Adaptive Step Reward), hbar_k the mean hidden state of step k,
                y_0 the top-scored valid candidate (ties: lowest index);
      R(y)    = sum_k w_k r_k / sum_k w_k  over the steps y has (R = 0 for a completion without steps);
      loss    = -sum_{v_i > v_j} lambda_ij logsig(beta (R_i - R_j)),  lambda_ij = |DeltaNDCG_ij|, the NDCG change
                of swapping i and j in the ranking induced by the scores: |G_i - G_j| |1/D(i) - 1/D(j)| / IDCG
                [unverified form of lambda; gains and D as in the module docstring]; beta default 0.5.

    extras (a trainer must supply): "step_ids" [P, K, T] int, the step index (0, 1, ...) of each completion token
    and -1 elsewhere (`step_ids_from_separators` builds it); tokens with id -1 inside the completion are left out of
    every step. "hidden" [P, K, T, D], the policy's last-layer hidden states aligned with the log-probs; required
    unless adaptive_weights=False (then every w_k = 1). The objective does not stop gradients through "hidden":
    pass jax.lax.stop_gradient(hidden) to treat the step weights as constants (the released code does not).
    A step index that y_0 does not have gets weight 1 (no similarity to measure: the step counts like an
    unweighted one). Step ids must lie in [-1, max_steps) (max_steps=None: T, enough for contiguous ids since a
    step has at least one token); checked eagerly when step_ids is concrete.

    released_code_form=True reproduces the authors' released loss code (likely bugs, kept only for comparison):
    no lambda weights, -logsig((R_i - R_j) sign(v_i - v_j)) summed over all ordered pairs of valid candidates
    (including i = j and ties, which add constants) / (n (n - 1)), averaged over the used prompts, and then wrapped
    in a further -logsig(beta * .); since -logsig is decreasing, gradient descent on that form *raises* the ranking
    loss. Also as released, a step that y_0 lacks gets weight 0. That form couples the batch (the wrapper acts on
    the batch mean). The released code's unshifted label gather belongs to the log-prob computation, not here.
    """
    check_objective_beta("tpo", beta)
    _check_flag("tpo", "adaptive_weights", adaptive_weights)
    _check_flag("tpo", "released_code_form", released_code_form)
    _check_positive_int_or_none("tpo", "max_steps", max_steps)
    step_ids = jnp.asarray(_extra(inputs, "tpo", "step_ids", 0))
    hidden = None
    if adaptive_weights:
        if "hidden" not in inputs.extras:
            raise ValueError(
                "tpo needs inputs.extras['hidden'] (the policy's last-layer hidden states [P, K, T, D]) for its "
                "adaptive step weights; pass adaptive_weights=False to use w_k = 1"
            )
        hidden = _extra(inputs, "tpo", "hidden", 1)
    num_steps = int(inputs.mask.shape[-1] if max_steps is None else max_steps)
    if not isinstance(step_ids, jax.core.Tracer):
        ids = np.asarray(step_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"tpo: inputs.extras['step_ids'] must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < -1 or ids.max() >= num_steps):
            raise ValueError(
                f"tpo: inputs.extras['step_ids'] must lie in [-1, {num_steps}) (max_steps={max_steps!r}), got values "
                f"in [{ids.min()}, {ids.max()}]"
            )

    prep = _Prepared(inputs)
    in_step = (step_ids[..., None] == jnp.arange(num_steps)) & prep.token_mask[..., None]  # [P, K, T, S]
    in_step_f = in_step.astype(jnp.float32)
    count = jnp.sum(in_step_f, axis=2)  # [P, K, S]
    present = count > 0
    safe_count = jnp.maximum(count, 1.0)
    step_reward = jnp.einsum("pkts,pkt->pks", in_step_f, prep.token_log_ratio) / safe_count

    if hidden is None:
        weight = jnp.ones_like(step_reward)
    else:
        hidden = jnp.where(prep.token_mask[..., None], hidden, 0.0)
        mean_hidden = jnp.einsum("pkts,pktd->pksd", in_step_f, hidden) / safe_count[..., None]  # [P, K, S, D]
        rows = jnp.arange(mean_hidden.shape[0])
        top = prep.top_index()
        anchor = mean_hidden[rows, top][:, None]  # [P, 1, S, D]
        anchor_present = present[rows, top][:, None]  # [P, 1, S]
        dot = jnp.sum(mean_hidden * anchor, axis=-1)
        sq_a, sq_b = jnp.sum(mean_hidden**2, axis=-1), jnp.sum(anchor**2, axis=-1)
        nonzero = (sq_a > 0) & (sq_b > 0)
        norms = jnp.sqrt(jnp.where(nonzero, sq_a, 1.0)) * jnp.sqrt(jnp.where(nonzero, sq_b, 1.0))
        cosine = jnp.where(nonzero, dot / norms, 0.0)
        weight = jnp.where(anchor_present, 1.0 + cosine, 0.0 if released_code_form else 1.0)
    weight = jnp.where(present, weight, 0.0)
    weight_sum = jnp.sum(weight, axis=-1)
    has_weight = weight_sum != 0
    R = jnp.where(has_weight, jnp.sum(weight * step_reward, axis=-1) / jnp.where(has_weight, weight_sum, 1.0), 0.0)

    diff = R[:, :, None] - R[:, None, :]
    if not released_code_form:
        gain = prep.gains()
        inv_disc = prep.inverse_discount(prep.scores)
        ideal_dcg = jnp.sum(gain * inv_disc, axis=1)
        lam = jnp.abs(gain[:, :, None] - gain[:, None, :]) * jnp.abs(inv_disc[:, :, None] - inv_disc[:, None, :])
        lam = lam / jnp.where(ideal_dcg > 0, ideal_dcg, 1.0)[:, None, None]
        pair_loss = jnp.where(prep.better, lam * -jax.nn.log_sigmoid(beta * diff), 0.0)
        loss = prep.mean_over_used(jnp.sum(pair_loss, axis=(1, 2)))
    else:
        pair_valid = prep.valid[:, :, None] & prep.valid[:, None, :]
        sign = jnp.sign(prep.scores[:, :, None] - prep.scores[:, None, :])
        pair_loss = jnp.where(pair_valid, -jax.nn.log_sigmoid(diff * sign), 0.0)
        n = jnp.sum(prep.valid, axis=1).astype(jnp.float32)
        rank_loss = prep.mean_over_used(jnp.sum(pair_loss, axis=(1, 2)) / jnp.maximum(n * (n - 1.0), 1.0))
        loss = jnp.where(prep.num_used > 0, -jax.nn.log_sigmoid(beta * rank_loss), 0.0)
    metrics = prep.metrics(beta * R)
    metrics["tpo/mean_step_weight"] = jnp.sum(jnp.where(present, weight, 0.0)) / jnp.maximum(jnp.sum(present), 1)
    return loss, metrics


# beta reaches ADPO as its temperature tau = 1/beta: its K = 2 case is cDPO with beta = 1/tau.
@register("adpo", family="listwise", beta_aliases={"tau": lambda beta: 1.0 / beta})
def adpo(inputs: ListwiseInputs, tau: float = 10.0, target: str = "smoothed", label_smoothing: float = 0.0,
         target_temperature: float = 1.0):
    """ADPO, Anchored DPO ("ADPO: Anchored Direct Preference Optimization", 2025): minimise
    KL(q || p) with p = softmax((l - l_ref)/tau) = softmax(z/tau) over a prompt's valid candidates, q a target
    distribution built from the scores. [paper form from the abstract; the target recipes are this module's choices]

    The anchor l_ref is `inputs.reference`: a frozen reference gives the fixed anchor; a trainer that periodically
    copies the policy into the reference model gives the paper's dynamic anchor (the objective is the same).

    target (q0, then smoothed):
      "top1":          q0 uniform over the top-scored candidates (one-hot without ties); loss KL(q || p).
      "smoothed":      q0 = softmax(scores / target_temperature) over valid candidates; loss KL(q || p).
      "pairwise":      every strict pair i > j is a K=2 problem with q0 = (1, 0) against softmax(z_i/tau, z_j/tau);
                       loss = the prompt's mean over its strict pairs.
      "plackett_luce": one top-1 problem per stage of the ranking: candidate k against {k} and the candidates scored
                       strictly below it (ties as in `plackett_luce`), q0 one-hot on k; loss = sum over stages.
                       With label_smoothing 0 this equals `plackett_luce` with beta = 1/tau.
    label_smoothing eps in [0, 0.5] moves eps of q0's mass to its complement: q = (1 - eps) q0 + eps (1 - q0)/(n - 1)
    over the n candidates of the problem; for two candidates this flips the label with probability eps. Hence K = 2
    with target "top1" (or "pairwise"/"plackett_luce") is cDPO with beta = 1/tau up to the constant entropy H(q):
    loss = cdpo - H(q), same gradients; the metric "adpo/cross_entropy" (KL + H(q)) equals cdpo exactly.
    tau defaults to 10 so that K = 2 matches DPO's default beta 0.1 (not a value taken from the paper).
    """
    check_hyperparameter("adpo", "tau", tau, lambda t: t > 0, "tau > 0 (the anchor temperature)")
    _check_choice("adpo", "target", target, ADPO_TARGETS)
    check_hyperparameter("adpo", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 0.5,
                         "0 <= label_smoothing <= 0.5")
    check_hyperparameter("adpo", "target_temperature", target_temperature, lambda t: t > 0, "target_temperature > 0")
    prep = _Prepared(inputs)
    a = prep.z / tau
    eps = label_smoothing

    def smooth(q0, member):
        n = jnp.sum(member, axis=-1, keepdims=True).astype(jnp.float32)
        q = (1.0 - eps) * q0 + eps * (1.0 - q0) / jnp.maximum(n - 1.0, 1.0)
        return jnp.where(member, q, 0.0)

    def kl_and_ce(q, log_p, member):
        ce = -jnp.sum(jnp.where(member, q * log_p, 0.0), axis=-1)
        neg_entropy = jnp.sum(jnp.where(member, jax.scipy.special.xlogy(q, q), 0.0), axis=-1)
        return ce + neg_entropy, ce

    if target in ("top1", "smoothed"):
        member = prep.valid
        if target == "top1":
            best = jnp.max(jnp.where(member, prep.scores, -jnp.inf), axis=1, keepdims=True)
            is_best = member & (prep.scores == best)
            q0 = is_best / jnp.maximum(jnp.sum(is_best, axis=1, keepdims=True), 1)
        else:
            q0 = jnp.exp(_masked_log_softmax(prep.scores / target_temperature, member))
        q = smooth(q0, member)
        kl, ce = kl_and_ce(q, _masked_log_softmax(a, member), member)
    elif target == "plackett_luce":
        k = a.shape[1]
        eye = jnp.eye(k, dtype=bool)[None]
        member = prep.better | eye  # stage k: {k} and the candidates strictly worse than k
        q = smooth(jnp.broadcast_to(eye, member.shape).astype(jnp.float32), member)
        log_p = _masked_log_softmax(jnp.broadcast_to(a[:, None, :], member.shape), member)
        kl_stage, ce_stage = kl_and_ce(q, log_p, member)
        stage = prep.valid & jnp.any(prep.better, axis=2)
        kl = jnp.sum(jnp.where(stage, kl_stage, 0.0), axis=1)
        ce = jnp.sum(jnp.where(stage, ce_stage, 0.0), axis=1)
    else:  # pairwise
        d = a[:, :, None] - a[:, None, :]
        ce_pair = -(1.0 - eps) * jax.nn.log_sigmoid(d) - eps * jax.nn.log_sigmoid(-d)
        neg_entropy = jax.scipy.special.xlogy(1.0 - eps, 1.0 - eps) + jax.scipy.special.xlogy(eps, eps)
        num_pairs = jnp.maximum(jnp.sum(prep.better, axis=(1, 2)), 1)
        ce = jnp.sum(jnp.where(prep.better, ce_pair, 0.0), axis=(1, 2)) / num_pairs
        kl = ce + neg_entropy
    metrics = prep.metrics(a)
    metrics["adpo/cross_entropy"] = prep.mean_over_used(ce)
    return prep.mean_over_used(kl), metrics
