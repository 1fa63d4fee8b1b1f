"""The distance to the target distribution of every sampler at a few NFEs on the 2-D Gaussian mixture with its
exact score (a measurement, not a test): x_T is drawn from the exact p_T, each sampler runs to t = 1e-3, and the
samples are scored by the squared MMD to the mixture itself (`gmm.mmd2_to_mixture`, closed-form mixture terms),
next to the same for exact samples of the data and for the accurate reference ODE solutions (the floors: fixed
RK4 and adaptive Dormand-Prince, `rk45`).

The rows include the solvers that register themselves in `samplers` (UniPC, DC-Solver, DPM-Solver-v3; the
package imports them). Two of them carry inputs fitted on the same exact-score model, outside the NFE budget, at each NFE:
DC-Solver fits its compensation ratios on the reference trajectories of the first 8 rows of x_T, DPM-Solver-v3
computes its empirical model statistics from the trajectories of (up to) the first 1024 rows (see
`dc_solver.sample_with_fitted_ratios` and `dpm_solver_v3.sample_with_model_ems`).

    .venv/bin/python -m jaxalign.diffusion.measure [--n 2000] [--nfes 5,10,20] [--schedule linear]

`--orders` prints instead the convergence report the README quotes (`convergence_report`): in float64, the RMS error
of 16 samples against the 2,000-step RK4 reference from the same x_T at NFE 24 / 48 / 96 and its log-log slope for
every fixed-step solver (DPM-Solver-v3 with the model's statistics and with the degenerate ones), v3's two at NFE 5
and 10, DC-Solver's fitted ratios against plain UniPC at NFE 5 / 10 / 20 / 40 (fitted on 8 other trajectories), the
cascade polynomial regression's predicted ratios at NFE 8 and 20 (fitted at 5, 10, 40), and RK45's error and
evaluations per sample at three tolerances.
"""
from __future__ import annotations

import argparse

import jax

import numpy as np

from jaxalign.diffusion import dc_solver, dpm_solver_v3, gmm, rk45, samplers, unipc
from jaxalign.diffusion.schedules import get_schedule


def distance_table(nfes=(5, 10, 20), n: int = 2000, schedule: str = "linear", seed: int = 0,
                   bandwidth: float = 0.5) -> dict[str, dict[int, float]]:
    """{solver: {nfe: MMD^2 to the mixture}}, plus rows 'exact samples' and 'reference ODE' (all NFEs equal)."""
    with jax.enable_x64(True):
        sch, mix = get_schedule(schedule), gmm.mixture_2d()
        model = gmm.eps_model(mix, sch)
        k_data, k_T = jax.random.split(jax.random.PRNGKey(seed))
        x_T = gmm.sample_marginal(mix, sch, k_T, n, sch.t_max)
        mmd = lambda xs: float(gmm.mmd2_to_mixture(xs, mix, bandwidth))
        table = {"exact samples": dict.fromkeys(nfes, mmd(gmm.sample(mix, k_data, n))),
                 "reference ODE": dict.fromkeys(nfes, mmd(samplers.reference_ode(model, sch, x_T))),
                 "RK45 reference": dict.fromkeys(nfes, mmd(rk45.rk45(model, sch, x_T)[0]))}
        for solver in samplers.ORDERS:
            table[solver] = {nfe: mmd(samplers.sample(solver, model, sch, x_T, nfe)) for nfe in nfes}
        return table


def format_table(table) -> str:
    nfes = list(next(iter(table.values())))
    lines = ["| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[k]:.2e}" for k in nfes) + " |" for name, row in table.items()]
    return "\n".join(lines)


def convergence_report(schedule: str = "linear", n: int = 16) -> list[str]:
    """The lines of the `--orders` report (module docstring), each "name: numbers"."""
    with jax.enable_x64(True):
        sch, mix = get_schedule(schedule), gmm.mixture_2d()
        model = gmm.eps_model(mix, sch)
        x_T = gmm.sample_marginal(mix, sch, jax.random.PRNGKey(0), n, sch.t_max)
        ref = samplers.reference_ode(model, sch, x_T)
        err = lambda x: float(np.sqrt(np.mean(np.sum((np.asarray(x) - np.asarray(ref)) ** 2, -1))))
        ems = dpm_solver_v3.compute_ems(model, sch, gmm.sample_marginal(mix, sch, jax.random.PRNGKey(1), 64,
                                                                         sch.t_max), samplers.make_timesteps(sch, 100))
        flat = ems._replace(l=np.ones_like(ems.l), s=np.zeros_like(ems.s), b=np.zeros_like(ems.b))
        by_nfe = {name: (lambda k, name=name: samplers.sample(name, model, sch, x_T, k))
                  for name in samplers.ORDERS if name not in ("dc_solver", "dpm_solver_v3")}
        v3 = {"model statistics": ems, "l=1, s=b=0": flat}
        for label, stats in v3.items():
            by_nfe[f"dpm_solver_v3 ({label})"] = lambda k, stats=stats: dpm_solver_v3.dpm_solver_v3(
                model, sch, x_T, samplers.make_timesteps(sch, k), stats)
        lines, nfes = [], (24, 48, 96)
        for name, run in by_nfe.items():
            errors = [err(run(k)) for k in nfes]
            rate = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
            lines.append(f"{name}: NFE {nfes} errors " + " ".join(f"{e:.2e}" for e in errors) + f" slope {rate:.2f}")
        for k in (5, 10):
            lines.append(f"dpm_solver_v3 NFE {k}: " + ", ".join(
                f"{label} {err(by_nfe[f'dpm_solver_v3 ({label})'](k)):.3e}" for label in v3))
        x_fit = gmm.sample_marginal(mix, sch, jax.random.PRNGKey(2), 8, sch.t_max)
        fitted = {}
        for k in (5, 10, 20, 40):
            ts = samplers.make_timesteps(sch, k)
            fitted[k] = np.asarray(dc_solver.fit_ratios(model, sch, x_fit, ts)[0])
            lines.append(f"DC-Solver NFE {k}: fitted ratios {err(dc_solver.dc_solver(model, sch, x_T, ts, fitted[k])):.3e}"
                         f", UniPC {err(unipc.unipc(model, sch, x_T, ts)):.3e}")
        cpr = dc_solver.fit_cpr({k: fitted[k] for k in (5, 10, 40)})
        for k in (8, 20):
            ts = samplers.make_timesteps(sch, k)
            predicted = dc_solver.dc_solver(model, sch, x_T, ts, dc_solver.predict_ratios(cpr, k))
            lines.append(f"DC-Solver NFE {k}, CPR ratios from NFE 5/10/40: {err(predicted):.3e}, "
                         f"UniPC {err(unipc.unipc(model, sch, x_T, ts)):.3e}")
        for tol in (1e-6, 1e-8, 1e-10):
            x, nfe = rk45.rk45(model, sch, x_T, rtol=tol, atol=tol)
            lines.append(f"RK45 rtol=atol={tol:g}: error {err(x):.2e}, NFE per sample {int(np.min(nfe))}-"
                         f"{int(np.max(nfe))}")
        return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--nfes", default="5,10,20")
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--orders", action="store_true", help="print the convergence report instead of the table")
    args = parser.parse_args(argv)
    if args.orders:
        print("\n".join(convergence_report(args.schedule)))
        return
    nfes = tuple(int(k) for k in args.nfes.split(","))
    print(format_table(distance_table(nfes, args.n, args.schedule)))


if __name__ == "__main__":
    main()
