"""The base-stock rule against a plain-Python reading of it, its episode cost against the NumPy reference env, and
its evaluation summary."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.pdppo import env as E
from agents.pdppo import heuristic as H
from agents.pdppo import reference
from agents.pdppo.instances import generate

INSTANCE = generate("15i5m", 2)
PARAMS = E.params_from_instance(INSTANCE)


def _python_rule(inst, levels, up_to, inventory, setup):
    projected = [float(x) for x in inventory]
    action = []
    for m in range(inst.n_machines):
        rate = inst.production_rate[m]
        current = int(setup[m]) - 1
        if current >= 0 and rate[current] > 0 and projected[current] < up_to[current]:
            item, keep = current, True
        else:
            short = [i for i in range(inst.n_items) if rate[i] > 0 and projected[i] < levels[i]]
            if not short:
                action.append(0)
                continue
            item, keep = min(short, key=lambda i: (projected[i] / levels[i], i)), False
        loss = 0 if keep else inst.setup_loss[m, item]
        projected[item] += max(rate[item] - loss, 0)
        action.append(item + 1)
    return np.array(action)


def test_levels_are_mean_demand_plus_safety_stock():
    # Binomial(20, 0.4): mu = 8, sigma = sqrt(4.8); ceil(8 + 1.64 * 2.1909) = 12; over 4 periods ceil(32 + 7.19) = 40.
    np.testing.assert_array_equal(H.base_stock_levels(INSTANCE), 12)
    np.testing.assert_array_equal(H.base_stock_levels(INSTANCE, 1.64, cover=4), 40)
    np.testing.assert_array_equal(H.base_stock_levels(INSTANCE.replace(inventory_cap=30), 1.64, cover=8), 30)
    with pytest.raises(ValueError, match="cover >= 1"):
        H.base_stock_levels(INSTANCE, cover=0)


@pytest.mark.parametrize("cover, up_to", [(1, 100), (4, 40)])
def test_rule_matches_a_plain_python_reading_on_random_states(cover, up_to):
    levels = H.base_stock_levels(INSTANCE, cover=cover)
    rng = np.random.default_rng(cover)
    n = 300
    inventory = rng.integers(0, 101, (n, INSTANCE.n_items))
    setup = rng.integers(0, INSTANCE.n_items + 1, (n, INSTANCE.n_machines))
    states = E.LotSizingState(jnp.asarray(inventory, jnp.int32), jnp.asarray(setup, jnp.int32),
                              jnp.zeros(n, jnp.int32))
    got = np.asarray(jax.jit(jax.vmap(lambda s: H.base_stock_action(PARAMS, levels, s, up_to)))(states))
    kinds = {"keep": 0, "switch": 0, "idle": 0}
    for j in range(n):
        want = _python_rule(INSTANCE, levels, [up_to] * INSTANCE.n_items, inventory[j], setup[j])
        np.testing.assert_array_equal(got[j], want)
        kinds["idle"] += int(np.sum(want == 0))
        kinds["keep"] += int(np.sum((want > 0) & (want == setup[j])))
        kinds["switch"] += int(np.sum((want > 0) & (want != setup[j])))
    assert min(kinds.values()) >= 20, kinds


def test_episode_cost_equals_the_reference_env_driven_by_the_same_rule_and_demand():
    inst = INSTANCE.replace(horizon=15)
    params = E.params_from_instance(inst)
    levels = H.base_stock_levels(inst)
    key = jax.random.key(11)
    got = float(jax.jit(lambda k: E.episode_cost(params, H.base_stock_policy(levels), k, inst.horizon))(key))
    inventory, setup, total = inst.initial_inventory, inst.initial_setup, 0.0
    for k in jax.random.split(key, inst.horizon):
        _, k_env = jax.random.split(k)
        demand = np.asarray(E.draw_demand(params, k_env))
        action = _python_rule(inst, levels, [inst.inventory_cap] * inst.n_items, inventory, setup)
        inventory, setup, reward = reference.step(inst, inventory, setup, action, demand)
        total -= reward
    assert got == pytest.approx(total, rel=1e-5)


def test_rule_beats_idling_and_random_production_on_held_out_seeds():
    inst = INSTANCE.replace(horizon=40)
    rule = H.evaluate(inst, H.base_stock_policy(H.base_stock_levels(inst)), seeds=[1000], episodes_per_seed=32)
    idle = H.evaluate(inst, lambda p, s, k: jnp.zeros(5, jnp.int32), seeds=[1000], episodes_per_seed=32)
    rand = H.evaluate(inst, lambda p, s, k: jax.random.randint(k, (5,), 0, 16), seeds=[1000], episodes_per_seed=32)
    assert rule["episodes"] == 32 and rule["ci95_low"] < rule["mean_cost"] < rule["ci95_high"]
    assert rule["ci95_high"] < idle["ci95_low"] and rule["ci95_high"] < rand["ci95_low"]


def test_summary_is_the_normal_interval():
    costs = np.array([1.0, 2.0, 3.0, 4.0])
    s = H.summarise(costs)
    half = 1.959963984540054 * math.sqrt(5.0 / 3.0) / 2.0
    assert s["mean_cost"] == 2.5 and s["ci95_high"] == pytest.approx(2.5 + half)
    assert s["ci95_low"] == pytest.approx(2.5 - half)
    with pytest.raises(ValueError, match="at least 2 episodes"):
        H.summarise(np.array([1.0]))
