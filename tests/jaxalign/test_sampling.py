"""Tests for jaxalign.sampling: greedy decoding with the KV cache against a recompute-everything argmax loop, EOS
stopping and the completion mask, top-k, top-p (against NumPy, ties included), banned ids, the sampling
distribution at a temperature with top-k and top-p, stop sequences (kept or cut, never matched on prompt tokens),
bucketed prompt shapes (same tokens, one compilation per bucket), and sharded decoding on 8 simulated CPU devices giving the same tokens as one device.

Run as a script (`python test_sampling.py OUT.npz`, with 8 CPU devices forced by XLA_FLAGS) this file is the
sharded test's subprocess: XLA_FLAGS must be set before jax is imported, so the multi-device part cannot run in the
pytest process."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.sampling import (
    SamplingConfig,
    bucket_prompts,
    encode_stop_strings,
    generate,
    generate_bucketed,
    generate_extrapolated,
    process_logits,
    top_k_filter,
    top_p_filter,
)

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_len=32)
PAD = 0
MAX_NEW = 8
PROMPT_WIDTH = 6
PROMPTS = ([5, 9, 3, 17, 2, 11], [7, 7, 21, 4], [13, 30])  # different lengths, left padded to PROMPT_WIDTH
_MODEL = DecoderLM(CFG)


# LLVM codegen at -O0 (xla_backend_optimization_level=0) for the functions jitted here: these tiny graphs compile
# ~40% faster on a small CPU, and what the tests check is the JAX program, not LLVM's optimisations.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def params():
    """fp32 parameters of CFG's shapes drawn with NumPy (jitting flax's random init costs seconds of compile).
    The larger scale makes the next-token distribution peaked enough for greedy ties to be impossible."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(CFG, key)), jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.4 * rng.standard_normal(x.shape), jnp.float32), shapes)


def left_padded(prompts):
    tokens = np.full((len(prompts), PROMPT_WIDTH), PAD, np.int32)
    mask = np.zeros((len(prompts), PROMPT_WIDTH), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, PROMPT_WIDTH - len(prompt):] = prompt
        mask[i, PROMPT_WIDTH - len(prompt):] = 1
    return tokens, mask


# No cache: the whole sequence, right padded into a fixed buffer (causal attention makes trailing pads harmless),
# so one compiled function serves every row and step.
_full_forward = fast_jit(lambda p, tokens, mask: _MODEL.apply({"params": p}, tokens, mask)[0])


def next_token_logits(sequences):
    """fp32 logits of the next token after each (unpadded) sequence, recomputing everything from scratch."""
    width = PROMPT_WIDTH + MAX_NEW
    tokens = np.full((len(sequences), width), PAD, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    logits = np.asarray(_full_forward(params(), tokens, mask))
    return logits[np.arange(len(sequences)), [len(s) - 1 for s in sequences]]


def reference_greedy(prompts, eos_id):
    """Plain argmax loop (pad id excluded), each row stopping after it emits eos_id: list of completions."""
    sequences = [list(p) for p in prompts]
    completions = [[] for _ in prompts]
    for _ in range(MAX_NEW):
        logits = next_token_logits(sequences)
        logits[:, PAD] = -np.inf
        for i, row in enumerate(logits):
            if completions[i] and completions[i][-1] == eos_id:
                continue
            token = int(np.argmax(row))
            completions[i].append(token)
            sequences[i].append(token)
    return completions


def run_generate(prompts, sampling, eos_id, seed=0, num_tokens=None):
    tokens, mask = left_padded(prompts)
    out, out_mask = generate(params(), tokens, mask, jax.random.key(seed), cfg=CFG, sampling=sampling, eos_id=eos_id,
                             pad_id=PAD, num_tokens=num_tokens)
    return np.asarray(out), np.asarray(out_mask)


def assert_eos_contract(tokens, mask, eos_id):
    """mask is 1 up to and including the first EOS and 0 after it; tokens after EOS are the pad id."""
    for row, row_mask in zip(tokens, mask):
        hits = np.flatnonzero(row == eos_id)
        stop = hits[0] + 1 if len(hits) else len(row)
        np.testing.assert_array_equal(row_mask, np.arange(len(row)) < stop)
        assert np.all(row[stop:] == PAD)


@functools.lru_cache(maxsize=None)
def greedy_case():
    """(eos_id, reference completions): EOS is a token that row 0 emits greedily at step 3 for the first time."""
    no_eos = reference_greedy(PROMPTS, eos_id=-1)
    eos_id = next(tok for step, tok in enumerate(no_eos[0]) if step >= 3 and tok not in no_eos[0][:step])
    return eos_id, reference_greedy(PROMPTS, eos_id)


def test_greedy_generate_equals_recompute_everything_argmax_loop():
    """Greedy decoding through the KV cache on left-padded prompts of different lengths emits exactly the tokens of
    a no-cache argmax loop on each unpadded prompt, stops each row after EOS (mask 1 up to and including EOS, pad
    tokens and mask 0 after) and keeps going in rows that did not emit it."""
    eos_id, expected = greedy_case()
    tokens, mask = run_generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0), eos_id)
    assert tokens.shape == mask.shape == (len(PROMPTS), MAX_NEW)
    assert len(expected[0]) < MAX_NEW  # row 0 really stopped early
    for i, completion in enumerate(expected):
        n = len(completion)
        assert tokens[i, :n].tolist() == completion, f"row {i}"
        assert mask[i, :n].tolist() == [1] * n and mask[i, n:].tolist() == [0] * (MAX_NEW - n), f"row {i}"
        assert tokens[i, n:].tolist() == [PAD] * (MAX_NEW - n), f"row {i}"
    assert_eos_contract(tokens, mask, eos_id)


@functools.lru_cache(maxsize=None)
def other_params():
    """A second parameter set (APO's older checkpoint): params() plus a small seeded perturbation."""
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32),
                                  params())


def test_extrapolated_greedy_equals_argmax_of_extrapolated_recomputed_logits():
    """APO's token-level sampling: greedy decoding of generate_extrapolated emits, at every step, the argmax of
    (1 + a) l_next - a l_prev where both logits are recomputed from scratch on the unpadded prefix (no cache)."""
    alpha = 0.5
    sequences = [list(p) for p in PROMPTS]
    expected = [[] for _ in PROMPTS]
    width = PROMPT_WIDTH + MAX_NEW
    for _ in range(MAX_NEW):
        tokens = np.full((len(sequences), width), PAD, np.int32)
        mask = np.zeros((len(sequences), width), np.int32)
        for i, seq in enumerate(sequences):
            tokens[i, :len(seq)], mask[i, :len(seq)] = seq, 1
        last = [len(s) - 1 for s in sequences]
        rows = np.arange(len(sequences))
        l_next = np.asarray(_full_forward(params(), tokens, mask))[rows, last]
        l_prev = np.asarray(_full_forward(other_params(), tokens, mask))[rows, last]
        combined = (1 + alpha) * l_next - alpha * l_prev
        combined[:, PAD] = -np.inf
        for i, row in enumerate(combined):
            expected[i].append(int(np.argmax(row)))
            sequences[i].append(int(np.argmax(row)))
    tokens, mask = left_padded(PROMPTS)
    out, _ = generate_extrapolated(params(), other_params(), alpha, tokens, mask, jax.random.key(0), cfg=CFG,
                                   sampling=SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0), eos_id=-1,
                                   pad_id=PAD)
    assert np.asarray(out).tolist() == expected
    plain = run_generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0), eos_id=-1)[0]
    assert plain.tolist() != expected  # the older checkpoint really changes the decoded tokens


def test_extrapolated_sampling_at_alpha_zero_draws_the_same_tokens_as_generate():
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_k=8)
    tokens, mask = left_padded(PROMPTS)
    expected, expected_mask = run_generate(PROMPTS, sampling, eos_id=3, seed=7)
    out, out_mask = generate_extrapolated(params(), other_params(), 0.0, tokens, mask, jax.random.key(7), cfg=CFG,
                                          sampling=sampling, eos_id=3, pad_id=PAD)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out_mask, expected_mask)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        generate_extrapolated(params(), other_params(), 1.0, tokens, mask, jax.random.key(7), cfg=CFG,
                              sampling=sampling, eos_id=3, pad_id=PAD)


def test_top_k_one_equals_greedy():
    """top_k=1 leaves a single candidate, so sampling at any temperature reproduces greedy decoding."""
    eos_id, expected = greedy_case()
    tokens, mask = run_generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.3, top_k=1), eos_id,
                                seed=7)
    for i, completion in enumerate(expected):
        assert tokens[i, :len(completion)].tolist() == completion, f"row {i}"
    assert_eos_contract(tokens, mask, eos_id)


ROWS = 4096
NUM_TOKENS = 24  # the tokenizer's vocabulary; ids 24..31 are sharding padding of the model's vocabulary
SAMPLE_EOS = 3


@functools.lru_cache(maxsize=None)
def sampled(temperature, top_k, top_p=1.0):
    """ROWS samples for the same prompt (one compiled call), with pad and ids >= NUM_TOKENS banned."""
    sampling = SamplingConfig(max_new_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p)
    return run_generate([PROMPTS[1]] * ROWS, sampling, SAMPLE_EOS, seed=1, num_tokens=NUM_TOKENS)


def softmax64(logits):
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)


def numpy_top_p(logits, top_p):
    """Independent nucleus rule in float64: keep a token iff the probability of the tokens strictly more likely
    than it is < top_p (as transformers' TopPLogitsWarper, with every token tied to the crossing one kept)."""
    probs = softmax64(np.asarray(logits, np.float64))
    above = np.array([[row[row > x].sum() for x in row] for row in probs.reshape(-1, probs.shape[-1])])
    return np.where(above.reshape(probs.shape) < top_p, logits, -np.inf)


def first_token_probs(temperature, top_k=0, top_p=1.0):
    """softmax(logits / T) of the first completion token over the allowed ids, truncated to the top k, then to the
    nucleus top_p of what is left (Hugging Face's order)."""
    logits = next_token_logits([PROMPTS[1]])[0].astype(np.float64) / temperature
    logits[PAD] = -np.inf
    logits[NUM_TOKENS:] = -np.inf
    if top_k:
        logits[np.argsort(logits)[:-top_k]] = -np.inf
    if top_p < 1.0:
        probs = softmax64(logits)
        # the rule is decided away from any boundary, so float32 in the sampler cannot decide it differently
        assert np.min(np.abs(np.cumsum(np.sort(probs)[::-1]) - top_p)) > 1e-3
        logits = numpy_top_p(logits, top_p)
    return softmax64(logits)


def chi_square(counts, probs):
    support = probs > 0
    assert counts[~support].sum() == 0, f"ids {np.flatnonzero(counts * ~support)} have zero probability"
    expected = probs[support] * counts.sum()
    return float(np.sum((counts[support] - expected) ** 2 / expected)), int(support.sum()) - 1


def test_banned_ids_are_never_sampled_and_eos_stops_rows():
    """At temperature 1.5 over 4096 rows x 4 steps, pad_id and ids >= num_tokens never appear where the mask is 1
    (without the ban they would get ~28% of the mass), and every row obeys the EOS/mask contract."""
    tokens, mask = sampled(1.5, 0)
    drawn = tokens[mask == 1]
    assert drawn.size > ROWS
    assert not np.any(drawn == PAD), "pad_id was sampled"
    assert not np.any(drawn >= NUM_TOKENS), f"ids >= num_tokens were sampled: {np.unique(drawn[drawn >= NUM_TOKENS])}"
    stopped = (tokens == SAMPLE_EOS).any(axis=1)
    assert 0.05 < stopped.mean() < 0.95  # EOS is sampled in some rows and not in others
    assert_eos_contract(tokens, mask, SAMPLE_EOS)


# (1.0, 0, 0.5): the nucleus holds 4 tokens, the 4th being the one that crosses 0.5 (a rule that dropped it would
# keep 3). (1.5, 8, 0.7): top-p on the top-8 renormalised keeps 5 tokens; top-p before top-k would keep 8.
@pytest.mark.parametrize("temperature, top_k, top_p, support",
                         [(0.7, 0, 1.0, None), (1.5, 0, 1.0, None), (1.0, 3, 1.0, 3), (1.0, 0, 0.5, 4),
                          (1.5, 8, 0.7, 5)])
def test_first_token_frequencies_match_softmax_at_temperature(temperature, top_k, top_p, support):
    """The empirical distribution of the first sampled token over 4096 rows matches softmax(logits / T) (restricted
    to the top k, then to the nucleus top_p, and to allowed ids) by a chi-square test, with exactly the expected
    number of distinct tokens drawn, while the untempered softmax is rejected."""
    tokens, _ = sampled(temperature, top_k, top_p)
    counts = np.bincount(tokens[:, 0], minlength=CFG.vocab_size).astype(np.float64)
    probs = first_token_probs(temperature, top_k, top_p)
    stat, dof = chi_square(counts, probs)
    # 6 standard deviations of the chi-square distribution above its mean: a fixed seed, so no flakiness either way.
    assert stat < dof + 6 * np.sqrt(2 * dof), f"chi2={stat:.1f} with {dof} degrees of freedom"
    if support:
        assert np.count_nonzero(probs) == support
        assert np.count_nonzero(counts) == support
    else:  # the same test would fail if the temperature were ignored
        wrong, _ = chi_square(counts, first_token_probs(1.0 if temperature != 1.0 else 2.0))
        assert wrong > dof + 6 * np.sqrt(2 * dof) + 50, f"temperature not detectable: chi2={wrong:.1f}"


def test_invalid_sampling_config_names_the_field():
    """Negative temperature / top_k, non-positive max_new_tokens, top_p outside (0, 1], malformed stop sequences and
    a non-bool keep_stop are each rejected with the field's name."""
    for bad, field in (({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"),
                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_p": 0.0}, "top_p"),
                       ({"top_p": 1.01}, "top_p"), ({"top_p": float("nan")}, "top_p"), ({"top_p": True}, "top_p"),
                       ({"stop": "1;"}, "stop"), ({"stop": [[3], []]}, r"stop\[1\]"),
                       ({"stop": [[3, -1]]}, r"stop\[0\]"), ({"stop": [3]}, r"stop\[0\]"),
                       ({"stop": [[2.5]]}, r"stop\[0\]"), ({"keep_stop": "no"}, "keep_stop")):
        with pytest.raises(ValueError, match=rf"sampling\.{field}"):
            SamplingConfig(**bad)
    # lists are accepted and stored hashable (the config is a static jit argument)
    assert hash(SamplingConfig(stop=[[3, 4], (5,)])) == hash(SamplingConfig(stop=((3, 4), (5,))))


# ---------------------------------------------------------------------------------------------------------------
# top-k / top-p as pure functions, against NumPy.


def hf_top_p_literal(logits, top_p):
    """transformers' TopPLogitsWarper step by step in float64 (ascending sort, remove while the cumulative mass is
    <= 1 - top_p, keep the last token): the reference where no two logits tie."""
    out = np.array(logits, np.float64)
    for row, raw in zip(out, np.asarray(logits, np.float64)):
        order = np.argsort(raw, kind="stable")
        cumulative = np.cumsum(softmax64(raw[order]))
        remove = cumulative <= 1 - top_p
        remove[-1] = False
        row[order[remove]] = -np.inf
    return out


def test_top_p_filter_matches_transformers_rule_on_random_logits():
    """On random [16, 50] logits without ties, top_p_filter keeps exactly the tokens transformers' warper keeps, for
    p from tiny (only the argmax survives: min_tokens_to_keep=1) to 0.95; the token that crosses p is kept."""
    logits = 3.0 * np.random.default_rng(0).standard_normal((16, 50))
    for top_p in (1e-6, 0.1, 0.3, 0.5, 0.8, 0.95):
        descending = np.cumsum(np.sort(softmax64(logits), axis=-1)[:, ::-1], axis=-1)
        assert np.min(np.abs(descending - top_p)) > 2e-6  # no row sits on a boundary float32 could round across
        got = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits, jnp.float32), top_p)))
        expected = np.isfinite(hf_top_p_literal(logits, top_p))
        np.testing.assert_array_equal(got, expected, err_msg=f"top_p={top_p}")
        kept_mass = np.where(expected, softmax64(logits), 0).sum(-1)
        assert np.all(kept_mass >= top_p)  # the crossing token is in: the kept mass reaches p
    only_argmax = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits, jnp.float32), 1e-6)))
    np.testing.assert_array_equal(only_argmax, np.arange(50) == logits.argmax(-1, keepdims=True))


def test_top_p_filter_keeps_every_token_tied_with_the_crossing_one():
    """Probabilities (.4, .2, .2, .1, .1) and (.3, .3, .2, .2): a tie at the crossing point keeps the whole tie (the
    rule 'mass strictly above < p' computed in NumPy), so the result never depends on how ties sort."""
    logits = np.log(np.array([[0.2, 0.1, 0.4, 0.2, 0.1], [0.2, 0.3, 0.2, 0.3, 1e-30]]))
    expected_kept = {0.3: ([2], [1, 3]), 0.5: ([0, 2, 3], [1, 3]), 0.7: ([0, 2, 3], [0, 1, 2, 3]),
                     0.85: ([0, 1, 2, 3, 4], [0, 1, 2, 3])}
    for top_p, kept in expected_kept.items():
        got = np.asarray(top_p_filter(jnp.asarray(logits, jnp.float32), top_p))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(numpy_top_p(logits, top_p)))
        for row, ids in enumerate(kept):
            assert np.flatnonzero(np.isfinite(got[row])).tolist() == ids, f"top_p={top_p} row {row}"
            np.testing.assert_array_equal(got[row, ids], logits[row, ids].astype(np.float32))


def test_top_p_one_and_large_top_k_are_exact_no_ops():
    """top_p=1.0 returns the logits bit for bit, even with a tail that float32 mass sums would round to 0, and so do
    top_k=0 and top_k >= the vocabulary (which lax.top_k alone would reject)."""
    logits = jnp.asarray([[0.0, -30.0, -90.0, -jnp.inf, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]], jnp.float32)
    for filtered in (top_p_filter(logits, 1.0), top_k_filter(logits, 0), top_k_filter(logits, 5),
                     top_k_filter(logits, 9), process_logits(logits, 1.0, 0, 1.0)):
        np.testing.assert_array_equal(np.asarray(filtered), np.asarray(logits))


def test_process_logits_applies_temperature_then_top_k_then_top_p():
    """Against NumPy in Hugging Face's order (divide by T; keep logits >= the k-th largest; nucleus on what is left,
    renormalised). The example is one where top-p before top-k would keep a different set."""
    logits = 2.0 * np.random.default_rng(1).standard_normal((4, 40))
    temperature, top_k, top_p = 1.7, 12, 0.6
    scaled = logits / temperature
    kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
    expected = numpy_top_p(np.where(scaled < kth, -np.inf, scaled), top_p)
    reversed_order = np.where(scaled < kth, -np.inf, numpy_top_p(scaled, top_p))
    assert not np.array_equal(np.isfinite(expected), np.isfinite(reversed_order))
    got = np.asarray(process_logits(jnp.asarray(logits, jnp.float32), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Stop sequences.

# Greedy completions of PROMPTS without EOS (see reference_greedy) are
#   row 0 (prompt ...17, 2, 11): 20 1 2 1 7 6 8 2
#   row 1 (prompt ...21, 4):     19 4 18 1 1 1 1 25
#   row 2 (prompt 13, 30):       19 4 1 18 15 19 3 9
# and the stop sequences are chosen on them: row 0 stops on (2, 1, 7) at step 4 (length 3), row 1 on the
# overlapping (4, 18) and (18,) together at step 2 (cut: the longer one goes), row 2 on (18,) at step 3 (length 1).
# (11, 20), (2, 11, 20), (4, 19) and (30, 19) straddle each row's prompt/completion boundary: matching prompt tokens
# would stop rows 0, 1 and 2 at step 0.
STOPS = ((2, 1, 7), (4, 18), (18,), (11, 20), (2, 11, 20), (4, 19), (30, 19))


def reference_stop(completion, stops, eos_id, keep_stop):
    """(tokens, finished) of a row given its free-running completion, in plain Python: the row ends at the first
    step where EOS is drawn or the generated tokens (never the prompt's) end with a stop sequence; without
    keep_stop the longest stop sequence ending there is removed."""
    for step, token in enumerate(completion):
        generated = tuple(completion[:step + 1])
        if token == eos_id:
            return list(generated), True
        lengths = [len(s) for s in stops if generated[-len(s):] == s and len(s) <= len(generated)]
        if lengths:
            return list(generated if keep_stop else generated[:len(generated) - max(lengths)]), True
    return list(completion), False


@functools.lru_cache(maxsize=None)
def free_running():
    return reference_greedy(PROMPTS, eos_id=-1)


@pytest.mark.parametrize("keep_stop", [True, False])
def test_stop_sequences_of_different_lengths_overlapping_and_straddling(keep_stop):
    """Greedy decoding with STOPS ends each row where the plain-Python reference says (lengths 3, 2 + 1 overlapping,
    1), never on a sequence that straddles the prompt, with the stop sequence kept (mask 1) or cut (pad, mask 0)."""
    assert free_running() == [[20, 1, 2, 1, 7, 6, 8, 2], [19, 4, 18, 1, 1, 1, 1, 25], [19, 4, 1, 18, 15, 19, 3, 9]]
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0, stop=STOPS, keep_stop=keep_stop)
    tokens, mask = run_generate(PROMPTS, sampling, eos_id=-1)
    expected_lengths = [5, 3, 4] if keep_stop else [2, 1, 3]
    for i, completion in enumerate(free_running()):
        expected, finished = reference_stop(completion, STOPS, -1, keep_stop)
        assert finished and len(expected) == expected_lengths[i], f"row {i}"
        n = len(expected)
        assert tokens[i].tolist() == expected + [PAD] * (MAX_NEW - n), f"row {i}"
        assert mask[i].tolist() == [1] * n + [0] * (MAX_NEW - n), f"row {i}"


def test_stop_strings_encoded_with_the_char_tokenizer():
    """encode_stop_strings maps text to CharTokenizer ids (row 0's generated ids 7 6 8 are the text "546"), gives
    the hashable form SamplingConfig stores, and rejects a bare string, an empty string and unknown characters."""
    from jaxalign.tasks.tokenizer import CharTokenizer

    tok = CharTokenizer()
    assert encode_stop_strings(["546", ";", "=1"], tok) == ((7, 6, 8), (14,), (13, 3))
    assert SamplingConfig(stop=encode_stop_strings(["546"], tok)).stop == ((7, 6, 8),)
    with pytest.raises(ValueError, match="single string"):
        encode_stop_strings("546", tok)
    with pytest.raises(ValueError, match="non-empty"):
        encode_stop_strings([""], tok)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode_stop_strings(["x"], tok)


# ---------------------------------------------------------------------------------------------------------------
# Bucketed prompt shapes.


def left_padded_to(prompts, width):
    """`left_padded` at any width >= the longest prompt."""
    tokens = np.full((len(prompts), width), PAD, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt):], mask[i, width - len(prompt):] = prompt, 1
    return tokens, mask


def test_bucket_prompts_left_pads_columns_and_copies_the_last_row():
    tokens, mask = left_padded(PROMPTS)  # [3, 6]
    wide, wide_mask = bucket_prompts(tokens, mask, PAD, width_bucket=4, row_bucket=4)
    assert wide.shape == wide_mask.shape == (4, 8)
    np.testing.assert_array_equal(wide[:3, 2:], tokens)
    np.testing.assert_array_equal(wide_mask[:3, 2:], mask)
    assert np.all(wide[:, :2] == PAD) and np.all(wide_mask[:, :2] == 0)
    np.testing.assert_array_equal(wide[3], wide[2])  # the extra row repeats a real one (it finishes with it)
    np.testing.assert_array_equal(wide_mask[3], wide_mask[2])
    same, same_mask = bucket_prompts(tokens, mask, PAD, width_bucket=3)  # 6 is already a multiple of 3
    np.testing.assert_array_equal(same, tokens)
    np.testing.assert_array_equal(same_mask, mask)
    for bad in ({"width_bucket": 0}, {"width_bucket": 2, "row_bucket": 0}, {"width_bucket": 2.0}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            bucket_prompts(tokens, mask, PAD, **bad)
    with pytest.raises(ValueError, match="one shape"):
        bucket_prompts(tokens, mask[:, 1:], PAD, width_bucket=2)


def test_bucketed_generate_compiles_once_per_bucket_and_emits_the_unbucketed_tokens():
    """Prompt batches 4, 6 and 7 columns wide, 2 or 3 rows: with width_bucket=8 and row_bucket=4 they all run one
    compiled `generate` ([4, 8] prompts), and each returns exactly the greedy tokens and masks of the unbucketed call
    (which compiles once per shape: the compilation counter is live). A sampling config no other test uses keeps the
    jit cache counts this test's own."""
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.0)
    eos_id, _ = greedy_case()
    batches = [(PROMPTS, 6), (PROMPTS[1:], 4), (PROMPTS[1:] + ([1, 2, 3, 4, 5, 6, 7],), 7)]
    kwargs = dict(cfg=CFG, sampling=sampling, eos_id=eos_id, pad_id=PAD)
    before = generate._cache_size()
    bucketed = []
    for prompts, width in batches:
        tokens, mask = left_padded_to(prompts, width)
        out = generate_bucketed(params(), tokens, mask, jax.random.key(0), width_bucket=8, row_bucket=4, **kwargs)
        bucketed.append(tuple(np.asarray(a) for a in out))
    assert generate._cache_size() - before == 1
    for (prompts, width), (out, out_mask) in zip(batches, bucketed):
        tokens, mask = left_padded_to(prompts, width)
        expected, expected_mask = (np.asarray(a) for a in generate(params(), tokens, mask, jax.random.key(0),
                                                                   **kwargs))
        assert out.shape == (len(prompts), 7)
        np.testing.assert_array_equal(out, expected, err_msg=f"width {width}")
        np.testing.assert_array_equal(out_mask, expected_mask, err_msg=f"width {width}")
    assert generate._cache_size() - before == 1 + len(batches)
    assert bucketed[0][1][0].sum() < 7, "row 0 emits EOS early (greedy_case), so EOS handling is exercised"


def test_bucketed_sampling_draws_the_unbucketed_tokens():
    """At temperature 1 the real rows draw what they draw unbucketed: the random draws are shaped [rows, vocab],
    left padding columns does not change them, and (jax_threefry_partitionable) neither do appended rows."""
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0)
    tokens, mask = left_padded(PROMPTS)
    kwargs = dict(cfg=CFG, sampling=sampling, eos_id=SAMPLE_EOS, pad_id=PAD)
    expected = generate(params(), tokens, mask, jax.random.key(5), **kwargs)
    out = generate_bucketed(params(), tokens, mask, jax.random.key(5), width_bucket=8, row_bucket=8, **kwargs)
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---------------------------------------------------------------------------------------------------------------
# Sharded decoding: the batch split over the data axis of 8 simulated CPU devices.

# 8 prompts (one per device) of lengths 1 to 6; ids in [2, NUM_TOKENS).
SHARD_PROMPTS = PROMPTS + ([4, 22, 8], [6], [23, 12, 5, 9, 10], [3, 3, 3, 3, 3, 3], [17, 16])
SHARD_CASES = {  # name: (sampling config, eos id); one greedy with stops cut, one sampled with every filter
    "greedy_stop": (SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0, stop=STOPS, keep_stop=False), -1),
    "sampled": (SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.5, top_k=8, top_p=0.9, stop=((5, 6), (9,))),
                SAMPLE_EOS),
}
REPO = Path(__file__).resolve().parents[2]


def sharded_child(out_path):
    """In a process with 8 CPU devices: every SHARD_CASES config decoded by `generate` on one device and by
    `generate_sharded` on a (data=8) mesh; saves both and where the sharded rows lived."""
    from jaxalign.sampling import generate_sharded
    from jaxalign.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig())
    tokens, mask = left_padded(SHARD_PROMPTS)
    saved = {"devices": np.array(jax.device_count()), "data_axis": np.array(mesh.shape["data"])}
    for name, (sampling, eos_id) in SHARD_CASES.items():
        kwargs = dict(cfg=CFG, sampling=sampling, eos_id=eos_id, pad_id=PAD, num_tokens=NUM_TOKENS)
        single = generate(params(), tokens, mask, jax.random.key(3), **kwargs)
        sharded = generate_sharded(params(), tokens, mask, jax.random.key(3), mesh=mesh, **kwargs)
        for side, (out, out_mask) in (("single", single), ("sharded", sharded)):
            saved[f"{name}_{side}_tokens"], saved[f"{name}_{side}_mask"] = np.asarray(out), np.asarray(out_mask)
        saved[f"{name}_shard_rows"] = np.array(sorted(s.index[0].start for s in sharded[0].addressable_shards))
        saved[f"{name}_shard_devices"] = np.array(len(sharded[0].sharding.device_set))
    np.savez(out_path, **saved)


def test_sharded_generate_equals_single_device(tmp_path):
    """With the batch of 8 prompts split one row per device over a data=8 mesh of simulated CPU devices,
    generate_sharded returns exactly the tokens and masks of generate on one device, greedy with stop sequences and
    sampled (temperature, top-k, top-p, stops, EOS: the random draws do not depend on the sharding); the greedy rows
    also match the plain-Python stop reference."""
    out = tmp_path / "sharded.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = np.load(out)
    assert int(got["devices"]) == 8 and int(got["data_axis"]) == 8
    for name in SHARD_CASES:
        assert int(got[f"{name}_shard_devices"]) == 8
        assert got[f"{name}_shard_rows"].tolist() == list(range(8)), "one row per device"
        np.testing.assert_array_equal(got[f"{name}_sharded_tokens"], got[f"{name}_single_tokens"], err_msg=name)
        np.testing.assert_array_equal(got[f"{name}_sharded_mask"], got[f"{name}_single_mask"], err_msg=name)
    for i, completion in enumerate(free_running()):
        expected, _ = reference_stop(completion, STOPS, -1, keep_stop=False)
        assert got["greedy_stop_single_tokens"][i, :len(expected)].tolist() == expected
        assert got["greedy_stop_single_mask"][i].sum() == len(expected)
    lengths = got["sampled_single_mask"].sum(-1)
    assert len(set(got["sampled_single_tokens"][:, 0].tolist())) > 1 and lengths.min() < MAX_NEW  # not degenerate


if __name__ == "__main__":
    sharded_child(sys.argv[1])
