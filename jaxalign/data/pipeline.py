"""Length-bucketed, deterministic, resumable batches of tokenized preference data.

Like `jaxalign.data.iterator.batch_at`, a batch is a pure function of (dataset, seed, position): the position
(`DataPosition`: epoch, and the number of examples of that epoch already used) lives in the `TrainState`, so the
checkpoint records exactly where the data stood and a resumed run continues with the very next batch, mid-epoch
or across an epoch boundary, without any iterator object to pickle.

Bucketing: rows are grouped by real length into buckets with the given upper bounds; each epoch takes every
bucket's rows in that epoch's permutation order, cuts them into full batches (a bucket's remainder waits for the
next epoch, whose permutation differs), shuffles the order of the batches, and cuts each batch's sequence arrays
to its bucket's width. Padding then follows the data instead of the longest row, and a jitted step compiles once
per bucket. Without bounds there is one bucket of the full width and the batches are exactly
`iterator.batch_at`'s, so the plain loop is the special case.

Multi-host: every process computes the same plan and takes its contiguous slice of each global batch (process i
gets rows [i*B/P, (i+1)*B/P)), the layout `jax.make_array_from_process_local_data` expects; all slices of a batch
share its width.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterator

import numpy as np

from jaxalign.data.iterator import epoch_permutation
from jaxalign.data.position import DataPosition
from jaxalign.data.tokenize import TokenizedData

# Arrays whose last axis is the time axis: cut to the bucket width. Everything else (labels, scores, rewards,
# list validity) is per row and kept whole.
SEQUENCE_SUFFIXES = ("tokens", "attention_mask", "completion_mask", "step_end_mask")


def bucket_bounds(boundaries: tuple[int, ...], width: int) -> tuple[int, ...]:
    """The effective upper bounds: the given ones below `width`, then `width` itself (so every row has a bucket)."""
    bounds = sorted(set(int(b) for b in boundaries))
    if bounds and bounds[0] < 1:
        raise ValueError(f"bucket boundaries must be positive, got {tuple(boundaries)}")
    return tuple(b for b in bounds if b < width) + (width,)


def bucket_of(lengths: np.ndarray, bounds: tuple[int, ...]) -> np.ndarray:
    """Index of each row's bucket: the first bound >= its length."""
    return np.searchsorted(np.asarray(bounds), np.asarray(lengths), side="left")


def epoch_plan(lengths: np.ndarray, bounds: tuple[int, ...], batch_size: int, seed: int,
               epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [num_batches, batch_size], widths [num_batches]) of one epoch; a pure function of its arguments."""
    perm = epoch_permutation(len(lengths), seed, epoch)
    buckets = bucket_of(lengths, bounds)[perm]
    rows, widths = [], []
    for b, bound in enumerate(bounds):
        members = perm[buckets == b]
        full = len(members) // batch_size
        rows.append(members[: full * batch_size].reshape(full, batch_size))
        widths.append(np.full(full, bound, np.int64))
    rows, widths = np.concatenate(rows), np.concatenate(widths)
    if len(bounds) > 1:  # One bucket keeps the permutation order: exactly iterator.batch_at's batches.
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(rows))
        rows, widths = rows[order], widths[order]
    return rows, widths


@dataclasses.dataclass(frozen=True)
class BucketedDataset:
    """Tokenized arrays padded to one width, each row's real length, and the bucket upper bounds.

    `jaxalign.data.iterator.batch_at` (and so `train_loop`) hands batching to `batch_at` below, so a
    BucketedDataset trains wherever an ArrayDataset does.
    """

    arrays: dict[str, np.ndarray]
    lengths: np.ndarray
    boundaries: tuple[int, ...] = ()

    def __post_init__(self):
        sizes = {name: len(a) for name, a in self.arrays.items()}
        if len(set(sizes.values()) | {len(self.lengths)}) != 1:
            raise ValueError(f"dataset arrays and lengths must share their first dimension, got sizes {sizes} and "
                             f"{len(self.lengths)} lengths")
        widths = {a.shape[-1] for name, a in self.arrays.items() if name.endswith(SEQUENCE_SUFFIXES)}
        if len(widths) != 1:
            raise ValueError(f"sequence arrays must share one padded width, got {sorted(widths)}")
        if int(np.max(self.lengths)) > self.width:
            raise ValueError(f"a row's length {int(np.max(self.lengths))} exceeds the padded width {self.width}")
        bucket_bounds(self.boundaries, self.width)  # validates

    @classmethod
    def from_tokenized(cls, data: TokenizedData, boundaries: tuple[int, ...] = ()) -> "BucketedDataset":
        return cls(dict(data.arrays), np.asarray(data.lengths), tuple(boundaries))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return next(a.shape[-1] for name, a in self.arrays.items() if name.endswith(SEQUENCE_SUFFIXES))

    @property
    def bounds(self) -> tuple[int, ...]:
        return bucket_bounds(self.boundaries, self.width)

    def epoch_stats(self, batch_size: int) -> dict:
        """Batches per epoch and examples left out of each epoch (every bucket's remainder); the same every epoch,
        because bucket sizes do not depend on the permutation. For the run's results."""
        counts = np.bincount(bucket_of(self.lengths, self.bounds), minlength=len(self.bounds))
        return {"batches_per_epoch": int(np.sum(counts // batch_size)),
                "examples_dropped_per_epoch": int(np.sum(counts % batch_size)),
                "bucket_bounds": list(self.bounds), "bucket_sizes": counts.tolist()}

    def batch_at(self, position: DataPosition, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> tuple[dict[str, np.ndarray], DataPosition]:
        """This process's slice of the global batch at `position`, cut to its bucket's width, and the next position."""
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        epoch, offset = int(position.epoch), int(position.offset)
        if offset % batch_size:
            raise ValueError(f"data position offset {offset} is not a multiple of the batch size {batch_size}: "
                             "the checkpoint was written with another batch size")
        rows, widths = epoch_plan(self.lengths, self.bounds, batch_size, seed, epoch)
        if len(rows) == 0:
            raise ValueError(f"no bucket holds a full batch of {batch_size} examples ({self.epoch_stats(batch_size)}"
                             "); use fewer bucket boundaries or a smaller batch")
        index = offset // batch_size
        if index >= len(rows):
            epoch, index = epoch + 1, 0
            rows, widths = epoch_plan(self.lengths, self.bounds, batch_size, seed, epoch)
        per_process = batch_size // process_count
        mine = rows[index, process_index * per_process : (process_index + 1) * per_process]
        width = int(widths[index])
        batch = {name: (a[mine][..., :width] if name.endswith(SEQUENCE_SUFFIXES) else a[mine])
                 for name, a in self.arrays.items()}
        return batch, DataPosition(epoch=np.int32(epoch), offset=np.int32((index + 1) * batch_size))


def batches(dataset: BucketedDataset, position: DataPosition, batch_size: int, seed: int, process_index: int = 0,
            process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], DataPosition]]:
    """(batch, position after it) forever from `position`; store the position in the TrainState with each step."""
    while True:
        batch, position = dataset.batch_at(position, batch_size, seed, process_index, process_count)
        yield batch, position


def fingerprint(dataset: BucketedDataset, batch_size: int, seed: int) -> str:
    """sha256 of everything that decides the batch sequence. Put it into the Checkpointer's metadata: resuming a
    data position against other data, buckets, batch size or seed is then a CheckpointMismatchError, not a silent
    jump to unrelated rows."""
    digest = hashlib.sha256(json.dumps({"bounds": list(dataset.bounds), "batch_size": batch_size, "seed": seed,
                                        "keys": sorted(dataset.arrays)}).encode())
    digest.update(np.ascontiguousarray(dataset.lengths).tobytes())
    for name in sorted(dataset.arrays):
        digest.update(np.ascontiguousarray(dataset.arrays[name]).tobytes())
    return digest.hexdigest()


def prepare_dataset(format: str, input_path: str, data_dir: str, tokenizer, tokenize_config, *,
                    on_error: str = "fail", boundaries: tuple[int, ...] = (), batch_size: int | None = None,
                    source_options=None) -> tuple[BucketedDataset, dict]:
    """File or `datasets` directory -> TFDS array_record build (validated; `source_options`, a
    `jaxalign.data.sources.SourceOptions`, picks the split and maps columns and shapes) -> tokens -> a
    BucketedDataset, and everything a run should put into its results about its data: the validation report (rows
    skipped and dropped per reason), the tokenization report (rows skipped or truncated) and, given `batch_size`,
    the bucket statistics."""
    from jaxalign.data import builders
    from jaxalign.data.tokenize import tokenize_records

    records, validation = builders.load_prepared(format, input_path, data_dir, on_error, source_options)
    tokenized = tokenize_records(format, records, tokenizer, tokenize_config, on_error=on_error, source=input_path)
    dataset = BucketedDataset.from_tokenized(tokenized, tuple(boundaries))
    results = {"format": format, "validation": validation, "tokenization": tokenized.report,
               "tokenizer_sha256": tokenizer.fingerprint, "examples": len(dataset)}
    if batch_size is not None:
        results["batching"] = dataset.epoch_stats(batch_size)
    return dataset, results


__all__ = ["SEQUENCE_SUFFIXES", "BucketedDataset", "batches", "bucket_bounds", "bucket_of", "epoch_plan",
           "fingerprint", "prepare_dataset"]
