"""A Gaussian-mixture data distribution whose every diffusion quantity is closed-form, so samplers can be checked
against exact answers.

If x_0 ~ sum_k w_k N(mu_k, S_k) and x_t = alpha_t x_0 + sigma_t eps, then x_t ~ sum_k w_k N(alpha_t mu_k,
alpha_t^2 S_k + sigma_t^2 I) (a linear map of a Gaussian plus independent Gaussian noise), so the marginal density,
its score grad log p_t, the exact noise prediction eps* = -sigma_t grad log p_t (Song et al. 2021, score SDE; Lu et
al. 2022, eq. 2.4) and the exact data prediction E[x_0 | x_t] (Gaussian conditioning per component, weighted by the
posterior responsibilities) are all exact at every t. The probability-flow ODE driven by eps* transports p_T to p_t
exactly, which is what the samplers' order checks compare against.

`mmd2_to_mixture` is the squared MMD (Gretton et al. 2012, eq. 3) with a Gaussian kernel between samples and the
mixture itself, its expectations over the mixture in closed form (the Gaussian integral of a Gaussian kernel).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """weights (K,), means (K, d), covs (K, d, d) symmetric positive definite."""

    weights: jax.Array
    means: jax.Array
    covs: jax.Array

    @property
    def dim(self) -> int:
        return self.means.shape[-1]


def make_mixture(weights, means, covs) -> GaussianMixture:
    weights, means, covs = jnp.asarray(weights), jnp.asarray(means), jnp.asarray(covs)
    k, d = means.shape
    if weights.shape != (k,) or covs.shape != (k, d, d):
        raise ValueError(f"mixture shapes disagree: weights {weights.shape}, means {means.shape}, covs {covs.shape}")
    return GaussianMixture(weights / weights.sum(), means, covs)


def mixture_2d() -> GaussianMixture:
    """Four anisotropic, unequally weighted components: multimodal enough that a coarse solver visibly misplaces
    mass, smooth enough (component scales 0.15-0.5) that the exact score is not stiff at small t."""
    means = [[-1.5, -1.0], [1.5, -1.0], [0.0, 1.5], [1.0, 1.0]]
    covs = [[[0.25, 0.1], [0.1, 0.1]], [[0.1, -0.05], [-0.05, 0.2]], [[0.2, 0.0], [0.0, 0.05]], [[0.03, 0.0], [0.0, 0.03]]]
    return make_mixture([0.3, 0.3, 0.25, 0.15], means, covs)


def random_mixture(key, dim: int, components: int, scale: float = 0.3) -> GaussianMixture:
    """Means ~ N(0, I), covs = scale^2 (I + A A^T / dim) with A standard normal: well conditioned in any dimension."""
    k_w, k_m, k_a = jax.random.split(key, 3)
    a = jax.random.normal(k_a, (components, dim, dim))
    covs = scale**2 * (jnp.eye(dim) + a @ jnp.swapaxes(a, -1, -2) / dim)
    weights = jax.random.uniform(k_w, (components,), minval=0.5, maxval=1.5)
    return make_mixture(weights, jax.random.normal(k_m, (components, dim)), covs)


def marginal(mix: GaussianMixture, alpha, sigma) -> GaussianMixture:
    """The law of alpha x_0 + sigma eps."""
    eye = jnp.eye(mix.dim, dtype=mix.covs.dtype)
    return GaussianMixture(mix.weights, alpha * mix.means, alpha**2 * mix.covs + sigma**2 * eye)


def _component_terms(mix: GaussianMixture, x):
    """Per component: log w_k + log N(x; m_k, C_k) and the whitened residual C_k^{-1} (x - m_k)."""
    chol = jnp.linalg.cholesky(mix.covs)
    diff = x[None, :] - mix.means
    white = jax.vmap(lambda c, r: solve_triangular(c, r, lower=True))(chol, diff)
    precision_diff = jax.vmap(lambda c, w: solve_triangular(c, w, lower=True, trans=1))(chol, white)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_pdf = -0.5 * (jnp.sum(white**2, -1) + log_det + mix.dim * math.log(2.0 * math.pi))
    return jnp.log(mix.weights) + log_pdf, precision_diff


def log_prob(mix: GaussianMixture, x):
    """log p(x) for one point x (d,)."""
    joint, _ = _component_terms(mix, x)
    return jax.nn.logsumexp(joint)


def score(mix: GaussianMixture, x):
    """grad log p(x) = -sum_k r_k(x) C_k^{-1} (x - m_k), r the posterior responsibilities."""
    joint, precision_diff = _component_terms(mix, x)
    return -jax.nn.softmax(joint) @ precision_diff


def marginal_log_prob(mix, schedule, x, t):
    return log_prob(marginal(mix, schedule.alpha(t), schedule.sigma(t)), x)


def marginal_score(mix, schedule, x, t):
    return score(marginal(mix, schedule.alpha(t), schedule.sigma(t)), x)


def eps_prediction(mix, schedule, x, t):
    """The exact noise prediction E[eps | x_t] = -sigma_t grad log p_t(x_t)."""
    return -schedule.sigma(t) * marginal_score(mix, schedule, x, t)


def x0_prediction(mix, schedule, x, t):
    """The exact data prediction E[x_0 | x_t] = sum_k r_k (mu_k + alpha S_k C_k^{-1} (x - alpha mu_k)); computed from
    the posterior and not from (x + sigma^2 score) / alpha, which divides by a tiny alpha near t = T."""
    alpha = schedule.alpha(t)
    joint, precision_diff = _component_terms(marginal(mix, alpha, schedule.sigma(t)), x)
    posterior_means = mix.means + alpha * jnp.einsum("kij,kj->ki", mix.covs, precision_diff)
    return jax.nn.softmax(joint) @ posterior_means


def eps_model(mix: GaussianMixture, schedule):
    """model_fn(x, t) -> exact eps for one sample, in the samplers' interface. Build it once and reuse it: the
    samplers compile once per model_fn object."""
    return lambda x, t: eps_prediction(mix, schedule, x, t)


def sample(mix: GaussianMixture, key, n: int):
    """n exact samples (n, d)."""
    k_c, k_z = jax.random.split(key)
    comp = jax.random.choice(k_c, mix.weights.shape[0], (n,), p=mix.weights)
    z = jax.random.normal(k_z, (n, mix.dim), dtype=mix.means.dtype)
    chol = jnp.linalg.cholesky(mix.covs)[comp]
    return mix.means[comp] + jnp.einsum("nij,nj->ni", chol, z)


def sample_marginal(mix, schedule, key, n: int, t):
    """n exact samples of x_t (the samplers' x_T when drawn at t = T)."""
    return sample(marginal(mix, schedule.alpha(t), schedule.sigma(t)), key, n)


def _gauss_kernel_mean(diff, cov, bandwidth):
    """E k(x, y) for x - y ~ N(diff, cov), k = exp(-|x - y|^2 / (2 l^2)): (l^d / sqrt det(l^2 I + cov))
    exp(-diff^T (l^2 I + cov)^{-1} diff / 2)."""
    d = diff.shape[-1]
    c = bandwidth**2 * jnp.eye(d, dtype=cov.dtype) + cov
    _, log_det = jnp.linalg.slogdet(c)
    quad = jnp.sum(diff * jnp.linalg.solve(c, diff[..., None])[..., 0], -1)
    return jnp.exp(d * jnp.log(bandwidth) - 0.5 * log_det - 0.5 * quad)


def mmd2_to_mixture(samples, mix: GaussianMixture, bandwidth: float = 0.5):
    """Squared MMD between the empirical law of `samples` (n, d) and the mixture itself (no reference samples):
    the samples' term is the unbiased U-statistic (diagonal dropped), so its expectation is exactly 0 when the
    samples are i.i.d. from the mixture, and the two terms over the mixture are exact."""
    n = samples.shape[0]
    sq = jnp.sum((samples[:, None, :] - samples[None, :, :]) ** 2, -1)
    kxx = (jnp.sum(jnp.exp(-sq / (2 * bandwidth**2))) - n) / (n * (n - 1))
    kxy = jax.vmap(lambda x: mix.weights @ _gauss_kernel_mean(x - mix.means, mix.covs, bandwidth))(samples).mean()
    pair_cov = mix.covs[:, None] + mix.covs[None, :]
    pair_diff = mix.means[:, None] - mix.means[None, :]
    kyy = mix.weights @ _gauss_kernel_mean(pair_diff, pair_cov, bandwidth) @ mix.weights
    return kxx - 2.0 * kxy + kyy
