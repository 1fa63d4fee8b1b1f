"""Exact stock-augmented distributional DP: policy evaluation, value iteration, policy iteration, CVaR / VaR sweeps.

Avila Pires et al. 2025, "Optimizing Return Distributions with Distributional Dynamic Programming" (arXiv
2501.13028), Section 4, specialised to a finite horizon, gamma = 1 and integer rewards (see mdp.py). The
distributional value eta_t(s, c) is the law of the final stock c + G_t (G_t the rewards from t on) when the agent
is in state s with stock c at time t; its Bellman equation for an action a is

    eta_t(s, c, a) = sum_{s', r} p(s', r | s, a) eta_{t+1}(s', c + r),        eta_H(s, c) = delta_c,

a mixture of next-step distributions indexed by the next stock: no shift or projection of atoms is needed, the
stock carries the shift. With time in the state, the paper's distributional value iteration from eta_H reaches
its fixed point after exactly H backups (backward induction); policy iteration evaluates a stock-augmented
policy pi_t(s, c) and improves it greedily, pi_t(s, c) <- argmax_a K(eta^pi_t(s, c, a)), until it is stable.

Why greedy is exact for K(eta) = E f(X): the law of the final stock under any history-dependent policy from a
history ending in (s, c, t) is a mixture, over the first outcome (s', r), of laws of continuations from histories
ending in (s', c + r, t + 1). K is linear in mixtures, so by induction on H - t the best value over all
history-dependent policies from such a history is V_t(s, c) = max_a sum p(s', r | s, a) V_{t+1}(s', c + r), a
function of (s, c, t) alone, and the greedy policy attains it; with s_0 random the same argument applies to the
mixture over s_0. Threshold probabilities and homeostatic objectives are such expected utilities of the final
stock, so greedy DP optimises them exactly (tested against brute-force enumeration of history-dependent policies).
The paper's analysis of which objectives distributional DP can optimise rests on this kind of property ("indifference
to mixtures"); mean - lambda variance lacks it, and greedy DP can be strictly suboptimal
(mdp.mean_variance_trap_mdp).

CVaR_alpha is not an expected utility of X, but (Bauerle & Ott 2011, "Markov decision processes with
average-value-at-risk criteria"; Rockafellar & Uryasev 2000) CVaR_alpha(G) = max_b {b - E(b - G)^+ / alpha} =
max_b {b + E min(c_0 + G, 0) / alpha} with c_0 = -b: for each b an expected utility of the final stock with
f(x) = min(x, 0). One value iteration over the range of initial stocks solves all b at once; optimise_cvar then
maximises over b (integers suffice: b -> b - E(b - G)^+ / alpha is piecewise linear with kinks at the integer
atoms of G). optimise_var applies the same initial-stock sweep to quantiles: VaR_alpha(G) >= z iff
P(G >= z) > 1 - alpha, an expected utility of the final stock c_0 + G with c_0 = -z.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from agents.distributional_dp.distributions import StockGrid
from agents.distributional_dp.mdp import FiniteMDP
from agents.distributional_dp.objectives import Objective, expected_utility

_TIE = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class DPSolution:
    """The result of evaluation / value iteration / policy iteration.

    policy[t]: int [S, N_t], the action at (s, stock grid.lo(t) + i), t = 0..H-1.
    distributions[t]: float [S, N_t, F], eta_t(s, c) over the final-stock support grid.final_support, t = 0..H.
    values[t]: float [S, N_t], K(eta_t(s, c)) (None for plain evaluation without an objective).
    """

    grid: StockGrid
    policy: tuple
    distributions: tuple
    values: Optional[tuple] = None
    iterations: int = 0
    converged: bool = True

    def final_stock_pmf(self, mdp: FiniteMDP, initial_stock: int = 0) -> np.ndarray:
        """The law of c_H = c_0 + G from s_0 ~ mdp.initial and the given c_0, over grid.final_support."""
        return mdp.initial @ self.distributions[0][:, self.grid.index(0, initial_stock), :]

    def value(self, mdp: FiniteMDP, objective: Objective, initial_stock: int = 0) -> float:
        return float(objective(self.final_stock_pmf(mdp, initial_stock), self.grid.final_support))

    def action(self, t: int, state: int, stock: int) -> int:
        return int(self.policy[t][state, self.grid.index(t, stock)])


def backup(mdp: FiniteMDP, grid: StockGrid, t: int, eta_next: np.ndarray) -> np.ndarray:
    """The distributional Bellman backup for every action: q[s, a, i] = sum_{s', k} p(s', r_min + k | s, a)
    eta_{t+1}[s', i + k] over the final-stock support. eta_next [S, N_{t+1}, F] -> q [S, A, N_t, F]."""
    n_t, n_rewards = grid.size(t), mdp.kernel.shape[3]
    if eta_next.shape[:2] != (mdp.num_states, grid.size(t + 1)):
        raise ValueError(f"eta_{t + 1} has shape {eta_next.shape}; expected [{mdp.num_states}, {grid.size(t + 1)}, F]")
    # Reward column k moves stock index i (time t) to i + k (time t + 1).
    shifted = np.stack([eta_next[:, k:k + n_t, :] for k in range(n_rewards)])  # [K, S', N_t, F]
    return np.einsum("sapk,kpif->saif", mdp.kernel, shifted)


def _terminal(grid: StockGrid, num_states: int) -> np.ndarray:
    n = grid.size(grid.horizon)
    return np.broadcast_to(np.eye(n), (num_states, n, n)).copy()


def _as_action_probs(pi_t: np.ndarray, num_states: int, n_t: int, num_actions: int, t: int) -> np.ndarray:
    pi_t = np.asarray(pi_t)
    if pi_t.shape == (num_states, n_t) and np.issubdtype(pi_t.dtype, np.integer):
        if pi_t.min() < 0 or pi_t.max() >= num_actions:
            raise ValueError(f"policy[{t}] holds actions outside [0, {num_actions})")
        return np.eye(num_actions)[pi_t]
    if pi_t.shape == (num_states, n_t, num_actions):
        if np.any(pi_t < 0) or np.any(np.abs(pi_t.sum(-1) - 1) > 1e-9):
            raise ValueError(f"policy[{t}] action probabilities must be non-negative and sum to 1")
        return pi_t.astype(np.float64)
    raise ValueError(f"policy[{t}] must be int [S, N_t] = [{num_states}, {n_t}] or probabilities "
                     f"[S, N_t, A] = [{num_states}, {n_t}, {num_actions}]; got {pi_t.shape} {pi_t.dtype}")


def _grid(mdp, initial_stocks):
    return initial_stocks if isinstance(initial_stocks, StockGrid) else StockGrid.for_mdp(mdp, initial_stocks)


def evaluate_policy(mdp: FiniteMDP, policy: Sequence[np.ndarray], initial_stocks=0) -> DPSolution:
    """Distributional policy evaluation of a stock-augmented policy: policy[t] is int [S, N_t] (deterministic) or
    float [S, N_t, A] (stochastic) on the StockGrid for `initial_stocks` (an int or an inclusive range)."""
    grid = _grid(mdp, initial_stocks)
    if len(policy) != mdp.horizon:
        raise ValueError(f"policy must have one entry per time step t = 0..{mdp.horizon - 1}; got {len(policy)}")
    eta = [None] * (mdp.horizon + 1)
    eta[mdp.horizon] = _terminal(grid, mdp.num_states)
    for t in reversed(range(mdp.horizon)):
        probs = _as_action_probs(policy[t], mdp.num_states, grid.size(t), mdp.num_actions, t)
        eta[t] = np.einsum("sia,saif->sif", probs, backup(mdp, grid, t, eta[t + 1]))
    return DPSolution(grid, tuple(np.asarray(p) for p in policy), tuple(eta))


def markov_policy(mdp: FiniteMDP, actions, initial_stocks=0) -> tuple:
    """Lift a Markov policy of the original state space, actions int [H, S] (or [S], stationary), to the
    stock-augmented representation (the same action at every stock)."""
    grid = _grid(mdp, initial_stocks)
    actions = np.asarray(actions)
    if actions.shape == (mdp.num_states,):
        actions = np.broadcast_to(actions, (mdp.horizon, mdp.num_states))
    if actions.shape != (mdp.horizon, mdp.num_states):
        raise ValueError(f"a Markov policy has shape [H, S] = [{mdp.horizon}, {mdp.num_states}] or [S]; got "
                         f"{actions.shape}")
    return tuple(np.repeat(actions[t][:, None], grid.size(t), axis=1).astype(np.int64) for t in range(mdp.horizon))


def _greedy(objective: Objective, q: np.ndarray, support: np.ndarray, current: Optional[np.ndarray] = None):
    """argmax_a K(q[s, a, i]) -> (actions [S, N_t], values [S, N_t]); ties go to `current` if it is among the
    maximisers (so policy iteration stops), else to the lowest action."""
    k = objective(q, support)  # [S, A, N_t]
    best = k.max(axis=1)
    is_max = k >= best[:, None, :] - _TIE * (1.0 + np.abs(best[:, None, :]))
    actions = np.argmax(is_max, axis=1)
    if current is not None:
        keep = np.take_along_axis(is_max, current[:, None, :], axis=1)[:, 0, :]
        actions = np.where(keep, current, actions)
    return actions.astype(np.int64), np.take_along_axis(k, actions[:, None, :], axis=1)[:, 0, :]


def value_iteration(mdp: FiniteMDP, objective: Objective, initial_stocks=0) -> DPSolution:
    """Greedy distributional value iteration over (s, c, t): H backups from eta_H(s, c) = delta_c, each choosing
    argmax_a K(eta_t(s, c, a)). Exact for expected utilities of the final stock (module docstring)."""
    grid = _grid(mdp, initial_stocks)
    support = grid.final_support
    eta = [None] * (mdp.horizon + 1)
    policy = [None] * mdp.horizon
    values = [None] * (mdp.horizon + 1)
    eta[mdp.horizon] = _terminal(grid, mdp.num_states)
    values[mdp.horizon] = objective(eta[mdp.horizon], support)
    for t in reversed(range(mdp.horizon)):
        q = backup(mdp, grid, t, eta[t + 1])
        policy[t], values[t] = _greedy(objective, q, support)
        eta[t] = np.take_along_axis(q, policy[t][:, None, :, None], axis=1)[:, 0]
    return DPSolution(grid, tuple(policy), tuple(eta), tuple(values), iterations=mdp.horizon)


def policy_iteration(mdp: FiniteMDP, objective: Objective, initial_stocks=0, initial_policy=None,
                     max_iterations: int = 100) -> DPSolution:
    """Distributional policy iteration: evaluate pi, set pi_t(s, c) <- argmax_a K(sum p eta^pi_{t+1}(s', c + r))
    at every (s, c, t) at once, repeat until pi is unchanged. For expected utilities it stops after at most H + 1
    evaluations (after iteration j the last j steps are optimal). `converged` is False if max_iterations ran out
    (possible for objectives that are not expected utilities)."""
    grid = _grid(mdp, initial_stocks)
    support = grid.final_support
    if initial_policy is None:
        initial_policy = tuple(np.zeros((mdp.num_states, grid.size(t)), np.int64) for t in range(mdp.horizon))
    policy = tuple(np.asarray(p, dtype=np.int64) for p in initial_policy)
    for iteration in range(1, max_iterations + 1):
        sol = evaluate_policy(mdp, policy, grid)
        new_policy = tuple(_greedy(objective, backup(mdp, grid, t, sol.distributions[t + 1]), support, policy[t])[0]
                           for t in range(mdp.horizon))
        if all(np.array_equal(a, b) for a, b in zip(new_policy, policy)):
            values = tuple(objective(d, support) for d in sol.distributions)
            return dataclasses.replace(sol, values=values, iterations=iteration, converged=True)
        policy = new_policy
    sol = evaluate_policy(mdp, policy, grid)
    values = tuple(objective(d, support) for d in sol.distributions)
    return dataclasses.replace(sol, values=values, iterations=max_iterations, converged=False)


@dataclasses.dataclass(frozen=True, eq=False)
class SweepSolution:
    """The optimum of an objective solved by an initial-stock sweep (CVaR, VaR): run solution.policy from stock
    initial_stock = -b_star.

    value: the optimum over history-dependent policies. b_star: the maximising level (for CVaR a VaR of the optimal
    G; for VaR the optimal quantile itself). sweep_b / sweep_values: each integer level b and the best value of
    the level-b problem (CVaR: max_pi b - E(b - G)^+ / alpha; VaR: max_pi P(G >= b)).
    return_support / return_pmf: the law of G under the optimal policy.
    """

    objective: str
    alpha: float
    value: float
    b_star: int
    initial_stock: int
    solution: DPSolution
    sweep_b: np.ndarray
    sweep_values: np.ndarray
    return_support: np.ndarray
    return_pmf: np.ndarray


CVaRSolution = SweepSolution


def _stock_sweep(mdp: FiniteMDP, utility: Objective, method: str):
    """One DP for K = E f(c_0 + G) over every initial stock c_0 in [-H r_max, -H r_min], i.e. every level b = -c_0
    in the support of G. Returns (levels b ascending, E_{s_0} V_0(s_0, -b), solution)."""
    h = mdp.horizon
    levels = np.arange(h * mdp.reward_min, h * mdp.reward_max + 1)
    grid = StockGrid.for_mdp(mdp, (-int(levels[-1]), -int(levels[0])))
    if method == "value_iteration":
        sol = value_iteration(mdp, utility, grid)
    elif method == "policy_iteration":
        sol = policy_iteration(mdp, utility, grid)
    else:
        raise ValueError(f"method must be 'value_iteration' or 'policy_iteration'; got {method!r}")
    v0 = mdp.initial @ sol.values[0]  # indexed by c_0 = grid.lo(0) + i, i.e. b = -c_0 descending
    return levels, v0[::-1], sol


def _return_law(mdp: FiniteMDP, sol: DPSolution, b_star: int):
    """The law of G = c_H + b* under sol's policy started at c_0 = -b*, on the support [H r_min, H r_max]."""
    support = np.arange(mdp.horizon * mdp.reward_min, mdp.horizon * mdp.reward_max + 1)
    start = int(support[0] - b_star - sol.grid.lo(mdp.horizon))
    pmf = sol.final_stock_pmf(mdp, -b_star)[start:start + len(support)]
    if abs(pmf.sum() - 1.0) > 1e-9:
        raise AssertionError("internal error: the optimal policy's return distribution left the G support")
    return support, pmf


def optimise_cvar(mdp: FiniteMDP, alpha: float, method: str = "value_iteration") -> SweepSolution:
    """Maximise CVaR_alpha(G) over history-dependent policies by the initial-stock sweep (Bauerle & Ott 2011;
    Avila Pires et al. 2025, Section 5): one DP with K = E min(c_0 + G, 0) over c_0 in [-H r_max, -H r_min], then
    b* = argmax_b b + E_{s_0} V_0(s_0, -b) / alpha, policy started at stock -b*."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"optimise_cvar needs alpha in (0, 1]; got {alpha!r}")
    shortfall = expected_utility(lambda x: np.minimum(x, 0.0), name="E min(X, 0)")
    levels, v, sol = _stock_sweep(mdp, shortfall, method)
    sweep = levels + v / alpha
    j = int(np.argmax(sweep))
    support, pmf = _return_law(mdp, sol, int(levels[j]))
    return SweepSolution(objective=f"CVaR_{alpha}", alpha=alpha, value=float(sweep[j]), b_star=int(levels[j]),
                         initial_stock=-int(levels[j]), solution=sol, sweep_b=levels, sweep_values=sweep,
                         return_support=support, return_pmf=pmf)


def optimise_var(mdp: FiniteMDP, alpha: float, method: str = "value_iteration") -> SweepSolution:
    """Maximise the lower alpha-quantile VaR_alpha(G) = min{z : P(G <= z) >= alpha} over history-dependent
    policies. Greedy DP with K = VaR_alpha is not exact (tested), but for integer G, VaR_alpha(G) >= z iff
    P(G >= z) > 1 - alpha, and max_pi P(c_0 + G >= 0) with c_0 = -z is an expected utility: one DP with
    f(x) = 1{x >= 0} over all initial stocks, then z* = the largest z whose optimal probability exceeds 1 - alpha
    (with the 1e-12 slack of objectives.value_at_risk)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"optimise_var needs alpha in (0, 1]; got {alpha!r}")
    reach = expected_utility(lambda x: (x >= 0).astype(np.float64), name="P(X >= 0)")
    levels, v, sol = _stock_sweep(mdp, reach, method)
    feasible = np.nonzero(v > 1.0 - alpha + 1e-12)[0]
    j = int(feasible[-1])  # z = H r_min is always feasible: P(G >= H r_min) = 1
    support, pmf = _return_law(mdp, sol, int(levels[j]))
    return SweepSolution(objective=f"VaR_{alpha}", alpha=alpha, value=float(levels[j]), b_star=int(levels[j]),
                         initial_stock=-int(levels[j]), solution=sol, sweep_b=levels, sweep_values=v,
                         return_support=support, return_pmf=pmf)
