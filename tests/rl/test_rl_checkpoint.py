"""rl.checkpoint: any pytree (typed PRNG keys, NamedTuples, struct dataclasses) round-trips bit for bit with its
record; a checkpoint of another run or another state shape is refused with the first difference named; interrupted
saves are never restored."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from rl.checkpoint import CheckpointMismatchError, PytreeCheckpointer


class Inner(NamedTuple):
    obs: jax.Array
    done: jax.Array


@struct.dataclass
class State:
    params: dict
    inner: Inner
    key: jax.Array
    step: jax.Array


def _state(seed: int, width: int = 3) -> State:
    key = jax.random.key(seed)
    return State({"w": jax.random.normal(key, (width, 2)), "b": jnp.arange(2, dtype=jnp.int32)},
                 Inner(jax.random.uniform(jax.random.fold_in(key, 1), (4,)), jnp.array([True, False])),
                 jax.random.split(jax.random.fold_in(key, 2), 3), jnp.asarray(seed, jnp.int32))


def _same(x: State, y: State) -> bool:
    lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
    raw = lambda v: np.asarray(jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v)  # noqa: E731
    return len(lx) == len(ly) and all(raw(a).dtype == raw(b).dtype and raw(a).tobytes() == raw(b).tobytes()
                                      for a, b in zip(lx, ly))


def test_round_trip_keeps_every_leaf_the_keys_and_the_record(tmp_path):
    saved = _state(7)
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1}, keep_last=2) as ckpt:
        assert ckpt.restore_latest(_state(0)) is None
        ckpt.save(1, _state(1), [{"loss": 1.0}])
        ckpt.save(2, saved, [{"loss": 1.0}, {"loss": None}])
        ckpt.save(3, saved, [])
        assert ckpt.latest_step() == 3
    (tmp_path / "4.orbax-checkpoint-tmp").mkdir()  # what a save killed half-way leaves behind
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1}, keep_last=2) as ckpt:
        step, restored, record = ckpt.restore_latest(_state(0))
    assert step == 3 and record == [] and sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
    assert _same(restored, saved) and not _same(restored, _state(0))
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(saved.key)
    # The restored key draws what the saved one draws.
    assert np.array_equal(jax.random.uniform(restored.key[1], (3,)), jax.random.uniform(saved.key[1], (3,)))


def test_other_run_or_other_state_is_refused_naming_the_difference(tmp_path):
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1, "net": {"width": 3}}) as ckpt:
        ckpt.save(5, _state(5), None)
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1, "net": {"width": 4}}) as ckpt:
        with pytest.raises(CheckpointMismatchError, match=r"metadata net/width is 3, expected 4"):
            ckpt.restore_latest(_state(0))
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1, "net": {"width": 3}}) as ckpt:
        with pytest.raises(CheckpointMismatchError, match=r"\.params\['w'\] \[3, 2\] float32 vs .* \[4, 2\] float32"):
            ckpt.restore_latest(_state(0, width=4))
