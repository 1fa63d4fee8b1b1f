"""Auto-reset and episode statistics; the JAX env as a registered gymnasium env; gymnasium envs driving a rollout."""
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rl.envs import CartPole
from rl.envs.cartpole import CartPoleState
from rl.rollout import completed_episode_stats
from rl.wrappers import AutoReset, EpisodeStats, GymnasiumDriver, GymnasiumEnv, register_gymnasium

PARAMS = CartPole().default_params


def _falling_state():
    """A pole one step from falling past 12 degrees."""
    return CartPoleState(jnp.zeros(()), jnp.zeros(()), jnp.asarray(0.2094), jnp.asarray(1.0), jnp.asarray(7))


def test_auto_reset_returns_a_fresh_episode_and_keeps_the_final_observation():
    env = AutoReset(CartPole())
    obs, state, reward, done, info = env.step(jax.random.key(0), _falling_state(), jnp.asarray(1), PARAMS)
    assert bool(done) and bool(info["terminated"]) and float(reward) == 1.0
    assert float(info["final_observation"][2]) > 0.2094  # the state the step reached, before the reset
    assert int(state.time) == 0 and np.all(np.abs(np.asarray(obs)) <= 0.05)  # a fresh episode
    # Not done: AutoReset is transparent.
    calm = CartPoleState(*(jnp.zeros(()) for _ in range(4)), jnp.asarray(3))
    obs, state, _, done, info = env.step(jax.random.key(0), calm, jnp.asarray(1), PARAMS)
    assert not bool(done) and int(state.time) == 4
    np.testing.assert_array_equal(np.asarray(obs), np.asarray(info["final_observation"]))


def test_episode_stats_report_finished_episodes():
    env = EpisodeStats(AutoReset(CartPole()))
    obs, state = env.reset(jax.random.key(0), PARAMS)
    step = jax.jit(env.step)
    lengths, t = [], 0
    while len(lengths) < 3:  # always push right: episodes end after ~10 steps
        obs, state, _, done, info = step(jax.random.key(t), state, jnp.asarray(1), PARAMS)
        t += 1
        if bool(done):
            lengths.append(int(info["episode_length"]))
            assert float(info["episode_return"]) == lengths[-1]  # reward 1 per step
            assert int(state.episode_length) == 0
    assert sum(lengths) == t and all(5 < n < 30 for n in lengths)


def test_registered_jax_env_passes_gymnasium_env_checker():
    register_gymnasium("jaxalign-test/CartPole-v1", CartPole)
    env = gymnasium.make("jaxalign-test/CartPole-v1")
    # gymnasium's own CartPole-v1 draws the same two warnings about its infinite velocity bounds.
    with pytest.warns(UserWarning, match="infinity"):
        check_env(env.unwrapped, skip_render_check=True)
    first, _ = env.reset(seed=3)
    again, _ = env.reset(seed=3)
    np.testing.assert_array_equal(first, again)
    total, terminated, truncated = 0.0, False, False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        total += reward
    assert 5 <= total < 500 and terminated


def test_gymnasium_env_rejects_stepping_before_reset_and_rendering():
    env = GymnasiumEnv(CartPole())
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    with pytest.raises(ValueError, match="render"):
        GymnasiumEnv(CartPole(), render_mode="human")


def _policy(params, obs, key):
    """A fixed linear policy, deterministic: push towards the side the pole is falling to."""
    action = (obs @ params > 0).astype(jnp.int32)
    return action, {"score": obs @ params}


def test_gymnasium_cartpole_drives_a_host_side_rollout():
    """gymnasium's own CartPole-v1 (3 copies) stepped by a jitted JAX policy gives a consistent Transition."""
    driver = GymnasiumDriver([gymnasium.make("CartPole-v1") for _ in range(3)], seed=0)
    weights = jnp.array([0.0, 0.0, 1.0, 0.0])  # only the angle: balances for a while, then drifts and falls
    tr = driver.rollout(_policy, weights, jax.random.key(0), 120)
    assert tr.obs.shape == (120, 3, 4) and tr.action.shape == (120, 3) and tr.extras["score"].shape == (120, 3)
    np.testing.assert_array_equal(np.asarray(tr.action), (np.asarray(tr.obs) @ np.asarray(weights) > 0))
    assert np.all(np.asarray(tr.reward) == 1.0)
    done = np.asarray(tr.done)
    assert done.sum() >= 3
    # Where the episode goes on, the next step starts from the observation this one reached.
    cont = ~done[:-1]
    np.testing.assert_array_equal(np.asarray(tr.next_obs)[:-1][cont], np.asarray(tr.obs)[1:][cont])
    # Where it ended, the next observation is a fresh reset, and the recorded length is the episode's length.
    assert np.all(np.abs(np.asarray(tr.obs)[1:][done[:-1]]) <= 0.05)
    stats = completed_episode_stats(tr)
    assert float(stats["episodes"]) == done.sum()
    first_end = np.argmax(done[:, 0])
    assert int(tr.info["episode_length"][first_end, 0]) == first_end + 1


def test_the_same_driver_runs_the_jax_env_through_its_gymnasium_adapter():
    """Round trip: JAX env -> gymnasium adapter -> host driver; the dynamics seen are CartPole's."""
    driver = GymnasiumDriver([GymnasiumEnv(CartPole()) for _ in range(2)], seed=1)
    tr = driver.rollout(_policy, jnp.array([0.0, 0.0, 1.0, 0.0]), jax.random.key(0), 30)
    env = CartPole()
    obs = np.asarray(tr.obs).reshape(-1, 4)
    state = CartPoleState(*(jnp.asarray(obs[:, i]) for i in range(4)), jnp.zeros(len(obs), jnp.int32))
    expected, *_ = jax.vmap(env.step, in_axes=(None, 0, 0, None))(
        jax.random.key(0), state, jnp.asarray(tr.action).reshape(-1), PARAMS)
    np.testing.assert_allclose(np.asarray(tr.next_obs).reshape(-1, 4), np.asarray(expected), atol=1e-6)
