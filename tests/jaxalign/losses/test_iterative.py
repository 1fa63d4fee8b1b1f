"""Objectives of the iterative algorithms (jaxalign.losses.iterative; docs/algorithms.md).

Every function is checked against an independent float64 NumPy implementation written here from the papers'
formulas (the DPO and SPPO losses they reduce to are `reference_numpy`'s), on random inputs with padding (filled with garbage, even NaN, that must never leak), unequal lengths and
ties; gradients are checked to be finite, zero on padding and of the sign each paper intends; and the reductions:
APO at alpha = 0 is DPO / sppo_hard against the newer checkpoint, BRAIn with n = 2 and one-hot weights is DPO with
beta = 1 against the proposal.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import OBJECTIVES
from jaxalign.losses import iterative as it
from jaxalign.losses.dpo import sigmoid
from jaxalign.losses.pairwise import sppo_hard
from jaxalign.losses.registry import PairwiseInputs
from reference_numpy import dpo, logsig, sig, softmax, span_masks, sppo_hard as np_sppo_hard


def garbage_pad(x, mask, value=np.nan):
    """Fill positions outside the mask with `value`: a correct objective never reads them."""
    return jnp.where(jnp.asarray(mask) > 0, x, value)  # jnp: also used on traced arrays under jax.grad


def f32(x):
    return jnp.asarray(x, jnp.float32)


STATIC = ("beta", "alpha", "kl_coef", "kappa")
_JITTED = {}


def jitted(fn):
    """fn under jax.jit with its hyper-parameters static (still validated at trace time): one compilation per shape
    instead of one per eager op keeps the file fast. Validation of concrete array values (TRPA levels, step lengths)
    only runs eagerly, so the tests of those call the functions directly."""
    if fn not in _JITTED:
        names = [n for n in STATIC if n in inspect.signature(fn).parameters]
        _JITTED[fn] = jax.jit(fn, static_argnames=names)
    return _JITTED[fn]


def test_nothing_here_is_registered():
    names = {"apo_dpo", "apo_sppo", "trpa", "brain", "ddo", "step_dpo"}
    assert not names & set(OBJECTIVES)


# ------------------------------------------------------------------------------------------------------------------
# APO

CHOSEN_LENGTHS = [5, 1, 7, 3, 4, 6]
REJECTED_LENGTHS = [3, 6, 7, 1, 4, 2]
WIDTH = 8


def apo_arrays(seed):
    """Six pairs, unequal lengths, padding, and an exact tie in pair 4 (rejected == chosen in all three models)."""
    rng = np.random.default_rng(seed)
    mc = span_masks(CHOSEN_LENGTHS, [0, 0, 1, 0, 2, 0], WIDTH)
    mr = span_masks(REJECTED_LENGTHS, [0, 2, 0, 0, 2, 1], WIDTH)
    a = {}
    for side, mask in (("chosen", mc), ("rejected", mr)):
        nxt = -rng.uniform(0.05, 3.0, mask.shape)
        a[f"reference_{side}"] = nxt
        a[f"previous_{side}"] = nxt + rng.normal(0.0, 0.5, mask.shape)
        a[f"policy_{side}"] = nxt + rng.normal(0.0, 0.4, mask.shape)
    for key in ("policy", "reference", "previous"):
        a[f"{key}_rejected"][4] = a[f"{key}_chosen"][4]
    mr[4] = mc[4]
    a["chosen_mask"], a["rejected_mask"] = mc, mr
    return a


def apo_call(fn, a, pad=0.0, bool_masks=False, eager=False, **kw):
    mc, mr = a["chosen_mask"], a["rejected_mask"]
    side = {"chosen": mc, "rejected": mr}
    arr = {k: garbage_pad(v, side[k.split("_")[1]], pad) for k, v in a.items() if not k.endswith("mask")}
    cast = (lambda m: jnp.asarray(m > 0)) if bool_masks else f32
    inputs = PairwiseInputs(policy_chosen=f32(arr["policy_chosen"]), policy_rejected=f32(arr["policy_rejected"]),
                            reference_chosen=f32(arr["reference_chosen"]),
                            reference_rejected=f32(arr["reference_rejected"]), chosen_mask=cast(mc),
                            rejected_mask=cast(mr))
    return (fn if eager else jitted(fn))(inputs, f32(arr["previous_chosen"]), f32(arr["previous_rejected"]), **kw)


def numpy_apo(a, beta, alpha, kind):
    S = {k: np.sum(v * a[f"{k.split('_')[1]}_mask"], axis=1) for k, v in a.items() if not k.endswith("mask")}
    zw = S["policy_chosen"] - ((1 + alpha) * S["reference_chosen"] - alpha * S["previous_chosen"])
    zl = S["policy_rejected"] - ((1 + alpha) * S["reference_rejected"] - alpha * S["previous_rejected"])
    loss = np.mean(dpo(zw - zl, beta) if kind == "dpo" else np_sppo_hard(zw, zl, beta))
    return loss, zw, zl


@pytest.mark.parametrize("kind", ["dpo", "sppo"])
@pytest.mark.parametrize("alpha,beta", [(0.0, 0.1), (0.3, 0.1), (0.7, 0.5)])
def test_apo_matches_numpy(kind, alpha, beta):
    a = apo_arrays(0)
    fn = it.apo_dpo if kind == "dpo" else it.apo_sppo
    loss, metrics = apo_call(fn, a, pad=np.nan, bool_masks=(alpha == 0.3), beta=beta, alpha=alpha)
    ref, zw, zl = numpy_apo(a, beta, alpha, kind)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/margin"]), np.mean(beta * (zw - zl)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/accuracy"]), np.mean(zw > zl), atol=1e-7)
    if kind == "dpo":
        S = {k: np.sum(a[k] * a[f"{k.split('_')[1]}_mask"], axis=1) for k in ("reference_chosen", "reference_rejected",
                                                                               "previous_chosen", "previous_rejected")}
        ref_margin = (1 + alpha) * (S["reference_chosen"] - S["reference_rejected"]) - alpha * (
            S["previous_chosen"] - S["previous_rejected"])
        np.testing.assert_allclose(float(metrics["apo/reference_margin"]), np.mean(ref_margin), rtol=1e-4, atol=1e-5)


def test_apo_alpha_zero_is_exactly_dpo_and_sppo_hard_against_the_newer_checkpoint():
    a = apo_arrays(1)
    inputs = PairwiseInputs(**{k: f32(v) for k, v in a.items() if not k.startswith("previous")})
    for beta in (0.1, 0.9):
        loss, metrics = apo_call(it.apo_dpo, a, eager=True, beta=beta, alpha=0.0)
        dpo_loss, dpo_metrics = sigmoid(inputs, beta=beta)
        assert float(loss) == float(dpo_loss)
        for key, value in dpo_metrics.items():
            assert float(metrics[key]) == float(value), key
        loss, _ = apo_call(it.apo_sppo, a, eager=True, beta=beta, alpha=0.0)
        assert float(loss) == float(sppo_hard(inputs, beta=beta)[0])
    # and alpha > 0 really differs (the previous checkpoint enters)
    assert float(apo_call(it.apo_dpo, a, alpha=0.5)[0]) != float(sigmoid(inputs)[0])


def test_apo_reference_logratio_is_the_extrapolated_delta_at_any_level():
    a = apo_arrays(2)
    alpha = 0.4
    seq = lambda k: np.sum(a[k] * a[f"{k.split('_')[1]}_mask"], axis=1)  # noqa: E731
    d_next = seq("reference_chosen") - seq("reference_rejected")
    d_prev = seq("previous_chosen") - seq("previous_rejected")
    got = it.apo_reference_logratio(f32(d_next), f32(d_prev), alpha)
    np.testing.assert_allclose(np.asarray(got), (1 + alpha) * d_next - alpha * d_prev, rtol=1e-5, atol=1e-5)
    # token level: DPO against the token-wise extrapolated reference == apo_dpo (log Z cancels in the difference)
    ref = {s: it.apo_reference_logratio(f32(a[f"reference_{s}"]), f32(a[f"previous_{s}"]), alpha)
           for s in ("chosen", "rejected")}
    inputs = PairwiseInputs(policy_chosen=f32(a["policy_chosen"]), policy_rejected=f32(a["policy_rejected"]),
                            reference_chosen=ref["chosen"], reference_rejected=ref["rejected"],
                            chosen_mask=f32(a["chosen_mask"]), rejected_mask=f32(a["rejected_mask"]))
    np.testing.assert_allclose(float(sigmoid(inputs)[0]), float(apo_call(it.apo_dpo, a, alpha=alpha)[0]), rtol=1e-5)
    assert np.array_equal(np.asarray(it.apo_reference_logratio(f32(d_next), f32(d_prev), 0.0)), f32(d_next))


def apo_grads(a, **kw):
    mc, mr = a["chosen_mask"], a["rejected_mask"]

    def loss(pc, pr):
        inputs = PairwiseInputs(policy_chosen=pc, policy_rejected=pr, reference_chosen=f32(a["reference_chosen"]),
                                reference_rejected=f32(a["reference_rejected"]), chosen_mask=f32(mc),
                                rejected_mask=f32(mr))
        return it.apo_dpo(inputs, f32(garbage_pad(a["previous_chosen"], mc)),
                          f32(garbage_pad(a["previous_rejected"], mr)), **kw)[0]

    gc, gr = jax.jit(jax.grad(loss, argnums=(0, 1)))(f32(garbage_pad(a["policy_chosen"], mc, 5.0)),
                                            f32(garbage_pad(a["policy_rejected"], mr, 5.0)))
    gc, gr = np.asarray(gc), np.asarray(gr)
    assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))
    assert np.all(gc[mc == 0] == 0) and np.all(gr[mr == 0] == 0)
    return gc.sum(1), gr.sum(1)


def test_apo_gradient_raises_chosen_lowers_rejected_and_momentum_continues_the_improvement():
    a = apo_arrays(3)
    gc, gr = apo_grads(a, alpha=0.5)
    assert np.all(gc < 0) and np.all(gr > 0)
    # The previous checkpoint had a smaller margin than the newer one on every pair (it improved): momentum moves the
    # reference margin further in that direction, so the loss grows with alpha (the policy must go further).
    a["previous_chosen"] = a["reference_chosen"] - 0.3 * a["chosen_mask"]
    a["previous_rejected"] = a["reference_rejected"] + 0.3 * a["rejected_mask"]
    losses = [float(apo_call(it.apo_dpo, a, alpha=al)[0]) for al in (0.0, 0.3, 0.6, 0.9)]
    assert np.all(np.diff(losses) > 0), losses


def test_extrapolate_logits_and_params():
    rng = np.random.default_rng(4)
    ln, lp = rng.normal(size=(3, 5, 11)), rng.normal(size=(3, 5, 11))
    got = it.extrapolate_logits(f32(ln), f32(lp), 0.25)
    np.testing.assert_allclose(np.asarray(got), 1.25 * ln - 0.25 * lp, rtol=1e-5, atol=1e-5)
    # the sampling distribution is pihat_{t+1}^(1+a) / pihat_t^a, normalised: logits and log-probs agree
    log_n = ln - np.log(np.exp(ln).sum(-1, keepdims=True))
    log_p = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(got)), softmax(1.25 * log_n - 0.25 * log_p), atol=1e-5)

    nxt = {"w": rng.normal(size=(4, 3)), "b": [rng.normal(size=(3,)), np.float64(rng.normal())]}
    prv = jax.tree_util.tree_map(lambda x: x + rng.normal(size=np.shape(x)), nxt)
    out = it.extrapolate_params(nxt, prv, 0.6)
    np.testing.assert_allclose(out["w"], nxt["w"] + 0.6 * (nxt["w"] - prv["w"]), rtol=1e-12)
    np.testing.assert_allclose(out["b"][0], 1.6 * nxt["b"][0] - 0.6 * prv["b"][0], rtol=1e-12)
    np.testing.assert_allclose(out["b"][1], 1.6 * nxt["b"][1] - 0.6 * prv["b"][1], rtol=1e-12)
    same = it.extrapolate_params(jax.tree_util.tree_map(f32, nxt), jax.tree_util.tree_map(f32, prv), 0.0)
    assert np.array_equal(np.asarray(same["w"]), np.asarray(f32(nxt["w"])))
    with pytest.raises(ValueError, match="pytree structure"):
        it.extrapolate_params(nxt, {"w": prv["w"]}, 0.5)
    with pytest.raises(ValueError, match=r"\['w'\]"):
        it.extrapolate_params(nxt, {**prv, "w": prv["w"][:2]}, 0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.0, "0.5"])
def test_apo_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        apo_call(it.apo_dpo, apo_arrays(0), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        it.extrapolate_logits(f32(np.zeros(3)), f32(np.zeros(3)), alpha)


def test_apo_shape_mismatch_raises():
    a = apo_arrays(0)
    inputs = PairwiseInputs(**{k: f32(v) for k, v in a.items() if not k.startswith("previous")})
    with pytest.raises(ValueError, match="previous_chosen"):
        it.apo_dpo(inputs, f32(a["previous_chosen"][:, :5]), f32(a["previous_rejected"]))
    with pytest.raises(ValueError, match="same shape"):
        it.extrapolate_logits(f32(np.zeros((2, 3))), f32(np.zeros((3, 2))), 0.1)


# ------------------------------------------------------------------------------------------------------------------
# TRPA

TRPA_LEVELS = np.array([
    [1, 2, 2, 4],  # 1 beats all (kappa 2.5), a tie at level 2
    [3, 3, 3, 3],  # all tie: no pair
    [2, 1, 4, 3],  # strict order, shuffled
    [1, 1, 3, 2],  # one candidate invalid (index 3): pairs only among the first three
])
TRPA_VALID = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])


def trpa_arrays(seed, K=4, T=9):
    rng = np.random.default_rng(seed)
    B = TRPA_LEVELS.shape[0]
    lengths = rng.integers(1, T - 1, size=(B, K))
    lengths[0, 0] = 1  # a one-token response
    starts = rng.integers(0, 2, size=(B, K))
    mask = span_masks(lengths, starts, T)
    ref = -rng.uniform(0.05, 3.0, (B, K, T))
    policy = ref + rng.normal(0.0, 0.4, (B, K, T))
    old = policy + rng.normal(0.0, 0.3, (B, K, T))
    old[2, 1, :] = policy[2, 1, :] + 12.0  # q past the +10 clamp
    old[0, 3, :] = policy[0, 3, :] - 11.0  # q past the -10 clamp
    return {"policy": policy, "reference": ref, "old": old, "mask": mask}


def numpy_trpa(a, levels, valid, beta=0.1, c=0.001, kappa=2.5):
    B, K, _ = a["policy"].shape
    pref, kl_sum, kl_n, n_pairs, correct, no_pair = [], 0.0, 0, 0, 0, 0
    for b in range(B):
        ell = {}
        for k in range(K):
            m = a["mask"][b, k] > 0
            ell[k] = np.sum((a["policy"][b, k] - a["reference"][b, k])[m]) / max(m.sum(), 1)
        pairs = [(i, j) for i in range(K) for j in range(K)
                 if valid[b, i] and valid[b, j] and levels[b, i] < levels[b, j]]
        if not pairs:
            no_pair += 1
            continue
        for i, j in pairs:
            h = (kappa if levels[b, i] == 1 else 1.0) * beta * (ell[i] - ell[j])
            pref.append(-logsig(h))
            correct += h > 0
        n_pairs += len(pairs)
        for k in range(K):
            if valid[b, k]:
                m = a["mask"][b, k] > 0
                q = np.clip(a["old"][b, k][m] - a["policy"][b, k][m], -10, 10)
                kl_sum += np.sum(np.exp(q) - q - 1)
                kl_n += m.sum()
    p = np.mean(pref) if pref else 0.0
    kl = kl_sum / max(kl_n, 1)
    return p + c * kl, {"trpa/preference_loss": p, "trpa/kl": kl, "trpa/pairs": n_pairs,
                        "rewards/accuracy": correct / max(n_pairs, 1), "prompts/no_pair": no_pair,
                        "prompts/used": B - no_pair}


def trpa_call(a, levels=TRPA_LEVELS, valid=TRPA_VALID, pad=np.nan, **kw):
    arr = {k: f32(garbage_pad(v, a["mask"], pad)) for k, v in a.items() if k != "mask"}
    return jitted(it.trpa)(arr["policy"], arr["reference"], arr["old"], f32(a["mask"]), jnp.asarray(levels),
                   None if valid is None else jnp.asarray(valid), **kw)


@pytest.mark.parametrize("kw", [{}, {"beta": 0.7, "kl_coef": 0.05}])
def test_trpa_matches_numpy(kw):
    a = trpa_arrays(5)
    np_kw = {"beta": kw.get("beta", 0.1), "c": kw.get("kl_coef", 0.001)}
    loss, metrics = trpa_call(a, **kw)
    ref, ref_metrics = numpy_trpa(a, TRPA_LEVELS, TRPA_VALID, **np_kw)
    assert ref_metrics["prompts/no_pair"] == 1 and ref_metrics["trpa/pairs"] == 5 + 6 + 2
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, atol=1e-7, err_msg=key)
    # invalid candidate's (garbage) data never matters
    b = {k: v.copy() for k, v in a.items()}
    b["policy"][3, 3] = 1e6
    assert float(trpa_call(b, **kw)[0]) == float(loss)


def test_trpa_kappa_weighs_pairs_won_by_a_correct_response():
    a = trpa_arrays(6)
    levels = np.array([[1, 2, 3, 4]] * 4)
    l1 = float(trpa_call(a, levels=levels, valid=None, kl_coef=0.0)[0])
    l2 = float(trpa_call(a, levels=levels, valid=None, kl_coef=0.0, kappa=1.0)[0])
    assert l1 != l2
    np.testing.assert_allclose(l1, numpy_trpa(a, levels, np.ones_like(levels), c=0.0)[0], rtol=2e-5)
    np.testing.assert_allclose(l2, numpy_trpa(a, levels, np.ones_like(levels), c=0.0, kappa=1.0)[0], rtol=2e-5)


def test_trpa_gradients_raise_better_levels_and_pull_toward_pi_old():
    a = trpa_arrays(7)
    levels = np.array([[1, 4, 2, 3]] * 4)
    a["old"] = a["policy"].copy()  # k3 gradient vanishes at q = 0: only the preference term acts

    def loss(p):
        return trpa_call({**a, "policy": p}, levels=levels, valid=None, pad=0.0)[0]

    g = np.asarray(jax.jit(jax.grad(loss))(f32(a["policy"])))
    assert np.all(np.isfinite(g)) and np.all(g[a["mask"] == 0] == 0)
    per = g.sum(-1)
    assert np.all(per[:, 0] < 0) and np.all(per[:, 1] > 0)  # level 1 raised, level 4 lowered

    b = trpa_arrays(8)  # KL term alone: d k3 / d logp_theta = -(e^q - 1), q = old - policy, 0 past the clamp

    def kl(p):
        return trpa_call({**b, "policy": p}, valid=None, pad=0.0)[1]["trpa/kl"]

    g = np.asarray(jax.jit(jax.grad(kl))(f32(b["policy"])))
    q = b["old"] - b["policy"]
    live = (b["mask"] > 0) & np.array([True, False, True, True])[:, None, None]  # prompt 1 has no pair
    assert np.all(g[~live] == 0)
    inside = live & (np.abs(q) < 10)
    assert np.all(np.sign(g[inside]) == -np.sign(q[inside]))
    assert np.any(live & (np.abs(q) > 10)) and np.all(g[live & (np.abs(q) > 10)] == 0)


def test_trpa_without_any_pair_is_zero_with_finite_zero_gradients():
    a = trpa_arrays(9)
    levels = np.full((4, 4), 2)

    def loss(p):
        return trpa_call({**a, "policy": p}, levels=levels, valid=None, pad=0.0)

    (value, metrics), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(f32(a["policy"]))
    assert float(value) == 0.0 and float(metrics["prompts/no_pair"]) == 4 and float(metrics["trpa/pairs"]) == 0
    assert np.all(np.asarray(g) == 0)
    jitted = jax.jit(lambda p, lv: it.trpa(p, f32(a["reference"]), f32(a["old"]), f32(a["mask"]), lv)[0])
    np.testing.assert_allclose(float(jitted(f32(a["policy"]), jnp.asarray(TRPA_LEVELS))),
                               float(trpa_call(a, valid=None, pad=0.0)[0]), rtol=1e-6)


def test_trpa_bad_inputs_raise():
    a = trpa_arrays(5)
    with pytest.raises(ValueError, match="levels must be in"):
        it.trpa(f32(a["policy"]), f32(a["reference"]), f32(a["old"]), f32(a["mask"]),
                np.where(TRPA_LEVELS == 4, 5, TRPA_LEVELS))
    with pytest.raises(ValueError, match="same shape"):
        it.trpa(f32(a["policy"]), f32(a["reference"]), f32(a["old"][:, :, :5]), f32(a["mask"]), TRPA_LEVELS)
    with pytest.raises(ValueError, match="levels"):
        trpa_call(a, levels=TRPA_LEVELS[:, :3], valid=None)
    with pytest.raises(ValueError, match="beta"):
        trpa_call(a, beta=0.0)


# ------------------------------------------------------------------------------------------------------------------
# BRAIn


def brain_arrays(seed, B=4, n=3, T=7):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T, size=(B, n))
    mask = span_masks(lengths, rng.integers(0, 2, size=(B, n)), T)
    out = {k: -rng.uniform(0.05, 2.0, (B, n, T)) for k in ("policy", "sft", "proposal")}
    rewards = rng.normal(size=(B, n))
    rewards[0, 1] = rewards[0, 0]  # a tie
    return out, mask, rewards


def numpy_brain(a, mask, rewards, beta):
    S = {k: np.sum(v * mask, axis=-1) for k, v in a.items()}
    alpha = softmax(S["sft"] + rewards / beta - S["proposal"])
    log_b = np.log(softmax(S["policy"] - S["proposal"]))
    return np.mean(-np.sum(alpha * log_b, axis=-1)), alpha, np.exp(log_b)


def brain_call(a, mask, rewards, pad=np.nan, **kw):
    arr = {k: f32(garbage_pad(v, mask, pad)) for k, v in a.items()}
    return jitted(it.brain)(arr["policy"], arr["sft"], arr["proposal"], jnp.asarray(mask > 0), f32(rewards), **kw)


@pytest.mark.parametrize("beta", [0.1, 1.0, 4.0])
def test_brain_matches_numpy(beta):
    a, mask, rewards = brain_arrays(10)
    loss, metrics = brain_call(a, mask, rewards, beta=beta)
    ref, alpha, _ = numpy_brain(a, mask, rewards, beta)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["brain/effective_samples"]), np.mean(1 / np.sum(alpha**2, -1)),
                               rtol=2e-5)


def test_brain_with_two_samples_and_one_hot_weights_is_dpo_with_beta_one_against_the_proposal():
    """n = 2, alpha = (1, 0): -log b_1 = -logsig((L_th(y1) - L_q(y1)) - (L_th(y2) - L_q(y2))), sigmoid DPO with
    beta = 1, reference = q, y1 chosen. Checked for a random q and for q = pi_SFT (log q cancels in alpha)."""
    a, mask, _ = brain_arrays(11, B=6, n=2, T=8)
    rewards = np.stack([np.full(6, 30.0), np.zeros(6)], axis=1)  # r/beta gap 300: alpha is one-hot in float32
    for proposal in (a["proposal"], a["sft"]):
        b = {**a, "proposal": proposal}
        loss, metrics = brain_call(b, mask, rewards, beta=0.1)
        assert float(metrics["brain/target_max"]) == 1.0
        inputs = PairwiseInputs(policy_chosen=f32(b["policy"][:, 0]), policy_rejected=f32(b["policy"][:, 1]),
                                reference_chosen=f32(proposal[:, 0]), reference_rejected=f32(proposal[:, 1]),
                                chosen_mask=f32(mask[:, 0]), rejected_mask=f32(mask[:, 1]))
        np.testing.assert_allclose(float(loss), float(sigmoid(inputs, beta=1.0)[0]), rtol=1e-6)


def test_brain_gradient_moves_the_policy_toward_the_posterior_weights():
    """d loss / d L_theta(y_i) = (b_i - alpha_i) / B: samples under-weighted by the policy are raised."""
    a, mask, rewards = brain_arrays(12)
    beta = 0.5

    def loss(p):
        return brain_call({**a, "policy": p}, mask, rewards, pad=0.0, beta=beta)[0]

    g = np.asarray(jax.jit(jax.grad(loss))(f32(a["policy"])))
    assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0)
    _, alpha, b = numpy_brain(a, mask, rewards, beta)
    expected = (b - alpha) / a["policy"].shape[0]
    # every token of y_i carries d loss / d L_theta(y_i)
    np.testing.assert_allclose(g[mask > 0], np.broadcast_to(expected[..., None], mask.shape)[mask > 0],
                               rtol=1e-4, atol=1e-6)
    assert np.all(np.sign(g.sum(-1)) == np.sign(expected))


def test_brain_bad_inputs_raise():
    a, mask, rewards = brain_arrays(10)
    with pytest.raises(ValueError, match="rewards"):
        brain_call(a, mask, rewards[:, :2])
    with pytest.raises(ValueError, match="same shape"):
        it.brain(f32(a["policy"]), f32(a["sft"][:, :2]), f32(a["proposal"]), f32(mask), f32(rewards))
    with pytest.raises(ValueError, match="beta"):
        brain_call(a, mask, rewards, beta=-1.0)


# ------------------------------------------------------------------------------------------------------------------
# DDO


def ddo_arrays(seed, N=5, M=7, Td=8, Ts=6):
    rng = np.random.default_rng(seed)
    out = {}
    for who, n, T in (("data", N, Td), ("sample", M, Ts)):
        mask = span_masks(rng.integers(1, T, size=n), rng.integers(0, 2, size=n), T)
        ref = -rng.uniform(0.05, 3.0, (n, T))
        out[f"{who}_reference"], out[f"{who}_policy"], out[f"{who}_mask"] = ref, ref + rng.normal(0, .5, (n, T)), mask
    out["sample_policy"][0] = out["sample_reference"][0]  # Delta exactly 0 (a tie with the reference)
    return out


def numpy_ddo(a, beta, alpha):
    d = {w: np.sum((a[f"{w}_policy"] - a[f"{w}_reference"]) * a[f"{w}_mask"], -1) for w in ("data", "sample")}
    return -np.mean(logsig(beta * d["data"])) - alpha * np.mean(np.log(1 - sig(beta * d["sample"])))


def ddo_call(a, pad=np.nan, **kw):
    arr = {k: f32(v if k.endswith("mask") else garbage_pad(v, a[k.split("_")[0] + "_mask"], pad)) for k, v in a.items()}
    return jitted(it.ddo)(arr["data_policy"], arr["data_reference"], arr["data_mask"], arr["sample_policy"],
                  arr["sample_reference"], arr["sample_mask"], **kw)


@pytest.mark.parametrize("beta,alpha", [(0.1, 1.0), (0.8, 0.0), (2.0, 3.0)])
def test_ddo_matches_numpy(beta, alpha):
    a = ddo_arrays(13)
    loss, metrics = ddo_call(a, beta=beta, alpha=alpha)
    np.testing.assert_allclose(float(loss), numpy_ddo(a, beta, alpha), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["ddo/sample_term"]), numpy_ddo(a, beta, 1.0) - numpy_ddo(a, beta, 0.0),
                               rtol=2e-5)


def test_ddo_gradient_raises_data_and_lowers_reference_samples():
    a = ddo_arrays(14)

    def loss(dp, sp):
        return ddo_call({**a, "data_policy": dp, "sample_policy": sp}, pad=0.0, beta=0.5, alpha=2.0)[0]

    gd, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(f32(a["data_policy"]), f32(a["sample_policy"]))
    gd, gs = np.asarray(gd), np.asarray(gs)
    assert np.all(np.isfinite(gd)) and np.all(np.isfinite(gs))
    assert np.all(gd[a["data_mask"] == 0] == 0) and np.all(gs[a["sample_mask"] == 0] == 0)
    assert np.all(gd.sum(-1) < 0) and np.all(gs.sum(-1) > 0)
    def loss_without_samples(dp, sp):
        return ddo_call({**a, "data_policy": dp, "sample_policy": sp}, pad=0.0, alpha=0.0)[0]

    _, gs0 = jax.jit(jax.grad(loss_without_samples, argnums=(0, 1)))(f32(a["data_policy"]), f32(a["sample_policy"]))
    assert np.all(np.asarray(gs0) == 0)


def test_ddo_bad_inputs_raise():
    a = ddo_arrays(13)
    arr = {k: f32(v) for k, v in a.items()}
    with pytest.raises(ValueError, match="sample_mask"):
        it.ddo(arr["data_policy"], arr["data_reference"], arr["data_mask"], arr["sample_policy"],
               arr["sample_reference"], arr["sample_mask"][:3])
    with pytest.raises(ValueError, match="alpha"):
        ddo_call(a, alpha=-1.0)


# ------------------------------------------------------------------------------------------------------------------
# Step-DPO

PREFIX = np.array([0, 3, 2, 5, 1])
STEP_W = np.array([4, 2, 5, 1, 3])
STEP_L = np.array([2, 4, 5, 3, 3])  # pair 2: same lengths (and below, equal log-probs: a tie)


def step_arrays(seed, Tw=10, Tl=9):
    rng = np.random.default_rng(seed)
    out = {}
    for side, T in (("chosen", Tw), ("rejected", Tl)):
        ref = -rng.uniform(0.05, 3.0, (5, T))
        out[f"reference_{side}"], out[f"policy_{side}"] = ref, ref + rng.normal(0, 0.5, (5, T))
    for k in ("policy", "reference"):
        out[f"{k}_rejected"][2] = out[f"{k}_chosen"][2, :9]
    return out


def test_step_mask_marks_exactly_the_step():
    m = np.asarray(it.step_mask(PREFIX, STEP_W, 10))
    np.testing.assert_array_equal(m, span_masks(STEP_W, PREFIX, 10))
    with pytest.raises(ValueError, match="prefix_length \\+ step_length"):
        it.step_mask(PREFIX, STEP_W, 6)
    with pytest.raises(ValueError, match="step_length >= 1"):
        it.step_mask(PREFIX, np.zeros(5, int), 10)


def step_call(a, **kw):
    return jitted(it.step_dpo)(*(f32(a[k]) for k in ("policy_chosen", "policy_rejected", "reference_chosen",
                                             "reference_rejected")), PREFIX, STEP_W, STEP_L, **kw)


@pytest.mark.parametrize("beta", [0.4, 0.5, 2.0])
def test_step_dpo_matches_numpy(beta):
    a = step_arrays(15)
    mw, ml = span_masks(STEP_W, PREFIX, 10), span_masks(STEP_L, PREFIX, 9)
    zw = np.sum((a["policy_chosen"] - a["reference_chosen"]) * mw, 1)
    zl = np.sum((a["policy_rejected"] - a["reference_rejected"]) * ml, 1)
    assert zw[2] == zl[2]  # the tie
    loss, metrics = step_call(a, beta=beta)
    np.testing.assert_allclose(float(loss), np.mean(dpo(zw - zl, beta)), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["rewards/accuracy"]), np.mean(zw > zl))


def test_step_dpo_ignores_tokens_outside_the_step():
    a = step_arrays(16)
    b = {k: v.copy() for k, v in a.items()}
    for side, lengths, T in (("chosen", STEP_W, 10), ("rejected", STEP_L, 9)):
        outside = span_masks(lengths, PREFIX, T) == 0
        for k in ("policy", "reference"):
            b[f"{k}_{side}"][outside] = np.nan if k == "reference" else 1e4
    assert float(step_call(a)[0]) == float(step_call(b)[0])

    def loss(pc, pr, arrays):
        return it.step_dpo(pc, pr, f32(arrays["reference_chosen"]), f32(arrays["reference_rejected"]), PREFIX,
                           STEP_W, STEP_L)[0]

    for arrays in (a, b):
        gc, gr = (np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1)))(
            f32(arrays["policy_chosen"]), f32(arrays["policy_rejected"]), arrays))
        assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))
        assert np.all(gc[span_masks(STEP_W, PREFIX, 10) == 0] == 0)
        assert np.all(gr[span_masks(STEP_L, PREFIX, 9) == 0] == 0)
        assert np.all(gc.sum(1) < 0) and np.all(gr.sum(1) > 0)  # step DPO raises the correct step


def test_step_dpo_bad_inputs_raise():
    a = step_arrays(15)
    with pytest.raises(ValueError, match="reference_chosen"):
        it.step_dpo(f32(a["policy_chosen"]), f32(a["policy_rejected"]), f32(a["reference_chosen"][:, :4]),
                    f32(a["reference_rejected"]), PREFIX, STEP_W, STEP_L)
    with pytest.raises(ValueError, match="prefix_lengths has 4 entries"):
        it.step_dpo(f32(a["policy_chosen"]), f32(a["policy_rejected"]), f32(a["reference_chosen"]),
                    f32(a["reference_rejected"]), PREFIX[:4], STEP_W[:4], STEP_L[:4])


def test_everything_jits():
    a = apo_arrays(0)
    inputs = PairwiseInputs(**{k: f32(v) for k, v in a.items() if not k.startswith("previous")})
    eager = it.apo_dpo(inputs, f32(a["previous_chosen"]), f32(a["previous_rejected"]), alpha=0.4)[0]
    jitted = jax.jit(lambda x, al: it.apo_dpo(x, f32(a["previous_chosen"]), f32(a["previous_rejected"]),
                                              alpha=al)[0])(inputs, 0.4)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    s = step_arrays(15)
    jl = jax.jit(lambda p, sw: it.step_dpo(f32(s["policy_chosen"]), f32(s["policy_rejected"]),
                                           f32(s["reference_chosen"]), f32(s["reference_rejected"]), p, sw,
                                           STEP_L)[0])(jnp.asarray(PREFIX), jnp.asarray(STEP_W))
    np.testing.assert_allclose(float(jl), float(step_call(s)[0]), rtol=1e-6)
