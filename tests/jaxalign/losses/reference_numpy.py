"""Float64 NumPy references for the objective tests, each written once, from the formulas (docs/objectives.md).

The tests compare jaxalign's float32 JAX objectives with these on the same per-token log-probs. They are written to
be read against the papers, not to be fast: loops where a formula is a loop, and no clamping beyond the documented
ones (|y| >= 1, the alpha-divergence clamp). The dictionaries `a` they take hold float64 arrays named like the
fields of `PairwiseInputs` ("policy_chosen", "reference_rejected", "chosen_mask", ...; zero outside the masks) and,
for WPO, the per-token normalisers "wpo_chosen" / "wpo_rejected".

Also here: the checks of the library's error messages for a bad extra ("<objective>: ... '<field>' ...") and a bad
hyper-parameter ("<objective>.<parameter> ... <value>").
"""
from __future__ import annotations

import numpy as np
import pytest

SIDES = ("chosen", "rejected")
MODELS = ("policy", "reference")


def logsig(x):
    """log sigmoid(x), stable for large |x|."""
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    """Softmax over the last axis."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def logsumexp(x):
    """log sum_i exp(x_i) of a vector."""
    x = np.asarray(x, np.float64)
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def span_masks(lengths, starts, width):
    """float64 masks [..., width], 1 on positions start <= t < start + length (a completion after its prompt)."""
    lengths, starts = np.asarray(lengths), np.asarray(starts)
    t = np.arange(width)
    return ((t >= starts[..., None]) & (t < (starts + lengths)[..., None])).astype(np.float64)


# ------------------------------------------------------------------------------------------------------------------
# the DPO family (docs/objectives.md, "Reference-based pairwise objectives")


def dpo(margin, beta):
    """Per-pair DPO loss -log sigmoid(beta * margin) (Rafailov et al. 2023, eq. 7), margin = z_w - z_l."""
    return -logsig(beta * margin)


def sppo_hard(z_chosen, z_rejected, beta):
    """Per-pair SPPO loss with hard win probabilities (Wu et al. 2024, eq. 4.7): log-ratios regressed to +-1/(2b)."""
    return (z_chosen - 1 / (2 * beta)) ** 2 + (z_rejected + 1 / (2 * beta)) ** 2


REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def implicit_reward_metrics(z_chosen, z_rejected, beta):
    """The metrics every pairwise objective logs: beta*z of each side, their margin, mean(z_w > z_l)."""
    return {"rewards/chosen": np.mean(beta * z_chosen), "rewards/rejected": np.mean(beta * z_rejected),
            "rewards/margin": np.mean(beta * (z_chosen - z_rejected)),
            "rewards/accuracy": np.mean(z_chosen > z_rejected)}  # fmt: skip


def ld_weights(a, ld_alpha):
    """LD-DPO's token weights per side, as a loop: the k-th completion token (k counted in mask order) weighs 1 if
    k <= min(|y_w|, |y_l|), else ld_alpha; 0 outside the mask. ld_alpha None: the mask itself."""
    shared = np.minimum(a["chosen_mask"].sum(1), a["rejected_mask"].sum(1))
    out = {}
    for side in SIDES:
        mask = a[f"{side}_mask"]
        w = np.zeros_like(mask)
        for i in range(mask.shape[0]):
            k = 0
            for t in range(mask.shape[1]):
                if mask[i, t]:
                    k += 1
                    w[i, t] = 1.0 if (ld_alpha is None or k <= shared[i]) else ld_alpha
        out[side] = w
    return out


def f_score(z, f_divergence, f_alpha):
    """The f-DPO score s(z) of a summed log-ratio (Wang et al. 2023), with TRL 1.16.0's clamp (a-1) z <= 80."""
    if f_divergence in (None, "reverse_kl"):
        return z
    if f_divergence == "forward_kl":
        return 1.0 - np.exp(-z)
    if f_divergence == "js_divergence":
        return np.log(2.0) + logsig(z)
    if abs(f_alpha - 1.0) < 1e-6:
        return z
    return (np.exp(np.minimum((f_alpha - 1.0) * z, 80.0)) - 1.0) / (f_alpha - 1.0)


def wpo_weights(a):
    """WPO's pair weights w(y_w) w(y_l), w(y) = exp(mean over completion tokens of logp_t - log sum_v p_v^2)."""
    w = {}
    for side in SIDES:
        mask = a[f"{side}_mask"]
        mean = ((a[f"policy_{side}"] - a[f"wpo_{side}"]) * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
        w[side] = np.exp(mean)
    return w["chosen"] * w["rejected"]


def pairwise_loss(name, a, *, beta=0.1, label_smoothing=None, tau=0.05, f_divergence=None, f_alpha=0.5, ld_alpha=None,
                  wpo=False):  # fmt: skip
    """(loss, metrics) of the reference-based pairwise objective `name` (TRL 1.16.0's loss_type of that name, or
    cdpo), with the three modifiers applied as TRL applies them: f-divergence scores of each side's summed
    log-ratio, LD-weighted sequence log-probs (ipo / sigmoid_norm still divide by the full |y|; sft reads the
    unweighted tokens) and WPO pair weights. label_smoothing None: the objective's default."""
    weights = ld_weights(a, ld_alpha)
    L = {f"{who}_{side}": (a[f"{who}_{side}"] * weights[side]).sum(1) for who in MODELS for side in SIDES}
    zw, zl = L["policy_chosen"] - L["reference_chosen"], L["policy_rejected"] - L["reference_rejected"]
    sw, sl = f_score(zw, f_divergence, f_alpha), f_score(zl, f_divergence, f_alpha)
    nw, nl = np.maximum(a["chosen_mask"].sum(1), 1.0), np.maximum(a["rejected_mask"].sum(1), 1.0)
    b, D = beta, sw - sl
    eps = {"cdpo": 0.1, "exo_pair": 1e-3}.get(name, 0.0) if label_smoothing is None else label_smoothing
    if name == "sigmoid":
        per = dpo(D, b)
    elif name == "cdpo":
        per = -(1 - eps) * logsig(b * D) - eps * logsig(-b * D)
    elif name == "robust":
        per = (-(1 - eps) * logsig(b * D) + eps * logsig(-b * D)) / (1 - 2 * eps)
    elif name == "hinge":
        per = np.maximum(0.0, 1 - b * D)
    elif name == "ipo":
        per = (sw / nw - sl / nl - 1 / (2 * b)) ** 2
    elif name == "exo_pair":
        per = sig(b * D) * (logsig(b * D) - np.log(1 - eps)) + sig(-b * D) * (logsig(-b * D) - np.log(eps))
    elif name == "nca_pair":
        per = -logsig(b * zw) - 0.5 * logsig(-b * zw) - 0.5 * logsig(-b * zl)
    elif name == "bco_pair":
        per = -logsig(b * zw) - logsig(-b * zl)
    elif name == "sppo_hard":
        per = sppo_hard(zw, zl, b)
    elif name in ("aot", "aot_unpaired"):
        if name == "aot":
            policy_margin = L["policy_chosen"] - L["policy_rejected"]
            d = np.sort(policy_margin) - np.sort(L["reference_chosen"] - L["reference_rejected"])
        else:
            d = np.sort(zw) - np.sort(zl)
        per = -(1 - eps) * logsig(b * d) - eps * logsig(-b * d)
    elif name == "apo_zero":
        per = 1 - sig(b * zw) + sig(b * zl)
    elif name == "apo_down":
        per = sig(b * zw) + 1 - sig(b * (zw - zl))
    elif name == "discopop":
        x = b * D
        m = sig(x / tau)
        per = (1 - m) * (-logsig(x)) + m * np.exp(-x)
    elif name == "sft":  # unweighted tokens, whatever ld_alpha
        per = np.full(zw.shape, -a["policy_chosen"][a["chosen_mask"] > 0].mean())
    elif name == "sigmoid_norm":
        per = -logsig(b * (sw / nw - sl / nl))
    else:
        raise KeyError(name)
    if wpo:
        per = per * wpo_weights(a)
    return per.mean(), implicit_reward_metrics(zw, zl, b)


# ------------------------------------------------------------------------------------------------------------------
# error messages


def assert_names_field(call, objective, field, expected):
    """`call()` raises one ValueError that starts with "<objective>:" and names the field and what was expected."""
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert message.startswith(f"{objective}:") and f"'{field}'" in message and expected in message, message


def assert_names_parameter(call, objective, parameter, value):
    """`call()` raises one ValueError that names "<objective>.<parameter>" and the offending value (its repr)."""
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert f"{objective}.{parameter}" in message and value in message, message
