"""Dispatching rules: the jitted rollouts against a plain-Python dispatcher, the validator and brute force."""
import numpy as np
import pytest

from agents.jssp_cp import env, rules
from agents.jssp_cp.brute_force import optimum_by_orders
from agents.jssp_cp.cpsat import solve
from agents.jssp_cp.instances import random_instance
from agents.jssp_cp.schedule import makespan_of, simulate, validate


def _python_priority(rule, inst, start, job):
    """The rules restated on a partial schedule: start -1 marks unfixed operations."""
    todo = [k for k in range(inst.operations) if start[job, k] < 0]
    k = todo[0]
    previous_end = 0 if k == 0 else start[job, k - 1] + inst.durations[job, k - 1]
    return {"spt": -inst.durations[job, k], "lpt": inst.durations[job, k],
            "mwkr": sum(inst.durations[job, t] for t in todo), "mor": len(todo), "fifo": -previous_end}[rule]


def _python_dispatch(rule, inst):
    decisions = []
    while True:
        start, legal = simulate(inst, decisions)
        jobs = [j for j in legal[-1] if j >= 0]
        if not jobs:
            return start
        decisions.append(max(jobs, key=lambda j: (_python_priority(rule, inst, start, j), -j)))


@pytest.mark.parametrize("rule", sorted(rules.RULES))
def test_rules_match_a_plain_python_dispatcher_on_a_padded_batch(rule):
    instances = [random_instance(s, j, m, max_duration=9) for s, (j, m) in enumerate([(6, 4), (4, 4), (3, 2)])]
    starts, makespans = rules.dispatch_batch(env.stack(instances), rule)
    for inst, got, makespan in zip(instances, np.asarray(starts), np.asarray(makespans)):
        expected = _python_dispatch(rule, inst)
        np.testing.assert_array_equal(got[:inst.jobs, :inst.operations], expected)
        assert validate(inst, expected, makespan=int(makespan)) == []
        single, single_makespan = rules.dispatch(env.pad(inst, 6, 4), rule)
        np.testing.assert_array_equal(np.asarray(single), got)
        assert int(single_makespan) == int(makespan)


def test_rules_never_beat_the_optimum_found_two_ways():
    for seed in range(6):
        inst = random_instance(seed, 3, 3)
        optimum, _ = optimum_by_orders(inst)
        cp = solve(inst, time_limit=5.0, workers=1)
        assert (cp.status, cp.makespan, cp.bound) == ("OPTIMAL", optimum, optimum)
        assert validate(inst, cp.start, makespan=cp.makespan) == []
        batch = env.stack([inst])
        for rule in rules.RULES:
            start, makespan = rules.dispatch_batch(batch, rule)
            assert validate(inst, np.asarray(start[0]), makespan=int(makespan[0])) == []
            assert int(makespan[0]) >= optimum


def test_a_rule_can_be_a_jax_function_and_unknown_names_fail():
    inst = random_instance(0, 4, 3)
    start, makespan = rules.dispatch(env.pad(inst), lambda state: -state.job_ready.astype(float))
    fifo_start, _ = rules.dispatch(env.pad(inst), "fifo")
    np.testing.assert_array_equal(np.asarray(start), np.asarray(fifo_start))
    assert makespan_of(inst, np.asarray(start)) == int(makespan)
    with pytest.raises(ValueError, match="unknown dispatching rule 'edd'"):
        rules.dispatch(env.pad(inst), "edd")
