"""The stochastic lot-sizing environment in JAX, split at the post-decision state (Felizardo et al. 2025, PDPPO).

State s_t = (inventory per item, setup per machine, t); action = one entry per machine, 0 = idle and i + 1 = make
item i. One period is two pure functions:

1. `post_decision(params, s, a) -> (s^x, setup_cost)`, deterministic. An action naming an item the machine cannot
   make (rate 0), or no item at all (out of range), counts as idle. An idle machine loses its setup (setup 0), as
   in the SimplePlant dynamics, so restarting it pays the setup again. A machine asked for item i while set up for
   another item (or for none) pays setup_cost[m, i] and loses setup_loss[m, i] units; it then adds
   max(rate[m, i] - loss, 0) units of i. The post-decision inventory may exceed the cap (the cap applies after
   demand).
2. `exogenous(params, s^x, key) -> (s_{t+1}, cost)`: demand D_i ~ Binomial(demand_n, demand_p) independently per
   item; the units short, max(D_i - x_i, 0), cost lost_sales_cost[i] each; what is left, max(x_i - D_i, 0), is cut
   to inventory_cap (the excess is discarded) and pays holding_cost[i] per unit; t advances.

Reward r_t = -(setup cost + lost-sales cost + holding cost). The episode terminates when t reaches the horizon:
time is part of the state, so this is a finite-horizon MDP whose value after the horizon is zero.

Every function is pure and jittable; params (one instance, `params_from_instance`) are a pytree, so the same jitted
step runs vmapped over instances of equal size (`stack_params`) and over keys. Demand is drawn by inverting the
exact Binomial CDF stored in the params, so a generalised demand distribution is a change of params only.
`draw_demand` is exposed so tests can draw the demand once and give it to both this code and the NumPy reference.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from agents.pdppo.instances import Instance, binomial_pmf
from rl import threefry
from rl.env import Box, Environment


@struct.dataclass
class LotSizingParams:
    holding_cost: jax.Array       # f32 [I]
    lost_sales_cost: jax.Array    # f32 [I]
    production_rate: jax.Array    # i32 [M, I]
    setup_cost: jax.Array         # f32 [M, I]
    setup_loss: jax.Array         # i32 [M, I]
    initial_inventory: jax.Array  # i32 [I]
    initial_setup: jax.Array      # i32 [M]
    inventory_cap: jax.Array      # i32 []
    demand_cdf: jax.Array         # f32 [demand_n + 1]: P(D <= k)
    horizon: jax.Array            # i32 []


@struct.dataclass
class LotSizingState:
    inventory: jax.Array  # i32 [I]; a post-decision state may hold more than the cap
    setup: jax.Array      # i32 [M]; 0 = none, i + 1 = item i
    time: jax.Array       # i32 []


def params_from_instance(instance: Instance) -> LotSizingParams:
    cdf = np.minimum(np.cumsum(binomial_pmf(instance.demand_n, instance.demand_p)), 1.0)
    return LotSizingParams(
        holding_cost=jnp.asarray(instance.holding_cost, jnp.float32),
        lost_sales_cost=jnp.asarray(instance.lost_sales_cost, jnp.float32),
        production_rate=jnp.asarray(instance.production_rate, jnp.int32),
        setup_cost=jnp.asarray(instance.setup_cost, jnp.float32),
        setup_loss=jnp.asarray(instance.setup_loss, jnp.int32),
        initial_inventory=jnp.asarray(instance.initial_inventory, jnp.int32),
        initial_setup=jnp.asarray(instance.initial_setup, jnp.int32),
        inventory_cap=jnp.asarray(instance.inventory_cap, jnp.int32),
        demand_cdf=jnp.asarray(cdf, jnp.float32),
        horizon=jnp.asarray(instance.horizon, jnp.int32),
    )


def stack_params(instances: Sequence[Instance]) -> LotSizingParams:
    """Params of several equally sized instances with a leading instance axis, for `jax.vmap`."""
    shapes = {(i.n_items, i.n_machines, i.demand_n) for i in instances}
    if len(shapes) != 1:
        raise ValueError(f"stack_params needs instances of one size (items, machines, demand_n); got {sorted(shapes)}")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[params_from_instance(i) for i in instances])


def initial_state(params: LotSizingParams) -> LotSizingState:
    return LotSizingState(params.initial_inventory, params.initial_setup, jnp.zeros((), jnp.int32))


def _per_machine(table: jax.Array, item: jax.Array) -> jax.Array:
    """table[m, item[m]] for every machine m (item clipped to a valid index; callers mask idle machines)."""
    return jnp.take_along_axis(table, jnp.clip(item, 0, table.shape[1] - 1)[:, None], axis=1)[:, 0]


def effective_action(params: LotSizingParams, action: jax.Array) -> jax.Array:
    """The action with requests for items a machine cannot make replaced by idle (0)."""
    action = jnp.asarray(action, jnp.int32)
    in_range = (action > 0) & (action <= params.production_rate.shape[1])
    makes = in_range & (_per_machine(params.production_rate, action - 1) > 0)
    return jnp.where(makes, action, 0)


def post_decision(params: LotSizingParams, state: LotSizingState,
                  action: jax.Array) -> tuple[LotSizingState, jax.Array]:
    """The deterministic half of a period: setup changes (cost, lost units) and production; see the module doc."""
    chosen = effective_action(params, action)
    item = chosen - 1
    switch = (chosen > 0) & (chosen != state.setup)
    setup_cost = jnp.sum(jnp.where(switch, _per_machine(params.setup_cost, item), 0.0))
    loss = jnp.where(switch, _per_machine(params.setup_loss, item), 0)
    made = jnp.where(chosen > 0, jnp.maximum(_per_machine(params.production_rate, item) - loss, 0), 0)
    n_items = state.inventory.shape[0]
    added = jnp.sum(jax.nn.one_hot(item, n_items, dtype=jnp.int32) * made[:, None], axis=0)
    return LotSizingState(state.inventory + added, chosen, state.time), setup_cost


def draw_demand(params: LotSizingParams, key: jax.Array) -> jax.Array:
    """i32 [I]: one demand per item by inverse-CDF sampling of the params' demand law."""
    u = threefry.uniform(key, params.initial_inventory.shape)  # = jax.random.uniform, fused on CPU (rl.threefry)
    return jnp.sum(u[:, None] >= params.demand_cdf[None, :-1], axis=1).astype(jnp.int32)


def demand_outcome(params: LotSizingParams, inventory: jax.Array,
                   demand: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(next inventory, holding cost, lost-sales cost) of serving `demand` from the post-decision `inventory`."""
    short = jnp.maximum(demand - inventory, 0)
    left = jnp.minimum(jnp.maximum(inventory - demand, 0), params.inventory_cap)
    holding = jnp.sum(params.holding_cost * left)
    lost = jnp.sum(params.lost_sales_cost * short)
    return left, holding, lost


def exogenous_given_demand(params: LotSizingParams, post: LotSizingState,
                           demand: jax.Array) -> tuple[LotSizingState, jax.Array]:
    left, holding, lost = demand_outcome(params, post.inventory, demand)
    return LotSizingState(left, post.setup, post.time + 1), holding + lost


def exogenous(params: LotSizingParams, post: LotSizingState, key: jax.Array) -> tuple[LotSizingState, jax.Array]:
    """The stochastic half of a period: demand, lost sales, holding, the cap; see the module doc."""
    return exogenous_given_demand(params, post, draw_demand(params, key))


def step(params: LotSizingParams, state: LotSizingState, action: jax.Array,
         key: jax.Array) -> tuple[LotSizingState, jax.Array, LotSizingState]:
    """One period: (next state, reward = -cost, post-decision state)."""
    post, setup_cost = post_decision(params, state, action)
    next_state, cost = exogenous(params, post, key)
    return next_state, -(setup_cost + cost), post


def observation(params: LotSizingParams, state: LotSizingState) -> jax.Array:
    """f32 [I + M (I + 1) + 1]: inventory / cap, one-hot setup per machine, t / horizon. In [0, 1] for a state;
    a post-decision state's inventory part may exceed 1."""
    n_items = state.inventory.shape[0]
    return jnp.concatenate([
        state.inventory.astype(jnp.float32) / params.inventory_cap.astype(jnp.float32),
        jax.nn.one_hot(state.setup, n_items + 1, dtype=jnp.float32).reshape(-1),
        (state.time.astype(jnp.float32) / params.horizon.astype(jnp.float32))[None],
    ])


def observation_size(n_items: int, n_machines: int) -> int:
    return n_items + n_machines * (n_items + 1) + 1


@dataclasses.dataclass(frozen=True)
class MultiDiscrete:
    """Integer vectors with x[j] in {0, ..., nvec[j] - 1} (the action space: one choice per machine)."""

    nvec: tuple[int, ...]
    dtype: Any = jnp.int32

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.nvec),)

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.randint(key, self.shape, 0, jnp.asarray(self.nvec), dtype=self.dtype)

    def contains(self, x) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.logical_and(x.shape == self.shape, jnp.all((x >= 0) & (x < jnp.asarray(self.nvec))))

    def to_gymnasium(self):
        import gymnasium

        return gymnasium.spaces.MultiDiscrete(np.asarray(self.nvec, np.int64))


class LotSizing(Environment[LotSizingState, LotSizingParams]):
    """The env protocol of rl/env.py over the functions above. `reset` starts from the instance's initial state
    (the key is unused); `info` carries the post-decision observation (the input of PDPPO's V_post) and the three
    cost components of the step."""

    def __init__(self, instance: Instance):
        self.instance = instance
        self._params = params_from_instance(instance)

    @property
    def default_params(self) -> LotSizingParams:
        return self._params

    @property
    def name(self) -> str:
        return f"LotSizing-{self.instance.name}"

    def reset(self, key, params: LotSizingParams):
        del key
        state = initial_state(params)
        return observation(params, state), state

    def step(self, key, state: LotSizingState, action, params: LotSizingParams):
        post, setup_cost = post_decision(params, state, action)
        left, holding, lost = demand_outcome(params, post.inventory, draw_demand(params, key))
        next_state = LotSizingState(left, post.setup, post.time + 1)
        terminated = next_state.time >= params.horizon
        info = {"terminated": terminated, "truncated": jnp.zeros((), bool),
                "post_observation": observation(params, post), "setup_cost": setup_cost, "holding_cost": holding,
                "lost_sales_cost": lost}
        return observation(params, next_state), next_state, -(setup_cost + holding + lost), terminated, info

    def observation_space(self, params: LotSizingParams) -> Box:
        return Box(0.0, 1.0, (observation_size(self.instance.n_items, self.instance.n_machines),))

    def action_space(self, params: LotSizingParams) -> MultiDiscrete:
        return MultiDiscrete((self.instance.n_items + 1,) * self.instance.n_machines)


def episode_cost(params: LotSizingParams, policy: Callable, key: jax.Array, horizon: int) -> jax.Array:
    """Total cost of one episode from the initial state under `policy(params, state, key) -> action`; `horizon`
    is static (the instance's), so the episode is one `lax.scan`."""

    def period(state, k):
        k_policy, k_env = jax.random.split(k)
        next_state, reward, _ = step(params, state, policy(params, state, k_policy), k_env)
        return next_state, -reward

    _, costs = jax.lax.scan(period, initial_state(params), jax.random.split(key, horizon))
    return jnp.sum(costs)
