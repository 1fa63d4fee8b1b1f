"""DC-Solver (Zhao, Wang, Rao, Zhou, Lu 2024, "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via
Dynamic Compensation"): UniPC (`unipc`) whose model outputs are dynamically compensated.

UniPC's corrector reuses the model output evaluated at the *predicted* x_k, so the next step starts from a
corrected state with a model output that belongs to another point (the misalignment DC-Solver names). Dynamic
compensation replaces that output, before step k's predictor, by the Lagrange polynomial through the last
dc_order + 1 outputs (in t, as the official sampler does) evaluated at t_k rho_k + t_{k-1} (1 - rho_k): rho_k = 1
keeps the output, other ratios move it along the trajectory of outputs. The first dc_order steps, with too short a
history, are never compensated.

The ratios are fitted on a few ground-truth trajectories (`reference_trajectory`: the accurate RK4 solution of
the same model's probability-flow ODE through every timestep). The paper searches them step by step, each ratio
minimising that step's error to the ground truth; `fit_ratios` instead fits all of them at once by Adam on the
summed squared error of every intermediate state, differentiating through the whole jitted sampler (the
coefficients are traced inputs of `multistep.solve`). The cascade polynomial regression (CPR) of the paper
predicts the ratios of an unseen NFE from those fitted at a few NFEs: each ratio is a polynomial in the relative
step k / NFE whose coefficients are polynomials in the NFE (`fit_cpr`, `predict_ratios`; the paper's third
level, the guidance scale, does not exist for these unconditional models). Both levels are degree 2 as in the
official code; the two-level polynomial is linear in its 3 x 3 coefficients, so it is fitted by least squares.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.diffusion import multistep, samplers, unipc

DC_ORDER = 2  # the official sampler's Lagrange degree


def lagrange_mix(ts, ratios, dc_order: int, buffer: int):
    """(M, P) rows replacing q_k by the degree-dc_order Lagrange extrapolation in t of (q_k, q_{k-1}, ...) at
    t_k rho_k + t_{k-1} (1 - rho_k); identity rows for k < dc_order. Differentiable in `ratios` (M,)."""
    ts = jnp.asarray(ts, ratios.dtype)
    steps = ratios.shape[0]
    rows = [jnp.zeros(buffer, ratios.dtype).at[0].set(1.0) for _ in range(min(dc_order, steps))]
    for k in range(dc_order, steps):
        nodes = ts[k - jnp.arange(dc_order + 1)]
        t_star = ts[k] * ratios[k] + ts[k - 1] * (1.0 - ratios[k])
        weights = [jnp.prod(jnp.stack([(t_star - nodes[j]) / (nodes[i] - nodes[j])
                                       for j in range(dc_order + 1) if j != i])) for i in range(dc_order + 1)]
        rows.append(jnp.zeros(buffer, ratios.dtype).at[:dc_order + 1].set(jnp.stack(weights)))
    return jnp.stack(rows)


def _base(schedule, ts, order, variant, dc_order, shape):
    """UniPC's coefficients with a buffer long enough for the compensation."""
    return unipc.with_sample_shape(unipc.coefficients(schedule, ts, order, variant, buffer=dc_order + 1), shape)


def _compensated(base, ts, ratios, dc_order):
    return base._replace(mix=lagrange_mix(ts, ratios, dc_order, base.w_p.shape[1]))


def _check_ratios(ratios, steps):
    ratios = jnp.asarray(ratios)
    if ratios.shape != (steps,):
        raise ValueError(f"need one compensation ratio per step, shape ({steps},), got {ratios.shape}")
    return ratios


def dc_solver(model_fn, schedule, x_T, timesteps, ratios, order: int = 3, variant: str = "bh2",
              dc_order: int = DC_ORDER, mesh=None):
    """UniPC-`order` with dynamic compensation by `ratios` (one per step; all ones gives exactly `unipc.unipc`).
    NFE = number of steps."""
    unipc.check_options(order, variant)
    ts = samplers._check(model_fn, schedule, x_T, timesteps)
    ratios = _check_ratios(ratios, ts.shape[0] - 1)
    base = _base(schedule, ts, order, variant, dc_order, jnp.shape(x_T)[1:])
    co = _compensated(base, ts, ratios.astype(jnp.result_type(x_T)), dc_order)
    return multistep.solve(model_fn, schedule, x_T, ts, co, mesh)


def reference_trajectory(model_fn, schedule, x_T, timesteps, steps_per_interval: int = 200):
    """(M + 1, batch, ...) accurate states of the probability-flow ODE at every timestep (RK4 in lambda between
    consecutive timesteps, `samplers.reference_ode`, compiled once for all intervals)."""
    ts = samplers._check(model_fn, schedule, x_T, timesteps)
    states = [x_T]
    for s, t in zip(ts[:-1], ts[1:]):
        states.append(samplers.reference_ode(model_fn, schedule, states[-1], s, t, steps=steps_per_interval))
    return jnp.stack(states)


def _fit(model_fn, schedule, x_fit, ts_np, base, truth, ratios0, dc_order, iters, lr):
    """Adam on the ratios; only the compensation rows depend on them."""
    opt = optax.adam(lr)

    def loss(ratios):
        co = _compensated(base, ts_np, ratios, dc_order)
        traj = multistep.solve(model_fn, schedule, x_fit, ts_np, co, trajectory=True)  # (n, M + 1, ...)
        return jnp.mean(jnp.sum((jnp.swapaxes(traj, 0, 1)[1:] - truth[1:]) ** 2, axis=tuple(range(2, truth.ndim))))

    def step(carry, _):
        ratios, state = carry
        value, grad = jax.value_and_grad(loss)(ratios)
        updates, state = opt.update(grad, state)
        return (optax.apply_updates(ratios, updates), state), value

    (ratios, _), losses = jax.lax.scan(step, (ratios0, opt.init(ratios0)), None, length=iters)
    return ratios, losses, loss(ratios)


def fit_ratios(model_fn, schedule, x_fit, timesteps, order: int = 3, variant: str = "bh2",
               dc_order: int = DC_ORDER, iters: int = 100, lr: float = 0.02, steps_per_interval: int = 200):
    """Compensation ratios (M,) fitted on the trajectories from x_fit (a few samples of p_T): Adam from all-ones
    (plain UniPC) on the mean over samples of the summed squared distance of the sampler's intermediate states
    to `reference_trajectory`. Returns (ratios, final loss, loss at the start)."""
    unipc.check_options(order, variant)
    ts = samplers._check(model_fn, schedule, x_fit, timesteps)
    truth = reference_trajectory(model_fn, schedule, x_fit, ts, steps_per_interval)
    ones = jnp.ones(ts.shape[0] - 1, jnp.result_type(x_fit))
    base = _base(schedule, ts, order, variant, dc_order, jnp.shape(x_fit)[1:])
    fit = jax.jit(lambda m, x, b, tr, r0: _fit(m, schedule, x, ts, b, tr, r0, dc_order, iters, lr))
    ratios, losses, final = fit(samplers.as_traced(model_fn), x_fit, base, truth, ones)
    return ratios, float(final), float(losses[0])


class CPR(NamedTuple):
    """Cascade polynomial regression: ratio(k, NFE) = sum_{a, c} coeffs[a, c] (k / NFE)^a (NFE / nfe_scale)^c."""

    coeffs: np.ndarray
    nfe_scale: float
    dc_order: int


def _features(steps_idx, nfe, nfe_scale, degree):
    x, n = np.asarray(steps_idx, np.float64) / nfe, nfe / nfe_scale
    return np.stack([x**a * n**c for a in range(degree + 1) for c in range(degree + 1)], -1)


def fit_cpr(ratios_by_nfe: dict, dc_order: int = DC_ORDER, degree: int = 2) -> CPR:
    """Least-squares CPR coefficients from {NFE: fitted ratios (NFE,)} (the compensated steps k >= dc_order)."""
    if len(ratios_by_nfe) < degree + 1:
        raise ValueError(f"CPR of degree {degree} in the NFE needs ratios at >= {degree + 1} NFEs, got "
                         f"{sorted(ratios_by_nfe)}")
    scale = float(max(ratios_by_nfe))
    rows, targets = [], []
    for nfe, ratios in ratios_by_nfe.items():
        ratios = np.asarray(ratios, np.float64)
        if ratios.shape != (nfe,):
            raise ValueError(f"ratios for NFE {nfe} must have shape ({nfe},), got {ratios.shape}")
        k = np.arange(dc_order, nfe)
        rows.append(_features(k, nfe, scale, degree))
        targets.append(ratios[dc_order:])
    coeffs = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)[0]
    return CPR(coeffs.reshape(degree + 1, degree + 1), scale, dc_order)


def predict_ratios(cpr: CPR, nfe: int) -> np.ndarray:
    """The (NFE,) ratios CPR predicts for a possibly unseen NFE (ones on the uncompensated warm-up steps)."""
    degree = cpr.coeffs.shape[0] - 1
    ratios = np.ones(nfe)
    k = np.arange(cpr.dc_order, nfe)
    ratios[cpr.dc_order:] = _features(k, nfe, cpr.nfe_scale, degree) @ cpr.coeffs.reshape(-1)
    return ratios


def sample_with_fitted_ratios(model_fn, schedule, x_T, timesteps, order: int = 3, variant: str = "bh2",
                              fit_samples: int = 8, mesh=None):
    """DC-Solver as a self-contained sampler (what `samplers.sample('dc_solver', ...)` runs): the ratios are
    fitted on the trajectories of the first `fit_samples` rows of x_T (the paper fits on about ten), which costs
    reference-ODE evaluations beyond the NFE budget (a one-off search in the paper), then all of x_T is sampled
    with exactly NFE evaluations."""
    ratios, _, _ = fit_ratios(model_fn, schedule, x_T[:fit_samples], timesteps, order, variant)
    return dc_solver(model_fn, schedule, x_T, timesteps, ratios, order, variant, mesh=mesh)


samplers.register("dc_solver", 3, sample_with_fitted_ratios)
