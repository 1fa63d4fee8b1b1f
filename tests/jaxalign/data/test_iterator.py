"""Tests for jaxalign.data.iterator: a pure, resumable, per-process-sliceable batch function."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.iterator import ArrayDataset, batch_at, dropped_per_epoch, epoch_permutation
from jaxalign.data.position import DataPosition

N = 10


def make_dataset(n: int = N) -> ArrayDataset:
    """Example i has id i, plus a second array derived from it (to check rows stay aligned across arrays)."""
    ids = np.arange(n, dtype=np.int32)
    return ArrayDataset({"id": ids, "tokens": np.stack([ids * 100 + j for j in range(3)], axis=1)})


def run(dataset, batch_size, steps, seed=0, position=None, process_index=0, process_count=1):
    """The first `steps` batches from `position` (default: the start), and the position after them."""
    position = DataPosition.start() if position is None else position
    batches = []
    for _ in range(steps):
        batch, position = batch_at(dataset, position, batch_size, seed, process_index, process_count)
        batches.append(batch)
    return batches, position


def test_batch_at_is_a_pure_function_of_dataset_seed_and_position():
    """The same (dataset, position, batch size, seed) gives the same batch and next position, call after call."""
    data = make_dataset()
    position = DataPosition(epoch=np.int32(3), offset=np.int32(4))
    b1, p1 = batch_at(data, position, 3, seed=7)
    b2, p2 = batch_at(data, position, 3, seed=7)
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k])
    assert (int(p1.epoch), int(p1.offset)) == (int(p2.epoch), int(p2.offset)) == (3, 7)


def test_seed_changes_the_order():
    """Different seeds give different example orders."""
    data = make_dataset(64)
    a, _ = batch_at(data, DataPosition.start(), 16, seed=0)
    b, _ = batch_at(data, DataPosition.start(), 16, seed=1)
    assert not np.array_equal(a["id"], b["id"])


def test_rows_of_all_arrays_stay_aligned():
    """Every named array of a batch is indexed with the same rows."""
    batches, _ = run(make_dataset(), 4, steps=5)
    for batch in batches:
        np.testing.assert_array_equal(batch["tokens"][:, 0], batch["id"] * 100)
        np.testing.assert_array_equal(batch["tokens"][:, 2], batch["id"] * 100 + 2)


@pytest.mark.parametrize("n, batch_size", [(10, 3), (10, 5), (10, 10), (7, 2), (64, 16)])
def test_each_epoch_covers_each_example_at_most_once_dropping_only_the_remainder(n, batch_size):
    """Per epoch: n // B full batches, no example twice, and exactly `dropped_per_epoch` examples left out."""
    per_epoch = n // batch_size
    batches, _ = run(make_dataset(n), batch_size, steps=3 * per_epoch)
    assert dropped_per_epoch(n, batch_size) == n % batch_size
    for epoch in range(3):
        ids = np.concatenate([b["id"] for b in batches[epoch * per_epoch : (epoch + 1) * per_epoch]])
        assert len(ids) == per_epoch * batch_size
        assert len(np.unique(ids)) == len(ids), f"epoch {epoch} repeats an example"
        assert n - len(ids) == dropped_per_epoch(n, batch_size)
        # The used examples are a prefix of that epoch's permutation; the dropped ones are its tail.
        np.testing.assert_array_equal(ids, epoch_permutation(n, 0, epoch)[: len(ids)])


def test_epoch_boundary_moves_to_the_next_epoch_at_offset_zero():
    """When the rest of an epoch cannot fill a batch, the next batch is the first of the next epoch."""
    data = make_dataset()
    _, position = run(data, 3, steps=3)  # 9 of 10 examples used
    assert (int(position.epoch), int(position.offset)) == (0, 9)
    batch, position = batch_at(data, position, 3, seed=0)
    assert (int(position.epoch), int(position.offset)) == (1, 3)
    np.testing.assert_array_equal(batch["id"], epoch_permutation(N, 0, 1)[:3])


def test_different_epochs_use_different_permutations():
    """Each epoch reshuffles, so the dropped remainder is not always the same examples."""
    n, batch_size = 64, 10
    per_epoch = n // batch_size
    batches, _ = run(make_dataset(n), batch_size, steps=4 * per_epoch)
    orders = [np.concatenate([b["id"] for b in batches[e * per_epoch : (e + 1) * per_epoch]]) for e in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(orders[i], orders[j]), f"epochs {i} and {j} have the same order"
    dropped = [set(range(n)) - set(o.tolist()) for o in orders]
    assert len({frozenset(d) for d in dropped}) > 1, "the same examples are dropped every epoch"


@pytest.mark.parametrize("stop", [1, 2, 3, 4, 7])
def test_resuming_from_a_saved_position_continues_with_the_next_batch(stop):
    """A run restarted from the position saved after `stop` batches yields exactly the uninterrupted batches."""
    data = make_dataset()
    uninterrupted, _ = run(data, 3, steps=10, seed=5)
    _, saved = run(data, 3, steps=stop, seed=5)
    # The position as a checkpoint restores it: device scalars inside the TrainState, not NumPy ints.
    restored = DataPosition(epoch=jnp.asarray(int(saved.epoch), jnp.int32),
                            offset=jnp.asarray(int(saved.offset), jnp.int32))
    resumed, _ = run(data, 3, steps=10 - stop, seed=5, position=restored)
    for expected, got in zip(uninterrupted[stop:], resumed):
        for k in expected:
            np.testing.assert_array_equal(expected[k], got[k])


def test_next_position_is_int32_scalars():
    """The returned position has the dtypes of `DataPosition.start()` (it is stored in the jitted TrainState)."""
    _, position = batch_at(make_dataset(), DataPosition.start(), 3, seed=0)
    for leaf in (position.epoch, position.offset):
        assert np.shape(leaf) == () and np.asarray(leaf).dtype == np.int32


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_are_disjoint_and_concatenate_to_the_global_batch(process_count):
    """Process i gets rows [i*B/P, (i+1)*B/P) of the global batch; all processes agree on the next position."""
    data = make_dataset(64)
    batch_size = 16
    position = DataPosition.start()
    for _ in range(6):  # crosses an epoch boundary (64 // 16 = 4 batches per epoch)
        global_batch, expected_next = batch_at(data, position, batch_size, seed=3)
        slices = [batch_at(data, position, batch_size, 3, i, process_count) for i in range(process_count)]
        ids = [s["id"] for s, _ in slices]
        assert all(len(x) == batch_size // process_count for x in ids)
        for i in range(process_count):
            for j in range(i + 1, process_count):
                assert not set(ids[i].tolist()) & set(ids[j].tolist()), f"processes {i} and {j} overlap"
        for k in global_batch:
            np.testing.assert_array_equal(np.concatenate([s[k] for s, _ in slices]), global_batch[k])
        for _, nxt in slices:
            assert (int(nxt.epoch), int(nxt.offset)) == (int(expected_next.epoch), int(expected_next.offset))
        position = expected_next


def test_batch_larger_than_dataset_is_an_error():
    """A batch that can never be filled is rejected with the sizes in the message."""
    with pytest.raises(ValueError, match=r"batch size 11 is larger than the dataset \(10 examples\)"):
        batch_at(make_dataset(), DataPosition.start(), 11, seed=0)


def test_batch_not_divisible_by_processes_is_an_error():
    """Each process must get the same number of rows."""
    with pytest.raises(ValueError, match="batch size 5 is not divisible by the 2 processes"):
        batch_at(make_dataset(), DataPosition.start(), 5, 0, 0, 2)


def test_dataset_arrays_must_share_their_length():
    """ArrayDataset rejects arrays with different numbers of examples, naming the sizes."""
    with pytest.raises(ValueError, match="share their first dimension"):
        ArrayDataset({"a": np.zeros(3), "b": np.zeros(4)})
    assert len(make_dataset(7)) == 7
