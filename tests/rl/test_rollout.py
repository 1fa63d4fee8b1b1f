"""Rollouts with lax.scan: layout, consistency with single steps, jit/vmap, and evaluation episodes."""
import jax
import jax.numpy as jnp
import numpy as np

from rl.envs import CartPole
from rl.envs.cartpole import CartPoleState
from rl.rollout import evaluate_episodes, reset_envs, rollout
from rl.wrappers import AutoReset, EpisodeStats

ENV = CartPole()
TRAIN_ENV = EpisodeStats(AutoReset(ENV))
PARAMS = ENV.default_params


def random_policy(params, obs, key):
    action = jax.random.randint(key, obs.shape[:1], 0, 2)
    return action, {"double": 2 * action}


def test_rollout_layout_and_transitions_follow_the_dynamics():
    obs, state = reset_envs(TRAIN_ENV, PARAMS, jax.random.key(0), 8)
    run = jax.jit(rollout, static_argnums=(0, 2, 7))
    (state, last_obs), tr = run(TRAIN_ENV, PARAMS, random_policy, None, state, obs, jax.random.key(1), 64)
    assert tr.obs.shape == (64, 8, 4) and tr.action.shape == (64, 8) and tr.reward.shape == (64, 8)
    np.testing.assert_array_equal(np.asarray(tr.extras["double"]), 2 * np.asarray(tr.action))
    np.testing.assert_array_equal(np.asarray(tr.obs[0]), np.asarray(obs))
    done = np.asarray(tr.done)
    assert done.any() and not np.asarray(tr.truncated).any()  # random episodes last ~22 steps, never 500
    # next_obs is what the dynamics give from obs (pre-reset); the next obs continues it unless the episode ended.
    flat = np.asarray(tr.obs).reshape(-1, 4)
    s = CartPoleState(*(jnp.asarray(flat[:, i]) for i in range(4)), jnp.zeros(len(flat), jnp.int32))
    expected, *_ = jax.vmap(ENV.step, in_axes=(None, 0, 0, None))(jax.random.key(0), s,
                                                                   tr.action.reshape(-1), PARAMS)
    np.testing.assert_allclose(np.asarray(tr.next_obs).reshape(-1, 4), np.asarray(expected), atol=1e-6)
    cont = ~done[:-1]
    np.testing.assert_array_equal(np.asarray(tr.next_obs)[:-1][cont], np.asarray(tr.obs)[1:][cont])
    assert np.all(np.abs(np.asarray(tr.obs)[1:][done[:-1]]) <= 0.05)  # reset observations
    # The carried observation continues the last step (or starts a fresh episode where it ended).
    np.testing.assert_array_equal(np.asarray(last_obs)[~done[-1]], np.asarray(tr.next_obs[-1])[~done[-1]])


def test_rollout_vmaps_over_seeds():
    def one(key):
        obs, state = reset_envs(TRAIN_ENV, PARAMS, key, 4)
        _, tr = rollout(TRAIN_ENV, PARAMS, random_policy, None, state, obs, key, 16)
        return tr.reward.sum(), tr.obs

    totals, obs = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), 3))
    assert obs.shape == (3, 16, 4, 4) and np.all(np.asarray(totals) == 64.0)
    assert not np.allclose(np.asarray(obs[0]), np.asarray(obs[1]))


def test_evaluate_episodes_counts_each_episode_once():
    always_right = lambda params, obs, key: (jnp.ones(obs.shape[0], jnp.int32), {})  # noqa: E731
    out = jax.jit(lambda k: evaluate_episodes(ENV, PARAMS, always_right, None, k, 16, 500))(jax.random.key(0))
    returns, lengths = np.asarray(out["return"]), np.asarray(out["length"])
    assert np.all(np.asarray(out["finished"])) and np.array_equal(returns, lengths.astype(np.float32))
    assert np.all((returns > 5) & (returns < 20))
    # With a limit of 5 steps nothing finishes and every return is 5.
    out = evaluate_episodes(ENV, PARAMS, always_right, None, jax.random.key(0), 4, 5)
    assert not np.any(np.asarray(out["finished"])) and np.all(np.asarray(out["return"]) == 5.0)
