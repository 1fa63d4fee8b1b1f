"""Atomic, resumable checkpoints of an arbitrary pytree (an RL runner state) plus a JSON record, with orbax.

Why not `jaxalign.train.checkpoint.Checkpointer`: that one stores a `TrainState` (params, opt_state, step, rng,
data position) and names its leaves by the TrainState's fields. An RL run carries more than that between chunks:
environment states, observations, a replay buffer, target parameters, PRNG keys anywhere in the tree, and the host
metric history so far. This helper stores any pytree instead, with the same guarantees:

- atomic: orbax writes `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once complete, so a SIGKILL during a
  save leaves only a temporary that is never restored (and is deleted when the next `PytreeCheckpointer` opens);
  saves are synchronous, so once `save` returns the step survives a crash;
- checked: a restore first compares the saved run metadata (e.g. the config) and every leaf's tree path, shape and
  dtype with the current run, and raises one readable `CheckpointMismatchError` naming the first difference.

Layout: `<directory>/<step>/state/` holds the tree's leaves as a flat dict `leaf_<i>` (tree-flatten order; typed
PRNG keys as their raw uint32 key data), `<directory>/<step>/meta/` a JSON object with the run metadata, the leaf
paths, shapes, dtypes and key implementations, and the caller's `record` (e.g. the metric history).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxalign.train.checkpoint import CheckpointMismatchError, first_json_difference, json_normalise, show_json_value

_STATE = "state"
_META = "meta"


def _is_typed_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _leaf_name(i: int) -> str:
    return f"leaf_{i:05d}"


def describe_leaves(tree: Any) -> list[dict]:
    """One entry per leaf, in flatten order: its tree path, shape, dtype and (typed keys only) PRNG implementation.

    This is what must agree between the run that saved and the run that restores; it is stored as JSON so a
    mismatch is found (and named) before any array is read."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        entry = {"path": jax.tree_util.keystr(path), "shape": [int(d) for d in np.shape(leaf)]}
        if _is_typed_key(leaf):
            entry["dtype"] = "key"
            entry["key_impl"] = str(jax.random.key_impl(leaf))
        else:
            entry["dtype"] = str(np.dtype(leaf.dtype))
        out.append(entry)
    return out


def _to_saveable(tree: Any) -> dict[str, Any]:
    """The leaves as a flat dict orbax can store (it cannot store typed PRNG keys: those become their key data)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return {_leaf_name(i): jax.random.key_data(x) if _is_typed_key(x) else x for i, x in enumerate(leaves)}


def _restore_target(template: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays (shape, dtype, the template's sharding) for each saved leaf of `template`."""
    target = {}
    for i, x in enumerate(jax.tree_util.tree_leaves(template)):
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if _is_typed_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            target[_leaf_name(i)] = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        else:
            target[_leaf_name(i)] = jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return target


class PytreeCheckpointer:
    """Saves and restores (pytree, JSON record) pairs under one directory, keeping the newest `keep_last` steps.

    `metadata` (JSON-serialisable; e.g. the run's config) is stored with every step and must equal the saved one on
    restore. Use as a context manager (or call `close()`) so orbax's threads are shut down.
    """

    def __init__(self, directory: str, metadata: Any, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last!r}")
        self.directory = epath.Path(directory).absolute()
        self.metadata = json_normalise(metadata)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(_STATE, ocp.args.StandardSave)
        registry.add(_STATE, ocp.args.StandardRestore)
        registry.add(_META, ocp.args.JsonSave)
        registry.add(_META, ocp.args.JsonRestore)
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=False,  # save() returns only once the step directory is in place
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep_last),
            cleanup_tmp_directories=True,  # temporaries of saves killed half-way are never restored from
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def __enter__(self) -> "PytreeCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._manager.close()

    def latest_step(self) -> int | None:
        """The newest complete step; temporaries of interrupted saves are not counted."""
        return self._manager.latest_step()

    def save(self, step: int, tree: Any, record: Any = None) -> None:
        """Save `tree` and the JSON `record` as `step` (synchronously). A step already saved is an error: orbax
        never overwrites, and a resumed run never saves a step twice."""
        meta = {"run": self.metadata, "leaves": describe_leaves(tree), "record": json_normalise(record)}
        self._manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(_to_saveable(tree)),
                                                            _META: ocp.args.JsonSave(meta)}), force=True)
        self._manager.wait_until_finished()

    def restore_latest(self, template: Any) -> tuple[int, Any, Any] | None:
        """(step, tree shaped like `template`, record) of the newest step, or None when there is none.

        `template` is a concrete (or abstract) tree of the current run, e.g. the freshly initialised state; its
        structure and static fields are kept, its leaves replaced. Raises CheckpointMismatchError when the saved
        step belongs to a different run."""
        step = self.latest_step()
        if step is None:
            return None
        where = f"checkpoint {self.directory} step {step}"
        meta = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        difference = first_json_difference(meta.get("run"), self.metadata)
        if difference:
            path, saved, expected = difference
            raise CheckpointMismatchError(f"{where} was written for a different run: metadata {path} is "
                                          f"{show_json_value(saved)}, expected {show_json_value(expected)}")
        _check_leaves(where, meta["leaves"], describe_leaves(template))
        arrays = self._manager.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(_restore_target(template))}))[_STATE]
        leaves = []
        for i, (x, spec) in enumerate(zip(jax.tree_util.tree_leaves(template), meta["leaves"])):
            value = arrays[_leaf_name(i)]
            leaves.append(jax.random.wrap_key_data(value, impl=spec["key_impl"]) if _is_typed_key(x) else value)
        return step, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves), meta["record"]


def _check_leaves(where: str, saved: list[dict], expected: list[dict]) -> None:
    """Raise on the first leaf whose path, shape, dtype or key implementation differs, or on a different count."""
    for s, e in zip(saved, expected):
        if s != e:
            raise CheckpointMismatchError(f"{where} was written for a different state: leaf {s['path']} "
                                          f"{s['shape']} {s['dtype']} vs {e['path']} {e['shape']} {e['dtype']} now")
    if len(saved) != len(expected):
        raise CheckpointMismatchError(f"{where} was written for a different state: {len(saved)} leaves saved, "
                                      f"{len(expected)} now")


__all__ = ["CheckpointMismatchError", "PytreeCheckpointer", "describe_leaves"]
