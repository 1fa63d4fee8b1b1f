"""The thin training loop: for each batch, state, metrics = step(state, batch); plus checkpoint, log and hooks.

The loop is thin (docs/architecture.md, "Principles"). Everything a resumed run needs is in the `TrainState` (the
data position included), so resuming is: restore the latest checkpoint, then run this same loop from `state.step`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxalign.data.iterator import ArrayDataset, batch_at
from jaxalign.sharding import process_batch_block, put_batch


def process_log_path(path: str, process_index: int) -> str:
    """Where process `process_index` keeps the metrics log `path`: `path` itself for process 0, else
    DIR/logs/NAME.process_I.jsonl beside the launcher's per-process output logs."""
    if process_index == 0:
        return path
    stem, ext = os.path.splitext(os.path.basename(path))
    return os.path.join(os.path.dirname(path), "logs", f"{stem}.process_{process_index}{ext}")


class MetricsLog:
    """Appends one JSON object per logged step to a JSONL file (flushed every write, so a killed run keeps it).

    Records carry a "phase" and a "step". A resumed phase first calls `truncate(phase, step)`, which drops that
    phase's records after the restored step, so the file never holds a step twice and the other phases are kept.

    In a multi-process run only process 0 writes `path`; process i > 0 keeps its own identical copy in
    `process_log_path(path, i)`, so processes sharing a work directory never append to (or read half of) one file
    and every process reads back exactly the records it wrote.
    """

    def __init__(self, path: str, process_index: int | None = None):
        process_index = jax.process_index() if process_index is None else process_index
        self.path = process_log_path(path, process_index)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def records(self, phase: str | None = None) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return [r for r in records if phase is None or r.get("phase") == phase]

    def truncate(self, phase: str, after_step: int) -> None:
        kept = [r for r in self.records() if r.get("phase") != phase or r.get("step", 0) <= after_step]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()


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
):
    """Run `step_fn` until `state.step == num_steps`. Returns the final state.

    `hooks` are called after every step as hook(state, metrics_so_far) and may return extra metrics to log (for
    example a validation evaluation every k steps). tokens/s counts the real (unpadded) tokens of `token_keys`.
    """
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every <= 0:
        raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
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
        state, metrics = step_fn(state, frozen, put_batch(host_batch, mesh), position)
        extra = {}
        for hook in hooks:
            extra.update(hook(state, metrics) or {})
        done = step + 1
        if done % log_every == 0 or done == num_steps or extra:
            record = to_python(metrics)
            elapsed = time.perf_counter() - clock
            record.update(extra, step=done, tokens_per_second=tokens / max(elapsed, 1e-9), phase=desc)
            tokens, clock = 0, time.perf_counter()
            if metrics_log is not None:
                metrics_log.write(record)
            bar.set_postfix({short: f"{record[k]:.3g}" for k, short in PROGRESS_FIELDS.items() if k in record})
        if checkpointer is not None:
            checkpointer.save(state, force=done == num_steps)
        bar.update(1)
    bar.close()
    if checkpointer is not None:
        checkpointer.wait()
    return state
