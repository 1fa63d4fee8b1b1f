"""UniPC (Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): the multistep predictor UniP and the corrector UniC, with data prediction.

A step from s to t (h = lambda_t - lambda_s > 0) with the data predictions m_s, m_{s-1}, ... of earlier steps:

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m_s - alpha_t B(h) sum_i rho_i D_i,
    D_i = (m_{s-i} - m_s) / r_i,  r_i = (lambda_{s-i} - lambda_s) / h,

the first two terms being DPM-Solver++'s first-order step (Lu et al. 2022b, eq. 4.5). The predictor UniP-p uses
the p - 1 earlier points; its rho solve the Vandermonde system sum_i rho_i r_i^(j-1) = j! (-h) phi_{j+1}(-h) /
B(h), j = 1..p-1, with phi_1(z) = (e^z - 1) / z and phi_{k+1}(z) = (phi_k(z) - 1/k!) / z (UniPC's B(h)
formulation), except for p = 2 where the official sampler uses rho = 1/2. The corrector UniC adds the point t
itself (r = 1) with the model output evaluated at the predicted x_t, which the next step reuses, so it raises the
order by one for no extra evaluation; there is no corrector after the last step (the final state is never
evaluated), so NFE = steps.

`variant` picks B(h): 'bh1' (B = -h) or 'bh2' (B = e^{-h} - 1, the default here; UniPC recommends it unless the
step count is tiny). B cancels out of B rho wherever rho is solved for, so the variants differ only where
rho = 1/2 is fixed (the order-2 predictor and the order-1 corrector). The first steps warm up with the available
history (order min(order, k + 1)); with fewer than 10 steps the last steps lower their order
(`lower_order_final`, as DPM-Solver++ and UniPC do for stability).

The loop itself is `multistep`'s shared predictor-corrector scan; this module builds its coefficients (numpy,
float64, from the concrete timesteps).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.diffusion import multistep, samplers

VARIANTS = ("bh1", "bh2")


@functools.partial(jax.jit, static_argnums=0)
def _schedule_values(schedule, t):
    return schedule.lam(t), schedule.alpha(t), schedule.sigma(t)


def schedule_values(schedule, ts):
    """(lambda, alpha, sigma) at the timesteps, float64 numpy whatever the caller's x64 setting (one compiled
    call: op-by-op evaluation would compile every op anew for each number of steps)."""
    with jax.default_device(jax.devices("cpu")[0]), jax.enable_x64(True):
        return tuple(np.asarray(v, np.float64) for v in _schedule_values(schedule, jnp.asarray(ts, jnp.float64)))


def step_orders(steps: int, order: int, lower_order_final: bool = True) -> tuple[int, ...]:
    """Warm-up with the history available, then `order`; lower orders at the end when steps < 10."""
    orders = [min(order, k + 1) for k in range(steps)]
    if lower_order_final and steps < 10:
        orders = [min(p, steps - k) for k, p in enumerate(orders)]
    return tuple(orders)


def _rhos(lam_s, lam_prev, lam_t, variant):
    """UniPC's (rho_predictor, rho_corrector, B(h), e^{-h} - 1, r) for one step from s to t with the earlier
    lambdas lam_prev (most recent first)."""
    h = lam_t - lam_s
    hh = -h  # data prediction integrates e^{-lambda}-weighted terms
    p = len(lam_prev) + 1
    r = np.array([(lp - lam_s) / h for lp in lam_prev] + [1.0])
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, rhs, h_phi_k, factorial = [], [], h_phi_1 / hh - 1.0, 1.0
    for j in range(1, p + 1):
        rows.append(r ** (j - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r, rhs = np.stack(rows), np.array(rhs)
    rho_p = np.array([0.5]) if p == 2 else (np.linalg.solve(big_r[:-1, :-1], rhs[:-1]) if p > 2 else np.zeros(0))
    rho_c = np.array([0.5]) if p == 1 else np.linalg.solve(big_r, rhs)
    return rho_p, rho_c, b_h, h_phi_1, r


def coefficients(schedule, ts, order: int = 3, variant: str = "bh2", lower_order_final: bool = True,
                 buffer: int | None = None) -> multistep.Coefficients:
    """UniPC's per-step coefficients for `multistep.solve` (buffer = order + 1 model outputs unless larger)."""
    lam, alpha, sigma = schedule_values(schedule, ts)
    steps = len(ts) - 1
    buffer = max(order + 1, buffer or 0)
    orders = step_orders(steps, order, lower_order_final)
    w_p, w_c = np.zeros((steps, buffer)), np.zeros((steps, buffer))
    cx_p, cx_c = np.zeros(steps), np.zeros(steps)
    for k, p in enumerate(orders):
        rho_p, rho_c, b_h, h_phi_1, r = _rhos(lam[k], [lam[k - i] for i in range(1, p)], lam[k + 1], variant)
        a_t = alpha[k + 1]
        # predictor at iteration k on the buffer (m_k, m_{k-1}, ...)
        cx_p[k] = sigma[k + 1] / sigma[k]
        w_p[k, 0] = a_t * (h_phi_1 - b_h * np.sum(rho_p / r[:-1]))
        w_p[k, 1:p] = a_t * b_h * rho_p / r[:-1]
        # corrector of x_{k+1} at iteration k + 1 on the buffer (m_{k+1}, m_k, m_{k-1}, ...)
        if k + 1 < steps:
            cx_c[k + 1] = sigma[k + 1] / sigma[k]
            w_c[k + 1, 0] = a_t * b_h * rho_c[-1]
            w_c[k + 1, 1] = a_t * (h_phi_1 - b_h * (np.sum(rho_c[:-1] / r[:-1]) + rho_c[-1]))
            w_c[k + 1, 2:p + 1] = a_t * b_h * rho_c[:-1] / r[:-1]
    zeros = np.zeros((steps,))
    return multistep.Coefficients(
        qa=1.0 / alpha[:-1], qb=-sigma[:-1] / alpha[:-1], use_c=jnp.arange(steps) >= 1, cx_c=cx_c, w_c=w_c,
        k_c=zeros, mix=multistep.identity_mix(steps, buffer), cx_p=cx_p, w_p=w_p, k_p=zeros)


def check_options(order, variant):
    if order not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1, 2, 3 or 4, got {order!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; expected one of {VARIANTS}")


def with_sample_shape(co: multistep.Coefficients, shape) -> multistep.Coefficients:
    """Broadcast the constant terms (zero for UniPC) to a sample's shape."""
    steps = co.cx_p.shape[0]
    return co._replace(k_c=jnp.zeros((steps,) + tuple(shape)), k_p=jnp.zeros((steps,) + tuple(shape)))


def unipc(model_fn, schedule, x_T, timesteps, order: int = 3, variant: str = "bh2", lower_order_final: bool = True,
          mesh=None):
    """UniPC-`order` (UniP-`order` predictor, UniC corrector); NFE = number of steps."""
    check_options(order, variant)
    ts = samplers._check(model_fn, schedule, x_T, timesteps)
    co = with_sample_shape(coefficients(schedule, ts, order, variant, lower_order_final), jnp.shape(x_T)[1:])
    return multistep.solve(model_fn, schedule, x_T, ts, co, mesh)


samplers.register("unipc", 3, unipc)
