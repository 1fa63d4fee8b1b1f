"""The run directory: its layout, named once, and the few operations every run performs on it.

A run (an LM experiment, an RL agent, a benchmark point) owns one work directory. Its layout:

    WORKDIR/
      config.json             the resolved config; a resumed run must match it (`claim`)
      results.json            the run's final numbers (strict JSON, written atomically)
      metrics.jsonl           one record per logged step, every phase
      logs/run.log            the command line's log
      checkpoints/<phase>/    orbax checkpoints of one phase (sft, dpo, rl, ...)
      samples.npz             on-policy samples (cached, so a resumed run reuses the same samples)
      pairs.npz, lists.npz    preference pairs / ranked lists built from them
      reference_cache/        precomputed reference log-probs and objective extras, keyed by content hash
      <name>.png              plots
      <sub>/                  nested runs (an iteration, a stage, a seed) with the same layout

Everything here is host-side Python: no JAX tracing, no model. Writes are atomic (temporary file + rename; one
object write on an object store) so a reader, or a resumed run after SIGKILL, never sees a half-written file. The
root may be a local directory or a `gs://...` URI: every read and write goes through `jaxalign.paths`.

Strict JSON: every JSON file the project writes (results.json, config.json, metrics.jsonl, checkpoint records) is
strict JSON (RFC 8259 has no NaN or Infinity), so any reader parses it. A non-finite float (a diverged loss, the
accuracy of an empty subset) is written as null, and the record (the top-level object) gains a key "nonfinite"
listing the keys that were non-finite, nested ones joined by "." (e.g. {"eval/loss": null, "nonfinite":
["eval/loss"]}), so a null that was NaN is told apart from a value that is absent. `strict_json_text` is the one
serialiser; it dumps with allow_nan=False after sanitising, so nothing non-strict can slip out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import numpy as np

from jaxalign import paths
from jaxalign.distributed import host_local


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (`root`); nested runs are `RunDir(root).sub(name)`."""

    root: str

    @property
    def config(self) -> str:
        return paths.join(self.root, "config.json")

    @property
    def results(self) -> str:
        return paths.join(self.root, "results.json")

    @property
    def metrics(self) -> str:
        return paths.join(self.root, "metrics.jsonl")

    @property
    def logs(self) -> str:
        return paths.join(self.root, "logs")

    @property
    def samples(self) -> str:
        return paths.join(self.root, "samples.npz")

    @property
    def pairs(self) -> str:
        return paths.join(self.root, "pairs.npz")

    @property
    def lists(self) -> str:
        return paths.join(self.root, "lists.npz")

    @property
    def reference_cache(self) -> str:
        return paths.join(self.root, "reference_cache")

    def checkpoints(self, phase: str) -> str:
        return paths.join(self.root, "checkpoints", phase)

    def file(self, name: str) -> str:
        """Any other file of the run (a plot, a per-phase evaluation record, ...)."""
        return paths.join(self.root, name)

    def sub(self, *names: str) -> "RunDir":
        """A nested run (an iteration, a curriculum stage, a seed), laid out like this one."""
        return RunDir(paths.join(self.root, *names))


# ---------------------------------------------------------------------------------------------------------------
# JSON: normalised, compared field by field, written atomically.


def json_normalise(value: Any) -> Any:
    """What `value` reads back as after a JSON round trip (tuples become lists, keys become strings)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"not JSON-serialisable: {e}") from e


ABSENT = object()  # a key missing on one side of `first_json_difference`


def first_json_difference(saved: Any, expected: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """First (path, saved, expected) where two JSON values differ, depth first in key order; None if equal."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        for key in sorted(set(saved) | set(expected)):
            sub = f"{path}/{key}" if path else str(key)
            found = first_json_difference(saved.get(key, ABSENT), expected.get(key, ABSENT), sub)
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
    return "absent" if value is ABSENT else repr(value)


NONFINITE_KEY = "nonfinite"


def _is_nonfinite(value: Any) -> bool:
    return isinstance(value, (float, np.floating)) and not np.isfinite(value)


def sanitise_json(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """(`value` with every non-finite float replaced by None, the "."-joined paths of those floats)."""
    if _is_nonfinite(value):
        return None, [path]
    if isinstance(value, dict):
        out, found = {}, []
        for k, v in value.items():
            out[k], sub = sanitise_json(v, f"{path}.{k}" if path else str(k))
            found += sub
        return out, found
    if isinstance(value, (list, tuple)):
        pairs = [sanitise_json(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        return [v for v, _ in pairs], [p for _, sub in pairs for p in sub]
    return value, []


def strict_record(value: Any) -> Any:
    """`value` as strict JSON data (module docstring): non-finite floats as None and, on a dict, their keys under
    "nonfinite" (added to any list already there)."""
    clean, found = sanitise_json(value)
    if found and isinstance(clean, dict):
        clean[NONFINITE_KEY] = sorted(set(clean.get(NONFINITE_KEY) or []) | set(found))
    return clean


def strict_json_text(payload: Any, **dumps_kwargs: Any) -> str:
    """json.dumps of `strict_record(payload)` with allow_nan=False: strict JSON whatever the floats."""
    return json.dumps(strict_record(payload), allow_nan=False, **dumps_kwargs)


def strict_json_line(record: Any) -> str:
    """One JSONL line (no newline) of `record`, keys sorted."""
    return strict_json_text(record, sort_keys=True)


def write_json_atomic(path: str, payload: Any) -> None:
    """Write strict JSON (module docstring) to a per-process temporary file and rename, so readers never see a
    half-written file (on a full disk no temporary is left behind and the error names `path`: `paths.write_atomic`)."""
    paths.write_atomic(path, strict_json_text(payload, indent=2, sort_keys=True, default=str))


def load_json(path: str) -> Any | None:
    """The JSON value at `path`, or None when the file does not exist."""
    if not paths.exists(path):
        return None
    return json.loads(paths.read_text(path))


# ---------------------------------------------------------------------------------------------------------------
# Claiming a directory for a config.


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# Fields that change how a run reports, not what it computes: they may differ when a run is resumed (at any depth,
# so configs that embed another one, e.g. Curry-DPO's `base`, resume alike).
PRESENTATION_FIELDS = ("show_progress", "eval_batch_size", "log_every")


def without_presentation_fields(config: Any) -> Any:
    """A JSON config without its presentation fields, at every level."""
    if isinstance(config, dict):
        return {k: without_presentation_fields(v) for k, v in config.items() if k not in PRESENTATION_FIELDS}
    return config


def claim(cfg: Any, workdir: str) -> None:
    """Write workdir/config.json, or check that a resumed run uses the same config as the run that started it.

    Every phase's cached output (checkpoints, samples, pairs) was produced under that config; resuming with another
    one would silently mix two runs, so a difference is one clear error naming the first differing field.
    `cfg` is a config dataclass or an already JSON-like dict.
    """
    path = RunDir(workdir).config
    current = json_normalise(cfg if isinstance(cfg, dict) else config_to_dict(cfg))
    saved = load_json(path)
    if saved is not None:
        saved = with_added_defaults(saved, cfg)
        difference = first_json_difference(without_presentation_fields(saved), without_presentation_fields(current))
        if difference:
            field, before, now = difference
            raise ValueError(
                f"{path} records a run with {field.replace('/', '.')}={show_json_value(before)}, but this run has "
                f"{show_json_value(now)}; resume with the same overrides or use a new --workdir"
            )
    write_json_atomic(path, current)


def with_added_defaults(saved: Any, cfg: Any) -> Any:
    """`saved` (a config.json) with the fields a newer version of the config dataclass added filled in, where this
    run leaves them at their defaults: such a run is the run the directory recorded, so it resumes; a run that sets
    a new field differently is still refused by `claim`."""
    if not (dataclasses.is_dataclass(cfg) and isinstance(saved, dict)):
        return saved
    out = dict(saved)
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name in out:
            out[field.name] = with_added_defaults(out[field.name], value)
            continue
        default = (field.default if field.default is not dataclasses.MISSING else
                   field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is not dataclasses.MISSING and value == default:
            out[field.name] = json_normalise(config_to_dict(value) if dataclasses.is_dataclass(value) else value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Parameters and arrays.


def params_sha256(params: Any) -> str:
    """A hash of the parameters' bytes (leaves in tree order), to compare runs bit for bit."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(host_local(params))):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def save_arrays(path: str, arrays: dict[str, np.ndarray], stats: dict) -> None:
    """Atomically (`paths.write_atomic_with`: a per-process temporary file + rename, since processes sharing a
    workdir may save the same file) store named arrays and a JSON dict of their statistics."""
    paths.makedirs(paths.dirname(path) or ".")
    # The temporary keeps the .npz extension: np.savez appends one to a name without it.
    paths.write_atomic_with(path, lambda target: np.savez(target, stats=strict_json_text(stats), **arrays),
                            temporary_suffix=".npz")


def load_arrays(path: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, stats) from an .npz written by `save_arrays`, or None when the file does not exist."""
    if not paths.exists(path):
        return None
    with np.load(paths.readable(path)) as f:
        return {k: f[k] for k in f.files if k != "stats"}, json.loads(str(f["stats"]))
