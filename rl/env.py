"""The functional environment protocol and its space descriptions.

An environment is a stateless object whose two methods are pure functions (gymnax-style; docs/architecture.md):

    obs, state = env.reset(key, params)
    obs, state, reward, done, info = env.step(key, state, action, params)

- `params` (the environment's constants: physics, time limit) are a pytree kept apart from `state` (what changes
  within an episode), so one jitted step serves every parameter setting and params can be vmapped too.
- Both functions are jittable and vmappable: no Python control flow on traced values, no side effects; randomness
  comes only from `key`.
- `done = terminated | truncated`. `info` always holds the two booleans `"terminated"` (the MDP reached a terminal
  state: its value is zero) and `"truncated"` (the episode was cut short, e.g. by a time limit: the next state still
  has a value, and return computations should bootstrap from it; see `rl.returns`).
- Stepping after `done` is undefined; wrap the environment in `rl.wrappers.AutoReset` for rollouts.
- `observation_space(params)` and `action_space(params)` describe shapes, dtypes and bounds; `rl.wrappers`
  converts them to gymnasium spaces.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
EnvState = TypeVar("EnvState")
EnvParams = TypeVar("EnvParams")


@dataclasses.dataclass(frozen=True)
class Discrete:
    """Integers {0, ..., n - 1}."""

    n: int
    dtype: Any = jnp.int32

    @property
    def shape(self) -> tuple[int, ...]:
        return ()

    def sample(self, key: Array) -> Array:
        return jax.random.randint(key, (), 0, self.n, dtype=self.dtype)

    def contains(self, x) -> Array:
        x = jnp.asarray(x)
        return jnp.logical_and(x.shape == (), jnp.logical_and(x >= 0, x < self.n))

    def to_gymnasium(self):
        import gymnasium

        return gymnasium.spaces.Discrete(self.n)


@dataclasses.dataclass(frozen=True)
class Box:
    """Real vectors with elementwise bounds `low <= x <= high` (bounds may be infinite)."""

    low: Any
    high: Any
    shape: tuple[int, ...]
    dtype: Any = jnp.float32

    def _bounds(self):
        low = np.broadcast_to(np.asarray(self.low, np.float64), self.shape)
        high = np.broadcast_to(np.asarray(self.high, np.float64), self.shape)
        return low, high

    def sample(self, key: Array) -> Array:
        """Uniform within finite bounds; a standard normal (shifted to respect a one-sided bound) elsewhere."""
        low, high = self._bounds()
        k_uniform, k_normal = jax.random.split(key)
        u = jax.random.uniform(k_uniform, self.shape)
        n = jax.random.normal(k_normal, self.shape)
        finite_low, finite_high = np.isfinite(low), np.isfinite(high)
        bounded = low + u * (np.where(finite_low & finite_high, high - low, 0.0))
        below = np.where(finite_high, high, 0.0) - jnp.abs(n)
        above = np.where(finite_low, low, 0.0) + jnp.abs(n)
        x = jnp.where(finite_low & finite_high, bounded,
                      jnp.where(finite_low, above, jnp.where(finite_high, below, n)))
        return x.astype(self.dtype)

    def contains(self, x) -> Array:
        x = jnp.asarray(x)
        low, high = self._bounds()
        return jnp.logical_and(x.shape == self.shape, jnp.all((x >= low) & (x <= high)))

    def to_gymnasium(self):
        import gymnasium

        low, high = self._bounds()
        dtype = np.dtype(self.dtype)
        return gymnasium.spaces.Box(low.astype(dtype), high.astype(dtype), self.shape, dtype)


class Environment(Generic[EnvState, EnvParams]):
    """Base class of functional environments: subclasses implement the five methods below, all pure.

    Subclasses hold no mutable state; anything that changes between steps lives in the state pytree and anything
    constant in the params pytree (`default_params`).
    """

    @property
    def default_params(self) -> EnvParams:
        raise NotImplementedError

    def reset(self, key: Array, params: EnvParams) -> tuple[Array, EnvState]:
        raise NotImplementedError

    def step(self, key: Array, state: EnvState, action: Array,
             params: EnvParams) -> tuple[Array, EnvState, Array, Array, dict[str, Array]]:
        raise NotImplementedError

    def observation_space(self, params: EnvParams) -> Box | Discrete:
        raise NotImplementedError

    def action_space(self, params: EnvParams) -> Box | Discrete:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__
