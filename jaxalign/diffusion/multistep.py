"""The linear multistep predictor-corrector loop that UniPC, DC-Solver and DPM-Solver-v3 share.

All three solvers, once their coefficients are fixed by the timesteps (and, for DPM-Solver-v3, by the empirical
model statistics), are linear in the states and in a per-step quantity q_k = qa_k x_k + qb_k eps(x_k, t_k) that
is linear in the model output (the data prediction for UniPC and DC-Solver, Zhao et al. 2023, UniPC; the model's
part left after removing its linear term for DPM-Solver-v3, Zheng et al. 2023). So one scan
body serves them all: iteration k evaluates the model once at the predicted x_k (NFE = number of steps), then

1. corrector (when `use_c[k]`): x_k <- cx_c[k] x_{k-1} - sum_j w_c[k, j] F_j - k_c[k], from the corrected
   x_{k-1} and the buffer F = (q_k, q_{k-1}, ...), i.e. with the model output at the new point but without a new
   evaluation (UniC's trick, Zhao et al. 2023: the value evaluated here is reused by the next step);
2. compensation: q_k <- sum_j mix[k, j] F_j (the identity e_0 except for DC-Solver, which replaces the model
   output by a Lagrange extrapolation of the buffer, Zhao et al. 2024, DC-Solver);
3. predictor: x_{k+1} = cx_p[k] x_k - sum_j w_p[k, j] F_j - k_p[k].

Orders, warm-up steps and lower-order final steps live in the coefficients (zero weights on the buffer entries
an order does not use), so the body is the same for every step and each solver compiles once per number of
steps. The coefficients travel as traced arrays through `samplers.batched_solve`, which is what lets DC-Solver
differentiate the whole solve with respect to its compensation ratios.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.diffusion import samplers


class Coefficients(NamedTuple):
    """Per-step arrays, leading axis the M steps; P is the buffer length, `shape` a sample's shape."""

    qa: jax.Array    # (M,)
    qb: jax.Array    # (M,)
    use_c: jax.Array  # (M,) bool
    cx_c: jax.Array  # (M,)
    w_c: jax.Array   # (M, P)
    k_c: jax.Array   # (M, *shape)
    mix: jax.Array   # (M, P)
    cx_p: jax.Array  # (M,)
    w_p: jax.Array   # (M, P)
    k_p: jax.Array   # (M, *shape)


def _combine(w, buf):
    return jnp.tensordot(w, buf, axes=1)


def _solve_one(model_fn, schedule, x, ts, trajectory=False):
    """One sample; ts = (times (M + 1,), Coefficients). Returns x_M, or the corrected states (M + 1, *shape)."""
    times, co = ts
    buf = jnp.zeros((co.w_p.shape[1],) + x.shape, x.dtype)

    def body(carry, step):
        x, x_prev, buf = carry
        t, c = step
        q = c.qa * x + c.qb * model_fn(x, t)
        buf = jnp.concatenate([q[None], buf[:-1]])
        x = jnp.where(c.use_c, c.cx_c * x_prev - _combine(c.w_c, buf) - c.k_c, x)
        buf = buf.at[0].set(_combine(c.mix, buf))
        x_next = c.cx_p * x - _combine(c.w_p, buf) - c.k_p
        return (x_next, x, buf), x

    (x_last, _, _), states = jax.lax.scan(body, (x, x, buf), (times[:-1], co))
    return jnp.concatenate([states, x_last[None]]) if trajectory else x_last


def solve(model_fn, schedule, x_T, ts, coefficients: Coefficients, mesh=None, trajectory: bool = False):
    """Runs the loop over x_T's batch through `samplers.batched_solve` (jit + vmap + optional mesh). `ts` are the
    concrete, validated timesteps; the coefficients are cast to x_T's dtype so a float32 solve stays float32."""
    dtype = jnp.result_type(x_T)
    co = Coefficients(*(a if a.dtype == jnp.bool_ else a.astype(dtype) for a in map(jnp.asarray, coefficients)))
    return samplers.batched_solve(_solve_one, model_fn, schedule, x_T, (jnp.asarray(ts, dtype), co), mesh,
                                  trajectory=trajectory)


def identity_mix(steps: int, buffer: int):
    """(M, P) rows e_0: no compensation."""
    return jnp.zeros((steps, buffer)).at[:, 0].set(1.0)
