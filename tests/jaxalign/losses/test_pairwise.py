"""Reference-based pairwise objectives (jaxalign.losses.pairwise; docs/objectives.md, "Reference-based pairwise").

1. values against the independent float64 NumPy implementations of `reference_numpy`, written from the formulas;
2. values and reward metrics against TRL 1.16.0's own `DPOTrainer` loss code on the same per-token log-probs;
3. gradient signs (and where an objective legitimately flips them);
4. hyper-parameter validation.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import pairwise
from jaxalign.losses.dpo import sigmoid
from jaxalign.losses.registry import OBJECTIVES, PairwiseInputs
from reference_numpy import REWARD_METRICS, pairwise_loss, span_masks


NEW = [
    "cdpo", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
ALL = ["sigmoid", *NEW]
TRL_NAMES = [name for name in ALL if name != "cdpo"]  # cdpo is no TRL 1.16.0 loss_type

# Non-default hyper-parameters used alongside the defaults, so eps/tau really enter the numbers.
EXTRA = {
    "cdpo": {"label_smoothing": 0.2},
    "robust": {"label_smoothing": 0.2},
    "exo_pair": {"label_smoothing": 0.05},
    "aot": {"label_smoothing": 0.15},
    "aot_unpaired": {"label_smoothing": 0.15},
    "discopop": {"tau": 0.3},
}


# ------------------------------------------------------------------------------------------------------------------
# inputs: padding, unequal lengths, a one-token completion on each side, an exact tie (pair 4)

CHOSEN_LENGTHS = [5, 1, 7, 3, 4, 6]
REJECTED_LENGTHS = [3, 6, 7, 1, 4, 2]
WIDTH = 8


def make_arrays(seed: int, scale: float = 0.4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mc = span_masks(CHOSEN_LENGTHS, [0, 0, 1, 0, 2, 0], WIDTH)  # some completions start after a prompt-like gap
    mr = span_masks(REJECTED_LENGTHS, [0, 2, 0, 0, 2, 1], WIDTH)
    out = {}
    for side, mask in (("chosen", mc), ("rejected", mr)):
        ref = -rng.uniform(0.05, 3.0, mask.shape)
        out[f"reference_{side}"] = ref * mask
        out[f"policy_{side}"] = (ref + rng.normal(0.0, scale, mask.shape)) * mask
    for key in ("policy", "reference"):  # pair 4: rejected == chosen, so z_w == z_l exactly
        out[f"{key}_rejected"][4] = out[f"{key}_chosen"][4]
    mr[4] = mc[4]
    out["chosen_mask"], out["rejected_mask"] = mc, mr
    return out


def to_inputs(arrays: dict[str, np.ndarray]) -> PairwiseInputs:
    return PairwiseInputs(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


# ------------------------------------------------------------------------------------------------------------------
# independent float64 NumPy references: reference_numpy.pairwise_loss (docs/objectives.md)


def jax_objective(name):
    return sigmoid if name == "sigmoid" else getattr(pairwise, name)


_JITTED = {}


def jitted(name, kwargs):
    """One compiled function per objective and hyper-parameter names (values are traced), to keep the file fast."""
    key = (name, tuple(sorted(kwargs)))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda inputs, kw: jax_objective(name)(inputs, **kw))
    return lambda inputs: _JITTED[key](inputs, {k: jnp.float32(v) for k, v in kwargs.items()})


def cases():
    for name in ALL:
        for beta in (0.1, 1.0):
            yield pytest.param(name, {"beta": beta}, id=f"{name}-beta{beta}")
            if name in EXTRA:
                yield pytest.param(name, {"beta": beta, **EXTRA[name]}, id=f"{name}-beta{beta}-extra")


# ------------------------------------------------------------------------------------------------------------------
# 0. registry


def test_all_objectives_are_registered_under_their_names():
    for name in ALL:
        assert OBJECTIVES[name] is jax_objective(name)


def test_inputs_contain_the_edge_cases():
    a = make_arrays(0)
    nw, nl = a["chosen_mask"].sum(1), a["rejected_mask"].sum(1)
    assert 1 in nw and 1 in nl and np.any(nw != nl) and np.any(nw < WIDTH)
    zw = (a["policy_chosen"] - a["reference_chosen"]).sum(1)
    zl = (a["policy_rejected"] - a["reference_rejected"]).sum(1)
    assert zw[4] == zl[4] and np.sum(zw == zl) == 1


# ------------------------------------------------------------------------------------------------------------------
# 1. against the NumPy references


@pytest.mark.parametrize("name,kwargs", list(cases()))
def test_value_and_metrics_match_numpy_reference(name, kwargs):
    for seed in (0, 1):
        a = make_arrays(seed)
        loss, metrics = jitted(name, kwargs)(to_inputs(a))
        expected, expected_metrics = pairwise_loss(name, a, **kwargs)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert set(metrics) == set(expected_metrics)
        for key, value in expected_metrics.items():
            np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")


def test_reference_is_sensitive_to_what_distinguishes_objectives():
    """Guards against a vacuous comparison: the objectives give different numbers on the test inputs."""
    a = make_arrays(0)
    inputs = to_inputs(a)
    values = {n: round(float(jax_objective(n)(inputs, beta=1.0, **EXTRA.get(n, {}))[0]), 6) for n in ALL}
    assert len(set(values.values())) == len(ALL), values


# ------------------------------------------------------------------------------------------------------------------
# 2. against TRL 1.16.0's own loss code


@pytest.fixture(scope="module")
def trl_loss():
    importlib.import_module("trl")  # the test extra includes the bench extra: never skipped
    from trl_reference import trl_pairwise as fn  # noqa: PLC0415  (TRL is slow to import: once per module)

    return fn


@pytest.mark.parametrize("name,kwargs", [c for c in cases() if c.values[0] in TRL_NAMES])
def test_value_and_metrics_match_trl(trl_loss, name, kwargs):
    a = make_arrays(3)
    kwargs = dict(kwargs)
    if name == "exo_pair":
        kwargs.setdefault("label_smoothing", 1e-3)  # TRL's default 0 is rejected by TRL itself
    loss, metrics = jax_objective(name)(to_inputs(a), **kwargs)
    expected, trl_metrics = trl_loss(a, name, **kwargs)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6, err_msg=name)
    for key in REWARD_METRICS:
        np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=1e-6, atol=1e-6)


def test_combine_matches_trl_multi_loss(trl_loss):
    a = make_arrays(5)
    terms = [("sigmoid", 1.0, {"beta": 0.5}), ("sft", 0.3, {"beta": 0.5}), ("ipo", 2.0, {"beta": 0.5})]
    loss, metrics = pairwise.combine(to_inputs(a), terms)
    expected, _ = trl_loss(a, ["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.3, 2.0], beta=0.5)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# 3. gradients

# Log-ratios of a generic point: no ties, |Delta| >= 1.5, nothing past a regression target at beta = 0.1.
Z_CHOSEN = np.array([1.5, -0.7, 2.0, 0.4, -1.5, 3.0])
Z_REJECTED = np.array([-0.5, 0.8, 0.5, -1.2, 0.5, 1.2])


def point(z_chosen, z_rejected, seed=7):
    """Arrays whose summed log-ratios are exactly z_chosen / z_rejected (spread evenly over the completion)."""
    a = make_arrays(seed)
    a["rejected_mask"][4] = span_masks([REJECTED_LENGTHS[4]], [2], WIDTH)[0]
    for side, z in (("chosen", z_chosen), ("rejected", z_rejected)):
        mask = a[f"{side}_mask"]
        a[f"policy_{side}"] = (a[f"reference_{side}"] + np.asarray(z)[:, None] / mask.sum(1, keepdims=True)) * mask
    return a


def grads(name, a, **kwargs):
    inputs = to_inputs(a)

    def loss(pc, pr):
        return jax_objective(name)(inputs.replace(policy_chosen=pc, policy_rejected=pr), **kwargs)[0]

    gc, gr = jax.grad(loss, argnums=(0, 1))(inputs.policy_chosen, inputs.policy_rejected)
    gc, gr = np.asarray(gc), np.asarray(gr)
    assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr)), name
    assert np.all(gc[a["chosen_mask"] == 0] == 0) and np.all(gr[a["rejected_mask"] == 0] == 0), "padding got gradient"
    return gc.sum(1), gr.sum(1)


# discopop at beta 1 so that |b Delta| >= 1.5 is outside its non-monotone region (tested separately below).
GRAD_KWARGS = {name: {} for name in ALL} | {k: v for k, v in EXTRA.items() if k != "discopop"}
GRAD_KWARGS["discopop"] = {"beta": 1.0}


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("apo_down", "sft")])
def test_gradient_raises_chosen_and_lowers_rejected(name):
    a = point(Z_CHOSEN, Z_REJECTED)
    np.testing.assert_allclose((a["policy_chosen"] - a["reference_chosen"]).sum(1), Z_CHOSEN, atol=1e-12)
    gc, gr = grads(name, a, **GRAD_KWARGS[name])
    assert np.all(gc < 0), (name, gc)
    assert np.all(gr > 0), (name, gr)


def test_sft_gradient_is_minus_one_over_chosen_token_count_and_ignores_rejected():
    a = point(Z_CHOSEN, Z_REJECTED)
    gc, gr = grads("sft", a)
    np.testing.assert_allclose(gc, -a["chosen_mask"].sum(1) / a["chosen_mask"].sum(), rtol=1e-6)
    assert np.all(gr == 0)


def test_apo_down_pushes_chosen_down_when_its_log_ratio_is_smaller_than_the_margin():
    """APO-down (eq. 8) lowers the chosen likelihood near the reference: d/dz_w = b[sig'(b z_w) - sig'(b Delta)]."""
    a = point(Z_CHOSEN, Z_REJECTED)
    gc, gr = grads("apo_down", a)
    expected_sign = np.sign(np.abs(Z_CHOSEN - Z_REJECTED) - np.abs(Z_CHOSEN))
    assert set(expected_sign) == {-1.0, 1.0}  # the point exercises both regimes
    np.testing.assert_array_equal(np.sign(gc), expected_sign)
    assert np.all(gr > 0)


def test_objectives_with_targets_flip_the_chosen_gradient_past_them():
    """nca_pair: chosen gradient b(1.5 sig(b z_w) - 1) > 0 once sig(b z_w) > 2/3; sppo_hard regresses z_w to 1/(2b)."""
    far = point(Z_CHOSEN + 8.0, Z_REJECTED - 8.0)  # z_w > 5 = 1/(2b), z_l < -5 at beta 0.1
    gc, gr = grads("sppo_hard", far)
    assert np.all(gc > 0) and np.all(gr < 0)
    gc, gr = grads("nca_pair", far, beta=1.0)  # sig(b z_w) >= sig(7.3) > 2/3
    assert np.all(gc > 0) and np.all(gr > 0)


def test_discopop_is_non_monotone_near_a_zero_margin():
    """DiscoPOP's modulation term dominates at |b Delta| << tau-scale: at Delta = 0 the gradient lowers the margin."""
    z = np.array([0.3, -0.2, 1.0, 0.0, 0.5, -1.0])
    gc, gr = grads("discopop", point(z, z), beta=1.0)
    assert np.all(gc > 0) and np.all(gr < 0)


# ------------------------------------------------------------------------------------------------------------------
# 4. hyper-parameter validation

BAD = [
    *[(name, {"beta": beta}, "beta", repr(beta)) for name in ALL for beta in (0.0, -0.5)],
    ("robust", {"label_smoothing": 0.5}, "label_smoothing", "0.5"),
    ("robust", {"label_smoothing": -0.1}, "label_smoothing", "-0.1"),
    ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing", "0.0"),
    ("exo_pair", {"label_smoothing": 1.0}, "label_smoothing", "1.0"),
    ("cdpo", {"label_smoothing": 0.7}, "label_smoothing", "0.7"),
    ("aot", {"label_smoothing": 1.2}, "label_smoothing", "1.2"),
    ("aot_unpaired", {"label_smoothing": -1.0}, "label_smoothing", "-1.0"),
    ("discopop", {"tau": 0.0}, "tau", "0.0"),
    ("sigmoid", {"label_smoothing": 0.6}, "label_smoothing", "0.6"),
    ("ipo", {"beta": "0.1"}, "beta", "'0.1'"),
    ("hinge", {"beta": np.float32(-1.0)}, "beta", "-1.0"),
    ("exo_pair", {"label_smoothing": jnp.float32(0.0)}, "label_smoothing", "Array(0."),
]


@pytest.mark.parametrize("name,kwargs,param,value", BAD, ids=[f"{b[0]}-{b[2]}={b[3]}" for b in BAD])
def test_bad_hyper_parameters_raise_a_clear_error(name, kwargs, param, value):
    with pytest.raises(ValueError) as err:
        jax_objective(name)(to_inputs(make_arrays(0)), **kwargs)
    message = str(err.value)
    assert param in message and value in message, message
    if (name, param) != ("sigmoid", "beta"):  # dpo.check_beta names "dpo.beta"
        assert f"{name}.{param}" in message, message


def test_sigmoid_with_label_smoothing_is_cdpo():
    """jaxalign's sigmoid keeps its label_smoothing (cDPO) form; TRL 1.16.0's sigmoid ignores label_smoothing."""
    inputs = to_inputs(make_arrays(0))
    np.testing.assert_allclose(
        float(sigmoid(inputs, beta=1.0, label_smoothing=0.2)[0]),
        pairwise_loss("cdpo", make_arrays(0), beta=1.0, label_smoothing=0.2)[0],
        rtol=1e-5,
    )


def test_traced_hyper_parameters_pass_validation_under_jit():
    inputs = to_inputs(make_arrays(0))
    loss = jax.jit(lambda b, e: pairwise.robust(inputs, beta=b, label_smoothing=e)[0])(0.1, 0.2)
    expected = pairwise_loss("robust", make_arrays(0), beta=0.1, label_smoothing=0.2)[0]
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# combine


def test_combine_is_the_weighted_sum_with_namespaced_metrics():
    a = make_arrays(2)
    inputs = to_inputs(a)
    terms = [("sigmoid", 1.0, {}), ("sft", 0.5, {}), ("sigmoid", 0.25, {"beta": 1.0})]
    loss, metrics = pairwise.combine(inputs, terms)
    expected = (pairwise_loss("sigmoid", a)[0] + 0.5 * pairwise_loss("sft", a)[0]
                + 0.25 * pairwise_loss("sigmoid", a, beta=1.0)[0])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sft/loss"]), pairwise_loss("sft", a)[0], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sigmoid#2/loss"]), pairwise_loss("sigmoid", a, beta=1.0)[0], rtol=1e-5)
    margin = pairwise_loss("sigmoid", a, beta=1.0)[1]["rewards/margin"]
    np.testing.assert_allclose(float(metrics["sigmoid#2/rewards/margin"]), margin, rtol=1e-5)
    assert "sigmoid/rewards/accuracy" in metrics


@pytest.mark.parametrize(
    "terms,match",
    [([], "at least one"), ([("sigmoid", 1.0)], "term 0"), ([("nope", 1.0, {})], "unknown objective 'nope'"),
     ([("sigmoid", float("nan"), {})], "weight"),
     ([("robust", 1.0, {"label_smoothing": 0.6})], "robust.label_smoothing")],
)  # fmt: skip
def test_combine_rejects_bad_terms(terms, match):
    with pytest.raises(ValueError, match=match):
        pairwise.combine(to_inputs(make_arrays(0)), terms)
