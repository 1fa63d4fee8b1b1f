"""The exact optimal policy of a tiny lot-sizing instance by finite-horizon value iteration (backward induction)
over the full state space, so that a learner's gap to the optimum is measured rather than guessed.

States are every (inventory vector in {0..cap}^I, setup vector in {0..I}^M), numbered in mixed radix (inventory
digits first, base cap + 1, then setup digits, base I + 1); actions every vector in {0..I}^M, numbered the same way
in base I + 1. The transition is built from the NumPy reference step (agents/pdppo/reference.py) and the exact
demand law: items' demands are independent Binomial(demand_n, demand_p), so every joint demand vector is enumerated
with its probability; nothing is sampled. With c(s, a) the expected one-period cost and P(s' | s, a):

    V_H = 0,   Q_t(s, a) = c(s, a) + sum_s' P(s' | s, a) V_{t+1}(s'),   V_t(s) = min_a Q_t(s, a)

(Puterman 1994, Section 4.5), optimal policy pi_t(s) = argmin_a Q_t(s, a) (ties: lowest action). The state space
has (cap + 1)^I (I + 1)^M states: keep the instance tiny (`max_states`).
"""
from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np

from agents.pdppo import reference
from agents.pdppo.instances import Instance


@dataclasses.dataclass(frozen=True)
class TabularModel:
    """The tiny instance's MDP: expected cost [S, A] and transition [S, A, S]."""

    instance: Instance
    cost: np.ndarray
    transition: np.ndarray

    @property
    def num_states(self) -> int:
        return self.cost.shape[0]

    @property
    def num_actions(self) -> int:
        return self.cost.shape[1]


@dataclasses.dataclass(frozen=True)
class DPSolution:
    values: np.ndarray  # float64 [H + 1, S]: optimal expected cost-to-go (values[H] = 0)
    policy: np.ndarray  # int [H, S]: optimal action index at each time


def _radices(instance: Instance) -> list[int]:
    return [instance.inventory_cap + 1] * instance.n_items + [instance.n_items + 1] * instance.n_machines


def state_index(instance: Instance, inventory, setup) -> int:
    index = 0
    for digit, base in zip(list(inventory) + list(setup), _radices(instance)):
        index = index * base + int(digit)
    return index


def state_of(instance: Instance, index: int) -> tuple[np.ndarray, np.ndarray]:
    digits = []
    for base in reversed(_radices(instance)):
        digits.append(index % base)
        index //= base
    digits = digits[::-1]
    return np.array(digits[:instance.n_items]), np.array(digits[instance.n_items:])


def actions(instance: Instance) -> list[tuple[int, ...]]:
    """Every action vector, in action-index order."""
    return list(itertools.product(range(instance.n_items + 1), repeat=instance.n_machines))


def joint_demands(instance: Instance) -> list[tuple[tuple[int, ...], float]]:
    """Every demand vector with positive probability and its probability (independent items)."""
    pmf = reference.demand_pmf(instance)
    support = [k for k in range(len(pmf)) if pmf[k] > 0]
    return [(d, float(np.prod([pmf[k] for k in d]))) for d in itertools.product(support, repeat=instance.n_items)]


def tabular_model(instance: Instance, max_states: int = 20_000) -> TabularModel:
    n_states = int(np.prod(_radices(instance)))
    if n_states > max_states:
        raise ValueError(f"exact DP on {instance.name!r}: {n_states} states exceed max_states={max_states}; use a "
                         f"smaller inventory_cap, fewer items or machines")
    acts = actions(instance)
    demands = joint_demands(instance)
    cost = np.zeros((n_states, len(acts)))
    transition = np.zeros((n_states, len(acts), n_states))
    for s in range(n_states):
        inventory, setup = state_of(instance, s)
        for a, action in enumerate(acts):
            post, new_setup, setup_cost = reference.post_decision(instance, inventory, setup, action)
            cost[s, a] = setup_cost
            for demand, prob in demands:
                nxt, holding, lost = reference.serve_demand(instance, post, demand)
                cost[s, a] += prob * (holding + lost)
                transition[s, a, state_index(instance, nxt, new_setup)] += prob
    return TabularModel(instance, cost, transition)


def value_iteration(model: TabularModel, horizon: int | None = None) -> DPSolution:
    """Backward induction over `horizon` periods (default: the instance's)."""
    horizon = model.instance.horizon if horizon is None else horizon
    values = np.zeros((horizon + 1, model.num_states))
    policy = np.zeros((horizon, model.num_states), np.int64)
    for t in range(horizon - 1, -1, -1):
        q = model.cost + model.transition @ values[t + 1]
        policy[t] = np.argmin(q, axis=1)
        values[t] = q[np.arange(model.num_states), policy[t]]
    return DPSolution(values, policy)


def forward_policy_cost(model: TabularModel, policy: np.ndarray, start: int) -> float:
    """Expected total cost of a Markov policy [H, S] from state `start`, by pushing the state distribution forward
    (no Bellman backup: an independent evaluation of the same model)."""
    dist = np.zeros(model.num_states)
    dist[start] = 1.0
    total = 0.0
    rows = np.arange(model.num_states)
    for t in range(policy.shape[0]):
        total += float(dist @ model.cost[rows, policy[t]])
        dist = dist @ model.transition[rows, policy[t]]
    return total


def jax_policy(instance: Instance, solution: DPSolution):
    """The DP's optimal policy as `policy(params, state, key) -> action` for the JAX env: a table lookup by
    (time, state index)."""
    table = jnp.asarray(np.array(actions(instance))[solution.policy], jnp.int32)  # [H, S, M]
    radices = jnp.asarray(_radices(instance), jnp.int32)
    weights = jnp.asarray(np.cumprod(np.r_[_radices(instance)[1:], 1][::-1])[::-1], jnp.int32)

    def policy(params, state, key):
        del params, key
        digits = jnp.concatenate([state.inventory, state.setup]).astype(jnp.int32)
        index = jnp.sum(jnp.minimum(digits, radices - 1) * weights)
        return table[state.time, index]

    return policy


def tiny_instance(inventory_cap: int = 4, horizon: int = 8, demand_n: int = 2, demand_p: float = 0.5) -> Instance:
    """1 machine, 2 items: small enough for exact DP, with real trade-offs (switching costs 1.5-2 and a lost unit,
    item 1 is scarcer to make and dearer to lose)."""
    return Instance(
        holding_cost=np.array([0.1, 0.1]), lost_sales_cost=np.array([1.0, 2.0]),
        production_rate=np.array([[3, 2]]), setup_cost=np.array([[2.0, 1.5]]), setup_loss=np.array([[1, 1]]),
        initial_inventory=np.array([min(2, inventory_cap)] * 2), initial_setup=np.array([0]),
        inventory_cap=inventory_cap, demand_n=demand_n, demand_p=demand_p, horizon=horizon, name="tiny-1m2i")
