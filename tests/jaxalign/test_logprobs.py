"""Tests for jaxalign.logprobs against a naive per-example computation: each example's unpadded sequence is run
through the model alone and its log-softmax taken in float64 NumPy, then compared with the batched, padded,
masked JAX versions (right and left padding, one-token completions, unequal lengths, sum and average forms)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.logprobs import masked_token_logprobs, pair_token_logprobs, sequence_logprobs, token_logprobs
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_len=16)
WIDTH = 8
# (prompt length, completion length) per example: unequal lengths and a one-token completion.
EXAMPLES = ((3, 4), (5, 1), (2, 6), (4, 2))
# The rejected twins of EXAMPLES for the pair tests (same prompts, different completion lengths).
REJECTED_LENGTHS = (1, 3, 3, 4)


# LLVM codegen at -O0 (xla_backend_optimization_level=0) for the functions jitted here: these tiny graphs compile
# ~40% faster on a small CPU, and what the tests check is the JAX program, not LLVM's optimisations.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def params():
    """fp32 parameters of CFG's shapes drawn with NumPy (jitting flax's random init costs seconds of compile)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(CFG, key)), jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), shapes)


_MODEL = DecoderLM(CFG)
apply_logits = fast_jit(lambda p, tokens, mask=None: _MODEL.apply({"params": p}, tokens, mask)[0])


def make_sequences(lengths, seed):
    """Unpadded example sequences (prompt + completion) and their prompt lengths."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, p + c).astype(np.int32) for p, c in lengths], [p for p, _ in lengths]


def pad(sequences, prompt_lengths, side):
    """[B, WIDTH] tokens, attention mask and completion mask with `side` ('right' or 'left') padding by id 0."""
    tokens = np.zeros((len(sequences), WIDTH), np.int32)
    attention = np.zeros((len(sequences), WIDTH), np.int32)
    completion = np.zeros((len(sequences), WIDTH), np.int32)
    for i, (seq, prompt) in enumerate(zip(sequences, prompt_lengths)):
        start = 0 if side == "right" else WIDTH - len(seq)
        tokens[i, start:start + len(seq)] = seq
        attention[i, start:start + len(seq)] = 1
        completion[i, start + prompt:start + len(seq)] = 1
    return tokens, attention, completion


def naive_completion_logps(p, sequence, prompt_length):
    """log p(y_t | x, y_<t) for each completion token: the sequence alone, float64 log-softmax of its logits."""
    logits = np.asarray(apply_logits(p, sequence[None]), np.float64)[0]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.array([logp[t - 1, sequence[t]] for t in range(prompt_length, len(sequence))])


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_and_sequence_logprobs_match_naive_per_example_computation(side):
    """token_logprobs / masked_token_logprobs / sequence_logprobs (sum and average) on a padded batch equal the
    per-example float64 computation on each unpadded sequence; t=0 and non-completion positions are exactly 0."""
    sequences, prompts = make_sequences(EXAMPLES, seed=0)
    tokens, attention, completion = pad(sequences, prompts, side)
    logits = apply_logits(params(), tokens, attention)

    raw = token_logprobs(logits, tokens)
    assert raw.shape == tokens.shape and raw.dtype == jnp.float32
    np.testing.assert_array_equal(raw[:, 0], 0.0)
    masked = masked_token_logprobs(logits, tokens, completion)
    np.testing.assert_array_equal(np.where(completion == 0, masked, 0.0), 0.0)

    expected_sum, expected_mean = [], []
    for i, (seq, prompt) in enumerate(zip(sequences, prompts)):
        naive = naive_completion_logps(params(), seq, prompt)
        got = np.asarray(masked[i])[completion[i] == 1]
        assert got.shape == naive.shape == (len(seq) - prompt,)
        np.testing.assert_allclose(got, naive, rtol=1e-5, atol=1e-5, err_msg=f"example {i} ({side} padding)")
        np.testing.assert_allclose(np.asarray(raw[i])[completion[i] == 1], naive, rtol=1e-5, atol=1e-5)
        expected_sum.append(naive.sum())
        expected_mean.append(naive.mean())

    np.testing.assert_allclose(sequence_logprobs(masked, completion), expected_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sequence_logprobs(masked, completion, average=True), expected_mean, rtol=1e-5,
                               atol=1e-5)
    # Unmasked log-probs with the completion mask give the same sums: the mask, not the values, selects tokens.
    np.testing.assert_allclose(sequence_logprobs(raw, completion), expected_sum, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_closed_form_and_empty_completion():
    """Sum and average forms on hand-made numbers; an empty completion has sum 0 and average 0 (not NaN)."""
    logps = jnp.array([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, 0.0, 0.0], [0.0, -7.0, -7.0, -7.0]])
    mask = jnp.array([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(sequence_logprobs(logps, mask), [-3.0, -0.5, 0.0])
    np.testing.assert_allclose(sequence_logprobs(logps, mask, average=True), [-1.5, -0.5, 0.0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_pair_token_logprobs_concatenated_forward_matches_naive_and_separate_forwards(side):
    """One concatenated chosen+rejected forward gives the same masked per-token log-probs as two separate forwards,
    and both equal the naive per-example computation, with chosen and rejected completions of different lengths."""
    chosen, prompts = make_sequences(EXAMPLES, seed=1)
    rejected = [np.concatenate([c[:p], np.random.default_rng(2 + i).integers(1, CFG.vocab_size, n)]).astype(np.int32)
                for i, (c, p, n) in enumerate(zip(chosen, prompts, REJECTED_LENGTHS))]
    c_tok, c_att, c_comp = pad(chosen, prompts, side)
    r_tok, r_att, r_comp = pad(rejected, prompts, side)
    batch = {"chosen_tokens": c_tok, "chosen_attention_mask": c_att, "chosen_completion_mask": c_comp,
             "rejected_tokens": r_tok, "rejected_attention_mask": r_att, "rejected_completion_mask": r_comp}
    got_chosen, got_rejected = pair_token_logprobs(apply_logits, params(), batch)
    assert got_chosen.shape == got_rejected.shape == (len(EXAMPLES), WIDTH)

    separate_chosen = masked_token_logprobs(apply_logits(params(), c_tok, c_att), c_tok, c_comp)
    separate_rejected = masked_token_logprobs(apply_logits(params(), r_tok, r_att), r_tok, r_comp)
    np.testing.assert_allclose(got_chosen, separate_chosen, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_rejected, separate_rejected, rtol=1e-6, atol=1e-6)

    for which, seqs, got, comp in (("chosen", chosen, got_chosen, c_comp),
                                   ("rejected", rejected, got_rejected, r_comp)):
        for i, (seq, prompt) in enumerate(zip(seqs, prompts)):
            naive = naive_completion_logps(params(), seq, prompt)
            np.testing.assert_allclose(np.asarray(got[i])[comp[i] == 1], naive, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{which} example {i} ({side} padding)")
            np.testing.assert_array_equal(np.asarray(got[i])[comp[i] == 0], 0.0)


def test_chunked_token_logprobs_equal_the_full_logits_values_and_gradients():
    """chunked_token_logprobs(h, W, tokens, chunk) = token_logprobs(h @ W, tokens), values and gradients with
    respect to h and W, for chunks that do and do not divide the predicted positions, with and without a
    soft-cap."""
    from jaxalign.logprobs import chunked_token_logprobs

    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (3, 13, 8))
    head = jax.random.normal(keys[1], (8, 50))
    tokens = jax.random.randint(keys[2], (3, 13), 0, 50)
    for softcap in (None, 2.5):
        def full(h, w):
            logits = h @ w
            if softcap is not None:
                logits = jnp.tanh(logits / softcap) * softcap
            return token_logprobs(logits, tokens)

        want = full(hidden, head)
        want_grads = jax.grad(lambda h, w: jnp.sum(full(h, w) * jnp.arange(13.0)), argnums=(0, 1))(hidden, head)
        for chunk in (1, 4, 12, 40):
            got = chunked_token_logprobs(hidden, head, tokens, chunk, softcap)
            np.testing.assert_allclose(got, want, atol=2e-6)
            assert np.all(np.asarray(got[:, 0]) == 0.0)
            grads = jax.grad(lambda h, w: jnp.sum(chunked_token_logprobs(h, w, tokens, chunk, softcap)
                                                  * jnp.arange(13.0)), argnums=(0, 1))(hidden, head)
            for g, w in zip(grads, want_grads):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_token_logprobs(hidden, head, tokens, 0)
