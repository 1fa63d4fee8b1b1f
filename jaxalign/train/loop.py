"""The thin training loop: for each batch, state, metrics = step(state, batch); plus checkpoint, log and hooks.

The loop is thin (docs/architecture.md, "Principles"). Everything a resumed run needs is in the `TrainState` (the
data position included), so resuming is: restore the latest checkpoint, then run this same loop from `state.step`.

Divergence (docs/architecture.md, "Principles": fail loudly). A non-finite `loss` or `grad_norm` stops the phase with
one `DivergenceError` naming the phase, the step, the metric and its value, and the last good checkpoint. Checking
needs a host sync, so it happens only where the loop syncs anyway: at every log step (the metrics are fetched there)
and before every save (the state's parameters are checked too). A divergence is therefore detected at the first log
or save step at or after the step it began, and a non-finite state is never saved: the checkpoints written before
stay intact. `on_nonfinite="skip-batch"` instead skips the update of a batch whose loss or gradient norm is
non-finite (see `train_loop`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxalign import paths, tracking
from jaxalign.data.iterator import ArrayDataset, batch_at
from jaxalign.rundir import strict_json_line
from jaxalign.sharding import process_batch_block, put_batch


def process_log_path(path: str, process_index: int) -> str:
    """Where process `process_index` keeps the metrics log `path`: `path` itself for process 0, else
    DIR/logs/NAME.process_I.jsonl beside the launcher's per-process output logs."""
    if process_index == 0:
        return path
    stem, ext = os.path.splitext(os.path.basename(path))
    return paths.join(paths.dirname(path), "logs", f"{stem}.process_{process_index}{ext}")


class MetricsLog:
    """Appends one JSON object per logged step to a JSONL file (flushed every write, so a killed run keeps it).

    Records carry a "phase" and a "step". A resumed phase first calls `truncate(phase, step)`, which drops that
    phase's records after the restored step, so the file never holds a step twice and the other phases are kept.

    In a multi-process run only process 0 writes `path`; process i > 0 keeps its own identical copy in
    `process_log_path(path, i)`, so processes sharing a work directory never append to (or read half of) one file
    and every process reads back exactly the records it wrote.

    `path` may be on an object store (`jaxalign.paths`): there each `write` rewrites the whole object (objects
    cannot be appended to), which is correct because each file has one writer.
    """

    def __init__(self, path: str, process_index: int | None = None):
        process_index = jax.process_index() if process_index is None else process_index
        self.path = process_log_path(path, process_index)
        paths.makedirs(paths.dirname(self.path) or ".")

    def records(self, phase: str | None = None) -> list[dict[str, Any]]:
        if not paths.exists(self.path):
            return []
        records = [json.loads(line) for line in paths.read_text(self.path).split("\n") if line.strip()]
        return [r for r in records if phase is None or r.get("phase") == phase]

    def truncate(self, phase: str, after_step: int) -> None:
        kept = [r for r in self.records() if r.get("phase") != phase or r.get("step", 0) <= after_step]
        paths.write_atomic(self.path, "".join(strict_json_line(r) + "\n" for r in kept))
        tracking.sync(self.path)

    def write(self, record: dict[str, Any]) -> None:
        paths.append_text(self.path, strict_json_line(record) + "\n")
        tracking.sync(self.path)


# What the progress bar shows (the JSONL has every metric): metric -> short label.
PROGRESS_FIELDS = {
    "loss": "loss",
    "rewards/chosen": "r_w",
    "rewards/rejected": "r_l",
    "rewards/margin": "margin",
    "rewards/accuracy": "acc",
    "grad_norm": "|g|",
    "tokens_per_second": "tok/s",
    "val/accuracy": "val_acc",
}


def to_python(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


# The step metrics that decide divergence (`jaxalign.train.step.make_train_step` reports both).
WATCHED_METRICS = ("loss", "grad_norm")
ON_NONFINITE = ("stop", "skip-batch")


class DivergenceError(ValueError):
    """A phase's loss, gradient norm or parameters became non-finite; the non-finite state was not saved."""


def first_nonfinite(record: dict, keys: tuple[str, ...] = WATCHED_METRICS) -> tuple[str, float] | None:
    """The first (key, value) of `keys` in `record` whose value is not finite, or None."""
    for key in keys:
        if key in record and not np.isfinite(record[key]):
            return key, float(record[key])
    return None


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves] or [True]))


def all_finite(tree) -> bool:
    """Whether every floating-point leaf of `tree` is finite (one device reduction, one host sync)."""
    return bool(jax.device_get(_all_finite(tree)))


def divergence_message(phase: str, step: int, what: str, checkpointer, unit: str = "step",
                       checked: str = "checked at log steps and before each save") -> str:
    """One line: where the phase diverged and which checkpoint a re-run resumes from."""
    if checkpointer is None:
        resume = "this phase keeps no checkpoints"
    else:
        latest = checkpointer.latest_step()
        resume = (f"no checkpoint of this phase was saved ({checkpointer.directory})" if latest is None else
                  f"the last good checkpoint is step {latest} in {checkpointer.directory}, which a re-run resumes "
                  f"from")
    return f"phase {phase!r} diverged: {what} at {unit} {step} ({checked}; nothing non-finite was saved); {resume}"


def is_watched(key: str) -> bool:
    """Metrics whose non-finite value is a divergence in any trainer: losses and gradient norms, whatever their
    prefix ("loss", "critic/grad_norm", "policy_grad_norm", "oreo/policy_loss")."""
    name = key.rsplit("/", 1)[-1]
    return name in WATCHED_METRICS or name.endswith(("_loss", "_grad_norm"))


def stop_if_diverged(record: dict, phase: str, step: int, checkpointer, params: Any = None,
                     unit: str = "step", checked: str = "checked at log steps and before each save") -> None:
    """Raise `DivergenceError` (naming the phase, the step, the value and the last good checkpoint) when a watched
    metric of `record` is non-finite, or when `params` (checked only where given: it costs a device reduction) holds
    a non-finite value. Trainers that do not use `train_loop` call this at their log steps and before every save."""
    bad = first_nonfinite(record, tuple(k for k in record if is_watched(k)))
    what = None if bad is None else f"{bad[0]} = {bad[1]}"
    if what is None and params is not None and not all_finite(params):
        what = "the parameters are non-finite"
    if what is not None:
        raise DivergenceError(divergence_message(phase, step, what, checkpointer, unit, checked))


def _copy_state(state):
    """A copy of `state` that survives the step donating its buffers."""
    return jax.tree_util.tree_map(lambda x: x.copy(), state)


def train_loop(
    *,
    state,
    step_fn: Callable,
    frozen: Any,
    dataset: ArrayDataset,
    batch_size: int,
    num_steps: int,
    seed: int,
    mesh,
    checkpointer=None,
    metrics_log: MetricsLog | None = None,
    log_every: int = 10,
    desc: str = "train",
    hooks: Iterable[Callable[[Any, dict], dict | None]] = (),
    token_keys: tuple[str, ...] = ("attention_mask",),
    show_progress: bool = True,
    on_nonfinite: str = "stop",
):
    """Run `step_fn` until `state.step == num_steps`. Returns the final state.

    `hooks` are called after every step as hook(state, metrics_so_far) and may return extra metrics to log (for
    example a validation evaluation every k steps). tokens/s counts the real (unpadded) tokens of `token_keys`.

    `on_nonfinite`: "stop" raises `DivergenceError` (module docstring). "skip-batch" checks every step (one host
    sync per step) and, when the loss or gradient norm is non-finite, keeps the state from before the step with only
    its step counter and data position advanced, so the batch is skipped and the run continues; every log record
    then carries "skipped_batches", the batches skipped since the previous record. The step donates the state's
    buffers, so skip-batch keeps a device copy of the state (twice the state's memory).
    """
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every <= 0:
        raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got {on_nonfinite!r}")
    skip = on_nonfinite == "skip-batch"
    skipped = skipped_total = 0
    position = jax.device_get(state.data)
    start = int(jax.device_get(state.step))
    process_index, process_count = process_batch_block(mesh, batch_size)  # the rows this process loads
    if metrics_log is not None:
        metrics_log.truncate(desc, start)
    bar = tqdm(total=num_steps, initial=start, desc=desc, unit="step", disable=not show_progress, dynamic_ncols=True)
    tokens, clock = 0, time.perf_counter()
    for step in range(start, num_steps):
        host_batch, position = batch_at(dataset, position, batch_size, seed, process_index, process_count)
        tokens += sum(int(np.sum(host_batch[k])) for k in token_keys) * process_count
        before = _copy_state(state) if skip else None
        state, metrics = step_fn(state, frozen, put_batch(host_batch, mesh), position)
        if skip and first_nonfinite(to_python({k: metrics[k] for k in WATCHED_METRICS if k in metrics})):
            state, skipped = before.replace(step=state.step, data=state.data), skipped + 1
            skipped_total += 1
        extra = {}
        for hook in hooks:
            extra.update(hook(state, metrics) or {})
        done = step + 1
        if done % log_every == 0 or done == num_steps or extra:
            record = to_python(metrics)
            elapsed = time.perf_counter() - clock
            record.update(extra, step=done, tokens_per_second=tokens / max(elapsed, 1e-9), phase=desc)
            if skip:
                record["skipped_batches"], skipped = skipped, 0
            tokens, clock = 0, time.perf_counter()
            if metrics_log is not None:
                metrics_log.write(record)
            bar.set_postfix({short: f"{record[k]:.3g}" for k, short in PROGRESS_FIELDS.items() if k in record})
            bad = None if skip else first_nonfinite(record)
            if bad is not None:
                bar.close()
                raise DivergenceError(divergence_message(desc, done, f"{bad[0]} = {bad[1]}", checkpointer))
        force = done == num_steps
        if checkpointer is not None and checkpointer.due(done, force=force):
            _check_before_save(state, metrics, desc, done, checkpointer, skip, bar)
            checkpointer.save(state, force=force)
        bar.update(1)
    bar.close()
    if skipped_total:  # counted in the metrics per record; the total once, where the user looks
        print(f"jaxalign: warning: phase '{desc}' skipped {skipped_total} of its {num_steps - start} batches for a "
              f"non-finite loss or gradient norm (on_nonfinite=skip-batch)", file=sys.stderr)
    if checkpointer is not None:
        checkpointer.wait()
    return state


def _check_before_save(state, metrics: dict, desc: str, step: int, checkpointer, skip_batch: bool,
                       bar) -> None:
    """Raise `DivergenceError` rather than save a state whose step metrics or parameters are non-finite (under
    skip-batch the metrics of a skipped step are non-finite but the state is the good one from before it)."""
    bad = None if skip_batch else first_nonfinite(
        to_python({k: metrics[k] for k in WATCHED_METRICS if k in metrics}))
    what = None if bad is None else f"{bad[0]} = {bad[1]}"
    if what is None and not all_finite(state.params):
        what = "the parameters are non-finite"
    if what is not None:
        bar.close()
        raise DivergenceError(divergence_message(desc, step, what, checkpointer))
