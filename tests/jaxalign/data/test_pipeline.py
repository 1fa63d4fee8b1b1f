"""Tests for jaxalign.data.pipeline: bucketed, sharded, deterministic batches that resume exactly from a checkpoint."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.data import iterator
from jaxalign.data.iterator import ArrayDataset
from jaxalign.data.pipeline import BucketedDataset, batches, epoch_plan, fingerprint
from jaxalign.data.position import DataPosition
from jaxalign.data.tokenize import TokenizeConfig, char_tokenizer, tokenize_records
from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer, CheckpointMismatchError
from jaxalign.train.state import TrainState

N, WIDTH, BOUNDS = 41, 32, (12, 18)  # buckets of 12, 20 and 9 rows: 10 batches of 4 per epoch


def arith_records(n: int = N, seed: int = 0) -> list[dict]:
    """ARITH-style pairs of varied lengths (1 to 6 digit operands), tokenized with the built-in tokenizer."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, 7)))) for _ in range(2))
        out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1), "line": i + 1})
    return out


@pytest.fixture(scope="module")
def tokenized():
    return tokenize_records("pairwise", arith_records(), char_tokenizer(), TokenizeConfig(max_length=WIDTH))


def take(dataset, steps, batch_size=4, seed=3, position=None, process_index=0, process_count=1):
    position = DataPosition.start() if position is None else position
    out = []
    for _ in range(steps):
        batch, position = iterator.batch_at(dataset, position, batch_size, seed, process_index, process_count)
        out.append(batch)
    return out, position


def test_without_buckets_the_batches_are_the_plain_iterators(tokenized):
    """One bucket of the full width: exactly iterator.batch_at's batches on the same arrays, over 3 epochs."""
    bucketed = BucketedDataset.from_tokenized(tokenized)
    plain = ArrayDataset(dict(tokenized.arrays))
    (got, p1), (want, p2) = take(bucketed, 30), take(plain, 30)
    assert (int(p1.epoch), int(p1.offset)) == (int(p2.epoch), int(p2.offset)) == (2, 40)
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_bucketed_batches_share_a_bucket_and_are_cut_to_its_width(tokenized):
    """Every batch's rows come from one bucket; sequence arrays are cut to its bound without losing a real token;
    each epoch uses every example at most once and leaves out exactly the buckets' remainders."""
    data = BucketedDataset.from_tokenized(tokenized, BOUNDS)
    stats = data.epoch_stats(4)
    assert stats["bucket_bounds"] == [12, 18, 32] and stats["bucket_sizes"] == [12, 20, 9]
    assert stats["examples_dropped_per_epoch"] == sum(s % 4 for s in stats["bucket_sizes"])
    per_epoch = stats["batches_per_epoch"]
    widths_seen = set()
    for epoch in range(2):
        rows, widths = epoch_plan(data.lengths, data.bounds, 4, seed=3, epoch=epoch)
        assert len(rows) == per_epoch and len(np.unique(rows)) == rows.size == N - stats["examples_dropped_per_epoch"]
        got, _ = take(data, per_epoch, position=DataPosition(epoch=np.int32(epoch), offset=np.int32(0)))
        for batch, r, w in zip(got, rows, widths):
            lengths = data.lengths[r]
            lower = ([0] + list(data.bounds))[list(data.bounds).index(w)]
            assert (lengths > lower).all() and (lengths <= w).all()
            assert batch["chosen_tokens"].shape == (4, w)
            widths_seen.add(int(w))
            for side in ("chosen", "rejected"):
                full = tokenized.arrays[f"{side}_attention_mask"][r].sum()
                assert batch[f"{side}_attention_mask"].sum() == full
                np.testing.assert_array_equal(batch[f"{side}_tokens"], tokenized.arrays[f"{side}_tokens"][r][:, :w])
    assert widths_seen == {12, 18, 32}
    a, _ = epoch_plan(data.lengths, data.bounds, 4, seed=3, epoch=0)
    b, _ = epoch_plan(data.lengths, data.bounds, 4, seed=3, epoch=1)
    assert not np.array_equal(a, b)


def test_process_slices_tile_the_global_batch(tokenized):
    """Each of 2 processes gets its contiguous half of every global batch, at the batch's one width."""
    data = BucketedDataset.from_tokenized(tokenized, BOUNDS)
    whole, _ = take(data, 12)
    halves = [take(data, 12, process_index=i, process_count=2)[0] for i in range(2)]
    for g, h0, h1 in zip(whole, *halves):
        for k in g:
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), g[k])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        take(data, 1, process_count=3)


TX = optax.sgd(0.1)


def train(dataset, state, steps, batch_size=4, seed=3):
    """A stand-in for the training loop whose parameters depend on every batch seen: params += f(batch)."""
    seen = []
    for _ in range(steps):
        batch, position = iterator.batch_at(dataset, jax.device_get(state.data), batch_size, seed)
        seen.append(batch)
        grads = {"w": -jnp.asarray(batch["chosen_tokens"].sum(axis=0)[:4], jnp.float32)}
        state = state.apply_gradients(grads, data=position)
    return state, seen


@pytest.mark.parametrize("first, second", [(5, 3), (8, 6), (10, 3)])  # mid-epoch; across an epoch; at its end
def test_resume_from_a_checkpoint_continues_exactly(tokenized, tmp_path, first, second):
    """k steps, save the TrainState (its data position included) with the real Checkpointer, restore into a fresh
    state, continue: the batches and the final parameters equal an uninterrupted run's."""
    data = BucketedDataset.from_tokenized(tokenized, BOUNDS)
    assert data.epoch_stats(4)["batches_per_epoch"] == 10
    fresh = lambda: TrainState.create({"w": jnp.zeros(4)}, TX, jax.random.key(0))  # noqa: E731
    meta = {"data": fingerprint(data, 4, 3)}
    straight, all_batches = train(data, fresh(), first + second)

    state, seen = train(data, fresh(), first)
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep_last=2), meta) as ckpt:
        assert ckpt.save(state)
    del state
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep_last=2), meta) as ckpt:
        restored = ckpt.restore_latest(fresh())
    assert int(restored.step) == first
    resumed, rest = train(data, restored, second)
    for a, b in zip(seen + rest, all_batches, strict=True):
        for k in b:
            np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(resumed.params["w"], straight.params["w"])
    total = first + second
    epoch = (total - 1) // 10
    assert (int(resumed.data.epoch), int(resumed.data.offset)) == (epoch, (total - 10 * epoch) * 4)

    other = {"data": fingerprint(data, 4, seed=4)}
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep_last=2), other) as ckpt:
        with pytest.raises(CheckpointMismatchError, match="metadata data is"):
            ckpt.restore_latest(fresh())


def test_batches_generator_and_position_checks(tokenized):
    data = BucketedDataset.from_tokenized(tokenized, BOUNDS)
    gen = batches(data, DataPosition.start(), 4, 3)
    want, _ = take(data, 3)
    for w in want:
        g, _ = next(gen)
        np.testing.assert_array_equal(g["chosen_tokens"], w["chosen_tokens"])
    with pytest.raises(ValueError, match="offset 6 is not a multiple of the batch size 4"):
        data.batch_at(DataPosition(epoch=np.int32(0), offset=np.int32(6)), 4, 3)
    with pytest.raises(ValueError, match="no bucket holds a full batch of 64"):
        data.batch_at(DataPosition.start(), 64, 3)
    with pytest.raises(ValueError, match="share their first dimension"):
        BucketedDataset(dict(tokenized.arrays), tokenized.lengths[:-1])


def test_bucketed_batches_of_your_own_data_train_and_pack(tmp_path):
    """End to end: sample files -> TFDS build -> HF tokenizer -> bucketed batches, which the DPO step trains on
    (loss log 2 when policy = reference, as DPO's loss at init must be) and packing accepts unchanged."""
    import os

    import flax.linen as nn

    from jaxalign.data.packing import pack_pairs
    from jaxalign.data.pipeline import prepare_dataset
    from jaxalign.data.tokenize import load_hf_tokenizer
    from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
    from jaxalign.train.step import dpo_loss_fn, make_train_step

    here = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "data"))
    tok = load_hf_tokenizer(os.path.join(here, "tokenizer"))
    data, results = prepare_dataset("pairwise", os.path.join(here, "preferences", "pairwise_bad.jsonl"),
                                    str(tmp_path), tok, TokenizeConfig(max_length=48), on_error="skip",
                                    boundaries=(24,), batch_size=1)
    assert results["validation"]["rows_skipped"] == 7 and results["examples"] == 2
    assert results["batching"]["bucket_sizes"] == [2, 0]

    cfg = ModelConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32,
                      max_len=48)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(cfg, key)), jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32), shapes)
    loss_fn = dpo_loss_fn(DecoderLM(cfg), beta=0.5)
    # LLVM at -O0: this tiny graph compiles much faster on a small CPU, and the test checks the program, not LLVM.
    step = jax.jit(make_train_step(loss_fn), compiler_options={"xla_backend_optimization_level": 0})
    state = TrainState.create(params, optax.sgd(1e-2), jax.random.key(0))
    batch, position = iterator.batch_at(data, state.data, 2, 0)
    assert batch["chosen_tokens"].shape == (2, 24)
    state, metrics = step(state, params, {k: jnp.asarray(v) for k, v in batch.items()}, position)
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2.0), rtol=1e-5)
    assert int(state.step) == 1 and (int(state.data.epoch), int(state.data.offset)) == (0, 2)

    packed = pack_pairs(batch, row_len=48, pad_id=tok.pad_id)
    real = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    assert int((packed.packed.segment_ids > 0).sum()) == real and not packed.dropped_pairs
    completion = int(batch["chosen_completion_mask"].sum() + batch["rejected_completion_mask"].sum())
    assert int(packed.packed.completion_mask.sum()) == completion


@pytest.mark.parametrize("format, per_row", [("ranked", ("list_scores", "list_valid")), ("trajectory", ("reward",)),
                                             ("unpaired", ("label",))])
def test_every_format_buckets_its_time_axis_only(format, per_row):
    """List arrays [N, K, L] and trajectory step ends are cut on their last axis; per-row values stay whole."""
    import os

    from jaxalign.data import formats
    from jaxalign.data.tokenize import load_hf_tokenizer

    here = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "data"))
    recs, _ = formats.load_records(os.path.join(here, "preferences", f"{format}.jsonl"), format)
    tokenized = tokenize_records(format, recs, load_hf_tokenizer(os.path.join(here, "tokenizer")),
                                 TokenizeConfig(max_length=64))
    data = BucketedDataset.from_tokenized(tokenized, (40,))
    rows, widths = epoch_plan(data.lengths, data.bounds, 1, seed=0, epoch=0)
    for r, w in zip(rows, widths):
        batch, _ = data.batch_at(DataPosition(epoch=np.int32(0), offset=np.int32(list(rows[:, 0]).index(r[0]))), 1, 0)
        for name, full in tokenized.arrays.items():
            if name in per_row:
                np.testing.assert_array_equal(batch[name], full[r])
            else:
                assert batch[name].shape == full[r].shape[:-1] + (w,)
                np.testing.assert_array_equal(batch[name], full[r][..., :w])
                assert not full[r][..., w:].any() or name.endswith("tokens")
