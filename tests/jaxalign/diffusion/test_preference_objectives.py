"""The diffusion preference objectives against NumPy computations written here from each equation (never by calling
the JAX function), their exact relations to one another and to the LM sigmoid DPO, Diffusion-DPO's gradient in
closed form and by finite differences, and one clear ValueError per invalid input. float64 throughout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.diffusion import preference as P


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def np_logsig(x):
    """log sigmoid(x) = -log(1 + e^{-x}), stable for large |x|."""
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def errors(seed, shape, spread=1e-3):
    """Four denoising losses (policy w, policy l, reference w, reference l) near 0.1 that differ by ~spread."""
    rng = np.random.default_rng(seed)
    base = 0.1 + 0.01 * rng.random(shape)
    return [base + spread * rng.standard_normal(shape) for _ in range(4)]


def np_dpo(p_w, p_l, r_w, r_l, beta):
    return -np.mean(np_logsig(-(beta / 2) * ((p_w - r_w) - (p_l - r_l))))


BETAS = [1.0, 5000.0, 1e7]  # 1e7 saturates the sigmoid for these error gaps


# ---------------------------------------------------------------------------------------------------- Diffusion-DPO


@pytest.mark.parametrize("beta", BETAS)
def test_diffusion_dpo_matches_numpy(beta):
    p_w, p_l, r_w, r_l = errors(0, (16,))
    p_l[:3] = p_w[:3] - r_w[:3] + r_l[:3]  # three ties: margin exactly 0
    loss, metrics = P.diffusion_dpo(p_w, p_l, r_w, r_l, beta=beta)
    expected = np_dpo(p_w, p_l, r_w, r_l, beta)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)
    reward_w, reward_l = -(beta / 2) * (p_w - r_w), -(beta / 2) * (p_l - r_l)
    np.testing.assert_allclose(float(metrics["rewards/margin"]), np.mean(reward_w - reward_l), rtol=1e-10, atol=1e-12)
    assert float(metrics["rewards/accuracy"]) == np.mean(reward_w > reward_l)
    np.testing.assert_allclose(float(metrics["errors/policy"]), 0.5 * (p_w.mean() + p_l.mean()), rtol=1e-12)


def test_saturated_sigmoid_is_linear_not_inf():
    # winner worse by 0.1 at beta 2e9: the sigmoid's argument is -1e8, the loss its linear tail 1e8 (not inf)
    p_w, p_l, r_w, r_l = (np.array([x]) for x in (0.2, 0.1, 0.1, 0.1))
    loss, _ = P.diffusion_dpo(p_w, p_l, r_w, r_l, beta=2e9)
    np.testing.assert_allclose(float(loss), 1e9 * 0.1, rtol=1e-12)
    loss, _ = P.diffusion_dpo(p_l, p_w, r_l, r_w, beta=2e9)  # the other way round: loss 0, not nan
    assert 0.0 <= float(loss) < 1e-30


def test_equal_policy_and_reference_give_log2():
    p_w, p_l, _, _ = errors(1, (8,))
    for name in ("diffusion_dpo", "dso_dpo"):
        loss, metrics = P.diffusion_objective(name)(policy_error_w=p_w, policy_error_l=p_l, reference_error_w=p_w,
                                                    reference_error_l=p_l)
        np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-14)
        assert float(metrics["rewards/accuracy"]) == 0.0


def test_diffusion_dpo_gradient_closed_form_and_finite_differences():
    beta = 5000.0
    p_w, p_l, r_w, r_l = errors(2, (6,))
    loss_of = lambda pw, pl: P.diffusion_dpo(pw, pl, r_w, r_l, beta=beta)[0]  # noqa: E731
    g_w, g_l = jax.grad(loss_of, argnums=(0, 1))(jnp.asarray(p_w), jnp.asarray(p_l))
    m = -(beta / 2) * ((p_w - r_w) - (p_l - r_l))
    sig_neg = 1.0 / (1.0 + np.exp(m))  # sigmoid(-m)
    # d/dm -log sigmoid(m) = -sigmoid(-m); dm/dp_w = -beta/2, dm/dp_l = +beta/2; the batch mean divides by n
    np.testing.assert_allclose(g_w, (beta / 2) * sig_neg / len(m), rtol=1e-10)
    np.testing.assert_allclose(g_l, -(beta / 2) * sig_neg / len(m), rtol=1e-10)
    h = 1e-7
    for i in range(len(m)):
        step = np.zeros_like(p_w)
        step[i] = h
        fd = (np_dpo(p_w + step, p_l, r_w, r_l, beta) - np_dpo(p_w - step, p_l, r_w, r_l, beta)) / (2 * h)
        np.testing.assert_allclose(float(g_w[i]), fd, rtol=1e-6)
    # the reference errors are inputs, not parameters: their gradient is the negative, as the formula says
    g_ref = jax.grad(lambda rw: P.diffusion_dpo(p_w, p_l, rw, r_l, beta=beta)[0])(jnp.asarray(r_w))
    np.testing.assert_allclose(g_ref, -g_w, rtol=1e-12)


def test_dso_dpo_is_diffusion_dpo_with_its_own_default():
    p_w, p_l, r_w, r_l = errors(3, (10,))
    for beta in (500.0, 37.0):
        a, _ = P.dso_dpo(p_w, p_l, r_w, r_l, beta=beta)
        b, _ = P.diffusion_dpo(p_w, p_l, r_w, r_l, beta=beta)
        assert float(a) == float(b)
    assert P.DIFFUSION_OBJECTIVES["dso_dpo"].defaults == {"beta": 500.0}
    np.testing.assert_allclose(float(P.dso_dpo(p_w, p_l, r_w, r_l)[0]), np_dpo(p_w, p_l, r_w, r_l, 500.0), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------- SmPO


@pytest.mark.parametrize("beta", BETAS)
def test_smpo_matches_numpy(beta):
    p_w, p_l, r_w, r_l = errors(4, (12,))
    pref = np.random.default_rng(4).random(12)
    pref[0], pref[1], pref[2] = 1.0, 0.5, 0.0
    loss, metrics = P.smpo(p_w, p_l, r_w, r_l, pref, beta=beta)
    d = (p_w - r_w) - (p_l - r_l)
    expected = -np.mean(np_logsig(-(2 * pref - 1) * 0.5 * beta * d))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)
    np.testing.assert_allclose(float(metrics["smpo/preference"]), pref.mean(), rtol=1e-12)


def test_smpo_limits():
    p_w, p_l, r_w, r_l = errors(5, (7,))
    ones = np.ones(7)
    np.testing.assert_allclose(float(P.smpo(p_w, p_l, r_w, r_l, ones, beta=5000.0)[0]),
                               float(P.diffusion_dpo(p_w, p_l, r_w, r_l, beta=5000.0)[0]), rtol=1e-14)
    # p = 0 swaps winner and loser
    np.testing.assert_allclose(float(P.smpo(p_w, p_l, r_w, r_l, 0 * ones, beta=5000.0)[0]),
                               float(P.diffusion_dpo(p_l, p_w, r_l, r_w, beta=5000.0)[0]), rtol=1e-14)
    # p = 1/2: equally good samples, log 2 and no gradient
    half = 0.5 * ones
    loss, grad = jax.value_and_grad(lambda pw: P.smpo(pw, p_l, r_w, r_l, half)[0])(jnp.asarray(p_w))
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-14)
    assert np.all(np.asarray(grad) == 0.0)


def test_smoothed_preference_is_the_softmax_of_normalised_scores():
    s_w, s_l = np.array([0.25, 0.12, 0.2]), np.array([0.2, 0.2, 0.2])
    lo, hi = 0.115, 0.282
    n_w, n_l = (s_w - lo) / (hi - lo), (s_l - lo) / (hi - lo)
    expected = np.exp(n_w) / (np.exp(n_w) + np.exp(n_l))
    np.testing.assert_allclose(P.smoothed_preference(s_w, s_l, scale=hi - lo), expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"scale must be a real number > 0, got scale=0"):
        P.smoothed_preference(s_w, s_l, scale=0)


# ---------------------------------------------------------------------------------------------------- DenseDPO


@pytest.mark.parametrize("beta", BETAS)
def test_dense_dpo_matches_numpy(beta):
    p_w, p_l, r_w, r_l = errors(6, (5, 4))
    labels = np.random.default_rng(6).choice([-1.0, 0.0, 1.0], size=(5, 4))
    labels[0] = 0.0  # one video pair entirely tied
    labels[1, 0] = 2.0  # only the sign counts
    loss, metrics = P.dense_dpo(p_w, p_l, r_w, r_l, labels, beta=beta)
    total, count = 0.0, 0
    for i in range(5):
        for s in range(4):
            y = np.sign(labels[i, s])
            if y == 0:
                continue
            d = (p_w[i, s] - r_w[i, s]) - (p_l[i, s] - r_l[i, s])
            total += -np_logsig(-y * beta / 2 * d)
            count += 1
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-12)
    assert float(metrics["count/labelled_segments"]) == count


def test_dense_dpo_one_segment_is_diffusion_dpo_and_no_labels_is_zero():
    p_w, p_l, r_w, r_l = errors(7, (9,))
    col = lambda x: x[:, None]  # noqa: E731
    dense, _ = P.dense_dpo(col(p_w), col(p_l), col(r_w), col(r_l), np.ones((9, 1)), beta=5000.0)
    plain, _ = P.diffusion_dpo(p_w, p_l, r_w, r_l, beta=5000.0)
    np.testing.assert_allclose(float(dense), float(plain), rtol=1e-14)
    # a segment won by the other video is the swapped pair
    flipped, _ = P.dense_dpo(col(p_w), col(p_l), col(r_w), col(r_l), -np.ones((9, 1)), beta=5000.0)
    np.testing.assert_allclose(float(flipped), float(P.diffusion_dpo(p_l, p_w, r_l, r_w, beta=5000.0)[0]), rtol=1e-14)
    loss, grad = jax.value_and_grad(lambda x: P.dense_dpo(x, col(p_l), col(r_w), col(r_l), np.zeros((9, 1)))[0])(
        jnp.asarray(col(p_w)))
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


# ---------------------------------------------------------------------------------------------------- PatchDPO


@pytest.mark.parametrize("beta", BETAS)
def test_patch_weighted_dpo_matches_numpy(beta):
    p_w, p_l, r_w, r_l = errors(8, (6, 16))
    rng = np.random.default_rng(8)
    a_w, a_l = rng.random((6, 16)), rng.random((6, 16))
    a_w[:, :5] = 0.0  # zero weights drop patches
    a_l[0] = 0.0  # and all-zero weights drop a side
    loss, _ = P.patch_weighted_dpo(p_w, p_l, r_w, r_l, a_w, a_l, beta=beta)
    s_w = np.array([sum(a_w[i, p] * (p_w[i, p] - r_w[i, p]) for p in range(16)) / 16 for i in range(6)])
    s_l = np.array([sum(a_l[i, p] * (p_l[i, p] - r_l[i, p]) for p in range(16)) / 16 for i in range(6)])
    np.testing.assert_allclose(float(loss), -np.mean(np_logsig(-(beta / 2) * (s_w - s_l))), rtol=1e-12)


def test_patch_weighted_dpo_with_uniform_weights_is_diffusion_dpo_on_the_image_error():
    """a = 1: S = mean_p e_theta - mean_p e_ref, and for equal patches mean_p e_p is the image's mean error."""
    rng = np.random.default_rng(9)
    batch, patches, per_patch = 4, 8, 12
    eps = rng.standard_normal((batch, patches, per_patch))
    preds = [eps + 0.3 * rng.standard_normal(eps.shape) for _ in range(4)]  # policy w, policy l, ref w, ref l
    sq = [(pred - eps) ** 2 for pred in preds]
    patch_err = [s.mean(axis=-1) for s in sq]  # [batch, patches]
    image_err = [s.reshape(batch, -1).mean(axis=-1) for s in sq]  # [batch]
    ones = np.ones((batch, patches))
    patch, _ = P.patch_weighted_dpo(*patch_err, ones, ones, beta=3.0)
    image, _ = P.diffusion_dpo(*image_err, beta=3.0)
    np.testing.assert_allclose(float(patch), float(image), rtol=1e-13)


def test_patch_dpo_is_the_released_weighted_mse_over_all_elements():
    rng = np.random.default_rng(10)
    batch, patches, per_patch = 3, 4, 5
    sq_w, sq_l = rng.random((batch, patches, per_patch)), rng.random((batch, patches, per_patch))
    q_ref, q_gen = rng.random((batch, patches)), rng.random((batch, patches))
    a_w, a_l = 1.0 - q_ref, q_gen  # the authors' region weights
    # their loss: one mean over the 2*batch images and every element of weight * squared error
    elementwise = np.concatenate([sq_w * a_w[..., None], sq_l * a_l[..., None]], axis=0)
    loss, _ = P.patch_dpo(sq_w.mean(-1), sq_l.mean(-1), a_w, a_l)
    np.testing.assert_allclose(float(loss), elementwise.mean(), rtol=1e-13)


# ---------------------------------------------------------------------------------------------------- DSO-DRO


def test_dso_dro_matches_numpy_and_the_paired_code_form():
    rng = np.random.default_rng(11)
    e = 0.1 + 0.01 * rng.random(10)
    ref = 0.1 + 0.01 * rng.random(10)
    desirable = np.array([1, 1, 1, 0, 0, 0.9, 0.2, 0, 1, 0], dtype=np.float64)
    good = desirable > 0.5
    loss, metrics = P.dso_dro(e, desirable, ref)
    d = e - ref
    np.testing.assert_allclose(float(loss), d[good].mean() - d[~good].mean(), rtol=1e-12)
    assert float(metrics["count/desirable"]) == good.sum()
    # balanced batch without a reference: the authors' mean(e_w - e_l)
    e_w, e_l = e[:5], e[5:]
    loss, _ = P.dso_dro(np.concatenate([e_w, e_l]), np.r_[np.ones(5), np.zeros(5)])
    np.testing.assert_allclose(float(loss), np.mean(e_w - e_l), rtol=1e-12)
    # the reference term changes the value, not the gradient
    g_ref = jax.grad(lambda x: P.dso_dro(x, desirable, ref)[0])(jnp.asarray(e))
    g_none = jax.grad(lambda x: P.dso_dro(x, desirable)[0])(jnp.asarray(e))
    np.testing.assert_allclose(g_ref, g_none, rtol=1e-14)
    np.testing.assert_allclose(g_none, np.where(good, 1 / good.sum(), -1 / (~good).sum()), rtol=1e-12)
    # a batch with only desirable samples: the undesirable mean is 0
    loss, _ = P.dso_dro(e, np.ones(10))
    np.testing.assert_allclose(float(loss), e.mean(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------- Diffusion-DRO


@pytest.mark.parametrize("margin", [0.0, 0.001, 0.05])
def test_diffusion_dro_matches_numpy(margin):
    p_w, p_l, r_w, r_l = errors(12, (20,), spread=5e-2)
    loss, metrics = P.diffusion_dro(p_w, p_l, r_w, r_l, margin=margin)
    diff = (p_w - r_w) - (p_l - r_l)
    np.testing.assert_allclose(float(loss), np.mean(np.maximum(0.0, diff + margin)), rtol=1e-12)
    active = diff + margin > 0
    assert 0 < active.sum() < 20  # both sides of the hinge are exercised
    np.testing.assert_allclose(float(metrics["hinge/active_fraction"]), active.mean())
    grad = jax.grad(lambda x: P.diffusion_dro(x, p_l, r_w, r_l, margin=margin)[0])(jnp.asarray(p_w))
    np.testing.assert_allclose(grad, active / 20.0, rtol=1e-14)


# ---------------------------------------------------------------------------------------------------- D3PO


def np_d3po(lp_w, lp_l, rf_w, rf_l, beta, eps):
    """As the authors' script computes it: clamp the probability ratio, then take its log."""
    ratio_w, ratio_l = np.exp(lp_w - rf_w), np.exp(lp_l - rf_l)
    if eps is not None:
        ratio_w, ratio_l = np.clip(ratio_w, 1 - eps, 1 + eps), np.clip(ratio_l, 1 - eps, 1 + eps)
    return -np.mean(np_logsig(beta * np.log(ratio_w) - beta * np.log(ratio_l)))


def logps(seed, shape, spread):
    rng = np.random.default_rng(seed)
    base = -50.0 + rng.standard_normal(shape)
    return base + spread * rng.standard_normal(shape), base + spread * rng.standard_normal(shape), base, base + 0.0


@pytest.mark.parametrize("beta", [0.1, 10.0, 1e6])
@pytest.mark.parametrize("spread,eps", [(0.01, 0.1), (0.5, 0.1), (0.5, None), (0.3, 0.05)])
def test_d3po_matches_numpy(beta, spread, eps):
    lp_w, lp_l, rf_w, rf_l = logps(13, (6, 5), spread)
    loss, metrics = P.d3po(lp_w, lp_l, rf_w, rf_l, beta=beta, clip_eps=eps)
    np.testing.assert_allclose(float(loss), np_d3po(lp_w, lp_l, rf_w, rf_l, beta, eps), rtol=1e-10)
    z = np.concatenate([lp_w - rf_w, lp_l - rf_l])
    if eps is None:
        assert float(metrics["d3po/clip_fraction"]) == 0.0
    else:
        outside = (np.exp(z) < 1 - eps) | (np.exp(z) > 1 + eps)
        np.testing.assert_allclose(float(metrics["d3po/clip_fraction"]), outside.mean())
        if spread == 0.01:
            assert not outside.any()  # clipping inactive
        else:
            assert 0 < outside.mean() < 1  # clipping active on some steps


def test_d3po_clipped_steps_have_no_gradient():
    lp_w, lp_l, rf_w, rf_l = logps(14, (4, 8), 0.5)
    grad = jax.grad(lambda x: P.d3po(x, lp_l, rf_w, rf_l, beta=1.0, clip_eps=0.1)[0])(jnp.asarray(lp_w))
    z = lp_w - rf_w
    inside = (z > np.log(0.9)) & (z < np.log(1.1))
    assert inside.any() and (~inside).any()
    assert np.all(np.asarray(grad)[~inside] == 0.0) and np.all(np.asarray(grad)[inside] != 0.0)
    # overflowing ratios (log-ratio 1000) stay finite: the clip is taken in log space
    big = lp_w.copy()
    big[0, 0] = rf_w[0, 0] + 1000.0
    assert np.isfinite(float(P.d3po(big, lp_l, rf_w, rf_l)[0]))


def test_d3po_without_clipping_is_the_lm_sigmoid_dpo_per_step():
    from jaxalign.losses import PairwiseInputs, compute_objective

    lp_w, lp_l, rf_w, rf_l = logps(15, (3, 7), 0.01)
    beta = 0.7
    d3po_loss, _ = P.d3po(lp_w, lp_l, rf_w, rf_l, beta=beta, clip_eps=0.1)  # inactive: all |z| << log 1.1
    unclipped, _ = P.d3po(lp_w, lp_l, rf_w, rf_l, beta=beta, clip_eps=None)
    flat = lambda x: jnp.asarray(x).reshape(-1, 1)  # noqa: E731  every (pair, step) is one single-token pair
    mask = jnp.ones((21, 1))
    inputs = PairwiseInputs(flat(lp_w), flat(lp_l), flat(rf_w), flat(rf_l), mask, mask)
    lm_loss, _ = compute_objective("sigmoid", inputs, beta=beta)
    np.testing.assert_allclose(float(d3po_loss), float(lm_loss), rtol=1e-12)
    np.testing.assert_allclose(float(unclipped), float(lm_loss), rtol=1e-12)
    # one step: the sigmoid DPO of the whole trajectories (their summed log-probs are the one step's)
    one, _ = P.d3po(lp_w[:, :1], lp_l[:, :1], rf_w[:, :1], rf_l[:, :1], beta=beta, clip_eps=None)
    z_w, z_l = lp_w[:, 0] - rf_w[:, 0], lp_l[:, 0] - rf_l[:, 0]
    np.testing.assert_allclose(float(one), -np.mean(np_logsig(beta * (z_w - z_l))), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_describes_every_objective():
    assert set(P.DIFFUSION_OBJECTIVES) == {"diffusion_dpo", "dso_dpo", "dso_dro", "smpo", "dense_dpo", "patch_dpo",
                                           "patch_weighted_dpo", "diffusion_dro", "d3po"}
    for name, spec in P.DIFFUSION_OBJECTIVES.items():
        assert spec.paper and spec.fn.__doc__ and spec.inputs
        # the source of the form: an equation, the authors' code, (DenseDPO, no code) the abstract, or a
        # composition of ours that says so
        sources = ("eq.", ".py", "from the abstract", "composition of ours")
        assert any(source in spec.fn.__doc__ for source in sources), name
    assert P.DIFFUSION_OBJECTIVES["d3po"].defaults == {"beta": 0.1, "clip_eps": 0.1}
    assert P.DIFFUSION_OBJECTIVES["diffusion_dro"].defaults == {"margin": 0.001}
    assert P.DIFFUSION_OBJECTIVES["dso_dro"].optional_inputs == ("reference_error",)
    assert P.DIFFUSION_OBJECTIVES["smpo"].inputs[-1] == "preference"


def test_constructor_binds_hyperparameters_and_jits():
    p_w, p_l, r_w, r_l = errors(16, (5,))
    fn = jax.jit(P.diffusion_objective("diffusion_dpo", beta=123.0))
    loss, _ = fn(policy_error_w=p_w, policy_error_l=p_l, reference_error_w=r_w, reference_error_l=r_l)
    np.testing.assert_allclose(float(loss), np_dpo(p_w, p_l, r_w, r_l, 123.0), rtol=1e-12)
    # a traced beta (a sweep under jit) is not checked eagerly
    swept = jax.jit(lambda b: P.diffusion_dpo(p_w, p_l, r_w, r_l, beta=b)[0])(7.0)
    np.testing.assert_allclose(float(swept), np_dpo(p_w, p_l, r_w, r_l, 7.0), rtol=1e-12)


@pytest.mark.parametrize("name,hyper,message", [
    ("dpo_diffusion", {}, r"unknown diffusion objective 'dpo_diffusion'; registered: d3po, dense_dpo, diffusion_dpo"),
    ("diffusion_dpo", {"gamma": 2}, r"takes no hyper-parameter 'gamma' \(got gamma=2\); it accepts: beta"),
    ("dso_dro", {"beta": 1.0}, r"'dso_dro' takes no hyper-parameter 'beta' .*accepts: none"),
    ("diffusion_dpo", {"beta": 0}, r"diffusion_dpo: hyper-parameter beta must be a finite real number > 0, got beta=0"),
    ("smpo", {"beta": -5.0}, r"smpo: hyper-parameter beta must be .* > 0, got beta=-5.0"),
    ("dense_dpo", {"beta": float("inf")}, r"dense_dpo: hyper-parameter beta must be a finite .*, got beta=inf"),
    ("patch_weighted_dpo", {"beta": "5000"}, r"patch_weighted_dpo: hyper-parameter beta must be .*, got beta='5000'"),
    ("d3po", {"beta": True}, r"d3po: hyper-parameter beta must be .*, got beta=True"),
    ("d3po", {"clip_eps": 1.0}, r"d3po: hyper-parameter clip_eps must be None \(no clipping\) or a real number in "
                                r"\(0, 1\), got clip_eps=1.0"),
    ("d3po", {"clip_eps": 0}, r"got clip_eps=0"),
    ("diffusion_dro", {"margin": -0.1}, r"diffusion_dro: hyper-parameter margin must be a finite real number >= 0, "
                                        r"got margin=-0.1"),
])
def test_bad_hyperparameters_are_one_value_error(name, hyper, message):
    with pytest.raises(ValueError, match=message):
        P.diffusion_objective(name, **hyper)
    if name in P.DIFFUSION_OBJECTIVES and set(hyper) <= set(P.DIFFUSION_OBJECTIVES[name].defaults):
        spec = P.DIFFUSION_OBJECTIVES[name]  # calling the function directly raises the same error
        two_d = name in ("dense_dpo", "patch_dpo", "patch_weighted_dpo", "d3po")
        args = {k: np.ones((2, 3) if two_d else (2,)) for k in spec.inputs}
        with pytest.raises(ValueError, match=message):
            spec.fn(**args, **hyper)


def test_bad_shapes_are_one_value_error():
    e = np.ones(4)
    with pytest.raises(ValueError, match=r"diffusion_dpo: policy_error_l must have the shape of policy_error_w "
                                         r"\(4,\), got shape \(3,\)"):
        P.diffusion_dpo(e, e[:3], e, e)
    with pytest.raises(ValueError, match=r"diffusion_dpo: policy_error_w must be a 1-D array \[batch\] \(one per "
                                         r"pair\), got shape \(4, 2\)"):
        P.diffusion_dpo(np.ones((4, 2)), e, e, e)
    with pytest.raises(ValueError, match=r"smpo: preference must have the shape of policy_error_w \(4,\), got "
                                         r"shape \(5,\)"):
        P.smpo(e, e, e, e, np.ones(5))
    with pytest.raises(ValueError, match=r"dense_dpo: segment_labels must have the shape of policy_error_w \(4, 3\), "
                                         r"got shape \(4, 2\)"):
        P.dense_dpo(*[np.ones((4, 3))] * 4, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"patch_weighted_dpo: policy_error_w must be a 2-D array \[batch, "
                                         r"patches\], got shape \(4,\)"):
        P.patch_weighted_dpo(e, e, e, e, e, e)
    with pytest.raises(ValueError, match=r"d3po: reference_logp_l must have the shape of policy_logp_w \(2, 5\), got "
                                         r"shape \(2, 4\)"):
        P.d3po(*[np.zeros((2, 5))] * 3, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"dso_dro: reference_error must have the shape of policy_error \(4,\)"):
        P.dso_dro(e, e, np.ones(2))
    with pytest.raises(ValueError, match=r"diffusion_dro: policy_error_w has an empty batch \(shape \(0,\)\)"):
        P.diffusion_dro(*[np.ones(0)] * 4)
    with pytest.raises(ValueError, match=r"diffusion_dpo: policy_error_w must be an array \[batch\] \(one per pair\), "
                                         r"got dict"):
        P.diffusion_dpo({"a": 1}, e, e, e)
