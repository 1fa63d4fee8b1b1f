"""Schedules (lambda and its closed-form inverse against numerical inversion, d log alpha / dt against finite
differences), the parameterisation round trips, and the Gaussian mixture's exact score, predictions and MMD, all
in float64."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from jaxalign.diffusion import gmm, parameterisation as P
from jaxalign.diffusion.schedules import CosineVP, LinearVP, get_schedule


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


SCHEDULES = [LinearVP(), CosineVP()]


@pytest.mark.parametrize("sch", SCHEDULES, ids=["linear", "cosine"])
def test_vp_identity_and_lambda_inverse(sch):
    t = jnp.linspace(1e-4, sch.t_max, 101)
    np.testing.assert_allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, 1.0, rtol=1e-12)
    lam = sch.lam(t)
    assert np.all(np.diff(np.asarray(lam)) < 0)
    np.testing.assert_allclose(lam, jnp.log(sch.alpha(t) / sch.sigma(t)), rtol=1e-10)
    np.testing.assert_allclose(sch.t_of_lambda(lam), t, rtol=1e-9, atol=1e-12)
    for lam_i, t_i in zip(np.asarray(lam)[::10], np.asarray(t)[::10]):
        numeric = brentq(lambda s: float(sch.lam(s)) - lam_i, 1e-7, sch.t_max, xtol=1e-14)
        assert abs(float(sch.t_of_lambda(lam_i)) - numeric) < 1e-10 and abs(numeric - t_i) < 1e-9


@pytest.mark.parametrize("sch", SCHEDULES, ids=["linear", "cosine"])
def test_derivatives_against_finite_differences(sch):
    t = jnp.linspace(0.01, sch.t_max - 0.01, 23)
    step = 1e-6
    fd = (sch.log_alpha(t + step) - sch.log_alpha(t - step)) / (2 * step)
    np.testing.assert_allclose(sch.d_log_alpha(t), fd, rtol=1e-7)
    np.testing.assert_allclose(jax.vmap(jax.grad(sch.log_alpha))(t), sch.d_log_alpha(t), rtol=1e-12)
    f, g2 = sch.drift_and_diffusion2(t)
    dsigma2 = jax.vmap(jax.grad(lambda s: sch.sigma(s) ** 2))(t)
    np.testing.assert_allclose(g2, dsigma2 - 2 * f * sch.sigma(t) ** 2, rtol=1e-9)


def test_linear_matches_the_discrete_beta_integral():
    sch = LinearVP()
    t = 0.37
    grid = np.linspace(0, t, 200001)
    beta = 0.1 + grid * (20 - 0.1)
    np.testing.assert_allclose(float(sch.log_alpha(t)), -0.5 * np.trapezoid(beta, grid), rtol=1e-9)
    assert get_schedule("cosine") == CosineVP()
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("sigmoid")


def test_parameterisation_round_trips():
    key = jax.random.PRNGKey(0)
    x0, eps = jax.random.normal(key, (2, 5, 3))
    for alpha, sigma in [(0.9, np.sqrt(1 - 0.81)), (0.01, np.sqrt(1 - 1e-4)), (0.7, 0.2)]:  # last: not VP
        x = alpha * x0 + sigma * eps
        v = P.eps_x0_to_v(eps, x0, alpha, sigma)
        np.testing.assert_allclose(P.eps_to_x0(x, eps, alpha, sigma), x0, atol=1e-10)
        np.testing.assert_allclose(P.x0_to_eps(x, x0, alpha, sigma), eps, atol=1e-12)
        np.testing.assert_allclose(P.v_to_x0(x, v, alpha, sigma), x0, atol=1e-12)
        np.testing.assert_allclose(P.v_to_eps(x, v, alpha, sigma), eps, atol=1e-12)
        np.testing.assert_allclose(P.eps_to_v(x, eps, alpha, sigma), v, atol=1e-10)
        np.testing.assert_allclose(P.x0_to_v(x, x0, alpha, sigma), v, atol=1e-12)
        np.testing.assert_allclose(P.score_to_eps(P.eps_to_score(eps, sigma), sigma), eps, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 5])
def test_gmm_score_and_predictions_are_exact(dim):
    sch = LinearVP()
    mix = gmm.mixture_2d() if dim == 2 else gmm.random_mixture(jax.random.PRNGKey(3), dim, 3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (7, dim)) * 1.5

    @jax.jit
    def check(t):
        want = jax.vmap(jax.grad(lambda x: gmm.marginal_log_prob(mix, sch, x, t)))(xs)
        got = jax.vmap(lambda x: gmm.marginal_score(mix, sch, x, t))(xs)
        eps = jax.vmap(lambda x: gmm.eps_prediction(mix, sch, x, t))(xs)
        x0 = jax.vmap(lambda x: gmm.x0_prediction(mix, sch, x, t))(xs)
        return want, got, eps, x0

    for t in [1e-3, 0.1, 0.5, 1.0]:
        want, got, eps, x0 = check(t)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        # Tweedie: E[x0 | x_t] = (x_t - sigma E[eps | x_t]) / alpha
        np.testing.assert_allclose(x0, P.eps_to_x0(xs, eps, sch.alpha(t), sch.sigma(t)), rtol=1e-7, atol=1e-7)


def test_gmm_density_normalises_and_samples_match_moments():
    mix = gmm.mixture_2d()
    grid = np.linspace(-5, 5, 201)
    xx = jnp.stack(jnp.meshgrid(grid, grid), -1).reshape(-1, 2)
    mass = jnp.exp(jax.jit(jax.vmap(lambda x: gmm.log_prob(mix, x)))(xx)).sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-4
    xs = gmm.sample(mix, jax.random.PRNGKey(0), 50_000)
    mean = mix.weights @ mix.means
    np.testing.assert_allclose(xs.mean(0), mean, atol=0.02)
    cov = jnp.einsum("k,kij->ij", mix.weights, mix.covs + jnp.einsum("ki,kj->kij", mix.means, mix.means))
    np.testing.assert_allclose(jnp.cov(xs.T), cov - jnp.outer(mean, mean), atol=0.04)


def test_mmd_to_mixture_is_near_zero_for_exact_samples_and_matches_monte_carlo():
    mix = gmm.mixture_2d()
    exact = gmm.sample(mix, jax.random.PRNGKey(0), 2000)
    assert abs(float(gmm.mmd2_to_mixture(exact, mix))) < 2e-3
    shifted = exact + jnp.array([0.5, 0.0])
    ref = gmm.sample(mix, jax.random.PRNGKey(1), 2000)  # Monte-Carlo version of the closed-form mixture terms

    def kmean(a, b):
        return jnp.exp(-jnp.sum((a[:, None] - b[None]) ** 2, -1) / (2 * 0.5**2)).mean()

    n = ref.shape[0]
    kyy = (kmean(ref, ref) * n * n - n) / (n * (n - 1))
    monte_carlo = kmean(shifted, shifted) * 2000 / 1999 - 1 / 1999 - 2 * kmean(shifted, ref) + kyy
    got = float(gmm.mmd2_to_mixture(shifted, mix))
    assert got > 0.05 and abs(got - float(monte_carlo)) < 0.02
