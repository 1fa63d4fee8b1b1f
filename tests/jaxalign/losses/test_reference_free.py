"""Reference-free objectives (SimPO, CPO, AlphaPO, ORPO, ASFT) against float64 NumPy formulas, TRL 1.16.0, and
gradient / stability / validation properties."""
from __future__ import annotations

import importlib

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import PairwiseInputs, compute_objective, get_objective
from jaxalign.losses import reference_free  # noqa: F401  (registers the objectives)
from reference_numpy import logsig as np_logsig

NAMES = ["simpo", "cpo", "alphapo", "orpo", "asft"]
CLAMP = -1e-12  # documented Lbar clamp for ORPO / ASFT


# ----------------------------------------------------------------------------------------------- test data
def make_batch(seed: int = 0, pairs: int = 7, time: int = 9):
    """Random float64 log-probs with left 'prompt' masking, right padding, unequal lengths, one-token completions,
    and a tied pair (identical chosen and rejected). Zero outside the masks."""
    rng = np.random.default_rng(seed)
    logp = {}
    masks = {}
    for side in ("chosen", "rejected"):
        mask = np.zeros((pairs, time))
        for i in range(pairs):
            start = rng.integers(0, 3)
            length = rng.integers(1, time - start + 1)
            mask[i, start : start + length] = 1.0
        mask[0, :] = 0.0
        mask[0, 4] = 1.0  # one-token completion
        logp[side] = -rng.uniform(0.01, 3.0, size=(pairs, time)) * mask
        masks[side] = mask
    # a tie: pair 1 has identical chosen and rejected
    masks["rejected"][1] = masks["chosen"][1]
    logp["rejected"][1] = logp["chosen"][1]
    # unequal lengths for sure: pair 2 chosen long, rejected one token
    masks["chosen"][2] = 1.0
    masks["rejected"][2] = 0.0
    masks["rejected"][2, -1] = 1.0
    logp["chosen"][2] = -rng.uniform(0.01, 3.0, size=time)
    logp["rejected"][2] = -rng.uniform(0.01, 3.0, size=time) * masks["rejected"][2]
    return logp["chosen"], logp["rejected"], masks["chosen"], masks["rejected"]


def to_inputs(lw, ll, mw, ml, dtype=jnp.float32) -> PairwiseInputs:
    arr = lambda x: jnp.asarray(x, dtype=dtype)  # noqa: E731
    # reference fields get garbage: reference-free objectives must ignore them
    return PairwiseInputs(
        policy_chosen=arr(lw), policy_rejected=arr(ll),
        reference_chosen=arr(lw * 3.0 - 1.0), reference_rejected=arr(ll * 0.5 + 2.0),
        chosen_mask=arr(mw), rejected_mask=arr(ml),
    )


# ----------------------------------------------------------------------------------- float64 NumPy reference
def np_avg(lp, m):
    n = m.sum(-1)
    return np.where(n > 0, (lp * m).sum(-1) / np.where(n > 0, n, 1.0), 0.0)


def np_nll(lp, m):
    n = m.sum()
    return -(lp * m).sum() / n if n > 0 else 0.0


def np_logit_p(avg):
    x = np.minimum(avg, CLAMP)
    p = np.exp(x)
    return np.log(p) - np.log(-np.expm1(x))  # log p - log(1 - p)


def np_alphapo_r(avg, a):
    p = np.exp(avg)
    return (1.0 - p ** (-a)) / a


def reference(name, lw, ll, mw, ml, **hp):
    """(loss, rewards_w, rewards_l) from the formulas of docs/objectives.md ("Reference-free objectives"), float64."""
    aw, al = np_avg(lw, mw), np_avg(ll, ml)
    if name == "simpo":
        beta, ratio, eps = hp.get("beta", 2.0), hp.get("gamma_beta_ratio", 0.5), hp.get("label_smoothing", 0.0)
        x = beta * (aw - al) - ratio * beta
        return np.mean(-(1 - eps) * np_logsig(x) - eps * np_logsig(-x)), beta * aw, beta * al
    if name == "cpo":
        beta, alpha, eps = hp.get("beta", 0.1), hp.get("alpha", 1.0), hp.get("label_smoothing", 0.0)
        sw, sl = (lw * mw).sum(-1), (ll * ml).sum(-1)
        x = beta * (sw - sl)
        pref = np.mean(-(1 - eps) * np_logsig(x) - eps * np_logsig(-x))
        return pref + alpha * np_nll(lw, mw), beta * sw, beta * sl
    if name == "alphapo":
        beta, ratio, a = hp.get("beta", 2.0), hp.get("gamma_beta_ratio", 0.5), hp.get("alpha", 0.25)
        rw, rl = np_alphapo_r(aw, a), np_alphapo_r(al, a)
        return np.mean(-np_logsig(beta * (rw - rl) - ratio * beta)), beta * rw, beta * rl
    if name == "orpo":
        beta = hp.get("beta", 0.1)
        log_odds = np_logit_p(aw) - np_logit_p(al)
        return np_nll(lw, mw) - beta * np.mean(np_logsig(log_odds)), beta * aw, beta * al
    if name == "asft":
        beta, lam = hp.get("beta", 0.1), hp.get("lam", 1.0)
        zw, zl = np_logit_p(aw), np_logit_p(al)
        per = -aw + lam * (-np_logsig(beta * zw) - np_logsig(-beta * zw * 0 - beta * zl))
        return np.mean(per), beta * zw, beta * zl
    raise KeyError(name)


HPARAMS = {
    "simpo": [{}, {"beta": 2.5, "gamma_beta_ratio": 0.3, "label_smoothing": 0.1}],
    "cpo": [{}, {"beta": 0.5, "alpha": 0.3, "label_smoothing": 0.2}, {"alpha": 0.0}],
    "alphapo": [{}, {"alpha": -0.4, "beta": 1.5}, {"alpha": 1.0, "gamma_beta_ratio": 0.0}],
    "orpo": [{}, {"beta": 0.7}],
    "asft": [{}, {"beta": 0.5, "lam": 0.3}],
}
CASES = [(n, hp) for n in NAMES for hp in HPARAMS[n]]


# ----------------------------------------------------------------------------------------------- value tests
@pytest.mark.parametrize("name,hp", CASES)
def test_matches_float64_numpy(name, hp):
    for seed in range(2):
        lw, ll, mw, ml = make_batch(seed)
        loss, metrics = compute_objective(name, to_inputs(lw, ll, mw, ml), **hp)
        ref_loss, rw, rl = reference(name, lw, ll, mw, ml, **hp)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(metrics["rewards/chosen"]), rw.mean(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(metrics["rewards/rejected"]), rl.mean(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(metrics["rewards/margin"]), (rw - rl).mean(), rtol=1e-5, atol=1e-5)
        # pair 1 is a tie, which counts as not accurate
        np.testing.assert_allclose(float(metrics["rewards/accuracy"]), np.mean(rw > rl), atol=1e-7)
        assert float(metrics["rewards/accuracy"]) < 1.0 or np.all(rw > rl)


def test_reference_fields_ignored_and_padding_ignored():
    lw, ll, mw, ml = make_batch(5)
    base = to_inputs(lw, ll, mw, ml)
    noisy = base.replace(
        reference_chosen=base.reference_chosen + 7.0,
        reference_rejected=base.reference_rejected - 3.0,
    )
    for name in NAMES:
        a, _ = compute_objective(name, base)
        b, _ = compute_objective(name, noisy)
        assert float(a) == float(b), name


def test_extra_metrics():
    lw, ll, mw, ml = make_batch(1)
    inputs = to_inputs(lw, ll, mw, ml)
    aw, al = np_avg(lw, mw), np_avg(ll, ml)
    _, m = compute_objective("cpo", inputs)
    np.testing.assert_allclose(float(m["nll"]), np_nll(lw, mw), rtol=1e-6)
    _, m = compute_objective("orpo", inputs)
    log_odds = np_logit_p(aw) - np_logit_p(al)
    np.testing.assert_allclose(float(m["nll"]), np_nll(lw, mw), rtol=1e-6)
    np.testing.assert_allclose(float(m["log_odds_chosen"]), log_odds.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["log_odds_ratio"]), np_logsig(log_odds).mean(), rtol=1e-5, atol=1e-6)
    _, m = compute_objective("asft", inputs)
    np.testing.assert_allclose(float(m["nll"]), -aw.mean(), rtol=1e-6)


def test_empty_completions_finite():
    """Lbar := 0 for an empty completion: finite loss equal to the float64 formula, finite zero gradients."""
    for name in NAMES:
        _check_empty(name)


def _check_empty(name):
    lw, ll, mw, ml = make_batch(2)
    mw[3] = 0.0
    lw[3] = 0.0
    ml[4] = 0.0
    ll[4] = 0.0
    mw[5] = ml[5] = 0.0
    lw[5] = ll[5] = 0.0
    inputs = to_inputs(lw, ll, mw, ml)
    loss, metrics = compute_objective(name, inputs)
    ref_loss, _, _ = reference(name, lw, ll, mw, ml)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    grads = jax.grad(lambda x: compute_objective(name, x)[0])(inputs)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    # empty completions and padding receive no gradient
    assert np.all(np.asarray(grads.policy_chosen)[mw == 0] == 0)
    assert np.all(np.asarray(grads.policy_rejected)[ml == 0] == 0)


def test_all_empty_batch_finite():
    z = np.zeros((7, 9))
    for name in NAMES:
        loss, _ = compute_objective(name, to_inputs(z, z, z, z))
        assert np.isfinite(float(loss)), name


# -------------------------------------------------------------------------------------------- gradient tests
@pytest.mark.parametrize("name,hp", CASES)
def test_gradient_signs(name, hp):
    """Raising a chosen token's log-prob lowers every loss here, raising a rejected one raises it (the NLL terms
    only involve chosen tokens, so they do not change the signs)."""
    lw, ll, mw, ml = make_batch(3)
    inputs = to_inputs(lw, ll, mw, ml)
    grads = jax.grad(lambda x: compute_objective(name, x, **hp)[0])(inputs)
    gw, gl = np.asarray(grads.policy_chosen), np.asarray(grads.policy_rejected)
    assert np.all(np.isfinite(gw)) and np.all(np.isfinite(gl))
    assert np.all(gw[mw == 0] == 0) and np.all(gl[ml == 0] == 0)
    assert np.all(gw[mw == 1] < 0), (name, gw)
    assert np.all(gl[ml == 1] > 0), (name, gl)
    # reference log-probs get no gradient at all
    assert not np.any(np.asarray(grads.reference_chosen)) and not np.any(np.asarray(grads.reference_rejected))
    # and the loss actually moves that way under a small step
    step = 1e-2
    base = float(compute_objective(name, inputs, **hp)[0])
    up_w = float(compute_objective(name, inputs.replace(policy_chosen=inputs.policy_chosen + step * mw), **hp)[0])
    up_l = float(compute_objective(name, inputs.replace(policy_rejected=inputs.policy_rejected + step * ml), **hp)[0])
    assert up_w < base < up_l


# ----------------------------------------------------------------------------------------- AlphaPO -> SimPO
def test_alphapo_tends_to_simpo():
    lw, ll, mw, ml = make_batch(4)
    inputs = to_inputs(lw, ll, mw, ml, dtype=jnp.float32)
    simpo, _ = compute_objective("simpo", inputs, beta=2.0, gamma_beta_ratio=0.5)
    grad_simpo = jax.grad(lambda x: compute_objective("simpo", x)[0])(inputs).policy_chosen
    for a in (0.0, 1e-9, -1e-9, 5e-7, -5e-7, 2e-6, -2e-6, 1e-4):
        loss, _ = compute_objective("alphapo", inputs, alpha=a)
        np.testing.assert_allclose(float(loss), float(simpo), rtol=0, atol=1e-6 + 5 * abs(a))
        g = jax.grad(lambda x: compute_objective("alphapo", x, alpha=a)[0])(inputs).policy_chosen
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(grad_simpo), rtol=0, atol=1e-6 + 5 * abs(a))
    # continuity across the series/exact switch at |alpha| = 1e-6, against the exact float64 formula
    for a in (0.999e-6, 1.001e-6, -1.001e-6, 1e-3):
        loss, _ = compute_objective("alphapo", inputs, alpha=a)
        ref, _, _ = reference("alphapo", lw, ll, mw, ml, alpha=a)
        np.testing.assert_allclose(float(loss), ref, rtol=2e-6)
    # a genuinely nonzero alpha differs from SimPO (the test could fail)
    loss, _ = compute_objective("alphapo", inputs, alpha=0.5)
    assert abs(float(loss) - float(simpo)) > 1e-3


def test_alphapo_large_exponent_finite():
    lw, ll, mw, ml = make_batch(0)
    inputs = to_inputs(lw * 60.0, ll * 60.0, mw, ml)
    loss, _ = compute_objective("alphapo", inputs, alpha=2.0)
    assert np.isfinite(float(loss))
    grads = jax.grad(lambda x: compute_objective("alphapo", x, alpha=2.0)[0])(inputs)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


# ---------------------------------------------------------------------------------------- ORPO / log1mexp
def test_log1mexp_accuracy():
    # shape (7, 9) like make_batch, so the eager ops compiled by the other tests are reused
    x64 = (-np.logspace(-9, np.log10(80.0), 63)).reshape(7, 9).astype(np.float32).astype(np.float64)
    got = np.asarray(reference_free.log1mexp(jnp.asarray(x64, dtype=jnp.float32)))
    want = np.log(-np.expm1(x64))  # loses relative accuracy itself below about -30, hence the atol
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-15)
    g = np.asarray(jax.grad(lambda x: jnp.sum(reference_free.log1mexp(x)))(jnp.asarray(x64, dtype=jnp.float32)))
    np.testing.assert_allclose(g, -1.0 / np.expm1(-x64), rtol=1e-4)  # d/dx log(1-e^x) = -e^x/(1-e^x)
    assert np.isfinite(float(reference_free.log1mexp(jnp.float32(0.0))))


EXTREMES = [(-1e-7, -2.0), (-50.0, -1e-7), (-1e-7, -1e-7), (-50.0, -50.0), (0.0, -1.0), (-3e-8, -60.0),
            (-1e-7, -50.0)]


@pytest.mark.parametrize("name", ["orpo", "asft"])
def test_odds_objectives_stable_extremes(name):
    """Average log-probs near 0 (p -> 1, log(1-p) -> -inf) and very negative: values match float64, grads finite.
    Shape (7, 9) like make_batch so eager ops are reused; one pair per (Lbar_w, Lbar_l) and the last chosen token
    of odd pairs padded."""
    pairs, time = len(EXTREMES), 9
    mw = np.ones((pairs, time))
    ml = np.ones((pairs, time))
    mw[1::2, -1] = 0.0
    lw = np.array([w for w, _ in EXTREMES])[:, None] * mw
    ll = np.array([l for _, l in EXTREMES])[:, None] * ml
    inputs = to_inputs(lw, ll, mw, ml)
    for i in range(pairs):  # each pair alone, so one bad pair cannot hide in a batch mean
        one = jax.tree_util.tree_map(lambda x: x[i : i + 1], inputs)
        loss, metrics = compute_objective(name, one)
        ref, _, _ = reference(name, lw[i : i + 1], ll[i : i + 1], mw[i : i + 1], ml[i : i + 1])
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-6, err_msg=str(EXTREMES[i]))
        assert all(np.isfinite(float(v)) for v in metrics.values())
    grads = jax.grad(lambda x: compute_objective(name, x)[0])(inputs)
    for g in (grads.policy_chosen, grads.policy_rejected):
        assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------------------------- validation
BAD = [
    ("simpo", "beta", 0.0), ("simpo", "beta", -1.0), ("simpo", "gamma_beta_ratio", -0.5),
    ("simpo", "label_smoothing", 0.5), ("simpo", "beta", float("nan")),
    ("cpo", "beta", -0.1), ("cpo", "alpha", -1.0), ("cpo", "label_smoothing", -0.1),
    ("alphapo", "beta", 0.0), ("alphapo", "alpha", float("inf")), ("alphapo", "gamma_beta_ratio", -1.0),
    ("orpo", "beta", 0.0), ("orpo", "beta", -2.0),
    ("asft", "beta", -0.1), ("asft", "lam", -1.0), ("asft", "beta", True),
]


@pytest.mark.parametrize("name,param,value", BAD)
def test_bad_hyperparameters_raise(name, param, value):
    lw, ll, mw, ml = make_batch(0)
    with pytest.raises(ValueError, match=rf"{name}\.{param} must be .*got {value!r}"):
        compute_objective(name, to_inputs(lw, ll, mw, ml), **{param: value})


def test_registered_and_jittable():
    lw, ll, mw, ml = make_batch(0)
    inputs = to_inputs(lw, ll, mw, ml)
    for name in NAMES:
        fn = get_objective(name)
        eager, _ = fn(inputs)
        jitted, _ = jax.jit(fn)(inputs)
        np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


# ------------------------------------------------------------------------------------------------- TRL 1.16
def _trl():
    torch = importlib.import_module("torch")  # the test extra includes the bench extra: never skipped
    importlib.import_module("trl")  # the test extra includes the bench extra: never skipped
    import os
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    return torch, CPOTrainer, ORPOTrainer


def _fake_trainer(cls, **attrs):
    """A stand-in `self` holding only what TRL's loss code reads; the methods are TRL's own."""
    defaults = dict(
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        is_encoder_decoder=False, pad_token_id=0, padding_value=0, aux_loss_enabled=False,
        label_smoothing=0.0, alpha=0.0,
    )
    ns = types.SimpleNamespace(**(defaults | attrs))
    ns.concatenated_inputs = cls.concatenated_inputs
    ns.get_batch_logps = cls.get_batch_logps
    ns.concatenated_forward = types.MethodType(cls.concatenated_forward, ns)
    for method in ("cpo_loss", "odds_ratio_loss"):
        if hasattr(cls, method):
            setattr(ns, method, types.MethodType(getattr(cls, method), ns))
    return ns


def _fake_model_batch(torch, lw, ll, mw, ml):
    """A batch of one 'prompt' token + completion, and a model whose 2-way logits [lp, log(1-e^lp)] make the label
    token (id 0) have log-prob exactly lp: TRL's own forward then sees our per-token log-probs."""
    def side(lp, m):
        pairs, time = lp.shape
        attention = np.concatenate([np.ones((pairs, 1)), m], axis=1)
        labels = np.where(attention[:, :] > 0, 0, -100)
        labels[:, 0] = -100
        x = np.minimum(lp, -1e-12)
        logits = np.zeros((pairs, time + 1, 2))
        logits[:, :-1, 0] = np.where(m > 0, x, 0.0)
        logits[:, :-1, 1] = np.where(m > 0, np.log(-np.expm1(x)), 0.0)
        return attention, labels, logits

    aw, lab_w, log_w = side(lw, mw)
    al, lab_l, log_l = side(ll, ml)
    batch = {
        "chosen_input_ids": torch.zeros(lw.shape[0], lw.shape[1] + 1, dtype=torch.long),
        "chosen_attention_mask": torch.tensor(aw, dtype=torch.long),
        "chosen_labels": torch.tensor(lab_w, dtype=torch.long),
        "rejected_input_ids": torch.zeros(ll.shape[0], ll.shape[1] + 1, dtype=torch.long),
        "rejected_attention_mask": torch.tensor(al, dtype=torch.long),
        "rejected_labels": torch.tensor(lab_l, dtype=torch.long),
    }
    all_logits = torch.tensor(np.concatenate([log_w, log_l]), dtype=torch.float32)

    def model(input_ids, attention_mask=None, use_cache=False, **kwargs):
        assert input_ids.shape[0] == all_logits.shape[0]
        return types.SimpleNamespace(logits=all_logits)

    return model, batch


def _nonempty_batch(seed):
    lw, ll, mw, ml = make_batch(seed)
    assert (mw.sum(-1) > 0).all() and (ml.sum(-1) > 0).all()  # TRL divides by |y| without a guard
    return lw, ll, mw, ml


@pytest.mark.parametrize("hp", [{}, {"beta": 2.5, "gamma_beta_ratio": 0.3, "label_smoothing": 0.1}])
def test_simpo_matches_trl(hp):
    torch, CPOTrainer, _ = _trl()
    lw, ll, mw, ml = _nonempty_batch(6)
    beta, ratio = hp.get("beta", 2.0), hp.get("gamma_beta_ratio", 0.5)
    trl = _fake_trainer(CPOTrainer, loss_type="simpo", beta=beta, simpo_gamma=ratio * beta, cpo_alpha=0.0,
                        label_smoothing=hp.get("label_smoothing", 0.0))
    model, batch = _fake_model_batch(torch, lw, ll, mw, ml)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(trl, model, batch)
    loss, metrics = compute_objective("simpo", to_inputs(lw, ll, mw, ml), **hp)
    np.testing.assert_allclose(float(loss), float(trl_loss), rtol=1e-6, atol=1e-6)
    for ours, theirs in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")]:
        np.testing.assert_allclose(float(metrics[ours]), trl_metrics[theirs], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hp", [{}, {"beta": 0.5, "alpha": 0.3, "label_smoothing": 0.2}])
def test_cpo_matches_trl(hp):
    torch, CPOTrainer, _ = _trl()
    lw, ll, mw, ml = _nonempty_batch(7)
    trl = _fake_trainer(CPOTrainer, loss_type="sigmoid", beta=hp.get("beta", 0.1), cpo_alpha=hp.get("alpha", 1.0),
                        label_smoothing=hp.get("label_smoothing", 0.0))
    model, batch = _fake_model_batch(torch, lw, ll, mw, ml)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(trl, model, batch)
    loss, metrics = compute_objective("cpo", to_inputs(lw, ll, mw, ml), **hp)
    np.testing.assert_allclose(float(loss), float(trl_loss), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(metrics["nll"]), trl_metrics["nll_loss"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/margin"]), trl_metrics["rewards/margins"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/accuracy"]), trl_metrics["rewards/accuracies"])


@pytest.mark.parametrize("alpha", [0.25, -0.4, 1.0])
def test_alphapo_matches_trl(alpha):
    torch, CPOTrainer, _ = _trl()
    lw, ll, mw, ml = _nonempty_batch(8)
    # CPOConfig(loss_type="alphapo") is sugar for loss_type="simpo", cpo_alpha=0, with `alpha` set
    trl = _fake_trainer(CPOTrainer, loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)
    trl.alpha = alpha
    model, batch = _fake_model_batch(torch, lw, ll, mw, ml)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(trl, model, batch)
    loss, metrics = compute_objective("alphapo", to_inputs(lw, ll, mw, ml), alpha=alpha)
    np.testing.assert_allclose(float(loss), float(trl_loss), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), trl_metrics["rewards/chosen"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/margin"]), trl_metrics["rewards/margins"], rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_orpo_matches_trl(beta):
    torch, _, ORPOTrainer = _trl()
    lw, ll, mw, ml = _nonempty_batch(9)
    trl = _fake_trainer(ORPOTrainer, beta=beta)
    model, batch = _fake_model_batch(torch, lw, ll, mw, ml)
    trl_loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(trl, model, batch)
    loss, metrics = compute_objective("orpo", to_inputs(lw, ll, mw, ml), beta=beta)
    np.testing.assert_allclose(float(loss), float(trl_loss), rtol=1e-6, atol=1e-6)
    for key in ("nll", "log_odds_ratio", "log_odds_chosen"):
        theirs = trl_metrics["nll_loss" if key == "nll" else key]
        np.testing.assert_allclose(float(metrics[key]), theirs, rtol=1e-5, atol=1e-6)
    # TRL's loss on extreme average log-probs directly (its own log1mexp)
    for w, l in [(-1e-7, -2.0), (-50.0, -1e-7), (-3.0, -50.0)]:
        losses, *_ = ORPOTrainer.odds_ratio_loss(trl, torch.tensor([w]), torch.tensor([l]))
        x = to_inputs(np.array([[w]]), np.array([[l]]), np.ones((1, 1)), np.ones((1, 1)))
        _, m = compute_objective("orpo", x, beta=beta)
        np.testing.assert_allclose(beta * float(m["log_odds_ratio"]), float(losses.mean()), rtol=1e-5, atol=1e-7)
