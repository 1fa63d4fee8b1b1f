"""Exact categorical distributions over integer stocks.

With gamma = 1 and integer rewards, the stock c_t = c_0 + r_0 + ... + r_{t-1} and the final stock c_H are integers
in ranges known in advance, so a return distribution is a probability vector over a contiguous integer support:
the "categorical representation" of Avila Pires et al. 2025 (arXiv 2501.13028) with atoms on the integers, which
is exact (the distributional Bellman operator maps such vectors to such vectors without projection).

`StockGrid` fixes the supports: at time t the stock lies in [lo_t, hi_t] with lo_t = c0_min + t * r_min and
hi_t = c0_max + t * r_max; the final stock lies in [lo_H, hi_H]. Index i at time t is the stock lo_t + i, and a
reward r_min + k moves index i at time t to index i + k at time t + 1 (lo_{t+1} - lo_t = r_min).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from agents.distributional_dp.mdp import FiniteMDP


@dataclasses.dataclass(frozen=True)
class StockGrid:
    """The integer stock ranges of a FiniteMDP for initial stocks c_0 in [c0_min, c0_max]."""

    c0_min: int
    c0_max: int
    reward_min: int
    reward_max: int
    horizon: int

    def __post_init__(self):
        if self.c0_max < self.c0_min:
            raise ValueError(f"StockGrid needs c0_min <= c0_max; got c0_min={self.c0_min}, c0_max={self.c0_max}")

    @classmethod
    def for_mdp(cls, mdp: FiniteMDP, initial_stocks=(0, 0)) -> "StockGrid":
        """`initial_stocks` is an int c_0 or an inclusive integer range (c0_min, c0_max)."""
        if np.isscalar(initial_stocks):
            initial_stocks = (initial_stocks, initial_stocks)
        c0_min, c0_max = (int(v) for v in initial_stocks)
        if (c0_min, c0_max) != tuple(initial_stocks):
            raise ValueError(f"initial stocks must be integers; got {initial_stocks!r}")
        return cls(c0_min, c0_max, mdp.reward_min, mdp.reward_max, mdp.horizon)

    def lo(self, t: int) -> int:
        return self.c0_min + t * self.reward_min

    def hi(self, t: int) -> int:
        return self.c0_max + t * self.reward_max

    def size(self, t: int) -> int:
        return self.hi(t) - self.lo(t) + 1

    def stocks(self, t: int) -> np.ndarray:
        """The integer stocks at time t (t = H: the final-stock support)."""
        return np.arange(self.lo(t), self.hi(t) + 1)

    @property
    def final_support(self) -> np.ndarray:
        return self.stocks(self.horizon)

    def index(self, t: int, stock: int) -> int:
        if not self.lo(t) <= stock <= self.hi(t):
            raise ValueError(f"stock {stock} is outside the grid [{self.lo(t)}, {self.hi(t)}] at t={t}")
        return int(stock - self.lo(t))


def point_mass(value: int, support: np.ndarray) -> np.ndarray:
    """delta_value as a probability vector over the contiguous integer `support`."""
    lo = int(support[0])
    if not lo <= value <= int(support[-1]):
        raise ValueError(f"point mass at {value} is outside the support [{lo}, {int(support[-1])}]")
    pmf = np.zeros(len(support))
    pmf[int(value) - lo] = 1.0
    return pmf


def shift(pmf: np.ndarray, by: int, support: np.ndarray) -> np.ndarray:
    """The law of X + by for X ~ pmf (on the contiguous integer `support`, last axis), on the same support. Mass
    that would leave the support is an error, never silently clipped."""
    pmf = np.asarray(pmf, dtype=np.float64)
    n, by = pmf.shape[-1], int(by)
    if abs(by) >= n:
        lost = pmf
    else:
        lost = pmf[..., n - by:] if by > 0 else pmf[..., :-by]
    if by and np.any(lost > 0):
        raise ValueError(f"shifting by {by} moves probability mass outside the support [{support[0]}, {support[-1]}]")
    out = np.zeros_like(pmf)
    if by > 0:
        out[..., by:] = pmf[..., :n - by]
    elif by < 0:
        out[..., :n + by] = pmf[..., -by:]
    else:
        out[...] = pmf
    return out


def mix(weights, pmfs) -> np.ndarray:
    """The mixture sum_j weights[j] * pmfs[j] (pmfs [J, ..., F]); weights must be a probability vector."""
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights < 0) or abs(weights.sum() - 1.0) > 1e-9:
        raise ValueError(f"mixture weights must be a probability vector; got {weights!r}")
    return np.tensordot(weights, np.asarray(pmfs, dtype=np.float64), axes=1)


def mean(pmf: np.ndarray, support: np.ndarray) -> np.ndarray:
    return np.asarray(pmf) @ np.asarray(support, dtype=np.float64)


def cdf(pmf: np.ndarray) -> np.ndarray:
    return np.cumsum(pmf, axis=-1)
