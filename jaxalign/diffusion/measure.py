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
"""
from __future__ import annotations

import argparse

import jax

from jaxalign.diffusion import gmm, rk45, samplers
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--nfes", default="5,10,20")
    parser.add_argument("--schedule", default="linear")
    args = parser.parse_args(argv)
    nfes = tuple(int(k) for k in args.nfes.split(","))
    print(format_table(distance_table(nfes, args.n, args.schedule)))


if __name__ == "__main__":
    main()
