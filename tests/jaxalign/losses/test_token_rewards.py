"""Dense implicit rewards and credit assignment (jaxalign.losses.token_rewards, "From r to Q*") on hand-built cases."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses.token_rewards import (
    credit_assignment,
    dense_implicit_rewards,
    dense_reward_sum_gap,
    sequence_implicit_reward,
)

# Three sequences, width 6. Row 0: completion at positions 2..4, the policy dislikes position 3 (the "bad" token).
# Row 1: one-token completion at position 5. Row 2: no completion at all (prompt only).
POLICY = np.array([
    [0.0, -1.0, -0.5, -4.0, -0.2, -9.0],
    [0.0, -2.0, -2.0, -2.0, -2.0, -0.1],
    [0.0, -1.0, -1.0, -1.0, -1.0, -1.0],
])  # fmt: skip
REFERENCE = np.array([
    [0.0, -3.0, -1.0, -1.0, -0.7, -1.0],
    [0.0, -1.0, -1.0, -1.0, -1.0, -0.6],
    [0.0, -2.0, -2.0, -2.0, -2.0, -2.0],
])  # fmt: skip
MASK = np.array([
    [0, 0, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0],
], np.float32)  # fmt: skip


def arrays():
    return jnp.asarray(POLICY, jnp.float32), jnp.asarray(REFERENCE, jnp.float32), jnp.asarray(MASK)


def test_dense_rewards_by_hand():
    rewards = np.asarray(dense_implicit_rewards(*arrays(), beta=0.5))
    expected = np.array([
        [0, 0, 0.5 * 0.5, 0.5 * -3.0, 0.5 * 0.5, 0],
        [0, 0, 0, 0, 0, 0.5 * 0.5],
        [0, 0, 0, 0, 0, 0],
    ])  # fmt: skip
    np.testing.assert_allclose(rewards, expected, atol=1e-7)
    assert np.all(rewards[MASK == 0] == 0)  # exactly zero outside the completion, even where log-probs differ


def test_dense_rewards_sum_to_the_sequence_reward():
    rewards = dense_implicit_rewards(*arrays(), beta=0.5)
    np.testing.assert_allclose(np.asarray(jnp.sum(rewards, -1)), [0.5 * -2.0, 0.5 * 0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(sequence_implicit_reward(*arrays(), beta=0.5)), [-1.0, 0.25, 0.0], atol=1e-7)
    assert float(jnp.max(dense_reward_sum_gap(*arrays(), beta=0.5))) < 1e-6


def test_sum_identity_on_random_sequences():
    rng = np.random.default_rng(0)
    policy, reference = -rng.uniform(0, 5, (2, 4, 9)).astype(np.float32)
    mask = (rng.uniform(size=(4, 9)) < 0.6).astype(np.float32)
    gap = dense_reward_sum_gap(jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(mask), beta=0.1)
    assert float(jnp.max(gap)) < 1e-5
    np.testing.assert_allclose(
        np.asarray(sequence_implicit_reward(jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(mask), 0.1)),
        0.1 * ((policy - reference) * mask).sum(1), rtol=1e-5)


def test_credit_assignment_blames_the_lowest_reward_token():
    index, value = credit_assignment(*arrays(), beta=0.5)
    # row 0: position 3 (rhat -1.5), not position 5 (lower log-ratio, but outside the completion);
    # row 1: its only token; row 2: no completion -> -1.
    np.testing.assert_array_equal(np.asarray(index), [3, 5, -1])
    np.testing.assert_allclose(np.asarray(value), [-1.5, 0.25, 0.0], atol=1e-7)


def test_credit_assignment_ties_go_to_the_first_token_and_it_jits():
    policy = jnp.array([[0.0, -2.0, -2.0, -1.0]])
    reference = jnp.array([[0.0, -1.0, -1.0, -1.0]])
    mask = jnp.array([[0, 1, 1, 1]])
    index, value = jax.jit(credit_assignment)(policy, reference, mask, 1.0)
    assert int(index[0]) == 1 and float(value[0]) == -1.0
