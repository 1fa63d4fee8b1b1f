"""Distributional RL building blocks: the C51 categorical projection and the quantile-regression Huber loss.

These are the pieces a distributional agent composes (see agents/distributional_dp); they take plain arrays and
know nothing of networks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def categorical_support(v_min: float, v_max: float, num_atoms: int) -> jax.Array:
    """The C51 support z_i = v_min + i (v_max - v_min) / (N - 1), i = 0..N-1."""
    if num_atoms < 2 or not v_max > v_min:
        raise ValueError(f"a categorical support needs num_atoms >= 2 and v_max > v_min; got num_atoms={num_atoms}, "
                         f"v_min={v_min}, v_max={v_max}")
    return jnp.linspace(v_min, v_max, num_atoms)


def categorical_projection(support: jax.Array, probs: jax.Array, rewards: jax.Array,
                           discounts: jax.Array) -> jax.Array:
    """Project the distribution of r + gamma Z onto `support` (Bellemare, Dabney & Munos 2017, "A Distributional
    Perspective on Reinforcement Learning", Algorithm 1).

    Z puts mass probs[..., j] on support[j]; the shifted atoms T z_j = clip(r + gamma z_j, v_min, v_max) are split
    between their two neighbouring atoms in proportion to proximity. With b_j = (T z_j - v_min) / dz,
    l = floor(b_j), u = ceil(b_j): m_l += p_j (u - b_j), m_u += p_j (b_j - l). Algorithm 1 as printed drops the
    mass of an atom landing exactly on a support point (l = u); here each target atom i receives
    p_j * max(0, 1 - |T z_j - z_i| / dz), which equals the two updates above when l < u and gives the whole p_j
    to z_l when l = u.

    Shapes: support [N] (uniformly spaced), probs [..., N], rewards and discounts [...] (discount = gamma times 0
    at terminal transitions). Returns the projected probabilities [..., N]; they sum to the input's total mass.
    """
    v_min, v_max = support[0], support[-1]
    delta = (v_max - v_min) / (support.shape[0] - 1)
    shifted = jnp.clip(rewards[..., None] + discounts[..., None] * support, v_min, v_max)  # [..., N_source]
    weights = jnp.clip(1.0 - jnp.abs(shifted[..., None, :] - support[:, None]) / delta, 0.0, 1.0)  # [..., Ni, Nj]
    return jnp.sum(weights * probs[..., None, :], axis=-1)


def categorical_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """The C51 loss: cross-entropy -sum_i m_i log p_i(s, a) between the projected target (no gradient) and the
    predicted distribution's logits [..., N]; returns [...]."""
    return -jnp.sum(jax.lax.stop_gradient(target_probs) * jax.nn.log_softmax(logits), axis=-1)


def quantile_midpoints(num_quantiles: int) -> jax.Array:
    """tau_hat_i = (2 i - 1) / (2 N), i = 1..N: the quantile levels QR-DQN's N outputs estimate (Dabney et al.
    2018, Lemma 2)."""
    return (2.0 * jnp.arange(num_quantiles) + 1.0) / (2.0 * num_quantiles)


def huber(u: jax.Array, kappa: float) -> jax.Array:
    """L_kappa(u) = u^2 / 2 if |u| <= kappa else kappa (|u| - kappa / 2) (Dabney et al. 2018, eq. 9); kappa = 0 is
    |u|."""
    abs_u = jnp.abs(u)
    if kappa == 0:
        return abs_u
    return jnp.where(abs_u <= kappa, 0.5 * jnp.square(u), kappa * (abs_u - 0.5 * kappa))


def quantile_huber_loss(predictions: jax.Array, targets: jax.Array, taus: jax.Array | None = None,
                        kappa: float = 1.0) -> jax.Array:
    """Quantile-regression Huber loss (Dabney, Rowland, Bellemare & Munos 2018, "Distributional Reinforcement
    Learning with Quantile Regression", eq. 9-10 and Algorithm 1):

        rho^kappa_tau(u) = |tau - 1{u < 0}| L_kappa(u)                  (eq. 10; L_0(u) = |u|, the pinball loss)
        loss = sum_i mean_j rho^kappa_{tau_i}(T theta_j - theta_i)      (Algorithm 1's output)

    predictions theta [..., N] (quantile estimates at levels `taus`, default the midpoints (2i-1)/(2N)), targets
    T theta [..., M] (no gradient flows into them). Returns [...]. (IQN, Dabney et al. 2018b eq. 3, divides by
    kappa as well; with the usual kappa = 1 the two agree.)
    """
    n = predictions.shape[-1]
    taus = quantile_midpoints(n) if taus is None else taus
    u = jax.lax.stop_gradient(targets)[..., None, :] - predictions[..., :, None]  # [..., N, M]
    weight = jnp.abs(taus[:, None] - (u < 0).astype(predictions.dtype))
    return jnp.sum(jnp.mean(weight * huber(u, kappa), axis=-1), axis=-1)
