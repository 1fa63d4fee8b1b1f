"""Sequence packing: several sequences per row of a fixed length, told apart by segment ids.

Padding a batch to its longest sequence wastes the compute of every pad token; packing puts sequences one after
another into rows of `row_len` tokens instead (first-fit: each sequence goes into the first row with room for it,
in input order), and marks each with a segment id (1, 2, ... within a row; 0 is padding). `DecoderLM(...)(tokens,
segment_ids=...)` then attends only within a segment and restarts positions at each segment, so every sequence
gets exactly the logits it would get alone (Krell et al. 2021, "Efficient sequence packing without
cross-contamination", section 3: block-diagonal attention and per-sequence position ids).

Log-probs follow jaxalign.logprobs' conventions: logp_t = log softmax(logits_{t-1})[x_t], counted where the
completion mask is 1. In a packed row the first token of a segment would be "predicted" by the previous segment's
last logits; that position is excluded (as t = 0 is in an unpacked row), so per-sequence sums equal unpacked ones.

A sequence longer than `row_len` cannot be packed; it is dropped, listed in `PackedSequences.dropped`, counted in
`stats()` and announced with a warning, never dropped silently.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data.iterator import batch_at
from jaxalign.logprobs import token_logprobs


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Packed rows and where each input sequence went.

    tokens, segment_ids, completion_mask: [rows, row_len]; segment_ids is 0 on padding, 1.. per sequence in a row.
    kept: indices (into the input) of the packed sequences, in input order; row, segment: [len(kept)] where each
    one sits. dropped: indices of the sequences longer than row_len, which were not packed.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    completion_mask: np.ndarray
    kept: np.ndarray
    row: np.ndarray
    segment: np.ndarray
    dropped: tuple[int, ...]
    num_inputs: int

    def stats(self) -> dict:
        """Counts for logs and results: rows, sequences packed and dropped, and the share of real tokens."""
        rows, row_len = self.tokens.shape
        return {"rows": rows, "row_len": row_len, "sequences": self.num_inputs, "packed": len(self.kept),
                "dropped": len(self.dropped), "fill": float((self.segment_ids > 0).mean()) if rows else 0.0}

    def batch(self) -> dict[str, np.ndarray]:
        """The model inputs: tokens, segment_ids, completion_mask (attention mask = segment_ids > 0)."""
        return {"tokens": self.tokens, "segment_ids": self.segment_ids, "completion_mask": self.completion_mask}


def first_fit(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, offset) of each length <= row_len under first-fit in input order (Johnson 1973's bin-packing FF), and
    the indices of the lengths that fit; longer ones get row -1."""
    row = np.full(len(lengths), -1, np.int64)
    offset = np.zeros(len(lengths), np.int64)
    used: list[int] = []
    for i, n in enumerate(lengths):
        if n > row_len:
            continue
        r = next((r for r, u in enumerate(used) if u + n <= row_len), len(used))
        if r == len(used):
            used.append(0)
        row[i], offset[i] = r, used[r]
        used[r] += n
    return row, offset, np.flatnonzero(row >= 0)


def pack_sequences(tokens, attention_mask, completion_mask, row_len: int, pad_id: int = 0,
                   what: str = "sequence") -> PackedSequences:
    """Pack the real tokens (attention_mask 1; left or right padding alike) of each row of `tokens` [n, T] into rows
    of `row_len`, first-fit in input order, carrying the completion mask along."""
    tokens, attention_mask, completion_mask = (np.asarray(x) for x in (tokens, attention_mask, completion_mask))
    if not (tokens.shape == attention_mask.shape == completion_mask.shape) or tokens.ndim != 2:
        raise ValueError(f"tokens, attention_mask and completion_mask must be [n, T] arrays of one shape, got "
                         f"{tokens.shape}, {attention_mask.shape}, {completion_mask.shape}")
    if not isinstance(row_len, int) or row_len <= 0:
        raise ValueError(f"row_len must be a positive integer, got {row_len!r}")
    attention_mask = attention_mask.astype(bool)
    if np.any(completion_mask.astype(bool) & ~attention_mask):
        bad = int(np.flatnonzero(np.any(completion_mask.astype(bool) & ~attention_mask, axis=1))[0])
        raise ValueError(f"{what} {bad}: completion_mask is 1 on a padding position (attention_mask 0)")
    lengths = attention_mask.sum(axis=1)
    row, offset, kept = first_fit(lengths, row_len)
    dropped = tuple(int(i) for i in np.flatnonzero(row < 0))
    if dropped:
        warnings.warn(f"packing: {len(dropped)} {what}(s) longer than row_len={row_len} dropped (indices "
                      f"{list(dropped[:10])}{' ...' if len(dropped) > 10 else ''}, lengths "
                      f"{[int(lengths[i]) for i in dropped[:10]]})", stacklevel=2)
    rows = int(row.max()) + 1 if len(kept) else 0
    out_tokens = np.full((rows, row_len), pad_id, tokens.dtype)
    out_segments = np.zeros((rows, row_len), np.int32)
    out_completion = np.zeros((rows, row_len), bool)
    segment = np.zeros(len(kept), np.int32)
    count = np.zeros(rows, np.int32)
    for j, i in enumerate(kept):
        r, start, n = row[i], offset[i], lengths[i]
        count[r] += 1
        segment[j] = count[r]
        real = attention_mask[i]
        out_tokens[r, start:start + n] = tokens[i][real]
        out_completion[r, start:start + n] = completion_mask[i][real].astype(bool)
        out_segments[r, start:start + n] = count[r]
    return PackedSequences(out_tokens, out_segments, out_completion, kept.astype(np.int64), row[kept], segment,
                           dropped, len(tokens))


@dataclasses.dataclass(frozen=True)
class PackedPairs:
    """Preference pairs packed: `packed` holds the chosen sequences of the kept pairs followed by their rejected
    sequences (sequence j < len(pairs) is pair pairs[j]'s chosen, j >= len(pairs) its rejected). `dropped_pairs`:
    pairs with a sequence longer than row_len (both halves are left out, so no pair is half-scored)."""

    packed: PackedSequences
    pairs: np.ndarray
    dropped_pairs: tuple[int, ...]

    def stats(self) -> dict:
        return {**self.packed.stats(), "pairs": len(self.pairs) + len(self.dropped_pairs),
                "pairs_packed": len(self.pairs), "pairs_dropped": len(self.dropped_pairs)}


def pack_pairs(batch: dict, row_len: int, pad_id: int = 0) -> PackedPairs:
    """Pack a pair batch (chosen_/rejected_ tokens, attention_mask, completion_mask, each [pairs, T], the layout
    of jaxalign.logprobs.concatenated_pairs) into rows of `row_len`; an over-long pair is dropped and reported."""
    keys = ("tokens", "attention_mask", "completion_mask")
    missing = [f"{side}_{k}" for side in ("chosen", "rejected") for k in keys if f"{side}_{k}" not in batch]
    if missing:
        raise ValueError(f"pair batch lacks {', '.join(missing)}")
    lengths = [np.asarray(batch[f"{side}_attention_mask"]).astype(bool).sum(axis=1) for side in ("chosen", "rejected")]
    fits = (lengths[0] <= row_len) & (lengths[1] <= row_len)
    pairs = np.flatnonzero(fits)
    dropped = tuple(int(i) for i in np.flatnonzero(~fits))
    if dropped:
        warnings.warn(f"packing: {len(dropped)} pair(s) with a sequence longer than row_len={row_len} dropped "
                      f"(pair indices {list(dropped[:10])}{' ...' if len(dropped) > 10 else ''})", stacklevel=2)
    arrays = [np.concatenate([np.asarray(batch[f"chosen_{k}"])[pairs], np.asarray(batch[f"rejected_{k}"])[pairs]])
              for k in keys]
    packed = pack_sequences(*arrays, row_len=row_len, pad_id=pad_id, what="sequence")
    return PackedPairs(packed, pairs, dropped)


def packed_token_logprobs(logits: jax.Array | None, tokens: jax.Array, segment_ids: jax.Array,
                          completion_mask: jax.Array, token_logps: jax.Array | None = None) -> jax.Array:
    """Per-token log-probs of a packed batch, zero outside the completion mask and at every segment's first token
    (it has no prediction inside its own sequence). `token_logps`: the unmasked per-token log-probs, when they were
    computed without logits (`chunked_token_logprobs`; pass logits=None)."""
    continues = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (1, 0)))
    keep = completion_mask.astype(bool) & continues & (segment_ids > 0)
    return jnp.where(keep, token_logprobs(logits, tokens) if token_logps is None else token_logps, 0.0)


def packed_sequence_logprobs(token_logps: jax.Array, segment_ids: jax.Array, completion_mask: jax.Array,
                             row: jax.Array, segment: jax.Array, average: bool = False) -> jax.Array:
    """[n] summed (or, with `average`, mean) log-probs of the packed sequences at (row, segment), from the output
    of `packed_token_logprobs`; as jaxalign.logprobs.sequence_logprobs on each sequence alone."""
    rows, width = segment_ids.shape
    slots = width + 1  # segment ids are < width + 1 in a row of `width` tokens
    ids = (jnp.arange(rows)[:, None] * slots + segment_ids).reshape(-1)
    totals = jax.ops.segment_sum(token_logps.reshape(-1), ids, num_segments=rows * slots)
    where = row * slots + segment
    if not average:
        return totals[where]
    continues = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (1, 0)))
    counted = (completion_mask.astype(bool) & continues & (segment_ids > 0)).astype(jnp.float32)
    counts = jax.ops.segment_sum(counted.reshape(-1), ids, num_segments=rows * slots)
    return totals[where] / jnp.maximum(counts[where], 1.0)


def packed_pair_logprobs(apply_fn, params, packed: PackedPairs, average: bool = False):
    """(chosen, rejected) per-pair sequence log-probs [len(packed.pairs)] of a packed pair batch from one forward
    pass; `apply_fn(params, tokens, segment_ids)` returns the logits (e.g. DecoderLM.apply with segment_ids=)."""
    p = packed.packed
    logits = apply_fn(params, jnp.asarray(p.tokens), jnp.asarray(p.segment_ids))
    logps = packed_token_logprobs(logits, jnp.asarray(p.tokens), jnp.asarray(p.segment_ids),
                                  jnp.asarray(p.completion_mask))
    seq = packed_sequence_logprobs(logps, jnp.asarray(p.segment_ids), jnp.asarray(p.completion_mask),
                                   jnp.asarray(p.row), jnp.asarray(p.segment), average)
    k = len(packed.pairs)
    return seq[:k], seq[k:]


# ---------------------------------------------------------------------------------------------------------------
# Packed pair batches for training (`dpo.packing`): the pairwise objective must see exactly the padded batch's
# inputs, so nothing may be dropped and every sequence's log-probs go back to its unpacked [pairs, T] slot.

PACKED_PAIR_KEYS = ("packed_tokens", "packed_segment_ids", "chosen_packed_index", "rejected_packed_index")
# A pair batch of width T packs into rows of at most ROW_FACTOR * T tokens: the smallest factor that fits any pair
# of that batch (chosen + rejected <= 2T real tokens) in one row, so no pair is ever dropped or split.
ROW_FACTOR = 2


def shape_bucket(n: int, cap: int | None = None) -> int:
    """The smallest size >= n of the form m * 2^k with m in {4, 5, 6, 7} (or n itself below 4): 1, 2, 3, 4, 5, 6,
    7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ..., at most `cap`.

    Packed shapes (rows per batch, tokens per row) go through this so that a run compiles its step for at most four
    sizes per doubling of each, while a batch pays at most a fifth of its size in padding rows or columns (powers of
    two alone waste up to half: 5 rows of need become 8, a 1,100-token row 2,048)."""
    size = n if n <= 4 else (-(-n // (step := 1 << (max(n - 1, 1).bit_length() - 3))) * step)
    return size if cap is None else min(size, cap)


def _packed_rows(count: int, cap: int, multiple: int) -> int:
    """Rows per microbatch: `count` bucketed (`shape_bucket`) but never above `cap` (the worst case, one pair per
    row), then up to a multiple of `multiple` (the devices the batch is split over)."""
    rows = shape_bucket(count, cap)
    return -(-max(rows, 1) // multiple) * multiple


def packed_row_len(pair_lengths: np.ndarray, width: int) -> int:
    """Tokens per packed row for pairs of `pair_lengths` (chosen + rejected real tokens) from a batch of width T:
    the longest pair, bucketed (`shape_bucket`), at most ROW_FACTOR * T. Rows only as long as the longest pair need
    keep attention, which costs row_len^2 per row, from growing with the padded width: on a heavy-tailed length mix
    the longest pair is often far shorter than twice the longest sequence."""
    return shape_bucket(int(np.max(pair_lengths, initial=1)), ROW_FACTOR * width)


def pack_pair_batch(batch: dict, row_len: int | None = None, microbatches: int = 1, row_multiple: int = 1,
                    pad_id: int = 0) -> dict:
    """`batch` (chosen_/rejected_ tokens, attention_mask, completion_mask, each [P, T], any padding side) plus its
    packed form, the keys `PACKED_PAIR_KEYS`:

    packed_tokens, packed_segment_ids [rows, row_len]: the pairs first-fit (in input order, Johnson 1973) into rows
        of row_len (default `packed_row_len`: the longest pair, bucketed, at most ROW_FACTOR * T) as units: a
        pair's chosen segment is directly followed by its rejected one in the same row (segment ids 2k+1 and 2k+2
        for the row's k-th pair; 0 is padding), so a pair is never split.
    chosen_packed_index, rejected_packed_index [P, T]: for every unpacked token, the flat index (row * row_len +
        column, within its microbatch) of the same token in the packed rows, -1 on padding.

    With `microbatches` M > 1 each microbatch (pairs m, m + M, ..., the rows `train.step._split_microbatches` takes)
    is packed on its own into the same number of rows, and its row i stored at global row i * M + m, so that the
    step's split hands every microbatch exactly its own rows and indices. A pair longer than row_len is an error:
    a packed step must score the same pairs as the padded one."""
    keys = ("tokens", "attention_mask", "completion_mask")
    missing = [f"{side}_{k}" for side in ("chosen", "rejected") for k in keys if f"{side}_{k}" not in batch]
    if missing:
        raise ValueError(f"pair batch lacks {', '.join(missing)}")
    tokens = [np.asarray(batch[f"{side}_tokens"]) for side in ("chosen", "rejected")]
    masks = [np.asarray(batch[f"{side}_attention_mask"]).astype(bool) for side in ("chosen", "rejected")]
    pairs, width = tokens[0].shape
    if pairs % microbatches:
        raise ValueError(f"{pairs} pairs do not split into {microbatches} microbatches")
    lengths = [m.sum(axis=1) for m in masks]
    total = lengths[0] + lengths[1]
    row_len = packed_row_len(total, width) if row_len is None else row_len
    if np.any(total > row_len):
        bad = int(np.flatnonzero(total > row_len)[0])
        raise ValueError(f"pair {bad} has {int(total[bad])} tokens, more than a packed row's {row_len}")
    placements = [first_fit(total[m::microbatches], row_len) for m in range(microbatches)]
    rows_mb = _packed_rows(max(int(p[0].max()) + 1 for p in placements), pairs // microbatches, row_multiple)
    out_tokens = np.full((rows_mb * microbatches, row_len), pad_id, tokens[0].dtype)
    out_segments = np.zeros((rows_mb * microbatches, row_len), np.int32)
    index = [np.full((pairs, width), -1, np.int32) for _ in range(2)]
    for m, (row, offset, _) in enumerate(placements):
        in_row = np.zeros(rows_mb, np.int32)
        for j, i in enumerate(range(m, pairs, microbatches)):
            r, start = int(row[j]), int(offset[j])
            for side in range(2):
                n = int(lengths[side][i])
                in_row[r] += 1
                out_tokens[r * microbatches + m, start:start + n] = tokens[side][i][masks[side][i]]
                out_segments[r * microbatches + m, start:start + n] = in_row[r]
                index[side][i][masks[side][i]] = r * row_len + start + np.arange(n)
                start += n
    return {**batch, "packed_tokens": out_tokens, "packed_segment_ids": out_segments,
            "chosen_packed_index": index[0], "rejected_packed_index": index[1]}


def unpack_token_logprobs(packed_logps: jax.Array, index: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """Per-token log-probs [P, T] in the unpacked layout from packed ones [rows, row_len] (`packed_token_logprobs`
    without its mask: pass completion_mask ones) and an index of `pack_pair_batch`; zero outside the completion."""
    flat = packed_logps.reshape(-1)
    picked = flat[jnp.clip(index, 0, flat.shape[0] - 1)]
    return jnp.where(completion_mask.astype(bool) & (index >= 0), picked, 0.0)


@dataclasses.dataclass(frozen=True)
class PackedPairDataset:
    """A pair dataset (ArrayDataset or BucketedDataset) whose batches carry their packed form (`pack_pair_batch`),
    for `dpo.packing`. Batches are drawn by the wrapped dataset unchanged (same pairs, same order, same resume
    position); only the packed keys are added. One process only: processes would pack into different row counts."""

    data: object
    microbatches: int = 1
    row_multiple: int = 1

    @property
    def arrays(self) -> dict:
        return self.data.arrays

    def __len__(self) -> int:
        return len(self.data)

    def batch_at(self, position, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        if process_count != 1:
            raise ValueError(f"dpo.packing packs each batch on one process; this run loads its batch on "
                             f"{process_count} processes: set dpo.packing=false")
        batch, position = batch_at(self.data, position, batch_size, seed, process_index, process_count)
        return pack_pair_batch(batch, microbatches=self.microbatches, row_multiple=self.row_multiple), position
