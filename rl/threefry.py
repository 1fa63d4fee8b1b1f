"""Threefry-2x32 random bits and uniforms equal bit for bit to `jax.random.bits` / `jax.random.uniform`, lowered so
that XLA:CPU fuses the whole hash into the kernel that uses it.

JAX lowers its Threefry primitive on CPU as a rolled loop (five iterations of four rounds, to keep compile times
short), and that while loop, with its copies of the state between iterations, is its own sequence of kernels inside
whatever scan calls it. For an environment that draws a few numbers per step (the lot-sizing demand: one uniform
per item), the loop costs as much as the rest of the step. Here the 20 rounds are written out in `jnp` (Salmon et
al. 2011, "Parallel random numbers: as easy as 1, 2, 3", Threefry-2x32 with 20 rounds; the same rotation constants,
key schedule and counter layout as JAX's partitionable Threefry), so the hash is plain elementwise arithmetic XLA
fuses with its consumers, and the numbers are exactly the ones `jax.random` would draw from the same key.

Keys of another implementation, or a process with `jax_threefry_partitionable` off (another counter layout), fall
back to `jax.random` itself, so the functions are always equal to it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # the key schedule's parity constant (Threefish's C240, Salmon et al. 2011)


def _rotate_left(x: jax.Array, d: int) -> jax.Array:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key1: jax.Array, key2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block function with 20 rounds on counters (x1, x2) under key (key1, key2), all uint32,
    unrolled: five groups of four rounds, a key injection after each."""
    ks = (key1, key2, key1 ^ key2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, r) ^ x1
        x1 = x1 + ks[(group + 1) % 3]
        x2 = x2 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x1, x2


def _native(key: jax.Array) -> bool:
    """Whether this module reproduces `jax.random` for `key`: a typed Threefry-2x32 key, partitionable layout."""
    return (jax.config.jax_threefry_partitionable and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            and str(jax.random.key_impl(key)) == "threefry2x32")


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 `shape`: `jax.random.bits(key, shape)` for one typed key (vmap it for a batch of keys)."""
    shape = tuple(int(d) for d in shape)
    if not _native(key) or key.shape:
        return jax.random.bits(key, shape)
    size = math.prod(shape)
    if size >= 2 ** 32:  # JAX's counters then carry into the high word; not needed by any caller here
        return jax.random.bits(key, shape)
    data = jax.random.key_data(key)
    counters = jax.lax.iota(np.uint32, size).reshape(shape)
    bits1, bits2 = threefry2x32(data[0], data[1], jnp.zeros(shape, np.uint32), counters)
    return bits1 ^ bits2


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 `shape` in [0, 1): `jax.random.uniform(key, shape)` (its mantissa construction: the top 23 bits as
    the fraction of a float in [1, 2), minus one)."""
    if not _native(key) or key.shape:
        return jax.random.uniform(key, shape)
    bits = random_bits(key, shape)
    floats = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
    return jnp.maximum(0.0, floats)
