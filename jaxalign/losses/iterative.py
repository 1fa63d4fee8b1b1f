"""Objectives of the iterative and online algorithms (docs/algorithms.md) as pure, jit-able functions.

Each function maps per-token log-probs and completion masks (float or bool; a token counts where mask > 0) to
(loss, metrics), like the registered objectives, but these are NOT registered in the objective registry: they need
the iteration loops of their algorithms (two frozen checkpoints for APO, K graded samples and a frozen initial model
for TRPA, proposal samples for BRAIn, reference samples for DDO, step-level pairs for Step-DPO), and those loops
come later (iterative algorithms compose loops and steps: docs/architecture.md). Registering them now would make
`loss=NAME` and the objectives benchmark, which iterate over every registered name, call them with inputs they
cannot use.

Conventions (docs/objectives.md): L(y) = sum_t m_t logp_t over the completion, |y| = number of completion tokens.
Log-probs outside the masks never reach a loss, a metric or a gradient (they are selected away with `where`, so even
NaN or inf padding is harmless). Hyper-parameters given as Python numbers are validated eagerly with one ValueError
naming the function, the parameter and the value; traced values are not checked. Shape mismatches raise one
ValueError naming the arrays and their shapes.

Contents:
- APO (Nesterov-extrapolated reference): `apo_reference_logratio`, `apo_dpo`, `apo_sppo`, and for sampling
  `extrapolate_logits`, `extrapolate_params`.
- TRPA: `trpa`.
- BRAIn: `brain`.
- DDO: `ddo`.
- Step-DPO: `step_mask`, `step_dpo`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses.common import check_hyperparameter, check_objective_beta
from jaxalign.losses.dpo import implicit_reward_metrics
from jaxalign.losses.registry import PairwiseInputs

Metrics = dict[str, jax.Array]

TRPA_LEVELS = (1, 2, 3, 4)  # 1 correct, 2 wrong, 3 incomplete, 4 malformed


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def _check_shapes(objective: str, **arrays: Any) -> None:
    """One ValueError when the named arrays do not all have the same shape."""
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{objective}: these arrays must have the same shape, got {listed}")


def _check_shape(objective: str, name: str, array: Any, expected: tuple[int, ...], what: str) -> None:
    """One ValueError when `array` does not have the shape `expected` (derived from another argument)."""
    if tuple(np.shape(array)) != tuple(expected):
        got = tuple(np.shape(array))
        raise ValueError(f"{objective}: {name} must have shape {tuple(expected)} ({what}), got {got}")


def _check_ndim(objective: str, ndim: int, what: str, **arrays: Any) -> None:
    for name, a in arrays.items():
        if np.ndim(a) != ndim:
            raise ValueError(f"{objective}: {name} must be {what} ({ndim} dims), got shape {tuple(np.shape(a))}")


def _check_alpha_momentum(objective: str, alpha: Any) -> None:
    check_hyperparameter(objective, "alpha", alpha, lambda a: 0.0 <= a < 1.0, "0 <= alpha < 1 (Nesterov momentum)")


def _masked_sum(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t m_t logp_t over the last axis, with tokens outside the mask selected away (not multiplied by 0)."""
    return jnp.sum(jnp.where(jnp.asarray(mask) > 0, token_logps, 0.0), axis=-1)


def _token_count(mask: jax.Array) -> jax.Array:
    return jnp.sum((jnp.asarray(mask) > 0).astype(jnp.float32), axis=-1)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ----------------------------------------------------------------------------------------------------------------
# APO: Nesterov extrapolation of the reference


def apo_reference_logratio(ref_next_logps: jax.Array, ref_prev_logps: jax.Array, alpha: Any) -> jax.Array:
    """APO's extrapolated reference: (1 + a) * ref_next_logps - a * ref_prev_logps, elementwise, any shape.

    APO (He et al., 2024, "Accelerated Preference Optimization"; docs/algorithms.md, not checked against the
    paper): the
    Nesterov step log pi_{t+1} = (1 + a) log pihat_{t+1} - a log pihat_t - log Z; in the loss the reference log-ratio
    becomes (1 + a) Deltahat_{t+1} - a Deltahat_t from two frozen checkpoints pihat_{t+1} (next) and pihat_t (prev).
    The map is linear, so it can be applied at any level: to the log-ratios Deltahat_s = L_hat_s(y_w) - L_hat_s(y_l)
    [pairs] it gives that reference log-ratio; to sequence or per-token log-probs it gives the extrapolated reference
    log-probs without -log Z (which cancels in every chosen-minus-rejected difference). Both arrays must have the
    same shape; a = 0 returns ref_next_logps exactly.
    """
    _check_alpha_momentum("apo_reference_logratio", alpha)
    _check_shapes("apo_reference_logratio", ref_next_logps=ref_next_logps, ref_prev_logps=ref_prev_logps)
    return (1.0 + alpha) * ref_next_logps - alpha * ref_prev_logps


def _apo_log_ratios(objective: str, inputs: PairwiseInputs, prev_chosen: jax.Array, prev_rejected: jax.Array,
                    alpha: Any) -> tuple[jax.Array, jax.Array]:
    """(z_w, z_l) against the extrapolated reference: L_theta(y) - [(1 + a) L_hat_{t+1}(y) - a L_hat_t(y)]."""
    _check_alpha_momentum(objective, alpha)
    _check_shapes(objective, policy_chosen=inputs.policy_chosen, reference_chosen=inputs.reference_chosen,
                  previous_chosen=prev_chosen, chosen_mask=inputs.chosen_mask)
    _check_shapes(objective, policy_rejected=inputs.policy_rejected, reference_rejected=inputs.reference_rejected,
                  previous_rejected=prev_rejected, rejected_mask=inputs.rejected_mask)
    z = []
    for policy, ref_next, ref_prev, mask in (
        (inputs.policy_chosen, inputs.reference_chosen, prev_chosen, inputs.chosen_mask),
        (inputs.policy_rejected, inputs.reference_rejected, prev_rejected, inputs.rejected_mask),
    ):
        reference = apo_reference_logratio(_masked_sum(ref_next, mask), _masked_sum(ref_prev, mask), alpha)
        z.append(_masked_sum(policy, mask) - reference)
    return z[0], z[1]


def apo_dpo(inputs: PairwiseInputs, previous_chosen: jax.Array, previous_rejected: jax.Array, beta: Any = 0.1,
            alpha: Any = 0.0) -> tuple[jax.Array, Metrics]:
    """APO with the DPO loss: -logsig(beta * (L_theta(y_w) - L_theta(y_l) - [(1 + a) Deltahat_{t+1} - a Deltahat_t])).

    He et al. (2024), "Accelerated Preference Optimization"; docs/algorithms.md: in the loss the reference log-ratio
    of DPO (Rafailov et al. 2023, eq. 7) becomes (1 + a) Deltahat_{t+1} - a Deltahat_t from two frozen checkpoints.
    `inputs.reference_*` are the newer checkpoint pihat_{t+1} (the previous iterate, as in iterative DPO);
    `previous_chosen` / `previous_rejected` [pairs, T] the older one, pihat_t. a = 0 is exactly sigmoid DPO against
    pihat_{t+1} (iterative DPO); 0 <= a < 1 (Nesterov momentum). Metrics: the implicit rewards beta*z of every
    pairwise objective with z measured against the extrapolated reference, and "apo/reference_margin", the mean
    extrapolated reference log-ratio.
    """
    check_objective_beta("apo_dpo", beta)
    z_w, z_l = _apo_log_ratios("apo_dpo", inputs, previous_chosen, previous_rejected, alpha)
    loss = jnp.mean(-jax.nn.log_sigmoid(beta * (z_w - z_l)))
    metrics = implicit_reward_metrics(z_w, z_l, beta)
    policy_margin = _masked_sum(inputs.policy_chosen, inputs.chosen_mask) - _masked_sum(
        inputs.policy_rejected, inputs.rejected_mask)
    metrics["apo/reference_margin"] = jnp.mean(policy_margin - (z_w - z_l))
    return loss, metrics


def apo_sppo(inputs: PairwiseInputs, previous_chosen: jax.Array, previous_rejected: jax.Array, beta: Any = 0.1,
             alpha: Any = 0.0) -> tuple[jax.Array, Metrics]:
    """APO with SPPO's squared loss: (z_w - 1/(2b))^2 + (z_l + 1/(2b))^2, z against the extrapolated reference.

    He et al. (2024), "Accelerated Preference Optimization" (the extrapolation applies to SPPO's squared loss
    too), with the hard-label SPPO loss of Wu et al. (2024), eq. 4.7 (the `sppo_hard` objective). The extrapolated
    reference of each completion is (1 + a) L_hat_{t+1}(y) - a L_hat_t(y) WITHOUT the -log Z term. SPPO regresses
    each log-ratio on its own, so log Z does not cancel here; SPPO approximates its own log Z by a constant folded into
    the +-1/(2b) targets, and the extrapolation's log Z is treated the same way (left out): that is the form
    implemented. Arguments as `apo_dpo`; a = 0 is exactly `sppo_hard` against pihat_{t+1}.
    """
    check_objective_beta("apo_sppo", beta)
    z_w, z_l = _apo_log_ratios("apo_sppo", inputs, previous_chosen, previous_rejected, alpha)
    loss = jnp.mean((z_w - 0.5 / beta) ** 2 + (z_l + 0.5 / beta) ** 2)
    return loss, implicit_reward_metrics(z_w, z_l, beta)


def extrapolate_logits(l_next: jax.Array, l_prev: jax.Array, alpha: Any) -> jax.Array:
    """APO sampling with token-level extrapolated logits (1 + a) l_{t+1} - a l_t (docs/algorithms.md, "APO").

    He et al. (2024): sampling from pi_{t+1} proportional to pihat_{t+1}^(1+a) / pihat_t^a, done per next-token
    distribution; softmax of the result is the extrapolated next-token distribution (a softmax is shift-invariant, so
    logits and log-probs give the same distribution). Renormalising at every token is the token-level form
    implemented here, not the sequence-level step (whose single log Z differs from the product of per-token
    normalisers). Any shape, both arrays alike.
    """
    _check_alpha_momentum("extrapolate_logits", alpha)
    _check_shapes("extrapolate_logits", l_next=l_next, l_prev=l_prev)
    return (1.0 + alpha) * l_next - alpha * l_prev


def extrapolate_params(theta_next: Any, theta_prev: Any, alpha: Any) -> Any:
    """APO sampling by weight extrapolation theta_{t+1} + a (theta_{t+1} - theta_t) (docs/algorithms.md, "APO").

    He et al. (2024), the parameter-space Nesterov step. `theta_next` / `theta_prev` are pytrees of the same
    structure and leaf shapes (e.g. two checkpoints' params); a = 0 returns theta_next's values exactly.
    """
    _check_alpha_momentum("extrapolate_params", alpha)
    next_def, prev_def = jax.tree_util.tree_structure(theta_next), jax.tree_util.tree_structure(theta_prev)
    if next_def != prev_def:
        raise ValueError(f"extrapolate_params: theta_next and theta_prev must have the same pytree structure, "
                         f"got {next_def} and {prev_def}")
    for path_leaf, prev_leaf in zip(jax.tree_util.tree_leaves_with_path(theta_next),
                                    jax.tree_util.tree_leaves(theta_prev)):
        path, next_leaf = path_leaf
        if np.shape(next_leaf) != np.shape(prev_leaf):
            raise ValueError(f"extrapolate_params: leaf {jax.tree_util.keystr(path)} has shape "
                             f"{np.shape(next_leaf)} in theta_next but {np.shape(prev_leaf)} in theta_prev")
    return jax.tree_util.tree_map(lambda n, p: n + alpha * (n - p), theta_next, theta_prev)


# ----------------------------------------------------------------------------------------------------------------
# TRPA


def trpa(policy: jax.Array, reference: jax.Array, old: jax.Array, mask: jax.Array, levels: jax.Array,
         valid: jax.Array | None = None, beta: Any = 0.1, kl_coef: Any = 0.001,
         kappa: Any = 2.5) -> tuple[jax.Array, Metrics]:
    """TRPA (Su et al. 2025, "Trust Region Preference Approximation"; docs/algorithms.md, from the authors' code).

    K graded responses per prompt: per-token log-probs [B, K, T] of the policy, of the frozen initial model
    (`reference`) and of the sampling policy pi_old (`old`, no gradient), completion mask [B, K, T], rule-based
    `levels` [B, K] (1 correct, 2 wrong, 3 incomplete, 4 malformed), optional `valid` [B, K] (absent candidates).

    l(y) = masked MEAN token log-ratio log pi_theta - log pi_ref (|y| clamped to >= 1). For every pair (a, b) of a
    prompt's valid responses with level(a) < level(b): h = kappa_a * beta * (l(a) - l(b)), kappa_a = `kappa` (2.5) if
    level(a) = 1 else 1. Equal levels give no pair. Loss = mean over all pairs of the batch of -logsig(h)
    + c * mean k3-KL(pi_theta || pi_old), k3 = e^q - q - 1 with q = clip(log pi_old - log pi_theta, -10, 10), averaged
    over the completion tokens of the valid responses of the prompts that have at least one pair. A prompt with no
    pair contributes nothing (neither term) and is counted in "prompts/no_pair"; a batch without any pair gives
    loss 0 with zero, finite gradients.
    """
    name = "trpa"
    check_objective_beta(name, beta)
    check_hyperparameter(name, "kl_coef", kl_coef, lambda c: c >= 0, "kl_coef >= 0")
    check_hyperparameter(name, "kappa", kappa, lambda k: k > 0, "kappa > 0")
    _check_ndim(name, 3, "[prompts, K, tokens]", policy=policy)
    _check_shapes(name, policy=policy, reference=reference, old=old, mask=mask)
    valid = jnp.ones(np.shape(levels), bool) if valid is None else valid
    _check_shape(name, "levels", levels, np.shape(policy)[:2], "[prompts, K], like policy's leading axes")
    _check_shape(name, "valid", valid, np.shape(policy)[:2], "[prompts, K], like policy's leading axes")
    if _is_concrete(levels) and _is_concrete(valid):
        present = np.asarray(levels)[np.asarray(valid) > 0]
        bad = sorted(set(present.tolist()) - set(TRPA_LEVELS))
        if bad:
            raise ValueError(f"{name}: levels must be in {TRPA_LEVELS} (1 correct, 2 wrong, 3 incomplete, "
                             f"4 malformed) for valid responses, got {bad}")
    valid = jnp.asarray(valid) > 0
    tokens = (jnp.asarray(mask) > 0) & valid[..., None]
    log_ratio = jnp.where(tokens, policy - reference, 0.0)
    ell = jnp.sum(log_ratio, axis=-1) / jnp.maximum(jnp.sum(tokens, axis=-1), 1)  # [B, K]
    levels = jnp.asarray(levels)
    pairs = valid[:, :, None] & valid[:, None, :] & (levels[:, :, None] < levels[:, None, :])  # [B, K(a), K(b)]
    scale = jnp.where(levels == 1, kappa, 1.0)[:, :, None] * beta
    h = scale * (ell[:, :, None] - ell[:, None, :])
    n_pairs = jnp.sum(pairs)
    preference = jnp.sum(jnp.where(pairs, -jax.nn.log_sigmoid(h), 0.0)) / jnp.maximum(n_pairs, 1)

    has_pair = jnp.any(pairs, axis=(1, 2))  # [B]
    kl_tokens = tokens & has_pair[:, None, None]
    q = jnp.clip(jnp.where(kl_tokens, jax.lax.stop_gradient(old) - policy, 0.0), -10.0, 10.0)
    k3 = jnp.where(kl_tokens, jnp.exp(q) - q - 1.0, 0.0)
    kl = jnp.sum(k3) / jnp.maximum(jnp.sum(kl_tokens), 1)
    loss = preference + kl_coef * kl
    metrics = {
        "trpa/preference_loss": preference,
        "trpa/kl": kl,
        "trpa/pairs": n_pairs.astype(jnp.float32),
        "rewards/accuracy": jnp.sum(pairs & (h > 0)) / jnp.maximum(n_pairs, 1),
        "prompts/used": jnp.sum(has_pair).astype(jnp.float32),
        "prompts/no_pair": jnp.sum(~has_pair).astype(jnp.float32),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# BRAIn


def brain(policy: jax.Array, sft: jax.Array, proposal: jax.Array, mask: jax.Array, rewards: jax.Array,
          beta: Any = 0.1) -> tuple[jax.Array, Metrics]:
    """BRAIn (Pandey et al., 2024, "BRAIn: Bayesian Reward-conditioned Amortized Inference"; docs/algorithms.md;
    not checked against the paper: the form implemented is the one below, without the paper's baseline term).

    n samples y_i per prompt from a proposal q: per-token log-probs [B, n, T] of the policy, of pi_SFT and of q,
    completion mask [B, n, T], rewards [B, n]. With sequence log-probs L:
    alpha_i = softmax_i(L_SFT(y_i) + r_i/beta - L_q(y_i)) (self-normalised importance weights of the posterior
    pi_SFT e^{r/beta}; no gradient), b_i = softmax_i(L_theta(y_i) - L_q(y_i)); loss = mean_B -sum_i alpha_i log b_i.

    Reduction (tested): for n = 2 with one-hot alpha = (1, 0), loss = -log b_1 =
    -logsig((L_theta(y_1) - L_q(y_1)) - (L_theta(y_2) - L_q(y_2))), i.e. sigmoid DPO (Rafailov et al. 2023, eq. 7)
    with beta = 1, the proposal q as reference, y_1 chosen and y_2 rejected. When q = pi_SFT, log q cancels in alpha
    (alpha = softmax(r/beta), one-hot as the reward gap over beta grows) and the reference is the SFT model.
    """
    name = "brain"
    check_objective_beta(name, beta)
    _check_ndim(name, 3, "[prompts, n, tokens]", policy=policy)
    _check_shapes(name, policy=policy, sft=sft, proposal=proposal, mask=mask)
    _check_shape(name, "rewards", rewards, np.shape(policy)[:2], "[prompts, n], like policy's leading axes")
    log_q = _masked_sum(proposal, mask)
    target = jax.nn.softmax(jax.lax.stop_gradient(_masked_sum(sft, mask) + rewards / beta - log_q), axis=-1)
    log_b = jax.nn.log_softmax(_masked_sum(policy, mask) - log_q, axis=-1)
    # 0 * log b must be 0 even where log b underflows to -inf: select instead of multiply.
    per_prompt = -jnp.sum(jnp.where(target > 0, target * log_b, 0.0), axis=-1)
    ess = 1.0 / jnp.sum(target**2, axis=-1)
    metrics = {
        "brain/target_max": jnp.mean(jnp.max(target, axis=-1)),
        "brain/effective_samples": jnp.mean(ess),
        "brain/policy_on_target_argmax": jnp.mean(
            jnp.exp(jnp.take_along_axis(log_b, jnp.argmax(target, axis=-1)[:, None], axis=-1)[:, 0])),
    }
    return jnp.mean(per_prompt), metrics


# ----------------------------------------------------------------------------------------------------------------
# DDO


def ddo(data_policy: jax.Array, data_reference: jax.Array, data_mask: jax.Array, sample_policy: jax.Array,
        sample_reference: jax.Array, sample_mask: jax.Array, beta: Any = 0.1,
        alpha: Any = 1.0) -> tuple[jax.Array, Metrics]:
    """DDO (Zheng et al., 2025, "Direct Discriminative Optimization"; docs/algorithms.md, from the paper).

    Delta(x) = log p_theta(x) - log p_ref(x) (sequence level, summed over the mask); the implicit discriminator is
    sig(beta Delta). Loss = -E_{x~data} logsig(beta Delta) - alpha E_{x~p_ref} log(1 - sig(beta Delta)), with
    log(1 - sig(u)) = logsig(-u). Two batches: data sequences (data_* [N, T]) and samples of the reference model
    (sample_* [M, T]); each expectation is the batch mean. Defaults beta = 0.1 (the library's usual) and alpha = 1
    are not the paper's tuned values. Multi-round DDO (ref <- theta) is a loop that comes later.
    """
    name = "ddo"
    check_objective_beta(name, beta)
    check_hyperparameter(name, "alpha", alpha, lambda a: a >= 0, "alpha >= 0")
    _check_ndim(name, 2, "[sequences, tokens]", data_policy=data_policy, sample_policy=sample_policy)
    _check_shapes(name, data_policy=data_policy, data_reference=data_reference, data_mask=data_mask)
    _check_shapes(name, sample_policy=sample_policy, sample_reference=sample_reference, sample_mask=sample_mask)
    delta_data = _masked_sum(data_policy, data_mask) - _masked_sum(data_reference, data_mask)
    delta_sample = _masked_sum(sample_policy, sample_mask) - _masked_sum(sample_reference, sample_mask)
    data_term = -jnp.mean(jax.nn.log_sigmoid(beta * delta_data))
    sample_term = -jnp.mean(jax.nn.log_sigmoid(-beta * delta_sample))
    metrics = {
        "ddo/data_term": data_term,
        "ddo/sample_term": sample_term,
        "ddo/data_logratio": jnp.mean(delta_data),
        "ddo/sample_logratio": jnp.mean(delta_sample),
        "ddo/accuracy": 0.5 * (jnp.mean((delta_data > 0).astype(jnp.float32))
                               + jnp.mean((delta_sample < 0).astype(jnp.float32))),
    }
    return data_term + alpha * sample_term, metrics


# ----------------------------------------------------------------------------------------------------------------
# Step-DPO


def step_mask(prefix_lengths: Any, step_lengths: Any, width: int) -> jax.Array:
    """[B, width] float mask, 1 on positions prefix_length <= t < prefix_length + step_length (Step-DPO's step).

    Positions are indices into the completion log-prob arrays of `step_dpo`: the shared prompt + correct prefix steps
    take the first prefix_length positions, the step follows. Concrete inputs are checked: step_length >= 1,
    prefix_length >= 0 and prefix_length + step_length <= width.
    """
    _check_shapes("step_mask", prefix_lengths=prefix_lengths, step_lengths=step_lengths)
    if np.ndim(prefix_lengths) != 1:
        raise ValueError(f"step_mask: prefix_lengths must be 1-D [B], got shape {np.shape(prefix_lengths)}")
    if _is_concrete(prefix_lengths) and _is_concrete(step_lengths):
        p, s = np.asarray(prefix_lengths), np.asarray(step_lengths)
        if np.any(s < 1) or np.any(p < 0) or np.any(p + s > width):
            raise ValueError(f"step_mask: need step_length >= 1, prefix_length >= 0 and prefix_length + step_length "
                             f"<= width={width}, got prefix_lengths={p.tolist()}, step_lengths={s.tolist()}")
    t = jnp.arange(width)[None, :]
    p = jnp.asarray(prefix_lengths)[:, None]
    return ((t >= p) & (t < p + jnp.asarray(step_lengths)[:, None])).astype(jnp.float32)


def step_dpo(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, prefix_lengths: Any, chosen_step_lengths: Any,
             rejected_step_lengths: Any, beta: Any = 0.4) -> tuple[jax.Array, Metrics]:
    """Step-DPO (Lai et al., 2024, "Step-DPO: Step-wise Preference Optimization for Long-chain Reasoning";
    docs/algorithms.md, from the authors' code): sigmoid DPO (Rafailov et al. 2023, eq. 7) on the step tokens only.

    The prompt is x + the correct prefix steps (shared by both sides, `prefix_lengths` [B] positions); chosen is a
    correct next step, rejected the first wrong step, of `chosen_step_lengths` / `rejected_step_lengths` [B] tokens
    right after the prefix. Per-token log-probs [B, T] (per side; T may differ between sides). The masks are built by
    `step_mask`; tokens outside the step (prefix, padding, anything after the step) reach neither loss nor gradient.
    Default beta 0.4 (the authors' code uses 0.4 to 0.5).
    """
    name = "step_dpo"
    check_objective_beta(name, beta)
    _check_ndim(name, 2, "[pairs, tokens]", policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    _check_shapes(name, policy_chosen=policy_chosen, reference_chosen=reference_chosen)
    _check_shapes(name, policy_rejected=policy_rejected, reference_rejected=reference_rejected)
    mask_w = step_mask(prefix_lengths, chosen_step_lengths, policy_chosen.shape[-1])
    mask_l = step_mask(prefix_lengths, rejected_step_lengths, policy_rejected.shape[-1])
    if mask_w.shape[0] != policy_chosen.shape[0]:
        raise ValueError(f"{name}: prefix_lengths has {mask_w.shape[0]} entries for {policy_chosen.shape[0]} pairs")
    _check_shape(name, "policy_rejected", policy_rejected, (policy_chosen.shape[0], policy_rejected.shape[1]),
                 "as many pairs as policy_chosen")
    z_w = _masked_sum(policy_chosen, mask_w) - _masked_sum(reference_chosen, mask_w)
    z_l = _masked_sum(policy_rejected, mask_l) - _masked_sum(reference_rejected, mask_l)
    loss = jnp.mean(-jax.nn.log_sigmoid(beta * (z_w - z_l)))
    return loss, implicit_reward_metrics(z_w, z_l, beta)
