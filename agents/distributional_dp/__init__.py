"""Agent (a), tabular and exact: stock-augmented distributional dynamic programming.

Avila Pires, Rowland, Borsa, Guo, Khetarpal, Barreto, Abel, Munos, Dabney 2025, "Optimizing Return Distributions
with Distributional Dynamic Programming" (JMLR; arXiv 2501.13028). The state is augmented with the stock
c_{t+1} = c_t + r_t (the paper's (c_t + r_t) / gamma with gamma = 1), so the final stock c_H = c_0 + G; an
objective is a functional K of the law of c_H; distributional value / policy iteration act greedily w.r.t. K at
every (state, stock, time). With integer rewards and a finite horizon the return distributions are exact
categorical vectors over the integers.

  mdp.py            FiniteMDP (kernel p(s', r | s, a)), random and constructed examples
  distributions.py  StockGrid and categorical pmfs over integer stocks
  objectives.py     expected utility, threshold probability, homeostatic objectives, CVaR, VaR, mean-variance
  dp.py             evaluate_policy, value_iteration, policy_iteration, optimise_cvar (Bauerle-Ott sweep),
                    optimise_var (threshold sweep)
  brute_force.py    enumeration of all deterministic history-dependent (and Markov) policies on tiny MDPs
  plots.py          saving the optimal final-stock distributions of several objectives as a PNG
  deep.py           the deep agent: StockAugmented env wrapper, a quantile network with the stock as input acting
                    greedily w.r.t. an expected utility of the final stock (CVaR via Bauerle-Ott, homeostatic),
                    QR-DQN as its mean-greedy, stock-masked special case (imports JAX; not re-exported here)
  experiment.py     `jaxalign run ddp_gridworld`: deep agent vs tabular optimum vs QR-DQN on rl.envs.gridworld
"""
from agents.distributional_dp.distributions import StockGrid, mix, point_mass, shift
from agents.distributional_dp.dp import (CVaRSolution, DPSolution, SweepSolution, backup, evaluate_policy,
                                         markov_policy, optimise_cvar, optimise_var, policy_iteration,
                                         value_iteration)
from agents.distributional_dp.mdp import (FiniteMDP, cvar_recovery_mdp, lucky_start_mdp, mean_variance_trap_mdp,
                                          random_mdp)
from agents.distributional_dp.objectives import (Objective, cvar, expected_utility, homeostatic_deviation,
                                                 homeostatic_probability, mean, mean_variance, threshold_probability,
                                                 value_at_risk)

__all__ = [
    "FiniteMDP", "random_mdp", "lucky_start_mdp", "mean_variance_trap_mdp", "cvar_recovery_mdp",
    "StockGrid", "point_mass", "shift", "mix",
    "Objective", "expected_utility", "mean", "threshold_probability", "homeostatic_probability",
    "homeostatic_deviation", "cvar", "value_at_risk", "mean_variance",
    "DPSolution", "SweepSolution", "CVaRSolution", "backup", "evaluate_policy", "markov_policy", "value_iteration",
    "policy_iteration", "optimise_cvar", "optimise_var",
]
