"""jaxalign.diffusion.networks: the denoising loss and the VectorDenoiser against a NumPy computation of the same
draws, the loss of the exact mixture noise prediction against the mixture's irreducible denoising error, the
adapter to the samplers, and one ValueError per invalid input. All in float64."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.diffusion import gmm, networks, samplers
from jaxalign.diffusion.schedules import CosineVP, LinearVP


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _np_alpha_sigma_linear(t, beta_min=0.1, beta_max=20.0):
    log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    alpha = np.exp(log_alpha)
    return alpha, np.sqrt(1.0 - alpha**2)


def _np_denoiser(variables, x, t, embed_dim, depth):
    """VectorDenoiser(embed='time') in NumPy from its parameters."""
    p = {k: {n: np.asarray(v) for n, v in layer.items()} for k, layer in variables["params"].items()}
    half = embed_dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    angles = (1000.0 * t)[:, None] * freqs[None, :]
    h = np.concatenate([x, np.sin(angles), np.cos(angles)], axis=-1)
    for i in range(depth):
        z = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        h = z / (1.0 + np.exp(-z))
    return h @ p[f"Dense_{depth}"]["kernel"] + p[f"Dense_{depth}"]["bias"]


def test_loss_and_network_match_numpy_on_the_same_draws():
    sch = LinearVP()
    net = networks.VectorDenoiser(hidden=16, depth=2, embed_dim=8)
    variables = net.init(jax.random.PRNGKey(1), jnp.zeros((1, 3)), jnp.ones((1,)))
    x0 = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (64, 3)))
    key = jax.random.PRNGKey(3)
    loss = float(networks.denoising_loss(net.apply, variables, sch, jnp.asarray(x0), key, t_min=0.01))

    k_t, k_eps = jax.random.split(key)  # the draws the loss documents: t from the first key, eps from the second
    t = np.asarray(jax.random.uniform(k_t, (64,), jnp.float64, minval=0.01, maxval=1.0))
    eps = np.asarray(jax.random.normal(k_eps, (64, 3), jnp.float64))
    assert 0.01 <= t.min() and t.max() <= 1.0 and t.std() > 0.2  # per-sample times, spread over the range
    alpha, sigma = _np_alpha_sigma_linear(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    pred = _np_denoiser(variables, x_t, t, embed_dim=8, depth=2)
    np.testing.assert_allclose(np.asarray(net.apply(variables, jnp.asarray(x_t), jnp.asarray(t))), pred, rtol=1e-10,
                               atol=1e-12)
    expected = np.mean(np.sum((pred - eps) ** 2, axis=-1))
    assert loss == pytest.approx(expected, rel=1e-10)
    # A different key draws different noise: the loss is not a constant.
    assert float(networks.denoising_loss(net.apply, variables, sch, jnp.asarray(x0), jax.random.PRNGKey(4),
                                         t_min=0.01)) != pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("sch", [LinearVP(), CosineVP()], ids=["linear", "cosine"])
def test_exact_mixture_eps_attains_the_irreducible_error_and_beats_a_random_network(sch):
    mix, n, t_min = gmm.mixture_2d(), 40_000, 1e-3
    exact = networks.batched(gmm.eps_model(mix, sch))
    k_x, k_loss, k_x2, k_noise2, k_net = jax.random.split(jax.random.PRNGKey(0), 5)
    x0 = gmm.sample(mix, k_x, n)
    loss_exact = float(networks.denoising_loss(exact, None, sch, x0, k_loss, t_min))

    # Independent estimate of E||eps - E[eps|x_t]||^2 = d - E||eps*(x_t)||^2 on fresh draws.
    x0_2 = gmm.sample(mix, k_x2, n)
    t2, eps2 = networks.noise_draws(sch, x0_2, k_noise2, t_min)
    x_t2 = sch.alpha(t2)[:, None] * x0_2 + sch.sigma(t2)[:, None] * eps2
    irreducible = 2.0 - float(jnp.mean(jnp.sum(jax.vmap(gmm.eps_model(mix, sch))(x_t2, t2) ** 2, -1)))
    assert loss_exact == pytest.approx(irreducible, abs=0.03)

    # Knowing the component can only help: the within-component error E_t sum_k w_k (d - sigma^2 tr C_k^{-1}),
    # C_k = alpha^2 S_k + sigma^2 I, is a lower bound (here by quadrature in t); it is below, not equal (the
    # responsibilities are uncertain), and the loss is far below the trivial predictor's d = 2.
    ts = jnp.linspace(t_min, sch.t_max, 4001)
    covs = sch.alpha(ts)[:, None, None, None] ** 2 * mix.covs + sch.sigma(ts)[:, None, None, None] ** 2 * jnp.eye(2)
    within = 2.0 - sch.sigma(ts)[:, None] ** 2 * jnp.trace(jnp.linalg.inv(covs), axis1=-2, axis2=-1)
    bound = float(jnp.mean(within @ mix.weights))
    assert bound < loss_exact - 0.01 and loss_exact < 1.0

    net = networks.VectorDenoiser(hidden=32, depth=2)
    params = net.init(k_net, jnp.zeros((1, 2)), jnp.ones((1,)))
    assert float(networks.denoising_loss(net.apply, params, sch, x0, k_loss, t_min)) > loss_exact + 0.2


def test_model_fn_adapts_the_network_to_the_samplers():
    sch = LinearVP()
    for embed in networks.EMBEDDINGS:
        net = networks.VectorDenoiser(hidden=16, depth=1, embed=embed, schedule=sch)
        params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,)))
        model = networks.model_fn(net.apply, params)
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
        t = jnp.linspace(0.1, 0.9, 5)
        one_at_a_time = jnp.stack([model(x[i], t[i]) for i in range(5)])
        np.testing.assert_allclose(one_at_a_time, net.apply(params, x, t), rtol=1e-12)
        out = samplers.sample("dpm_solver_pp_2m", model, sch, x, 4)
        assert out.shape == (5, 2) and bool(jnp.all(jnp.isfinite(out)))
    time_net = networks.VectorDenoiser(hidden=16, depth=1)
    logsnr_net = networks.VectorDenoiser(hidden=16, depth=1, embed="logsnr", schedule=sch)
    x, t = jnp.ones((2, 2)), jnp.array([0.2, 0.7])
    params = time_net.init(jax.random.PRNGKey(0), x, t)
    assert not np.allclose(time_net.apply(params, x, t), logsnr_net.apply(params, x, t))  # conditions differ


def test_invalid_inputs_are_one_value_error_each():
    sch = LinearVP()
    net = networks.VectorDenoiser(hidden=8, depth=1)
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,)))
    key, x0 = jax.random.PRNGKey(0), jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"x0 must be \[batch, dim\].*shape \(4,\)"):
        networks.denoising_loss(net.apply, params, sch, jnp.ones((4,)), key)
    with pytest.raises(ValueError, match=r"t_min must lie in \(0, t_max=1.0\), got 0.0"):
        networks.denoising_loss(net.apply, params, sch, x0, key, t_min=0.0)
    with pytest.raises(ValueError, match=r"t_min must lie in \(0, t_max=0.9946\), got 0.9946"):
        networks.denoising_loss(net.apply, params, CosineVP(), x0, key, t_min=0.9946)
    with pytest.raises(ValueError, match=r"apply_fn must return eps of x0's shape \(4, 2\), got \(4, 3\)"):
        networks.denoising_loss(lambda p, x, t: jnp.ones((4, 3)), params, sch, x0, key)
    with pytest.raises(ValueError, match=r"embed must be one of \('time', 'logsnr'\), got 'sigma'"):
        networks.VectorDenoiser(embed="sigma").init(key, x0, jnp.ones((4,)))
    with pytest.raises(ValueError, match="embed='logsnr' needs a schedule"):
        networks.VectorDenoiser(embed="logsnr").init(key, x0, jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"embed_dim must be a positive even number, got 7"):
        networks.VectorDenoiser(embed_dim=7).init(key, x0, jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"x must be \[batch, dim\], got shape \(2, 2, 2\)"):
        net.apply(params, jnp.ones((2, 2, 2)), jnp.ones((2,)))
    with pytest.raises(ValueError, match=r"x must be \[batch, dim\], got shape \(1, 4, 2\)"):
        networks.model_fn(net.apply, params)(x0, 0.5)  # one sample of a vector network is [dim]
