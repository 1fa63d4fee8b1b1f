"""AdjointDPM: gradients of a loss of the sample through the adjoint probability-flow ODE, with O(1) memory in the
number of solver steps (Pan et al. 2023, "AdjointDPM: Adjoint Sensitivity Method for Gradient Backpropagation of
Diffusion Probabilistic Models", ICLR 2024, arXiv:2307.10711).

A parameterised noise model `eps_fn(params, x, t) -> eps` (ONE sample x of any shape, scalar t; vmapped inside)
defines the probability-flow ODE. The paper's idea: solve the ODE forward from x_T to x_0 keeping nothing
but the current state, then solve the augmented adjoint ODE backward from x_0 (the state, re-solved backward, the
adjoint a = dL/dstate and the parameter adjoint dL/dtheta accumulated), both in the exponential-integrator
reparameterisation that removes the linear drift f(t) x exactly, so the ODEs are non-stiff and the same solver serves
both directions. Only the abstract and the authors' released sampler code could be read here (which integrates
y = (alpha_T / alpha_t) x against rho = alpha_T e^{-lambda} - sigma_T, i.e. dy/drho = eps up to constants, with
torchdiffeq's `odeint_adjoint`); the paper's numbered equations could not, so the equations below are derived
directly from the ODE in `samplers` and none is cited by number.

Derivation (lambda_t = log(alpha_t / sigma_t), decreasing in t; e^{-lambda} = sigma / alpha):

  forward   y = x / alpha,  dy/dlambda = F(y, lambda, theta) = -e^{-lambda} eps_theta(alpha_lambda y, t_lambda)
            (Lu et al. 2022, DPM-Solver, eq. 3.4 differentiated; the same form as `samplers.reference_ode`)
  loss      L(x_0), x_0 = alpha_end y(lambda_end)
  adjoint   a(lambda) = dL/dy(lambda): a(lambda_end) = alpha_end grad L(x_0),
            da/dlambda = -(dF/dy)^T a = sigma_t (d eps/dx)^T a      (since e^{-lambda} alpha = sigma)
  params    g(lambda) = int_lambda^{lambda_end} (dF/dtheta)^T a dlambda': g(lambda_end) = 0,
            dg/dlambda = -(dF/dtheta)^T a = e^{-lambda} (d eps/dtheta)^T a,  dL/dtheta = g(lambda_start)
  noise     dL/dx_T = a(lambda_start) / alpha_start.

(From d/dlambda [a^T delta y] = 0 for every perturbation delta y obeying the linearised ODE, the standard adjoint
argument; the dL/dtheta integral is the same argument with theta a constant state.) The Jacobian in y is
-sigma_t d eps/dx, bounded wherever eps is (e.g. by 1 for the exact eps of a Gaussian), so the augmented ODE
(y, a, g) is as non-stiff as the forward one.

Solver: classical RK4 in lambda between consecutive `timesteps` (stages at lambda_s, the lambda-midpoint twice,
lambda_t; 4 model evaluations a step), forward on y and backward on (y, a, g) with step -h. RK4 rather than
DPM-Solver because its stages are plain evaluations of the ODE's right-hand side, so the same scheme integrates the
augmented system (which has no exact linear part to remove in (a, g)) and the adjoint is a black-box high-order
solve of the paper's kind; it is also the integrator `samplers.reference_ode` uses. Every stage of the backward
solve makes one `jax.vjp` of the batched eps_fn at the re-solved state, which yields F and both vector-Jacobian
products; the parameter cotangent sums over the batch.

Continuous, not discrete, adjoint: the backward solve re-creates y by integrating backward (not from a stored
trajectory) and evaluates the Jacobians at its own stages, so its gradient differs from backpropagation through the
same unrolled RK4 by O(h^4); the two converge to the same continuous gradient as steps grow. `backprop_gradients`
is that baseline (`jax.value_and_grad` through the same forward `lax.scan`), whose compiled executable keeps the
residuals of every step (memory O(steps)); `adjoint_gradients` carries only (y, a, g) through a `lax.scan` (memory
O(1) in steps). `memory_stats` reads either executable's `memory_analysis()`.

Example models: `gmm_means_eps_fn` (the exact eps of a Gaussian mixture whose means are the parameters) and
`mlp_eps_fn` / `init_mlp` (a tiny two-hidden-layer tanh network with a sinusoidal time embedding).
`python -m jaxalign.diffusion.adjoint` prints adjoint-vs-backprop gradient differences and both executables'
temp memory for a few step counts.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.diffusion import gmm, samplers

METHODS = ("adjoint", "backprop")
MEMORY_FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes")


# ---------------------------------------------------------------- validation


def _validate(eps_fn, params, schedule, x_T, timesteps, loss_fn=None) -> np.ndarray:
    """One ValueError per invalid input, naming the argument and its value: timesteps (concrete, 1-D, strictly
    decreasing, inside (0, t_max]; the checks of `samplers._check`), x_T (a batch axis), params (floating leaves),
    eps_fn (runs on one sample of x_T and returns eps of that sample's shape) and loss_fn (a scalar of x_0)."""
    ts = samplers._check(lambda x, t: x, schedule, x_T, timesteps)  # timesteps and x_T's batch axis only
    bad = [leaf for leaf in jax.tree_util.tree_leaves(params) if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    if bad:
        raise ValueError(f"params must have floating-point leaves to be differentiated, got dtypes "
                         f"{[str(jnp.result_type(b)) for b in bad]}")
    dtype = jnp.result_type(x_T)
    sample = jax.ShapeDtypeStruct(jnp.shape(x_T)[1:], dtype)
    try:
        out = jax.eval_shape(eps_fn, params, sample, jax.ShapeDtypeStruct((), dtype))
    except (TypeError, ValueError) as err:
        raise ValueError(f"eps_fn(params, x, t) fails on one sample of x_T (x_T shape {jnp.shape(x_T)}, sample "
                         f"shape {sample.shape}): {err}") from err
    if getattr(out, "shape", None) != sample.shape:
        raise ValueError(f"eps_fn(params, x, t) must return eps of one sample's shape {sample.shape} (x_T shape "
                         f"{jnp.shape(x_T)} without its batch axis), got {getattr(out, 'shape', type(out).__name__)}")
    if loss_fn is not None:
        out = jax.eval_shape(loss_fn, jax.ShapeDtypeStruct(jnp.shape(x_T), dtype))
        if getattr(out, "shape", None) != ():
            raise ValueError(f"loss_fn(x_0) must return a scalar for x_0 of shape {jnp.shape(x_T)}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
    return ts


# ---------------------------------------------------------------- the ODE and one RK4 step in lambda


def _step_nodes(schedule, ts, i):
    """Step i, s = ts[i] -> t = ts[i + 1]: (t, lambda) at s, at the lambda-midpoint and at t, and h = lambda_t -
    lambda_s > 0. Computed inside the scan body from the index, so no per-step array is materialised."""
    s, t = ts[i], ts[i + 1]
    lam_s, lam_t = schedule.lam(s), schedule.lam(t)
    lam_m = 0.5 * (lam_s + lam_t)
    return (s, lam_s), (schedule.t_of_lambda(lam_m), lam_m), (t, lam_t), lam_t - lam_s


def _drift(eps_fn, schedule, params, y, t, lam):
    """F(y, lambda) = -e^{-lambda} eps(alpha_t y, t) for the batch y (B, ...), in y's dtype."""
    eps = jax.vmap(eps_fn, in_axes=(None, 0, None))(params, schedule.alpha(t) * y, t)
    return (-jnp.exp(-lam) * eps).astype(y.dtype)


def _axpy(a, x, y):
    """y + a x over matching pytrees."""
    return jax.tree_util.tree_map(lambda xi, yi: yi + (a * xi).astype(yi.dtype), x, y)


def _rk4(rhs, z, node_0, node_m, node_1, h):
    """One classical RK4 step of dz/dlambda = rhs(z, node) from node_0 to node_1 (signed step h)."""
    k1 = rhs(z, node_0)
    k2 = rhs(_axpy(0.5 * h, k1, z), node_m)
    k3 = rhs(_axpy(0.5 * h, k2, z), node_m)
    k4 = rhs(_axpy(h, k3, z), node_1)
    incr = jax.tree_util.tree_map(lambda a, b, c, d: a + 2.0 * b + 2.0 * c + d, k1, k2, k3, k4)
    return _axpy(h / 6.0, incr, z)


# ---------------------------------------------------------------- forward solve, adjoint and backprop


def _forward(eps_fn, params, schedule, x_T, ts):
    """x_0 from x_T: RK4 in lambda on y = x / alpha, carrying only (y, step index) (the forward half of the
    method)."""
    rhs = lambda y, node: _drift(eps_fn, schedule, params, y, *node)

    def body(carry, _):
        y, i = carry
        return (_rk4(rhs, y, *_step_nodes(schedule, ts, i)), i + 1), None

    y = jax.lax.scan(body, (x_T / schedule.alpha(ts[0]), 0), None, length=ts.shape[0] - 1)[0][0]
    return schedule.alpha(ts[-1]) * y


@functools.partial(jax.jit, static_argnames=("eps_fn", "schedule"))
def _sample(eps_fn, params, schedule, x_T, ts):
    return _forward(eps_fn, params, schedule, x_T, ts)


def _augmented_rhs(eps_fn, schedule, params, z, node):
    """d/dlambda of (y, a, g) = (F, -(dF/dy)^T a, -(dF/dtheta)^T a): one forward and one VJP of eps_fn."""
    y, a, _ = z
    f, vjp = jax.vjp(lambda y_, p_: _drift(eps_fn, schedule, p_, y_, *node), y, params)
    a_y, a_p = vjp(a)
    neg = lambda tree: jax.tree_util.tree_map(jnp.negative, tree)
    return f, neg(a_y), neg(a_p)


@functools.partial(jax.jit, static_argnames=("eps_fn", "schedule", "loss_fn"))
def _adjoint(eps_fn, params, schedule, x_T, ts, loss_fn):
    x_0 = _forward(eps_fn, params, schedule, x_T, ts)
    loss, grad_x0 = jax.value_and_grad(loss_fn)(x_0)
    alpha_0, alpha_T = schedule.alpha(ts[-1]), schedule.alpha(ts[0])
    z = (x_0 / alpha_0, (alpha_0 * grad_x0).astype(x_0.dtype), jax.tree_util.tree_map(jnp.zeros_like, params))
    rhs = functools.partial(_augmented_rhs, eps_fn, schedule, params)

    def body(carry, _):  # step i from lambda_{i+1} back to lambda_i, i = steps - 1, ..., 0
        z, i = carry
        node_s, node_m, node_t, h = _step_nodes(schedule, ts, i)
        return (_rk4(rhs, z, node_t, node_m, node_s, -h), i - 1), None

    steps = ts.shape[0] - 1
    _, a, g = jax.lax.scan(body, (z, steps - 1), None, length=steps)[0][0]
    return loss, a / alpha_T, g


@functools.partial(jax.jit, static_argnames=("eps_fn", "schedule", "loss_fn"))
def _backprop(eps_fn, params, schedule, x_T, ts, loss_fn):
    objective = lambda x, p: loss_fn(_forward(eps_fn, p, schedule, x, ts))
    loss, (g_x, g_p) = jax.value_and_grad(objective, argnums=(0, 1))(x_T, params)
    return loss, g_x, g_p


_IMPLS = {"adjoint": _adjoint, "backprop": _backprop}


def _ts_like(ts, x_T):
    return jnp.asarray(ts, dtype=jnp.result_type(x_T))


def sample(eps_fn, params, schedule, x_T, timesteps):
    """x_0 (B, ...) from x_T (B, ...) at timesteps[0] to timesteps[-1]: RK4 in lambda on y = x / alpha over the
    given (strictly decreasing) timesteps, 4 evaluations of eps_fn a step; eps_fn(params, x, t) for one sample. The
    forward solve of the method (the probability-flow ODE in its exponential-integrator form, module docstring)."""
    ts = _validate(eps_fn, params, schedule, x_T, timesteps)
    return _sample(eps_fn, params, schedule, x_T, _ts_like(ts, x_T))


def adjoint_gradients(eps_fn, params, schedule, x_T, timesteps, loss_fn):
    """(L, dL/dx_T, dL/dparams) for L = loss_fn(sample(eps_fn, params, schedule, x_T, timesteps)) by AdjointDPM:
    the forward RK4 solve, then the augmented adjoint ODE of (y, a = dL/dy, g = dL/dtheta accumulated) solved
    backward in lambda with the same RK4 and the same steps (derivation in the module docstring), every stage one
    `jax.vjp` of eps_fn; both solves are `lax.scan`s carrying only their state, so memory does not grow with the
    number of steps. loss_fn(x_0) -> scalar takes the whole batch x_0 (B, ...). eps_fn, schedule and loss_fn are
    static jit arguments: build them once and reuse them."""
    ts = _validate(eps_fn, params, schedule, x_T, timesteps, loss_fn)
    return _adjoint(eps_fn, params, schedule, x_T, _ts_like(ts, x_T), loss_fn)


def backprop_gradients(eps_fn, params, schedule, x_T, timesteps, loss_fn):
    """The baseline: (L, dL/dx_T, dL/dparams) by `jax.value_and_grad` through the unrolled forward solve (the same
    RK4 and steps as `sample`); exact gradients of the discrete solve, memory O(steps)."""
    ts = _validate(eps_fn, params, schedule, x_T, timesteps, loss_fn)
    return _backprop(eps_fn, params, schedule, x_T, _ts_like(ts, x_T), loss_fn)


def memory_stats(method, eps_fn, params, schedule, x_T, timesteps, loss_fn) -> dict:
    """The compiled executable's `memory_analysis()` for 'adjoint' or 'backprop' (these inputs' shapes), as a dict
    of MEMORY_FIELDS in bytes."""
    if method not in _IMPLS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    ts = _validate(eps_fn, params, schedule, x_T, timesteps, loss_fn)
    compiled = _IMPLS[method].lower(eps_fn, params, schedule, x_T, _ts_like(ts, x_T), loss_fn).compile()
    stats = compiled.memory_analysis()
    return {field: int(getattr(stats, field)) for field in MEMORY_FIELDS}


def max_relative_difference(tree, reference) -> float:
    """max over leaves of max|tree - reference| / max|reference|."""
    diffs = jax.tree_util.tree_map(lambda x, r: float(jnp.max(jnp.abs(x - r)) / jnp.max(jnp.abs(r))), tree, reference)
    return max(jax.tree_util.tree_leaves(diffs))


# ---------------------------------------------------------------- example parameterised models


def gmm_means_eps_fn(mix: gmm.GaussianMixture, schedule):
    """eps_fn(means, x, t): the exact noise prediction of the mixture with `mix`'s weights and covariances and the
    given means (K, d) as parameters. Build it once and reuse it (it is a static jit argument)."""
    def eps_fn(means, x, t):
        return gmm.eps_prediction(gmm.GaussianMixture(mix.weights, means, mix.covs), schedule, x, t)

    return eps_fn


def init_mlp(key, dim: int, hidden: int = 32, frequencies: int = 4, dtype=jnp.float32) -> dict:
    """Random weights of `mlp_eps_fn` for samples of shape (dim,): LeCun-normal matrices, biases N(0, 0.1^2)."""
    sizes = [(dim + 2 * frequencies, hidden), (hidden, hidden), (hidden, dim)]
    keys = jax.random.split(key, 2 * len(sizes))
    params = {}
    for i, (n_in, n_out) in enumerate(sizes):
        params[f"w{i}"] = jax.random.normal(keys[2 * i], (n_in, n_out), dtype) / math.sqrt(n_in)
        params[f"b{i}"] = 0.1 * jax.random.normal(keys[2 * i + 1], (n_out,), dtype)
    return params


def mlp_eps_fn(params, x, t):
    """A tiny eps network for one sample x (dim,): [x, sin(pi k t), cos(pi k t) for k = 1..F] -> tanh -> tanh ->
    linear (the number of frequencies F read from the first weight's shape)."""
    frequencies = (params["w0"].shape[0] - x.shape[-1]) // 2
    phase = math.pi * jnp.arange(1, frequencies + 1, dtype=x.dtype) * t
    h = jnp.concatenate([x, jnp.sin(phase), jnp.cos(phase)])
    h = jnp.tanh(h @ params["w0"] + params["b0"])
    h = jnp.tanh(h @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def quadratic_sine_loss(x_0):
    """A smooth non-linear loss of the batch: mean over samples of |x_0 - 1/2|^2 + sum sin(2 x_0)."""
    return jnp.mean(jnp.sum((x_0 - 0.5) ** 2 + jnp.sin(2.0 * x_0), axis=-1))


# ---------------------------------------------------------------- the comparison report


def report(steps=(16, 64, 256), dim: int = 8, batch: int = 16, hidden: int = 64, seed: int = 0) -> list[dict]:
    """For each step count: the max relative difference adjoint vs backprop of dL/dx_T and dL/dparams (float64,
    the MLP eps network, linear VP schedule, logSNR-uniform timesteps from t_max to 1e-3) and both executables'
    temp bytes from `memory_analysis()`."""
    from jaxalign.diffusion.schedules import LinearVP

    rows = []
    with jax.enable_x64(True):
        schedule = LinearVP()
        k_p, k_x = jax.random.split(jax.random.PRNGKey(seed))
        params = init_mlp(k_p, dim, hidden, dtype=jnp.float64)
        x_T = jax.random.normal(k_x, (batch, dim), jnp.float64)
        for n in steps:
            ts = samplers.make_timesteps(schedule, n)
            args = (mlp_eps_fn, params, schedule, x_T, ts, quadratic_sine_loss)
            loss_a, gx_a, gp_a = adjoint_gradients(*args)
            loss_b, gx_b, gp_b = backprop_gradients(*args)
            rows.append({
                "steps": n,
                "loss_diff": abs(float(loss_a) - float(loss_b)),
                "rel_diff_x_T": max_relative_difference(gx_a, gx_b),
                "rel_diff_params": max_relative_difference(gp_a, gp_b),
                "adjoint_temp_bytes": memory_stats("adjoint", *args)["temp_size_in_bytes"],
                "backprop_temp_bytes": memory_stats("backprop", *args)["temp_size_in_bytes"],
            })
    return rows


def main():
    print(f"AdjointDPM vs backprop through RK4 in lambda ({jax.devices()[0].platform}, float64, MLP eps, "
          "dim 8, batch 16, hidden 64)")
    print(f"{'steps':>6} {'rel diff dL/dx_T':>17} {'rel diff dL/dθ':>15} {'adjoint temp B':>15} "
          f"{'backprop temp B':>16}")
    for row in report():
        print(f"{row['steps']:>6} {row['rel_diff_x_T']:>17.3e} {row['rel_diff_params']:>15.3e} "
              f"{row['adjoint_temp_bytes']:>15,} {row['backprop_temp_bytes']:>16,}")


if __name__ == "__main__":
    main()
