"""Expert decisions from CP-SAT schedules (checked by brute force and by replay), and behaviour cloning."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.jssp_cp import imitation
from agents.jssp_cp.brute_force import optimum_by_orders
from agents.jssp_cp.instances import benchmark, random_instance
from agents.jssp_cp.network import JobShopPolicy, NetworkConfig, init_params
from agents.jssp_cp.schedule import makespan_of, validate

JOBS, MACHINES = 4, 3  # one padded shape for every test: one compilation


@functools.lru_cache(maxsize=None)
def _tiny():
    instances = [random_instance(seed, 3 + seed % 2, 3, max_duration=9) for seed in range(6)]
    solved = imitation.solve_all(instances, time_limit=5.0)
    return instances, solved


def test_replaying_optimal_cpsat_schedules_gives_the_brute_force_optimum():
    instances, solved = _tiny()
    data = imitation.expert_dataset(instances, [r.start for r in solved], [r.makespan for r in solved], JOBS,
                                    MACHINES)
    optima = [optimum_by_orders(inst)[0] for inst in instances]
    assert [r.status for r in solved] == ["OPTIMAL"] * 6
    assert data.replayed_makespans.tolist() == [r.makespan for r in solved] == optima
    assert data.actions.shape[0] >= sum(i.durations.size for i in instances)  # one decision per operation at least
    assert data.obs.window.shape[1:] == (JOBS, 5, 4)


def test_a_schedule_with_idle_time_is_left_shifted_before_the_replay():
    instances, solved = _tiny()
    # Doubling every start time keeps a schedule valid (same orders, more idle time): its makespan is worse, and the
    # replay recovers the left-shifted one, here the optimum again.
    stretched = [2 * r.start for r in solved]
    makespans = [makespan_of(inst, s) for inst, s in zip(instances, stretched)]
    assert all(validate(inst, s) == [] for inst, s in zip(instances, stretched))
    data = imitation.expert_dataset(instances, stretched, makespans, JOBS, MACHINES)
    assert data.replayed_makespans.tolist() == [r.makespan for r in solved]
    assert (data.replayed_makespans < np.array(makespans)).all()
    # No-Ops are decisions too: the expert waits where the optimum keeps a machine idle.
    assert (data.actions == JOBS).any()


def test_benchmark_instances_are_refused():
    ta01 = benchmark("ta01")[0]
    with pytest.raises(ValueError, match="Taillard benchmark"):
        imitation.solve_all([random_instance(0, 3, 3), ta01], time_limit=1.0)
    with pytest.raises(ValueError, match="Taillard benchmark"):
        imitation.refuse_benchmarks([ta01])


def test_cross_entropy_matches_numpy_and_cloning_fits_the_expert():
    logits = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    actions = np.array([0, 3, 1, 1, 2])
    shifted = logits - logits.max(1, keepdims=True)
    expected = -np.mean(shifted[np.arange(5), actions] - np.log(np.exp(shifted).sum(1)))
    assert abs(float(imitation.cross_entropy(jnp.asarray(logits), jnp.asarray(actions))) - expected) < 1e-5

    instances, solved = _tiny()
    data = imitation.expert_dataset(instances, [r.start for r in solved], [r.makespan for r in solved], JOBS,
                                    MACHINES)
    net = JobShopPolicy(NetworkConfig(dim=16, heads=2, job_layers=1))
    params = init_params(jax.random.key(0), net)
    clone = imitation.make_cloning(net.apply, imitation.BCConfig(steps=150, batch_size=32, learning_rate=3e-3))
    before = imitation.agreement(net.apply, params, data)
    params, metrics = clone(params, data.obs, jnp.asarray(data.actions), jax.random.key(1))
    losses = np.asarray(metrics["bc_loss"])
    assert losses.shape == (150,)  # one per step, over the scanned segments (8 steps each, the last 6)
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    assert imitation.agreement(net.apply, params, data) > max(before, 0.85)


def test_an_improvement_round_imitates_the_solver_starting_from_the_policys_schedules():
    instances, _ = _tiny()
    net = JobShopPolicy(NetworkConfig(dim=16, heads=2, job_layers=1))
    params = init_params(jax.random.key(0), net)  # untrained: its schedules leave room for improvement
    data, stats = imitation.improvement_round(net.apply, params, instances, time_limit=5.0, num_samples=4,
                                              key=jax.random.key(2), jobs=JOBS, machines=MACHINES)
    optima = [optimum_by_orders(inst)[0] for inst in instances]
    # CP-SAT proves optimality on these from the hint: the targets are the brute-force optima, replayed exactly.
    assert stats["cpsat_optimal"] == len(instances)
    assert data.replayed_makespans.tolist() == data.cpsat_makespans.tolist() == optima
    assert stats["target_makespan"] == pytest.approx(np.mean(optima))
    assert stats["agent_makespan"] >= stats["target_makespan"]
    assert 0 < stats["improved"] <= len(instances)  # the untrained policy is not optimal everywhere
    assert data.actions.shape[0] >= sum(i.durations.size for i in instances)
    both = imitation.concatenate([data, data])
    assert both.actions.shape[0] == 2 * data.actions.shape[0]
    assert both.obs.window.shape[0] == 2 * data.obs.window.shape[0]
