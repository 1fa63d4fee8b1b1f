"""Checkpointing of a `TrainState`: a thin wrapper around orbax's `CheckpointManager`.

Why a wrapper: orbax does the hard parts (atomic writes, sharded array I/O, pruning), but it restores silently
into whatever it is given and fails deep inside tensorstore when shapes disagree. Here every restore is first
checked against the current run (its metadata and the template's shapes/dtypes), so resuming the wrong run fails
with one readable `CheckpointMismatchError` instead.

Layout on disk (one orbax step directory per saved step)::

    <directory>/<step>/state/   params, opt_state, step, rng (as raw key data), data position (orbax PyTree)
    <directory>/<step>/meta/    JSON: the run's metadata (e.g. the model config) and the PRNG implementation

Atomicity: orbax writes a step into `<directory>/<step>.orbax-checkpoint-tmp` and renames it to `<step>` only
once every item is written (on file systems with atomic rename; on GCS it uses a commit file instead). A save
killed half-way therefore leaves only a temporary directory, which `latest_step`/`restore_latest` never see and
which is deleted when the next `Checkpointer` on that directory is opened. Saves are synchronous, so when
`save()` has returned the step directory has been renamed into place and a SIGKILL cannot lose it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxalign.train.state import TrainState

_STATE = "state"
_META = "meta"


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was written by a different run (metadata, parameter shapes or dtypes differ)."""


class UnreadableCheckpointError(ValueError):
    """The directory holds something that is not a readable checkpoint written by `Checkpointer`."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How often to checkpoint (`every_steps`) and how many of the newest checkpoints to keep (`keep_last`)."""

    every_steps: int
    keep_last: int

    def __post_init__(self) -> None:
        for name in ("every_steps", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"CheckpointConfig.{name} must be a positive int, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Conversions between a TrainState and the plain nested dict that orbax stores.


def _path_str(path: tuple) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


def _key_impl(rng: Any) -> str:
    """Name of the PRNG implementation of a (concrete or abstract) typed key; tracing works for both."""
    found: list[Any] = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), rng)
    return str(found[0])


def _is_typed_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _to_saveable(state: TrainState) -> dict:
    """Nested dict of arrays; orbax cannot store typed PRNG keys, so the key is stored as its raw uint32 data."""
    tree = flax.serialization.to_state_dict(state)
    if _is_typed_key(state.rng):
        tree["rng"] = jax.random.key_data(state.rng)
    return tree


def _default_sharding() -> jax.sharding.Sharding:
    # This process's first device: in a multi-process run jax.devices()[0] belongs to process 0.
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None) or _default_sharding()
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _abstract_target(template: TrainState) -> dict:
    """The restore target: the template's tree with each leaf as ShapeDtypeStruct carrying the template's sharding."""
    tree = flax.serialization.to_state_dict(template)
    rng = tree.pop("rng")
    tree = jax.tree_util.tree_map(_abstract_leaf, tree)
    if _is_typed_key(rng):
        data = jax.eval_shape(jax.random.key_data, rng)
        sharding = getattr(rng, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            # The key data has one trailing dim more than the key; a shorter PartitionSpec leaves it replicated.
            sharding = jax.sharding.NamedSharding(sharding.mesh, sharding.spec)
        elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
            sharding = getattr(jax.random.key_data(rng), "sharding", None) if isinstance(rng, jax.Array) else None
        tree["rng"] = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding or _default_sharding())
    else:
        tree["rng"] = _abstract_leaf(rng)
    return tree


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(p): (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves}


def json_normalise(metadata: Any) -> Any:
    """What the metadata reads back as after a JSON round trip (tuples become lists, keys become strings)."""
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {e}") from e


_ABSENT = object()


def first_json_difference(saved: Any, expected: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """First (path, saved, expected) where two JSON values differ, depth first in key order; None if equal."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        for key in sorted(set(saved) | set(expected)):
            sub = f"{path}/{key}" if path else str(key)
            found = first_json_difference(saved.get(key, _ABSENT), expected.get(key, _ABSENT), sub)
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(expected, list) and len(saved) == len(expected):
        for i, (s, e) in enumerate(zip(saved, expected)):
            found = first_json_difference(s, e, f"{path}/{i}" if path else str(i))
            if found:
                return found
        return None
    if type(saved) is type(expected) and saved == expected:
        return None
    if isinstance(saved, (int, float)) and isinstance(expected, (int, float)) and not isinstance(saved, bool) \
            and not isinstance(expected, bool) and saved == expected:
        return None
    return path or "<root>", saved, expected


def show_json_value(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)


# ----------------------------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores `TrainState`s under one directory, keeping the newest `config.keep_last` steps.

    `metadata` describes the run (JSON-serialisable, e.g. the model config as a dict). It is written with every
    checkpoint and must equal the saved one on restore: resuming with a different configuration is an error
    rather than a silent mix. Put only what must not change across a resume into it.
    Use as a context manager (or call `close()`) so orbax's background threads are shut down.
    """

    def __init__(self, directory: str | epath.PathLike, config: CheckpointConfig, metadata: dict) -> None:
        self.directory = epath.Path(directory).absolute()
        self.config = config
        self.metadata = json_normalise(metadata)
        if self.directory.exists() and not self.directory.is_dir():
            raise UnreadableCheckpointError(f"checkpoint directory {self.directory} exists but is not a directory")
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        # A fresh manager must know how to read each item; otherwise it only knows items it saved itself.
        registry.add(_STATE, ocp.args.StandardSave)
        registry.add(_STATE, ocp.args.StandardRestore)
        registry.add(_META, ocp.args.JsonSave)
        registry.add(_META, ocp.args.JsonRestore)
        options = ocp.CheckpointManagerOptions(
            create=True,
            # Synchronous: save() returns only after the step directory has been renamed into place.
            enable_async_checkpointing=False,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=config.keep_last),
            # Temporaries of saves killed half-way are never restored from; removing them frees the disk.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending work and release orbax's threads."""
        self._manager.close()

    def wait(self) -> None:
        """Block until every save has been finalized (saves are synchronous, so this only guards future changes)."""
        self._manager.wait_until_finished()

    # -- queries -----------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step; temporaries of interrupted saves are not counted."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- save --------------------------------------------------------------------------------------------------
    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Save `state` if its step is a multiple of `every_steps` (or `force`); returns whether it saved.

        A step that is not newer than the latest saved one is skipped (returns False): that checkpoint already
        exists, and orbax never overwrites.
        """
        step = int(jax.device_get(state.step))
        if not force and step % self.config.every_steps != 0:
            return False
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave(_to_saveable(state)),
                    _META: ocp.args.JsonSave({"run": self.metadata, "rng_impl": _rng_impl_or_none(state.rng)}),
                }
            ),
            force=True,  # The decision was made above; orbax's own policy would also skip non-interval steps.
        )
        self._manager.wait_until_finished()
        return bool(saved)

    # -- restore -----------------------------------------------------------------------------------------------
    def restore_latest(self, template: TrainState) -> TrainState | None:
        """Restore the newest checkpoint into `template`'s structure, shardings and dtypes; None if there is none.

        `template` may be concrete or abstract (e.g. from `jax.eval_shape`, with shardings set); its `tx` is kept.
        Raises CheckpointMismatchError if the checkpoint belongs to a different run, UnreadableCheckpointError if
        the step directory is not a readable checkpoint.
        """
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, template)

    def restore(self, step: int, template: TrainState) -> TrainState:
        """Restore a given step (see `restore_latest`)."""
        where = f"checkpoint {self.directory} step {step}"
        target = _abstract_target(template)
        saved_meta, saved_specs = self._read_step_metadata(step, where)

        diff = first_json_difference(saved_meta.get("run", _ABSENT), self.metadata)
        if diff is not None:
            path, saved, expected = diff
            raise CheckpointMismatchError(
                f"{where} was written for a different run: "
                f"metadata {path} is {show_json_value(saved)}, expected {show_json_value(expected)}"
            )
        expected_impl = _rng_impl_or_none(template.rng)
        if saved_meta.get("rng_impl") != expected_impl:
            raise CheckpointMismatchError(
                f"{where} was written for a different run: rng key implementation is "
                f"{saved_meta.get('rng_impl')!r}, expected {expected_impl!r}"
            )
        _check_specs(where, saved_specs, _leaf_specs(target))

        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}),
            )[_STATE]
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types; report them as one.
            raise UnreadableCheckpointError(f"{where} could not be read: {_brief(e)}") from e

        if expected_impl is not None:
            data = restored["rng"]
            key = jax.random.wrap_key_data(data, impl=expected_impl)
            sharding = getattr(template.rng, "sharding", None)
            if sharding is not None and key.sharding != sharding:
                key = jax.device_put(key, sharding)
            restored["rng"] = key
        return flax.serialization.from_state_dict(template, restored)

    def _read_step_metadata(self, step: int, where: str) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
        """The saved JSON metadata and {path: (shape, dtype)} of the saved arrays, read without loading arrays."""
        step_dir = self.directory / str(step)
        missing = [item for item in (_STATE, _META) if not (step_dir / item).is_dir()]
        if missing:
            raise UnreadableCheckpointError(
                f"{where} is not a readable checkpoint: {step_dir} lacks the item(s) {missing} "
                "(was it written by jaxalign's Checkpointer?)"
            )
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
            tree_meta = self._manager.item_metadata(step)[_STATE]
        except Exception as e:  # noqa: BLE001
            raise UnreadableCheckpointError(f"{where} could not be read: {_brief(e)}") from e
        if not isinstance(meta, dict) or tree_meta is None:
            raise UnreadableCheckpointError(f"{where} is not a readable checkpoint: its metadata is missing or invalid")
        tree = getattr(tree_meta, "tree", tree_meta)
        specs = {}
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
            if shape is None or dtype is None:
                raise UnreadableCheckpointError(f"{where} is not a readable checkpoint: {_path_str(p)} is not an array")
            specs[_path_str(p)] = (tuple(int(d) for d in shape), str(np.dtype(dtype)))
        return meta, specs


def _brief(e: Exception, limit: int = 300) -> str:
    """First part of an orbax/tensorstore error (they append kilobytes of spec); the full one stays chained."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _rng_impl_or_none(rng: Any) -> str | None:
    return _key_impl(rng) if _is_typed_key(rng) else None


def _check_specs(where: str, saved: dict, expected: dict) -> None:
    """Raise on the first leaf whose presence, shape or dtype differs; parameters are reported before optimizer
    state, because a changed parameter is the root cause of every matching optimizer-state difference."""
    order = sorted(expected, key=lambda p: (not p.startswith("params/"), p))
    for path in order:
        if path not in saved:
            exp_shape, exp_dtype = expected[path]
            raise CheckpointMismatchError(
                f"{where} was written for a different model: {path} is absent, expected shape {exp_shape} {exp_dtype}"
            )
        (s_shape, s_dtype), (e_shape, e_dtype) = saved[path], expected[path]
        if s_shape != e_shape:
            raise CheckpointMismatchError(
                f"{where} was written for a different model: {path} has shape {s_shape}, expected {e_shape}"
            )
        if s_dtype != e_dtype:
            raise CheckpointMismatchError(
                f"{where} was written for a different model: {path} has dtype {s_dtype}, expected {e_dtype}"
            )
    extra = sorted((p for p in saved if p not in expected), key=lambda p: (not p.startswith("params/"), p))
    if extra:
        s_shape, s_dtype = saved[extra[0]]
        raise CheckpointMismatchError(
            f"{where} was written for a different model: {extra[0]} (shape {s_shape} {s_dtype}) is in the checkpoint "
            "but absent from the expected state"
        )


__all__ = [
    "CheckpointConfig",
    "CheckpointMismatchError",
    "Checkpointer",
    "UnreadableCheckpointError",
]
