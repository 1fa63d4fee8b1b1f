"""Jitted autoregressive sampling with a key/value cache: temperature, top-k, top-p, greedy, EOS and stop sequences.

Prompts of different lengths are left-padded to a common width so every row's next token is written at the same
cache slot; rotary positions count real tokens only, so padding does not change what a row sees. Decoding stops
as soon as every row has finished (EOS or a stop sequence), not after max_new_tokens steps. `generate` is compiled
once per input shape: `bucket_prompts` / `generate_bucketed` round the prompt width (and optionally the batch) up to a
bucket, so that calls with different prompt widths share one compilation.

Logits are processed in the order Hugging Face's `generate` applies its warpers (transformers'
`GenerationMixin._get_logits_processor`): temperature, then top-k, then top-p (nucleus, Holtzman et al. 2020,
section 3.1), each on what the previous one left. `generate` runs on one device (or wherever its inputs live);
`generate_sharded` runs the same decode loop under a mesh with the batch split over its data axes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.losses.iterative import extrapolate_logits
from jaxalign.models.llama import DecoderLM, ModelConfig, check_model_fits_mesh, init_cache, init_params
from jaxalign.sharding import (
    BATCH_AXES,
    LOGICAL_AXIS_RULES,
    batch_sharding,
    check_batch_fits_mesh,
    logical_shardings,
    put_batch,
    replicated,
)

# Fills the stop-matching window before a row has generated anything: token ids are >= 0, so a stop sequence can
# never match prompt tokens or padding.
_NO_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How `generate` decodes.

    temperature 0 means greedy decoding (top_k and top_p are then irrelevant: the argmax survives both).
    top_k 0 means no top-k truncation; top_k above the vocabulary keeps everything.
    top_p 1.0 means no nucleus truncation; otherwise the smallest set of most likely tokens whose probability
        reaches top_p is kept (the token that crosses top_p is kept, and so is the most likely token).
    stop: token-id sequences; a row finishes as soon as its *generated* tokens end with one of them (prompt tokens
        never count). Lists are accepted and stored as tuples (the config is a static jit argument and must hash).
        `encode_stop_strings` turns strings into this form.
    keep_stop: True keeps the stop sequence in the completion (mask 1, like EOS); False cuts it (pad, mask 0).
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[tuple[int, ...], ...] = ()
    keep_stop: bool = True

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"sampling.max_new_tokens must be positive, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.keep_stop, bool):
            raise ValueError(f"sampling.keep_stop must be True or False, got {self.keep_stop!r}")
        object.__setattr__(self, "stop", _normalise_stop(self.stop))


def _normalise_stop(stop) -> tuple[tuple[int, ...], ...]:
    """`stop` as a tuple of non-empty tuples of non-negative ints, or one error naming the offending entry."""
    if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable):
        raise ValueError(f"sampling.stop must be a sequence of token-id sequences (use encode_stop_strings for "
                         f"strings), got {stop!r}")
    out = []
    for i, seq in enumerate(stop):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Iterable):
            raise ValueError(f"sampling.stop[{i}] must be a sequence of token ids (use encode_stop_strings for "
                             f"strings), got {seq!r}")
        seq = tuple(seq)
        if not seq:
            raise ValueError(f"sampling.stop[{i}] is empty; every stop sequence needs at least one token id")
        bad = [t for t in seq if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0]
        if bad:
            raise ValueError(f"sampling.stop[{i}] must hold non-negative integer token ids, got {bad[0]!r} in {seq!r}")
        out.append(tuple(int(t) for t in seq))
    return tuple(out)


def encode_stop_strings(strings: Iterable[str], tokenizer) -> tuple[tuple[int, ...], ...]:
    """Token-id stop sequences for `SamplingConfig.stop` from strings, with `tokenizer.encode` (which must not add
    special tokens: `CharTokenizer` and `data.tokenize.TextTokenizer` do not).

    Matching is on token ids, so this is exact for a character tokenizer; with a subword tokenizer a string that
    the model writes with a different segmentation (e.g. merged with the token before it) is not caught.
    """
    if isinstance(strings, str):
        raise ValueError(f"encode_stop_strings expects a list of strings, got the single string {strings!r}")
    out = []
    for text in strings:
        if not isinstance(text, str) or not text:
            raise ValueError(f"stop strings must be non-empty strings, got {text!r}")
        ids = tuple(tokenizer.encode(text))
        if not ids:
            raise ValueError(f"stop string {text!r} encodes to no tokens")
        out.append(ids)
    return _normalise_stop(out)


# ---------------------------------------------------------------------------------------------------------------
# Logit processing: each a pure function of [..., V] logits, in the order `sample_token` applies them.


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """-inf outside the top_k largest logits (transformers' TopKLogitsWarper: logits tied with the k-th largest are
    kept too, so ties never make the result depend on sort order). top_k 0 or >= V is a no-op."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering (Holtzman et al. 2020, section 3.1): keep the most likely tokens until their softmax mass
    reaches top_p, the token that crosses top_p included; -inf elsewhere.

    As transformers' TopPLogitsWarper (min_tokens_to_keep=1): a token is kept iff the probability mass of the
    tokens ranked above it is < top_p, so the most likely token always survives. Tokens tied with the crossing
    token are all kept (HF keeps whichever its unstable sort puts first), so the result does not depend on sort
    order. top_p = 1 returns the logits unchanged (the mass test would round tiny tails away in float32).
    """
    if top_p >= 1.0:
        return logits
    ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    # mass_above is non-decreasing, so the kept tokens are a prefix: its length is the count below top_p (>= 1).
    count = jnp.sum(mass_above < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def process_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Temperature, top-k, then top-p, as Hugging Face orders its warpers. temperature must be > 0."""
    return top_p_filter(top_k_filter(logits / temperature, top_k), top_p)


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float = 1.0) -> jax.Array:
    """One token per row: argmax at temperature 0, else a draw from softmax of `process_logits`."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(rng, process_logits(logits, temperature, top_k, top_p), axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Stop sequences.


def stop_table(stop: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [S, L], lengths [S]): the stop sequences right-aligned in a width-L table (L = the longest), so that
    one comparison against a row's last L generated tokens tests all of them. Left padding is _NO_TOKEN and is
    ignored through `lengths`."""
    width = max(len(s) for s in stop)
    ids = np.full((len(stop), width), _NO_TOKEN, np.int32)
    for i, seq in enumerate(stop):
        ids[i, width - len(seq):] = seq
    return ids, np.array([len(s) for s in stop], np.int32)


def match_stop(window: jax.Array, ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """Length of the longest stop sequence that the [B, L] window of last generated tokens ends with; 0 if none.

    The longest, so that cutting (keep_stop=False) removes every stop sequence ending at this token (with stops
    "b" and "ab", "xab" is cut to "x", not "xa").
    """
    width = ids.shape[1]
    relevant = jnp.arange(width)[None, :] >= width - lengths[:, None]  # [S, L]
    hits = jnp.all((window[:, None, :] == ids[None]) | ~relevant[None], axis=-1)  # [B, S]
    return jnp.max(jnp.where(hits, lengths[None], 0), axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# The decode loop.


def _decode(params, prompt_tokens, prompt_mask, rng, cfg: ModelConfig, sampling: SamplingConfig, eos_id: int,
            pad_id: int, num_tokens: int | None, constrain_cache: Callable[[Any], Any] = lambda cache: cache,
            previous_params=None, alpha=0.0):
    """The traced body of `generate`, `generate_sharded` and `generate_extrapolated` (see `generate` for the
    contract). With `previous_params`, a second model decodes the same tokens with its own cache and every
    next-token distribution is drawn from the extrapolated logits (1 + alpha) l - alpha l_previous."""
    model = DecoderLM(cfg)
    batch, prompt_len = prompt_tokens.shape
    steps = sampling.max_new_tokens
    models = (params,) if previous_params is None else (params, previous_params)
    prompt_mask = prompt_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    caches, logits = [], []
    for p in models:
        out, cache = model.apply({"params": p}, prompt_tokens, prompt_mask, positions,
                                 constrain_cache(init_cache(cfg, batch, prompt_len + steps)))
        caches.append(cache)
        logits.append(out[:, -1])
    next_position = jnp.sum(prompt_mask, axis=-1)

    def combined(last_logits):
        if previous_params is None:
            return last_logits[0]
        return extrapolate_logits(last_logits[0], last_logits[1], alpha)

    vocab = jnp.arange(cfg.vocab_size)
    banned = (vocab == pad_id) | (vocab >= (num_tokens or cfg.vocab_size))
    if sampling.stop:
        stop_ids, stop_lengths = (jnp.asarray(a) for a in stop_table(sampling.stop))
        window = jnp.full((batch, stop_ids.shape[1]), _NO_TOKEN, jnp.int32)
    else:  # nothing to match: a zero-width window keeps one code path
        window = jnp.zeros((batch, 0), jnp.int32)

    def body(carry, step_rng):
        caches, last_logits, position, done, window, cut_from = carry
        step = position - next_position  # index of this token in the completion, the same for every row
        next_logits = jnp.where(banned, -jnp.inf, combined(last_logits))
        token = sample_token(next_logits, step_rng, sampling.temperature, sampling.top_k, sampling.top_p)
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        alive = ~done
        stepped = [model.apply({"params": p}, token[:, None], alive[:, None], position[:, None], c)
                   for p, c in zip(models, caches)]
        last_logits = tuple(out[:, -1] for out, _ in stepped)
        caches = tuple(c for _, c in stepped)
        finished = token == eos_id
        if sampling.stop:
            window = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
            matched = jnp.where(alive, match_stop(window, stop_ids, stop_lengths), 0)
            finished = finished | (matched > 0)
            if not sampling.keep_stop:
                cut_from = jnp.where(matched > 0, step - matched + 1, cut_from)
        done = done | finished
        return (caches, last_logits, position + 1, done, window, cut_from), (token, alive)

    init = (tuple(caches), tuple(logits), next_position, jnp.zeros((batch,), bool), window,
            jnp.full((batch,), steps))
    keys = jax.random.split(rng, steps)

    # A while loop rather than a scan: decoding stops as soon as every row has finished (EOS or a stop sequence),
    # instead of running max_new_tokens steps of padding. Step i uses keys[i] either way, and the slots never
    # reached hold what a finished row would have produced (pad, mask 0), so the result is the scan's exactly.
    def unfinished(state):
        i, carry, _, _ = state
        return (i < steps) & ~jnp.all(carry[3])

    def one_step(state):
        i, carry, tokens, alive = state
        carry, (token, row_alive) = body(carry, keys[i])
        return i + 1, carry, tokens.at[i].set(token), alive.at[i].set(row_alive)

    _, (*_, cut_from), tokens, mask = jax.lax.while_loop(
        unfinished, one_step, (jnp.zeros((), jnp.int32), init, jnp.full((steps, batch), pad_id, jnp.int32),
                               jnp.zeros((steps, batch), bool)))
    tokens, mask = tokens.T, mask.T
    if sampling.stop and not sampling.keep_stop:
        mask = mask & (jnp.arange(steps)[None, :] < cut_from[:, None])
        tokens = jnp.where(mask, tokens, pad_id)
    return tokens, mask.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_id", "pad_id", "num_tokens"))
def generate(params, prompt_tokens, prompt_mask, rng, *, cfg: ModelConfig, sampling: SamplingConfig, eos_id: int,
             pad_id: int, num_tokens: int | None = None):
    """Sample completions for left-padded prompts [B, P].

    Only ids below `num_tokens` (the tokenizer's vocabulary; the model's may be padded for sharding) other than
    `pad_id` can be drawn.

    Returns (tokens [B, max_new_tokens], mask [B, max_new_tokens]). A row finishes at its first EOS or as soon as
    its generated tokens end with one of `sampling.stop`; the mask is 1 up to and including that token (with
    `keep_stop=False`, up to the token before the stop sequence) and tokens where the mask is 0 are `pad_id`.
    """
    return _decode(params, prompt_tokens, prompt_mask, rng, cfg, sampling, eos_id, pad_id, num_tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_id", "pad_id", "num_tokens"))
def _generate_extrapolated(params, previous_params, alpha, prompt_tokens, prompt_mask, rng, *, cfg, sampling,
                           eos_id, pad_id, num_tokens):
    return _decode(params, prompt_tokens, prompt_mask, rng, cfg, sampling, eos_id, pad_id, num_tokens,
                   previous_params=previous_params, alpha=alpha)


def generate_extrapolated(params, previous_params, alpha, prompt_tokens, prompt_mask, rng, *, cfg: ModelConfig,
                          sampling: SamplingConfig, eos_id: int, pad_id: int, num_tokens: int | None = None):
    """`generate` from APO's token-level extrapolated policy: every next token is drawn from
    softmax((1 + alpha) l_t - alpha l_prev) of the two models' logits on the same prefix (He et al. 2024,
    "Accelerated Preference Optimization"; `jaxalign.losses.iterative.extrapolate_logits`), each model with its own
    KV cache, then temperature / top-k / top-p as in `generate`. alpha = 0 draws the same tokens as
    `generate(params, ...)` with the same key. `alpha` is traced (one compilation for every value), checked here."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"generate_extrapolated: alpha must be a number in [0, 1) (Nesterov momentum), got "
                         f"{alpha!r}")
    return _generate_extrapolated(params, previous_params, jnp.float32(alpha), prompt_tokens, prompt_mask, rng,
                                  cfg=cfg, sampling=sampling, eos_id=eos_id, pad_id=pad_id, num_tokens=num_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Bucketed prompt shapes: one compilation for many calls.


def _bucketed(size: int, bucket: int) -> int:
    """`size` rounded up to a multiple of `bucket`."""
    return -(-size // bucket) * bucket


def bucket_prompts(prompt_tokens, prompt_mask, pad_id: int, width_bucket: int,
                   row_bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [B, P] widened to [B', P'] for `generate`: P' is P rounded up to a multiple of
    `width_bucket` and B' is B rounded up to a multiple of `row_bucket`, so calls whose prompt batches differ in
    width (or size) within a bucket share one compiled `generate` (it is specialised on the input shapes).

    Columns are added on the left as padding (`pad_id`, mask 0): rotary positions count real tokens only and padded
    keys are masked, so every row decodes as it did at width P (up to float rounding of the longer attention sums;
    the greedy tokens are the same), and the random draws, shaped [B, vocab], are unchanged. Extra rows are copies of
    the last real row rather than empty prompts, so that they finish when a real row does (greedy: with it) and
    never keep the early-stopping decode loop running on their own; drop them from the output (`[:B]`). With
    jax's default `jax_threefry_partitionable` draws, appending rows leaves the real rows' draws unchanged too.

    Host arrays in, NumPy arrays out (this runs before the jitted call); `generate_bucketed` wraps it around
    `generate`, and `generate_sharded` / `generate_extrapolated` accept its output alike.
    """
    tokens, mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"bucket_prompts: prompt tokens and mask must be [batch, width] arrays of one shape, got "
                         f"{tokens.shape} and {mask.shape}")
    for name, value in (("width_bucket", width_bucket), ("row_bucket", row_bucket)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"bucket_prompts: {name} must be an integer >= 1, got {value!r}")
    batch, width = tokens.shape
    if batch == 0:
        raise ValueError("bucket_prompts: the prompt batch is empty (extra rows copy a real one)")
    extra_cols = _bucketed(width, width_bucket) - width
    extra_rows = _bucketed(batch, row_bucket) - batch
    tokens = np.pad(tokens, ((0, 0), (extra_cols, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (extra_cols, 0)), constant_values=0)
    if extra_rows:
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], extra_rows, axis=0)])
        mask = np.concatenate([mask, np.repeat(mask[-1:], extra_rows, axis=0)])
    return tokens, mask


def generate_bucketed(params, prompt_tokens, prompt_mask, rng, *, width_bucket: int, row_bucket: int = 1,
                      cfg: ModelConfig, sampling: SamplingConfig, eos_id: int, pad_id: int,
                      num_tokens: int | None = None):
    """`generate` on `bucket_prompts(prompt_tokens, prompt_mask, pad_id, width_bucket, row_bucket)`, returning the
    original B rows only: (tokens [B, max_new_tokens], mask [B, max_new_tokens]). A caller whose prompt widths vary
    from call to call (the longest prompt of each batch, a prefix that grows) compiles once per bucket instead of
    once per width, at the cost of up to width_bucket - 1 padding columns in the prompt pass and the cache."""
    batch = np.shape(prompt_tokens)[0]
    tokens, mask = bucket_prompts(prompt_tokens, prompt_mask, pad_id, width_bucket, row_bucket)
    out, out_mask = generate(params, tokens, mask, rng, cfg=cfg, sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                             num_tokens=num_tokens)
    if tokens.shape[0] == batch:
        return out, out_mask
    return out[:batch], out_mask[:batch]


# ---------------------------------------------------------------------------------------------------------------
# Sharded decoding.


def _cache_shardings(cache, mesh: Mesh, scan_layers: bool):
    """Batch-sharded key/value/valid buffers (over the mesh's batch axes), replicated write index."""
    lead = (None,) if scan_layers else ()  # scanned layers stack the cache on a leading layer axis

    def spec(leaf):
        return NamedSharding(mesh, P() if leaf.ndim == len(lead) else P(*lead, BATCH_AXES))

    return jax.tree_util.tree_map(spec, cache)


@functools.lru_cache(maxsize=32)
def _sharded_generate(mesh: Mesh, cfg: ModelConfig, sampling: SamplingConfig, eos_id: int, pad_id: int,
                      num_tokens: int | None):
    """(jitted decode with declared in/out shardings, parameter shardings); cached so repeated calls with the same
    mesh and static arguments reuse one compiled function."""
    param_shardings = logical_shardings(jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0)), mesh)
    rows = batch_sharding(mesh)

    def constrain(cache):
        return jax.lax.with_sharding_constraint(cache, _cache_shardings(cache, mesh, cfg.scan_layers))

    def run(params, prompt_tokens, prompt_mask, rng):
        # The model's logical constraints (activations split over the batch axes) need the rules while tracing.
        with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            return _decode(params, prompt_tokens, prompt_mask, rng, cfg, sampling, eos_id, pad_id, num_tokens,
                           constrain)

    jitted = jax.jit(run, in_shardings=(param_shardings, rows, rows, replicated(mesh)), out_shardings=(rows, rows))
    return jitted, param_shardings


def generate_sharded(params, prompt_tokens, prompt_mask, rng, *, mesh: Mesh, cfg: ModelConfig,
                     sampling: SamplingConfig, eos_id: int, pad_id: int, num_tokens: int | None = None):
    """`generate` under `mesh`: prompts (host arrays, this process's rows) are split over the mesh's batch axes
    (data x fsdp, `sharding.put_batch`), parameters are placed as the logical rules declare (a no-op when they
    already are, e.g. a training state's), and the key/value cache is batch-sharded, so each device decodes its own
    rows. Same tokens as `generate` on one device (the random draws are sharding-invariant).

    Returns global (tokens, mask) arrays sharded over the batch axes.
    """
    check_model_fits_mesh(cfg, mesh)
    if jax.process_count() == 1:  # several processes: put_batch checks each one's block against the mesh
        check_batch_fits_mesh(int(np.shape(prompt_tokens)[0]), mesh, "prompt batch")
    jitted, param_shardings = _sharded_generate(mesh, cfg, sampling, eos_id, pad_id, num_tokens)
    placed = put_batch({"tokens": prompt_tokens, "mask": prompt_mask}, mesh)
    params = jax.device_put(params, param_shardings)
    rng = jax.device_put(rng, replicated(mesh))
    with jax.set_mesh(mesh):
        return jitted(params, placed["tokens"], placed["mask"], rng)

