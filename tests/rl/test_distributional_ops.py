"""C51 projection against a per-atom loop of Bellemare et al.'s Algorithm 1; the quantile Huber loss against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.distributional import (
    categorical_cross_entropy,
    categorical_projection,
    categorical_support,
    huber,
    quantile_huber_loss,
    quantile_midpoints,
)


def _project_loop(support, probs, reward, discount):
    """Algorithm 1 of Bellemare et al. 2017, one atom at a time, in float64 (with l = u giving all mass to l)."""
    v_min, v_max, n = support[0], support[-1], len(support)
    dz = (v_max - v_min) / (n - 1)
    m = np.zeros(n)
    for j in range(n):
        tz = min(max(reward + discount * support[j], v_min), v_max)
        b = (tz - v_min) / dz
        lo, up = int(np.floor(b)), int(np.ceil(b))
        if lo == up:
            m[lo] += probs[j]
        else:
            m[lo] += probs[j] * (up - b)
            m[up] += probs[j] * (b - lo)
    return m


def test_categorical_projection_matches_algorithm_1():
    rng = np.random.default_rng(0)
    support = np.asarray(categorical_support(-10.0, 10.0, 51), np.float64)
    probs = rng.dirichlet(np.ones(51), size=32)
    rewards = rng.normal(scale=4.0, size=32)
    rewards[:4] = [0.0, 0.4, 30.0, -30.0]  # on-atom (l = u), exact grid shift, clipped above and below
    discounts = rng.choice([0.0, 0.9, 0.99, 1.0], size=32)
    discounts[:2] = 1.0
    out = np.asarray(jax.jit(categorical_projection)(jnp.asarray(support, jnp.float32), jnp.asarray(probs, jnp.float32),
                                                     jnp.asarray(rewards, jnp.float32),
                                                     jnp.asarray(discounts, jnp.float32)))
    expected = np.stack([_project_loop(support, p, r, d) for p, r, d in zip(probs, rewards, discounts)])
    # float32 against float64: the atom position b = (tz - v_min) / dz lies in [0, 50], where float32's spacing is up
    # to 3.8e-6, so each split weight (u - b, b - l) carries an error of that order; 2e-6 held under LLVM -O2 by
    # luck and one entry is 2.04e-6 off under the -O0 codegen tests/conftest.py selects. A wrong atom or weight is
    # off by orders of magnitude more (and the mean check below is independent of the rounding).
    np.testing.assert_allclose(out, expected, atol=4e-6)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    # Without clipping the projection preserves the mean: sum_i m_i z_i = r + gamma E[Z].
    inside = np.all(np.abs(rewards[:, None] + discounts[:, None] * support) <= 10.0, axis=1)
    np.testing.assert_allclose((out @ support)[inside], (rewards + discounts * (probs @ support))[inside], atol=1e-4)


def test_terminal_projection_is_a_point_mass_split_between_neighbours():
    support = categorical_support(0.0, 4.0, 5)
    out = categorical_projection(support, jnp.full((5,), 0.2), jnp.asarray(2.25), jnp.asarray(0.0))
    np.testing.assert_allclose(np.asarray(out), [0, 0, 0.75, 0.25, 0], atol=1e-6)


def test_categorical_cross_entropy_gradient_reaches_only_the_prediction():
    logits = jnp.array([[0.1, 0.5, -0.3]])
    target = jnp.array([[0.2, 0.5, 0.3]])
    value, (g_logits, g_target) = jax.value_and_grad(lambda l, t: categorical_cross_entropy(l, t).sum(),
                                                     argnums=(0, 1))(logits, target)
    np.testing.assert_allclose(float(value), -np.sum(target * jax.nn.log_softmax(logits)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_logits), np.asarray(jax.nn.softmax(logits) - target), atol=1e-6)
    assert np.all(np.asarray(g_target) == 0)


def _quantile_loss_numpy(theta, target, kappa):
    n = theta.shape[-1]
    tau = (2 * np.arange(n) + 1) / (2 * n)
    u = target[:, None, :] - theta[:, :, None]
    if kappa == 0:
        h = np.abs(u)
    else:
        h = np.where(np.abs(u) <= kappa, 0.5 * u ** 2, kappa * (np.abs(u) - 0.5 * kappa))
    return (np.abs(tau[None, :, None] - (u < 0)) * h).mean(axis=2).sum(axis=1)


@pytest.mark.parametrize("kappa", [0.0, 1.0, 2.5])
def test_quantile_huber_loss_matches_numpy(kappa):
    rng = np.random.default_rng(1)
    theta, target = rng.normal(size=(16, 8)), rng.normal(scale=3.0, size=(16, 12))
    out = quantile_huber_loss(jnp.asarray(theta, jnp.float32), jnp.asarray(target, jnp.float32), kappa=kappa)
    np.testing.assert_allclose(np.asarray(out), _quantile_loss_numpy(theta, target, kappa), rtol=1e-5)


def test_quantile_loss_minimiser_is_the_quantiles_of_the_target():
    """Gradient descent on the (kappa = 0) quantile loss moves theta_i to the tau_i-quantiles of the target."""
    target = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4000)), jnp.float32)
    theta = jnp.zeros((1, 5))
    grad = jax.jit(jax.grad(lambda t: quantile_huber_loss(t, target, kappa=0.0).sum()))
    for _ in range(3000):
        theta = theta - 0.01 * grad(theta)
    expected = np.quantile(np.asarray(target[0]), np.asarray(quantile_midpoints(5)))
    np.testing.assert_allclose(np.asarray(theta[0]), expected, atol=0.02)
    np.testing.assert_allclose(np.asarray(huber(jnp.array([-3.0, 0.5]), 1.0)), [2.5, 0.125])


def test_bad_support_is_a_clear_error():
    with pytest.raises(ValueError, match="num_atoms"):
        categorical_support(1.0, 1.0, 51)
