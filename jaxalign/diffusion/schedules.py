"""Variance-preserving (VP) noise schedules in continuous time t in (0, t_max].

The forward process is x_t = alpha_t x_0 + sigma_t eps with alpha_t^2 + sigma_t^2 = 1, and the half log-SNR
lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022, DPM-Solver, Sec. 2), which decreases strictly in t, so the
samplers can step uniformly in lambda and map back with the closed-form inverse `t_of_lambda`.

- `LinearVP`: beta(t) = beta_min + t (beta_max - beta_min), log alpha_t = -t^2 (beta_max - beta_min) / 4
  - t beta_min / 2 (Song et al. 2021, score SDE, VP SDE; the continuous schedule DPM-Solver's experiments use,
  beta_min 0.1, beta_max 20).
- `CosineVP`: alpha_t = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s)) (Nichol and Dhariwal 2021, eq. 17, with
  alpha_bar = alpha^2), s = 0.008. alpha reaches 0 at t = 1 (lambda = -inf), so t_max defaults to 0.9946, the
  end time DPM-Solver's paper uses for this schedule (Lu et al. 2022, App. D.1).

Both are frozen dataclasses (hashable, so a sampler can take one as a static jit argument); every method is a
pure jnp function of t or lambda and broadcasts.
"""
from __future__ import annotations

import abc
import dataclasses
import math

import jax.numpy as jnp


def _log_sigma(log_alpha):
    """log sqrt(1 - alpha^2), accurate for alpha near 1 (small t) where 1 - alpha^2 cancels."""
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _log_alpha_of_lambda(lam):
    """alpha^2 / (1 - alpha^2) = e^{2 lambda} gives log alpha = -log(1 + e^{-2 lambda}) / 2."""
    return -0.5 * jnp.logaddexp(0.0, -2.0 * lam)


class _VP(abc.ABC):
    """What every VP schedule defines (log alpha_t, its time derivative and its inverse); the rest derives."""

    t_max: float

    @abc.abstractmethod
    def log_alpha(self, t):
        """log alpha_t."""

    @abc.abstractmethod
    def d_log_alpha(self, t):
        """d log alpha_t / dt."""

    @abc.abstractmethod
    def t_of_log_alpha(self, log_alpha):
        """The t at which log alpha_t takes this value."""

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.exp(_log_sigma(self.log_alpha(t)))

    def lam(self, t):
        """lambda_t = log alpha_t - log sigma_t."""
        log_alpha = self.log_alpha(t)
        return log_alpha - _log_sigma(log_alpha)

    def t_of_lambda(self, lam):
        """The inverse of `lam` (closed form for both schedules)."""
        return self.t_of_log_alpha(_log_alpha_of_lambda(lam))

    def drift_and_diffusion2(self, t):
        """(f(t), g(t)^2) of the VP SDE dx = f x dt + g dw: f = d log alpha / dt and g^2 = d sigma^2/dt - 2 f sigma^2
        = -2 f (Song et al. 2021, score SDE; Lu et al. 2022, eq. 2.2), which the probability-flow ODE uses."""
        f = self.d_log_alpha(t)
        return f, -2.0 * f


@dataclasses.dataclass(frozen=True)
class LinearVP(_VP):
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_max: float = 1.0

    def log_alpha(self, t):
        t = jnp.asarray(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def d_log_alpha(self, t):
        """-beta(t) / 2."""
        return -0.5 * (self.beta_min + jnp.asarray(t) * (self.beta_max - self.beta_min))

    def t_of_log_alpha(self, log_alpha):
        """The positive root of (b1 - b0)/4 t^2 + b0/2 t + log alpha = 0, written as 2L / (b0 + sqrt(b0^2 + 2 (b1 -
        b0) L)) with L = -2 log alpha, which avoids cancellation when t is small."""
        big_l = -2.0 * log_alpha
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return 2.0 * big_l / (b0 + jnp.sqrt(b0**2 + 2.0 * db * big_l))


@dataclasses.dataclass(frozen=True)
class CosineVP(_VP):
    s: float = 0.008
    t_max: float = 0.9946

    def _phase(self, t):
        return 0.5 * math.pi * (jnp.asarray(t) + self.s) / (1.0 + self.s)

    def _log_cos0(self):
        return math.log(math.cos(0.5 * math.pi * self.s / (1.0 + self.s)))

    def log_alpha(self, t):
        return jnp.log(jnp.cos(self._phase(t))) - self._log_cos0()

    def d_log_alpha(self, t):
        return -jnp.tan(self._phase(t)) * 0.5 * math.pi / (1.0 + self.s)

    def t_of_log_alpha(self, log_alpha):
        phase = jnp.arccos(jnp.exp(log_alpha + self._log_cos0()))
        return phase * 2.0 * (1.0 + self.s) / math.pi - self.s


def get_schedule(name: str) -> _VP:
    """'linear' or 'cosine' with the papers' defaults."""
    schedules = {"linear": LinearVP, "cosine": CosineVP}
    if name not in schedules:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(schedules)}")
    return schedules[name]()
