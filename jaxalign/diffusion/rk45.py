"""An adaptive reference solver of the probability-flow ODE: Dormand-Prince 5(4) (Dormand and Prince 1980, "A
family of embedded Runge-Kutta formulae"; the tableau as in Hairer, Norsett and Wanner, Solving Ordinary
Differential Equations I) in lambda on y = x / alpha, dy/dlambda = -e^{-lambda} eps(alpha y, t(lambda)) (the
equation `samplers.reference_ode` integrates with fixed RK4 steps), with the standard error control: a step is
accepted when the RMS of the embedded error over atol + rtol max(|y|, |y_new|) is at most 1, and the next step is
the current one times 0.9 err^{-1/5}, clipped to [0.2, 10]. The fifth-order solution is propagated (local
extrapolation) and the last stage of an accepted step is the first of the next (FSAL), so a step costs 6
evaluations, rejected ones included.

Each sample adapts its own steps (a `lax.while_loop` under vmap: finished samples idle until the last one is
done) and reports its own number of function evaluations.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.diffusion import samplers

_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_B5 = np.array(_A[6] + [0.0])
_B4 = np.array([5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])
_E = _B5 - _B4


def _rk45_solve(model_fn, schedule, x, ts, rtol, atol, first_step, max_steps):
    """One sample from ts[0] to ts[1]; returns (x at ts[1], NFE)."""
    lam0, lam1 = schedule.lam(ts[0]), schedule.lam(ts[1])

    def rhs(y, lam):
        t = schedule.t_of_lambda(lam)
        return -jnp.exp(-lam) * model_fn(schedule.alpha(t) * y, t)

    def attempt(y, k1, lam, h):
        ks = [k1]
        for i in range(1, 7):
            yi = y + h * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
            ks.append(rhs(yi, lam + _C[i] * h))
        y_new = y + h * sum(b * k for b, k in zip(_B5, ks) if b != 0.0)
        err = h * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
        return y_new, ks[6], jnp.sqrt(jnp.mean((err / scale) ** 2))

    def cond(c):
        return (c["lam"] < lam1) & (c["steps"] < max_steps)

    def body(c):
        h = jnp.minimum(c["h"], lam1 - c["lam"])
        y_new, k7, err = attempt(c["y"], c["k1"], c["lam"], h)
        ok = err <= 1.0
        factor = jnp.clip(0.9 * jnp.where(err > 0, err, 1e-10) ** -0.2, 0.2, 10.0)
        # landing exactly on lam1 ends the loop; an accepted step's last stage is the next first stage (FSAL)
        lam = jnp.where(ok, jnp.where(h == lam1 - c["lam"], lam1, c["lam"] + h), c["lam"])
        return {"y": jnp.where(ok, y_new, c["y"]), "k1": jnp.where(ok, k7, c["k1"]), "lam": lam, "h": h * factor,
                "nfe": c["nfe"] + 6, "steps": c["steps"] + 1}

    y0 = x / schedule.alpha(ts[0])
    init = {"y": y0, "k1": rhs(y0, lam0), "lam": lam0, "h": (lam1 - lam0) * first_step, "nfe": jnp.int32(1),
            "steps": jnp.int32(0)}
    out = jax.lax.while_loop(cond, body, init)
    return schedule.alpha(ts[1]) * out["y"], out["nfe"]


def rk45(model_fn, schedule, x_T, t_start: float | None = None, t_end: float = 1e-3, rtol: float = 1e-8,
         atol: float = 1e-8, first_step: float = 0.01, max_steps: int = 100_000, mesh=None):
    """(x at t_end, NFE per sample) from x_T at t_start (default t_max). `first_step` is the first trial step as a
    fraction of the lambda range; `max_steps` bounds the attempts (a sample that hits it stops early)."""
    t_start = schedule.t_max if t_start is None else t_start
    ts = samplers._check(model_fn, schedule, x_T, [t_start, t_end])
    if not (rtol > 0 and atol > 0 and 0 < first_step <= 1 and max_steps >= 1):
        raise ValueError(f"need rtol > 0, atol > 0, 0 < first_step <= 1, max_steps >= 1, got rtol={rtol}, "
                         f"atol={atol}, first_step={first_step}, max_steps={max_steps}")
    return samplers.batched_solve(_rk45_solve, model_fn, schedule, x_T, jnp.asarray(ts, jnp.result_type(x_T)), mesh,
                                  rtol=float(rtol), atol=float(atol), first_step=float(first_step),
                                  max_steps=int(max_steps))
