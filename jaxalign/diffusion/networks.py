"""A small noise-prediction network for vectors, the denoising loss that trains it, and the adapter to the samplers.

- `VectorDenoiser`: a Flax linen MLP eps_theta(x_t, t) for x_t of shape [batch, dim]. The time enters through a
  sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5; the DDPM time embedding, Ho et al. 2020, App. B) of either
  1000 t (`embed="time"`, DDPM's integer-step scale) or the half log-SNR lambda_t = log(alpha_t / sigma_t)
  (`embed="logsnr"`, Kingma et al. 2021, VDM, conditions on the log-SNR), concatenated with x_t and passed through
  `depth` Dense + SiLU layers of width `hidden` and a final Dense to `dim` outputs.
- `denoising_loss`: the "simple" loss of Ho et al. 2020 (DDPM, eq. 14) in continuous time for a VP schedule
  (Song et al. 2021, score SDE, the VP SDE; Kingma et al. 2021, VDM, eq. 13 with a constant weight on eps):
  mean over the batch of ||eps_theta(alpha_t x_0 + sigma_t eps, t) - eps||^2 with t ~ U(t_min, t_max) and
  eps ~ N(0, I) drawn independently per sample (`noise_draws`). Its minimiser is eps* = E[eps | x_t], and its
  minimum, E ||eps - E[eps | x_t]||^2 = d - E ||eps*||^2, is the data's irreducible denoising error (which
  `jaxalign.diffusion.gmm.eps_model` attains exactly for a Gaussian mixture).
- `model_fn(apply_fn, params)`: the network as the samplers' one-sample `model_fn(x, t) -> eps`.

`apply_fn(params, x, t)` is any batched noise predictor ([batch, dim], [batch] -> [batch, dim]), e.g.
`VectorDenoiser(...).apply` with `params` its variables dict.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

EMBEDDINGS = ("time", "logsnr")


def sinusoidal_embedding(c, dim: int, max_period: float = 10000.0):
    """[sin(c f_i), cos(c f_i)] with f_i = max_period^(-i / (dim / 2)), i < dim / 2, for c of shape [batch]:
    [batch, dim] (the Transformer / DDPM position embedding; `dim` even)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=c.dtype) / half)
    angles = c[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class VectorDenoiser(nn.Module):
    """eps_theta(x_t, t) for vectors: x [batch, dim], t [batch] (or a scalar, broadcast) -> eps [batch, dim].
    `schedule` is needed only for `embed="logsnr"` (it maps t to lambda_t)."""

    hidden: int = 128
    depth: int = 3
    embed_dim: int = 32
    embed: str = "time"
    schedule: Any = None

    @nn.compact
    def __call__(self, x, t):
        if self.embed not in EMBEDDINGS:
            raise ValueError(f"embed must be one of {EMBEDDINGS}, got {self.embed!r}")
        if self.embed == "logsnr" and self.schedule is None:
            raise ValueError("embed='logsnr' needs a schedule (it embeds lambda_t)")
        if self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"embed_dim must be a positive even number, got {self.embed_dim!r}")
        if jnp.ndim(x) != 2:
            raise ValueError(f"x must be [batch, dim], got shape {jnp.shape(x)}")
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        c = 1000.0 * t if self.embed == "time" else self.schedule.lam(t).astype(x.dtype)
        h = jnp.concatenate([x, sinusoidal_embedding(c, self.embed_dim)], axis=-1)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(x.shape[-1])(h)


def noise_draws(schedule, x0, key, t_min: float = 1e-3):
    """(t [batch], eps [batch, dim]) the loss draws: t ~ U(t_min, schedule.t_max) from the first half of
    `jax.random.split(key)`, eps ~ N(0, I) from the second, in x0's dtype."""
    if jnp.ndim(x0) != 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be [batch, dim] with batch >= 1, got shape {jnp.shape(x0)}")
    if not 0.0 < t_min < schedule.t_max:
        raise ValueError(f"t_min must lie in (0, t_max={schedule.t_max}), got {t_min!r}")
    k_t, k_eps = jax.random.split(key)
    dtype = jnp.result_type(x0)
    t = jax.random.uniform(k_t, x0.shape[:1], dtype=dtype, minval=t_min, maxval=schedule.t_max)
    eps = jax.random.normal(k_eps, x0.shape, dtype=dtype)
    return t, eps


def denoising_loss(apply_fn: Callable, params, schedule, x0, key, t_min: float = 1e-3):
    """mean_i ||eps_theta(alpha_{t_i} x0_i + sigma_{t_i} eps_i, t_i) - eps_i||^2 (module docstring; draws from
    `noise_draws`). One ValueError for x0 not [batch, dim], t_min outside (0, t_max) or a network whose output
    is not x0's shape."""
    t, eps = noise_draws(schedule, x0, key, t_min)
    x_t = schedule.alpha(t)[:, None] * x0 + schedule.sigma(t)[:, None] * eps
    pred = apply_fn(params, x_t, t)
    if jnp.shape(pred) != jnp.shape(x0):
        raise ValueError(f"apply_fn must return eps of x0's shape {jnp.shape(x0)}, got {jnp.shape(pred)}")
    return jnp.mean(jnp.sum((pred - eps) ** 2, axis=-1))


@functools.cache
def _one_sample(apply_fn: Callable) -> Callable:
    """One function object per `apply_fn`, so that every `model_fn(apply_fn, params)` has the same static part and
    the samplers' executable is shared by all parameters of one network."""

    def one(params, x, t):
        return apply_fn(params, x[None], jnp.reshape(t, (1,)))[0]

    return one


def model_fn(apply_fn: Callable, params) -> jax.tree_util.Partial:
    """The samplers' one-sample `model_fn(x, t) -> eps` (x one sample of any shape, t scalar) of a batched
    `apply_fn(params, x, t)`, as a `jax.tree_util.Partial` whose `params` are traced inputs: the samplers compile
    once per network and sample shape, not once per set of parameters."""
    return jax.tree_util.Partial(_one_sample(apply_fn), params)


def batched(model: Callable) -> Callable:
    """A one-sample `model_fn(x, t)` (e.g. `gmm.eps_model`) as an `apply_fn(params, x, t)` over a batch (params
    ignored), so the exact noise prediction can stand in for the network in `denoising_loss`."""
    return lambda params, x, t: jax.vmap(model)(x, t)


__all__ = ["EMBEDDINGS", "VectorDenoiser", "batched", "denoising_loss", "model_fn", "noise_draws",
           "sinusoidal_embedding"]
