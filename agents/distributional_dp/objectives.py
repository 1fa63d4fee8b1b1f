"""Objective functionals K of the final-stock distribution (Avila Pires et al. 2025, arXiv 2501.13028, Sections 3
and 5).

An `Objective` maps probability vectors pmf [..., F] over an integer support [F] (ascending) to values [...].
Objectives of the form K(eta) = E_{X ~ eta} f(X) carry their utility f: these are the ones greedy stock-augmented
distributional DP optimises exactly (see dp.py); `utility is None` marks functionals that are not expected
utilities of the final stock (CVaR, quantiles, mean-variance), which greedy DP does not optimise in general.

  expected_utility(f)              E f(X)
  mean()                           E X (risk-neutral RL)
  threshold_probability(tau)       P(X >= tau): with non-negative rewards, the probability of reaching tau
  homeostatic_probability(m, w)    P(|X - m| <= w): end within the band [m - w, m + w]
  homeostatic_deviation(m, p)      -E|X - m|^p: end near the set point m
  cvar(alpha)                      mean of the lower alpha tail; optimised by dp.optimise_cvar, not greedily
  value_at_risk(alpha)             the lower alpha-quantile; optimised by dp.optimise_var, not greedily
  mean_variance(lam)               E X - lam Var X: not optimisable by greedy DP (mdp.mean_variance_trap_mdp)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Objective:
    """A functional K(pmf, support) -> value; `utility` is f when K = E f(X), else None."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
    utility: Optional[Callable[[np.ndarray], np.ndarray]] = None

    def __call__(self, pmf, support) -> np.ndarray:
        pmf = np.asarray(pmf, dtype=np.float64)
        support = np.asarray(support, dtype=np.float64)
        if pmf.shape[-1] != support.shape[0]:
            raise ValueError(f"objective {self.name}: pmf has {pmf.shape[-1]} atoms but the support has "
                             f"{support.shape[0]}")
        return self.fn(pmf, support)

    @property
    def is_expected_utility(self) -> bool:
        return self.utility is not None


def expected_utility(f: Callable[[np.ndarray], np.ndarray], name: str = "expected_utility") -> Objective:
    """K(eta) = E_{X ~ eta} f(X) for a utility f applied elementwise to the support."""
    return Objective(name, lambda pmf, x: pmf @ np.asarray(f(x), dtype=np.float64), utility=f)


def mean() -> Objective:
    return expected_utility(lambda x: x, name="mean")


def threshold_probability(tau: float) -> Objective:
    """P(X >= tau) = E 1{X >= tau}."""
    return expected_utility(lambda x: (x >= tau).astype(np.float64), name=f"P(X>={tau})")


def homeostatic_probability(target: float, width: float) -> Objective:
    """P(target - width <= X <= target + width): finish inside the homeostatic band."""
    return expected_utility(lambda x: (np.abs(x - target) <= width).astype(np.float64),
                            name=f"P(|X-{target}|<={width})")


def homeostatic_deviation(target: float, power: float = 1.0) -> Objective:
    """-E|X - target|^power: finish near the set point (power 1: absolute, 2: squared deviation)."""
    return expected_utility(lambda x: -np.abs(x - target) ** power, name=f"-E|X-{target}|^{power}")


def _check_level(alpha: float, what: str):
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"{what} needs a level alpha in (0, 1]; got {alpha!r}")


def cvar(alpha: float) -> Objective:
    """CVaR_alpha(X): the mean of the lower alpha tail, (1/alpha) sum_x x min(p(x), (alpha - P(X < x))^+).

    Equals the Rockafellar-Uryasev / Bauerle-Ott form max_b {b - E(b - X)^+ / alpha} (tested); alpha = 1 is the
    mean. Not an expected utility of X: optimise it with dp.optimise_cvar.
    """
    _check_level(alpha, "cvar")

    def fn(pmf, x):
        below = np.cumsum(pmf, axis=-1) - pmf  # P(X < x_i)
        weight = np.clip(alpha - below, 0.0, pmf)
        return weight @ x / alpha

    return Objective(f"CVaR_{alpha}", fn)


def value_at_risk(alpha: float) -> Objective:
    """The lower alpha-quantile min{x : P(X <= x) >= alpha} (up to 1e-12 in the cdf). Not an expected utility:
    greedy DP can miss its optimum (tested); dp.optimise_var finds it by a threshold sweep."""
    _check_level(alpha, "value_at_risk")

    def fn(pmf, x):
        idx = np.argmax(np.cumsum(pmf, axis=-1) >= alpha - 1e-12, axis=-1)
        return x[idx]

    return Objective(f"VaR_{alpha}", fn)


def mean_variance(lam: float) -> Objective:
    """E X - lam Var X (Markowitz). Not indifferent to mixtures, so greedy distributional DP can miss its optimum:
    see mdp.mean_variance_trap_mdp."""

    def fn(pmf, x):
        m = pmf @ x
        return m - lam * (pmf @ (x * x) - m * m)

    return Objective(f"mean-{lam}var", fn)
