"""Checkpoints of any pytree (an RL runner state, a `TrainState`) plus a JSON record: one thin wrapper around orbax.

Why a wrapper: orbax does the hard parts (atomic writes, sharded array I/O, pruning), but it restores silently
into whatever it is given and fails deep inside tensorstore when shapes disagree. Here every restore is first
checked against the current run (its metadata, the template's shapes, dtypes and PRNG key implementations), so
resuming the wrong run fails with one readable `CheckpointMismatchError` naming the first difference instead.

Two front ends share one implementation:

- `PytreeCheckpointer` stores any pytree of arrays (struct dataclasses, NamedTuples, dicts, lists; typed PRNG keys
  anywhere in it) under an explicit step, with an optional JSON `record` (e.g. an RL run's metric history). The
  run harness `rl.harness` checkpoints the whole runner state with it after every chunk of updates.
- `Checkpointer` stores a `TrainState` at `state.step`, every `CheckpointConfig.every_steps` steps.

Layout on disk (one orbax step directory per saved step)::

    <directory>/<step>/state/   the tree as Flax's state dict (`flax.serialization.to_state_dict`: field, key and
                                index names as nested dict keys), typed PRNG keys as their raw uint32 key data
    <directory>/<step>/meta/    JSON: {"run": the run's metadata, "key_impls": {path: PRNG implementation},
                                "record": the caller's record (absent when None)}

For a `TrainState` the state item is exactly what earlier versions wrote (params, opt_state, step, rng, data
position); their meta item named the one key implementation `"rng_impl"` and is still read.

Atomicity: orbax writes a step into `<directory>/<step>.orbax-checkpoint-tmp` and renames it to `<step>` only
once every item is written (on file systems with atomic rename; on GCS it uses a commit file instead). A save
killed half-way therefore leaves only a temporary directory, which `latest_step`/`restore_latest` never see and
which is deleted when the next checkpointer on that directory is opened. Saves are synchronous, so when `save()`
has returned the step directory has been renamed into place and a SIGKILL cannot lose it.

Object stores: the directory may be a `gs://...` URI (`jaxalign.paths.absolute_path` makes it an `epath.Path`, which
orbax takes as is). There orbax cannot rename a directory; it marks a finished step with a commit file of its own
instead, and TensorStore writes the arrays through its own Cloud Storage driver (not epath). Neither has run against
real Cloud Storage in this project's tests.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import sys
from typing import Any, Callable

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxalign.paths import absolute_path
from jaxalign.rundir import ABSENT, first_json_difference, json_normalise, sanitise_json, show_json_value
from jaxalign.train.state import TrainState
from jaxalign.validation import check_positive_int

_STATE = "state"
_META = "meta"


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was written by a different run (metadata, parameter shapes or dtypes differ)."""


class UnreadableCheckpointError(ValueError):
    """The directory holds something that is not a readable checkpoint written by this module."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How often to checkpoint (`every_steps`) and how many of the newest checkpoints to keep (`keep_last`)."""

    every_steps: int  # save every this many steps (and at the end of a phase)
    keep_last: int  # keep the newest this many checkpoints (selection keeps the best ones too)

    def __post_init__(self) -> None:
        for name in ("every_steps", "keep_last"):
            check_positive_int("checkpoint", name, getattr(self, name))


# ----------------------------------------------------------------------------------------------------------------
# Conversions between a pytree and the nested dict of plain arrays that orbax stores.


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


def _key_impl(key: Any) -> str:
    """Name of the PRNG implementation of a (concrete or abstract) typed key; tracing works for both."""
    found: list[Any] = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), key)
    return str(found[0])


def _is_typed_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _state_dict(tree: Any) -> Any:
    """Flax's state dict of `tree`: nested dicts down to the arrays. Anything else left in it is a node Flax cannot
    name (a custom pytree not registered with flax.serialization), which the restore could not rebuild."""
    state = flax.serialization.to_state_dict(tree)
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        named = list(itertools.takewhile(lambda k: isinstance(k, jax.tree_util.DictKey), path))
        if len(named) < len(path) or not hasattr(x, "dtype"):
            node = functools.reduce(lambda d, k: d[k.key], named, state)
            raise TypeError(
                f"cannot checkpoint {_path_str(tuple(named)) or 'the tree'} ({type(node).__name__}): every node must "
                "be a dict, list, tuple, NamedTuple or flax.struct dataclass (or registered with flax.serialization), "
                "every leaf an array")
    return state


def key_impls(tree: Any) -> dict[str, str]:
    """{state-dict path: PRNG implementation} of every typed key in `tree` (concrete or abstract)."""
    leaves = jax.tree_util.tree_flatten_with_path(_state_dict(tree))[0]
    return {_path_str(p): _key_impl(x) for p, x in leaves if _is_typed_key(x)}


def _to_saveable(tree: Any) -> Any:
    """The state dict with typed PRNG keys as their raw uint32 key data (orbax cannot store typed keys)."""
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, _state_dict(tree))


def _default_sharding() -> jax.sharding.Sharding:
    # This process's first device: in a multi-process run jax.devices()[0] belongs to process 0.
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    """The restore target of one leaf: its shape, dtype (key data for a typed key) and the template's sharding."""
    sharding = getattr(x, "sharding", None)
    if not _is_typed_key(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding or _default_sharding())
    data = jax.eval_shape(jax.random.key_data, x)
    if isinstance(sharding, jax.sharding.NamedSharding):
        # The key data has one trailing dim more than the key; a shorter PartitionSpec leaves it replicated.
        sharding = jax.sharding.NamedSharding(sharding.mesh, sharding.spec)
    elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        sharding = getattr(jax.random.key_data(x), "sharding", None) if isinstance(x, jax.Array) else None
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding or _default_sharding())


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(p): (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves}


def _saved_key_impls(meta: dict) -> dict[str, str]:
    """The key implementations a step's meta records; earlier TrainState checkpoints name only "rng_impl"."""
    if "key_impls" in meta:
        return meta["key_impls"]
    return {"rng": meta["rng_impl"]} if meta.get("rng_impl") is not None else {}


# ----------------------------------------------------------------------------------------------------------------


class PytreeCheckpointer:
    """Saves and restores (pytree, JSON record) pairs under one directory, keeping the newest `keep_last` steps.

    `metadata` describes the run (JSON-serialisable, e.g. its config as a dict). It is written with every step and
    must equal the saved one on restore: resuming with a different configuration is an error rather than a silent
    mix. Put only what must not change across a resume into it. `upgrade_saved` (optional) maps a saved metadata
    to today's form before the comparison, e.g. `jaxalign.rundir.with_added_defaults`: a config field added since
    the step was written, left at its default, is then no difference.
    Use as a context manager (or call `close()`) so orbax's background threads are shut down.
    """

    def __init__(self, directory: str | epath.PathLike, metadata: Any, keep_last: int = 2,
                 upgrade_saved: Callable[[Any], Any] | None = None) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, (int, np.integer)) or keep_last < 1:
            raise ValueError(f"keep_last must be a positive int, got {keep_last!r}")
        self.directory = absolute_path(directory)
        self.keep_last = int(keep_last)
        self._upgrade_saved = upgrade_saved or (lambda saved: saved)
        try:
            self.metadata = json_normalise(metadata)
        except ValueError as e:
            raise ValueError(f"checkpoint metadata must be JSON-serialisable: {e.__cause__ or e}") from e
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
            preservation_policy=ocp.checkpoint_managers.LatestN(n=self.keep_last),
            # Temporaries of saves killed half-way are never restored from; removing them frees the disk.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> "PytreeCheckpointer":
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
        """The newest complete step; temporaries of interrupted saves are not counted."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- save --------------------------------------------------------------------------------------------------
    def save(self, step: int, tree: Any, record: Any = None) -> bool:
        """Save `tree` and the JSON `record` as `step`, synchronously; returns whether it saved.

        A step that is not newer than the latest saved one is skipped (returns False): that checkpoint already
        exists, and orbax never overwrites. A record float that is not finite is stored as null (strict JSON).
        """
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        meta = {"run": self.metadata, "key_impls": key_impls(tree)}
        if record is not None:
            meta["record"] = json_normalise(strict_json(record))
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(_to_saveable(tree)),
                                       _META: ocp.args.JsonSave(meta)}),
            force=True,  # the decision was made above; orbax's own policy would also skip non-interval steps
        )
        self._manager.wait_until_finished()
        return bool(saved)

    # -- restore -----------------------------------------------------------------------------------------------
    def restore_latest(self, template: Any) -> tuple[int, Any, Any] | None:
        """(step, tree shaped like `template`, record) of the newest step, or None when there is none.

        An unreadable newest step (e.g. a file truncated by a full disk) raises one `UnreadableCheckpointError`
        saying which older step exists and what to move away to resume from it; nothing is deleted here, since
        the files may be worth rescuing."""
        step = self.latest_step()
        if step is None:
            return None
        try:
            tree, record = self.restore(step, template)
        except UnreadableCheckpointError as e:
            raise UnreadableCheckpointError(f"{e}; {self._resume_hint(step)}") from e.__cause__
        return step, tree, record

    def _resume_hint(self, step: int) -> str:
        older = [s for s in self.all_steps() if s < step]
        step_dir = self.directory / str(step)
        if older:
            return f"the older step {older[-1]} exists: move or delete {step_dir} to resume from step {older[-1]}"
        return f"no older step exists: move or delete {step_dir} to start this phase afresh"

    def restore(self, step: int, template: Any) -> tuple[Any, Any]:
        """(tree, record) of `step`, restored into `template`'s structure, shardings and dtypes.

        `template` may be concrete or abstract (e.g. from `jax.eval_shape`, with shardings set); its structure and
        static fields (e.g. a TrainState's `tx`) are kept, its leaves replaced. Raises CheckpointMismatchError if
        the step belongs to a different run, UnreadableCheckpointError if it is not a readable checkpoint.
        """
        where = f"checkpoint {self.directory} step {step}"
        template_dict = _state_dict(template)
        target = jax.tree_util.tree_map(_abstract_leaf, template_dict)
        saved_meta, saved_specs = self._read_step_metadata(step, where)

        saved_run = saved_meta.get("run", ABSENT)
        diff = first_json_difference(saved_run if saved_run is ABSENT else self._upgrade_saved(saved_run),
                                     self.metadata)
        if diff is not None:
            path, saved, expected = diff
            raise CheckpointMismatchError(
                f"{where} was written for a different run: "
                f"metadata {path} is {show_json_value(saved)}, expected {show_json_value(expected)}"
            )
        saved_impls, expected_impls = _saved_key_impls(saved_meta), key_impls(template)
        for path in sorted(set(saved_impls) | set(expected_impls)):
            if saved_impls.get(path) != expected_impls.get(path):
                raise CheckpointMismatchError(
                    f"{where} was written for a different run: {path} key implementation is "
                    f"{saved_impls.get(path)!r}, expected {expected_impls.get(path)!r}"
                )
        _check_specs(where, saved_specs, _leaf_specs(target))

        try:
            with _orphaned_read_noise_dropped():
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))[_STATE]
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types; report them as one.
            raise UnreadableCheckpointError(f"{where} could not be read: {_brief(e)}") from e

        def rewrap(x, data):
            if not _is_typed_key(x):
                return data
            key = jax.random.wrap_key_data(data, impl=_key_impl(x))
            sharding = getattr(x, "sharding", None)
            return key if sharding is None or key.sharding == sharding else jax.device_put(key, sharding)

        restored = jax.tree_util.tree_map(rewrap, template_dict, restored)
        return flax.serialization.from_state_dict(template, restored), saved_meta.get("record")

    def _read_step_metadata(self, step: int, where: str) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
        """The saved JSON metadata and {path: (shape, dtype)} of the saved arrays, read without loading arrays."""
        step_dir = self.directory / str(step)
        missing = [item for item in (_STATE, _META) if not (step_dir / item).is_dir()]
        if missing:
            raise UnreadableCheckpointError(
                f"{where} is not a readable checkpoint: {step_dir} lacks the item(s) {missing} "
                "(was it written by jaxalign's checkpointer?)"
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


class Checkpointer:
    """Saves and restores `TrainState`s under one directory (a `PytreeCheckpointer` keyed by `state.step`),
    every `config.every_steps` steps, keeping the newest `config.keep_last`.

    `metadata` describes the run (JSON-serialisable, e.g. the model config as a dict); see `PytreeCheckpointer`.
    Use as a context manager (or call `close()`) so orbax's background threads are shut down.
    """

    def __init__(self, directory: str | epath.PathLike, config: CheckpointConfig, metadata: dict) -> None:
        self.config = config
        self._trees = PytreeCheckpointer(directory, metadata, keep_last=config.keep_last)

    @property
    def directory(self) -> epath.Path:
        return self._trees.directory

    @property
    def metadata(self) -> Any:
        return self._trees.metadata

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending work and release orbax's threads."""
        self._trees.close()

    def wait(self) -> None:
        """Block until every save has been finalized (saves are synchronous, so this only guards future changes)."""
        self._trees.wait()

    # -- queries -----------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step; temporaries of interrupted saves are not counted."""
        return self._trees.latest_step()

    def all_steps(self) -> list[int]:
        return self._trees.all_steps()

    # -- save / restore ------------------------------------------------------------------------------------------
    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether `save` would consider a state at `step` (a multiple of `every_steps`, or `force`)."""
        return force or int(step) % self.config.every_steps == 0

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Save `state` if its step is a multiple of `every_steps` (or `force`); returns whether it saved.

        A step that is not newer than the latest saved one is skipped (returns False): that checkpoint already
        exists, and orbax never overwrites.
        """
        step = int(jax.device_get(state.step))
        if not self.due(step, force=force):
            return False
        return self._trees.save(step, state)

    def restore_latest(self, template: TrainState) -> TrainState | None:
        """Restore the newest checkpoint into `template`'s structure, shardings and dtypes; None if there is none.

        `template` may be concrete or abstract (e.g. from `jax.eval_shape`, with shardings set); its `tx` is kept.
        Raises CheckpointMismatchError if the checkpoint belongs to a different run, UnreadableCheckpointError if
        the step directory is not a readable checkpoint (saying which older step a re-run could resume from).
        """
        restored = self._trees.restore_latest(template)
        return None if restored is None else restored[1]

    def restore(self, step: int, template: TrainState) -> TrainState:
        """Restore a given step (see `restore_latest`)."""
        return self._trees.restore(step, template)[0]


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (e.g. the NaN mean return of a rollout in which no episode finished)
    replaced by None, so it is strict JSON and reads back equal to itself (`jaxalign.rundir.sanitise_json`)."""
    return sanitise_json(value)[0]


def _brief(e: Exception, limit: int = 300) -> str:
    """First line of an orbax/tensorstore error, without the kilobytes of spec they append; the full one stays
    chained (and in the run's log)."""
    text = f"{type(e).__name__}: {e}".split(" See full TensorStore details")[0].strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _is_closed_loop_noise(unraisable: Any) -> bool:
    """A report from a read the failed restore orphaned: "Event loop is closed", or any exception of one of orbax's
    own read coroutines (garbage-collected after the restore gave up on them)."""
    if _is_closed_loop_error(unraisable.exc_value):
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _OrphanedReadTasks(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports of orbax's read tasks (the report names the task's
    coroutine and the file it is defined in)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Task exception was never retrieved" in text and f"{os.sep}orbax{os.sep}" in text)


def _is_closed_loop_error(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


@contextlib.contextmanager
def _orphaned_read_noise_dropped():
    """While a restore runs, and for good once it has failed, drop the reports of the reads it orphaned.

    When a restore fails (e.g. a truncated chunk), orbax closes its event loop while tensorstore's other reads are still
    in flight; each then reports "Event loop is closed" (or its own read error) through sys.excepthook (its C++
    callbacks call PyErr_Print), sys.unraisablehook, or asyncio's "Task exception was never retrieved" log: tens of
    tracebacks burying the one error that matters. They can start before orbax's exception reaches us, so the filters
    are in place first; they are removed when the restore succeeds. After a failure they stay, and because a read can
    still report while the interpreter shuts down (when the hooks are gone), stderr is closed at exit, after
    everything Python prints (the refusal line included) has been flushed. Every other report reaches the previous
    hooks and asyncio's logger."""
    previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook
    log_filter = _OrphanedReadTasks()

    def except_hook(exc_type: Any, exc: BaseException, tb: Any) -> None:
        if not _is_closed_loop_error(exc):
            previous_except(exc_type, exc, tb)

    def unraisable_hook(unraisable: Any) -> None:
        if not _is_closed_loop_noise(unraisable):
            previous_unraisable(unraisable)

    sys.excepthook, sys.unraisablehook = except_hook, unraisable_hook
    logging.getLogger("asyncio").addFilter(log_filter)
    try:
        yield
    except BaseException:
        atexit.unregister(_close_stderr_after_flushing)  # once, however many restores failed
        atexit.register(_close_stderr_after_flushing)
        raise
    sys.excepthook, sys.unraisablehook = previous_except, previous_unraisable
    logging.getLogger("asyncio").removeFilter(log_filter)


def _close_stderr_after_flushing() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


def _params_first(path: str) -> tuple:
    """Sort key: leaves under a `params` node first (the shallower the node, the earlier), because a changed
    parameter is the root cause of every matching optimizer-state difference."""
    parts = path.split("/")
    return (parts.index("params") if "params" in parts else len(parts) + 1_000, path)


def _check_specs(where: str, saved: dict, expected: dict) -> None:
    """Raise on the first leaf whose presence, shape or dtype differs, parameters first."""
    for path in sorted(expected, key=_params_first):
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
    extra = sorted((p for p in saved if p not in expected), key=_params_first)
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
    "PytreeCheckpointer",
    "UnreadableCheckpointError",
    "key_impls",
    "strict_json",
]
