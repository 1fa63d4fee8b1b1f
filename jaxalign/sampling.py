"""Jitted autoregressive sampling with a key/value cache: temperature, top-k, greedy, EOS stopping.

Prompts of different lengths are left-padded to a common width so every row's next token is written at the same
cache slot; rotary positions count real tokens only, so padding does not change what a row sees.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxalign.models.llama import DecoderLM, ModelConfig, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy decoding; top_k 0 means no top-k truncation."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"sampling.max_new_tokens must be positive, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k!r}")


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Draw one token per row from softmax(logits / temperature), restricted to the top_k logits when top_k > 0."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_id", "pad_id", "num_tokens"))
def generate(params, prompt_tokens, prompt_mask, rng, *, cfg: ModelConfig, sampling: SamplingConfig, eos_id: int,
             pad_id: int, num_tokens: int | None = None):
    """Sample completions for left-padded prompts [B, P].

    Only ids below `num_tokens` (the tokenizer's vocabulary; the model's may be padded for sharding) other than
    `pad_id` can be drawn.

    Returns (tokens [B, max_new_tokens], mask [B, max_new_tokens]); the mask is 1 up to and including the first
    EOS, and tokens after it are `pad_id`.
    """
    model = DecoderLM(cfg)
    batch, prompt_len = prompt_tokens.shape
    cache = init_cache(cfg, batch, prompt_len + sampling.max_new_tokens)
    prompt_mask = prompt_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    logits, cache = model.apply({"params": params}, prompt_tokens, prompt_mask, positions, cache)
    next_position = jnp.sum(prompt_mask, axis=-1)

    vocab = jnp.arange(cfg.vocab_size)
    banned = (vocab == pad_id) | (vocab >= (num_tokens or cfg.vocab_size))

    def body(carry, step_rng):
        cache, last_logits, position, done = carry
        last_logits = jnp.where(banned, -jnp.inf, last_logits)
        token = sample_token(last_logits, step_rng, sampling.temperature, sampling.top_k)
        token = jnp.where(done, pad_id, token)
        alive = ~done
        logits, cache = model.apply(
            {"params": params}, token[:, None], alive[:, None], position[:, None], cache
        )
        done = done | (token == eos_id)
        return (cache, logits[:, -1], position + 1, done), (token, alive)

    init = (cache, logits[:, -1], next_position, jnp.zeros((batch,), bool))
    _, (tokens, mask) = jax.lax.scan(body, init, jax.random.split(rng, sampling.max_new_tokens))
    return tokens.T, mask.T.astype(jnp.int32)
