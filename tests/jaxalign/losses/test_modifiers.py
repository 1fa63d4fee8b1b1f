"""Loss modifiers (jaxalign.losses.modifiers): f-divergence scores (f-DPO), LD-DPO's ld_alpha and WPO weighting.

1. every allowed (objective, modifier) combination against TRL 1.16.0's own DPOTrainer loss code (float32, 1e-6)
   and against the float64 NumPy references of `reference_numpy` (docs/objectives.md, "Loss modifiers");
2. `wpo_token_log_norm` against TRL 1.16.0's chunked log-prob kernel on a random LM head;
3. invariances (ld_alpha=1 and a->1 are the identity, ld_alpha=0 truncates to the shared prefix, ...);
4. gradients: finite, zero on padding, none through the WPO weights, zero beyond the alpha-divergence clamp;
5. modifiers inside `combine` against TRL's list-valued loss_type with loss_weights;
6. one clear ValueError for disallowed combinations and bad values.

The inputs have padding, unequal lengths, a different prompt offset on each side (completions do not start at
column 0), chosen and rejected arrays of different widths, one-token completions and a tied pair.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import PairwiseInputs, compute_objective, get_objective, get_spec, modifiers, register
from jaxalign.losses.pairwise import combine
from jaxalign.logprobs import token_logprobs
from reference_numpy import REWARD_METRICS, f_score, ld_weights, pairwise_loss, span_masks, wpo_weights

TRL_NAMES = [
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
ALL = [*TRL_NAMES, "cdpo"]
F_OK = ["sigmoid", "cdpo", "robust", "hinge", "ipo", "exo_pair", "discopop", "sft", "sigmoid_norm"]
F_NOT_OK = [n for n in ALL if n not in F_OK]
WPO_NOT_OK = ["aot", "aot_unpaired"]
F_DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.2),
                 ("alpha_divergence", 1.0), ("alpha_divergence", 0.0)]  # fmt: skip

# Hyper-parameters that make every term of every loss matter (beta 0.5 keeps hinge partly active).
HYPER = {name: {"beta": 0.5} for name in ALL}
HYPER["robust"]["label_smoothing"] = 0.2
HYPER["cdpo"]["label_smoothing"] = 0.2
HYPER["exo_pair"]["label_smoothing"] = 0.05
HYPER["aot"]["label_smoothing"] = 0.15
HYPER["aot_unpaired"]["label_smoothing"] = 0.15
HYPER["discopop"]["tau"] = 0.3


# ------------------------------------------------------------------------------------------------------------------
# inputs

# (prompt offset, completion length) per pair; chosen arrays are 9 wide, rejected arrays 8 wide.
CHOSEN = [(0, 5), (1, 1), (2, 6), (0, 3), (3, 4), (0, 2), (1, 7)]
REJECTED = [(2, 3), (0, 6), (0, 6), (1, 1), (3, 4), (2, 5), (0, 1)]
TIE = 4  # rejected == chosen
WIDTH_CHOSEN, WIDTH_REJECTED = 9, 8


def _mask(spans, width):
    starts, lengths = zip(*spans)
    return span_masks(lengths, starts, width)


def make_arrays(seed: int, scale: float = 0.4) -> dict[str, np.ndarray]:
    """float64 per-token log-probs (zero outside the masks), masks, and WPO normalisers (non-zero everywhere)."""
    rng = np.random.default_rng(seed)
    a = {"chosen_mask": _mask(CHOSEN, WIDTH_CHOSEN), "rejected_mask": _mask(REJECTED, WIDTH_REJECTED)}
    for side in ("chosen", "rejected"):
        mask = a[f"{side}_mask"]
        reference = -rng.uniform(0.05, 3.0, mask.shape)
        a[f"reference_{side}"] = reference * mask
        a[f"policy_{side}"] = (reference + rng.normal(0.0, scale, mask.shape)) * mask
        a[f"wpo_{side}"] = -rng.uniform(0.0, 1.5, mask.shape)
    for key in ("policy", "reference", "wpo"):
        a[f"{key}_rejected"][TIE] = a[f"{key}_chosen"][TIE, :WIDTH_REJECTED]
    return a


def to_inputs(a: dict[str, np.ndarray], dtype=jnp.float32) -> PairwiseInputs:
    arr = lambda key: jnp.asarray(a[key], dtype)  # noqa: E731
    return PairwiseInputs(
        policy_chosen=arr("policy_chosen"), policy_rejected=arr("policy_rejected"),
        reference_chosen=arr("reference_chosen"), reference_rejected=arr("reference_rejected"),
        chosen_mask=arr("chosen_mask"), rejected_mask=arr("rejected_mask"),
        extras={"wpo_log_norm_chosen": arr("wpo_chosen"), "wpo_log_norm_rejected": arr("wpo_rejected")},
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# TRL 1.16.0


@pytest.fixture(scope="module")
def trl_loss():
    importlib.import_module("trl")  # the test extra includes the bench extra: never skipped
    from trl_reference import trl_pairwise as fn  # noqa: PLC0415

    return fn


def run_trl(trl_loss, a, loss_type, hyper, f_divergence=None, f_alpha=0.5, ld_alpha=None, wpo=False, weights=None):
    return trl_loss(a, loss_type, loss_weights=weights, **hyper, f_divergence_type=f_divergence or "reverse_kl",
                    f_alpha_divergence_coef=f_alpha, ld_alpha=ld_alpha, use_weighting=wpo)


def check(name, a, trl_loss=None, **mods):
    """compute_objective vs the float64 reference (1e-5) and, when given, vs TRL 1.16.0 (1e-6), metrics included."""
    loss, metrics = compute_objective(name, to_inputs(a), **mods, **HYPER[name])
    expected, expected_metrics = pairwise_loss(name, a, **mods, **HYPER[name])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6, err_msg=f"{name} {mods} vs float64")
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
    if trl_loss is not None:
        trl_value, trl_metrics = run_trl(trl_loss, a, name, HYPER[name], **mods)
        np.testing.assert_allclose(float(loss), trl_value, rtol=1e-6, atol=1e-6, err_msg=f"{name} {mods} vs TRL")
        for key in REWARD_METRICS:
            np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=1e-6, atol=1e-6)
    return float(loss)


# ------------------------------------------------------------------------------------------------------------------
# 0. the inputs and the registry


def test_inputs_contain_the_edge_cases():
    a = make_arrays(0)
    nw, nl = a["chosen_mask"].sum(1), a["rejected_mask"].sum(1)
    assert 1 in nw and 1 in nl and np.any(nw > nl) and np.any(nw < nl) and np.any(nw == nl)
    first = lambda m: m.argmax(1)  # noqa: E731
    assert np.any(first(a["chosen_mask"]) != first(a["rejected_mask"])) and np.all(first(a["chosen_mask"])[[2, 4]] > 0)
    z = {s: ((a[f"policy_{s}"] - a[f"reference_{s}"]) * a[f"{s}_mask"]).sum(1) for s in ("chosen", "rejected")}
    assert z["chosen"][TIE] == z["rejected"][TIE]


def test_registry_declares_the_modifiers_trl_allows():
    for name in ALL:
        mods = set(get_spec(name).modifiers)
        assert ("f_divergence" in mods) == (name in F_OK), name
        assert "ld_alpha" in mods, name
        assert ("wpo" in mods) == (name not in WPO_NOT_OK), name
    for name in ("simpo", "cpo", "orpo"):
        assert get_spec(name).modifiers == ()


# ------------------------------------------------------------------------------------------------------------------
# 1. values against TRL 1.16.0 and the float64 references


@pytest.mark.parametrize("f_divergence,f_alpha", F_DIVERGENCES, ids=[f"{f}-{a}" for f, a in F_DIVERGENCES])
@pytest.mark.parametrize("name", F_OK)
def test_f_divergence(trl_loss, name, f_divergence, f_alpha):
    a = make_arrays(1)
    check(name, a, trl_loss if name in TRL_NAMES else None, f_divergence=f_divergence, f_alpha=f_alpha)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5])
@pytest.mark.parametrize("name", ALL)
def test_ld_alpha(trl_loss, name, ld_alpha):
    a = make_arrays(2)
    check(name, a, trl_loss if name in TRL_NAMES else None, ld_alpha=ld_alpha)


@pytest.mark.parametrize("name", [n for n in ALL if n not in WPO_NOT_OK])
def test_wpo(trl_loss, name):
    a = make_arrays(3)
    # TRL 1.16.0's sft raises with use_weighting (see test_trl_sft_with_wpo_raises): float64 reference only.
    check(name, a, trl_loss if name in TRL_NAMES and name != "sft" else None, wpo=True)


@pytest.mark.parametrize("name", [n for n in F_OK if n != "sft"])
def test_all_three_modifiers_at_once(trl_loss, name):
    a = make_arrays(4)
    check(name, a, trl_loss if name in TRL_NAMES else None, f_divergence="alpha_divergence", f_alpha=0.3,
          ld_alpha=0.3, wpo=True)  # fmt: skip


@pytest.mark.parametrize("name", ["nca_pair", "apo_down", "sppo_hard"])
def test_ld_alpha_and_wpo_on_absolute_reward_losses(trl_loss, name):
    check(name, make_arrays(5), trl_loss, ld_alpha=0.25, wpo=True)


def test_sft_with_wpo_is_the_weighted_mean_of_the_broadcast_loss():
    a = make_arrays(3)
    loss = compute_objective("sft", to_inputs(a), wpo=True, ld_alpha=0.2)[0]
    plain = -a["policy_chosen"][a["chosen_mask"] > 0].mean()
    np.testing.assert_allclose(float(loss), plain * wpo_weights(a).mean(), rtol=1e-5)


def test_trl_sft_with_wpo_raises(trl_loss):
    """TRL 1.16.0 multiplies the expanded SFT loss in place (`per_sequence_loss *= weights`), which torch refuses.
    jaxalign implements the evident intent (above). If a TRL upgrade fixes this, compare sft+wpo with TRL too."""
    with pytest.raises(RuntimeError, match="single memory location"):
        run_trl(trl_loss, make_arrays(3), "sft", HYPER["sft"], wpo=True)


def test_alpha_divergence_clamp_matches_trl(trl_loss):
    """A rejected log-ratio of about -190 puts (a-1) z past 80 at a = 0.5: both clamp, and the losses of the
    difference (not ipo, whose square of a ~1e35 score overflows float32 in TRL too) stay finite."""
    a = make_arrays(6)
    a["policy_rejected"][0] = (a["reference_rejected"][0] - 190.0 / REJECTED[0][1]) * a["rejected_mask"][0]
    for name in ("sigmoid", "hinge", "discopop"):
        loss = check(name, a, trl_loss, f_divergence="alpha_divergence", f_alpha=0.5)
        assert np.isfinite(loss)
    z = jnp.array([-300.0, -170.0, -150.0, 0.0, 3.0])
    s = modifiers.f_divergence_score(z, "alpha_divergence", 0.5)
    np.testing.assert_allclose(np.asarray(s), f_score(np.asarray(z, np.float64), "alpha_divergence", 0.5), rtol=1e-6)
    assert s[0] == s[1]  # both clamped


def test_scores_in_float64_match_the_formulas():
    z = np.linspace(-6.0, 6.0, 25)
    for f_divergence, f_alpha in [("reverse_kl", 0.5), *F_DIVERGENCES]:
        s = modifiers.f_divergence_score(jnp.asarray(z, jnp.float32), f_divergence, f_alpha)
        np.testing.assert_allclose(np.asarray(s), f_score(z, f_divergence, f_alpha), rtol=2e-6, atol=2e-6)


# ------------------------------------------------------------------------------------------------------------------
# 2. wpo_token_log_norm against TRL's kernel


def test_wpo_token_log_norm_matches_trls_fused_lm_head():
    import torch  # noqa: PLC0415
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: PLC0415

    rng = np.random.default_rng(0)
    batch, time, hidden, vocab = 3, 6, 8, 11
    h = rng.normal(size=(batch, time, hidden)).astype(np.float32)
    w = rng.normal(size=(vocab, hidden)).astype(np.float32)
    tokens = rng.integers(0, vocab, size=(batch, time))
    logits = jnp.asarray(h @ w.T)
    ours_norm, ours_logp = modifiers.wpo_token_log_norm(logits), token_logprobs(logits, jnp.asarray(tokens))
    assert ours_norm.shape == (batch, time) and np.all(np.asarray(ours_norm[:, 0]) == 0.0)
    # TRL scores position t from the hidden state at t-1 (its labels are the inputs shifted by one).
    trl_logp, _, trl_norm, _, _ = ChunkedLogProbFunction.apply(
        torch.from_numpy(h[:, :-1].reshape(-1, hidden)), torch.from_numpy(w), None,
        torch.from_numpy(tokens[:, 1:].reshape(-1)), 1.0, 4, None, 1.0, ("log_sum_sq_probs",),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours_norm[:, 1:]), trl_norm.reshape(batch, time - 1).numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(ours_logp[:, 1:]), trl_logp.reshape(batch, time - 1).numpy(), atol=2e-6)
    # and the closed form log sum_v p_v^2
    logits64 = h[:, :-1].astype(np.float64) @ w.T.astype(np.float64)
    p = np.exp(logits64 - logits64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ours_norm[:, 1:]), np.log((p**2).sum(-1)), atol=2e-6)


def test_wpo_weights_are_one_for_greedy_tokens_of_a_uniform_model():
    """For a uniform next-token distribution p_t = sum_v p_v^2 = 1/V, so w(y) = 1 (the WPO paper's alignment)."""
    logits = jnp.zeros((2, 5, 7))
    tokens = jnp.array([[0, 1, 2, 3, 4], [6, 5, 4, 3, 2]])
    mask = jnp.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], jnp.float32)
    w = modifiers.wpo_sequence_weights(token_logprobs(logits, tokens), modifiers.wpo_token_log_norm(logits), mask)
    np.testing.assert_allclose(np.asarray(w), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# 3. invariances


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "aot", "sppo_hard"])
def test_ld_alpha_one_and_alpha_divergence_one_are_the_identity(name):
    inputs = to_inputs(make_arrays(7))
    plain = float(compute_objective(name, inputs, **HYPER[name])[0])
    np.testing.assert_allclose(float(compute_objective(name, inputs, ld_alpha=1.0, **HYPER[name])[0]), plain, rtol=1e-6)
    if name in F_OK:
        for f_divergence, f_alpha in (("reverse_kl", 0.5), ("alpha_divergence", 1.0), ("alpha_divergence", 1 - 1e-7)):
            value = compute_objective(name, inputs, f_divergence=f_divergence, f_alpha=f_alpha, **HYPER[name])[0]
            np.testing.assert_allclose(float(value), plain, rtol=1e-6)


def test_ld_alpha_zero_is_dpo_on_the_shared_prefix():
    """For sigmoid (no length division) ld_alpha=0 equals DPO on completions cut to min(|y_w|, |y_l|) tokens."""
    a = make_arrays(8)
    cut = dict(a)
    shared = np.minimum(a["chosen_mask"].sum(1), a["rejected_mask"].sum(1))
    for side in ("chosen", "rejected"):
        mask = a[f"{side}_mask"].copy()
        mask[np.cumsum(mask, axis=1) > shared[:, None]] = 0.0
        cut[f"{side}_mask"] = mask
        for who in ("policy", "reference"):
            cut[f"{who}_{side}"] = a[f"{who}_{side}"] * mask
    ld = compute_objective("sigmoid", to_inputs(a), ld_alpha=0.0)[0]
    np.testing.assert_allclose(float(ld), float(compute_objective("sigmoid", to_inputs(cut))[0]), rtol=1e-6)


def test_alpha_divergence_zero_is_forward_kl():
    inputs = to_inputs(make_arrays(9))
    forward = compute_objective("sigmoid", inputs, f_divergence="forward_kl")[0]
    alpha0 = compute_objective("sigmoid", inputs, f_divergence="alpha_divergence", f_alpha=0.0)[0]
    np.testing.assert_allclose(float(alpha0), float(forward), rtol=1e-6)


def test_ld_token_weights_count_completion_tokens_in_mask_order():
    chosen = jnp.array([[0, 0, 1, 1, 1, 1, 0], [1, 0, 1, 0, 1, 0, 0]], jnp.float32)  # prompt offset; holes
    rejected = jnp.array([[1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]], jnp.float32)
    w_chosen, w_rejected = modifiers.ld_token_weights(chosen, rejected, 0.25)
    np.testing.assert_array_equal(np.asarray(w_chosen), [[0, 0, 1, 1, 0.25, 0.25, 0], [1, 0, 1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(w_rejected), [[1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0.25]])


def test_modifiers_work_under_jit_with_traced_values():
    inputs = to_inputs(make_arrays(10))

    @jax.jit
    def loss(inputs, f_alpha, ld_alpha):
        return compute_objective("robust", inputs, f_divergence="alpha_divergence", f_alpha=f_alpha,
                                 ld_alpha=ld_alpha, wpo=True, beta=0.5, label_smoothing=0.2)[0]  # fmt: skip

    for f_alpha in (0.3, 1.0):
        eager = compute_objective("robust", inputs, f_divergence="alpha_divergence", f_alpha=f_alpha, ld_alpha=0.4,
                                  wpo=True, beta=0.5, label_smoothing=0.2)[0]  # fmt: skip
        np.testing.assert_allclose(float(loss(inputs, f_alpha, 0.4)), float(eager), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# 4. gradients

ALL_ALLOWED = {name: {"ld_alpha": 0.5, **({"wpo": True} if name not in WPO_NOT_OK else {}),
                      **({"f_divergence": "js_divergence"} if name in F_OK else {})} for name in ALL}  # fmt: skip


def policy_grads(name, a, **mods):
    inputs = to_inputs(a)

    def loss(pc, pr):
        return compute_objective(name, inputs.replace(policy_chosen=pc, policy_rejected=pr), **mods, **HYPER[name])[0]

    gc, gr = jax.grad(loss, argnums=(0, 1))(inputs.policy_chosen, inputs.policy_rejected)
    return np.asarray(gc), np.asarray(gr)


@pytest.mark.parametrize("name", ALL)
def test_gradients_are_finite_and_zero_on_padding(name):
    a = make_arrays(11)
    for mods in (ALL_ALLOWED[name], *([{"f_divergence": "alpha_divergence", "f_alpha": 0.2}] if name in F_OK else [])):
        gc, gr = policy_grads(name, a, **mods)
        assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr)), (name, mods)
        assert np.all(gc[a["chosen_mask"] == 0] == 0) and np.all(gr[a["rejected_mask"] == 0] == 0), (name, mods)
        if name != "sft":
            assert np.any(gc != 0) and np.any(gr != 0), (name, mods)


def test_ld_alpha_scales_the_gradient_of_tail_tokens():
    """d loss / d logp_t is alpha times the shared-token gradient on the tail (sigmoid: same dloss/dz per pair)."""
    a = make_arrays(12)
    gc, gr = policy_grads("sigmoid", a, ld_alpha=0.25)
    w = ld_weights(a, 0.25)
    for g, side in ((gc, "chosen"), (gr, "rejected")):
        for i in range(g.shape[0]):
            head = g[i][w[side][i] == 1.0]
            np.testing.assert_allclose(g[i][w[side][i] == 0.25], 0.25 * head[0], rtol=1e-5)
            np.testing.assert_allclose(head, head[0], rtol=1e-6)


def test_wpo_weights_carry_no_gradient():
    a = make_arrays(13)
    inputs = to_inputs(a)
    weights = np.asarray(modifiers.wpo_pair_weights(inputs.policy_chosen, inputs.policy_rejected, inputs.chosen_mask,
                                                    inputs.rejected_mask, inputs.extras))  # fmt: skip
    np.testing.assert_allclose(weights, wpo_weights(a), rtol=1e-5)
    gc, gr = policy_grads("sigmoid", a, wpo=True)

    def constant(pc, pr):
        return get_objective("sigmoid")(inputs.replace(policy_chosen=pc, policy_rejected=pr), beta=0.5,
                                        pair_weights=jnp.asarray(weights))[0]  # fmt: skip

    ec, er = jax.grad(constant, argnums=(0, 1))(inputs.policy_chosen, inputs.policy_rejected)
    np.testing.assert_allclose(gc, np.asarray(ec), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gr, np.asarray(er), rtol=1e-6, atol=1e-9)


def test_alpha_divergence_gradient_vanishes_beyond_the_clamp():
    z = jnp.array([-300.0, -100.0, 0.5])
    g = jax.grad(lambda z: jnp.sum(modifiers.f_divergence_score(z, "alpha_divergence", 0.5)))(z)
    assert np.all(np.isfinite(np.asarray(g))) and g[0] == 0.0 and g[1] > 0 and g[2] > 0


# ------------------------------------------------------------------------------------------------------------------
# 5. combine


COMBOS = [
    ([("sigmoid", 1.0), ("sft", 0.3)], {"ld_alpha": 0.5}),
    ([("sigmoid", 1.0), ("sft", 0.3)], {"f_divergence": "forward_kl"}),
    ([("sigmoid", 1.0), ("ipo", 0.5), ("hinge", 2.0)], {"f_divergence": "js_divergence", "ld_alpha": 0.3, "wpo": True}),
    ([("robust", 1.0), ("sigmoid_norm", 0.7)], {"f_divergence": "alpha_divergence", "f_alpha": 0.4}),
    ([("sigmoid", 1.0), ("nca_pair", 0.5), ("apo_zero", 0.2)], {"ld_alpha": 0.0, "wpo": True}),
]


@pytest.mark.parametrize("terms,mods", COMBOS, ids=[f"{'+'.join(n for n, _ in t)}-{'-'.join(m)}" for t, m in COMBOS])
def test_combine_with_modifiers_matches_trl_list_loss(trl_loss, terms, mods):
    a = make_arrays(14)
    loss, metrics = combine(to_inputs(a), [(n, w, {"beta": 0.5}) for n, w in terms], **mods)
    expected, _ = run_trl(trl_loss, a, [n for n, _ in terms], {"beta": 0.5}, weights=[w for _, w in terms], **mods)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6)
    for name, _ in terms:
        term = pairwise_loss(name, a, beta=0.5, **mods)[0]
        np.testing.assert_allclose(float(metrics[f"{name}/loss"]), term, rtol=1e-5, atol=1e-6)


def test_combine_term_kwargs_override_the_shared_modifiers():
    a = make_arrays(15)
    inputs = to_inputs(a)
    loss, _ = combine(inputs, [("sigmoid", 1.0, {}), ("sft", 0.3, {"wpo": False, "ld_alpha": None})], wpo=True,
                      ld_alpha=0.5)  # fmt: skip
    expected = pairwise_loss("sigmoid", a, wpo=True, ld_alpha=0.5)[0] + 0.3 * pairwise_loss("sft", a)[0]
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_combine_rejects_an_f_divergence_when_a_term_cannot_take_it():
    with pytest.raises(ValueError, match="'nca_pair' does not support the f_divergence modifier"):
        combine(to_inputs(make_arrays(0)), [("sigmoid", 1.0, {}), ("nca_pair", 1.0, {})], f_divergence="forward_kl")


# ------------------------------------------------------------------------------------------------------------------
# 6. errors


@pytest.mark.parametrize("name", [*F_NOT_OK, "simpo", "orpo"])
def test_f_divergence_is_refused_where_trl_refuses_it(name):
    inputs = to_inputs(make_arrays(0))
    for f_divergence, f_alpha in (("forward_kl", 0.5), ("alpha_divergence", 1.0)):
        with pytest.raises(ValueError) as err:
            compute_objective(name, inputs, f_divergence=f_divergence, f_alpha=f_alpha)
        message = str(err.value)
        assert f"objective {name!r}" in message and "f_divergence" in message and "sigmoid" in message, message
    compute_objective(name, inputs, f_divergence="reverse_kl")  # the default is accepted everywhere, as in TRL


@pytest.mark.parametrize(
    "name,mods,match",
    [
        ("aot", {"wpo": True}, "'aot' does not support the wpo modifier"),
        ("aot_unpaired", {"wpo": True}, "'aot_unpaired' does not support the wpo modifier"),
        ("simpo", {"ld_alpha": 0.5}, "'simpo' does not support the ld_alpha modifier"),
        ("cpo", {"wpo": True}, "'cpo' does not support the wpo modifier"),
        ("sigmoid", {"f_divergence": "kl"}, "unknown f_divergence 'kl'; expected one of reverse_kl, forward_kl"),
        ("sigmoid", {"f_divergence": 1}, "unknown f_divergence 1"),
        ("ipo", {"f_divergence": "alpha_divergence", "f_alpha": 1.5}, r"0 <= f_alpha <= 1, got 1.5"),
        ("ipo", {"f_divergence": "alpha_divergence", "f_alpha": -0.1}, r"0 <= f_alpha <= 1, got -0.1"),
        ("ipo", {"f_divergence": "alpha_divergence", "f_alpha": float("nan")}, r"0 <= f_alpha <= 1, got nan"),
        ("ipo", {"f_divergence": "alpha_divergence", "f_alpha": "0.5"}, "f_alpha must be a real number"),
        ("hinge", {"f_divergence": "forward_kl", "f_alpha": 0.3}, "only used with f_divergence='alpha_divergence'"),
        ("hinge", {"f_alpha": 0.3}, "only used with f_divergence='alpha_divergence'"),
        ("sigmoid", {"ld_alpha": -0.1}, r"ld_alpha must be None or a real number in \[0, 1\], got -0.1"),
        ("sigmoid", {"ld_alpha": 1.5}, r"ld_alpha must be None or a real number in \[0, 1\], got 1.5"),
        ("sigmoid", {"ld_alpha": float("nan")}, "ld_alpha must be None or a real number"),
        ("sigmoid", {"ld_alpha": "0.5"}, "ld_alpha must be None or a real number"),
        ("sigmoid", {"ld_alpha": True}, "ld_alpha must be None or a real number"),
        ("sigmoid", {"wpo": "yes"}, "wpo must be True or False"),
        ("sigmoid", {"wpo": True, "pair_weights": jnp.ones(7)}, "either wpo=True or pair_weights"),
        ("sigmoid", {"pair_weights": jnp.ones(3)}, r"pair_weights must be an array of shape \(7,\)"),
    ],
)  # fmt: skip
def test_bad_modifiers_raise_one_clear_error(name, mods, match):
    with pytest.raises(ValueError, match=match) as err:
        compute_objective(name, to_inputs(make_arrays(0)), **mods)
    assert name in str(err.value)


def test_wpo_needs_its_extras():
    inputs = to_inputs(make_arrays(0))
    with pytest.raises(ValueError, match="sigmoid: wpo=True needs inputs.extras 'wpo_log_norm_chosen', "
                                         "'wpo_log_norm_rejected'.*wpo_token_log_norm"):  # fmt: skip
        compute_objective("sigmoid", inputs.replace(extras={}), wpo=True)
    bad = dict(inputs.extras, wpo_log_norm_rejected=inputs.extras["wpo_log_norm_rejected"][:, :3])
    with pytest.raises(ValueError, match=r"extras\['wpo_log_norm_rejected'\] must have the shape of policy_rejected"):
        compute_objective("sigmoid", inputs.replace(extras=bad), wpo=True)


def test_direct_calls_validate_modifiers_too():
    inputs = to_inputs(make_arrays(0))
    with pytest.raises(ValueError, match="hinge: unknown f_divergence 'tv'"):
        get_objective("hinge")(inputs, f_divergence="tv")
    with pytest.raises(ValueError, match="sppo_hard: ld_alpha must be"):
        get_objective("sppo_hard")(inputs, ld_alpha=2.0)
    with pytest.raises(TypeError):  # nca_pair has no f_divergence argument at all
        get_objective("nca_pair")(inputs, f_divergence="forward_kl")


def test_register_rejects_unknown_modifiers():
    with pytest.raises(ValueError, match="unknown modifiers"):
        register("never_registered", modifiers=("f_divergence", "length_penalty"))
