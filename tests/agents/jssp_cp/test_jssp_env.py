"""The JAX environment against the plain-Python simulation (schedule.simulate) and brute force."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.jssp_cp import env
from agents.jssp_cp.brute_force import best_by_decisions, optimum_by_orders
from agents.jssp_cp.instances import Instance, random_instance
from agents.jssp_cp.schedule import NOOP, makespan_of, simulate, validate

JOBS, MACHINES = 5, 4  # one padded shape, so the step compiles once


@functools.lru_cache(maxsize=None)
def _step():
    return jax.jit(env.step), jax.jit(lambda inst: (lambda s: (s, env.observe(s)))(env.reset(inst)))


def _random_episode(inst: Instance, seed: int, p_noop: float):
    """Random legal decisions (No-Op with probability p_noop when legal) through the jitted env."""
    step, reset = _step()
    rng = np.random.default_rng(seed)
    state, obs = reset(env.pad(inst, JOBS, MACHINES))
    decisions, masks, total, finished = [], [], 0.0, False
    while not finished:
        legal = np.asarray(obs.legal)
        masks.append(legal)
        jobs = np.flatnonzero(legal[:JOBS])
        if legal[JOBS] and (rng.random() < p_noop or len(jobs) == 0):
            action = JOBS
        else:
            action = int(rng.choice(jobs))
        decisions.append(NOOP if action == JOBS else action)
        state, obs, reward, finished = step(state, action)
        total += float(reward)
    return state, decisions, masks, total


@pytest.mark.parametrize("shape", [(5, 4), (3, 3), (4, 2), (2, 4), (1, 1)])
def test_env_matches_the_plain_python_simulation(shape):
    for seed in range(4):
        inst = random_instance(seed, *shape, max_duration=9)
        state, decisions, masks, total = _random_episode(inst, seed, p_noop=0.3)
        start, legal = simulate(inst, decisions)
        jobs, ops = shape
        got = np.asarray(state.start)
        np.testing.assert_array_equal(got[:jobs, :ops], start)
        assert (got[jobs:] == -1).all() and (got[:, ops:] == -1).all()
        for mask, expected in zip(masks, legal):
            listed = [j for j in np.flatnonzero(mask[:JOBS])] + ([-1] if mask[JOBS] else [])
            assert listed == expected
        assert validate(inst, start) == []
        assert int(state.makespan) == makespan_of(inst, start) == -total
        assert not any(np.asarray(env.legal_actions(state)))


def test_noops_happen_and_non_delay_without_them():
    inst = random_instance(7, 5, 4, max_duration=9)
    _, decisions, _, _ = _random_episode(inst, 0, p_noop=0.5)
    assert decisions.count(NOOP) > 0
    _, decisions, _, _ = _random_episode(inst, 0, p_noop=0.0)
    assert NOOP not in decisions and len(decisions) == 20


def test_with_noops_the_decisions_reach_the_optimum_and_without_them_maybe_not():
    strictly_worse = 0
    for seed in range(8):
        inst = random_instance(seed, 3, 3)
        optimum, start = optimum_by_orders(inst)
        assert validate(inst, start) == []
        assert best_by_decisions(inst, noop=True) == optimum
        non_delay = best_by_decisions(inst, noop=False)
        assert non_delay >= optimum
        strictly_worse += non_delay > optimum
    assert strictly_worse > 0  # the non-delay restriction really loses on some instances


def test_vmapped_batch_of_padded_instances_matches_one_by_one():
    instances = [random_instance(s, j, m, max_duration=9) for s, (j, m) in enumerate([(5, 4), (3, 3), (2, 4)])]
    batch = env.stack(instances)
    assert batch.machines.shape == (3, 5, 4)
    episodes = [_random_episode(inst, 11, p_noop=0.2) for inst in instances]
    length = max(len(d) for _, d, _, _ in episodes)
    # after done, action 0 is illegal and leaves the state unchanged
    actions = np.zeros((3, length), np.int32)
    for b, (_, decisions, _, _) in enumerate(episodes):
        actions[b, :len(decisions)] = [JOBS if d is NOOP else d for d in decisions]

    def run(inst, acts):
        def body(state, a):
            state, _, reward, _ = env.step(state, a)
            return state, reward
        return jax.lax.scan(body, env.reset(inst), acts)

    final, rewards = jax.jit(jax.vmap(run))(batch, jnp.asarray(actions))
    for b, (state, _, _, total) in enumerate(episodes):
        np.testing.assert_array_equal(np.asarray(final.start[b]), np.asarray(state.start))
        assert float(rewards[b].sum()) == total == -int(final.makespan[b])


def test_illegal_actions_leave_the_state_unchanged():
    inst = Instance(np.array([[0, 1], [1, 0]]), np.array([[3, 2], [1, 1]]))
    state = env.reset(env.pad(inst))
    state, _, _, _ = env.step(state, 1)  # job 1 on machine 1 during [0, 1); its next operation waits until 1
    assert int(state.time) == 0 and env.legal_actions(state).tolist() == [True, False, True]
    _assert_unchanged_by(state, 1)
    for action in (0, 1, 0):
        state, _, _, _ = env.step(state, action)
    assert bool(env.done(state)) and not env.legal_actions(state).any()
    _assert_unchanged_by(state, 2)


def _assert_unchanged_by(state, action):
    same, _, reward, _ = env.step(state, action)
    assert float(reward) == 0
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), same, state))


def test_observation_on_a_hand_worked_instance():
    # job 0: m0 for 4 then m1 for 2; job 1: m0 for 2 then m1 for 8.
    inst = Instance(np.array([[0, 1], [0, 1]]), np.array([[4, 2], [2, 8]]))
    state = env.reset(env.pad(inst))
    obs = env.observe(state)
    np.testing.assert_allclose(obs.window[0, :3], [[0, 0, 4 / 8, 1], [0, 4 / 8, 2 / 8, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(obs.window[1, :2], [[0, 0, 2 / 8, 1], [0, 2 / 8, 1, 0]])
    assert obs.competition.tolist() == [[True, True], [True, True]]
    assert obs.legal.tolist() == [True, True, False]
    np.testing.assert_allclose(obs.job, [[6 / 10, 1], [1, 1]])  # remaining work 6 and 10, two operations each
    state, obs, reward, _ = env.step(state, 1)  # job 1 takes m0 during [0, 2)
    assert float(reward) == -2 and int(state.time) == 2
    # job 0 now waits for m0 until 2; job 1's next operation (m1) can start at 2 too
    np.testing.assert_allclose(obs.window[0, :2], [[0, 0, 4 / 8, 1], [0, 4 / 8, 2 / 8, 0]])
    np.testing.assert_allclose(obs.window[1, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(obs.job, [[6 / 8, 1], [1, 1 / 2]])  # job 1: work 8 in one operation left
    assert obs.competition.tolist() == [[True, False], [False, True]]
    state, obs, reward, _ = env.step(state, 1)  # job 1 on m1 during [2, 10)
    # job 0: m0 at 2 for 4, then m1 no earlier than 10 (busy): lower bound 10 - 2 = 8 -> 1.0
    np.testing.assert_allclose(obs.window[0, :2], [[0, 0, 4 / 8, 1], [0, 1, 2 / 8, 0]])
    assert float(reward) == -8 and obs.job_mask.tolist() == [True, False]
    np.testing.assert_allclose(obs.job, [[1, 1], [0, 0]])  # a finished job's features are 0


def test_pad_refuses_to_shrink():
    with pytest.raises(ValueError, match="cannot pad"):
        env.pad(random_instance(0, 3, 3), jobs=2)
