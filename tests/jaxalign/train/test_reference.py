"""Reference strategies (jaxalign.train.reference): TR-DPO's periodic sync, the reference tracked in the train state
and checkpointed with it, and precomputed reference log-probs cached on disk under a content hash."""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.position import DataPosition
from jaxalign.logprobs import pair_token_logprobs
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.reference import (
    ReferenceSync,
    cached_reference_logprobs,
    compute_reference_logprobs,
    reference_cache_key,
    sync_reference,
)
from jaxalign.train.state import TrainState
from jaxalign.train.step import dpo_loss_fn, logits_fn, make_train_step

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, max_len=8)
MODEL = DecoderLM(CFG)
TOKENIZATION = {"vocab": "0123456789+=;", "pad": 0, "eos": 1}


def _params(seed: int):
    return nn.meta.unbox(init_params(CFG, jax.random.key(seed)))


def _pairs(n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(2, 16, (n, 8)).astype(np.int32)
        lengths = rng.integers(1, 6, n)
        completion = (np.arange(8)[None] >= 2) & (np.arange(8)[None] < 2 + lengths[:, None])
        attention = np.arange(8)[None] < 2 + lengths[:, None]
        data[f"{side}_tokens"] = np.where(attention, tokens, 0).astype(np.int32)
        data[f"{side}_attention_mask"] = attention.astype(np.int32)
        data[f"{side}_completion_mask"] = completion.astype(np.int32)
    return data


# ----------------------------------------------------------------------------------------------------------------
# TR-DPO sync


def test_sync_reference_hard_and_soft_updates_happen_only_every_k_steps():
    reference, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}
    hard, soft = ReferenceSync(every=4, alpha=1.0), ReferenceSync(every=4, alpha=0.25)
    for step in (1, 2, 3, 5):
        np.testing.assert_array_equal(sync_reference(reference, params, jnp.int32(step), hard)["w"], [1.0, 2.0])
    np.testing.assert_array_equal(sync_reference(reference, params, jnp.int32(8), hard)["w"], [3.0, 6.0])
    np.testing.assert_allclose(sync_reference(reference, params, jnp.int32(4), soft)["w"], [1.5, 3.0])
    assert sync_reference(reference, params, jnp.int32(4), ReferenceSync()) is reference  # every=0: never


@pytest.mark.parametrize("bad", [{"every": -1}, {"every": 2.5}, {"alpha": 0.0}, {"alpha": 1.5}])
def test_reference_sync_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="reference sync"):
        ReferenceSync(**bad)


def test_train_step_with_tracked_reference_syncs_it_and_matches_a_fixed_reference_before_the_sync():
    """Two steps with the reference in the state and sync every 2 steps: step 1 equals training against the fixed
    initial reference; after step 2 the reference is the policy (hard update)."""
    params = _params(0)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), total_steps=10)
    batch = {k: jnp.asarray(v) for k, v in _pairs().items()}
    position = DataPosition.start()
    loss = dpo_loss_fn(MODEL, beta=0.5)
    tracked_step = jax.jit(make_train_step(loss, reference_sync=ReferenceSync(every=2, alpha=1.0)))
    fixed_step = jax.jit(make_train_step(loss))

    tracked = TrainState.create(params, tx, jax.random.key(0), reference=params)
    fixed = TrainState.create(params, tx, jax.random.key(0))
    tracked, tracked_metrics = tracked_step(tracked, None, batch, position)
    fixed, fixed_metrics = fixed_step(fixed, params, batch, position)
    np.testing.assert_allclose(tracked_metrics["loss"], fixed_metrics["loss"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(tracked.params), jax.tree_util.tree_leaves(fixed.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(tracked.reference), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)  # not yet synced after one step

    tracked, _ = tracked_step(tracked, None, batch, position)
    for a, b in zip(jax.tree_util.tree_leaves(tracked.reference), jax.tree_util.tree_leaves(tracked.params)):
        np.testing.assert_array_equal(a, b)  # hard sync after step 2
    assert not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree_util.tree_leaves(tracked.reference), jax.tree_util.tree_leaves(params)))


def test_tracked_reference_round_trips_through_a_checkpoint(tmp_path):
    params, moved = _params(0), _params(1)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), total_steps=10)
    state = TrainState.create(moved, tx, jax.random.key(0), reference=params).replace(step=jnp.int32(3))
    with Checkpointer(str(tmp_path), CheckpointConfig(every_steps=1, keep_last=1), metadata={"test": 1}) as ckpt:
        ckpt.save(state, force=True)
        ckpt.wait()
        template = TrainState.create(_params(2), tx, jax.random.key(1), reference=_params(2))
        restored = ckpt.restore_latest(template)
    for a, b in zip(jax.tree_util.tree_leaves(restored.reference), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# precomputed, cached reference log-probs


def test_cache_key_changes_with_parameters_data_and_tokenisation_and_only_then():
    params, data = _params(0), _pairs()
    key = reference_cache_key(params, data, TOKENIZATION)
    assert reference_cache_key(_params(0), {k: v.copy() for k, v in data.items()}, dict(TOKENIZATION)) == key
    nudged = jax.tree_util.tree_map(lambda x: x, params)
    nudged["final_norm"]["scale"] = nudged["final_norm"]["scale"].at[0].add(1e-3)
    assert reference_cache_key(nudged, data, TOKENIZATION) != key
    other_data = dict(data, rejected_tokens=data["rejected_tokens"].copy())
    other_data["rejected_tokens"][0, 2] = (other_data["rejected_tokens"][0, 2] + 1) % 16
    assert reference_cache_key(params, other_data, TOKENIZATION) != key
    assert reference_cache_key(params, data, dict(TOKENIZATION, eos=2)) != key
    # arrays the log-probs do not depend on (e.g. already-cached reference log-probs) do not enter the key
    assert reference_cache_key(params, dict(data, reference_chosen=np.zeros(3)), TOKENIZATION) == key


def test_cached_logprobs_equal_the_online_reference_and_are_reused_from_disk(tmp_path):
    params, data = _params(0), _pairs(10)
    apply = logits_fn(MODEL)
    arrays, info = cached_reference_logprobs(str(tmp_path), apply, params, data, TOKENIZATION, batch_size=4)
    assert not info["hit"] and os.path.exists(info["path"])
    chosen, rejected = pair_token_logprobs(apply, params, {k: jnp.asarray(v) for k, v in data.items()})
    np.testing.assert_allclose(arrays["reference_chosen"], chosen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["reference_rejected"], rejected, rtol=1e-5, atol=1e-6)

    again, info2 = cached_reference_logprobs(str(tmp_path), apply, params, data, TOKENIZATION, batch_size=4)
    assert info2["hit"] and info2["path"] == info["path"]
    np.testing.assert_array_equal(again["reference_chosen"], arrays["reference_chosen"])

    _, info3 = cached_reference_logprobs(str(tmp_path), apply, _params(1), data, TOKENIZATION, batch_size=4)
    assert not info3["hit"] and info3["path"] != info["path"]  # new reference parameters: recomputed


def test_compute_reference_logprobs_is_independent_of_the_batch_size():
    params, data = _params(0), _pairs(10)
    apply = logits_fn(MODEL)
    a = compute_reference_logprobs(apply, params, data, batch_size=3)
    b = compute_reference_logprobs(apply, params, data, batch_size=10)
    np.testing.assert_allclose(a["reference_chosen"], b["reference_chosen"], rtol=1e-5, atol=1e-6)


def test_a_corrupt_cache_file_is_one_clear_error_naming_it(tmp_path):
    params, data = _params(0), _pairs(4)
    apply = logits_fn(MODEL)
    _, info = cached_reference_logprobs(str(tmp_path), apply, params, data, TOKENIZATION, batch_size=4)
    with open(info["path"], "wb") as f:
        f.write(b"not an npz file")
    with pytest.raises(ValueError, match="unreadable.*delete the") as err:
        cached_reference_logprobs(str(tmp_path), apply, params, data, TOKENIZATION, batch_size=4)
    assert info["path"] in str(err.value)
