"""Experiment tracking: a run's metrics, config and plots in TensorBoard and/or Weights & Biases.

The work directory's metrics.jsonl stays the source of truth; a tracker mirrors it. Every writer of metrics.jsonl
(`jaxalign.train.loop.MetricsLog`, the RL harness) calls `sync(path)` after writing, which sends the lines added
since the last call. A resumed run first cuts metrics.jsonl back to its checkpoint (so the file never holds a step
twice); the mirror sees the file replaced and rebuilds: TensorBoard's event files are rewritten from the kept
records, so a resumed run's curves have every step once. Weights & Biases cannot delete history, so its mirror
remembers the last step it sent per phase (WORKDIR/tracking/wandb_steps.json) and never sends a step again; the
steps a resumed run repeats are bit-identical to the ones sent before (the runs resume bit for bit).

Which trackers: `jaxalign run NAME --workdir DIR tracking=tensorboard` (or `wandb`, `tensorboard,wandb`, `none`, the
default). The choice is the run's presentation, not its config (it may change between resumes). TensorBoard event
files go to WORKDIR/tensorboard (written with tensorboardX, which needs no TensorFlow); W&B to WORKDIR/wandb, with
the run id derived from the work directory, `WANDB_MODE=offline` honoured. Scalars are tagged PHASE/METRIC at the
record's step ("step", else "update", else the line number). At the end of a run the resolved config (text) and
every PNG of the work directory (images) are added. Only process 0 tracks.

Local work directories only: tensorboardX and wandb write their files with the local file system's own calls, and
the mirror follows metrics.jsonl by inode and offset. With a work directory on an object store (`gs://...`,
`jaxalign.paths`) tracking is refused in one line before the run starts (`check_workdir`); metrics.jsonl there is
still complete, and `tensorboard --logdir` or `wandb sync` can be pointed at a local copy afterwards.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
from typing import Any

from jaxalign.paths import is_local

ENV_VAR = "JAXALIGN_TRACKING"
KINDS = ("tensorboard", "wandb")

_mirrors: dict[str, "_Mirror"] = {}


def parse_tracking(value: str) -> tuple[str, ...]:
    """`tracking=` as a tuple of trackers ("none" or "" is none); an unknown name is one clear error."""
    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise ValueError(f"tracking={value!r}: unknown tracker {unknown[0]!r}; expected tensorboard, wandb, "
                         "tensorboard,wandb or none")
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("tracking=wandb needs the wandb package (pip install wandb); tensorboard needs "
                             "nothing more") from None
        if not _wandb_can_log():
            raise ValueError("tracking=wandb: no W&B API key is configured; run `wandb login`, set "
                             "WANDB_API_KEY, or set WANDB_MODE=offline (then `wandb sync WORKDIR/wandb/...`)")
    return names


def check_workdir(kinds: tuple[str, ...], workdir: str) -> None:
    """Refuse tracking for a work directory that is not local (module docstring), naming what to do instead."""
    if kinds and not is_local(workdir):
        raise ValueError(f"tracking={','.join(kinds)} needs a local work directory, but {workdir} is on an object "
                         "store; drop tracking= (metrics.jsonl is kept there) or use a local --workdir")


def _wandb_can_log() -> bool:
    """Whether wandb.init will work without asking: offline/disabled mode, or an API key in the environment or in
    ~/.netrc (where `wandb login` stores it)."""
    if os.environ.get("WANDB_MODE", "") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    if os.path.isfile(netrc):
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    return False


def active() -> tuple[str, ...]:
    """The trackers this process writes to (none on processes other than 0)."""
    if os.environ.get("JAXALIGN_PROCESS_ID", "0") != "0":
        return ()
    return parse_tracking(os.environ.get(ENV_VAR, ""))


def _step_of(record: dict, line: int) -> int:
    for key in ("step", "update"):
        if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool):
            return int(record[key])
    return line


def _scalars(record: dict) -> dict[str, float]:
    phase = record.get("phase") or "train"
    return {f"{phase}/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "update")
            and math.isfinite(float(v))}


class _TensorBoard:
    def __init__(self, workdir: str):
        self.logdir = os.path.join(workdir, "tensorboard")
        self.writer = None

    def _open(self):
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(self.logdir, flush_secs=5)
        return self.writer

    def reset(self) -> None:
        self.close()
        shutil.rmtree(self.logdir, ignore_errors=True)

    def log(self, record: dict, step: int) -> None:
        writer = self._open()
        for tag, value in _scalars(record).items():
            writer.add_scalar(tag, value, step)

    def finish(self, config: dict | None, images: list[str]) -> None:
        writer = self._open()
        if config is not None:
            writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)
        for path in images:
            import matplotlib.image

            writer.add_image(os.path.basename(path), matplotlib.image.imread(path)[..., :3], 0, dataformats="HWC")
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Wandb:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.steps_file = os.path.join(workdir, "tracking", "wandb_steps.json")
        self.sent = {}
        if os.path.isfile(self.steps_file):
            with open(self.steps_file) as f:
                self.sent = json.load(f)
        self.run = None

    def _open(self):
        if self.run is None:
            import wandb

            run_id = hashlib.sha256(os.path.abspath(self.workdir).encode()).hexdigest()[:16]
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "jaxalign"), dir=self.workdir, id=run_id,
                                  name=os.path.basename(os.path.abspath(self.workdir)), resume="allow")
        return self.run

    def reset(self) -> None:  # W&B keeps its history: `sent` skips what it already has
        pass

    def log(self, record: dict, step: int) -> None:
        phase = record.get("phase") or "train"
        if step <= self.sent.get(phase, 0):
            return
        run = self._open()
        if phase not in self.sent:
            run.define_metric(f"{phase}/step")
            run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        run.log({**_scalars(record), f"{phase}/step": step})
        self.sent[phase] = step
        os.makedirs(os.path.dirname(self.steps_file), exist_ok=True)
        with open(self.steps_file, "w") as f:
            json.dump(self.sent, f)

    def finish(self, config: dict | None, images: list[str]) -> None:
        import wandb

        run = self._open()
        if config is not None:
            run.config.update(config, allow_val_change=True)
        if images:
            run.log({os.path.basename(p): wandb.Image(p) for p in images})
        self.close()

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class _Mirror:
    """Sends the lines appended to one metrics.jsonl to the trackers; rebuilds when the file was replaced."""

    def __init__(self, path: str, kinds: tuple[str, ...]):
        self.path, self.offset, self.lines, self.identity = path, 0, 0, None
        workdir = os.path.dirname(os.path.abspath(path))
        self.backends = [_TensorBoard(workdir) if kind == "tensorboard" else _Wandb(workdir) for kind in kinds]

    def sync(self) -> None:
        if not os.path.exists(self.path):
            return
        stat = os.stat(self.path)
        identity = (stat.st_ino, stat.st_dev)
        if identity != self.identity or stat.st_size < self.offset:  # replaced (a resume cut it back): rebuild
            for backend in self.backends:
                backend.reset()
            self.offset, self.lines, self.identity = 0, 0, identity
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next sync
        for raw in complete.splitlines():
            if not raw.strip():
                continue
            self.lines += 1
            record = json.loads(raw)
            for backend in self.backends:
                backend.log(record, _step_of(record, self.lines))
        self.offset += len(complete)

    def finish(self, config: dict | None) -> None:
        self.sync()
        images = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(self.path)), "*.png")))
        for backend in self.backends:
            backend.finish(config, images)


def sync(path: str) -> None:
    """Mirror what was appended to the metrics file `path` (a no-op unless tracking is on)."""
    kinds = active()
    if not kinds:
        return
    check_workdir(kinds, path)
    key = os.path.abspath(path)
    if key not in _mirrors:
        _mirrors[key] = _Mirror(key, kinds)
    _mirrors[key].sync()


def finish(workdir: str, config: Any = None) -> None:
    """At the end of a run: the last metrics, the resolved config and the work directory's PNGs; close."""
    if not active():
        return
    check_workdir(active(), workdir)
    key = os.path.abspath(os.path.join(workdir, "metrics.jsonl"))
    mirror = _mirrors.pop(key, None) or _Mirror(key, active())
    mirror.finish(config)


__all__ = ["ENV_VAR", "KINDS", "active", "check_workdir", "finish", "parse_tracking", "sync"]
