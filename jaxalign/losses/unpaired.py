"""Unpaired (pointwise) objectives: KTO, BCO and DRO (docs/objectives.md, "Unpaired objectives").

Inputs are `UnpairedInputs`: single completions with per-token log-probs [n, time] of policy and reference, a
completion mask and a `desirable` label [n] (1 desirable / chosen, 0 undesirable / rejected; values > 0.5 count as
desirable). Paired data becomes unpaired with `jaxalign.losses.unpair` (chosen -> desirable, rejected ->
undesirable), as TRL does. z = L_theta(y) - L_ref(y) is the summed completion log-ratio, beta*z the implicit reward.

Losses are means over the n examples of per-example losses. Extras are read with `require_extra` (one ValueError
naming the objective and the field); every batch statistic (KTO's KL estimate, BCO's baseline) is a constant for
the gradient.

Metrics: "rewards/chosen" / "rewards/rejected" are the means of beta*z over the desirable / undesirable examples
(0 when the batch has none of that kind), "rewards/margin" their difference, "count/desirable" the number of
desirable examples; plus each objective's own statistics.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses.common import check_hyperparameter, check_objective_beta
from jaxalign.losses.registry import StateHooks, UnpairedInputs, register
from jaxalign.losses.weighted import check_extra_values, require_extra

Metrics = dict[str, jax.Array]


def _log_ratio(inputs: UnpairedInputs) -> jax.Array:
    return inputs.sequence("policy") - inputs.sequence("reference")


def _is_desirable(inputs: UnpairedInputs) -> jax.Array:
    return (inputs.desirable > 0.5).astype(jnp.float32)


def _examples(inputs: UnpairedInputs) -> int:
    return inputs.mask.shape[0]


def _check_labels(objective: str, inputs: UnpairedInputs) -> None:
    if tuple(inputs.desirable.shape) != (_examples(inputs),):
        raise ValueError(
            f"{objective}: inputs.desirable must have shape [{_examples(inputs)}] (one label per completion), "
            f"got {list(inputs.desirable.shape)}"
        )


def unpaired_reward_metrics(rewards: jax.Array, desirable: jax.Array) -> Metrics:
    """Means of the implicit rewards over desirable and undesirable examples (0 for an absent kind)."""
    rewards = jax.lax.stop_gradient(rewards)
    n_good = jnp.sum(desirable)
    n_bad = jnp.sum(1.0 - desirable)
    chosen = jnp.sum(rewards * desirable) / jnp.maximum(n_good, 1.0)
    rejected = jnp.sum(rewards * (1.0 - desirable)) / jnp.maximum(n_bad, 1.0)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "count/desirable": n_good,
    }


# ----------------------------------------------------------------------------------------------------------------
# KTO


@register("kto", family="unpaired", extras=("kl_policy", "kl_reference"), batch_coupled=True)
def kto(inputs: UnpairedInputs, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO, Kahneman-Tversky optimisation (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", eqs. 7-8), with the semantics of TRL 1.16.0's `KTOTrainer` (loss_type="kto"):

        desirable:    lambda_D * (1 - sig(beta * (z - KL)))
        undesirable:  lambda_U * (1 - sig(beta * (KL - z)))
        KL = max(0, mean_j [L_theta(y'_j | x_j) - L_ref(y'_j | x_j)]),  no gradient,

    the loss being the mean over all n examples (TRL's `nanmean` of the weighted losses). The reference point KL is
    estimated from MISMATCHED prompt/completion pairs (x_j, y'_j) of the same batch. `lambda_D` =
    `desirable_weight`, `lambda_U` = `undesirable_weight` (default 1; the paper recommends lambda_D n_D /
    (lambda_U n_U) in [1, 4/3] for imbalanced data); both >= 0.

    Extras (declared): "kl_policy" and "kl_reference" [m], the summed completion log-probs of the mismatched
    sequences under the policy (no gradient is taken through it) and the reference. How a trainer builds them, as
    TRL does: rotate the completions of the batch by one, y'_j = y_{j-1 mod n} (TRL's `KL_completion_ids` =
    [completion_ids[-1]] + completion_ids[:-1]), pair each with the unchanged prompt x_j, run the policy and the
    reference on those sequences (prompt masked out of the completion mask) and sum the completion log-probs.
    m is usually n but may differ. TRL needs a per-device batch > 1 for this to differ from the matched reward.

    batch_coupled: KL is a batch statistic (TRL averages it over devices too).
    Metrics add "kl" (the clamped estimate) and the unpaired reward means.
    """
    check_objective_beta("kto", beta)
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        check_hyperparameter("kto", name, value, lambda w: w >= 0 and np.isfinite(w), f"{name} >= 0")
    _check_labels("kto", inputs)
    kl_policy = require_extra("kto", inputs.extras, "kl_policy", (None,),
                              "the policy's summed log-probs of mismatched (prompt, rotated completion) sequences")
    kl_reference = require_extra("kto", inputs.extras, "kl_reference", tuple(kl_policy.shape),
                                 "the reference's summed log-probs of the same mismatched sequences")
    kl = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_policy - kl_reference), 0.0))
    z = _log_ratio(inputs)
    good = _is_desirable(inputs)
    desirable_loss = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - kl)))
    undesirable_loss = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - z)))
    per_example = good * desirable_loss + (1.0 - good) * undesirable_loss
    return jnp.mean(per_example), unpaired_reward_metrics(beta * z, good) | {"kl": kl}


# ----------------------------------------------------------------------------------------------------------------
# BCO


@flax.struct.dataclass
class RunningMoments:
    """Running mean and (population) variance of a stream of values, merged batch by batch (Chan et al., 1979,
    the pairwise update): the state of BCO's reward baseline. `count` starts at 1e-24, not 0, as in TRL's
    `RunningMoments`, so the first update needs no special case (and the initial mean 0 / var 1 get weight ~0)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def init(cls) -> "RunningMoments":
        scalar = lambda value: jnp.full((), value, jnp.float32)  # noqa: E731
        return cls(mean=scalar(0.0), var=scalar(1.0), count=scalar(1e-24))

    @property
    def std(self) -> jax.Array:
        """Unbiased standard deviation sqrt(var * count / (count - 1)) (inf/nan until count > 1, as TRL's)."""
        return jnp.sqrt(self.var * self.count / (self.count - 1.0))


def update_running_mean(state: RunningMoments, batch_rewards: jax.Array) -> RunningMoments:
    """Fold the values `batch_rewards` (any shape, all counted) into `state`; pure, jit-able.

    Same update as TRL's `RunningMoments.update` (used by its former BCOTrainer): with the batch's mean m_b,
    population variance v_b and size n_b, and d = m_b - mean, N = count + n_b:
    mean += d n_b / N;  var = (var*count + d^2 count n_b / N + v_b n_b) / N;  count = N.
    After any sequence of updates, mean and var equal the mean and population variance of all values seen (up to the
    1e-24 initial pseudo-count). BCO feeds it ONE value per step, the batch mean of beta*z (so the baseline is the
    mean over steps of batch-mean rewards).
    """
    x = jnp.asarray(batch_rewards, jnp.float32).reshape(-1)
    n = jnp.asarray(x.shape[0], jnp.float32)
    x_mean = jnp.mean(x)
    x_var = jnp.mean((x - x_mean) ** 2)
    delta = x_mean - state.mean
    total = state.count + n
    old_sum = state.var * state.count + delta**2 * state.count * n / total
    return RunningMoments(
        mean=state.mean + delta * n / total,
        var=(old_sum + x_var * n) / total,
        count=total,
    )


def bco_batch_reward(inputs: UnpairedInputs, beta: float = 0.1) -> jax.Array:
    """The batch mean of the implicit rewards beta*z over all n examples, no gradient: what BCO's baseline tracks."""
    return jax.lax.stop_gradient(jnp.mean(beta * _log_ratio(inputs)))


def bco_baseline(state: RunningMoments, inputs: UnpairedInputs, beta: float = 0.1) -> tuple[RunningMoments, jax.Array]:
    """TRL's order: update the running mean with THIS batch's mean reward, then use it as the baseline.

    Returns (new_state, delta). Inside a loss function: `state, delta = bco_baseline(state, inputs, beta)`, then
    `bco(inputs.replace(extras={**inputs.extras, "reward_baseline": delta}), beta)`, and carry `state` to the next
    step (e.g. in the train state). Both stay pure; delta is a constant for the gradient.
    """
    new_state = update_running_mean(state, bco_batch_reward(inputs, beta))
    return new_state, new_state.mean


def bco_state_update(state: RunningMoments, inputs: UnpairedInputs, beta: float = 0.1):
    """BCO's `StateHooks.update`: `bco_baseline`, its delta handed to the objective as extra "reward_baseline"."""
    new_state, delta = bco_baseline(state, inputs, beta)
    return new_state, {"reward_baseline": delta}


@register("bco", family="unpaired", extras=("reward_baseline",), batch_coupled=True,
          state=StateHooks(RunningMoments.init, bco_state_update, ("reward_baseline",), "a running baseline"))
def bco(inputs: UnpairedInputs, beta: float = 0.1):
    """BCO, binary classifier optimisation (Jung et al., 2024, "Binary Classifier Optimization for Large Language
    Model Alignment", the reward-shift loss) with the semantics of TRL's former `BCOTrainer.bco_loss` (no longer in
    TRL 1.16.0), without its optional underlying-distribution-matching (UDM) weights:

        r = beta * z,   desirable: -logsig(r - delta),   undesirable: -logsig(-(r - delta)),

    mean over the n examples. delta is the running mean of the batch-mean rewards, a constant for the gradient.

    Pure: the baseline arrives as extra "reward_baseline" (a scalar, shape []), and the batch's mean reward is
    reported as metric "rewards/batch_mean" so the caller can update its `RunningMoments` state with
    `update_running_mean`. TRL updates the running mean with the current batch BEFORE using it; `bco_baseline`
    does exactly that (same batch, no second forward pass needed). Passing the previous step's mean instead is the
    lagged variant. batch_coupled: in TRL's order delta includes this batch's mean reward, so microbatches that
    each update the running mean do not reproduce the large batch exactly (given delta, each loss is its own).
    """
    check_objective_beta("bco", beta)
    _check_labels("bco", inputs)
    delta = require_extra("bco", inputs.extras, "reward_baseline", (), "the running mean of batch rewards (a scalar)")
    check_extra_values("bco", "reward_baseline", delta, np.isfinite, "a finite value")
    delta = jax.lax.stop_gradient(delta.astype(jnp.float32))
    rewards = beta * _log_ratio(inputs)
    good = _is_desirable(inputs)
    shifted = rewards - delta
    per_example = -good * jax.nn.log_sigmoid(shifted) - (1.0 - good) * jax.nn.log_sigmoid(-shifted)
    metrics = unpaired_reward_metrics(rewards, good)
    metrics |= {"rewards/batch_mean": jax.lax.stop_gradient(jnp.mean(rewards)), "delta": delta}
    return jnp.mean(per_example), metrics


# ----------------------------------------------------------------------------------------------------------------
# DRO


# beta reaches DRO as tau, which multiplies the log-ratio as beta does.
@register("dro", family="unpaired", extras=("reward", "value"), beta_aliases={"tau": lambda beta: beta})
def dro(inputs: UnpairedInputs, tau: float = 0.1):
    """DRO, direct reward optimisation (Richemond et al., 2024, "Offline Regularised Reinforcement Learning for
    Large Language Models Alignment", arXiv 2405.19107; docs/objectives.md; not checked against the paper):

        loss = mean_i 0.5 * (r_i - V(x_i) - tau * z_i)^2,   z_i = log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i),

    for single trajectories (x, y, r) with a scalar reward (no preference pairs: `desirable` is ignored).

    Provenance: the paper's body was not read. Its abstract only says "a simple mean-squared objective"; the form
    above is the one commonly attributed to it, and secondary descriptions agree (the RPO paper, arXiv 2506.13702,
    summarises DRO as the squared error of r - V = tau log(pi/pi_ref) over pi_theta and V_phi; Tinker's DRO loss
    uses the policy term log pi * A - (beta/2) (log pi/q)^2, the same gradient as below divided by tau).

    Implemented form: ONE joint squared loss, differentiated with respect to both the policy (through z) and the
    value V_phi (through extra "value", which must carry its gradient). No stop-gradient anywhere: for the policy,
    d/dtheta = -tau (r - V - tau z) dz/dtheta, i.e. V enters as a baseline (it does not depend on theta when V is a
    separate network, e.g. a `ScalarHeadLM`); for the value, d/dphi = -(r - V - tau z) dV/dphi. The policy-gradient
    form -(r - V) grad log pi + (tau/2) grad (log pi/pi_ref)^2 is this gradient divided by tau (a learning-rate
    rescale). The 1/2 multiplies the square, tau multiplies only the log-ratio; at the optimum V(x) = tau log Z(x).
    If V shares parameters with the policy, pass a stop-gradient value for the policy term yourself. tau > 0
    (default 0.1, our choice).

    Extras: "reward" [n], the scalar reward r(x, y) of each completion (data, no gradient); "value" [n], V(x) for
    each example's prompt, e.g. a value head's output at the last prompt token (`jaxalign.models.heads`).
    Metrics: "residual/mean" and "residual/rms" of r - V - tau z, "value/mean", "reward/mean", "rewards/implicit"
    (mean tau z).
    """
    check_hyperparameter("dro", "tau", tau, lambda t: t > 0 and np.isfinite(t), "tau > 0 (the KL strength)")
    n = _examples(inputs)
    reward = require_extra("dro", inputs.extras, "reward", (n,), "the scalar reward r(x, y) per completion")
    value = require_extra("dro", inputs.extras, "value", (n,), "the value V(x) of each prompt, with its gradient")
    check_extra_values("dro", "reward", reward, np.isfinite, "finite values")
    reward = jax.lax.stop_gradient(reward.astype(jnp.float32))
    z = _log_ratio(inputs)
    residual = reward - value - tau * z
    metrics = {
        "residual/mean": jax.lax.stop_gradient(jnp.mean(residual)),
        "residual/rms": jax.lax.stop_gradient(jnp.sqrt(jnp.mean(residual**2))),
        "value/mean": jax.lax.stop_gradient(jnp.mean(value)),
        "reward/mean": jnp.mean(reward),
        "rewards/implicit": jax.lax.stop_gradient(jnp.mean(tau * z)),
    }
    return jnp.mean(0.5 * residual**2), metrics
