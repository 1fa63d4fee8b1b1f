"""A Llama-family decoder-only language model in flax.linen.

Pure-functional: `model.init(rng, tokens)` gives the parameters, `model.apply(params, tokens, ...)` the logits.
Architecture as in LLaMA (Touvron et al., 2023): pre-norm blocks with RMSNorm (Zhang & Sennrich, 2019), rotary
position embeddings (Su et al., 2021, eq. 34), grouped-query attention (Ainslie et al., 2023) and a SwiGLU MLP
(Shazeer, 2020, eq. 6), optionally tied input/output embeddings.

Switches in `ModelConfig` (each off by default, so the default model is exactly the Llama decoder above) cover the
other families `jaxalign.models.hf` converts: query/key/value biases (Qwen2), an output-projection bias (Llama's
`attention_bias`), RMSNorm scaled by (1 + weight) and embeddings scaled by sqrt(d_model) (Gemma), a GeGLU MLP with
the tanh-approximated GELU (Gemma; Shazeer 2020, eq. 5) and a sliding attention window (Mistral; Jiang et al. 2023,
section 2). Further switches, also off by default, cover rotary scaling (`rope_type`: linear position
interpolation, dynamic NTK, YaRN and Llama 3's frequency-dependent scaling, see `jaxalign.models.rope`),
per-head RMSNorm of queries and keys (Qwen3, Gemma 3), Gemma 2's attention and final logit soft-capping,
`query_pre_attn_scalar` and post-attention/post-MLP ("sandwich") norms, per-layer attention types (`layer_types`:
sliding-window and full layers mixed, as in Gemma 2/3 and Qwen2) and a separate rotary base for the sliding layers
(Gemma 3). `DecoderLM.__call__` also takes `segment_ids` for packed rows: attention stays inside a segment and
positions restart at each one.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `jaxalign.sharding` maps them to mesh
axes with one rules table, and `check_model_fits_mesh` says which config field a mesh cannot split evenly.
Parameters are stored in `param_dtype` (fp32) and matmuls run in `dtype` (bf16 or fp32); logits are always
returned in fp32 so that log-softmax is computed at full precision.

Decoding uses an explicit key/value cache pytree passed in and returned (no mutable collections), see
`init_cache` and `jaxalign.sampling`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxalign.models.rope import (base_frequencies, dynamic_ntk_frequencies, llama3_frequencies,
                                  scaled_rotary_embedding, yarn_frequencies)
from jaxalign.sharding import LOGICAL_AXIS_RULES
from jaxalign.validation import FieldError, check_choice, check_positive, check_positive_int

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Gate activations of the gated MLP. "gelu_tanh" is the tanh approximation of GELU (Hendrycks & Gimpel, 2016,
# section 2), which is what Hugging Face's "gelu_pytorch_tanh" computes.
ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and numerics of the decoder. `dtype` is the compute dtype; parameters are always float32."""

    vocab_size: int = 16  # rows of the embedding table (may exceed the tokenizer's vocabulary)
    d_model: int = 128  # width of the residual stream
    n_layers: int = 2  # decoder blocks
    n_heads: int = 4  # query heads per attention layer
    n_kv_heads: int = 2  # key/value heads (grouped-query attention: n_heads must be a multiple)
    head_dim: int = 32  # width of each attention head
    mlp_dim: int = 344  # hidden width of the gated MLP
    max_len: int = 64  # the longest sequence (prompt + completion) the model is run on
    rope_theta: float = 10_000.0  # rotary base (RoFormer, Su et al. 2021)
    norm_eps: float = 1e-6  # epsilon of every RMSNorm
    tie_embeddings: bool = True  # the output layer reuses the embedding table
    dtype: str = "float32"  # compute dtype ("float32" or "bfloat16"); parameters stay float32
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, more compute)
    scan_layers: bool = False  # one scanned block instead of n_layers unrolled ones (faster compiles)
    # Family switches (jaxalign.models.hf); the defaults are the plain Llama decoder.
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2; Llama's attention_bias)
    out_bias: bool = False  # bias on the attention output projection (Llama's attention_bias)
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + scale), scale initialised to 0 (Gemma)
    embed_scale: bool = False  # token embeddings multiplied by sqrt(d_model) (Gemma; not the tied output layer)
    activation: str = "silu"  # gate activation of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    sliding_window: int | None = None  # a query attends to keys at most sliding_window - 1 positions back (Mistral)
    # Rotary scaling (see rope_inverse_frequencies); "default" is the unscaled RoFormer rotation.
    rope_type: str = "default"  # "default", "linear", "dynamic", "yarn" or "llama3"
    rope_factor: float = 1.0  # the context-extension factor s of every scaled type
    rope_original_max_len: int | None = None  # pre-training context length L (llama3, yarn, dynamic)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above L / low_freq_factor are divided by s
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below L / high_freq_factor are kept
    rope_beta_fast: float = 32.0  # yarn: rotations above which a dimension is kept (Peng et al. 2023, section 3.2)
    rope_beta_slow: float = 1.0  # yarn: rotations below which a dimension is interpolated
    rope_truncate: bool = True  # yarn: round the ramp's bounds outward to whole dimensions
    rope_attention_factor: float = 1.0  # yarn: cos/sin multiplied by this (YaRN's sqrt(1/t), section 3.4)
    rope_local_theta: float | None = None  # unscaled rotary base of the sliding-window layers (Gemma 3)
    qk_norm: bool = False  # RMSNorm over head_dim of every query and key head before the rotation (Qwen3, Gemma 3)
    attn_logit_softcap: float | None = None  # attention scores c * tanh(s / c) (Gemma 2)
    final_logit_softcap: float | None = None  # logits c * tanh(z / c) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 instead of head_dim ** -0.5 (Gemma 2/3)
    sandwich_norms: bool = False  # RMSNorm also on the attention and MLP outputs, before the residual add (Gemma 2/3)
    # Per-layer "sliding_attention" / "full_attention"; None: every layer windowed iff sliding_window is set.
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "max_len"):
            check_positive_int("model", name, getattr(self, name))
        check_positive("model", "rope_theta", self.rope_theta)
        check_positive("model", "norm_eps", self.norm_eps)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each key/value head among n_heads/n_kv_heads query heads)"
            )
        if self.head_dim % 2:
            raise FieldError("model", "head_dim", self.head_dim, "even for rotary embeddings")
        check_choice("model", "dtype", self.dtype, sorted(DTYPES))
        check_choice("model", "activation", self.activation, sorted(ACTIVATIONS))
        if self.sliding_window is not None:
            check_positive_int("model", "sliding_window", self.sliding_window)
        self._check_extensions()

    def _check_extensions(self):
        check_choice("model", "rope_type", self.rope_type, list(ROPE_TYPES))
        check_positive("model", "rope_factor", self.rope_factor)
        if self.rope_type in ("llama3", "yarn", "dynamic") and self.rope_original_max_len is None:
            raise FieldError("model", "rope_original_max_len", None, f"set for rope_type={self.rope_type!r}")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise FieldError("model", "rope_high_freq_factor", self.rope_high_freq_factor,
                             f"greater than model.rope_low_freq_factor={self.rope_low_freq_factor}")
        for name in ("rope_local_theta", "attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            if getattr(self, name) is not None:
                check_positive("model", name, getattr(self, name))
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", types)  # a JSON list read back stays hashable
            if len(types) != self.n_layers or not set(types) <= set(LAYER_TYPES):
                raise FieldError("model", "layer_types", list(types),
                                 f"a list of model.n_layers={self.n_layers} entries from {list(LAYER_TYPES)}")
            if "sliding_attention" in types and self.sliding_window is None:
                raise FieldError("model", "layer_types", list(types), "all 'full_attention' without sliding_window")
            if self.scan_layers and len(set(types)) > 1:
                raise FieldError("model", "scan_layers", True,
                                 "false when model.layer_types mixes sliding and full layers (scanned layers are "
                                 "alike)")

    def windowed(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def _dense_init(fan_in: int):
    return nn.initializers.normal(stddev=fan_in**-0.5)


class HeadProjection(nn.Module):
    """x W (+ b) with the head axes kept in the kernel: the q/k/v projections (kernel [embed, heads, head_dim],
    `contracted=1`) and the output projection (kernel [heads, head_dim, embed], `contracted=2`).

    The same parameters, initial values and arithmetic as `nn.DenseGeneral` (the kernel drawn flat as [in, out] and
    reshaped, then promoted to `dtype` and contracted by one `dot_general`). DenseGeneral itself cannot be used: it
    applies the kernel's logical sharding (three names) to the flat rank-2 draw, which fails as soon as a mesh is
    set with `jax.set_mesh` (flax 0.12); here the names are attached to the reshaped kernel.
    """

    features: tuple[int, ...]
    contracted: int
    kernel_axes: tuple[str, ...]
    fan_in: int
    use_bias: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.contracted:]

        def kernel_init(key, shape, dtype=jnp.float32):
            flat = (math.prod(in_shape), math.prod(self.features))
            return _dense_init(self.fan_in)(key, flat, dtype).reshape(shape)

        kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init, self.kernel_axes),
                            in_shape + self.features, jnp.float32)
        bias = (self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                self.kernel_axes[self.contracted:]),
                           self.features, jnp.float32) if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        x_axes = tuple(range(x.ndim - self.contracted, x.ndim))
        out = jax.lax.dot_general(x, kernel, ((x_axes, tuple(range(self.contracted))), ((), ())))
        return out if bias is None else out + bias


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019, eq. 4): x / rms(x) * g, computed in fp32.

    With `unit_offset` the gain is (1 + g) with g initialised to 0, as Gemma's RMSNorm stores it (transformers'
    modeling_gemma.GemmaRMSNorm: the product is taken in fp32 and only then cast).
    """

    eps: float
    dtype: Any
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        gain = 1.0 + scale.astype(jnp.float32) if self.unit_offset else scale
        return (normed * gain).astype(self.dtype)


def flatten_tokens(x: jax.Array) -> jax.Array:
    """[batch, time, features] -> [batch * time, features], for the dense projections.

    A projection of the 3-D activations has a backward pass whose weight gradient contracts two axes (batch and
    time); XLA:CPU then canonicalises it by transposing the [batch, time, features] gradient into a
    [features, batch * time] copy inside the elementwise fusion that produces it (for the MLP, the SwiGLU backward),
    which costs more than the matmul itself. On the flattened tokens the weight gradient contracts one leading axis
    and needs no copy (the copy showed in `jaxalign bench step-profile`'s trace; README, Performance). The reshape
    is free (a bitcast) and sharding-neutral (batch stays the major axis).
    """
    return x.reshape((-1,) + x.shape[2:])


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs of channels by position-dependent angles (RoFormer, Su et al. 2021, eq. 34).

    x: [batch, time, heads, head_dim]; positions: [batch, time]. Uses the half-split pairing of the Llama reference
    implementation (channel i pairs with i + head_dim/2), so converted Hugging Face checkpoints match.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig, positions: jax.Array, windowed: bool = False):
    """(inverse frequencies [head_dim/2] or None for the plain `rotary_embedding`, attention factor) of a layer."""
    dim = cfg.head_dim
    if windowed and cfg.rope_local_theta is not None:
        return jnp.asarray(base_frequencies(cfg.rope_local_theta, dim), jnp.float32), 1.0
    if cfg.rope_type == "default":
        return None, 1.0
    if cfg.rope_type == "linear":  # position interpolation (Chen et al. 2023): position m -> m / s
        inv = base_frequencies(cfg.rope_theta, dim) / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        inv = llama3_frequencies(cfg.rope_theta, dim, cfg.rope_factor, cfg.rope_low_freq_factor,
                                 cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    elif cfg.rope_type == "yarn":
        inv = yarn_frequencies(cfg.rope_theta, dim, cfg.rope_factor, cfg.rope_original_max_len, cfg.rope_beta_fast,
                               cfg.rope_beta_slow, cfg.rope_truncate)
    else:
        return dynamic_ntk_frequencies(cfg.rope_theta, dim, cfg.rope_factor, cfg.rope_original_max_len,
                                       positions), 1.0
    return jnp.asarray(inv, jnp.float32), cfg.rope_attention_factor


def sliding_window_mask(query_positions: jax.Array, key_positions: jax.Array, window: int) -> jax.Array:
    """[b, q, k] True where the key is fewer than `window` positions behind the query (Mistral's sliding window,
    Jiang et al. 2023, section 2; transformers' masking_utils.sliding_window_overlay: kv_idx > q_idx - window).
    Combined with the causal mask, each query sees itself and the window - 1 tokens before it."""
    return (query_positions[:, :, None] - key_positions[:, None, :]) < window


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 at the first token of every segment of a packed row: t - start(segment of t).

    A segment starts where the id differs from the previous token's (so two adjacent sequences need different ids).
    """
    time = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=-1)
    start_index = jax.lax.cummax(jnp.where(starts, time, 0), axis=1)
    return (time - start_index).astype(jnp.int32)


def attention_probabilities(scores: jax.Array, allowed: jax.Array, cfg: ModelConfig) -> jax.Array:
    """softmax over keys of the scaled (and, for Gemma 2, soft-capped) scores, in fp32, where `allowed`
    (broadcast against the scores) is True; the compute dtype out."""
    scores = scores.astype(jnp.float32)
    if cfg.query_pre_attn_scalar is None:
        scores = scores * cfg.head_dim**-0.5
    else:
        scores = scores * cfg.query_pre_attn_scalar**-0.5
    if cfg.attn_logit_softcap is not None:  # Gemma 2: c * tanh(s / c), before the mask
        scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)


def causal_query_blocks(time: int, max_blocks: int = 4) -> list[tuple[int, int]]:
    """[start, end) query blocks of a causal attention: up to `max_blocks` of at least 32 positions each."""
    blocks = min(max_blocks, max(1, time // 32))
    bounds = [round(i * time / blocks) for i in range(blocks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def head_major_attention(q: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array,
                         cfg: ModelConfig, max_blocks: int = 4) -> jax.Array:
    """Causal attention over a whole sequence (training, scoring, prefill without a cache) in the [batch, heads,
    time, head_dim] layout, each key/value head repeated for its n_heads / n_kv_heads query heads (query head j
    reads key/value head j // groups, as in `grouped_attention`).

    q [b, t, n_heads, d], keys/values [b, t, n_kv_heads, d], allowed [b, t, t] (causal: no query sees a later
    index) -> [b, t, n_heads, d]. The queries go in up to `max_blocks` blocks (`causal_query_blocks`) and each block
    scores only the keys up to its own end, so the masked upper triangle is mostly never computed (with four
    blocks, 10 of the 16 score tiles). Equal to `grouped_attention` with a causal mask. Every score op is a plain
    batched matmul over (batch, head) whose backward needs no relayout of five-axis grouped scores, which is what
    makes it faster than the grouped layout on XLA:CPU (`jaxalign bench lm-step` times the three variants).
    """
    groups = cfg.n_heads // cfg.n_kv_heads
    q = q.transpose(0, 2, 1, 3)
    keys = jnp.repeat(keys, groups, axis=2).transpose(0, 2, 1, 3)
    values = jnp.repeat(values, groups, axis=2).transpose(0, 2, 1, 3)
    outputs = []
    for start, end in causal_query_blocks(q.shape[2], max_blocks):
        scores = jnp.einsum("bhtd,bhsd->bhts", q[:, :, start:end], keys[:, :, :end])
        weights = attention_probabilities(scores, allowed[:, None, start:end, :end], cfg)
        outputs.append(jnp.einsum("bhts,bhsd->bhtd", weights, values[:, :, :end]))
    return jnp.concatenate(outputs, axis=2).transpose(0, 2, 1, 3)


def grouped_attention(q: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array,
                      cfg: ModelConfig) -> jax.Array:
    """Grouped-query attention (Ainslie et al. 2023) without repeating keys and values: query heads grouped by the
    key/value head they share. The decoding path, where the keys are a long cache read once per new token.

    q [b, t, n_heads, d], keys/values [b, n_kv_heads, s, d] (head-major, the layout of `init_cache`), allowed
    [b, t, s] -> [b, t, n_heads, d]. With the cache head-major both products contract in the cache's own layout,
    so a decoding step reads the cache where it lies (with a [b, s, n_kv_heads, d] cache, XLA:CPU copied the whole
    cache into this layout at every new token).
    """
    batch, time = q.shape[:2]
    groups = cfg.n_heads // cfg.n_kv_heads
    q = q.reshape(batch, time, cfg.n_kv_heads, groups, cfg.head_dim)
    if time == 1:
        # One new token: each (row, head) product is a [groups, d] x [d, s] sliver that XLA:CPU's dot emitter runs
        # one tiny matmul at a time; as an elementwise product and a reduction it is one fused pass over the cache.
        q = q[:, 0, :, :, None, :]  # [b, k, g, 1, d]
        scores = jnp.sum(q * keys[:, :, None], axis=-1)[:, :, :, None]  # [b, k, g, 1(t), s]
        weights = attention_probabilities(scores, allowed[:, None, None], cfg)
        out = jnp.sum(weights[:, :, :, 0, :, None] * values[:, :, None], axis=-2)[:, None]  # [b, 1(t), k, g, d]
    else:
        weights = attention_probabilities(jnp.einsum("btkgd,bksd->bkgts", q, keys), allowed[:, None, None], cfg)
        out = jnp.einsum("bkgts,bksd->btkgd", weights, values)
    return out.reshape(batch, time, cfg.n_heads, cfg.head_dim)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings and an optional key/value cache. `windowed`:
    this layer uses `cfg.sliding_window` (and `cfg.rope_local_theta`), see `ModelConfig.windowed`."""

    cfg: ModelConfig
    windowed: bool = True

    @nn.compact
    def __call__(self, x, positions, key_mask, cache, segment_ids=None):
        cfg = self.cfg
        dtype = cfg.compute_dtype

        batch, time = x.shape[:2]
        tokens = flatten_tokens(x)

        def proj(name, heads, axes):
            return HeadProjection((heads, cfg.head_dim), 1, axes, cfg.d_model, cfg.qkv_bias, dtype,
                                  name=name)(tokens).reshape(batch, time, heads, cfg.head_dim)

        q = proj("q", cfg.n_heads, ("embed", "heads", "head_dim"))
        k = proj("k", cfg.n_kv_heads, ("embed", "kv_heads", "head_dim"))
        v = proj("v", cfg.n_kv_heads, ("embed", "kv_heads", "head_dim"))
        if cfg.qk_norm:  # per head, before the rotation (Qwen3, Gemma 3)
            q = RMSNorm(cfg.norm_eps, dtype, cfg.norm_unit_offset, name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, dtype, cfg.norm_unit_offset, name="k_norm")(k)
        window = cfg.sliding_window if self.windowed else None
        inv_freq, attention_factor = rope_inverse_frequencies(cfg, positions, window is not None)
        if inv_freq is None:
            q = rotary_embedding(q, positions, cfg.rope_theta)
            k = rotary_embedding(k, positions, cfg.rope_theta)
        else:
            q = scaled_rotary_embedding(q, positions, inv_freq, attention_factor)
            k = scaled_rotary_embedding(k, positions, inv_freq, attention_factor)

        if cache is None:
            keys, values = k, v
            key_positions = positions
            allowed = key_mask[:, None, :]  # [b, 1(q), t(k)]
            causal = jnp.tril(jnp.ones((time, time), bool))[None]
            allowed = allowed & causal
            if segment_ids is not None:
                allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
            if window is not None:
                allowed = allowed & sliding_window_mask(positions, positions, window)
            new_cache = None
        else:
            # Write this chunk at `cache["index"]` for every row; rows are aligned (prompts left-padded).
            index = cache["index"]
            keys, values = (jax.lax.dynamic_update_slice(cache[name], new.transpose(0, 2, 1, 3).astype(
                cache[name].dtype), (0, 0, index, 0)) for name, new in (("k", k), ("v", v)))
            valid = jax.lax.dynamic_update_slice(cache["valid"], key_mask, (0, index))
            slots = jnp.arange(keys.shape[2])
            query_slots = index + jnp.arange(time)
            causal = slots[None, :] <= query_slots[:, None]  # [q, k]
            allowed = valid[:, None, :] & causal[None]
            if window is not None:
                # Cache slots of a row's real tokens are contiguous (prompts are left-padded), so slot distance is
                # position distance.
                allowed = allowed & sliding_window_mask(query_slots[None], slots[None], window)
            new_cache = {"k": keys, "v": values, "valid": valid, "index": index + time}
            key_positions = None
        del key_positions

        if cache is None:
            out = head_major_attention(q, keys.astype(dtype), values.astype(dtype), allowed, cfg)
        else:
            out = grouped_attention(q, keys.astype(dtype), values.astype(dtype), allowed, cfg)
        out = out.reshape(batch * time, cfg.n_heads, cfg.head_dim)
        out = HeadProjection((cfg.d_model,), 2, ("heads", "head_dim", "embed"), cfg.n_heads * cfg.head_dim,
                             cfg.out_bias, dtype, name="o")(out).reshape(batch, time, cfg.d_model)
        return out, new_cache


class SwiGLU(nn.Module):
    """Gated MLP: W_down (act(x W_gate) * x W_up), act = silu (SwiGLU, Shazeer 2020, eq. 6) or the tanh-GELU
    (GeGLU, eq. 5) as `cfg.activation` says. The module keeps its name whatever the activation (parameter paths)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = lambda name, features, axes, fan_in: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=cfg.compute_dtype,
            kernel_init=nn.with_logical_partitioning(_dense_init(fan_in), axes), name=name,
        )
        tokens = flatten_tokens(x)
        gate = dense("gate", cfg.mlp_dim, ("embed", "mlp"), cfg.d_model)(tokens)
        up = dense("up", cfg.mlp_dim, ("embed", "mlp"), cfg.d_model)(tokens)
        out = dense("down", cfg.d_model, ("mlp", "embed"), cfg.mlp_dim)(ACTIVATIONS[cfg.activation](gate) * up)
        return out.reshape(x.shape[:-1] + (cfg.d_model,))


class Block(nn.Module):
    """One pre-norm transformer block. Signature (carry, *broadcast, per-layer) so it can sit under nn.scan."""

    cfg: ModelConfig
    windowed: bool = True

    @nn.compact
    def __call__(self, x, positions, key_mask, cache, segment_ids=None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.norm_unit_offset, name=name)  # noqa: E731
        h, new_cache = Attention(cfg, self.windowed, name="attn")(norm("attn_norm")(x), positions, key_mask, cache,
                                                                  segment_ids)
        if cfg.sandwich_norms:
            h = norm("attn_post_norm")(h)
        x = x + h
        h = SwiGLU(cfg, name="mlp")(norm("mlp_norm")(x))
        if cfg.sandwich_norms:
            h = norm("mlp_post_norm")(h)
        x = x + h
        x = nn.with_logical_constraint(x, ("batch", "length", "embed_act"))
        return x, new_cache


class DecoderLM(nn.Module):
    """The decoder. __call__(tokens, attention_mask, positions=None, cache=None) -> (logits fp32, new_cache).

    `segment_ids` [B, T] (int, 0 = padding) marks packed rows (`jaxalign.data.packing`): a token attends only to
    earlier tokens of its own segment, and positions (unless given) restart at 0 at each segment's first token, so
    every segment sees exactly what it would see alone in its own row. The attention mask defaults to
    segment_ids > 0. Not combinable with a cache (decoding is never packed).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, attention_mask=None, positions=None, cache=None, return_hidden=False,
                 segment_ids=None):
        cfg = self.cfg
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("DecoderLM: segment_ids (packed rows) cannot be combined with a key/value cache")
            if segment_ids.shape != tokens.shape:
                raise ValueError(f"DecoderLM: segment_ids has shape {segment_ids.shape}, expected the tokens' shape "
                                 f"{tokens.shape}")
            if attention_mask is None:
                attention_mask = segment_ids > 0
            if positions is None:
                positions = segment_positions(segment_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            # Positions count real tokens only, so left padding does not shift the rotary phase; with a cache they
            # continue after the tokens already in it.
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
            if cache is not None:
                valid = cache["valid"][0] if cfg.scan_layers else cache[0]["valid"]
                positions = positions + jnp.sum(valid, axis=-1, keepdims=True)

        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(_dense_init(cfg.d_model), ("vocab", "embed")),
            name="embed",
        )
        x = embed(tokens).astype(cfg.compute_dtype)
        if cfg.embed_scale:
            # Gemma multiplies by sqrt(d_model) rounded to the compute dtype (transformers' modeling_gemma,
            # GemmaTextScaledWordEmbedding: `* embed_scale.to(weight.dtype)`).
            x = x * jnp.asarray(cfg.d_model**0.5, cfg.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed_act"))

        block = Block
        if cfg.remat:
            block = nn.remat(block, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, cfg.windowed(0), name="layers")
            x, new_cache = stack(x, positions, attention_mask, cache, segment_ids)
        else:
            new_layers = []
            for i in range(cfg.n_layers):
                layer_cache = None if cache is None else cache[i]
                x, c = block(cfg, cfg.windowed(i), name=f"layer_{i}")(x, positions, attention_mask, layer_cache,
                                                                       segment_ids)
                new_layers.append(c)
            new_cache = None if cache is None else new_layers

        hidden = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.norm_unit_offset, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(flatten_tokens(hidden).astype(jnp.float32))
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(_dense_init(cfg.d_model), ("embed", "vocab")),
                name="lm_head",
            )(flatten_tokens(hidden).astype(jnp.float32))
        logits = logits.reshape(hidden.shape[:-1] + (cfg.vocab_size,))
        if cfg.final_logit_softcap is not None:  # Gemma 2: c * tanh(z / c)
            logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache


def output_head(params: Any, cfg: ModelConfig) -> jax.Array:
    """The output projection [d_model, vocab] that `DecoderLM` applies to its final hidden states: the transposed
    embedding table when tied, else the lm_head kernel (for log-probs computed without the full logits,
    `jaxalign.logprobs.chunked_token_logprobs`)."""
    params = nn.meta.unbox(params)
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=None):
    """An empty key/value cache for `batch` rows and `max_len` slots, in the layout `DecoderLM` expects: keys and
    values [batch, n_kv_heads, max_len, head_dim] (head-major, see `grouped_attention`), valid [batch, max_len]."""
    max_len = max_len or cfg.max_len
    dtype = dtype or cfg.compute_dtype
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)

    def layer():
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool),
            "index": jnp.zeros((), jnp.int32),
        }

    if cfg.scan_layers:
        return jax.tree_util.tree_map(lambda x: jnp.stack([x] * cfg.n_layers), layer())
    return [layer() for _ in range(cfg.n_layers)]


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Boxed (logically annotated) parameters for `cfg`; unbox with `nn.meta.unbox` or use `jaxalign.sharding`."""
    tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
    return DecoderLM(cfg).init(rng, tokens)["params"]


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))


# The config field that sizes each logical axis of the parameters, in the order the fit check reports them; the
# rules table (jaxalign.sharding) says which of these axes a mesh splits.
SHARDED_SIZES = (("n_heads", "heads"), ("n_kv_heads", "kv_heads"), ("mlp_dim", "mlp"), ("vocab_size", "vocab"),
                 ("d_model", "embed"))


def check_model_fits_mesh(cfg: ModelConfig, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> None:
    """Every dimension the rules shard must divide evenly by its mesh axes; say which one does not."""
    mesh_axes = dict(rules)
    for name, logical in SHARDED_SIZES:
        axes = mesh_axes.get(logical)
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(mesh.shape[a] for a in axes)
        size = getattr(cfg, name)
        if size % shards:
            axis = " x ".join(axes)
            raise ValueError(
                f"model.{name}={size} is not divisible by the mesh's {axis} axis of size {shards}; "
                f"expected a multiple of {shards} (or a smaller mesh.{axis})"
            )
