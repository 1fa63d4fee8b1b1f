"""DPM-Solver-v3 (Zheng, Lu, Bao, Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics"): a multistep exponential-integrator solver whose parameterisation is fitted to the model through
three empirical model statistics (EMS) l_lambda, s_lambda, b_lambda on a grid of lambda = log(alpha / sigma).

With y = x / alpha the probability-flow ODE is dy/dlambda = -sigma eps(x, lambda) / alpha (Lu et al. 2022,
DPM-Solver, eq. 3.4 differentiated). Writing sigma eps = l_lambda x + alpha f turns it into
dy/dlambda = -l y - f, whose linear part is solved exactly with L = int l:

    y_t = e^{L_s - L_t} (y_s - int_s^t e^{L_r - L_s} f_r dr).

l is the multiplier that makes the remainder f as little dependent on x as possible: the least-squares fit of the
model's Jacobian by a multiple of the identity, l_lambda = E tr(d(sigma eps)/dx) / D over x ~ p_lambda. Along a
trajectory, f is then regressed on itself, df/dlambda ~ s_lambda f + b_lambda (s a scalar, b of a sample's
shape, least squares over the samples at each lambda), and with S = int s and
G_s(r) = int_s^r e^{S_s - S_u} b_u du the quantity g_r = e^{S_s - S_r} f_r - G_s(r) is nearly constant in r:
its derivative is e^{S_s - S_r} (f' - s f - b). So

    y_t = e^{L_s - L_t} (y_s - sum_n A_n g^(n)_s / n! * n! - int_s^t e^{Phi(r)} G_s(r) dr),
    A_n = int_s^t e^{Phi(r)} (r - lambda_s)^n dr,  Phi(r) = L_r + S_r - L_s - S_s,

with the derivatives g^(n) estimated from the previous steps' g (multistep; the Vandermonde solve of a Taylor
expansion, or the paper's pseudo-order estimate that takes the n-th divided difference times n! instead). The
rewrite is exact for *any* l, s, b, so the solver keeps its order whatever the statistics; good statistics make
g flatter and the low-NFE error smaller. The corrector is the same update from the previous point with the new
model value included, of the predictor's order, or one order higher with the pseudo-order estimate
(`corrector_pseudo`, the official sampler's pseudo-corrector; on the mixture of `gmm` the plain corrector is the
more accurate one at 5-80 NFE and keeps the convergence order, so it is the default). Like the official sampler,
the corrector keeps the nonlinear part sigma eps - l x of the new value fixed while it moves x, which leaves f
unchanged. NFE = number of steps.

Statistics are piecewise linear in lambda between the grid nodes; L and S are their exact integrals and the other
integrals (A_n, the nested int e^Phi G, G at the history points) are computed per step by Gauss-Legendre panels
that break at every grid node, so they are accurate to rounding whatever the timesteps (the official sampler
instead snaps the timesteps to its 1200-point grid and uses the trapezoid rule). `compute_ems` evaluates l
exactly with D Jacobian-vector products per sample (the D-dimensional vector models of this package; large
models would need a stochastic trace estimate instead), and df/dlambda, which needs dl/dlambda too, with JVPs
along the ODE's velocity dx/dlambda = sigma^2 x - sigma eps.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.diffusion import multistep, samplers, unipc


class EMS(NamedTuple):
    """Empirical model statistics on an increasing lambda grid: lam (K+1,), l (K+1,), s (K+1,), b (K+1, *shape)."""

    lam: jax.Array
    l: jax.Array  # noqa: E741 - the paper's name
    s: jax.Array
    b: jax.Array


# ---------------------------------------------------------------- EMS from the model


def _lam_sigma2_alpha(lam):
    """sigma^2 = 1 / (1 + e^{2 lambda}) and alpha = sqrt(1 - sigma^2) for a VP schedule."""
    return jax.nn.sigmoid(-2.0 * lam), jnp.sqrt(jax.nn.sigmoid(2.0 * lam))


def _trajectory_one(model_fn, schedule, x, ts, substeps):
    """States at every grid time from x at ts[0]: RK4 with `substeps` steps in lambda per grid interval."""
    def body(x, st):
        x = samplers._rk4_solve(model_fn, schedule, x, st, substeps)
        return x, x

    return jnp.concatenate([x[None], jax.lax.scan(body, x, jnp.stack([ts[:-1], ts[1:]], -1))[1]])


def _pointwise_one(model_fn, schedule, xs, lams):
    """Per grid point for one sample's states xs (K+1, *shape): sigma eps, tr d(sigma eps)/dx, and the total
    lambda-derivatives of both along the ODE (JVPs with the tangent (dx/dlambda, 1))."""
    def n_fn(x, lam):
        t = schedule.t_of_lambda(lam)
        return schedule.sigma(t) * model_fn(x, t)

    def trace(x, lam):
        flat = x.reshape(-1)
        column = lambda e: jax.jvp(lambda z: n_fn(z.reshape(x.shape), lam).reshape(-1), (flat,), (e,))[1] @ e
        return jnp.sum(jax.vmap(column)(jnp.eye(flat.shape[0], dtype=x.dtype)))

    def one(x, lam):
        sigma2, _ = _lam_sigma2_alpha(lam)
        n0 = n_fn(x, lam)
        tangent = (sigma2 * x - n0, jnp.ones_like(lam))
        _, dn = jax.jvp(n_fn, (x, lam), tangent)
        tr, dtr = jax.jvp(trace, (x, lam), tangent)
        return n0, dn, tr, dtr

    # sequential over the grid points (vmapped over the samples by batched_solve): one vmap over all (sample,
    # grid point) pairs ran more than 15 times slower on CPU at 200 x 200 than at 64 x 100
    return jax.lax.map(lambda a: one(*a), (xs, lams))


@jax.jit
def _statistics(lam, xs, n, dn, tr, dtr):
    """EMS from per-sample quantities (n, K+1, *shape): l from the traces (and its lambda-derivative from theirs:
    the ODE transports p_lambda, so d/dlambda E tr = E d tr/dlambda along the trajectories), then s and b by
    least squares."""
    axes = tuple(range(2, xs.ndim))
    bshape = lambda a: a.reshape(a.shape + (1,) * len(axes))
    dim = math.prod(xs.shape[2:])
    l = jnp.mean(tr, 0) / dim  # noqa: E741
    dl = jnp.mean(dtr, 0) / dim
    sigma2, alpha = _lam_sigma2_alpha(lam)
    velocity = bshape(sigma2) * xs - n
    f = (n - bshape(l) * xs) / bshape(alpha)
    df = (dn - bshape(dl) * xs - bshape(l) * velocity) / bshape(alpha) - bshape(sigma2) * f
    f_mean, df_mean = jnp.mean(f, 0), jnp.mean(df, 0)
    fc, dfc = f - f_mean, df - df_mean
    num, den = jnp.sum(fc * dfc, (0,) + axes), jnp.sum(fc * fc, (0,) + axes)
    s = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)  # no spread (one sample): no regression
    return EMS(lam, l, s, df_mean - bshape(s) * f_mean)


def compute_ems(model_fn, schedule, samples, grid, from_data: bool = False, key=None, substeps: int = 4,
                mesh=None) -> EMS:
    """The EMS of `model_fn` on the lambda values of `grid` (a strictly decreasing array of times, like
    timesteps; the statistics are stored on the increasing lambda grid).

    `samples` (n, *shape), n >= 2, are x at grid[0] whose trajectories the model's own probability-flow ODE
    carries through the grid (RK4, `substeps` per interval), or with `from_data` data samples x_0 noised at each
    grid point with one fixed noise per sample (`key`). The statistics are then, at each grid point, the averages
    and the least-squares fits the module docstring defines, over the n states."""
    ts = samplers._check(model_fn, schedule, samples, grid)
    if jnp.shape(samples)[0] < 2:
        raise ValueError(f"the EMS regressions need at least 2 samples, got {jnp.shape(samples)[0]}")
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    dtype = jnp.result_type(samples)
    ts_x = jnp.asarray(ts, dtype)
    lam = schedule.lam(ts_x)
    if from_data:
        if key is None:
            raise ValueError("from_data needs a PRNG key for the noise")
        noise = jax.random.normal(key, jnp.shape(samples), dtype)
        _, alpha = _lam_sigma2_alpha(lam)
        sigma = jnp.sqrt(jax.nn.sigmoid(-2.0 * lam))
        expand = (slice(None), None) + (None,) * (jnp.ndim(samples) - 1)
        xs = jnp.swapaxes(alpha[expand] * samples[None] + sigma[expand] * noise[None], 0, 1)
    else:
        xs = samplers.batched_solve(_trajectory_one, model_fn, schedule, samples, ts_x, mesh, substeps=substeps)
    return _statistics(lam, xs, *samplers.batched_solve(_pointwise_one, model_fn, schedule, xs, lam, mesh))


# ---------------------------------------------------------------- integrals of the (piecewise-linear) EMS

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


class _Tables:
    """The EMS as piecewise-linear functions of lambda (numpy float64) and the exact integrals L, S."""

    def __init__(self, ems: EMS, panel_width: float):
        self.lam = np.asarray(ems.lam, np.float64)
        self.l, self.s = np.asarray(ems.l, np.float64), np.asarray(ems.s, np.float64)
        self.b = np.asarray(ems.b, np.float64).reshape(self.lam.shape[0], -1)
        self.width = panel_width
        seg = np.diff(self.lam)
        self.cum_l = np.concatenate([[0.0], np.cumsum(0.5 * seg * (self.l[1:] + self.l[:-1]))])
        self.cum_s = np.concatenate([[0.0], np.cumsum(0.5 * seg * (self.s[1:] + self.s[:-1]))])

    def _index(self, r):
        return np.clip(np.searchsorted(self.lam, r, side="right") - 1, 0, self.lam.shape[0] - 2)

    def _cum(self, values, cum, r):
        r = np.asarray(r, np.float64)
        i = self._index(r)
        return cum[i] + 0.5 * (r - self.lam[i]) * (values[i] + np.interp(r, self.lam, values))

    def big_l(self, r):
        return self._cum(self.l, self.cum_l, r)

    def big_s(self, r):
        return self._cum(self.s, self.cum_s, r)

    def l_at(self, r):
        return np.interp(r, self.lam, self.l)

    def b_at(self, r):
        """(r.shape + (D,)) linear interpolation of b."""
        r = np.asarray(r, np.float64)
        i = self._index(r)
        w = ((r - self.lam[i]) / (self.lam[i + 1] - self.lam[i]))[..., None]
        return (1.0 - w) * self.b[i] + w * self.b[i + 1]

    def panels(self, a, c):
        """Panel boundaries from a to c (a < c): every grid node in between, then split to at most `width`."""
        knots = np.concatenate([[a], self.lam[(self.lam > a) & (self.lam < c)], [c]])
        pieces = [np.linspace(u, v, max(1, math.ceil((v - u) / self.width)) + 1)[:-1] for u, v in
                  zip(knots[:-1], knots[1:])]
        return np.concatenate(pieces + [[c]])

    def integrate(self, fn, a, c):
        """int_a^c fn (either orientation) by Gauss-Legendre on the panels; fn maps (m, q) to (m, q, ...)."""
        if a == c:
            return 0.0 * fn(np.array([[a]]))[0, 0]
        lo, hi, sign = (a, c, 1.0) if a < c else (c, a, -1.0)
        p = self.panels(lo, hi)
        half, mid = 0.5 * np.diff(p), 0.5 * (p[1:] + p[:-1])
        r = mid[:, None] + half[:, None] * _GL_NODES[None]
        vals = fn(r)
        wts = (half[:, None] * _GL_WEIGHTS[None]).reshape(r.shape + (1,) * (vals.ndim - 2))
        return sign * np.sum(wts * vals, axis=(0, 1))

    def g_shift(self, a, r_end):
        """G_a(r_end) = int_a^{r_end} e^{S_a - S_u} b_u du (D,)."""
        s_a = self.big_s(a)
        return self.integrate(lambda u: np.exp(s_a - self.big_s(u))[..., None] * self.b_at(u), a, r_end)

    def step_integrals(self, a, t, n_max):
        """(A_n for n = 0..n_max, int_a^t e^{Phi} G_a dr) for a step from a to t > a."""
        base = self.big_l(a) + self.big_s(a)
        phi = lambda r: np.exp(self.big_l(r) + self.big_s(r) - base)
        powers = np.arange(n_max + 1)
        a_n = self.integrate(lambda r: phi(r)[..., None] * (r - a)[..., None] ** powers, a, t)
        # nested: G_a at each outer node = G_a at its panel's left end + the integral over the rest of the panel
        p = self.panels(a, t)
        half, mid = 0.5 * np.diff(p), 0.5 * (p[1:] + p[:-1])
        r = mid[:, None] + half[:, None] * _GL_NODES[None]  # (m, q)
        s_a = self.big_s(a)
        g_fn = lambda u: np.exp(s_a - self.big_s(u))[..., None] * self.b_at(u)
        panel_int = np.stack([self.integrate(g_fn, u, v) for u, v in zip(p[:-1], p[1:])])  # (m, D)
        left = np.concatenate([np.zeros((1,) + panel_int.shape[1:]), np.cumsum(panel_int, 0)[:-1]])
        inner_half = 0.5 * (r - p[:-1, None])  # (m, q)
        u = p[:-1, None, None] + inner_half[..., None] * (_GL_NODES + 1.0)  # (m, q, q)
        inner = np.einsum("mqk,k,mqkd->mqd", inner_half[..., None] * np.ones_like(u), _GL_WEIGHTS, g_fn(u))
        g_nodes = left[:, None] + inner  # (m, q, D)
        nested = np.einsum("mq,q,mq,mqd->d", half[:, None] * np.ones_like(r), _GL_WEIGHTS, phi(r), g_nodes)
        return a_n, nested


# ---------------------------------------------------------------- the solver's coefficients


def _derivative_weights(lams, pseudo):
    """c (n, n) with c[j, i] the weight of g_i in the j-th derivative term (j >= 1; row 0 unused), for points
    lams (anchor first): the Taylor (Vandermonde) solve, or with `pseudo` the j-th divided difference."""
    n = len(lams)
    c = np.zeros((n, n))
    if n == 1:
        return c
    delta = np.asarray(lams[1:]) - lams[0]
    if pseudo:
        for j in range(1, n):
            for i in range(j + 1):
                c[j, i] = 1.0 / np.prod([lams[i] - lams[m] for m in range(j + 1) if m != i])
        return c
    rinv = np.linalg.inv(delta[:, None] ** np.arange(1, n)[None, :])  # rows: derivative order, cols: points
    c[1:, 1:] = rinv
    c[1:, 0] = -rinv.sum(1)
    return c


def _update(tables, lams, lam_t, alpha_a, alpha_t, pseudo):
    """(cx, w over the points, k) of x_t = cx x_a - sum_i w_i f_i - k for points lams (anchor first)."""
    a = lams[0]
    a_n, nested = tables.step_integrals(a, lam_t, len(lams) - 1)
    gamma = np.zeros(len(lams))
    gamma[0] = a_n[0]
    gamma += a_n @ _derivative_weights(lams, pseudo)
    e_s = np.array([np.exp(tables.big_s(a) - tables.big_s(li)) for li in lams])
    g_shift = np.stack([tables.g_shift(a, li) for li in lams])
    scale = alpha_t * np.exp(tables.big_l(a) - tables.big_l(lam_t))
    return scale / alpha_a, scale * gamma * e_s, scale * (nested - gamma @ g_shift)


def coefficients(schedule, ts, ems: EMS, order: int = 3, predictor_pseudo: bool = False, corrector: bool = True,
                 corrector_pseudo: bool = False, lower_order_final: bool = True,
                 panel_width: float = 0.05) -> multistep.Coefficients:
    """Per-step coefficients for `multistep.solve` (buffer order + 1 values of f)."""
    tables = _Tables(ems, panel_width)
    lam, alpha, sigma = unipc.schedule_values(schedule, ts)
    steps, buffer = len(ts) - 1, order + 1
    dim = tables.b.shape[1]
    orders = unipc.step_orders(steps, order, lower_order_final)
    co = {name: np.zeros(shape) for name, shape in [("cx_p", (steps,)), ("w_p", (steps, buffer)),
                                                    ("k_p", (steps, dim)), ("cx_c", (steps,)),
                                                    ("w_c", (steps, buffer)), ("k_c", (steps, dim))]}
    use_c = np.zeros(steps, bool)
    for k, p in enumerate(orders):
        cx, w, kk = _update(tables, [lam[k - i] for i in range(p)], lam[k + 1], alpha[k], alpha[k + 1],
                            predictor_pseudo)
        co["cx_p"][k], co["w_p"][k, :p], co["k_p"][k] = cx, w, kk
        c_order = p + int(corrector_pseudo)
        if corrector and k + 1 < steps and c_order > 1:
            # correct x_{k+1} at iteration k + 1, anchored at k; buffer then holds (f_{k+1}, f_k, f_{k-1}, ...)
            index = [1, 0] + list(range(2, c_order))
            points = [lam[k], lam[k + 1]] + [lam[k + 1 - i] for i in range(2, c_order)]
            cx, w, kk = _update(tables, points, lam[k + 1], alpha[k], alpha[k + 1], corrector_pseudo)
            use_c[k + 1] = True
            co["cx_c"][k + 1], co["k_c"][k + 1] = cx, kk
            co["w_c"][k + 1, index] = w
    shape = np.asarray(ems.b).shape[1:]
    l_k = tables.l_at(lam[:-1])
    return multistep.Coefficients(
        qa=-l_k / alpha[:-1], qb=sigma[:-1] / alpha[:-1], use_c=jnp.asarray(use_c), cx_c=co["cx_c"], w_c=co["w_c"],
        k_c=co["k_c"].reshape((steps,) + shape), mix=multistep.identity_mix(steps, buffer), cx_p=co["cx_p"],
        w_p=co["w_p"], k_p=co["k_p"].reshape((steps,) + shape))


def check_ems(ems: EMS, schedule, ts, sample_shape):
    """One ValueError per inconsistency between the EMS, the timesteps and the samples."""
    lam = np.asarray(ems.lam, np.float64)
    if lam.ndim != 1 or lam.shape[0] < 2 or not np.all(np.diff(lam) > 0):
        raise ValueError(f"EMS lam must be a strictly increasing 1-D grid of >= 2 points, got shape {lam.shape}")
    if np.shape(ems.l) != lam.shape or np.shape(ems.s) != lam.shape:
        raise ValueError(f"EMS l and s must have the grid's shape {lam.shape}, got {np.shape(ems.l)}, "
                         f"{np.shape(ems.s)}")
    if tuple(np.shape(ems.b)) != lam.shape + tuple(sample_shape):
        raise ValueError(f"EMS b must be (grid, *sample_shape) = {lam.shape + tuple(sample_shape)}, got "
                         f"{np.shape(ems.b)}")
    lam_ts = unipc.schedule_values(schedule, ts)[0]
    slack = 1e-9 * (lam[-1] - lam[0])  # the grid and the timesteps round-trip through t_of_lambda separately
    if lam_ts.min() < lam[0] - slack or lam_ts.max() > lam[-1] + slack:
        raise ValueError(f"the EMS grid covers lambda in [{lam[0]:.6g}, {lam[-1]:.6g}] but the timesteps need "
                         f"[{lam_ts.min():.6g}, {lam_ts.max():.6g}]")


def dpm_solver_v3(model_fn, schedule, x_T, timesteps, ems: EMS, order: int = 3, predictor_pseudo: bool = False,
                  corrector: bool = True, corrector_pseudo: bool = False, lower_order_final: bool = True, mesh=None):
    """DPM-Solver-v3 multistep predictor (order `order`, 1-3) with the optional corrector; NFE = number of steps.
    `ems` must cover the timesteps' lambda range and have b of x_T's sample shape."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    ts = samplers._check(model_fn, schedule, x_T, timesteps)
    check_ems(ems, schedule, ts, jnp.shape(x_T)[1:])
    co = coefficients(schedule, ts, ems, order, predictor_pseudo, corrector, corrector_pseudo, lower_order_final)
    return multistep.solve(model_fn, schedule, x_T, ts, co, mesh)


def sample_with_model_ems(model_fn, schedule, x_T, timesteps, ems_samples: int = 1024, grid_steps: int = 200,
                          mesh=None):
    """DPM-Solver-v3 as a self-contained sampler (what `samplers.sample('dpm_solver_v3', ...)` runs): EMS on
    `grid_steps` lambda-uniform intervals spanning the timesteps, from the model's own trajectories of the first
    `ems_samples` rows of x_T (the paper uses 1024 samples); computing them costs evaluations beyond the NFE
    budget (a one-off precomputation in the paper), the solve itself exactly NFE."""
    ts = samplers._check(model_fn, schedule, x_T, timesteps)
    grid = samplers.make_timesteps(schedule, grid_steps, "logsnr", t_start=float(ts[0]), t_end=float(ts[-1]))
    ems = compute_ems(model_fn, schedule, x_T[:ems_samples], grid)
    return dpm_solver_v3(model_fn, schedule, x_T, ts, ems, mesh=mesh)


samplers.register("dpm_solver_v3", 3, sample_with_model_ems)
