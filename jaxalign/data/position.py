"""Where a deterministic data iterator stands: the one piece of data state a training run carries.

The position belongs to the data layer: `iterator.batch_at` and `pipeline.BucketedDataset.batch_at` take one and
return the next, and the `TrainState` stores it (so a checkpoint records exactly where the data stood) without the
data code ever importing the training code.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class DataPosition:
    """Where the deterministic data iterator stands: the epoch and the next example's offset in that epoch."""

    epoch: jax.Array
    offset: jax.Array

    @classmethod
    def start(cls) -> "DataPosition":
        return cls(epoch=jnp.zeros((), jnp.int32), offset=jnp.zeros((), jnp.int32))
