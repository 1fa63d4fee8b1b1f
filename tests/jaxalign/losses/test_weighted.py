"""Weighted / regularised pairwise objectives (jaxalign.losses.weighted; docs/objectives.md, "Weighted ...").

1. values and metrics against float64 NumPy implementations written here from the formulas (padding, unequal
   lengths, one-token completions, an exact tie), on the shared DPO reference of `reference_numpy`;
2. the reductions each paper states (alpha = 0, guide = reference, equal betas, ... give DPO exactly), SmPO's flat
   loss at 2 alpha = gamma;
3. gradient signs, and no gradient through the extras;
4. bad hyper-parameters, missing / mis-shaped / out-of-range extras -> one ValueError naming objective and field.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import weighted
from jaxalign.losses.dpo import sigmoid
from jaxalign.losses.registry import SPECS, PairwiseInputs
from reference_numpy import (
    assert_names_field,
    assert_names_parameter,
    dpo,
    implicit_reward_metrics,
    logsig,
    sig,
    span_masks,
)

NAMES = ["madpo", "sem_dpo", "smpo", "sft_dpo", "flex_dpo", "tgdpo"]
CHOSEN_LENGTHS = [5, 1, 7, 3, 4, 6]
REJECTED_LENGTHS = [3, 6, 7, 1, 4, 2]
CHOSEN_START = [0, 0, 1, 0, 2, 0]
REJECTED_START = [0, 2, 0, 0, 2, 1]
WIDTH = 8
TIE = 4  # pair 4: rejected == chosen, so z_w == z_l exactly


def make_arrays(seed: int, scale: float = 0.4) -> dict:
    rng = np.random.default_rng(seed)
    mc, mr = span_masks(CHOSEN_LENGTHS, CHOSEN_START, WIDTH), span_masks(REJECTED_LENGTHS, REJECTED_START, WIDTH)
    a = {}
    for side, m in (("chosen", mc), ("rejected", mr)):
        ref = -rng.uniform(0.05, 3.0, m.shape)
        a[f"reference_{side}"] = ref * m
        a[f"policy_{side}"] = (ref + rng.normal(0.0, scale, m.shape)) * m
        a[f"guidance_{side}"] = (ref + rng.normal(0.0, 1.0, m.shape)) * m
    for key in ("policy", "reference", "guidance"):
        a[f"{key}_rejected"][TIE] = a[f"{key}_chosen"][TIE]
    mr[TIE] = mc[TIE]
    a["chosen_mask"], a["rejected_mask"] = mc, mr
    a["reward_margin"] = np.array([0.0, 2.5, -1.0, 0.3, 0.0, 6.0])
    a["semantic_distance"] = np.array([0.0, 0.4, 1.2, 2.0, 0.1, 0.7])
    a["preference_probability"] = np.array([1.0, 0.5, 0.0, 0.8, 0.6, 0.3])
    return a


EXTRA_KEYS = ("reward_margin", "semantic_distance", "preference_probability", "guidance_chosen", "guidance_rejected")


def to_inputs(a: dict, extras=EXTRA_KEYS) -> PairwiseInputs:
    fields = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected",
              "chosen_mask", "rejected_mask")
    return PairwiseInputs(**{k: jnp.asarray(a[k], jnp.float32) for k in fields},
                          extras={k: jnp.asarray(a[k], jnp.float32) for k in extras})


def numpy_loss(name: str, a: dict, **kw):
    mc, mr = a["chosen_mask"], a["rejected_mask"]
    rho_w = (a["policy_chosen"] - a["reference_chosen"]) * mc
    rho_l = (a["policy_rejected"] - a["reference_rejected"]) * mr
    zw, zl = rho_w.sum(1), rho_l.sum(1)
    b = kw.get("beta", 0.1)
    extra = {}
    if name == "madpo":
        w = 2.0 * sig(-a["reward_margin"] / kw.get("temperature", 1.0))
        per = w * dpo(zw - zl, b)
        extra = {"weight/mean": w.mean(), "weight/min": w.min(), "weight/max": w.max()}
    elif name == "sem_dpo":
        w = np.exp(-kw.get("alpha", 1.0) * a["semantic_distance"])
        per = w * dpo(zw - zl, b)
        extra = {"weight/mean": w.mean()}
    elif name == "smpo":
        s = 2.0 * a["preference_probability"] - kw.get("gamma", 1.0)
        per = dpo(zw - zl, s * b)
        extra = {"scale/mean": s.mean()}
    elif name == "sft_dpo":
        nll = -(a["policy_chosen"] * mc).sum(1) / np.maximum(mc.sum(1), 1.0)
        pref = dpo(zw - zl, b)
        per = pref + kw.get("sft_weight", 1.0) * nll
        extra = {"nll": nll.mean(), "loss/preference": pref.mean()}
    elif name == "flex_dpo":
        bw, bl = kw.get("beta_chosen", 0.1), kw.get("beta_rejected", 0.1)
        per = -logsig(bw * zw - bl * zl)
        metrics = {"rewards/chosen": np.mean(bw * zw), "rewards/rejected": np.mean(bl * zl),
                   "rewards/margin": np.mean(bw * zw - bl * zl), "rewards/accuracy": np.mean(zw > zl)}
        return per.mean(), metrics
    elif name == "tgdpo":
        al, bg = kw.get("alpha", 0.5), kw.get("guidance_beta", b)
        rw = bg * (a["guidance_chosen"] - a["reference_chosen"]) * mc
        rl = bg * (a["guidance_rejected"] - a["reference_rejected"]) * mr
        x = (b * (1 + al * rw) * rho_w).sum(1) - (b * (1 - al * rl) * rho_l).sum(1)
        per = -logsig(x)
        extra = {"guidance/chosen": rw.sum() / mc.sum(), "guidance/rejected": rl.sum() / mr.sum()}
    else:
        raise KeyError(name)
    return per.mean(), implicit_reward_metrics(zw, zl, b) | extra


CASES = [
    ("madpo", {}), ("madpo", {"beta": 1.0, "temperature": 0.3}),
    ("sem_dpo", {}), ("sem_dpo", {"beta": 1.0, "alpha": 2.5}),
    ("smpo", {}), ("smpo", {"beta": 1.0, "gamma": 0.4}),
    ("sft_dpo", {}), ("sft_dpo", {"beta": 1.0, "sft_weight": 0.3}),
    ("flex_dpo", {}), ("flex_dpo", {"beta_chosen": 0.2, "beta_rejected": 1.3}),
    ("tgdpo", {}), ("tgdpo", {"beta": 1.0, "alpha": 0.9, "guidance_beta": 0.3}),
]  # fmt: skip


def test_registered_with_their_extras():
    expected = {"madpo": ("reward_margin",), "sem_dpo": ("semantic_distance",), "smpo": ("preference_probability",),
                "sft_dpo": (), "flex_dpo": (), "tgdpo": ("guidance_chosen", "guidance_rejected")}
    for name, extras in expected.items():
        spec = SPECS[name]
        assert spec.fn is getattr(weighted, name)
        assert (spec.family, spec.needs_reference, spec.extras, spec.batch_coupled) == ("pairwise", True, extras, False)


def test_inputs_contain_the_edge_cases():
    a = make_arrays(0)
    nw, nl = a["chosen_mask"].sum(1), a["rejected_mask"].sum(1)
    assert 1 in nw and 1 in nl and np.any(nw != nl) and np.any(nw < WIDTH)
    zw = ((a["policy_chosen"] - a["reference_chosen"]) * a["chosen_mask"]).sum(1)
    zl = ((a["policy_rejected"] - a["reference_rejected"]) * a["rejected_mask"]).sum(1)
    assert zw[TIE] == zl[TIE] and np.sum(zw == zl) == 1


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i % 2}" for i, (n, _) in enumerate(CASES)])
def test_value_and_metrics_match_numpy_reference(name, kwargs):
    fn = jax.jit(lambda inputs: getattr(weighted, name)(inputs, **kwargs))
    for seed in (0, 1):
        a = make_arrays(seed)
        loss, metrics = fn(to_inputs(a))
        expected, expected_metrics = numpy_loss(name, a, **kwargs)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert set(metrics) == set(expected_metrics), name
        for key, value in expected_metrics.items():
            np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")


def test_objectives_differ_from_dpo_on_the_test_inputs():
    """Guards against a vacuous reference: with their defaults none of them equals plain DPO here."""
    inputs = to_inputs(make_arrays(0))
    dpo = float(sigmoid(inputs, beta=0.5)[0])
    kwargs = {"flex_dpo": {"beta_chosen": 0.5, "beta_rejected": 0.9}}
    for name in NAMES:
        value = float(getattr(weighted, name)(inputs, **kwargs.get(name, {"beta": 0.5}))[0])
        assert abs(value - dpo) > 1e-3, name


# ------------------------------------------------------------------------------------------------------------------
# reductions to DPO


def _dpo(a, beta=0.1):
    return float(sigmoid(to_inputs(a), beta=beta)[0])


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_reductions_to_dpo(beta):
    a = make_arrays(2)
    dpo = _dpo(a, beta)
    inputs = to_inputs(a)
    zero = jnp.zeros(6)
    same = {
        "sem_dpo alpha=0": weighted.sem_dpo(inputs, beta=beta, alpha=0.0),
        "madpo h=0": weighted.madpo(inputs.replace(extras={"reward_margin": zero}), beta=beta),
        "smpo alpha=1": weighted.smpo(inputs.replace(extras={"preference_probability": jnp.ones(6)}), beta=beta),
        "smpo alpha=0.5 gamma=0": weighted.smpo(
            inputs.replace(extras={"preference_probability": jnp.full(6, 0.5)}), beta=beta, gamma=0.0),
        "sft_dpo lambda=0": weighted.sft_dpo(inputs, beta=beta, sft_weight=0.0),
        "flex_dpo equal betas": weighted.flex_dpo(inputs, beta_chosen=beta, beta_rejected=beta),
        "tgdpo alpha=0": weighted.tgdpo(inputs, beta=beta, alpha=0.0),
        "tgdpo guide=reference": weighted.tgdpo(inputs.replace(extras={
            "guidance_chosen": inputs.reference_chosen, "guidance_rejected": inputs.reference_rejected}), beta=beta),
    }
    for label, (loss, _) in same.items():
        np.testing.assert_allclose(float(loss), dpo, rtol=1e-6, err_msg=label)


def test_sem_dpo_with_alpha_zero_is_exactly_sigmoid():
    inputs = to_inputs(make_arrays(3))
    assert float(weighted.sem_dpo(inputs, alpha=0.0)[0]) == float(sigmoid(inputs)[0])


def _grads(name, a, extras=EXTRA_KEYS, **kwargs):
    inputs = to_inputs(a, extras)

    def loss(pc, pr, ex):
        return getattr(weighted, name)(inputs.replace(policy_chosen=pc, policy_rejected=pr, extras=ex), **kwargs)[0]

    gc, gr, ge = jax.grad(loss, argnums=(0, 1, 2))(inputs.policy_chosen, inputs.policy_rejected, inputs.extras)
    gc, gr = np.asarray(gc), np.asarray(gr)
    assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr)), name
    assert np.all(gc[a["chosen_mask"] == 0] == 0) and np.all(gr[a["rejected_mask"] == 0] == 0), "padding got gradient"
    return gc, gr, {k: np.asarray(v) for k, v in ge.items()}


@pytest.mark.parametrize("gamma", [1.0, 0.6])
def test_smpo_is_flat_where_two_alpha_equals_gamma(gamma):
    """alpha = gamma/2 (equally preferred under gamma = 1): constant loss log 2, zero gradient."""
    a = make_arrays(4)
    a["preference_probability"] = np.full(6, gamma / 2)
    loss, _ = weighted.smpo(to_inputs(a), beta=1.0, gamma=gamma)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
    gc, gr, _ = _grads("smpo", a, beta=1.0, gamma=gamma)
    assert np.all(gc == 0) and np.all(gr == 0)


# ------------------------------------------------------------------------------------------------------------------
# gradients

Z_CHOSEN = np.array([1.5, -0.7, 2.0, 0.4, -1.5, 3.0])
Z_REJECTED = np.array([-0.5, 0.8, 0.5, -1.2, 0.5, 1.2])


def point(seed=7):
    """Arrays with summed log-ratios exactly Z_CHOSEN / Z_REJECTED (no tie), spread evenly over the completion."""
    a = make_arrays(seed)
    a["rejected_mask"][TIE] = span_masks([REJECTED_LENGTHS[TIE]], [2], WIDTH)[0]
    for side, z in (("chosen", Z_CHOSEN), ("rejected", Z_REJECTED)):
        m = a[f"{side}_mask"]
        a[f"policy_{side}"] = (a[f"reference_{side}"] + z[:, None] / m.sum(1, keepdims=True)) * m
        a[f"guidance_{side}"] = a[f"guidance_{side}"] * m
    a["preference_probability"] = np.array([1.0, 0.9, 0.7, 0.8, 0.6, 0.95])  # all > gamma/2
    return a


@pytest.mark.parametrize("name", NAMES)
def test_gradient_raises_chosen_and_lowers_rejected(name):
    a = point()
    gc, gr, ge = _grads(name, a)
    sum_c, sum_r = gc.sum(1), gr.sum(1)
    assert np.all(sum_c < 0), (name, sum_c)
    assert np.all(sum_r > 0), (name, sum_r)
    for key, g in ge.items():  # extras are data: no gradient flows into them
        assert np.all(g == 0), (name, key)


def test_madpo_weights_hard_pairs_more_than_easy_ones():
    a = point()
    a["reward_margin"] = np.array([-3.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    gc, _, _ = _grads("madpo", a)
    dpo_a = dict(a, reward_margin=np.zeros(6))
    gc0, _, _ = _grads("madpo", dpo_a)
    ratio = gc.sum(1)[:3] / gc0.sum(1)[:3]
    np.testing.assert_allclose(ratio, 2 * sig(np.array([3.0, 0.0, -3.0])), rtol=1e-5)
    assert ratio[0] > 1.0 > ratio[2]


def test_smpo_reverses_the_pair_below_half():
    a = point()
    a["preference_probability"] = np.full(6, 0.2)
    gc, gr, _ = _grads("smpo", a)
    assert np.all(gc.sum(1) > 0) and np.all(gr.sum(1) < 0)


def test_sft_dpo_gradient_is_dpo_plus_token_mean_nll():
    a = point()
    gc, gr, _ = _grads("sft_dpo", a, sft_weight=0.7)
    gc0, gr0, _ = _grads("sft_dpo", a, sft_weight=0.0)
    n = a["chosen_mask"].sum(1, keepdims=True)
    np.testing.assert_allclose(gc - gc0, -0.7 * a["chosen_mask"] / n / 6, atol=1e-7)
    np.testing.assert_allclose(gr, gr0, atol=1e-8)


def test_flex_dpo_scales_each_side_by_its_beta():
    a = point()
    gc, gr, _ = _grads("flex_dpo", a, beta_chosen=0.2, beta_rejected=0.8)
    x = 0.2 * Z_CHOSEN - 0.8 * Z_REJECTED
    # every completion token of a sequence gets d loss / d z; summed over the n tokens: n * d loss / d z
    nw, nl = a["chosen_mask"].sum(1), a["rejected_mask"].sum(1)
    np.testing.assert_allclose(gc.sum(1), -0.2 * sig(-x) / 6 * nw, rtol=1e-5)
    np.testing.assert_allclose(gr.sum(1), 0.8 * sig(-x) / 6 * nl, rtol=1e-5)


def test_tgdpo_token_weights():
    """d loss / d rho_w,t = -sig(-x) beta (1 + a rhat_w,t) / pairs: tokens the guide rewards are pushed harder."""
    a = point()
    gc, gr, _ = _grads("tgdpo", a, beta=0.1, alpha=0.5)
    mc, mr = a["chosen_mask"], a["rejected_mask"]
    rw = 0.1 * (a["guidance_chosen"] - a["reference_chosen"]) * mc
    rl = 0.1 * (a["guidance_rejected"] - a["reference_rejected"]) * mr
    rho_w = (a["policy_chosen"] - a["reference_chosen"]) * mc
    rho_l = (a["policy_rejected"] - a["reference_rejected"]) * mr
    x = (0.1 * (1 + 0.5 * rw) * rho_w).sum(1) - (0.1 * (1 - 0.5 * rl) * rho_l).sum(1)
    np.testing.assert_allclose(gc, -sig(-x)[:, None] * 0.1 * (1 + 0.5 * rw) * mc / 6, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(gr, sig(-x)[:, None] * 0.1 * (1 - 0.5 * rl) * mr / 6, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# validation

BAD = [
    *[(name, {"beta": 0.0}, "beta", "0.0") for name in ("madpo", "sem_dpo", "smpo", "sft_dpo", "tgdpo")],
    ("madpo", {"temperature": 0.0}, "temperature", "0.0"),
    ("madpo", {"temperature": -1.0}, "temperature", "-1.0"),
    ("sem_dpo", {"alpha": -0.5}, "alpha", "-0.5"),
    ("smpo", {"gamma": -1.0}, "gamma", "-1.0"),
    ("smpo", {"beta": -2.0}, "beta", "-2.0"),
    ("sft_dpo", {"sft_weight": -1.0}, "sft_weight", "-1.0"),
    ("sft_dpo", {"sft_weight": float("nan")}, "sft_weight", "nan"),
    ("flex_dpo", {"beta_chosen": 0.0}, "beta_chosen", "0.0"),
    ("flex_dpo", {"beta_rejected": -0.1}, "beta_rejected", "-0.1"),
    ("tgdpo", {"alpha": -0.5}, "alpha", "-0.5"),
    ("tgdpo", {"guidance_beta": 0.0}, "guidance_beta", "0.0"),
    ("madpo", {"temperature": "1"}, "temperature", "'1'"),
]


@pytest.mark.parametrize("name,kwargs,param,value", BAD, ids=[f"{b[0]}-{b[2]}={b[3]}" for b in BAD])
def test_bad_hyper_parameters_raise_a_clear_error(name, kwargs, param, value):
    assert_names_parameter(lambda: getattr(weighted, name)(to_inputs(make_arrays(0)), **kwargs), name, param, value)


@pytest.mark.parametrize("name", ["madpo", "sem_dpo", "smpo", "tgdpo"])
def test_missing_extras_raise_a_clear_error(name):
    for field in SPECS[name].extras:
        kept = tuple(k for k in EXTRA_KEYS if k != field)
        assert_names_field(lambda: getattr(weighted, name)(to_inputs(make_arrays(0), kept)), name, field, "missing")


BAD_EXTRAS = [
    ("madpo", "reward_margin", np.zeros(5), "shape [6]"),
    ("madpo", "reward_margin", np.zeros((6, 1)), "shape [6]"),
    ("madpo", "reward_margin", np.array([0, 1, np.nan, 0, 0, 0.0]), "finite"),
    ("sem_dpo", "semantic_distance", np.array([0, 0.5, -0.1, 0, 0, 0.0]), "0 <= d <= 2"),
    ("sem_dpo", "semantic_distance", np.array([0, 0.5, 2.5, 0, 0, 0.0]), "0 <= d <= 2"),
    ("smpo", "preference_probability", np.array([0, 0.5, 1.5, 0, 0, 0.0]), "0 <= alpha <= 1"),
    ("tgdpo", "guidance_chosen", np.zeros((6, 7)), "shape [6, 8]"),
]


@pytest.mark.parametrize("name,field,value,expected", BAD_EXTRAS, ids=[f"{b[0]}-{b[1]}-{b[3]}" for b in BAD_EXTRAS])
def test_bad_extras_raise_a_clear_error(name, field, value, expected):
    a = make_arrays(0)
    a[field] = value
    assert_names_field(lambda: getattr(weighted, name)(to_inputs(a)), name, field, expected)


def test_traced_extras_and_hyper_parameters_work_under_jit():
    a = make_arrays(5)
    fn = jax.jit(lambda inputs, t: weighted.madpo(inputs, beta=0.1, temperature=t)[0])
    np.testing.assert_allclose(float(fn(to_inputs(a), 0.5)), numpy_loss("madpo", a, temperature=0.5)[0], rtol=1e-5)
