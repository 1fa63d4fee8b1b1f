"""Brute-force references for tiny MDPs: enumerate every deterministic history-dependent policy.

Independent of dp.py (no Bellman recursion over stocks): a history is the tuple (s_0, r_0, s_1, ..., r_{t-1},
s_t); a deterministic history-dependent policy maps each history it can reach to an action; its final-stock law is
found by expanding the tree of histories. The optimum over this class is the target that stock-augmented
distributional DP must match (Avila Pires et al. 2025, arXiv 2501.13028: stock-augmented policies are optimal
among history-dependent ones for the objectives they can optimise). Exponential: keep S, A, horizon and the number
of outcomes per (s, a) tiny; `max_policies` guards against accidental blow-ups.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

from agents.distributional_dp.mdp import FiniteMDP
from agents.distributional_dp.objectives import Objective


def final_support(mdp: FiniteMDP, initial_stock: int = 0) -> np.ndarray:
    return np.arange(initial_stock + mdp.horizon * mdp.reward_min, initial_stock + mdp.horizon * mdp.reward_max + 1)


def _outcomes(mdp: FiniteMDP, s: int, a: int):
    s2s, ks = np.nonzero(mdp.kernel[s, a])
    return [(int(s2), mdp.reward_min + int(k), float(mdp.kernel[s, a, s2, k])) for s2, k in zip(s2s, ks)]


def final_stock_pmf(mdp: FiniteMDP, policy: Callable[[tuple], object], initial_stock: int = 0) -> np.ndarray:
    """The law of c_0 + G over final_support(mdp, initial_stock) under a history-dependent policy: policy(history)
    returns an action (int) or action probabilities [A]. Computed by expanding every trajectory."""
    support = final_support(mdp, initial_stock)
    frontier = [((s0,), initial_stock, float(p)) for s0, p in enumerate(mdp.initial) if p > 0]
    for _ in range(mdp.horizon):
        nxt = []
        for history, stock, prob in frontier:
            choice = policy(history)
            probs = np.eye(mdp.num_actions)[int(choice)] if np.isscalar(choice) else np.asarray(choice, float)
            for a in np.nonzero(probs)[0]:
                for s2, r, p in _outcomes(mdp, history[-1], int(a)):
                    nxt.append((history + (r, s2), stock + r, prob * probs[a] * p))
        frontier = nxt
    pmf = np.zeros(len(support))
    for _, stock, prob in frontier:
        pmf[stock - support[0]] += prob
    return pmf


def enumerate_history_policies(mdp: FiniteMDP, initial_stock: int = 0, max_policies: int = 200_000,
                               with_policies: bool = False):
    """The final-stock law of every deterministic history-dependent policy (one row per policy, distinguished on
    reachable histories). Returns (support [F], pmfs [n, F], policies): policies[j] is a dict history -> action
    when with_policies, else None."""
    support = final_support(mdp, initial_stock)
    n_atoms = len(support)

    def combine(acc, acc_pols, p, sub, sub_pols):
        if acc.shape[0] * sub.shape[0] > max_policies:
            raise ValueError(f"more than max_policies={max_policies} history-dependent policies: use a smaller MDP "
                             f"(fewer states, actions, outcomes per action or a shorter horizon)")
        acc = (acc[:, None, :] + p * sub[None, :, :]).reshape(-1, n_atoms)
        if with_policies:
            acc_pols = [{**x, **y} for x in acc_pols for y in sub_pols]
        return acc, acc_pols

    def options(history, stock, t):
        if t == mdp.horizon:
            pmf = np.zeros((1, n_atoms))
            pmf[0, stock - support[0]] = 1.0
            return pmf, [{}]
        all_pmfs, all_pols = [], []
        for a in range(mdp.num_actions):
            acc, acc_pols = np.zeros((1, n_atoms)), [{history: a}]
            for s2, r, p in _outcomes(mdp, history[-1], a):
                sub, sub_pols = options(history + (r, s2), stock + r, t + 1)
                acc, acc_pols = combine(acc, acc_pols, p, sub, sub_pols)
            all_pmfs.append(acc)
            all_pols.extend(acc_pols)
        pmfs = np.concatenate(all_pmfs)
        if pmfs.shape[0] > max_policies:
            raise ValueError(f"more than max_policies={max_policies} history-dependent policies: use a smaller MDP")
        return pmfs, all_pols

    acc, acc_pols = np.zeros((1, n_atoms)), [{}]
    for s0, p in enumerate(mdp.initial):
        if p > 0:
            sub, sub_pols = options((s0,), initial_stock, 0)
            acc, acc_pols = combine(acc, acc_pols, float(p), sub, sub_pols)
    return support, acc, (acc_pols if with_policies else None)


def best_history_policy(mdp: FiniteMDP, objective: Objective, initial_stock: int = 0,
                        max_policies: int = 200_000, with_policy: bool = False):
    """max over deterministic history-dependent policies of K(law of c_0 + G). Returns (value, pmf, policy or
    None)."""
    support, pmfs, pols = enumerate_history_policies(mdp, initial_stock, max_policies, with_policy)
    values = objective(pmfs, support)
    j = int(np.argmax(values))
    return float(values[j]), pmfs[j], (pols[j] if with_policy else None)


def enumerate_markov_policies(mdp: FiniteMDP, initial_stock: int = 0, stationary: bool = False):
    """Every deterministic Markov policy of the original state space, actions [H, S] (time-dependent) or [S]
    (stationary), with its final-stock law. Returns (support, pmfs [n, F], actions list)."""
    support = final_support(mdp, initial_stock)
    shape = (mdp.num_states,) if stationary else (mdp.horizon, mdp.num_states)
    all_actions, pmfs = [], []
    for flat in itertools.product(range(mdp.num_actions), repeat=int(np.prod(shape))):
        actions = np.array(flat).reshape(shape)
        if stationary:
            fn = lambda h, actions=actions: int(actions[h[-1]])
        else:
            fn = lambda h, actions=actions: int(actions[len(h) // 2, h[-1]])
        all_actions.append(actions)
        pmfs.append(final_stock_pmf(mdp, fn, initial_stock))
    return support, np.array(pmfs), all_actions


def best_markov_policy(mdp: FiniteMDP, objective: Objective, initial_stock: int = 0, stationary: bool = False):
    """max over deterministic Markov policies pi(s, t) (or pi(s)) of K. Returns (value, pmf, actions)."""
    support, pmfs, actions = enumerate_markov_policies(mdp, initial_stock, stationary)
    values = objective(pmfs, support)
    j = int(np.argmax(values))
    return float(values[j]), pmfs[j], actions[j]


def count_history_policies(mdp: FiniteMDP) -> int:
    """The number of deterministic history-dependent policies (distinct on reachable histories)."""

    def count(s, t):
        if t == mdp.horizon:
            return 1
        return sum(int(np.prod([count(s2, t + 1) for s2, _, _ in _outcomes(mdp, s, a)]))
                   for a in range(mdp.num_actions))

    return int(np.prod([count(s0, 0) for s0, p in enumerate(mdp.initial) if p > 0]))

