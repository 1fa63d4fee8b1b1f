"""Per-token and per-sequence log-probabilities of completions under a decoder LM.

Conventions (docs/objectives.md, "Conventions"): for a sequence x, logp_t = log softmax(logits_{t-1})[x_t]. Arrays
are aligned with the token positions: `token_logps[:, t]` is the log-probability of `tokens[:, t]` given the tokens
before it, and `token_logps[:, 0] = 0` (the first token has no prediction). A completion mask is 1 on response
tokens only (prompt and padding are 0), so L(y) = sum_t mask_t logp_t. Works for right and left padding alike
because the mask, not the position, says which tokens count.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1, aligned to `tokens`; zero at t = 0. Computed in fp32."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def chunked_token_logprobs(hidden: jax.Array, head: jax.Array, tokens: jax.Array, chunk: int,
                           softcap: float | None = None) -> jax.Array:
    """`token_logprobs` of the logits `hidden @ head` without ever holding the [batch, time, vocab] fp32 logits.

    hidden [B, T, D] are the final (normed) hidden states, head [D, V] the output projection. The time axis is cut
    into chunks of `chunk` positions; each chunk's logits (fp32, optionally soft-capped c * tanh(z / c) as Gemma 2
    does) live only while its log-softmax and the target's log-prob are taken, and `jax.checkpoint` recomputes them
    in the backward pass instead of storing them. Peak memory for the log-probs and their gradient is then about
    B * chunk * V floats instead of several B * T * V (the logits, the log-softmax and their cotangents). The values
    and gradients equal `token_logprobs` of the full logits up to float rounding (tests/jaxalign/test_logprobs.py).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    batch, time, width = hidden.shape
    steps = time - 1
    n = -(-steps // chunk)
    pad = n * chunk - steps
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(batch, n, chunk, width).swapaxes(0, 1)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(batch, n, chunk).swapaxes(0, 1)
    weights = head.astype(jnp.float32)

    @jax.checkpoint
    def one_chunk(h_chunk, target_chunk):
        logits = h_chunk.astype(jnp.float32) @ weights
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        picked = jnp.take_along_axis(logits, target_chunk[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    _, picked = jax.lax.scan(lambda carry, xs: (carry, one_chunk(*xs)), None, (h, targets))
    picked = picked.swapaxes(0, 1).reshape(batch, n * chunk)[:, :steps]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def masked_token_logprobs(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """`token_logprobs` with everything outside `mask` set to exactly zero."""
    return jnp.where(mask.astype(bool), token_logprobs(logits, tokens), 0.0)


def sequence_logprobs(token_logps: jax.Array, mask: jax.Array, average: bool = False) -> jax.Array:
    """L(y) = sum_t mask_t logp_t, or the average log-prob L(y)/|y| when `average` (0 for an empty completion)."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(token_logps * mask, axis=-1)
    if average:
        return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return total


def concatenated_pairs(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, attention masks, completion masks) of the chosen rows followed by the rejected rows, [2*pairs, T]."""
    return tuple(jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
                 for key in ("tokens", "attention_mask", "completion_mask"))


def pair_token_logprobs(apply_fn: Callable[..., Any], params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Masked per-token log-probs of the chosen and rejected sequences from ONE concatenated forward pass.

    `batch` holds chosen_tokens / chosen_attention_mask / chosen_completion_mask and the rejected_* twins, all
    [pairs, time]. Concatenating along the batch halves the number of kernel launches and keeps both halves of a
    pair on the same device shard.
    """
    tokens, attention, completion = concatenated_pairs(batch)
    logits = apply_fn(params, tokens, attention)
    logps = masked_token_logprobs(logits, tokens, completion)
    pairs = batch["chosen_tokens"].shape[0]
    return logps[:pairs], logps[pairs:]
