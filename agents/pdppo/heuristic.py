"""A base-stock production rule, the baseline a planner would use without RL, and policy evaluation over held-out
demand seeds.

Levels. Item i's base-stock level (its reorder point) covers mean demand over `cover` periods plus a safety stock:

    s_i = min(cap, ceil(cover * mu + z * sigma * sqrt(cover))),  mu = n p, sigma^2 = n p (1 - p) (Binomial demand),

with safety factor z (1.64: about a 95 % cycle service level under a normal approximation). Production runs go up to
an order-up-to level S_i (default: the inventory cap), because a setup costs 15-30 while a period's run of 1-40
units saves at most 1.1 per unit of lost sales: short runs do not pay for their setups. Measured on the seed-0
instances of 15i5m, 20i10m and 25i15m (32 episodes each), cover = 1 with S = cap was the cheapest of cover in
{1, 2, 3, 4, 8} x S in {40, 60, 100}, hence the defaults.

Rule, machine by machine in index order, on a projected inventory that adds what earlier machines make this period
(so two machines do not chase the same shortfall): a machine keeps its current setup while that item's projected
stock is below S_i (no setup cost, no lost units); otherwise it switches to the item, among those it can make whose
projected stock is below its base-stock level s_i, with the lowest stock relative to s_i (ties: lowest index); if
there is none, it idles. Pure JAX (`lax.scan` over machines), so it runs jitted and vmapped like the env.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from agents.pdppo.env import LotSizingParams, LotSizingState, episode_cost, params_from_instance
from agents.pdppo.instances import Instance

Z_95 = 1.959963984540054


def base_stock_levels(instance: Instance, safety_factor: float = 1.64, cover: int = 1) -> np.ndarray:
    """int [I]: the base-stock level (reorder point) of each item (module doc)."""
    if cover < 1 or not np.isfinite(safety_factor) or safety_factor < 0:
        raise ValueError(f"base_stock_levels: need cover >= 1 and safety_factor >= 0; got cover={cover}, "
                         f"safety_factor={safety_factor}")
    mu = instance.demand_n * instance.demand_p
    sigma = math.sqrt(instance.demand_n * instance.demand_p * (1 - instance.demand_p))
    level = math.ceil(cover * mu + safety_factor * sigma * math.sqrt(cover))
    return np.full(instance.n_items, max(1, min(instance.inventory_cap, level)), np.int64)


def base_stock_action(params: LotSizingParams, levels: jax.Array, state: LotSizingState,
                      order_up_to: jax.Array | None = None) -> jax.Array:
    """i32 [M]: the rule's action in `state` (module doc). A machine keeps its setup while its item is below
    `order_up_to` (default: the inventory cap) and switches only to items below their base-stock `levels`."""
    levels = jnp.asarray(levels, jnp.float32)
    up_to = params.inventory_cap.astype(jnp.float32) if order_up_to is None else jnp.asarray(order_up_to, jnp.float32)
    up_to = jnp.broadcast_to(up_to, levels.shape)
    n_items = state.inventory.shape[0]

    def machine(projected, m):
        rate = params.production_rate[m]
        short = (rate > 0) & (projected < levels)
        current = jnp.clip(state.setup[m] - 1, 0, n_items - 1)
        keep = (state.setup[m] > 0) & (rate[current] > 0) & (projected[current] < up_to[current])
        item = jnp.where(keep, current, jnp.argmin(jnp.where(short, projected / levels, jnp.inf)))
        produce = keep | jnp.any(short)
        loss = jnp.where(keep, 0, params.setup_loss[m, item])
        made = jnp.where(produce, jnp.maximum(rate[item] - loss, 0), 0)
        projected = projected + made * jax.nn.one_hot(item, n_items, dtype=jnp.float32)
        return projected, jnp.where(produce, item + 1, 0).astype(jnp.int32)

    _, action = jax.lax.scan(machine, state.inventory.astype(jnp.float32),
                             jnp.arange(params.production_rate.shape[0]))
    return action


def base_stock_policy(levels, order_up_to=None) -> Callable:
    """The rule as a `policy(params, state, key) -> action` for `env.episode_cost` (the key is unused)."""
    levels = jnp.asarray(levels)
    return lambda params, state, key: base_stock_action(params, levels, state, order_up_to)


def episode_costs(instance: Instance, policy: Callable, seeds: Sequence[int], episodes_per_seed: int) -> np.ndarray:
    """float64 [len(seeds) * episodes_per_seed]: the cost of each episode; seed s's episodes use the keys
    split from jax.random.key(s), so held-out evaluation seeds give demand paths no training run saw."""
    params = params_from_instance(instance)
    keys = jnp.concatenate([jax.random.split(jax.random.key(int(s)), episodes_per_seed) for s in seeds])
    run = jax.jit(jax.vmap(lambda k: episode_cost(params, policy, k, instance.horizon)))
    return np.asarray(run(keys), np.float64)


def summarise(costs: np.ndarray) -> dict:
    """Mean cost per episode with a 95 % normal-approximation interval (for >= 30 episodes)."""
    costs = np.asarray(costs, np.float64)
    n = costs.size
    if n < 2:
        raise ValueError(f"summarise needs at least 2 episodes for an interval; got {n}")
    mean = float(costs.mean())
    half = Z_95 * float(costs.std(ddof=1)) / math.sqrt(n)
    return {"mean_cost": mean, "ci95_low": mean - half, "ci95_high": mean + half, "episodes": n}


def evaluate(instance: Instance, policy: Callable, seeds: Sequence[int], episodes_per_seed: int = 32) -> dict:
    return summarise(episode_costs(instance, policy, seeds, episodes_per_seed))
