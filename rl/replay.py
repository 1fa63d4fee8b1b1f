"""A uniform experience-replay buffer as a pytree (Lin 1992; Mnih et al. 2015), usable inside jit and lax.scan.

The buffer is a `ReplayBuffer` value: `storage` (the item pytree with a leading `capacity` axis), the next write
position and the number of valid items. `add` writes a batch of items circularly (the oldest are overwritten once
the buffer is full) and returns a new buffer; `sample` draws indices uniformly from the valid items, with
replacement. Nothing mutates: under jit the update is done in place by XLA when the old buffer is not used again.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ReplayBuffer:
    storage: Any
    position: jax.Array  # next index to write
    size: jax.Array  # number of valid items, at most capacity

    @property
    def capacity(self) -> int:
        return jax.tree_util.tree_leaves(self.storage)[0].shape[0]


def init(example_item: Any, capacity: int) -> ReplayBuffer:
    """An empty buffer for items shaped like `example_item` (one item, no batch axis)."""
    if capacity <= 0:
        raise ValueError(f"replay capacity must be positive, got {capacity!r}")
    storage = jax.tree_util.tree_map(
        lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype), example_item)
    return ReplayBuffer(storage, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def add(buffer: ReplayBuffer, items: Any) -> ReplayBuffer:
    """Write a batch of B items (leading axis B <= capacity) at positions position, ..., position + B - 1 mod
    capacity."""
    capacity = buffer.capacity
    batch = jax.tree_util.tree_leaves(items)[0].shape[0]
    if batch > capacity:
        raise ValueError(f"cannot add {batch} items at once to a replay buffer of capacity {capacity}")
    indices = (buffer.position + jnp.arange(batch)) % capacity
    storage = jax.tree_util.tree_map(lambda store, x: store.at[indices].set(x), buffer.storage, items)
    return ReplayBuffer(storage, (buffer.position + batch) % capacity, jnp.minimum(buffer.size + batch, capacity))


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Any:
    """`batch_size` items drawn uniformly with replacement from the valid ones (the buffer must not be empty)."""
    indices = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree_util.tree_map(lambda store: store[indices], buffer.storage)
