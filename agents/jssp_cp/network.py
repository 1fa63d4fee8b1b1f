"""The size-agnostic dispatching policy of Tassel, Gebser and Schekotihin (ICAPS 2023, Section 4.2) in Flax.

Input: the environment's `Observation` (agents/jssp_cp/env.py), with any leading batch axes.

1. Each job's window of its next operations ([is_fixed, start lower bound, duration, is_legal] per slot, plus a
   learned slot-position embedding) goes through self-attention over the slots; the slots are pooled (the first
   slot, the operation to decide now, concatenated with the mean and the job's features: its remaining work and
   operations relative to the other jobs') into one job embedding.
2. The job embeddings attend to each other over the unfinished jobs only; the machine-competition mask enters as a
   learned additive attention bias per head, so a job can weigh the jobs that want its next machine differently.
   No positional information is used across jobs: permuting the jobs permutes the outputs (equivariance), and a
   dummy (padding) job or a finished job is never attended to, so padding changes no real job's output.
3. A logit per job, a No-Op logit and a value, both from the mean embedding of the unfinished jobs.

Illegal actions get the logit `ILLEGAL` (a large finite negative): exp underflows to an exact 0 probability while
log-softmax, entropies and gradients stay finite (never -inf). The number of parameters does not depend on the
numbers of jobs or machines, so one set of parameters runs on any instance size.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from agents.jssp_cp.env import FEATURES, JOB_FEATURES, WINDOW, Observation

ILLEGAL = -1e9


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    dim: int = 64  # width of the operation and job embeddings and of every attention block (divisible by heads)
    heads: int = 4  # attention heads of every block; each learns its own machine-competition bias
    window_layers: int = 1  # self-attention blocks over each job's window of its next operations
    job_layers: int = 2  # attention blocks across the unfinished jobs, with the competition bias

    def __post_init__(self):
        for name in ("dim", "heads", "window_layers", "job_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"network.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.dim % self.heads:
            raise ValueError(f"network.dim={self.dim} must be divisible by network.heads={self.heads}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with an additive bias.
    q, k, v: [..., N, H, D]; bias: [..., H, N, N] (query, key). Returns [..., N, H, D]."""
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype) + bias
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(scores, axis=-1), v)


class Block(nn.Module):
    """A pre-norm transformer block: x + MHA(LN x, bias), then x + MLP(LN x)."""

    dim: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        head_dim = self.dim // self.heads
        y = nn.LayerNorm()(x)
        q, k, v = (nn.DenseGeneral((self.heads, head_dim), name=n)(y) for n in ("query", "key", "value"))
        x = x + nn.DenseGeneral(self.dim, axis=(-2, -1), name="out")(attend(q, k, v, bias))
        y = nn.LayerNorm()(x)
        return x + nn.Dense(self.dim)(nn.relu(nn.Dense(2 * self.dim)(y)))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x [..., N, D] over the N entries where mask [..., N]; zeros when none."""
    weights = mask.astype(x.dtype)[..., None]
    return (x * weights).sum(-2) / jnp.maximum(weights.sum(-2), 1.0)


class JobShopPolicy(nn.Module):
    """Observation -> (logits [..., J + 1] with illegal actions at ILLEGAL, value [...])."""

    config: NetworkConfig = NetworkConfig()

    @nn.compact
    def __call__(self, obs: Observation) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        window = obs.window.astype(jnp.float32)
        position = self.param("slot_position", nn.initializers.normal(0.02), (WINDOW, cfg.dim))
        x = nn.Dense(cfg.dim, name="embed")(window) + position  # [..., J, W, dim]
        no_bias = jnp.zeros((cfg.heads, WINDOW, WINDOW), jnp.float32)
        for i in range(cfg.window_layers):
            x = Block(cfg.dim, cfg.heads, name=f"window_{i}")(x, no_bias)
        h = nn.Dense(cfg.dim, name="pool")(
            jnp.concatenate([x[..., 0, :], x.mean(-2), obs.job.astype(jnp.float32)], axis=-1))

        jobs = obs.job_mask.shape[-1]
        active = obs.job_mask
        # A query attends to the unfinished jobs, and always to itself, so that no row is empty.
        visible = active[..., None, :] | jnp.eye(jobs, dtype=bool)
        competition_weight = self.param("competition_bias", nn.initializers.zeros, (cfg.heads,))
        bias = (jnp.where(visible, 0.0, ILLEGAL)[..., None, :, :]
                + competition_weight[:, None, None] * obs.competition.astype(jnp.float32)[..., None, :, :])
        for i in range(cfg.job_layers):
            h = Block(cfg.dim, cfg.heads, name=f"jobs_{i}")(h, bias)
        h = nn.LayerNorm(name="final_norm")(h)

        job_logits = nn.Dense(1, name="job_logit")(nn.relu(nn.Dense(cfg.dim, name="job_hidden")(h)))[..., 0]
        pooled = masked_mean(h, active)
        noop_logit = nn.Dense(1, name="noop_logit")(nn.relu(nn.Dense(cfg.dim, name="noop_hidden")(pooled)))
        value = nn.Dense(1, name="value")(nn.relu(nn.Dense(cfg.dim, name="value_hidden")(pooled)))[..., 0]
        logits = jnp.concatenate([job_logits, noop_logit], axis=-1)
        return jnp.where(obs.legal, logits, ILLEGAL), value


def init_params(key: jax.Array, network: JobShopPolicy, jobs: int = 3) -> dict:
    """Parameters from a dummy observation (jitted: Flax's eager init is slow); their shapes depend on no instance
    size."""
    obs = Observation(window=jnp.zeros((jobs, WINDOW, FEATURES), jnp.float32),
                      competition=jnp.zeros((jobs, jobs), bool), legal=jnp.ones(jobs + 1, bool),
                      job_mask=jnp.ones(jobs, bool), job=jnp.zeros((jobs, JOB_FEATURES), jnp.float32))
    return jax.jit(network.init)(key, obs)
