"""Inference (greedy and best-of-N) against the rules and brute force; PPO's random instances and bound against
NumPy (PPO's updates run end to end in test_jssp_experiment.py)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.jssp_cp import env, inference, rules
from agents.jssp_cp.brute_force import best_by_decisions, optimum_by_orders
from agents.jssp_cp.instances import Instance, random_instance
from agents.jssp_cp.network import ILLEGAL, JobShopPolicy, NetworkConfig, init_params
from agents.jssp_cp.ppo import lower_bound, random_padded


def window_mwkr(params, obs):
    """MWKR as a policy: with <= 5 operations per job the window holds all remaining work (in units of the
    longest duration s <= 9, so rounding k / s * 1000 to integers merges float-summation ties and nothing else);
    never No-Op."""
    work = jnp.round(obs.window[..., 2].sum(-1) * 1000)
    logits = jnp.concatenate([work, jnp.zeros(work.shape[:-1] + (1,))], axis=-1)
    return jnp.where(obs.legal & (jnp.arange(logits.shape[-1]) < logits.shape[-1] - 1), logits, ILLEGAL), work[..., 0]


def uniform(params, obs):
    return jnp.where(obs.legal, 0.0, ILLEGAL), jnp.zeros(obs.legal.shape[:-1])


def test_greedy_rollout_of_a_rule_shaped_policy_equals_the_rule():
    instances = [random_instance(seed, 5, 4, max_duration=9) for seed in range(6)]
    batch = env.stack(instances)
    start, makespan = inference.greedy_batch(window_mwkr, None, batch)
    rule_start, rule_makespan = rules.dispatch_batch(batch, "mwkr")
    np.testing.assert_array_equal(np.asarray(start), np.asarray(rule_start))
    np.testing.assert_array_equal(np.asarray(makespan), np.asarray(rule_makespan))


def test_best_of_n_samples_is_valid_and_finds_the_tiny_optimum():
    np.testing.assert_allclose(np.asarray(inference.temperatures(4)), [0.5, 1.0, 1.5, 2.0])
    instances = [random_instance(seed, 3, 3, max_duration=6) for seed in range(4)]
    start, makespan = inference.sampled_batch(uniform, None, env.stack(instances), jax.random.key(0), 128)
    for inst, s, m in zip(instances, np.asarray(start), np.asarray(makespan)):
        inference.checked(inst, s, m, "uniform sampling")
        # Uniform over legal actions, No-Ops included, reaches every semi-active schedule: 128 tries find the best.
        assert int(m) == best_by_decisions(inst) == optimum_by_orders(inst)[0]
    bad = np.asarray(start[0]).copy()
    bad[0, 1] = bad[0, 0]  # starts before its predecessor ends
    with pytest.raises(RuntimeError, match="invalid schedule"):
        inference.checked(instances[0], bad, int(makespan[0]), "a corrupted schedule")


def test_random_padded_instances_and_their_lower_bound():
    for jobs, machines in ((3, 2), (5, 4), (6, 6)):
        inst = jax.jit(random_padded, static_argnums=(3, 4))(jax.random.key(jobs), jobs, machines, 6, 6)
        mach, dur = np.asarray(inst.machines), np.asarray(inst.durations)
        for j in range(6):
            if j < jobs:
                assert sorted(mach[j, :machines]) == list(range(machines))
                assert (1 <= dur[j, :machines]).all() and (dur[j, :machines] <= 99).all()
            assert (dur[j, machines:] == 0).all() and (j < jobs or (dur[j] == 0).all())
        assert np.asarray(inst.num_ops).tolist() == [machines] * jobs + [0] * (6 - jobs)
        plain = Instance(mach[:jobs, :machines], dur[:jobs, :machines])
        loads = np.bincount(plain.machines.ravel(), plain.durations.ravel())
        assert int(lower_bound(inst)) == max(loads.max(), plain.durations.sum(1).max())
        # The padded instance dispatches exactly like the unpadded one.
        assert int(rules.dispatch(inst, "spt")[1]) == int(rules.dispatch(env.pad(plain), "spt")[1])
    tiny = random_instance(3, 3, 3, max_duration=9)
    assert int(lower_bound(env.pad(tiny))) <= optimum_by_orders(tiny)[0]


def test_a_policy_saved_by_another_network_version_is_one_clear_error(tmp_path):
    network = NetworkConfig(dim=8, heads=1, job_layers=1)
    params = init_params(jax.random.key(0), JobShopPolicy(network))
    inference.save_policy(tmp_path, params, network)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool((a == b).all()), inference.load_policy(tmp_path)[1], params))
    # The pooling layer of a network from before the job features read two embeddings, not two plus the features.
    old = jax.tree_util.tree_map(lambda x: x, params)
    old["params"]["pool"]["kernel"] = old["params"]["pool"]["kernel"][:16]
    inference.save_policy(tmp_path, old, network)
    with pytest.raises(ValueError, match=r"policy.msgpack: parameter \['params'\]\['pool'\]\['kernel'\] has shape "
                                         r"\(16, 8\), this network expects \(18, 8\)"):
        inference.load_policy(tmp_path)


def test_the_shipped_policy_loads_schedules_validly_and_records_how_it_was_trained():
    apply, params = inference.load_policy(inference.pretrained_dir())
    instance = random_instance(np.random.default_rng(5), 6, 4)
    for samples in (0, 4):
        found = inference.schedule_with_agent(apply, params, instance, num_samples=samples)
        assert found.makespan == int((found.start + instance.durations).max())  # validated inside
    with open(f"{inference.pretrained_dir()}/training.json") as f:
        training = json.load(f)
    assert training["command"].startswith("jaxalign run jssp_cp --workdir ") and len(training["commit"]) >= 7
    assert training["config"]["taillard"] == "ta01-ta10"  # evaluated there, never trained on (imitation refuses)


def test_non_delay_masks_no_op_whenever_a_job_can_start():
    # job 0: m0 for 3 then m1 for 1; job 1: m1 for 1 then m0 for 1. After job 1's first operation, job 0 can start
    # on m0 now and No-Op is legal too (job 1 would wait for m0).
    instance = env.pad(Instance(np.array([[0, 1], [1, 0]]), np.array([[3, 1], [1, 1]])))
    network = JobShopPolicy(NetworkConfig(dim=8, heads=1, job_layers=1))
    params = init_params(jax.random.key(0), network)
    both = env.observe(env.transition(env.reset(instance), jnp.asarray(1)))
    assert both.legal.tolist() == [True, False, True]
    logits, value = inference.NonDelay(network.apply)(params, both)
    plain_logits, plain_value = network.apply(params, both)
    assert float(logits[-1]) == ILLEGAL and float(plain_logits[-1]) > ILLEGAL
    np.testing.assert_array_equal(logits[:-1], plain_logits[:-1])
    assert float(value) == float(plain_value)


def every_decision_rollout(apply, params, instance, key, temperature, greedy):
    """The rollout as it was before forced decisions skipped the network (it asks the network at every decision),
    and how many of its decisions had a single allowed action."""
    def body(carry):
        state, key, forced = carry
        key, k_act = jax.random.split(key)
        logits, _ = apply(params, env.observe(state))
        action = jnp.where(greedy, jnp.argmax(logits), jax.random.categorical(k_act, logits / temperature))
        forced = forced + (inference.allowed_actions(apply, state).sum() == 1)
        return env.transition(state, action), key, forced

    final, _, forced = jax.lax.while_loop(lambda c: ~env.done(c[0]), body, (env.reset(instance), key, 0))
    return final, forced


@pytest.mark.parametrize("non_delay", [False, True])
def test_forced_decisions_skip_the_network_and_change_no_schedule(non_delay):
    network = JobShopPolicy(NetworkConfig(dim=8, heads=2, job_layers=1))
    params = init_params(jax.random.key(4), network)
    apply = inference.NonDelay(network.apply) if non_delay else network.apply
    batch = env.stack([random_instance(seed, jobs, machines) for seed, (jobs, machines)
                       in enumerate([(6, 4), (8, 5), (3, 6), (10, 3)])], jobs=10, machines=6)
    args = (batch, jax.random.split(jax.random.key(9), 4), jnp.asarray([0.5, 1.0, 2.0, 1.0]),
            jnp.asarray([False, False, False, True]))  # three sampled rollouts at three temperatures, one greedy
    skipping = jax.jit(jax.vmap(functools.partial(inference.rollout, apply, params)))(*args)
    reference, forced = jax.jit(jax.vmap(functools.partial(every_decision_rollout, apply, params)))(*args)
    np.testing.assert_array_equal(skipping.start, reference.start)
    np.testing.assert_array_equal(skipping.makespan, reference.makespan)
    assert (np.asarray(forced) > 0).all()  # every rollout had decisions the skipping one took without the network


def test_the_best_of_n_includes_the_greedy_rollout():
    network = JobShopPolicy(NetworkConfig(dim=8, heads=1, job_layers=1))
    params = init_params(jax.random.key(2), network)
    batch = env.stack([random_instance(seed, 8, 5) for seed in range(6)])
    _, greedy = inference.greedy_batch(network.apply, params, batch)
    for samples in (1, 3):
        _, best = inference.sampled_batch(network.apply, params, batch, jax.random.key(0), samples)
        assert (np.asarray(best) <= np.asarray(greedy)).all()
    _, one = inference.sampled_batch(network.apply, params, batch, jax.random.key(0), 1)
    np.testing.assert_array_equal(one, greedy)  # N = 1 is the greedy rollout alone


def test_best_within_a_time_limit_runs_rounds_and_keeps_the_best_of_them():
    instances = [random_instance(seed, 3, 3, max_duration=6) for seed in range(4)]
    batch = env.stack(instances)
    key = jax.random.key(3)
    # Round 0 is the greedy rollout.
    one = inference.best_within(uniform, None, batch, key, seconds=1e6, round_size=4, max_rounds=1)
    start, makespan = inference.greedy_batch(uniform, None, batch)
    np.testing.assert_array_equal(one.makespan, makespan)
    np.testing.assert_array_equal(one.start, start)
    assert one.rollouts == 1
    # More rounds: fresh samples each round, the best kept, never longer than fewer rounds; a valid schedule.
    many = inference.best_within(uniform, None, batch, key, seconds=1e6, round_size=4, max_rounds=40)
    assert many.rollouts == 1 + 39 * 4 and (many.makespan <= one.makespan).all()
    for inst, s, m in zip(instances, many.start, many.makespan):
        inference.checked(inst, s, m, "rounds of uniform sampling")
        assert int(m) == optimum_by_orders(inst)[0]  # 156 uniform samples on 3x3 find the optimum
    assert (many.makespan < one.makespan).any()
    # A limit shorter than the greedy rollout still runs it and stops there; so does one that a sampled round is
    # expected to overrun (a round of 10^6 is expected to cost 10^6 greedy rollouts, the greedy one now compiled).
    assert inference.best_within(uniform, None, batch, key, seconds=1e-9, round_size=4).rollouts == 1
    assert inference.best_within(uniform, None, batch, key, seconds=5.0, round_size=10**6).rollouts == 1
    # `greedy_batch` warms a shape for `best_within` too (as the bench's warm-up does): its greedy time is then the
    # estimate, so a round of 2,000 rollouts (expected 2,000 greedy rollouts' time) does not start in 50 ms.
    other = env.stack([random_instance(seed, 4, 3, max_duration=6) for seed in range(2)])
    jax.block_until_ready(inference.greedy_batch(uniform, None, other))
    assert inference.best_within(uniform, None, other, key, seconds=0.05, round_size=2000).rollouts == 1
    with pytest.raises(ValueError, match="seconds > 0"):
        inference.best_within(uniform, None, batch, key, seconds=0)
