"""The samplers against exact answers on a 2-D Gaussian mixture with its exact score: DPM-Solver-1 equals DDIM, and
the global error against an accurate probability-flow ODE solution from the same x_T (drawn from the exact p_T)
falls with NFE at the solver's order (log-log slope in a tolerant window); plus one clear ValueError per invalid
input. float64 throughout, so rounding does not flatten the slopes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.diffusion import gmm, samplers as S
from jaxalign.diffusion.schedules import CosineVP, LinearVP


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@functools.cache
def problem(schedule_name="linear"):
    with jax.enable_x64(True):
        sch = LinearVP() if schedule_name == "linear" else CosineVP()
        mix = gmm.mixture_2d()
        model = gmm.eps_model(mix, sch)
        x_T = gmm.sample_marginal(mix, sch, jax.random.PRNGKey(0), 16, sch.t_max)
        return sch, model, x_T, S.reference_ode(model, sch, x_T, steps=2000)


def rms_error(x, ref):
    return float(jnp.sqrt(jnp.mean(jnp.sum((x - ref) ** 2, -1))))


@pytest.mark.parametrize("spacing", ["logsnr", "time"])
def test_dpm_solver_1_equals_ddim(spacing):
    sch, model, x_T, _ = problem()
    ts = S.make_timesteps(sch, 10, spacing)
    np.testing.assert_allclose(S.dpm_solver(model, sch, x_T, ts, order=1), S.ddim(model, sch, x_T, ts),
                               rtol=1e-10, atol=1e-10)
    x32 = x_T.astype(jnp.float32)
    np.testing.assert_allclose(S.dpm_solver(model, sch, x32, ts, order=1), S.ddim(model, sch, x32, ts),
                               rtol=2e-5, atol=2e-5)


ORDER_CASES = [
    ("ddim", (16, 32, 64), (-1.25, -0.75)),
    ("euler", (16, 32, 64), (-1.25, -0.75)),
    ("dpm_solver_2", (32, 64, 128), (-2.4, -1.6)),
    ("dpm_solver_pp_2s", (32, 64, 128), (-2.4, -1.6)),
    ("dpm_solver_pp_2m", (32, 64, 128), (-2.4, -1.6)),
    ("dpm_solver_3", (24, 48, 96), (-4.1, -2.6)),
]


@pytest.mark.parametrize("solver,nfes,window", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_empirical_order_of_convergence(solver, nfes, window):
    sch, model, x_T, ref = problem()
    errors = [rms_error(S.sample(solver, model, sch, x_T, nfe), ref) for nfe in nfes]
    slope = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    print(f"{solver}: NFE {nfes} errors {errors} slope {slope:.2f}")
    assert window[0] < slope < window[1], (solver, errors, slope)
    assert errors[-1] > 1e-9  # still far above the reference's own error, so the slope is the solver's


def test_third_order_on_the_cosine_schedule():
    sch, model, x_T, ref = problem("cosine")
    nfes = (24, 48, 96)
    errors = [rms_error(S.sample("dpm_solver_3", model, sch, x_T, nfe), ref) for nfe in nfes]
    assert -4.1 < np.polyfit(np.log(nfes), np.log(errors), 1)[0] < -2.6, errors


def test_reference_is_converged():
    sch, model, x_T, ref = problem()
    assert rms_error(S.reference_ode(model, sch, x_T, steps=500), ref) < 1e-7


def test_sample_plan_spends_exactly_the_nfe():
    sch = LinearVP()
    assert S.singlestep_orders(10, 3) == (3, 3, 3, 1) and S.singlestep_orders(5, 2) == (2, 2, 1)
    ts, kw = S.plan("dpm_solver_3", sch, 20)
    assert sum(kw["order"]) == 20 and len(ts) == len(kw["order"]) + 1
    ts, kw = S.plan("dpm_solver_pp_2m", sch, 7, spacing="time")
    assert len(ts) == 8 and kw == {} and ts[0] == sch.t_max and ts[-1] == 1e-3
    calls = []
    sch, model, x_T, _ = problem()

    def counting(x, t):
        calls.append(1)  # traced once per distinct call site, i.e. per model evaluation in the unrolled plan
        return model(x, t)

    S.sample("dpm_solver_3", counting, sch, x_T, 5)  # (3, 2): one scan body per run, 3 + 2 call sites
    assert len(calls) == 1 + 3 + 2  # the shape check's eval_shape traces once


@pytest.mark.parametrize("timesteps,match", [
    ([0.5, 0.8, 1e-3], "strictly decreasing"),
    ([1.0, 0.5, 0.5], "strictly decreasing"),
    ([1.2, 0.5, 1e-3], r"lie in \(0, 1.0\]"),
    ([1.0, 0.5, 0.0], r"lie in \(0, 1.0\]"),
    ([[1.0, 0.5]], "1-D"),
    ([1.0], "1-D"),
])
def test_invalid_timesteps_are_one_value_error(timesteps, match):
    sch, model, x_T, _ = problem()
    for solver in (S.ddim, S.dpm_solver, S.dpm_solver_pp_2s, S.dpm_solver_pp_2m, S.euler):
        with pytest.raises(ValueError, match=match):
            solver(model, sch, x_T, np.asarray(timesteps))


def test_too_small_nfe_and_bad_orders_are_one_value_error():
    sch, model, x_T, _ = problem()
    with pytest.raises(ValueError, match="order-3 solver needs at least 3"):
        S.plan("dpm_solver_3", sch, 2)
    with pytest.raises(ValueError, match="needs at least 2 function evaluations"):
        S.sample("dpm_solver_pp_2m", model, sch, x_T, 1)
    with pytest.raises(ValueError, match="at least 2 steps"):
        S.dpm_solver_pp_2m(model, sch, x_T, [1.0, 1e-3])
    with pytest.raises(ValueError, match="one per step"):
        S.dpm_solver(model, sch, x_T, [1.0, 0.5, 1e-3], order=(3,))
    with pytest.raises(ValueError, match="one per step"):
        S.dpm_solver_pp_2s(model, sch, x_T, [1.0, 1e-3], order=3)
    with pytest.raises(ValueError, match="unknown solver"):
        S.plan("rk45", sch, 10)


def test_mismatched_shapes_are_one_value_error():
    sch, model, x_T, _ = problem()
    ts = S.make_timesteps(sch, 4)
    with pytest.raises(ValueError, match=r"must return eps of the sample's shape \(2,\)"):
        S.ddim(lambda x, t: model(x, t)[:1], sch, x_T, ts)
    with pytest.raises(ValueError, match="batch"):
        S.dpm_solver(model, sch, x_T[0], ts)
    with pytest.raises(ValueError, match=r"fails on one sample of x_T's shape \(3,\)"):
        S.euler(model, sch, jnp.zeros((4, 3)), ts)
