"""The RL run harness: an agent's updates as jitted chunks, checkpointed, resumable, sharded over devices.

PureJaxRL (Lu, Kuba, Letcher, Metz, Schroeder de Witt, Foerster 2022, "Discovered Policy Optimisation", NeurIPS;
arXiv 2210.05639) runs the whole training loop (environment steps, rollouts, learning) as one jitted JAX program:
`train(key) = lax.scan(update, init(key), length=num_updates)`. An agent hands the harness exactly those two
pieces (a `Trainer`), and the harness runs the scan in `num_chunks` chunks of equal size (plus at most one
remainder, so at most two compilations). Between chunks, and only there, it

- checkpoints the whole runner state (parameters, optimizer state, environment states, observations, replay
  buffers, PRNG keys, counters) with the metric history so far (`jaxalign.train.checkpoint.PytreeCheckpointer`,
  atomic and synchronous), so a killed run, re-run with the same command, restores the newest chunk and computes
  exactly what the uninterrupted run computes: the same chunk sizes, the same keys, a bit-identical final state;
- appends the chunk's records to metrics.jsonl (rewritten from the checkpointed history on resume, so no record
  is lost or doubled whatever a killed run had appended after its last checkpoint);
- reports progress in environment steps (tqdm: rate and ETA);
- stops with one `jaxalign.train.loop.DivergenceError` when the chunk's losses or gradient norms (metrics named
  `loss`, `*_loss`, `grad_norm`) or any floating-point leaf of the runner state are non-finite, before that chunk
  is checkpointed or logged, so the checkpoints already written stay the last good ones.

Devices: the runner state is placed on a mesh (`jaxalign.sharding.make_mesh`, every device on the `data` axis)
with the environment batch split over `data` (the agent names that axis of each part of its state, `Trainer.env_axes`)
and everything else replicated; the chunk is `jax.jit` with those in/out shardings. Environments then step on
their own devices, and a loss that is a mean over the batch has its gradient averaged across devices by XLA's
partitioner, so the same agent runs on one CPU, 8 simulated devices or a pod and computes the same updates (up to
floating-point summation order).

The work directory (`jaxalign.rundir.RunDir`): config.json (`claim`), checkpoints/<step>/ (step = updates done),
metrics.jsonl, results.json (`write_results`) and learning_curve.png (`plot_learning_curve`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxalign import paths, tracking
from jaxalign.rundir import (RunDir, claim, config_to_dict, strict_json_text, with_added_defaults,
                             without_presentation_fields)
from jaxalign.rundir import write_json_atomic
from jaxalign.sharding import MeshConfig, make_mesh
from jaxalign.train.checkpoint import PytreeCheckpointer, strict_json
from jaxalign.train.loop import DivergenceError, all_finite, divergence_message
from rl.rollout import scan_updates

DATA_AXIS = "data"
REPLICATED = P()


def env_batch(axis: int = 0) -> P:
    """The PartitionSpec of a state part whose `axis` is the environment batch: split over the mesh's data axis."""
    return P(*([None] * axis), DATA_AXIS)


def is_watched_metric(name: str) -> bool:
    """The metrics whose non-finite value means the run diverged (a NaN mean return may only mean no episode
    finished)."""
    return name == "loss" or name.endswith("_loss") or name == "grad_norm"


def first_nonfinite_update(metrics: dict[str, np.ndarray], done: int) -> tuple[str, float, int] | None:
    """(metric, value, update number) of the first non-finite watched metric of a chunk ([n, ...] per key, the
    chunk starting after update `done`), or None."""
    found = None
    for name in sorted(filter(is_watched_metric, metrics)):
        values = np.asarray(metrics[name], dtype=np.float64).reshape(len(metrics[name]), -1)
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size and (found is None or done + int(bad[0]) + 1 < found[2]):
            row = values[bad[0]]
            found = (name, float(row[~np.isfinite(row)][0]), done + int(bad[0]) + 1)
    return found


def check_chunk(desc: str, metrics: dict[str, np.ndarray], state: Any, done: int, size: int,
                checkpoints: PytreeCheckpointer) -> None:
    """Raise `DivergenceError` when the chunk after update `done` diverged (module docstring)."""
    bad = first_nonfinite_update(metrics, done)
    if bad is not None:
        what, update = f"{bad[0]} = {bad[1]}", bad[2]
    elif not all_finite(state):
        what, update = "the runner state is non-finite", done + size
    else:
        return
    raise DivergenceError(divergence_message(desc, update, what, checkpoints, unit="update",
                                             checked="checked after every chunk, before its checkpoint"))


def per_update_records(metrics: dict[str, np.ndarray], done: int) -> list[dict]:
    """One record per update of a chunk (metrics [n] each), numbered from `done + 1` as "update"."""
    n = len(next(iter(metrics.values())))
    return [{**{k: float(v[j]) for k, v in metrics.items()}, "update": done + j + 1} for j in range(n)]


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What an agent hands the harness: PureJaxRL's `make_train(config)` split into its two pieces.

    init:    key -> runner state (everything the run carries from one update to the next).
    update:  runner state -> (runner state, metrics): ONE update, pure and jittable; the harness scans it.
    num_updates, env_steps_per_update: the run's length, and the environment steps one update takes (progress).
    env_axes: runner state -> a prefix tree of PartitionSpecs, `env_batch(axis)` where that axis of the part is the
             environment batch, `REPLICATED` elsewhere (parameters, optimizer state, replay, keys, counters).
    records: (host metrics of one chunk, [n, ...] per key; updates done before it) -> its metrics.jsonl records.
    postfix: the chunk's records -> a dict shown beside the progress bar.
    """

    init: Callable[[jax.Array], Any]
    update: Callable[[Any], tuple[Any, dict]]
    num_updates: int
    env_steps_per_update: int
    env_axes: Callable[[Any], Any] = lambda state: REPLICATED
    records: Callable[[dict[str, np.ndarray], int], list[dict]] = per_update_records
    postfix: Callable[[list[dict]], dict] = lambda records: {}


class Trained(NamedTuple):
    """What `train` returns: the final runner state, every record, and timings of the updates run here."""

    state: Any
    history: list[dict]
    train_seconds: float  # from after the restore to the end of the last chunk
    updates_trained: int  # by this process (0 when a finished run is re-run)
    first_chunk_seconds: float  # of this process's first chunk, compilation included
    first_chunk_updates: int


def chunk_sizes(num_updates: int, num_chunks: int) -> list[int]:
    """Split the updates into chunks of one size plus at most one remainder chunk (at most two compilations)."""
    if not 1 <= num_chunks <= num_updates:
        raise ValueError(f"num_chunks must lie in [1, num_updates={num_updates}], got {num_chunks!r}")
    size = math.ceil(num_updates / num_chunks)
    return [size] * (num_updates // size) + ([num_updates % size] if num_updates % size else [])


def state_shardings(trainer: Trainer, abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of the runner state, from the agent's `env_axes`; a clear error when an
    environment batch does not split evenly over the data axis."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    specs = jax.tree_util.tree_map(lambda spec, part: jax.tree_util.tree_map(lambda _: spec, part),
                                   trainer.env_axes(abstract_state), abstract_state, is_leaf=is_spec)
    devices = mesh.shape[DATA_AXIS]

    def leaf_sharding(path, spec, leaf):
        axis = list(spec).index(DATA_AXIS) if DATA_AXIS in spec else None
        if axis is not None and (len(leaf.shape) <= axis or leaf.shape[axis] % devices):
            raise ValueError(f"runner state {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot split its "
                             f"environment batch (axis {axis}) over the {devices} devices of the mesh's data axis; "
                             f"use a number of environments divisible by {devices}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(leaf_sharding, specs, abstract_state, is_leaf=is_spec)


def default_mesh() -> Mesh:
    """Every device on the data axis."""
    return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))


def train(trainer: Trainer, cfg: Any, workdir: str, key: jax.Array, num_chunks: int, *, show_progress: bool = True,
          desc: str = "train", mesh: Mesh | None = None) -> Trained:
    """Train `trainer` in `num_chunks` chunks in `workdir`, resuming from its newest checkpoint (module docstring).

    `cfg` is the run's config (a dataclass or JSON-like dict): `workdir` is claimed for it (config.json) and,
    without its presentation fields, it is the checkpoints' metadata. `key` seeds `trainer.init`.
    """
    mesh = default_mesh() if mesh is None else mesh
    sizes = chunk_sizes(trainer.num_updates, num_chunks)
    shardings = state_shardings(trainer, jax.eval_shape(trainer.init, key), mesh)  # checked before anything is written
    replicated = NamedSharding(mesh, REPLICATED)
    run_dir = RunDir(workdir)
    paths.makedirs(run_dir.root)
    claim(cfg, workdir)
    metadata = without_presentation_fields(cfg if isinstance(cfg, dict) else config_to_dict(cfg))
    state = jax.jit(trainer.init, out_shardings=shardings)(key)
    chunks = {size: jax.jit(functools.partial(scan_updates, trainer.update, length=size), in_shardings=(shardings,),
                            out_shardings=(shardings, replicated)) for size in set(sizes)}
    writes = jax.process_index() == 0

    history: list[dict] = []
    # Checkpoints written before a config field was added (left at its default here) belong to this run, as in
    # `claim`.
    def upgrade(saved):
        return without_presentation_fields(with_added_defaults(saved, cfg))

    with PytreeCheckpointer(run_dir.file("checkpoints"), metadata, keep_last=2, upgrade_saved=upgrade) as checkpoints:
        done = 0
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            done, state, history = restored
        boundaries = np.cumsum([0] + sizes)
        if done not in boundaries:
            raise ValueError(f"{checkpoints.directory} holds step {done}, which is not a chunk boundary "
                             f"{boundaries.tolist()} of this run")
        if writes:
            write_metrics(run_dir.metrics, history)
        train_start = time.perf_counter()
        first_chunk_seconds, first_chunk_updates, trained = 0.0, 0, 0
        steps = trainer.env_steps_per_update
        with tqdm(total=trainer.num_updates * steps, initial=done * steps, desc=desc, unit="step", unit_scale=True,
                  disable=not show_progress, dynamic_ncols=True) as bar:
            for size in sizes[int(np.searchsorted(boundaries, done)):]:
                chunk_start = time.perf_counter()
                state, metrics = chunks[size](state)
                metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}  # waits for the chunk
                if trained == 0:
                    first_chunk_seconds, first_chunk_updates = time.perf_counter() - chunk_start, size
                check_chunk(desc, metrics, state, done, size, checkpoints)
                records = [strict_json(r) for r in trainer.records(metrics, done)]
                done, trained = done + size, trained + size
                history.extend(records)
                # Checkpoint first, then log: a kill between the two loses no record, since a resume rewrites
                # metrics.jsonl from the checkpointed history.
                checkpoints.save(done, state, history)
                if writes:
                    append_metrics(run_dir.metrics, records)
                bar.set_postfix(trainer.postfix(records))
                bar.update(size * steps)
    return Trained(state, history, time.perf_counter() - train_start, trained, first_chunk_seconds,
                   first_chunk_updates)


def write_metrics(path: str, history: list[dict]) -> None:
    """Replace metrics.jsonl by `history`, atomically."""
    paths.write_atomic(path, "".join(strict_json_text(r) + "\n" for r in history))
    tracking.sync(path)


def append_metrics(path: str, records: list[dict]) -> None:
    paths.append_text(path, "".join(strict_json_text(r) + "\n" for r in records))
    tracking.sync(path)


def write_results(workdir: str, results: dict) -> None:
    """results.json, atomically (process 0 only)."""
    if jax.process_index() == 0:
        write_json_atomic(RunDir(workdir).results, results)


def plot_learning_curve(workdir: str, history: list[dict], x: str, ys: dict[str, str], *, title: str,
                        xlabel: str | None = None, ylabel: str = "episode return",
                        hline: tuple[float, str] | None = None,
                        ylim: Sequence[float] | None = None, name: str = "learning_curve.png") -> None:
    """Plot each record field `ys` (label -> key; records where it is null are skipped) against the field `x`,
    with an optional horizontal reference line (value, label), to WORKDIR/`name` (process 0 only)."""
    if jax.process_index() != 0:
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="tight")
    ax = fig.subplots()
    for label, key in ys.items():
        points = [(r[x], r[key]) for r in history if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label)
    if hline is not None:
        ax.axhline(hline[0], color="tab:green", linestyle="--", label=hline[1])
    ax.set(xlabel=xlabel or x.replace("_", " "), ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    paths.save_figure(fig, RunDir(workdir).file(name), dpi=120)


__all__ = ["DATA_AXIS", "REPLICATED", "Trained", "Trainer", "chunk_sizes", "default_mesh", "env_batch",
           "per_update_records", "plot_learning_curve", "scan_updates", "state_shardings", "train",
           "write_results"]
