"""Reference-model strategies for preference training (docs/objectives.md, "Reference modes").

- online: a frozen copy of the initial policy runs one extra forward pass per step (`dpo_loss_fn` with `frozen`);
- precomputed: the reference's per-token log-probs are computed once, stored on disk under a content hash of
  (reference parameters, data, tokenisation) and carried in the batch, so a step runs no reference forward pass;
  the cache is reused by every later run with the same three inputs and never by a run where any of them differs;
- reference-free: objectives registered with `needs_reference=False` (SimPO, CPO, ORPO, ...) skip the reference;
- periodic sync (TR-DPO, Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", sec. 3):
  every k steps ref <- alpha * policy + (1 - alpha) * ref (alpha = 1: hard update). The reference then lives in
  `TrainState.reference`, so it is checkpointed and a resumed run continues with the reference it had.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import paths
from jaxalign.logprobs import pair_token_logprobs

REFERENCE_KEYS = ("reference_chosen", "reference_rejected")
PAIR_INPUT_KEYS = (
    "chosen_tokens", "chosen_attention_mask", "chosen_completion_mask",
    "rejected_tokens", "rejected_attention_mask", "rejected_completion_mask",
)  # fmt: skip
_CACHE_FORMAT = 1  # bump when the stored layout changes, so stale caches are never read


@dataclasses.dataclass(frozen=True)
class ReferenceSync:
    """TR-DPO's reference update: every `every` optimizer steps, ref <- alpha * policy + (1 - alpha) * ref.

    alpha = 1 is the hard update (TR-DPO^tau), 0 < alpha < 1 the soft update (TR-DPO^alpha); TRL's
    SyncRefModelCallback defaults are every=512, alpha=0.6. every = 0 disables the sync (fixed reference).
    """

    every: int = 0
    alpha: float = 1.0

    def __post_init__(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise ValueError(f"reference sync every must be a non-negative integer (0 = never), got {self.every!r}")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise ValueError(f"reference sync alpha must lie in (0, 1], got {self.alpha!r}")

    @property
    def enabled(self) -> bool:
        return self.every > 0


def sync_reference(reference: Any, params: Any, step: jax.Array, sync: ReferenceSync) -> Any:
    """TR-DPO soft/hard update applied when `step` (the count of optimizer steps done) is a multiple of
    `sync.every`; otherwise the reference is returned unchanged. Jittable: `step` may be traced."""
    if not sync.enabled:
        return reference
    due = (step % sync.every) == 0

    def mix(ref, new):
        mixed = sync.alpha * new.astype(jnp.float32) + (1.0 - sync.alpha) * ref.astype(jnp.float32)
        return jnp.where(due, mixed.astype(ref.dtype), ref)

    return jax.tree_util.tree_map(mix, reference, params)


# ----------------------------------------------------------------------------------------------------------------
# precomputed, cached reference log-probs


def _hash_arrays(digest, arrays: dict[str, np.ndarray]) -> None:
    for name in sorted(arrays):
        array = np.ascontiguousarray(np.asarray(arrays[name]))
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())


def content_key(params: Any, data: dict[str, np.ndarray], description: dict[str, Any],
                keys: tuple[str, ...] = PAIR_INPUT_KEYS) -> str:
    """sha256 over parameters (every leaf's path, dtype, shape and bytes), the arrays `keys` of `data`, and a JSON
    description of everything else the result depends on (tokenisation, the producing config, ...)."""
    digest = hashlib.sha256(f"jaxalign-cache-v{_CACHE_FORMAT}".encode())
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    for path, leaf in leaves:
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype.str}:{leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    _hash_arrays(digest, {k: data[k] for k in keys})
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def reference_cache_key(params: Any, data: dict[str, np.ndarray], tokenization: dict[str, Any]) -> str:
    """The key of a reference log-prob cache: the reference parameters, the pair arrays the log-probs are computed
    on, and a description of the tokenisation (e.g. the tokenizer's vocabulary and special ids). Any change to one
    of the three gives a different key, so a stale cache is never read."""
    return content_key(params, data, {"reference_logps": tokenization})


def cached_arrays(cache_dir: str, stem: str, key: str, compute: Callable[[], dict[str, np.ndarray]],
                  expected_rows: int) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays from `cache_dir/<stem>-<key[:32]>.npz` when present, else `compute()`d and stored there atomically.

    Returns (arrays, info) with info = {"key", "path", "hit"}. A file that exists but cannot be read, carries another
    key or another number of rows is one clear error naming it (never silently recomputed over)."""
    path = paths.join(cache_dir, f"{stem}-{key[:32]}.npz")
    if paths.exists(path):
        try:
            with np.load(paths.readable(path)) as f:
                arrays = {k: f[k] for k in f.files if k != "key"}
                stored_key = str(f["key"])
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{path}: cached {stem} arrays are unreadable ({type(e).__name__}: {e}); delete the "
                             f"file to recompute it") from None
        rows = {k: len(v) for k, v in arrays.items()}
        if stored_key != key or any(n != expected_rows for n in rows.values()):
            raise ValueError(f"{path}: cached {stem} arrays do not belong to this data (key {stored_key[:16]}, rows "
                             f"{rows}, expected key {key[:16]} and {expected_rows} rows); delete the file to "
                             f"recompute it")
        return arrays, {"key": key, "path": path, "hit": True}
    arrays = compute()
    paths.makedirs(cache_dir)
    paths.write_atomic_with(path, lambda target: np.savez(target, key=key, **arrays), temporary_suffix=".npz")
    return arrays, {"key": key, "path": path, "hit": False}


@functools.lru_cache(maxsize=8)
def _jitted_pair_logprobs(apply_fn: Callable) -> Callable:
    # One compiled forward per apply function, reused by every later call with the same one.
    return jax.jit(lambda p, batch: pair_token_logprobs(apply_fn, p, batch))


def compute_reference_logprobs(apply_fn: Callable, params: Any, data: dict[str, np.ndarray],
                               batch_size: int) -> dict[str, np.ndarray]:
    """Per-token reference log-probs of every pair (masked, zero outside the completion), [pairs, time] each,
    computed with the same concatenated forward pass the online reference uses."""
    forward = _jitted_pair_logprobs(apply_fn)
    n = len(data["chosen_tokens"])
    chosen, rejected = [], []
    for start in range(0, n, batch_size):
        batch = {k: data[k][start : start + batch_size] for k in PAIR_INPUT_KEYS}
        c, r = forward(params, batch)
        chosen.append(np.asarray(c, np.float32))
        rejected.append(np.asarray(r, np.float32))
    return {"reference_chosen": np.concatenate(chosen), "reference_rejected": np.concatenate(rejected)}


def cached_reference_logprobs(cache_dir: str, apply_fn: Callable, params: Any, data: dict[str, np.ndarray],
                              tokenization: dict[str, Any], batch_size: int) -> tuple[dict[str, np.ndarray], dict]:
    """Reference log-probs from the on-disk cache under `reference_cache_key(params, data, tokenization)`, computed
    and stored when absent (`cached_arrays`). Returns (arrays, info) with info = {"key", "path", "hit"}."""
    key = reference_cache_key(params, data, tokenization)
    return cached_arrays(cache_dir, "reference_logps", key,
                         lambda: compute_reference_logprobs(apply_fn, params, data, batch_size),
                         len(data["chosen_tokens"]))
