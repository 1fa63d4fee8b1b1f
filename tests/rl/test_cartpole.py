"""The JAX CartPole against gymnasium's CartPole-v1 on the same states, and its spaces, resets and time limit."""
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from rl.envs import CartPole
from rl.envs.cartpole import CartPoleState

ENV = CartPole()
PARAMS = ENV.default_params


def _random_states(rng, n):
    """States across the whole region where an episode is alive, and some just beyond the thresholds."""
    scale = np.array([2.6, 3.0, 0.23, 3.5])
    return rng.uniform(-scale, scale, size=(n, 4))


def test_step_matches_gymnasium_cartpole_v1_on_the_same_states():
    """Next observation to 1e-5 and the terminated flag, for 300 random (state, action) pairs."""
    rng = np.random.default_rng(0)
    states = _random_states(rng, 300)
    actions = rng.integers(0, 2, size=300)
    gym_env = gymnasium.make("CartPole-v1").unwrapped
    gym_env.reset(seed=0)
    expected_obs, expected_term = [], []
    for s, a in zip(states, actions):
        gym_env.state = s.copy()
        gym_env.steps_beyond_terminated = None
        obs, reward, terminated, truncated, _ = gym_env.step(int(a))
        assert reward == 1.0 and not truncated
        expected_obs.append(obs)
        expected_term.append(terminated)
    state = CartPoleState(*(jnp.asarray(states[:, i], jnp.float32) for i in range(4)), jnp.zeros(300, jnp.int32))
    step = jax.jit(jax.vmap(ENV.step, in_axes=(None, 0, 0, None)))
    obs, new_state, reward, done, info = step(jax.random.key(0), state, jnp.asarray(actions), PARAMS)
    np.testing.assert_allclose(np.asarray(obs), np.stack(expected_obs), atol=1e-5, rtol=0)
    # float32 vs float64 may disagree only for a state within rounding of a threshold: none of these is.
    np.testing.assert_array_equal(np.asarray(info["terminated"]), np.array(expected_term))
    assert 0 < np.sum(expected_term) < 300  # both outcomes are exercised
    np.testing.assert_array_equal(np.asarray(done), np.array(expected_term))
    assert np.all(np.asarray(reward) == 1.0) and not np.any(np.asarray(info["truncated"]))


def test_reset_is_uniform_in_a_small_box_and_the_time_limit_truncates_at_500():
    obs, state = jax.vmap(ENV.reset, in_axes=(0, None))(jax.random.split(jax.random.key(1), 512), PARAMS)
    obs = np.asarray(obs)
    assert obs.dtype == np.float32 and obs.shape == (512, 4)
    assert np.all(np.abs(obs) <= 0.05) and np.all(obs.std(axis=0) > 0.02)
    # The time limit: v1's 500 steps; with a limit of 20, alternating pushes from rest truncate on the 20th step.
    assert PARAMS.max_steps == 500
    params = PARAMS.replace(max_steps=20)
    state = CartPoleState(*(jnp.zeros(()) for _ in range(4)), jnp.zeros((), jnp.int32))
    step = jax.jit(ENV.step)
    for t in range(20):
        _, state, _, done, info = step(jax.random.key(0), state, jnp.asarray(t % 2), params)
        assert bool(done) == (t == 19), t
    assert bool(info["truncated"]) and not bool(info["terminated"]) and int(state.time) == 20


def test_spaces_describe_the_observations_and_actions():
    obs_space, action_space = ENV.observation_space(PARAMS), ENV.action_space(PARAMS)
    assert obs_space.shape == (4,) and action_space.n == 2
    gym_obs, gym_actions = obs_space.to_gymnasium(), action_space.to_gymnasium()
    reference = gymnasium.make("CartPole-v1")
    np.testing.assert_allclose(gym_obs.low, reference.observation_space.low)
    np.testing.assert_allclose(gym_obs.high, reference.observation_space.high)
    assert gym_obs.dtype == reference.observation_space.dtype and gym_actions == reference.action_space
    keys = jax.random.split(jax.random.key(2), 64)
    assert all(bool(action_space.contains(action_space.sample(k))) for k in keys[:8])
    samples = jax.vmap(obs_space.sample)(keys)
    assert bool(jnp.all(jax.vmap(obs_space.contains)(samples)))
    assert not bool(obs_space.contains(jnp.array([5.0, 0.0, 0.0, 0.0])))
