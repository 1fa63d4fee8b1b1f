"""Padding-free packed preference training (`dpo.packing`): a pair batch packed first-fit into rows (pairs never
split) gives sigmoid, ipo and simpo the same loss and gradients as the padded batch (1e-5), with an online or a
cached reference and under gradient accumulation, in fewer rows; objectives whose extras need the padded pass
refuse packing in one line."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.packing import PACKED_PAIR_KEYS, ROW_FACTOR, pack_pair_batch, shape_bucket
from jaxalign.logprobs import pair_token_logprobs
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.train.preference import PreferenceConfig
from jaxalign.train.step import accumulated_gradients, dpo_loss_fn, logits_fn

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_len=16)
MODEL = DecoderLM(CFG)
WIDTH = 12
PROMPT = 2
# Completion lengths of very different sizes: most pairs are short, two fill the width.
CHOSEN = (1, 9, 2, 3, 1, 10, 2, 1)
REJECTED = (2, 1, 4, 10, 2, 1, 1, 3)
LEFT_PADDED = (2, 5)  # pairs whose rows are left padded: the index maps handle either side
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0}, static_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def params(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(CFG, key)), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((1.0 + 0.1 * rng.standard_normal(x.shape)) if "scale" in jax.tree_util.keystr(path)
                                    else 0.2 * rng.standard_normal(x.shape), jnp.float32), shapes)


def side(lengths, seed, prompts=None):
    rng = np.random.default_rng(seed)
    n = len(lengths)
    tokens = np.zeros((n, WIDTH), np.int32)
    attention = np.zeros((n, WIDTH), np.int32)
    completion = np.zeros((n, WIDTH), np.int32)
    for i, c in enumerate(lengths):
        length = PROMPT + c
        start = WIDTH - length if i in LEFT_PADDED else 0
        real = rng.integers(1, CFG.vocab_size, length)
        if prompts is not None:
            real[:PROMPT] = prompts[i]
        tokens[i, start:start + length] = real
        attention[i, start:start + length] = 1
        completion[i, start + PROMPT:start + length] = 1
    return tokens, attention, completion


@functools.lru_cache(maxsize=None)
def padded_batch(chosen=CHOSEN, rejected=REJECTED):
    c = side(chosen, 1)
    prompts = [c[0][i][c[1][i] == 1][:PROMPT] for i in range(len(chosen))]
    r = side(rejected, 2, prompts)
    return {f"{s}_{k}": a for s, arrays in (("chosen", c), ("rejected", r))
            for k, a in zip(("tokens", "attention_mask", "completion_mask"), arrays)}


def with_cached_reference(batch):
    chosen, rejected = pair_token_logprobs(logits_fn(MODEL), params(1), batch)
    return {**batch, "reference_chosen": np.asarray(chosen), "reference_rejected": np.asarray(rejected)}


@fast_jit
def value_and_grad(objective, packing_and_accum, p, frozen, batch):
    packing, accum = packing_and_accum
    loss_fn = dpo_loss_fn(MODEL, objective, sft_weight=0.5, packing=packing, beta=0.5)
    loss, grads, _ = accumulated_gradients(loss_fn, p, frozen, batch, accum)
    return loss, grads


def assert_same(objective, frozen, batch, accum=1):
    packed = pack_pair_batch(batch, microbatches=accum)
    want = value_and_grad(objective, (False, accum), params(), frozen, batch)
    got = value_and_grad(objective, (True, accum), params(), frozen, packed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got[1], want[1])
    assert float(jnp.abs(want[0])) > 0  # not vacuous: a real loss and gradient
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(want[1])) > 0


@pytest.mark.parametrize("objective", ["sigmoid", "ipo"])
def test_packed_equals_padded_with_online_reference(objective):
    assert_same(objective, params(1), padded_batch())


@pytest.mark.parametrize("objective", ["sigmoid", "ipo"])
def test_packed_equals_padded_with_cached_reference(objective):
    assert_same(objective, None, with_cached_reference(padded_batch()))


def test_packed_equals_padded_reference_free():
    assert_same("simpo", None, padded_batch())


def test_packed_equals_padded_under_gradient_accumulation():
    assert_same("sigmoid", params(1), padded_batch(), accum=2)


def test_packing_reduces_rows_and_never_splits_a_pair():
    batch = padded_batch()
    packed = pack_pair_batch(batch)
    pairs = len(CHOSEN)
    longest_pair = max(2 * PROMPT + c + r for c, r in zip(CHOSEN, REJECTED))  # 17 tokens: a 20-token row
    row_len = packed["packed_tokens"].shape[1]
    assert row_len == min(shape_bucket(longest_pair), ROW_FACTOR * WIDTH) == 20
    rows = packed["packed_tokens"].shape[0]
    assert rows < pairs < 2 * pairs  # padded: 2 * pairs rows of WIDTH; packed: fewer rows of 2 * WIDTH
    assert packed["packed_tokens"].size < 2 * pairs * WIDTH
    for i in range(pairs):
        c = packed["chosen_packed_index"][i][batch["chosen_attention_mask"][i] == 1]
        r = packed["rejected_packed_index"][i][batch["rejected_attention_mask"][i] == 1]
        assert len({*(c // row_len), *(r // row_len)}) == 1  # chosen and rejected in one row
        assert r[0] == c[-1] + 1  # rejected right after chosen
        flat_tokens = packed["packed_tokens"].reshape(-1)
        flat_segments = packed["packed_segment_ids"].reshape(-1)
        np.testing.assert_array_equal(flat_tokens[c], batch["chosen_tokens"][i][batch["chosen_attention_mask"][i] == 1])
        assert len(set(flat_segments[c])) == 1 and set(flat_segments[r]) == {flat_segments[c][0] + 1}
        assert np.all(packed["chosen_packed_index"][i][batch["chosen_attention_mask"][i] == 0] == -1)


def test_microbatches_are_laid_out_for_the_step_split():
    packed = pack_pair_batch(padded_batch(), microbatches=2)
    rows = packed["packed_tokens"].shape[0]
    assert rows % 2 == 0 and all(k in packed for k in PACKED_PAIR_KEYS)
    row_len = packed["packed_tokens"].shape[1]
    batch = padded_batch()
    for i in range(len(CHOSEN)):  # pair i belongs to microbatch i % 2, whose row j is global row 2 * j + i % 2
        real = batch["chosen_attention_mask"][i] == 1
        local = packed["chosen_packed_index"][i][real]
        global_rows = 2 * (local // row_len) + i % 2
        placed = packed["packed_tokens"][global_rows, local % row_len]
        np.testing.assert_array_equal(placed, batch["chosen_tokens"][i][real])


def test_rows_are_as_long_as_the_longest_pair_not_twice_the_padded_width():
    """Short pairs from a wide batch (one long sequence elsewhere sets the width) pack into short rows, so attention,
    quadratic in the row length, does not pay for the padded width; the losses stay equal to the padded batch's."""
    batch = padded_batch((1, 1, 2, 1, 1, 1, 2, 1), (2, 1, 1, 1, 2, 1, 1, 2))
    packed = pack_pair_batch(batch)
    assert packed["packed_tokens"].shape[1] == shape_bucket(2 * PROMPT + 3) == 7 < ROW_FACTOR * WIDTH
    assert pack_pair_batch(batch, row_len=ROW_FACTOR * WIDTH)["packed_tokens"].shape[1] == ROW_FACTOR * WIDTH
    assert_same("sigmoid", params(1), batch)


def test_a_pair_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="more than a packed row"):
        pack_pair_batch(padded_batch(), row_len=WIDTH)


@pytest.mark.parametrize("objective,args", [("kto", ""), ("dro", ""), ("sigmoid", "wpo=true")])
def test_objectives_with_model_extras_refuse_packing(objective, args):
    with pytest.raises(ValueError, match=r"padded outputs .*set dpo.packing=false"):
        PreferenceConfig(objective=objective, objective_args=args, packing=True)
    if not args:
        with pytest.raises(ValueError, match=r"set dpo.packing=false"):
            dpo_loss_fn(MODEL, objective, packing=True)


def test_listwise_refuses_packing_and_default_is_off():
    assert PreferenceConfig().packing is False
    with pytest.raises(ValueError, match="listwise.*dpo.packing=false"):
        PreferenceConfig(objective="plackett_luce", packing=True)


def test_a_packed_loss_on_an_unpacked_batch_says_so():
    loss_fn = dpo_loss_fn(MODEL, "simpo", packing=True)
    with pytest.raises(ValueError, match="pack_pair_batch"):
        loss_fn(params(), None, padded_batch())
