"""AdjointDPM against backpropagation through the same unrolled RK4 solve, in float64, for two parameterised noise
models: the exact eps of a 2-D Gaussian mixture with its means as the parameters, and a tiny random tanh MLP with a
time embedding. The continuous adjoint differs from backprop's discrete gradient by O(h^4): the tests assert the
stated tolerances at 256 steps and that the difference falls by more than 100x per 4x steps (4th order: 256x);
then finite differences of the loss, the forward solve against `samplers.reference_ode`, the compiled executables'
temp memory (constant in the number of steps for the adjoint, growing for backprop), and one ValueError per invalid
input."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.diffusion import adjoint as A, gmm, samplers as S
from jaxalign.diffusion.schedules import LinearVP

LOSS = A.quadratic_sine_loss
# max relative difference (max |adjoint - backprop| / max |backprop|) allowed at 256 steps; measured 2.0e-7 (x_T)
# and 2.5e-8 (means) for the mixture, 1.5e-9 and 2.5e-9 for the MLP
TOLERANCE_256 = {"gmm": 1e-6, "mlp": 1e-8}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@functools.cache
def problem(name):
    with jax.enable_x64(True):
        sch = LinearVP()
        mix = gmm.mixture_2d()
        x_T = gmm.sample_marginal(mix, sch, jax.random.PRNGKey(0), 8, sch.t_max)
        if name == "gmm":
            return sch, A.gmm_means_eps_fn(mix, sch), mix.means, x_T  # cached: one eps_fn object (static jit arg)
        return sch, A.mlp_eps_fn, A.init_mlp(jax.random.PRNGKey(1), 2, 16, dtype=jnp.float64), x_T



@functools.cache
def gradients(name, steps):
    sch, eps_fn, params, x_T = problem(name)
    ts = S.make_timesteps(sch, steps)
    with jax.enable_x64(True):
        return (A.adjoint_gradients(eps_fn, params, sch, x_T, ts, LOSS),
                A.backprop_gradients(eps_fn, params, sch, x_T, ts, LOSS))


def differences(name, steps):
    (loss_a, gx_a, gp_a), (loss_b, gx_b, gp_b) = gradients(name, steps)
    assert abs(float(loss_a) - float(loss_b)) <= 1e-12 * abs(float(loss_b))  # the same forward solve
    return A.max_relative_difference(gx_a, gx_b), A.max_relative_difference(gp_a, gp_b)


@pytest.mark.parametrize("name,steps", [("gmm", (64, 256)), ("mlp", (16, 64, 256))])
def test_adjoint_matches_backprop_and_converges_at_fourth_order(name, steps):
    diffs = [differences(name, n) for n in steps]
    print(name, dict(zip(steps, diffs)))
    for coarse, fine in zip(diffs, diffs[1:]):
        assert fine[0] < coarse[0] / 100 and fine[1] < coarse[1] / 100, diffs
    assert max(diffs[-1]) < TOLERANCE_256[name], diffs


@pytest.mark.parametrize("name", ["gmm", "mlp"])
def test_gradients_against_finite_differences(name):
    sch, eps_fn, params, x_T = problem(name)
    ts = S.make_timesteps(sch, 256)
    _, g_x, g_p = gradients(name, 256)[0]
    loss = lambda x, p: float(LOSS(A.sample(eps_fn, p, sch, x, ts)))
    delta = 1e-5
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    for k in keys[:2]:
        v = jax.random.normal(k, x_T.shape, x_T.dtype)
        fd = (loss(x_T + delta * v, params) - loss(x_T - delta * v, params)) / (2 * delta)
        assert abs(fd - float(jnp.vdot(g_x, v))) < 1e-6 * float(jnp.linalg.norm(g_x) * jnp.linalg.norm(v))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for k in keys[2:]:
        v = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(kk, leaf.shape, leaf.dtype) for kk, leaf in
                                                   zip(jax.random.split(k, len(leaves)), leaves)])
        shifted = lambda sign: jax.tree_util.tree_map(lambda p, d: p + sign * delta * d, params, v)
        fd = (loss(x_T, shifted(1.0)) - loss(x_T, shifted(-1.0))) / (2 * delta)
        dot = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(g_p), jax.tree_util.tree_leaves(v)))
        norms = np.sqrt(sum(float(jnp.vdot(g, g)) for g in jax.tree_util.tree_leaves(g_p))
                        * sum(float(jnp.vdot(d, d)) for d in jax.tree_util.tree_leaves(v)))
        assert abs(fd - dot) < 1e-6 * norms, (fd, dot)


def test_forward_solve_is_the_reference_rk4():
    """On logSNR-uniform timesteps `sample` is `reference_ode`'s RK4 (uniform in lambda) with the same steps."""
    sch, eps_fn, means, x_T = problem("gmm")
    model = gmm.eps_model(gmm.mixture_2d(), sch)
    x_0 = A.sample(eps_fn, means, sch, x_T, S.make_timesteps(sch, 64))
    np.testing.assert_allclose(x_0, S.reference_ode(model, sch, x_T, steps=64), rtol=1e-9, atol=1e-9)


def test_temp_memory_constant_for_adjoint_and_growing_for_backprop():
    sch, eps_fn, params, x_T = problem("mlp")
    temp = {(m, n): A.memory_stats(m, eps_fn, params, sch, x_T, S.make_timesteps(sch, n), LOSS)["temp_size_in_bytes"]
            for m in A.METHODS for n in (16, 256)}
    print(temp)  # measured: adjoint 24,736 B at both; backprop 329,840 B -> 4,899,440 B
    assert temp["adjoint", 256] == temp["adjoint", 16]
    assert temp["backprop", 256] > 10 * temp["backprop", 16]
    assert temp["backprop", 16] > temp["adjoint", 16]


def test_float32_inputs_keep_their_dtype():
    sch, _, params, x_T = problem("mlp")
    p32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
    x32 = x_T.astype(jnp.float32)
    ts = S.make_timesteps(sch, 64)
    _, gx_a, gp_a = A.adjoint_gradients(A.mlp_eps_fn, p32, sch, x32, ts, LOSS)
    _, gx_b, gp_b = A.backprop_gradients(A.mlp_eps_fn, p32, sch, x32, ts, LOSS)
    assert gx_a.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(gp_a))
    assert A.max_relative_difference(gx_a, gx_b) < 1e-3 and A.max_relative_difference(gp_a, gp_b) < 1e-3


@pytest.mark.parametrize("timesteps,match", [
    ([0.5, 0.8, 1e-3], "strictly decreasing"),
    ([1.0, 0.5, 0.5], "strictly decreasing"),
    ([1.2, 0.5, 1e-3], r"lie in \(0, 1.0\], got \[0.001, 1.2\]"),
    ([1.0, 0.5, 0.0], r"lie in \(0, 1.0\], got \[0.0, 1.0\]"),
    ([1.0], "1-D with at least 2"),
])
def test_invalid_timesteps_are_one_value_error(timesteps, match):
    sch, eps_fn, means, x_T = problem("gmm")
    with pytest.raises(ValueError, match=match):
        A.sample(eps_fn, means, sch, x_T, np.asarray(timesteps))
    for fn in (A.adjoint_gradients, A.backprop_gradients):
        with pytest.raises(ValueError, match=match):
            fn(eps_fn, means, sch, x_T, np.asarray(timesteps), LOSS)


def test_mismatched_shapes_and_bad_arguments_are_one_value_error():
    sch, eps_fn, means, x_T = problem("gmm")
    _, _, mlp_params, _ = problem("mlp")
    ts = S.make_timesteps(sch, 4)
    cases = [
        ((eps_fn, means, sch, jnp.zeros((4, 3)), ts, LOSS), r"eps_fn\(params, x, t\) fails on one sample of x_T "
                                                            r"\(x_T shape \(4, 3\), sample shape \(3,\)\)"),
        ((A.mlp_eps_fn, mlp_params, sch, jnp.zeros((4, 5)), ts, LOSS), r"fails on one sample .* shape \(5,\)"),
        ((lambda p, x, t: eps_fn(p, x, t)[:1], means, sch, x_T, ts, LOSS),
         r"must return eps of one sample's shape \(2,\) \(x_T shape \(8, 2\) .*got \(1,\)"),
        ((eps_fn, means, sch, x_T[0], ts, LOSS), r"x_T must be \(batch, \*sample_shape\), got shape \(2,\)"),
        ((eps_fn, means, sch, x_T, ts, lambda x: x.sum(-1)), r"loss_fn\(x_0\) must return a scalar .*got \(8,\)"),
        ((eps_fn, means.astype(jnp.int32), sch, x_T, ts, LOSS), "floating-point leaves.*int32"),
    ]
    for args, match in cases:
        for fn in (A.adjoint_gradients, A.backprop_gradients):
            with pytest.raises(ValueError, match=match):
                fn(*args)
    with pytest.raises(ValueError, match="method must be one of"):
        A.memory_stats("checkpoint", eps_fn, means, sch, x_T, ts, LOSS)
