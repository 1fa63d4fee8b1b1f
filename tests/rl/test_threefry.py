"""`rl.threefry` draws exactly the numbers `jax.random` draws from the same key, for any shape and under vmap, and
compiles without the loop JAX's own CPU lowering of Threefry has; keys it cannot reproduce go to `jax.random`."""
import jax
import numpy as np
import pytest

from rl import threefry

SHAPES = [(), (1,), (7,), (20,), (3, 5), (2, 3, 4), (0,)]


@pytest.mark.parametrize("shape", SHAPES)
def test_bits_and_uniforms_equal_jax_random_bit_for_bit(shape):
    for seed in (0, 1, 2 ** 31 + 5):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(threefry.random_bits(key, shape), jax.random.bits(key, shape))
        np.testing.assert_array_equal(threefry.uniform(key, shape), jax.random.uniform(key, shape))


def test_vmapped_over_split_keys_inside_jit():
    keys = jax.random.split(jax.random.key(9), 64)
    ours = jax.jit(jax.vmap(lambda k: threefry.uniform(k, (20,))))(keys)
    np.testing.assert_array_equal(ours, jax.vmap(lambda k: jax.random.uniform(k, (20,)))(keys))
    assert float(ours.min()) >= 0.0 and float(ours.max()) < 1.0


def test_the_block_function_matches_the_random123_known_answers():
    """Known-answer vectors of Threefry-2x32 with 20 rounds from the Random123 distribution (kat_vectors)."""
    u32 = lambda *xs: [np.uint32(x) for x in xs]  # noqa: E731
    cases = [(u32(0, 0), u32(0, 0), u32(0x6B200159, 0x99BA4EFE)),
             (u32(0xFFFFFFFF, 0xFFFFFFFF), u32(0xFFFFFFFF, 0xFFFFFFFF), u32(0x1CB996FC, 0xBB002BE7)),
             (u32(0x13198A2E, 0x03707344), u32(0x243F6A88, 0x85A308D3), u32(0xC4923A9C, 0x483DF7A0))]
    for key, counter, expected in cases:
        got = threefry.threefry2x32(*[np.asarray(k) for k in key], *[np.asarray(c) for c in counter])
        assert [int(x) for x in got] == [int(x) for x in expected]


def test_it_compiles_to_straight_line_code_where_jax_random_loops():
    key = jax.random.key(0)
    ours = jax.jit(lambda k: threefry.uniform(k, (20,))).lower(key).compile().as_text()
    theirs = jax.jit(lambda k: jax.random.uniform(k, (20,))).lower(key).compile().as_text()
    assert " while(" not in ours and " while(" in theirs


def test_other_key_implementations_fall_back_to_jax_random():
    key = jax.random.key(4, impl="rbg")
    np.testing.assert_array_equal(threefry.uniform(key, (6,)), jax.random.uniform(key, (6,)))
    raw = jax.random.PRNGKey(4)  # a legacy uint32 key
    np.testing.assert_array_equal(threefry.random_bits(raw, (5,)), jax.random.bits(raw, (5,)))
