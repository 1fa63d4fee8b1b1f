"""The JAX lot-sizing env against the NumPy reference (same states, actions and demand draws), its demand law,
vmapping over instances and seeds, the episode end, and the gymnasium adapters both ways."""
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from agents.pdppo import env as E
from agents.pdppo import reference
from agents.pdppo.instances import binomial_pmf, generate, generate_instance
from rl.wrappers import GymnasiumDriver, GymnasiumEnv

# A small instance with a low cap, so that random states hit the cap, stock out and switch setups often.
INSTANCE = generate_instance(6, 3, seed=5).replace(inventory_cap=30, horizon=7)
PARAMS = E.params_from_instance(INSTANCE)
N_CASES = 600


def _random_cases(seed):
    rng = np.random.default_rng(seed)
    inventory = rng.integers(0, INSTANCE.inventory_cap + 1, (N_CASES, INSTANCE.n_items))
    setup = rng.integers(0, INSTANCE.n_items + 1, (N_CASES, INSTANCE.n_machines))
    action = rng.integers(0, INSTANCE.n_items + 1, (N_CASES, INSTANCE.n_machines))
    time = rng.integers(0, INSTANCE.horizon, N_CASES)
    return inventory, setup, action, time


@jax.jit
def _jax_cases(inventory, setup, action, time, keys):
    def one(inv, st, a, t, key):
        state = E.LotSizingState(inv, st, t)
        post, setup_cost = E.post_decision(PARAMS, state, a)
        demand = E.draw_demand(PARAMS, key)
        nxt, cost = E.exogenous_given_demand(PARAMS, post, demand)
        stepped, reward, stepped_post = E.step(PARAMS, state, a, key)
        return post, setup_cost, demand, nxt, cost, stepped, reward, stepped_post

    return jax.vmap(one)(inventory, setup, action, time, keys)


def test_jax_env_agrees_with_numpy_reference_on_random_states_actions_and_draws():
    inventory, setup, action, time = _random_cases(0)
    keys = jax.random.split(jax.random.key(1), N_CASES)
    post, setup_cost, demand, nxt, cost, stepped, reward, stepped_post = jax.device_get(
        _jax_cases(jnp.asarray(inventory, jnp.int32), jnp.asarray(setup, jnp.int32),
                   jnp.asarray(action, jnp.int32), jnp.asarray(time, jnp.int32), keys))
    seen = {"switch": 0, "keep": 0, "idle": 0, "cannot_make": 0, "stock_out": 0, "cap": 0}
    for n in range(N_CASES):
        ref_post, ref_setup, ref_setup_cost = reference.post_decision(INSTANCE, inventory[n], setup[n], action[n])
        ref_next, holding, lost = reference.serve_demand(INSTANCE, ref_post, demand[n])
        np.testing.assert_array_equal(post.inventory[n], ref_post)
        np.testing.assert_array_equal(post.setup[n], ref_setup)
        assert post.time[n] == time[n] and nxt.time[n] == time[n] + 1
        np.testing.assert_allclose(setup_cost[n], ref_setup_cost, rtol=1e-6)
        np.testing.assert_array_equal(nxt.inventory[n], ref_next)
        np.testing.assert_array_equal(nxt.setup[n], ref_setup)
        np.testing.assert_allclose(cost[n], holding + lost, rtol=1e-5, atol=1e-5)
        # `step` draws the same demand from the same key.
        np.testing.assert_array_equal(stepped.inventory[n], ref_next)
        np.testing.assert_array_equal(stepped_post.inventory[n], ref_post)
        np.testing.assert_allclose(reward[n], -(ref_setup_cost + holding + lost), rtol=1e-5, atol=1e-5)
        for m, a in enumerate(action[n]):
            makes = a > 0 and INSTANCE.production_rate[m, a - 1] > 0
            seen["idle"] += a == 0
            seen["cannot_make"] += a > 0 and not makes
            seen["switch"] += makes and setup[n, m] != a
            seen["keep"] += makes and setup[n, m] == a
        seen["stock_out"] += lost > 0
        seen["cap"] += np.any(ref_post - demand[n] > INSTANCE.inventory_cap)
    assert min(seen.values()) >= 20, seen  # every branch of the rules was exercised many times


def test_post_decision_is_deterministic_and_charges_setups_once():
    # Machine 0 switches to an item it can make, then keeps it: the second period pays no setup and loses nothing.
    m_items = np.flatnonzero(INSTANCE.production_rate[0])
    item = int(m_items[0])
    state = E.initial_state(PARAMS)
    action = jnp.zeros(INSTANCE.n_machines, jnp.int32).at[0].set(item + 1)
    post, cost = E.post_decision(PARAMS, state, action)
    rate, loss = INSTANCE.production_rate[0, item], INSTANCE.setup_loss[0, item]
    assert float(cost) == pytest.approx(INSTANCE.setup_cost[0, item], rel=1e-6)
    assert int(post.inventory[item] - state.inventory[item]) == max(rate - loss, 0)
    again, cost2 = E.post_decision(PARAMS, post, action)
    assert float(cost2) == 0.0 and int(again.inventory[item] - post.inventory[item]) == rate
    idle, cost3 = E.post_decision(PARAMS, again, jnp.zeros_like(action))
    assert float(cost3) == 0.0 and np.all(np.asarray(idle.setup) == 0)
    np.testing.assert_array_equal(idle.inventory, again.inventory)
    # An out-of-range request (no such item) is idle too, never a wrapped-around item.
    beyond, cost4 = E.post_decision(PARAMS, again, jnp.full_like(action, INSTANCE.n_items + 1))
    assert float(cost4) == 0.0 and np.all(np.asarray(beyond.setup) == 0)
    np.testing.assert_array_equal(beyond.inventory, again.inventory)


def test_demand_draws_follow_the_binomial_law():
    params = E.params_from_instance(generate("15i5m", 0))
    draws = np.asarray(jax.vmap(lambda k: E.draw_demand(params, k))(jax.random.split(jax.random.key(0), 20_000)))
    freq = np.bincount(draws.ravel(), minlength=21) / draws.size
    assert 0.5 * np.abs(freq - binomial_pmf(20, 0.4)).sum() < 0.005  # total variation, 300k draws
    assert abs(draws.mean() - 8.0) < 0.02 and abs(draws.var() - 4.8) < 0.05


def test_vmapped_over_instances_and_seeds_equals_single_calls():
    instances = [generate("15i5m", s) for s in (0, 1)]
    stacked = E.stack_params(instances)
    keys = jax.random.split(jax.random.key(3), 4)
    action = jnp.arange(5, dtype=jnp.int32) + 1

    def run(params, key):
        nxt, reward, _ = E.step(params, E.initial_state(params), action, key)
        return nxt.inventory, reward

    batched = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, 0)), in_axes=(0, None)))(stacked, keys)
    for i, inst in enumerate(instances):
        for j in range(4):
            single = run(E.params_from_instance(inst), keys[j])
            np.testing.assert_array_equal(batched[0][i, j], single[0])
            np.testing.assert_allclose(batched[1][i, j], single[1], rtol=1e-6)
    with pytest.raises(ValueError, match="instances of one size"):
        E.stack_params([generate("15i5m", 0), generate("20i10m", 0)])


def test_episode_terminates_at_the_horizon_and_observations_stay_in_bounds():
    env = E.LotSizing(INSTANCE)
    obs, state = env.reset(jax.random.key(0), PARAMS)
    space = env.observation_space(PARAMS)
    assert obs.shape == space.shape == (E.observation_size(6, 3),)
    step = jax.jit(env.step)
    for t in range(INSTANCE.horizon):
        action = env.action_space(PARAMS).sample(jax.random.key(t))
        obs, state, reward, done, info = step(jax.random.key(100 + t), state, action, PARAMS)
        assert bool(space.contains(obs)) and float(reward) <= 0.0
        assert bool(done) == (t == INSTANCE.horizon - 1) and bool(info["terminated"]) == bool(done)
        parts = sum(float(info[k]) for k in ("setup_cost", "holding_cost", "lost_sales_cost"))
        assert float(reward) == pytest.approx(-parts, rel=1e-6)
    assert float(obs[-1]) == 1.0  # t / horizon


def test_gymnasium_adapters_both_ways():
    gym_env = GymnasiumEnv(E.LotSizing(INSTANCE))
    assert gym_env.action_space == gymnasium.spaces.MultiDiscrete([7, 7, 7])
    check_env(gym_env, skip_render_check=True)
    gym_env.reset(seed=0)
    steps, terminated = 0, False
    while not terminated:
        _, reward, terminated, truncated, _ = gym_env.step(gym_env.action_space.sample())
        assert reward <= 0.0 and not truncated
        steps += 1
    assert steps == INSTANCE.horizon
    # The other way: gymnasium envs stepped on the host by a jitted JAX policy (always idle: cost is holding and
    # lost sales only).
    driver = GymnasiumDriver([GymnasiumEnv(E.LotSizing(INSTANCE)) for _ in range(2)], seed=0)
    idle = lambda params, obs, key: (jnp.zeros((obs.shape[0], 3), jnp.int32), {})  # noqa: E731
    batch = driver.rollout(idle, None, jax.random.key(0), INSTANCE.horizon)
    assert batch.reward.shape == (INSTANCE.horizon, 2)
    assert bool(jnp.all(batch.terminated[-1])) and not bool(jnp.any(batch.terminated[:-1]))
    np.testing.assert_array_equal(batch.obs[0, 0], np.asarray(E.observation(PARAMS, E.initial_state(PARAMS))))
