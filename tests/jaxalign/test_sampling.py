"""Tests for jaxalign.sampling.generate: greedy decoding with the KV cache against a recompute-everything argmax
loop, EOS stopping and the completion mask, top-k, banned ids, and the sampling distribution at a temperature."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.sampling import SamplingConfig, generate

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
def sampled(temperature, top_k):
    """ROWS samples for the same prompt (one compiled call), with pad and ids >= NUM_TOKENS banned."""
    sampling = SamplingConfig(max_new_tokens=4, temperature=temperature, top_k=top_k)
    return run_generate([PROMPTS[1]] * ROWS, sampling, SAMPLE_EOS, seed=1, num_tokens=NUM_TOKENS)


def first_token_probs(temperature, top_k=0):
    """softmax(logits / T) of the first completion token over the allowed ids, truncated to the top k."""
    logits = next_token_logits([PROMPTS[1]])[0].astype(np.float64) / temperature
    logits[PAD] = -np.inf
    logits[NUM_TOKENS:] = -np.inf
    if top_k:
        logits[np.argsort(logits)[:-top_k]] = -np.inf
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


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


@pytest.mark.parametrize("temperature, top_k", [(0.7, 0), (1.5, 0), (1.0, 3)])
def test_first_token_frequencies_match_softmax_at_temperature(temperature, top_k):
    """The empirical distribution of the first sampled token over 4096 rows matches softmax(logits / T) (restricted
    to the top k and to allowed ids) by a chi-square test, while the untempered softmax is rejected."""
    tokens, _ = sampled(temperature, top_k)
    counts = np.bincount(tokens[:, 0], minlength=CFG.vocab_size).astype(np.float64)
    stat, dof = chi_square(counts, first_token_probs(temperature, top_k))
    # 6 standard deviations of the chi-square distribution above its mean: a fixed seed, so no flakiness either way.
    assert stat < dof + 6 * np.sqrt(2 * dof), f"chi2={stat:.1f} with {dof} degrees of freedom"
    if top_k:
        assert np.count_nonzero(counts) == top_k
    else:  # the same test would fail if the temperature were ignored
        wrong, _ = chi_square(counts, first_token_probs(1.0 if temperature != 1.0 else 2.0))
        assert wrong > dof + 6 * np.sqrt(2 * dof) + 50, f"temperature not detectable: chi2={wrong:.1f}"


def test_invalid_sampling_config_names_the_field():
    """Negative temperature / top_k and non-positive max_new_tokens are rejected with the field's name."""
    for bad, field in (({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"),
                       ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(ValueError, match=rf"sampling\.{field}"):
            SamplingConfig(**bad)
