"""Probability-flow ODE samplers for VP diffusion models: pure functions (model_fn, schedule, x_T, timesteps) -> x_0.

`model_fn(x, t) -> eps` is a noise-prediction model for ONE sample x (any shape) at a scalar time t; the samplers
vmap it over the leading (batch) axis of x_T and jit the whole solve (`batched_solve`). A `model_fn` that is a
`jax.tree_util.Partial(f, params)` (what `networks.model_fn` builds) passes its params as traced inputs, so every
set of parameters of one network shares one executable; any other callable compiles once per object (build it
once and reuse it). Every sampler takes an optional `mesh` and then splits the samples over the mesh's data axis. `timesteps` is a concrete, strictly decreasing 1-D array t_0 = T > ... > t_M
inside (0, schedule.t_max]; `make_timesteps` spaces them uniformly in t or in lambda (logSNR), `plan` turns an NFE
budget into timesteps and per-step orders. Every step is written with lambda = log(alpha / sigma) and
h = lambda_t - lambda_s, exactly solving the linear part of the ODE (Lu et al. 2022, DPM-Solver, eq. 3.4):

- `ddim`: x_t = alpha_t x0_hat + sigma_t eps_hat (Song et al. 2021, DDIM, eq. 12 with sigma = 0); algebraically
  `dpm_solver` order 1 (Lu et al. 2022, eq. 4.1 / Sec. 4.1).
- `dpm_solver`: singlestep DPM-Solver-1/2/3 (Lu et al. 2022, eq. 3.7 and Algorithms 1-2; r1 = 1/2 for order 2,
  r1 = 1/3, r2 = 2/3 for order 3); `order` may be a tuple of per-step orders (the fixed-NFE mix of Sec. 3.4).
- `dpm_solver_pp_2s`: singlestep second order with data prediction (Lu et al. 2022b, DPM-Solver++, Algorithm 1,
  r = 1/2).
- `dpm_solver_pp_2m`: multistep second order with data prediction (Lu et al. 2022b, Algorithm 2; the first step is
  first order).
- `euler`: explicit Euler in t on dx/dt = f(t) x - g(t)^2 / 2 grad log p_t (Song et al. 2021, score SDE, eq. 13),
  with grad log p_t = -eps / sigma_t.
- `reference_ode`: classical RK4 with many uniform steps in lambda on d(x / alpha)/d lambda = -e^{-lambda} eps
  (Lu et al. 2022, eq. 3.4 differentiated), the accurate solution the order checks compare against.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.diffusion.parameterisation import eps_to_x0
from jaxalign.sharding import batch_sharding, check_batch_fits_mesh, replicated

ORDERS = {
    "ddim": 1,
    "dpm_solver_1": 1,
    "dpm_solver_2": 2,
    "dpm_solver_3": 3,
    "dpm_solver_pp_2s": 2,
    "dpm_solver_pp_2m": 2,
    "euler": 1,
}
SPACINGS = ("logsnr", "time")


# ---------------------------------------------------------------- timesteps and validation


def make_timesteps(schedule, steps: int, spacing: str = "logsnr", t_start: float | None = None,
                   t_end: float = 1e-3) -> np.ndarray:
    """steps + 1 decreasing times from t_start (default schedule.t_max) to t_end, uniform in lambda ('logsnr', the
    choice Lu et al. 2022 recommend, Sec. 3.3) or in t ('time')."""
    t_start = schedule.t_max if t_start is None else t_start
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if steps < 1:
        raise ValueError(f"need at least 1 step, got {steps}")
    if not 0.0 < t_end < t_start <= schedule.t_max:
        raise ValueError(f"need 0 < t_end < t_start <= t_max = {schedule.t_max}, got t_end={t_end}, t_start={t_start}")
    if spacing == "time":
        return np.linspace(t_start, t_end, steps + 1)
    with jax.default_device(jax.devices("cpu")[0]), jax.enable_x64(True):
        lam = np.linspace(float(schedule.lam(t_start)), float(schedule.lam(t_end)), steps + 1)
        ts = np.array(schedule.t_of_lambda(jnp.asarray(lam, jnp.float64)), np.float64)
    ts[0], ts[-1] = t_start, t_end  # the inverse's rounding must not push the ends outside (0, t_max]
    return ts


def singlestep_orders(nfe: int, order: int) -> tuple[int, ...]:
    """Per-step orders spending exactly `nfe` evaluations: as many steps of `order` as fit, then one lower-order
    step for the remainder (the ordering of Lu et al. 2022, Sec. 3.4, lower orders last)."""
    if nfe < order:
        raise ValueError(f"an order-{order} solver needs at least {order} function evaluations, got NFE {nfe}")
    return (order,) * (nfe // order) + ((nfe % order,) if nfe % order else ())


def plan(solver: str, schedule, nfe: int, spacing: str = "logsnr", t_end: float = 1e-3):
    """(timesteps, extra kwargs) that make `solver` spend exactly `nfe` model evaluations."""
    if solver not in ORDERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(ORDERS)}")
    order = ORDERS[solver]
    if solver in ("dpm_solver_2", "dpm_solver_3", "dpm_solver_pp_2s"):
        orders = singlestep_orders(nfe, order)
        return make_timesteps(schedule, len(orders), spacing, t_end=t_end), {"order": orders}
    if nfe < order:
        raise ValueError(f"{solver} is order {order} and needs at least {order} function evaluations, got NFE {nfe}")
    return make_timesteps(schedule, nfe, spacing, t_end=t_end), {}


def _check(model_fn, schedule, x_T, timesteps, min_steps: int = 1) -> np.ndarray:
    """One ValueError per invalid input: timesteps not a concrete strictly decreasing 1-D array in (0, t_max], too
    few steps for the solver, x_T without a batch axis, or a model_fn whose output shape differs from a sample's."""
    try:
        ts = np.asarray(timesteps, dtype=np.float64)
    except (TypeError, jax.errors.TracerArrayConversionError) as err:
        raise ValueError("timesteps must be a concrete array (they fix the solver's static step plan)") from err
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"timesteps must be 1-D with at least 2 entries, got shape {ts.shape}")
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"timesteps must be strictly decreasing (from T towards 0), got {ts.tolist()}")
    if not (ts[-1] > 0 and ts[0] <= schedule.t_max):
        raise ValueError(f"timesteps must lie in (0, {schedule.t_max}], got [{ts[-1]}, {ts[0]}]")
    if ts.shape[0] - 1 < min_steps:
        raise ValueError(f"this solver needs at least {min_steps} steps, got {ts.shape[0] - 1}")
    if jnp.ndim(x_T) < 2:
        raise ValueError(f"x_T must be (batch, *sample_shape), got shape {jnp.shape(x_T)}")
    sample = jax.ShapeDtypeStruct(jnp.shape(x_T)[1:], jnp.result_type(x_T))
    try:
        out = jax.eval_shape(model_fn, sample, jax.ShapeDtypeStruct((), jnp.result_type(x_T)))
    except (TypeError, ValueError) as err:  # e.g. x_T's sample shape does not fit the model's parameters
        raise ValueError(f"model_fn(x, t) fails on one sample of x_T's shape {sample.shape}: {err}") from err
    if getattr(out, "shape", None) != sample.shape:
        raise ValueError(f"model_fn(x, t) must return eps of the sample's shape {sample.shape}, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    return ts


def _coefficients(schedule, s, t):
    """(h, alpha_s, sigma_s, alpha_t, sigma_t) for a step from s to t."""
    return (schedule.lam(t) - schedule.lam(s), schedule.alpha(s), schedule.sigma(s), schedule.alpha(t),
            schedule.sigma(t))


# ---------------------------------------------------------------- single steps (one sample)


def _ddim_step(model_fn, schedule, x, s, t):
    alpha_s, sigma_s, alpha_t, sigma_t = schedule.alpha(s), schedule.sigma(s), schedule.alpha(t), schedule.sigma(t)
    eps = model_fn(x, s)
    return alpha_t * eps_to_x0(x, eps, alpha_s, sigma_s) + sigma_t * eps


def _dpm1_update(schedule, x, s, t, eps_s):
    """Lu et al. 2022, eq. 3.7 with k = 1: x_t = (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps_s."""
    h = schedule.lam(t) - schedule.lam(s)
    return jnp.exp(schedule.log_alpha(t) - schedule.log_alpha(s)) * x - schedule.sigma(t) * jnp.expm1(h) * eps_s


def _dpm1_step(model_fn, schedule, x, s, t):
    return _dpm1_update(schedule, x, s, t, model_fn(x, s))


def _dpm2_step(model_fn, schedule, x, s, t, r1=0.5):
    """Lu et al. 2022, Algorithm 1 (DPM-Solver-2)."""
    lam_s, h = schedule.lam(s), schedule.lam(t) - schedule.lam(s)
    s1 = schedule.t_of_lambda(lam_s + r1 * h)
    eps_s = model_fn(x, s)
    u = _dpm1_update(schedule, x, s, s1, eps_s)
    d1 = model_fn(u, s1) - eps_s
    return _dpm1_update(schedule, x, s, t, eps_s) - schedule.sigma(t) / (2.0 * r1) * jnp.expm1(h) * d1


def _dpm3_step(model_fn, schedule, x, s, t, r1=1.0 / 3.0, r2=2.0 / 3.0):
    """Lu et al. 2022, Algorithm 2 (DPM-Solver-3)."""
    lam_s, h = schedule.lam(s), schedule.lam(t) - schedule.lam(s)
    s1, s2 = schedule.t_of_lambda(lam_s + r1 * h), schedule.t_of_lambda(lam_s + r2 * h)
    eps_s = model_fn(x, s)
    u1 = _dpm1_update(schedule, x, s, s1, eps_s)
    d1 = model_fn(u1, s1) - eps_s
    phi_r2 = jnp.expm1(r2 * h) / (r2 * h) - 1.0
    u2 = _dpm1_update(schedule, x, s, s2, eps_s) - schedule.sigma(s2) * (r2 / r1) * phi_r2 * d1
    d2 = model_fn(u2, s2) - eps_s
    phi = jnp.expm1(h) / h - 1.0
    return _dpm1_update(schedule, x, s, t, eps_s) - schedule.sigma(t) / r2 * phi * d2


def _x0_model(model_fn, schedule, x, t):
    return eps_to_x0(x, model_fn(x, t), schedule.alpha(t), schedule.sigma(t))


def _pp1_update(schedule, x, s, t, x0_s):
    """Lu et al. 2022b, eq. 4.5 with first order: x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) x0_s."""
    h = schedule.lam(t) - schedule.lam(s)
    return schedule.sigma(t) / schedule.sigma(s) * x - schedule.alpha(t) * jnp.expm1(-h) * x0_s


def _pp1_step(model_fn, schedule, x, s, t):
    return _pp1_update(schedule, x, s, t, _x0_model(model_fn, schedule, x, s))


def _pp2s_step(model_fn, schedule, x, s, t, r=0.5):
    """Lu et al. 2022b, Algorithm 1 (DPM-Solver++(2S))."""
    h = schedule.lam(t) - schedule.lam(s)
    s1 = schedule.t_of_lambda(schedule.lam(s) + r * h)
    m0 = _x0_model(model_fn, schedule, x, s)
    u = _pp1_update(schedule, x, s, s1, m0)
    d = (1.0 - 0.5 / r) * m0 + 0.5 / r * _x0_model(model_fn, schedule, u, s1)
    return _pp1_update(schedule, x, s, t, d)


def _euler_step(model_fn, schedule, x, s, t):
    """dx/dt = f x - g^2/2 score = f (x - eps / sigma) for VP (g^2 = -2 f)."""
    f = schedule.d_log_alpha(s)
    return x + (t - s) * f * (x - model_fn(x, s) / schedule.sigma(s))


# ---------------------------------------------------------------- solves (one sample), then batched and jitted


def _scan_steps(step, x, ts):
    def body(x, st):
        return step(x, st[0], st[1]), None

    return jax.lax.scan(body, x, (ts[:-1], ts[1:]))[0]


def _singlestep_solve(model_fn, schedule, x, ts, orders, steps):
    """Runs of equal order scan with one compiled body each; `steps[k]` is the order-k step."""
    i = 0
    for order, run in itertools.groupby(orders):
        n = len(list(run))
        x = _scan_steps(functools.partial(steps[order], model_fn, schedule), x, ts[i:i + n + 1])
        i += n
    return x


def _pp2m_solve(model_fn, schedule, x, ts):
    m0 = _x0_model(model_fn, schedule, x, ts[0])
    x = _pp1_update(schedule, x, ts[0], ts[1], m0)

    def body(carry, st):
        x, m_prev, t_prev = carry
        s, t = st
        m = _x0_model(model_fn, schedule, x, s)
        lam_s = schedule.lam(s)
        h = schedule.lam(t) - lam_s
        r = (lam_s - schedule.lam(t_prev)) / h
        d = (1.0 + 0.5 / r) * m - 0.5 / r * m_prev
        return (_pp1_update(schedule, x, s, t, d), m, s), None

    return jax.lax.scan(body, (x, m0, ts[0]), (ts[1:-1], ts[2:]))[0][0]


def _in_dtype_of_x(model_fn):
    """A model computing in a wider dtype than x_T (e.g. float64 mixture parameters) must not change the scan
    carry's dtype."""
    return lambda x, t: model_fn(x, t).astype(x.dtype)


def _ddim_solve(model_fn, schedule, x, ts):
    return _scan_steps(functools.partial(_ddim_step, model_fn, schedule), x, ts)


def _euler_solve(model_fn, schedule, x, ts):
    return _scan_steps(functools.partial(_euler_step, model_fn, schedule), x, ts)


_NOISE_STEPS = {1: _dpm1_step, 2: _dpm2_step, 3: _dpm3_step}
_DATA_STEPS = {1: _pp1_step, 2: _pp2s_step}


def _dpm_solver_solve(model_fn, schedule, x, ts, orders):
    return _singlestep_solve(model_fn, schedule, x, ts, orders, _NOISE_STEPS)


def _pp2s_solve(model_fn, schedule, x, ts, orders):
    return _singlestep_solve(model_fn, schedule, x, ts, orders, _DATA_STEPS)


def as_traced(model_fn) -> jax.tree_util.Partial:
    """`model_fn` as a pytree whose function is static and whose bound arguments are traced.

    A `jax.tree_util.Partial(f, params)` (what `networks.model_fn` returns) keeps `params` as an input of the
    compiled solve, so new parameters of the same shapes (a fine-tuned copy, a checkpoint) reuse the executable;
    any other callable is wrapped with no arguments and compiles once per callable object, as a static argument
    would."""
    return model_fn if isinstance(model_fn, jax.tree_util.Partial) else jax.tree_util.Partial(model_fn)


@functools.partial(jax.jit, static_argnames=("solve", "schedule", "static"))
def _batched(solve, model_fn, schedule, x_T, ts, static):
    model_fn = _in_dtype_of_x(model_fn)
    return jax.vmap(lambda x: solve(model_fn, schedule, x, ts, **dict(static)))(x_T)


def batched_solve(solve, model_fn, schedule, x_T, ts, mesh=None, **static):
    """`solve(model_fn, schedule, x, ts, **static)` (one sample) over the leading axis of x_T, jitted.

    `ts` is traced (a new grid of the same length reuses the executable), `static` (e.g. per-step orders) is
    hashed into the compilation key. With a `mesh` (`jaxalign.sharding.make_mesh`), x_T is split along its batch
    axis over the mesh's data and fsdp axes and the model's traced arguments are replicated, so every device
    integrates its own samples with no communication; the result is the same as on one device and stays sharded
    the same way. The batch must divide evenly into those shards (one clear error otherwise)."""
    model_fn = as_traced(model_fn)
    if mesh is not None:
        check_batch_fits_mesh(jnp.shape(x_T)[0], mesh, "x_T's batch")
        x_T = jax.device_put(x_T, batch_sharding(mesh))
        model_fn = jax.device_put(model_fn, replicated(mesh))
        ts = jax.device_put(ts, replicated(mesh))
    return _batched(solve, model_fn, schedule, x_T, ts, tuple(sorted(static.items())))


def _orders(order, steps: int, allowed: tuple[int, ...]) -> tuple[int, ...]:
    orders = (order,) * steps if isinstance(order, int) else tuple(int(o) for o in order)
    if len(orders) != steps or any(o not in allowed for o in orders):
        raise ValueError(f"order must be one of {allowed} or a tuple of them, one per step ({steps} steps), "
                         f"got {order!r}")
    return orders


def _ts_like(ts, x_T):
    return jnp.asarray(ts, dtype=jnp.result_type(x_T))


def ddim(model_fn, schedule, x_T, timesteps, mesh=None):
    ts = _check(model_fn, schedule, x_T, timesteps)
    return batched_solve(_ddim_solve, model_fn, schedule, x_T, _ts_like(ts, x_T), mesh)


def dpm_solver(model_fn, schedule, x_T, timesteps, order=2, mesh=None):
    """Singlestep DPM-Solver; NFE = sum of the per-step orders."""
    ts = _check(model_fn, schedule, x_T, timesteps)
    orders = _orders(order, ts.shape[0] - 1, (1, 2, 3))
    return batched_solve(_dpm_solver_solve, model_fn, schedule, x_T, _ts_like(ts, x_T), mesh, orders=orders)


def dpm_solver_pp_2s(model_fn, schedule, x_T, timesteps, order=2, mesh=None):
    """DPM-Solver++(2S); `order` a tuple of 1s and 2s mixes in first-order steps (NFE = their sum)."""
    ts = _check(model_fn, schedule, x_T, timesteps)
    orders = _orders(order, ts.shape[0] - 1, (1, 2))
    return batched_solve(_pp2s_solve, model_fn, schedule, x_T, _ts_like(ts, x_T), mesh, orders=orders)


def dpm_solver_pp_2m(model_fn, schedule, x_T, timesteps, mesh=None):
    """DPM-Solver++(2M); NFE = number of steps, at least 2 (the second step is the first of second order)."""
    ts = _check(model_fn, schedule, x_T, timesteps, min_steps=2)
    return batched_solve(_pp2m_solve, model_fn, schedule, x_T, _ts_like(ts, x_T), mesh)


def euler(model_fn, schedule, x_T, timesteps, mesh=None):
    ts = _check(model_fn, schedule, x_T, timesteps)
    return batched_solve(_euler_solve, model_fn, schedule, x_T, _ts_like(ts, x_T), mesh)


SOLVERS = {
    "ddim": ddim,
    "dpm_solver_1": functools.partial(dpm_solver, order=1),
    "dpm_solver_2": dpm_solver,
    "dpm_solver_3": dpm_solver,
    "dpm_solver_pp_2s": dpm_solver_pp_2s,
    "dpm_solver_pp_2m": dpm_solver_pp_2m,
    "euler": euler,
}


def register(name: str, order: int, solver) -> None:
    """Adds a multistep solver (one evaluation per step, `plan` gives it `nfe` steps) defined in a module that
    imports this one, so this one cannot import it: `unipc`, `dc_solver` and `dpm_solver_v3` register themselves
    when imported, and `jaxalign.diffusion`'s __init__ imports them. `solver(model_fn, schedule, x_T, timesteps, mesh=None)`."""
    if name in ORDERS and SOLVERS.get(name) is not solver:
        raise ValueError(f"solver {name!r} is already registered")
    ORDERS[name], SOLVERS[name] = order, solver


def sample(solver: str, model_fn, schedule, x_T, nfe: int, spacing: str = "logsnr", t_end: float = 1e-3,
           mesh=None):
    """Runs `solver` from x_T (at schedule.t_max) to t_end with exactly `nfe` model evaluations (sharded over
    `mesh`'s batch axes when one is given, see `batched_solve`)."""
    ts, kwargs = plan(solver, schedule, nfe, spacing, t_end)
    return SOLVERS[solver](model_fn, schedule, x_T, ts, mesh=mesh, **kwargs)


def _rk4_solve(model_fn, schedule, x, ts, steps):
    """RK4 with `steps` uniform steps in lambda from ts[0] to ts[1] on y = x / alpha."""
    t_start, t_end = ts[0], ts[1]
    lam0, lam1 = schedule.lam(t_start), schedule.lam(t_end)
    h = (lam1 - lam0) / steps

    def rhs(y, lam):
        t = schedule.t_of_lambda(lam)
        return -jnp.exp(-lam) * model_fn(schedule.alpha(t) * y, t)

    def body(y, i):
        lam = lam0 + i * h
        k1 = rhs(y, lam)
        k2 = rhs(y + 0.5 * h * k1, lam + 0.5 * h)
        k3 = rhs(y + 0.5 * h * k2, lam + 0.5 * h)
        k4 = rhs(y + h * k3, lam + h)
        return y + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4), None

    y = jax.lax.scan(body, x / schedule.alpha(t_start), jnp.arange(steps, dtype=x.dtype))[0]
    return schedule.alpha(t_end) * y


def reference_ode(model_fn, schedule, x_T, t_start: float | None = None, t_end: float = 1e-3, steps: int = 2000,
                  mesh=None):
    """The probability-flow ODE solution from x_T at t_start to t_end: RK4 with `steps` uniform steps in lambda
    (4 * steps evaluations; its own error is O(h^4), far below the fast solvers' at 5-100 NFE in float64)."""
    t_start = schedule.t_max if t_start is None else t_start
    ts = _check(model_fn, schedule, x_T, [t_start, t_end])
    return batched_solve(_rk4_solve, model_fn, schedule, x_T, _ts_like(ts, x_T), mesh, steps=steps)
