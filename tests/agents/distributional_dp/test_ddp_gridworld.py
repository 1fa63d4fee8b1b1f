"""The JAX stochastic gridworld equals its tabular FiniteMDP, and its risk structure is the documented one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.distributional_dp import dp
from agents.distributional_dp import objectives as obj
from agents.distributional_dp.mdp import gridworld_mdp
from rl.envs.gridworld import DEFAULT_LAYOUT, Gridworld, GridworldParams, GridworldState

ENV = Gridworld()


def _step_all(params, key, repeats):
    """Step every (cell, action) `repeats` times from t = 0: returns next cells and rewards [C, 4, repeats]."""
    cells, actions, reps = np.meshgrid(np.arange(ENV.num_cells), np.arange(4), np.arange(repeats), indexing="ij")
    keys = jax.random.split(key, cells.size)

    def one(k, c, a):
        _, new, reward, _, _ = ENV.step(k, GridworldState(c, jnp.zeros((), jnp.int32)), a, params)
        return new.cell, reward

    nxt, rew = jax.jit(jax.vmap(one))(keys, jnp.asarray(cells.ravel(), jnp.int32),
                                      jnp.asarray(actions.ravel(), jnp.int32))
    return np.asarray(nxt).reshape(cells.shape), np.asarray(rew).reshape(cells.shape).astype(int)


def _empirical_kernel(mdp, nxt, rew):
    c, a, n = nxt.shape
    kernel = np.zeros_like(mdp.kernel)
    for s in range(c):
        for act in range(a):
            np.add.at(kernel[s, act], (nxt[s, act], rew[s, act] - mdp.reward_min), 1.0 / n)
    return kernel


@pytest.mark.parametrize("slip", [0.0, 1.0])
def test_deterministic_limits_equal_the_kernel_exactly(slip):
    # With slip 0 or 1 every (cell, action) has one outcome: the JAX step must hit it exactly.
    params = GridworldParams(slip_prob=slip, pit_cost=2, horizon=5)
    mdp = gridworld_mdp(DEFAULT_LAYOUT, slip, 2, 5)
    nxt, rew = _step_all(params, jax.random.key(0), 3)
    np.testing.assert_array_equal(_empirical_kernel(mdp, nxt, rew), mdp.kernel)


def test_kernel_is_the_slip_mixture_and_sampled_steps_match_it():
    p = 0.3
    mdp = gridworld_mdp(DEFAULT_LAYOUT, p, 1, 12)
    np.testing.assert_allclose(mdp.kernel, (1 - p) * gridworld_mdp(DEFAULT_LAYOUT, 0.0, 1, 12).kernel
                               + p * gridworld_mdp(DEFAULT_LAYOUT, 1.0, 1, 12).kernel, atol=1e-12)
    n = 4000
    nxt, rew = _step_all(GridworldParams(slip_prob=p, pit_cost=1, horizon=12), jax.random.key(1), n)
    empirical = _empirical_kernel(mdp, nxt, rew)
    sigma = np.sqrt(mdp.kernel * (1 - mdp.kernel) / n)
    assert np.all(np.abs(empirical - mdp.kernel) <= 5 * sigma + 1e-12)
    assert np.all((empirical > 0) <= (mdp.kernel > 0))  # no outcome outside the kernel's support
    slippery = [k for k, kind in enumerate(ENV.kinds) if kind == 1]
    pit = [j for j, kind in enumerate(ENV.kinds) if kind == 3]
    assert len(slippery) == 4 and len(pit) == 4
    for k in slippery:  # moving right from a slippery cell falls into the pit with probability p
        assert abs(empirical[k, 1][pit].sum() - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_episode_length_termination_and_observation():
    params = GridworldParams(horizon=4)
    obs, state = ENV.reset(jax.random.key(0), params)
    assert obs.shape == (ENV.num_cells + 1,) and ENV.observation_space(params).contains(obs)
    assert int(state.cell) == ENV.start and float(obs[ENV.start]) == 1.0 and float(obs[-1]) == 1.0
    dones = []
    for t in range(4):  # bump into the wall on the left: stays at the start, reward -1
        obs, state, reward, done, info = ENV.step(jax.random.key(t), state, jnp.int32(3), params)
        assert float(reward) == -1.0 and int(state.cell) == ENV.start
        assert float(obs[-1]) == pytest.approx((4 - t - 1) / 4)
        dones.append(bool(done))
    assert dones == [False, False, False, True] and bool(info["terminated"]) and not bool(info["truncated"])
    # The short path reaches the goal in 5 moves without slipping (slip 0) and terminates there.
    params = GridworldParams(slip_prob=0.0, horizon=12)
    obs, state = ENV.reset(jax.random.key(0), params)
    total = 0.0
    for t in range(5):
        obs, state, reward, done, _ = ENV.step(jax.random.key(t), state, jnp.int32(1), params)
        total += float(reward)
    assert bool(done) and total == -5.0 and ENV.kinds[int(state.cell)] == 2


def test_risk_structure_of_the_default_gridworld():
    mdp = gridworld_mdp(DEFAULT_LAYOUT, 0.05, 1, 12)
    optimum = dp.optimise_cvar(mdp, 0.1)
    assert optimum.value == pytest.approx(-7.0) and optimum.b_star == -7
    assert optimum.return_pmf[list(optimum.return_support).index(-7)] == pytest.approx(1.0)
    neutral = dp.value_iteration(mdp, obj.mean())
    pmf, support = neutral.final_stock_pmf(mdp), neutral.grid.final_support
    success = 0.95 ** 4
    assert obj.mean()(pmf, support) == pytest.approx(-5 * success - 12 * (1 - success))  # -6.298 > -7
    assert obj.cvar(0.1)(pmf, support) == pytest.approx(-12.0)


@pytest.mark.parametrize("layout, message", [
    (("S.", "G"), "equal length"), (("..G",), "one start"), (("S.S", "..G"), "several"), (("S..",), "goal"),
    (("S?G",), "expected one of"),
])
def test_bad_layouts_are_clear_errors(layout, message):
    with pytest.raises(ValueError, match=message):
        Gridworld(layout)
