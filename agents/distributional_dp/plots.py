"""Plot the optimal return distributions of several objectives on one MDP (one bar chart per objective).

    python -m agents.distributional_dp.plots --out /tmp/ddp_objectives.png

Each panel is the exact law of G (initial stock 0) under the optimal stock-augmented policy for that objective:
greedy value iteration for expected utilities, the initial-stock sweeps for CVaR and VaR (dp.py).
"""
from __future__ import annotations

import argparse
from typing import Dict, Sequence

import numpy as np

from agents.distributional_dp import dp
from agents.distributional_dp import objectives as obj
from agents.distributional_dp.mdp import FiniteMDP, random_mdp
from jaxalign import paths


def optimal_return_distributions(mdp: FiniteMDP, utilities: Dict[str, obj.Objective],
                                 cvar_alphas: Sequence[float] = (), var_alphas: Sequence[float] = ()):
    """{label: (support of G, pmf of G, optimal value)} for each expected-utility objective (value iteration) and
    each CVaR / VaR level (initial-stock sweeps), all from initial stock 0."""
    out = {}
    for label, objective in utilities.items():
        if not objective.is_expected_utility:
            raise ValueError(f"{label}: {objective.name} is not an expected utility of the final stock; greedy "
                             f"value iteration does not optimise it (use cvar_alphas / var_alphas)")
        sol = dp.value_iteration(mdp, objective)
        support = sol.grid.final_support
        out[label] = (support, sol.final_stock_pmf(mdp), sol.value(mdp, objective))
    for alpha in cvar_alphas:
        s = dp.optimise_cvar(mdp, alpha)
        out[f"CVaR_{alpha}"] = (s.return_support, s.return_pmf, s.value)
    for alpha in var_alphas:
        s = dp.optimise_var(mdp, alpha)
        out[f"VaR_{alpha}"] = (s.return_support, s.return_pmf, s.value)
    return out


def plot_return_distributions(results, path: str, title: str = "optimal return distributions") -> str:
    """Save one bar chart per entry of optimal_return_distributions' result to `path` (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    n = len(results)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (label, (support, pmf, value)) in zip(axes, results.items()):
        ax.bar(support, pmf, width=0.8)
        ax.set_title(f"{label}: {value:.3f}", fontsize=9)
        ax.set_xlabel("return G")
        ax.set_ylabel("probability")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    paths.save_figure(fig, path, dpi=100)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ddp_objectives.png")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=6)
    args = parser.parse_args(argv)
    mdp = random_mdp(args.seed, num_states=4, num_actions=3, horizon=args.horizon, reward_values=(-2, -1, 0, 1, 3),
                     outcomes_per_action=3)
    results = optimal_return_distributions(
        mdp,
        {"mean": obj.mean(), "P(G >= 4)": obj.threshold_probability(4),
         "P(|G - 2| <= 1)": obj.homeostatic_probability(2, 1), "-E|G - 2|": obj.homeostatic_deviation(2)},
        cvar_alphas=(0.2,), var_alphas=(0.5,))
    print(plot_return_distributions(results, args.out, title=f"random_mdp(seed={args.seed}), H={args.horizon}"))


if __name__ == "__main__":
    main()
