"""Tests for jaxalign.data.packing and DecoderLM's segment_ids: packed rows give every sequence exactly the
log-probs it gets alone in a padded batch (fp32, atol 1e-5), including a sequence that ends at a row's last column
and left/right-padded inputs; first-fit placement; over-long sequences and pairs are dropped and reported."""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.packing import (first_fit, pack_pairs, pack_sequences, packed_pair_logprobs, packed_row_len,
                                   packed_sequence_logprobs, packed_token_logprobs, shape_bucket)
from jaxalign.logprobs import masked_token_logprobs, sequence_logprobs
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params, segment_positions

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_len=32)
ROW = 12


@functools.lru_cache(maxsize=None)
def params_for(cfg: ModelConfig):
    """Random fp32 parameters drawn with NumPy (cheaper than flax's init on a small CPU), norms perturbed from 1."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(cfg, key)), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((1.0 + 0.1 * rng.standard_normal(x.shape)) if "scale" in jax.tree_util.keystr(path)
                                    else 0.3 * rng.standard_normal(x.shape), jnp.float32), shapes)


def padded_batch(lengths, prompt_lengths, width, left=()):
    """Rows of random tokens with the given real lengths (right-padded, or left-padded for rows in `left`);
    completion mask on the tokens after each prompt."""
    rng = np.random.default_rng(1)
    n = len(lengths)
    tokens = np.zeros((n, width), np.int32)
    attention = np.zeros((n, width), bool)
    completion = np.zeros((n, width), bool)
    for i, (length, prompt) in enumerate(zip(lengths, prompt_lengths)):
        start = width - length if i in left else 0
        tokens[i, start:start + length] = rng.integers(1, CFG.vocab_size, length)
        attention[i, start:start + length] = True
        completion[i, start + prompt:start + length] = True
    return tokens, attention, completion


def unpacked_logprobs(cfg, tokens, attention, completion):
    logits, _ = DecoderLM(cfg).apply({"params": params_for(cfg)}, tokens, attention)
    return sequence_logprobs(masked_token_logprobs(logits, tokens, completion), completion)


def test_segment_positions_restart_at_each_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def test_packed_shapes_are_bucketed_to_four_sizes_per_doubling():
    assert [shape_bucket(n) for n in range(1, 18)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16, 20]
    assert shape_bucket(700) == 768 and shape_bucket(769) == 896 and shape_bucket(1025) == 1280
    assert shape_bucket(1025, cap=1200) == 1200
    for n in range(5, 5000):  # never more than a fifth of padding, never below n
        assert n <= shape_bucket(n) < 1.25 * n
    # rows as long as the longest pair (bucketed), never more than twice the padded width
    assert packed_row_len(np.array([300, 650, 120]), width=1600) == 768
    assert packed_row_len(np.array([3000]), width=1600) == 3072
    assert packed_row_len(np.array([3000]), width=1500) == 3000


def test_first_fit_places_in_input_order_and_marks_too_long():
    row, offset, kept = first_fit(np.array([7, 5, 4, 13, 5, 1]), 12)
    np.testing.assert_array_equal(row, [0, 0, 1, -1, 1, 1])
    np.testing.assert_array_equal(offset, [0, 7, 0, 0, 4, 9])
    np.testing.assert_array_equal(kept, [0, 1, 2, 4, 5])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_packed_logprobs_equal_unpacked(scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers, sliding_window=5 if scan_layers else None)
    # Lengths 7 + 5 fill row 0 exactly (sequence 1 ends at the last column), 4 + 5 + 1 share row 1 (padded
    # at its end), 13 > ROW is dropped; rows 2 and 4 of the input are left-padded.
    lengths, prompts = [7, 5, 4, 13, 5, 1], [3, 2, 1, 4, 2, 0]
    tokens, attention, completion = padded_batch(lengths, prompts, width=14, left=(2, 4))
    with pytest.warns(UserWarning, match=r"1 sequence\(s\) longer than row_len=12 dropped \(indices \[3\], lengths "
                                         r"\[13\]\)"):
        packed = pack_sequences(tokens, attention, completion, ROW)
    assert packed.stats() == {"rows": 2, "row_len": ROW, "sequences": 6, "packed": 5, "dropped": 1,
                              "fill": pytest.approx(22 / 24)}
    assert packed.dropped == (3,)
    np.testing.assert_array_equal(packed.segment_ids, [[1] * 7 + [2] * 5, [1] * 4 + [2] * 5 + [3] + [0] * 2])
    assert packed.segment_ids[0, -1] == 2 and packed.completion_mask[0, -1]  # the row-boundary sequence counts

    expected = unpacked_logprobs(cfg, tokens, attention, completion)[packed.kept]
    logits, _ = DecoderLM(cfg).apply({"params": params_for(cfg)}, jnp.asarray(packed.tokens),
                                     segment_ids=jnp.asarray(packed.segment_ids))
    seg = jnp.asarray(packed.segment_ids)
    token_logps = packed_token_logprobs(logits, jnp.asarray(packed.tokens), seg, jnp.asarray(packed.completion_mask))
    got = packed_sequence_logprobs(token_logps, seg, jnp.asarray(packed.completion_mask), jnp.asarray(packed.row),
                                   jnp.asarray(packed.segment))
    assert np.all(np.asarray(expected)[:-1] < -1.0)  # non-trivial sums (the last sequence has 1 token: sum 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)

    # Without the segment mask the second sequence of each row sees the first: the test can tell.
    leaky, _ = DecoderLM(cfg).apply({"params": params_for(cfg)}, jnp.asarray(packed.tokens),
                                    seg > 0, segment_positions(seg))
    leaked = packed_sequence_logprobs(packed_token_logprobs(leaky, jnp.asarray(packed.tokens), seg,
                                                            jnp.asarray(packed.completion_mask)),
                                      seg, jnp.asarray(packed.completion_mask), jnp.asarray(packed.row),
                                      jnp.asarray(packed.segment))
    assert np.abs(np.asarray(leaked) - np.asarray(expected)).max() > 1e-2

    averaged = packed_sequence_logprobs(token_logps, seg, jnp.asarray(packed.completion_mask),
                                        jnp.asarray(packed.row), jnp.asarray(packed.segment), average=True)
    expected_avg = [float(e) / max(int(completion[i].sum()), 1) for e, i in zip(expected, packed.kept)]
    np.testing.assert_allclose(np.asarray(averaged), expected_avg, atol=1e-5, rtol=0)


def test_pack_pairs_drops_whole_pairs_and_matches_unpacked():
    chosen = padded_batch([6, 3, 5], [2, 1, 2], width=14)
    rejected = padded_batch([6, 14, 4], [2, 1, 2], width=14, left=(0,))
    batch = {f"{side}_{k}": arrays[j] for side, arrays in (("chosen", chosen), ("rejected", rejected))
             for j, k in enumerate(("tokens", "attention_mask", "completion_mask"))}
    with pytest.warns(UserWarning, match=r"1 pair\(s\) with a sequence longer than row_len=12 dropped \(pair "
                                         r"indices \[1\]\)"):
        packed = pack_pairs(batch, ROW)
    assert packed.dropped_pairs == (1,)
    assert packed.stats()["pairs_packed"] == 2 and packed.stats()["rows"] == 2
    apply = lambda p, t, s: DecoderLM(CFG).apply({"params": p}, t, segment_ids=s)[0]  # noqa: E731
    chosen_lp, rejected_lp = packed_pair_logprobs(apply, params_for(CFG), packed)
    np.testing.assert_allclose(np.asarray(chosen_lp), np.asarray(unpacked_logprobs(CFG, *chosen))[[0, 2]],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(rejected_lp), np.asarray(unpacked_logprobs(CFG, *rejected))[[0, 2]],
                               atol=1e-5, rtol=0)


def test_clear_errors():
    tokens, attention, completion = padded_batch([3], [1], width=4)
    with pytest.raises(ValueError, match="sequence 0: completion_mask is 1 on a padding position"):
        pack_sequences(tokens, attention, np.ones_like(completion), ROW)
    with pytest.raises(ValueError, match="row_len must be a positive integer, got 0"):
        pack_sequences(tokens, attention, completion, 0)
    with pytest.raises(ValueError, match="pair batch lacks rejected_tokens"):
        pack_pairs({"chosen_tokens": tokens, "chosen_attention_mask": attention, "chosen_completion_mask": completion,
                    "rejected_attention_mask": attention, "rejected_completion_mask": completion}, ROW)
    with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a key/value cache"):
        from jaxalign.models.llama import init_cache

        DecoderLM(CFG).apply({"params": params_for(CFG)}, jnp.asarray(tokens), segment_ids=jnp.ones((1, 4), int),
                             cache=init_cache(CFG, 1))
