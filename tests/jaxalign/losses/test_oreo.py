"""OREO objectives (jaxalign.losses.oreo; Wang et al. 2024, docs/algorithms.md, "OREO").

1. every function against an independent float64 NumPy loop written here from the paper's formulas, on random
   inputs with right padding, left-padded prompts, unequal lengths, a one-token completion and an all-padding row;
2. gradients: the value loss gives nothing to the log-ratios, the policy loss nothing to the values; the policy
   gradient itself against a NumPy loop; the step-level credit structure (the Jacobian of each step's residual);
3. the full-vocabulary KL, the zero-loss sanity property, NaN safety, input validation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import oreo
from reference_numpy import softmax

WIDTH = 12
# (left padding, prompt length, completion length) per row: right padding, left-padded prompts ending at WIDTH,
# a one-token completion, an all-padding row, a completion with no prompt before it.
ROWS = [(0, 3, 5), (2, 3, 7), (0, 4, 1), (0, 0, 0), (1, 2, 4), (0, 1, 11), (3, 4, 2)]
GAP_ROW = [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0]  # a completion with a masked-out stretch inside (e.g. tool output)
BATCH = len(ROWS) + 1
LEVELS = ("token", "step", "response")


def make_inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = BATCH
    mask = np.zeros((batch, WIDTH))
    for b, (pad, prompt, n) in enumerate(ROWS):
        mask[b, pad + prompt : pad + prompt + n] = 1.0
    mask[-1] = GAP_ROW
    starts = (rng.uniform(size=mask.shape) < 0.35) & (mask > 0)
    starts[1, 5] = False  # row 1's first response token (position 5) is not marked: it must still start a step
    starts[4, 3] = True
    starts[-1, 2], starts[-1, 7] = False, True  # unmarked first token; a step starting after the gap
    return {
        "mask": mask,
        "logratio": rng.normal(0.0, 0.7, mask.shape),  # garbage outside the mask on purpose
        "values": rng.uniform(-0.5, 1.5, mask.shape),  # garbage outside the states on purpose
        "reward": rng.integers(0, 2, batch).astype(np.float64),
        "step_starts": starts,
    }


def f32(x):
    return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------------------------------------------------------------------
# independent float64 NumPy references


def np_advantage(lr, m):
    out = np.zeros_like(lr, dtype=np.float64)
    for b in range(lr.shape[0]):
        for t in range(lr.shape[1]):
            out[b, t] = sum(m[b, i] * lr[b, i] for i in range(t, lr.shape[1]))
    return out


def np_state_mask(m, level, starts=None):
    s = np.zeros_like(m, dtype=np.float64)
    for b in range(m.shape[0]):
        seen = False
        for t in range(m.shape[1]):
            if m[b, t] == 0:
                continue
            if level == "token" or not seen or (level == "step" and starts[b, t]):
                s[b, t] = 1.0
            seen = True
    return s


def np_residuals(lr, v, m, s, r, beta):
    a = np_advantage(lr, m)
    return np.where(s > 0, beta * a + v - r[:, None], 0.0)


def np_row_mean_sq(delta, s):
    per_row = [sum(delta[b, t] ** 2 for t in range(s.shape[1]) if s[b, t]) / max(s[b].sum(), 1.0)
               for b in range(s.shape[0])]
    return float(np.mean(per_row))


def np_kl(policy_logits, reference_logits, m):
    total, count = 0.0, 0
    for b in range(m.shape[0]):
        for t in range(1, m.shape[1]):
            if not m[b, t]:
                continue
            p, q = softmax(policy_logits[b, t - 1]), softmax(reference_logits[b, t - 1])
            total += float(np.sum(p * np.log(p / q)))
            count += 1
    return total / max(count, 1)


def np_credit(s, m, level, b, t):
    """Positions i whose log-ratio the residual of state (b, t) differentiates (policy loss), per the paper."""
    width = s.shape[1]
    if level == "token":
        end = t + 1
    elif level == "step":
        end = next((j for j in range(t + 1, width) if s[b, j]), width)
    else:
        end = width
    return [i for i in range(t, end) if m[b, i]]


def np_policy_grad(lr, v, m, s, r, beta, level):
    """dL_pi/d lr: (1/B) sum_t s_t 2 delta_t d delta_t/d lr_i / n_b, with d delta_t/d lr_i = beta on the credit set."""
    delta = np_residuals(lr, v, m, s, r, beta)
    grad = np.zeros_like(lr, dtype=np.float64)
    batch = lr.shape[0]
    for b in range(batch):
        n = max(s[b].sum(), 1.0)
        for t in range(lr.shape[1]):
            if s[b, t]:
                for i in np_credit(s, m, level, b, t):
                    grad[b, i] += 2.0 * delta[b, t] * beta / (n * batch)
    return grad


def states_for(a, level):
    starts = a["step_starts"] if level == "step" else None
    return np_state_mask(a["mask"], level, starts), oreo.state_mask(f32(a["mask"]), level, starts)


# ------------------------------------------------------------------------------------------------------------------
# values against NumPy


@pytest.mark.parametrize("seed", [0, 1])
def test_advantage_matches_numpy_and_has_no_gradient(seed):
    a = make_inputs(seed)
    got = oreo.soft_bellman_advantage(f32(a["logratio"]), f32(a["mask"]))
    np.testing.assert_allclose(got, np_advantage(a["logratio"], a["mask"]), rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda lr: jnp.sum(oreo.soft_bellman_advantage(lr, f32(a["mask"])) ** 2))(f32(a["logratio"]))
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("level", LEVELS)
def test_state_mask_matches_numpy(level):
    a = make_inputs(3)
    expected, got = states_for(a, level)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert np.asarray(got)[3].sum() == 0  # the all-padding row has no state
    if level == "step":
        assert got[1, 5] == 1.0  # the unmarked first response token starts the first step
        assert np.all(np.asarray(got) <= a["mask"])
    if level == "response":
        np.testing.assert_array_equal(np.asarray(got).sum(1), (a["mask"].sum(1) > 0).astype(float))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("beta", [0.03, 0.7])
def test_value_loss_matches_numpy(level, beta):
    a = make_inputs(5)
    s_np, s = states_for(a, level)
    loss, metrics = oreo.oreo_value_loss(f32(a["values"]), f32(a["logratio"]), f32(a["mask"]), s, f32(a["reward"]),
                                         beta)
    expected = np_row_mean_sq(np_residuals(a["logratio"], a["values"], a["mask"], s_np, a["reward"], beta), s_np)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert int(metrics["oreo/empty_rows"]) == 1
    first = [a["values"][b, np.argmax(s_np[b])] for b in range(BATCH) if s_np[b].any()]
    np.testing.assert_allclose(float(metrics["oreo/value_start"]), np.mean(first), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["oreo/value_mean"]), a["values"][s_np > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["oreo/reward_mean"]), a["reward"].mean(), rtol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_policy_loss_matches_numpy(level):
    a = make_inputs(7)
    rng = np.random.default_rng(70)
    policy_logits, reference_logits = rng.normal(0, 1.5, (2, BATCH, WIDTH, 9))
    s_np, s = states_for(a, level)
    beta, alpha = 0.4, 0.1
    kl = oreo.token_kl(f32(policy_logits), f32(reference_logits))
    loss, metrics = oreo.oreo_policy_loss(f32(a["logratio"]), f32(a["values"]), f32(a["mask"]), s, f32(a["reward"]),
                                          beta, alpha, kl, level)
    bellman = np_row_mean_sq(np_residuals(a["logratio"], a["values"], a["mask"], s_np, a["reward"], beta), s_np)
    kl_np = np_kl(policy_logits, reference_logits, a["mask"])
    np.testing.assert_allclose(float(loss), bellman + alpha * kl_np, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["oreo/policy_bellman"]), bellman, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["oreo/kl"]), kl_np, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["oreo/logratio_mean"]), a["logratio"][a["mask"] > 0].mean(), rtol=1e-5)
    assert int(metrics["oreo/empty_rows"]) == 1


# ------------------------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("level", LEVELS)
def test_value_loss_gradients(level):
    a = make_inputs(11)
    s_np, s = states_for(a, level)
    beta = 0.5

    def loss(values, logratio):
        return oreo.oreo_value_loss(values, logratio, f32(a["mask"]), s, f32(a["reward"]), beta)[0]

    g_values, g_logratio = jax.grad(loss, argnums=(0, 1))(f32(a["values"]), f32(a["logratio"]))
    assert np.all(np.asarray(g_logratio) == 0.0)  # no gradient to the policy
    delta = np_residuals(a["logratio"], a["values"], a["mask"], s_np, a["reward"], beta)
    n = np.maximum(s_np.sum(1, keepdims=True), 1.0)
    np.testing.assert_allclose(g_values, 2.0 * delta * s_np / (n * BATCH), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_policy_loss_gradients(level):
    a = make_inputs(13)
    s_np, s = states_for(a, level)
    beta = 0.5
    kl = f32(np.random.default_rng(1).uniform(0, 1, a["mask"].shape))

    def loss(logratio, values, reward):
        return oreo.oreo_policy_loss(logratio, values, f32(a["mask"]), s, reward, beta, 0.2, kl, level)[0]

    g_lr, g_values, g_reward = jax.grad(loss, argnums=(0, 1, 2))(f32(a["logratio"]), f32(a["values"]),
                                                                f32(a["reward"]))
    assert np.all(np.asarray(g_values) == 0.0)  # values enter under stop-gradient
    assert np.all(np.asarray(g_reward) == 0.0)
    expected = np_policy_grad(a["logratio"], a["values"], a["mask"], s_np, a["reward"], beta, level)
    np.testing.assert_allclose(g_lr, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g_lr)[a["mask"] == 0] == 0.0)  # prompt and padding tokens get nothing


def test_step_level_residual_depends_only_on_its_own_step():
    """d delta_t / d lr_i = beta exactly for the response tokens i of the step that starts at t (from t up to the next
    state), and exactly 0 for every other token: earlier steps, later steps, prompt and padding."""
    a = make_inputs(17)
    s_np, s = states_for(a, "step")
    beta = 0.3
    jac = jax.jacrev(lambda lr: oreo.policy_residuals(lr, f32(a["values"]), f32(a["mask"]), s, f32(a["reward"]),
                                                      beta, "step"))(f32(a["logratio"]))
    jac = np.asarray(jac)  # [B, T, B, T]
    expected = np.zeros_like(jac)
    for b in range(BATCH):
        for t in range(WIDTH):
            if s_np[b, t]:
                expected[b, t, b, np_credit(s_np, a["mask"], "step", b, t)] = beta
    np.testing.assert_array_equal(jac == 0.0, expected == 0.0)
    np.testing.assert_allclose(jac, expected, rtol=1e-6)
    # some step really spans several tokens, and some row really has several steps
    assert max(len(np_credit(s_np, a["mask"], "step", b, t)) for b in range(BATCH) for t in range(WIDTH)
               if s_np[b, t]) > 1
    assert s_np.sum(1).max() > 1


def test_step_level_with_every_token_a_step_equals_token_level():
    a = make_inputs(19)
    s = oreo.state_mask(f32(a["mask"]), "step", a["mask"] > 0)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(oreo.state_mask(f32(a["mask"]), "token")))

    def loss(logratio, level):
        return oreo.oreo_policy_loss(logratio, f32(a["values"]), f32(a["mask"]), s, f32(a["reward"]), 0.2,
                                     level=level)[0]

    lr = f32(a["logratio"])
    np.testing.assert_allclose(loss(lr, "step"), loss(lr, "token"), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(lr, "step"), jax.grad(loss)(lr, "token"), rtol=1e-5, atol=1e-7)


def test_response_level_is_v0_minus_r_plus_beta_sequence_logratio():
    a = make_inputs(23)
    s = oreo.state_mask(f32(a["mask"]), "response")
    beta = 0.25
    loss, _ = oreo.oreo_policy_loss(f32(a["logratio"]), f32(a["values"]), f32(a["mask"]), s, f32(a["reward"]), beta,
                                    level="response")
    per_row = []
    for b in range(BATCH):
        on = np.flatnonzero(a["mask"][b])
        if len(on) == 0:
            per_row.append(0.0)
            continue
        total = float(np.sum(a["logratio"][b, on]))
        per_row.append((a["values"][b, on[0]] - a["reward"][b] + beta * total) ** 2)
    np.testing.assert_allclose(float(loss), np.mean(per_row), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# KL, sanity, NaN safety, validation


def test_full_vocab_kl():
    a = make_inputs(29)
    rng = np.random.default_rng(290)
    policy_logits, reference_logits = rng.normal(0, 2.0, (2, BATCH, WIDTH, 11))
    mask = f32(a["mask"])
    assert float(oreo.full_vocab_kl(f32(policy_logits), f32(policy_logits), mask)) == 0.0
    np.testing.assert_array_equal(np.asarray(oreo.token_kl(f32(policy_logits), f32(policy_logits))), 0.0)
    got = oreo.full_vocab_kl(f32(policy_logits), f32(reference_logits), mask)
    np.testing.assert_allclose(float(got), np_kl(policy_logits, reference_logits, a["mask"]), rtol=1e-5)
    for seed in range(5):  # >= 0 everywhere, also for near-identical and sharply peaked distributions
        p = rng.normal(0, 1 + 3 * seed, (3, 5, 11))
        q = p + rng.normal(0, 10.0 ** -seed, p.shape)
        assert np.all(np.asarray(oreo.token_kl(f32(p), f32(q))) >= 0.0)
    g_ref = jax.grad(lambda r: oreo.full_vocab_kl(f32(policy_logits), r, mask))(f32(reference_logits))
    assert np.all(np.asarray(g_ref) == 0.0)  # the reference is frozen
    assert float(oreo.full_vocab_kl(f32(policy_logits), f32(reference_logits), jnp.zeros_like(mask))) == 0.0


@pytest.mark.parametrize("level", LEVELS)
def test_zero_loss_when_policy_is_reference_and_values_equal_reward(level):
    a = make_inputs(31)
    _, s = states_for(a, level)
    values = np.repeat(a["reward"][:, None], WIDTH, axis=1)
    zeros = np.zeros_like(a["logratio"])
    v_loss, _ = oreo.oreo_value_loss(f32(values), f32(zeros), f32(a["mask"]), s, f32(a["reward"]), 0.03)
    p_loss, _ = oreo.oreo_policy_loss(f32(zeros), f32(values), f32(a["mask"]), s, f32(a["reward"]), 0.03, 0.0,
                                      None, level)
    assert float(v_loss) == 0.0 and float(p_loss) == 0.0
    # and not zero once the value is off by one at a single state
    values[0, np.argmax(np.asarray(s)[0])] += 1.0
    v_loss, _ = oreo.oreo_value_loss(f32(values), f32(zeros), f32(a["mask"]), s, f32(a["reward"]), 0.03)
    assert float(v_loss) > 0.0


@pytest.mark.parametrize("level", LEVELS)
def test_padding_is_never_read_and_empty_rows_give_zero(level):
    a = make_inputs(37)
    _, s = states_for(a, level)
    lr_nan, v_nan = a["logratio"].copy(), a["values"].copy()
    lr_nan[a["mask"] == 0] = np.nan
    v_nan[np.asarray(s) == 0] = np.nan
    args = (f32(a["mask"]), s, f32(a["reward"]), 0.3)
    clean_v, _ = oreo.oreo_value_loss(f32(a["values"]), f32(a["logratio"]), *args)
    nan_v, _ = oreo.oreo_value_loss(f32(v_nan), f32(lr_nan), *args)
    clean_p, _ = oreo.oreo_policy_loss(f32(a["logratio"]), f32(a["values"]), *args, level=level)
    nan_p, _ = oreo.oreo_policy_loss(f32(lr_nan), f32(v_nan), *args, level=level)
    np.testing.assert_allclose(float(nan_v), float(clean_v), rtol=1e-6)
    np.testing.assert_allclose(float(nan_p), float(clean_p), rtol=1e-6)
    g = jax.grad(lambda lr: oreo.oreo_policy_loss(lr, f32(v_nan), *args, level=level)[0])(f32(lr_nan))
    assert np.all(np.isfinite(np.asarray(g)))
    g = jax.grad(lambda v: oreo.oreo_value_loss(v, f32(lr_nan), *args)[0])(f32(v_nan))
    assert np.all(np.isfinite(np.asarray(g)))
    # a batch of nothing but padding: loss 0, no NaN, every row counted as empty
    empty = jnp.zeros((3, WIDTH))
    e_s = oreo.state_mask(empty, level, np.zeros((3, WIDTH), bool) if level == "step" else None)
    v_loss, v_metrics = oreo.oreo_value_loss(empty, empty, empty, e_s, jnp.ones(3), 0.1)
    p_loss, p_metrics = oreo.oreo_policy_loss(empty, empty, empty, e_s, jnp.ones(3), 0.1, 0.5, empty, level)
    assert float(v_loss) == 0.0 and float(p_loss) == 0.0
    assert int(v_metrics["oreo/empty_rows"]) == 3 and int(p_metrics["oreo/empty_rows"]) == 3
    assert all(np.isfinite(float(x)) for x in [*v_metrics.values(), *p_metrics.values()])


def test_jit_matches_eager():
    a = make_inputs(41)
    _, s = states_for(a, "step")
    args = (f32(a["logratio"]), f32(a["values"]), f32(a["mask"]), s, f32(a["reward"]))
    eager = oreo.oreo_policy_loss(*args, 0.1, level="step")[0]
    jitted = jax.jit(lambda *x: oreo.oreo_policy_loss(*x, 0.1, level="step")[0])(*args)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    traced_mask = jax.jit(lambda m, st: oreo.state_mask(m, "step", st))(f32(a["mask"]), a["step_starts"])
    np.testing.assert_array_equal(np.asarray(traced_mask), np.asarray(s))


def test_bad_inputs_raise_one_clear_error():
    a = make_inputs(43)
    m, lr, v, r = f32(a["mask"]), f32(a["logratio"]), f32(a["values"]), f32(a["reward"])
    s = oreo.state_mask(m, "token")
    with pytest.raises(ValueError, match="level must be one of"):
        oreo.state_mask(m, "episode")
    with pytest.raises(ValueError, match="level must be one of"):
        oreo.oreo_policy_loss(lr, v, m, s, r, 0.1, level="sequence")
    with pytest.raises(ValueError, match="needs step_starts"):
        oreo.state_mask(m, "step")
    with pytest.raises(ValueError, match="only used at level 'step'"):
        oreo.state_mask(m, "token", a["step_starts"])
    outside = a["step_starts"].copy()
    outside[3, 0] = True  # the all-padding row
    with pytest.raises(ValueError, match="outside the completion mask"):
        oreo.state_mask(m, "step", outside)
    with pytest.raises(ValueError, match="step_starts must have shape"):
        oreo.state_mask(m, "step", a["step_starts"][:, :-1])
    with pytest.raises(ValueError, match="values must have shape"):
        oreo.oreo_value_loss(v[:, 1:], lr, m, s, r, 0.1)
    with pytest.raises(ValueError, match="logratio must have shape"):
        oreo.oreo_policy_loss(lr[:2], v, m, s, r, 0.1)
    with pytest.raises(ValueError, match="state_mask must have shape"):
        oreo.oreo_value_loss(v, lr, m, s[:, :-1], r, 0.1)
    with pytest.raises(ValueError, match="reward must have shape"):
        oreo.oreo_value_loss(v, lr, m, s, r[:, None], 0.1)
    with pytest.raises(ValueError, match="beta must satisfy"):
        oreo.oreo_value_loss(v, lr, m, s, r, 0.0)
    with pytest.raises(ValueError, match="alpha must satisfy"):
        oreo.oreo_policy_loss(lr, v, m, s, r, 0.1, -0.1, jnp.zeros_like(m))
    with pytest.raises(ValueError, match="kl_per_token"):
        oreo.oreo_policy_loss(lr, v, m, s, r, 0.1, 0.01)
    with pytest.raises(ValueError, match="kl_per_token must have shape"):
        oreo.oreo_policy_loss(lr, v, m, s, r, 0.1, 0.01, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="same shape"):
        oreo.token_kl(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="mask must be 2-D"):
        oreo.soft_bellman_advantage(lr, m[0])
