"""A plain NumPy/Python reading of one lot-sizing period, written from the rules (agents/pdppo/env.py's module
doc, i.e. Felizardo et al. 2025's SimplePlant), not from the JAX code: explicit loops over machines and items, float64
costs. It is the independent check of the JAX env, the transition of the exact DP (agents/pdppo/exact.py) and the
baseline of the throughput measurement.

State here is (inventory: int array [I], setup: int array [M]); time is the caller's business.
"""
from __future__ import annotations

import numpy as np

from agents.pdppo.instances import Instance, binomial_pmf


def post_decision(instance: Instance, inventory, setup, action) -> tuple[np.ndarray, np.ndarray, float]:
    """(post-decision inventory, new setup, setup cost)."""
    inventory = [int(x) for x in inventory]
    new_setup = [int(x) for x in setup]
    setup_cost = 0.0
    for m in range(instance.n_machines):
        choice = int(action[m])
        if choice == 0 or instance.production_rate[m][choice - 1] == 0:
            new_setup[m] = 0  # idle (or asked for an item it cannot make): the setup is lost
            continue
        i = choice - 1
        lost_units = 0
        if int(setup[m]) != choice:
            setup_cost += float(instance.setup_cost[m][i])
            lost_units = int(instance.setup_loss[m][i])
        made = int(instance.production_rate[m][i]) - lost_units
        if made > 0:
            inventory[i] += made
        new_setup[m] = choice
    return np.array(inventory, np.int64), np.array(new_setup, np.int64), setup_cost


def serve_demand(instance: Instance, inventory, demand) -> tuple[np.ndarray, float, float]:
    """(next inventory, holding cost, lost-sales cost)."""
    nxt = []
    holding = 0.0
    lost = 0.0
    for i in range(instance.n_items):
        have, want = int(inventory[i]), int(demand[i])
        if want > have:
            lost += float(instance.lost_sales_cost[i]) * (want - have)
            have = 0
        else:
            have -= want
        have = min(have, instance.inventory_cap)
        holding += float(instance.holding_cost[i]) * have
        nxt.append(have)
    return np.array(nxt, np.int64), holding, lost


def step(instance: Instance, inventory, setup, action, demand) -> tuple[np.ndarray, np.ndarray, float]:
    """(next inventory, next setup, reward) of one period with the given demand."""
    post, new_setup, setup_cost = post_decision(instance, inventory, setup, action)
    nxt, holding, lost = serve_demand(instance, post, demand)
    return nxt, new_setup, -(setup_cost + holding + lost)


def draw_demand(instance: Instance, rng: np.random.Generator) -> np.ndarray:
    return rng.binomial(instance.demand_n, instance.demand_p, instance.n_items)


def demand_pmf(instance: Instance) -> np.ndarray:
    """float64 [demand_n + 1]: the exact law of one item's demand."""
    return binomial_pmf(instance.demand_n, instance.demand_p)
