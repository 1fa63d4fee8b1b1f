"""A deterministic, resumable batch iterator over in-memory arrays.

The iterator is a pure function of (dataset, seed, position): `batch_at` returns the batch at a `DataPosition`
and the position after it. The position lives in the `TrainState`, so a checkpoint records exactly where the data
stood and a resumed run continues with the very next batch. Each epoch uses its own permutation, derived from
(seed, epoch); the last incomplete batch of an epoch is not used in that epoch (the next epoch's permutation
differs), and `dropped_per_epoch` reports how many examples that is.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxalign.data.position import DataPosition


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Named arrays sharing their leading (example) dimension."""

    arrays: dict[str, np.ndarray]

    def __post_init__(self):
        sizes = {name: len(a) for name, a in self.arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"dataset arrays must share their first dimension, got sizes {sizes}")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def dropped_per_epoch(num_examples: int, batch_size: int) -> int:
    return num_examples % batch_size


def batch_at(
    dataset: ArrayDataset,
    position: DataPosition,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[dict[str, np.ndarray], DataPosition]:
    """The global batch at `position`, restricted to this process's contiguous slice, and the next position.

    Multi-process runs read only their shard: process i gets rows [i*B/P, (i+1)*B/P) of the global batch, which is
    the layout `jax.make_array_from_process_local_data` expects.
    A dataset that plans its own batches (`jaxalign.data.pipeline.BucketedDataset`: length buckets) is asked for
    them, so every loop written against this function trains on it unchanged.
    """
    if hasattr(dataset, "batch_at"):
        return dataset.batch_at(position, batch_size, seed, process_index, process_count)
    n = len(dataset)
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({n} examples)")
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes")
    epoch, offset = int(position.epoch), int(position.offset)
    if offset + batch_size > n:
        epoch, offset = epoch + 1, 0
    rows = epoch_permutation(n, seed, epoch)[offset : offset + batch_size]
    per_process = batch_size // process_count
    rows = rows[process_index * per_process : (process_index + 1) * per_process]
    batch = {name: a[rows] for name, a in dataset.arrays.items()}
    next_position = DataPosition(epoch=np.int32(epoch), offset=np.int32(offset + batch_size))
    return batch, next_position
