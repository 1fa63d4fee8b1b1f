"""Conversions between the three prediction targets of a diffusion model at (alpha_t, sigma_t), for
x_t = alpha_t x_0 + sigma_t eps:

- noise (epsilon) prediction and data (x_0) prediction: x_0 = (x_t - sigma_t eps) / alpha_t (Ho et al. 2020,
  eq. 15; Lu et al. 2022b, DPM-Solver++, eq. 3.1);
- velocity v = alpha_t eps - sigma_t x_0 (Salimans and Ho 2022, Sec. 4 and App. D): x_0 = (alpha_t x_t - sigma_t v)
  / (alpha_t^2 + sigma_t^2) and eps = (sigma_t x_t + alpha_t v) / (alpha_t^2 + sigma_t^2); the denominator is 1 for
  VP schedules and kept so the formulas also hold for any (alpha, sigma);
- the score: grad log p_t(x_t) = -eps / sigma_t (Song et al. 2021, score SDE; Lu et al. 2022, eq. 2.4).
"""
from __future__ import annotations


def eps_to_x0(x, eps, alpha, sigma):
    return (x - sigma * eps) / alpha


def x0_to_eps(x, x0, alpha, sigma):
    return (x - alpha * x0) / sigma


def eps_x0_to_v(eps, x0, alpha, sigma):
    return alpha * eps - sigma * x0


def v_to_x0(x, v, alpha, sigma):
    return (alpha * x - sigma * v) / (alpha**2 + sigma**2)


def v_to_eps(x, v, alpha, sigma):
    return (sigma * x + alpha * v) / (alpha**2 + sigma**2)


def eps_to_v(x, eps, alpha, sigma):
    return eps_x0_to_v(eps, eps_to_x0(x, eps, alpha, sigma), alpha, sigma)


def x0_to_v(x, x0, alpha, sigma):
    return eps_x0_to_v(x0_to_eps(x, x0, alpha, sigma), x0, alpha, sigma)


def score_to_eps(score, sigma):
    return -sigma * score


def eps_to_score(eps, sigma):
    return -eps / sigma
