"""GAE and Monte-Carlo returns against plain Python loops in float64, with terminations and truncations."""
import jax
import numpy as np
import pytest

from rl.returns import generalized_advantage_estimation, monte_carlo_returns, shifted_next_values

T, N = 40, 5


@pytest.fixture(autouse=True)
def float64():
    """Compute in float64 so the comparison with the loops is exact to rounding (scoped: other tests keep float32)."""
    with jax.enable_x64(True):
        yield


def _rollout(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    next_values = rng.normal(size=(T, N))  # V of the pre-reset next state
    terminated = rng.random((T, N)) < 0.1
    truncated = (rng.random((T, N)) < 0.1) & ~terminated
    return rewards, values, next_values, terminated, truncated


def _gae_loop(rewards, values, next_values, terminated, truncated, gamma, lam):
    adv = np.zeros((T, N))
    for n in range(N):
        following = 0.0
        for t in reversed(range(T)):
            bootstrap = 0.0 if terminated[t, n] else next_values[t, n]
            delta = rewards[t, n] + gamma * bootstrap - values[t, n]
            carry = 0.0 if (terminated[t, n] or truncated[t, n]) else following
            following = delta + gamma * lam * carry
            adv[t, n] = following
    return adv


def _mc_loop(rewards, next_values, terminated, truncated, gamma):
    """G_t summed forward to the end of each episode, bootstrapped at truncations and at the segment's end."""
    out = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, k = 0.0, t
            while True:
                total += gamma ** (k - t) * rewards[k, n]
                if terminated[k, n]:
                    break
                if truncated[k, n] or k == T - 1:
                    total += gamma ** (k - t + 1) * next_values[k, n]
                    break
                k += 1
            out[t, n] = total
    return out


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_a_python_loop(gamma, lam):
    rewards, values, next_values, terminated, truncated = _rollout(0)
    adv, targets = generalized_advantage_estimation(rewards, values, next_values, terminated, truncated, gamma, lam)
    expected = _gae_loop(rewards, values, next_values, terminated, truncated, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(targets), expected + values, rtol=1e-12, atol=1e-12)


def test_monte_carlo_returns_match_a_python_loop_and_gae_with_lambda_one():
    rewards, values, next_values, terminated, truncated = _rollout(1)
    # In a real rollout the state after a step that did not end the episode is the next step's state.
    continuing = ~(terminated | truncated)[:-1]
    next_values[:-1][continuing] = values[1:][continuing]
    returns = monte_carlo_returns(rewards, next_values, terminated, truncated, 0.97)
    np.testing.assert_allclose(np.asarray(returns), _mc_loop(rewards, next_values, terminated, truncated, 0.97),
                               rtol=1e-12, atol=1e-12)
    _, gae_targets = generalized_advantage_estimation(rewards, values, next_values, terminated, truncated, 0.97, 1.0)
    np.testing.assert_allclose(np.asarray(returns), np.asarray(gae_targets), rtol=1e-10, atol=1e-10)


def test_truncation_bootstraps_where_termination_does_not():
    """One step, reward 1, next value 10: a termination returns 1, a truncation 1 + gamma * 10."""
    r, v, nv = np.ones((1, 2)), np.zeros((1, 2)), np.full((1, 2), 10.0)
    term, trunc = np.array([[True, False]]), np.array([[False, True]])
    np.testing.assert_allclose(np.asarray(monte_carlo_returns(r, nv, term, trunc, 0.5)), [[1.0, 6.0]])
    adv, _ = generalized_advantage_estimation(r, v, nv, term, trunc, 0.5, 0.9)
    np.testing.assert_allclose(np.asarray(adv), [[1.0, 6.0]])


def test_shifted_next_values():
    values, last = np.arange(6.0).reshape(3, 2), np.array([7.0, 8.0])
    np.testing.assert_array_equal(np.asarray(shifted_next_values(values, last)), [[2, 3], [4, 5], [7, 8]])
