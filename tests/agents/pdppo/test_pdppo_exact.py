"""Exact DP on tiny instances: against brute-force enumeration of every deterministic policy, against a forward
evaluation, and against Monte-Carlo episodes of the JAX env (which shares no code with the DP's transition)."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.pdppo import exact
from agents.pdppo import heuristic as H
from agents.pdppo import reference
from agents.pdppo.env import LotSizingState, params_from_instance
from agents.pdppo.instances import binomial_pmf


def _brute_force_optimum(inst, inventory, setup):
    """min over every deterministic policy of the expected cost over a 2-period horizon from (inventory, setup):
    a first action, then one action per state reachable under it; each policy evaluated by expanding every
    demand path with the reference step. Returns (optimum, number of policies)."""
    assert inst.horizon == 2
    acts = list(itertools.product(range(inst.n_items + 1), repeat=inst.n_machines))
    pmf = binomial_pmf(inst.demand_n, inst.demand_p)
    demands = [(d, math.prod(pmf[k] for k in d)) for d in itertools.product(range(inst.demand_n + 1),
                                                                              repeat=inst.n_items)]

    def outcomes(inv, st, a):
        post, new_setup, setup_cost = reference.post_decision(inst, inv, st, a)
        out = []
        for d, p in demands:
            nxt, holding, lost = reference.serve_demand(inst, post, d)
            out.append((p, setup_cost + holding + lost, (tuple(nxt), tuple(new_setup))))
        return out

    best, count = math.inf, 0
    for a0 in acts:
        first = outcomes(inventory, setup, a0)
        reachable = sorted({s1 for p, _, s1 in first if p > 0})
        for choice in itertools.product(acts, repeat=len(reachable)):
            policy = dict(zip(reachable, choice))
            total = 0.0
            for p0, c0, s1 in first:
                second = outcomes(np.array(s1[0]), np.array(s1[1]), policy[s1]) if p0 > 0 else []
                total += p0 * (c0 + sum(p1 * c1 for p1, c1, _ in second))
            best, count = min(best, total), count + 1
    return best, count


def test_value_iteration_matches_brute_force_over_all_policies_from_every_state():
    inst = exact.tiny_instance(inventory_cap=2, horizon=2, demand_n=1, demand_p=0.3)
    model = exact.tabular_model(inst)
    solution = exact.value_iteration(model)
    assert model.num_states == 27 and model.num_actions == 3
    policies = 0
    for s in range(model.num_states):
        inventory, setup = exact.state_of(inst, s)
        assert exact.state_index(inst, inventory, setup) == s
        optimum, count = _brute_force_optimum(inst, inventory, setup)
        policies += count
        assert solution.values[0, s] == pytest.approx(optimum, abs=1e-12)
        assert exact.forward_policy_cost(model, solution.policy, s) == pytest.approx(optimum, abs=1e-12)
    assert policies > 1000


TINY = exact.tiny_instance()  # 1 machine, 2 items, cap 4, Binomial(2, 0.5) demand, horizon 8


@pytest.fixture(scope="module")
def tiny_solution():
    model = exact.tabular_model(TINY)
    return model, exact.value_iteration(model)


def test_model_is_a_proper_kernel_and_forward_evaluation_agrees_everywhere(tiny_solution):
    model, solution = tiny_solution
    assert model.num_states == 75 and model.num_actions == 3
    np.testing.assert_allclose(model.transition.sum(-1), 1.0, atol=1e-12)
    assert np.all(model.cost >= 0)
    for s in range(model.num_states):
        assert exact.forward_policy_cost(model, solution.policy, s) == pytest.approx(solution.values[0, s], abs=1e-10)
    # Values are non-increasing in the remaining time's shrinking: more periods left cost at least as much.
    assert np.all(np.diff(solution.values, axis=0) <= 1e-12)


def _monte_carlo(policy, episodes=4096, seed=7):
    return H.episode_costs(TINY, policy, [seed], episodes)


def _heuristic_table(levels):
    """The base-stock rule as a Markov policy table [H, S] of action indices, computed in JAX state by state."""
    params = params_from_instance(TINY)
    states = [exact.state_of(TINY, s) for s in range(3 * 25)]
    batch = LotSizingState(jnp.asarray(np.array([s[0] for s in states]), jnp.int32),
                           jnp.asarray(np.array([s[1] for s in states]), jnp.int32), jnp.zeros(len(states), jnp.int32))
    acts = np.asarray(jax.vmap(lambda st: H.base_stock_action(params, levels, st))(batch))
    index = {a: j for j, a in enumerate(exact.actions(TINY))}
    row = np.array([index[tuple(int(x) for x in a)] for a in acts])
    return np.tile(row, (TINY.horizon, 1))


def test_dp_optimum_is_what_the_jax_env_delivers_and_beats_the_heuristic(tiny_solution):
    model, solution = tiny_solution
    start = exact.state_index(TINY, TINY.initial_inventory, TINY.initial_setup)
    optimum = solution.values[0, start]
    costs = _monte_carlo(exact.jax_policy(TINY, solution))
    se = costs.std(ddof=1) / math.sqrt(costs.size)
    assert abs(costs.mean() - optimum) < 4 * se, (costs.mean(), optimum, se)
    # The base-stock rule, evaluated exactly on the same model and by Monte-Carlo in the JAX env.
    levels = H.base_stock_levels(TINY)
    heuristic_exact = exact.forward_policy_cost(model, _heuristic_table(levels), start)
    heuristic_mc = _monte_carlo(H.base_stock_policy(levels), seed=8)
    se_h = heuristic_mc.std(ddof=1) / math.sqrt(heuristic_mc.size)
    assert abs(heuristic_mc.mean() - heuristic_exact) < 4 * se_h, (heuristic_mc.mean(), heuristic_exact, se_h)
    assert heuristic_exact > optimum + 0.5  # a measured, not guessed, gap: 10.447 vs 8.874 here


def test_state_space_guard():
    with pytest.raises(ValueError, match="75 states exceed max_states=50"):
        exact.tabular_model(TINY, max_states=50)
