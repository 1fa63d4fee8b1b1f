"""Unpaired objectives KTO, BCO, DRO (jaxalign.losses.unpaired; docs/objectives.md, "Unpaired objectives").

1. KTO against TRL 1.16.0's own `KTOTrainer._compute_loss` (run on stand-in models that return given per-token
   log-probs, precomputed reference log-probs) and against float64 NumPy;
2. BCO and its running baseline against float64 NumPy (TRL 1.16.0 no longer ships BCOTrainer/RunningMoments) and
   against the exact mean/variance of every value seen;
3. DRO against float64 NumPy and its closed-form gradients;
4. gradient signs, no gradient through batch statistics / data extras;
5. bad hyper-parameters, missing and mis-shaped extras.
"""
from __future__ import annotations

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import unpaired
from jaxalign.losses.registry import SPECS, PairwiseInputs, UnpairedInputs, unpair
from reference_numpy import assert_names_field, assert_names_parameter, logsig, sig, span_masks

LENGTHS = [5, 1, 7, 3, 4, 6, 1, 2]
STARTS = [0, 0, 1, 0, 2, 0, 5, 6]
WIDTH = 8
LABELS = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float64)


def make_arrays(seed: int, labels=LABELS, kl_shift: float = 0.0, scale: float = 0.5) -> dict:
    rng = np.random.default_rng(seed)
    n = len(labels)
    mask = span_masks(LENGTHS[:n], STARTS[:n], WIDTH)
    ref = -rng.uniform(0.05, 3.0, mask.shape) * mask
    policy = (ref + rng.normal(0.0, scale, mask.shape)) * mask
    policy[3] = ref[3]  # one example exactly at the reference: z = 0
    # mismatched (prompt, rotated completion) sequences: their summed log-probs under policy and reference
    kl_reference = -rng.uniform(1.0, 10.0, n)
    kl_policy = kl_reference + rng.normal(kl_shift, 1.0, n)
    return {
        "policy": policy, "reference": ref, "mask": mask, "desirable": np.asarray(labels, np.float64),
        "kl_policy": kl_policy, "kl_reference": kl_reference,
        "reward": rng.normal(0.0, 1.0, n), "value": rng.normal(0.0, 0.5, n),
        "reward_baseline": np.float64(rng.normal(0.0, 0.3)),
    }  # fmt: skip


EXTRAS = ("kl_policy", "kl_reference", "reward", "value", "reward_baseline")


def to_inputs(a: dict, extras=EXTRAS) -> UnpairedInputs:
    return UnpairedInputs(**{k: jnp.asarray(a[k], jnp.float32) for k in ("policy", "reference", "mask", "desirable")},
                          extras={k: jnp.asarray(a[k], jnp.float32) for k in extras})


def z_of(a):
    return ((a["policy"] - a["reference"]) * a["mask"]).sum(1)


def reward_means(r, good):
    chosen = r[good].mean() if good.any() else 0.0
    rejected = r[~good].mean() if (~good).any() else 0.0
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
            "count/desirable": float(good.sum())}


def numpy_kto(a, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    z, good = z_of(a), a["desirable"] > 0.5
    kl = max(np.mean(a["kl_policy"] - a["kl_reference"]), 0.0)
    per = np.where(good, desirable_weight * (1 - sig(beta * (z - kl))), undesirable_weight * (1 - sig(beta * (kl - z))))
    return per.mean(), reward_means(beta * z, good) | {"kl": kl}


def numpy_bco(a, beta=0.1):
    r, good, delta = beta * z_of(a), a["desirable"] > 0.5, a["reward_baseline"]
    per = np.where(good, -logsig(r - delta), -logsig(-(r - delta)))
    return per.mean(), reward_means(r, good) | {"rewards/batch_mean": r.mean(), "delta": delta}


def numpy_dro(a, tau=0.1):
    res = a["reward"] - a["value"] - tau * z_of(a)
    metrics = {"residual/mean": res.mean(), "residual/rms": np.sqrt(np.mean(res**2)), "value/mean": a["value"].mean(),
               "reward/mean": a["reward"].mean(), "rewards/implicit": np.mean(tau * z_of(a))}
    return np.mean(0.5 * res**2), metrics


NUMPY = {"kto": numpy_kto, "bco": numpy_bco, "dro": numpy_dro}
CASES = [
    ("kto", {}, {}), ("kto", {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7}, {}),
    ("kto", {"beta": 1.0}, {"kl_shift": 2.0}), ("kto", {"beta": 1.0}, {"kl_shift": -3.0}),  # KL > 0 and clamped
    ("kto", {"beta": 0.5}, {"labels": np.ones(8)}), ("kto", {"beta": 0.5}, {"labels": np.zeros(8)}),
    ("bco", {}, {}), ("bco", {"beta": 1.0}, {}), ("bco", {"beta": 1.0}, {"labels": np.ones(8)}),
    ("dro", {}, {}), ("dro", {"tau": 1.0}, {}),
]  # fmt: skip
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def test_registered_with_their_extras():
    expected = {"kto": (("kl_policy", "kl_reference"), True), "bco": (("reward_baseline",), True),
                "dro": (("reward", "value"), False)}
    for name, (extras, coupled) in expected.items():
        spec = SPECS[name]
        assert spec.fn is getattr(unpaired, name)
        declared = (spec.family, spec.needs_reference, spec.extras, spec.batch_coupled)
        assert declared == ("unpaired", True, extras, coupled)


@pytest.mark.parametrize("name,kwargs,data", CASES, ids=IDS)
def test_value_and_metrics_match_numpy_reference(name, kwargs, data):
    fn = jax.jit(lambda inputs: getattr(unpaired, name)(inputs, **kwargs))
    for seed in (0, 1):
        a = make_arrays(seed, **data)
        loss, metrics = fn(to_inputs(a))
        expected, expected_metrics = NUMPY[name](a, **kwargs)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-7, err_msg=name)
        assert set(metrics) == set(expected_metrics), name
        for key, value in expected_metrics.items():
            np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")


def test_kl_clamp_is_exercised():
    assert np.mean(make_arrays(0, kl_shift=-3.0)["kl_policy"] - make_arrays(0, kl_shift=-3.0)["kl_reference"]) < 0
    assert float(unpaired.kto(to_inputs(make_arrays(0, kl_shift=-3.0)))[1]["kl"]) == 0.0
    assert float(unpaired.kto(to_inputs(make_arrays(0, kl_shift=2.0)))[1]["kl"]) > 1.0


# ------------------------------------------------------------------------------------------------------------------
# KTO against TRL 1.16.0's KTOTrainer._compute_loss


class _LogProbModel:
    """Stands in for TRL's model with fused LM head: returns the given per-token log-probs [n, T-1] for the main
    sequences or for the KL (mismatched) sequences, told apart by the identity of `input_ids`."""

    training = True

    def __init__(self, main, kl, kl_ids):
        self.main, self.kl, self.kl_ids = main, kl, kl_ids

    def __call__(self, input_ids, **kwargs):
        logps = self.kl if input_ids is self.kl_ids else self.main
        return types.SimpleNamespace(log_probs=logps, entropy=torch().zeros_like(logps),
                                     mean_logits=torch().zeros_like(logps))


def torch():
    import torch as _torch  # noqa: PLC0415  (imported only by the TRL parity tests)

    return _torch


def trl_kto(a, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """TRL's loss and logged metrics for these log-probs. A one-token prompt (completion mask 0) is prepended, so
    TRL's shifted per-token log-probs [n, T-1] are exactly our [n, WIDTH] arrays. The KL sequences' per-token
    log-probs are one token per row carrying the whole given sum; reference log-probs are precomputed sums."""
    from trl.trainer.kto_trainer import KTOTrainer  # noqa: PLC0415  (slow import: only here)

    t = torch()
    n = a["mask"].shape[0]
    per_token = t.from_numpy(np.asarray(a["policy"] * a["mask"], np.float32))
    completion_mask = t.from_numpy(np.concatenate([np.zeros((n, 1)), a["mask"]], 1)).long()
    kl_ids = t.ones((n, 2), dtype=t.long)
    kl_per_token = t.from_numpy(np.asarray(a["kl_policy"], np.float32)[:, None])
    batch = {
        "input_ids": t.ones_like(completion_mask), "attention_mask": t.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "KL_input_ids": kl_ids, "KL_attention_mask": t.ones_like(kl_ids),
        "KL_completion_mask": t.tensor([[0, 1]] * n),
        "label": t.from_numpy(a["desirable"] > 0.5),
        "ref_logps": t.from_numpy(np.asarray((a["reference"] * a["mask"]).sum(1), np.float32)),
        "ref_KL_logps": t.from_numpy(np.asarray(a["kl_reference"], np.float32)),
    }  # fmt: skip
    trainer = KTOTrainer.__new__(KTOTrainer)
    trainer.__dict__.update(
        model=_LogProbModel(per_token, kl_per_token, kl_ids), ref_model=None,
        accelerator=types.SimpleNamespace(device=t.device("cpu"), gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("name,kwargs,data", [c for c in CASES if c[0] == "kto"], ids=[i for i in IDS if "kto" in i])
def test_kto_matches_trl(name, kwargs, data):
    a = make_arrays(3, **data)
    loss, metrics = unpaired.kto(to_inputs(a), **kwargs)
    expected, trl_metrics = trl_kto(a, **kwargs)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["kl"]), trl_metrics["kl"], rtol=1e-6, atol=1e-7)
    good = a["desirable"] > 0.5
    pairs = [("rewards/chosen", "rewards/chosen", good.any()), ("rewards/rejected", "rewards/rejected", (~good).any()),
             ("rewards/margin", "rewards/margins", good.any() and (~good).any())]
    for ours, theirs, present in pairs:
        assert (theirs in trl_metrics) == present, theirs
        if present:
            np.testing.assert_allclose(float(metrics[ours]), trl_metrics[theirs], rtol=1e-5, atol=1e-6)


def test_kto_on_unpaired_pairs_matches_the_pairwise_view():
    """unpair(): chosen rows desirable, rejected rows undesirable, completions padded to one width."""
    a = make_arrays(4)
    first, second = (lambda x: jnp.asarray(x[:4], jnp.float32)), (lambda x: jnp.asarray(x[4:, :6], jnp.float32))
    pairs = PairwiseInputs(
        policy_chosen=first(a["policy"]), policy_rejected=second(a["policy"]),
        reference_chosen=first(a["reference"]), reference_rejected=second(a["reference"]),
        chosen_mask=first(a["mask"]), rejected_mask=second(a["mask"]),
        extras={k: jnp.asarray(a[k], jnp.float32) for k in ("kl_policy", "kl_reference")},
    )  # fmt: skip
    b = dict(a, desirable=np.array([1, 1, 1, 1, 0, 0, 0, 0.0]))
    b["mask"] = a["mask"].copy()
    b["mask"][4:, 6:] = 0.0
    loss, _ = unpaired.kto(unpair(pairs), beta=0.5)
    np.testing.assert_allclose(float(loss), numpy_kto(b, beta=0.5)[0], rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# BCO running baseline


def numpy_running_moments(batches):
    """float64 transcription of the pairwise (Chan et al.) merge, starting from mean 0, var 1, count 1e-24."""
    mean, var, count = 0.0, 1.0, 1e-24
    for xs in batches:
        xs = np.asarray(xs, np.float64).reshape(-1)
        m, v, n = xs.mean(), xs.var(), xs.size
        d = m - mean
        total = count + n
        var = (var * count + d**2 * count * n / total + v * n) / total
        mean = mean + d * n / total
        count = total
    return mean, var, count


def test_update_running_mean_matches_numpy_and_the_exact_moments():
    rng = np.random.default_rng(0)
    batches = [rng.normal(1.0, 2.0, size) for size in (1, 5, 1, 3, 8)]
    state = unpaired.RunningMoments.init()
    update = jax.jit(unpaired.update_running_mean)
    for k, xs in enumerate(batches, start=1):
        state = update(state, jnp.asarray(xs, jnp.float32))
        mean, var, count = numpy_running_moments(batches[:k])
        seen = np.concatenate(batches[:k])
        np.testing.assert_allclose(float(state.mean), mean, rtol=1e-5)
        np.testing.assert_allclose(float(state.var), var, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(state.count), count, rtol=1e-6)
        np.testing.assert_allclose(float(state.mean), seen.mean(), rtol=1e-5)  # exact merge: the mean of all values
        np.testing.assert_allclose(float(state.var), seen.var(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(state.std), np.concatenate(batches).std(ddof=1), rtol=1e-4)


def test_bco_baseline_is_updated_with_this_batch_before_use():
    """TRL's order: the first batch's baseline is its own mean reward; later ones the mean over batches' means."""
    state = unpaired.RunningMoments.init()
    means = []
    for seed in range(3):
        a = make_arrays(seed)
        inputs = to_inputs(a)
        state, delta = unpaired.bco_baseline(state, inputs, beta=0.5)
        means.append(np.mean(0.5 * z_of(a)))
        np.testing.assert_allclose(float(delta), np.mean(means), rtol=1e-5)
        loss, metrics = unpaired.bco(inputs.replace(extras={"reward_baseline": delta}), beta=0.5)
        np.testing.assert_allclose(float(metrics["rewards/batch_mean"]), means[-1], rtol=1e-5)
        expected = numpy_bco(dict(a, reward_baseline=np.mean(means)), beta=0.5)[0]
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_bco_with_running_state_under_jit_and_scan():
    arrays = [make_arrays(s) for s in range(4)]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[to_inputs(a, ()) for a in arrays])

    def body(state, inputs):
        state, delta = unpaired.bco_baseline(state, inputs, beta=0.1)
        loss, _ = unpaired.bco(inputs.replace(extras={"reward_baseline": delta}), beta=0.1)
        return state, loss

    state, losses = jax.jit(lambda s, x: jax.lax.scan(body, s, x))(unpaired.RunningMoments.init(), stacked)
    means = [np.mean(0.1 * z_of(a)) for a in arrays]
    np.testing.assert_allclose(float(state.mean), np.mean(means), rtol=1e-5)
    expected = [numpy_bco(dict(a, reward_baseline=np.mean(means[: k + 1])))[0] for k, a in enumerate(arrays)]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# gradients


def grads(name, a, **kwargs):
    inputs = to_inputs(a)

    def loss(policy, extras):
        return getattr(unpaired, name)(inputs.replace(policy=policy, extras=extras), **kwargs)[0]

    gp, ge = jax.grad(loss, argnums=(0, 1))(inputs.policy, inputs.extras)
    gp = np.asarray(gp)
    assert np.all(np.isfinite(gp)) and np.all(gp[a["mask"] == 0] == 0), "padding got gradient"
    return gp, {k: np.asarray(v) for k, v in ge.items()}


@pytest.mark.parametrize("name,kwargs", [("kto", {}), ("kto", {"beta": 1.0}), ("bco", {}), ("bco", {"beta": 1.0})])
def test_gradient_raises_desirable_and_lowers_undesirable(name, kwargs):
    a = make_arrays(5, kl_shift=1.0)
    gp, ge = grads(name, a, **kwargs)
    per_example = gp.sum(1)
    good = a["desirable"] > 0.5
    assert np.all(per_example[good] < 0) and np.all(per_example[~good] > 0), per_example
    for key, g in ge.items():  # KL estimate and baseline are constants; other extras are unused
        assert np.all(g == 0), (name, key)


def test_kto_weights_scale_each_side():
    a = make_arrays(6, kl_shift=1.0)
    g1, _ = grads("kto", a)
    g2, _ = grads("kto", a, desirable_weight=2.0, undesirable_weight=0.5)
    good = a["desirable"] > 0.5
    np.testing.assert_allclose(g2[good], 2.0 * g1[good], rtol=1e-6)
    np.testing.assert_allclose(g2[~good], 0.5 * g1[~good], rtol=1e-6)


def test_dro_gradients_are_the_residual():
    """d/dV_i = -res_i / n, d/dlogp_i,t = -tau res_i / n on completion tokens, no gradient into the reward."""
    a = make_arrays(7)
    tau, n = 0.3, 8
    gp, ge = grads("dro", a, tau=tau)
    res = a["reward"] - a["value"] - tau * z_of(a)
    np.testing.assert_allclose(ge["value"], -res / n, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gp, -tau * res[:, None] / n * a["mask"], rtol=1e-5, atol=1e-8)
    assert np.all(ge["reward"] == 0)


def test_dro_is_zero_at_its_fixed_point_and_ignores_labels():
    a = make_arrays(8)
    a["value"] = a["reward"] - 0.1 * z_of(a)
    loss, _ = unpaired.dro(to_inputs(a))
    assert float(loss) < 1e-10
    gp, ge = grads("dro", a)
    assert np.max(np.abs(gp)) < 1e-6 and np.max(np.abs(ge["value"])) < 1e-6
    b = make_arrays(9)
    flipped = dict(b, desirable=1.0 - b["desirable"])
    assert float(unpaired.dro(to_inputs(b))[0]) == float(unpaired.dro(to_inputs(flipped))[0])


# ------------------------------------------------------------------------------------------------------------------
# validation

BAD = [
    ("kto", {"beta": 0.0}, "beta", "0.0"), ("kto", {"desirable_weight": -1.0}, "desirable_weight", "-1.0"),
    ("kto", {"undesirable_weight": float("inf")}, "undesirable_weight", "inf"),
    ("bco", {"beta": -0.1}, "beta", "-0.1"), ("dro", {"tau": 0.0}, "tau", "0.0"), ("dro", {"tau": "1"}, "tau", "'1'"),
]  # fmt: skip


@pytest.mark.parametrize("name,kwargs,param,value", BAD, ids=[f"{b[0]}-{b[2]}={b[3]}" for b in BAD])
def test_bad_hyper_parameters_raise_a_clear_error(name, kwargs, param, value):
    assert_names_parameter(lambda: getattr(unpaired, name)(to_inputs(make_arrays(0)), **kwargs), name, param, value)


@pytest.mark.parametrize("name", ["kto", "bco", "dro"])
def test_missing_extras_raise_a_clear_error(name):
    for field in SPECS[name].extras:
        kept = tuple(k for k in EXTRAS if k != field)
        assert_names_field(lambda: getattr(unpaired, name)(to_inputs(make_arrays(0), kept)), name, field, "missing")


BAD_EXTRAS = [
    ("kto", "kl_policy", np.zeros((8, 2)), "shape [m]"),
    ("kto", "kl_policy", np.zeros(0), "shape [m]"),
    ("kto", "kl_reference", np.zeros(7), "shape [8]"),
    ("bco", "reward_baseline", np.zeros(1), "shape []"),
    ("bco", "reward_baseline", np.float64(np.nan), "finite"),
    ("dro", "value", np.zeros(7), "shape [8]"),
    ("dro", "reward", np.full(8, np.inf), "finite"),
]


@pytest.mark.parametrize("name,field,value,expected", BAD_EXTRAS,
                         ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BAD_EXTRAS)])
def test_bad_extras_raise_a_clear_error(name, field, value, expected):
    a = make_arrays(0)
    a[field] = value
    assert_names_field(lambda: getattr(unpaired, name)(to_inputs(a)), name, field, expected)


def test_kl_estimate_may_use_a_different_number_of_mismatched_sequences():
    a = make_arrays(0)
    a["kl_policy"], a["kl_reference"] = a["kl_policy"][:5] + 3.0, a["kl_reference"][:5]
    loss, metrics = unpaired.kto(to_inputs(a))
    np.testing.assert_allclose(float(metrics["kl"]), np.mean(a["kl_policy"] - a["kl_reference"]), rtol=1e-5)
    np.testing.assert_allclose(float(loss), numpy_kto(a)[0], rtol=1e-5)


def test_labels_must_be_one_per_completion():
    a = make_arrays(0)
    a["desirable"] = np.ones(5)
    with pytest.raises(ValueError, match=r"kto: inputs.desirable must have shape \[8\]"):
        unpaired.kto(to_inputs(a))
