"""DPO through LoRA adapters (jaxalign.train.step.lora_loss_fn, jaxalign.train.setup.sharded_lora_train_state):
the frozen base serving as the reference gives step for step the same losses as an explicit separate reference
copy, the loss starts at log 2, only the adapters train (and only they have optimizer state), a LoRA run
checkpoints and resumes exactly, and the merged policy exports to a plain checkpoint."""
from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.position import DataPosition
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.models.lora import LoraConfig, adapter_paths, apply_lora, merge_lora, param_paths
from jaxalign.sharding import MeshConfig, make_mesh
from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.setup import sharded_lora_train_state
from jaxalign.train.state import TrainState
from jaxalign.train.reference import compute_reference_logprobs
from jaxalign.train.step import dpo_loss_fn, jit_train_step, logits_fn, lora_loss_fn, make_train_step

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_len=16)
MODEL = DecoderLM(CFG)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("attn/(q|v)", "mlp/(up|down)"))
DPO = dpo_loss_fn(MODEL, beta=0.5)
LORA_DPO = lora_loss_fn(DPO, LORA)
# No warmup and no clipping in reach, so every step moves the adapters by a visible amount.
TX = make_optimizer(OptimConfig(learning_rate=3e-2, warmup_steps=0, weight_decay=0.0, clip_norm=1e6), total_steps=8)
STEPS, PAIRS, WIDTH, PROMPT = 4, 4, 8, 3
MESH = make_mesh(MeshConfig(), jax.devices()[:1])
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def base_numpy() -> dict:
    """The frozen base: fp32 parameters of CFG's shapes drawn with NumPy (host arrays, never donated)."""
    rng = np.random.default_rng(0)
    shapes = nn.meta.unbox(jax.eval_shape(lambda key: init_params(CFG, key), jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: ((1.0 + 0.1 * rng.standard_normal(x.shape)) if "scale" in jax.tree_util.keystr(path)
                         else 0.3 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def preference_batch(seed: int) -> dict:
    """PAIRS random (chosen, rejected) pairs sharing their PROMPT-token prompts, completions of unequal lengths."""
    rng = np.random.default_rng(100 + seed)
    prompt = rng.integers(1, CFG.vocab_size, (PAIRS, PROMPT))
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = np.concatenate([prompt, rng.integers(1, CFG.vocab_size, (PAIRS, WIDTH - PROMPT))], axis=1)
        lengths = rng.integers(1, WIDTH - PROMPT + 1, PAIRS)
        attention = (np.arange(WIDTH)[None] < PROMPT + lengths[:, None]).astype(np.int32)
        completion = attention * (np.arange(WIDTH)[None] >= PROMPT)
        batch.update({f"{side}_tokens": (tokens * attention).astype(np.int32), f"{side}_attention_mask": attention,
                      f"{side}_completion_mask": completion.astype(np.int32)})
    return batch


def position(step: int) -> DataPosition:
    return DataPosition(epoch=jnp.zeros((), jnp.int32), offset=jnp.asarray(PAIRS * (step + 1), jnp.int32))


@functools.lru_cache(maxsize=None)
def lora_setup():
    """(fresh LoRA state, its shardings, the base placed on the mesh, the jitted sharded step)."""
    state, shardings, base_shardings = sharded_lora_train_state(CFG, LORA, TX, MESH, jax.random.key(0))
    base = jax.device_put(base_numpy(), base_shardings)
    step = jit_train_step(make_train_step(LORA_DPO), MESH, shardings, base_shardings)
    return state, shardings, base, step


def fresh_lora_state() -> TrainState:
    return jax.tree_util.tree_map(jnp.copy, lora_setup()[0])  # the step donates its state: never the cached one


def run(step, state, frozen, steps: range):
    losses = []
    for i in steps:
        state, metrics = step(state, frozen, preference_batch(i), position(i))
        losses.append(float(metrics["loss"]))
    return state, losses


@functools.lru_cache(maxsize=None)
def shared_base_run():
    """STEPS LoRA DPO steps whose reference is the frozen base itself: (initial adapters, final state, losses)."""
    _, _, base, step = lora_setup()
    initial = jax.device_get(fresh_lora_state().params)
    state, losses = run(step, fresh_lora_state(), base, range(STEPS))
    return initial, state, losses


def to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


# ---------------------------------------------------------------------------------------------------------------


def test_shared_base_reference_equals_an_explicit_separate_reference_model():
    """THE property: the base-as-reference is exactly a separate reference copy. The comparison run closes over the
    base for the policy (W0 + s A B) and receives an independent copy of it, in its own buffers, as the reference;
    same adapters, optimizer and batches. The losses agree step by step, starting at log 2 (policy == reference,
    because B = 0), and then move away from it."""
    _, shared_state, shared_losses = shared_base_run()
    base_const = jax.tree_util.tree_map(jnp.asarray, base_numpy())  # constants of the jitted step

    def explicit_loss(adapters, reference, batch):
        return DPO(apply_lora(base_const, adapters, LORA), reference, batch)

    reference = jax.tree_util.tree_map(lambda x: jnp.asarray(np.array(x, copy=True)), base_numpy())
    step = fast_jit(make_train_step(explicit_loss))
    explicit_state, explicit_losses = run(step, fresh_lora_state(), reference, range(STEPS))

    assert abs(shared_losses[0] - math.log(2.0)) < 1e-6
    assert abs(explicit_losses[0] - math.log(2.0)) < 1e-6
    np.testing.assert_allclose(shared_losses, explicit_losses, rtol=1e-6, atol=1e-6)
    assert all(abs(loss - math.log(2.0)) > 1e-3 for loss in shared_losses[1:]), shared_losses
    # Adam divides by sqrt(v): near-zero gradient entries amplify rounding differences, hence 1e-5 on the
    # adapters (each step moves them by up to the learning rate, 3e-2).
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
                           to_numpy(shared_state.params), to_numpy(explicit_state.params))


def test_only_the_adapters_train_and_the_base_gets_no_gradient():
    initial, state, _ = shared_base_run()
    _, _, base, _ = lora_setup()
    # The frozen base is untouched after the steps, bit for bit.
    jax.tree_util.tree_map(np.testing.assert_array_equal, to_numpy(base), base_numpy())
    # The trainable state is the adapters: every A and every B moved (B from zero at step 0, A once B was nonzero).
    assert adapter_paths(state.params) == adapter_paths(initial) == [
        "layer_0/attn/q/kernel", "layer_0/attn/v/kernel", "layer_0/mlp/down/kernel", "layer_0/mlp/up/kernel"]
    for path, before in param_paths(initial).items():
        after = np.asarray(param_paths(state.params)[path])
        assert not np.allclose(after, before), path
        if path.endswith("/b"):
            assert not np.any(before), path
    # The loss sees the base under stop_gradient: its gradient with respect to the base is exactly zero, while the
    # same function has a nonzero gradient with respect to the adapters.
    batch = preference_batch(0)
    grad_base = fast_jit(jax.grad(lambda b, a: LORA_DPO(a, b, batch)[0]))(base, state.params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grad_base))


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_optimizer_state_covers_only_the_adapters():
    state = lora_setup()[0]
    adapter_bytes = tree_bytes(state.params)
    float_leaves = [x for x in jax.tree_util.tree_leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    # AdamW's two moments, each shaped like the adapters (4 matrices x 2 factors = 8 leaves each), plus counters.
    assert len(float_leaves) == 2 * len(jax.tree_util.tree_leaves(state.params)) == 16
    assert sum(x.size * x.dtype.itemsize for x in float_leaves) == 2 * adapter_bytes
    # r (in + out) per adapted matrix: q 4*(32+32), v 4*(32+16), up 4*(32+64), down 4*(64+32), 4 bytes each.
    assert adapter_bytes == 4 * 4 * ((32 + 32) + (32 + 16) + (32 + 64) + (64 + 32))
    # Full fine-tuning would keep both moments for every base parameter: here 8.5 times the memory.
    full = jax.eval_shape(lambda p: TrainState.create(p, TX, jax.random.key(0)), base_numpy())
    full_float = [x for x in jax.tree_util.tree_leaves(full.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sum(x.size * x.dtype.itemsize for x in full_float) == 2 * tree_bytes(base_numpy()) > 8 * 2 * adapter_bytes


def test_lora_run_checkpoints_and_resumes_exactly(tmp_path):
    _, _, base, step = lora_setup()
    _, uninterrupted, losses = shared_base_run()
    meta = {"model": CFG.__dict__, "lora": LORA.__dict__}
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=2), meta) as ckpt:
        state, _ = run(step, fresh_lora_state(), base, range(2))
        assert ckpt.save(state)
        saved = to_numpy(state.replace(rng=jax.random.key_data(state.rng), tx=None))
        restored = ckpt.restore_latest(fresh_lora_state())
    assert int(restored.step) == 2
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           to_numpy(restored.replace(rng=jax.random.key_data(restored.rng), tx=None)), saved)
    resumed, resumed_losses = run(step, restored, base, range(2, STEPS))
    assert resumed_losses == losses[2:]
    jax.tree_util.tree_map(np.testing.assert_array_equal, to_numpy(resumed.params), to_numpy(uninterrupted.params))


def test_merged_adapters_export_to_a_plain_checkpoint_of_the_same_policy(tmp_path):
    _, state, _ = shared_base_run()
    _, _, base, step = lora_setup()
    merged = merge_lora(base, state.params, LORA)
    meta = {"model": CFG.__dict__}
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), meta) as ckpt:
        assert ckpt.save(TrainState.create(merged, TX, jax.random.key(1)), force=True)
        # Restored the way a plain (non-LoRA) run restores its state: nothing about adapters is needed.
        template = jax.eval_shape(lambda p: TrainState.create(p, TX, jax.random.key(2)), base_numpy())
        restored = ckpt.restore_latest(template)
    jax.tree_util.tree_map(np.testing.assert_array_equal, to_numpy(restored.params), to_numpy(merged))
    # The plain policy is the trained LoRA policy: the same DPO loss against the base on a new batch as the LoRA
    # train step reports (its loss is computed before its update).
    batch = preference_batch(STEPS)
    _, metrics = step(jax.tree_util.tree_map(jnp.copy, state), base, batch, position(STEPS))
    plain_loss = fast_jit(lambda p, b: DPO(p, b, batch)[0])(restored.params, base) / PAIRS
    np.testing.assert_allclose(float(plain_loss), float(metrics["loss"]), rtol=1e-6)
    assert abs(float(plain_loss) - math.log(2.0)) > 1e-3


def test_cached_reference_logprobs_of_the_base_give_the_online_loss():
    """The main job's default reference mode: the base's per-token log-probs precomputed into the batch
    (`compute_reference_logprobs`) give the same LoRA DPO loss as the base running online as the reference."""
    _, state, _ = shared_base_run()
    _, _, base, _ = lora_setup()
    batch = preference_batch(STEPS + 1)
    cached = {**batch, **compute_reference_logprobs(logits_fn(MODEL), base, batch, batch_size=PAIRS)}
    loss = fast_jit(lambda adapters, frozen, b: LORA_DPO(adapters, frozen, b)[0] / PAIRS)
    online_loss, cached_loss = float(loss(state.params, base, batch)), float(loss(state.params, base, cached))
    np.testing.assert_allclose(cached_loss, online_loss, rtol=1e-6)
    assert abs(online_loss - math.log(2.0)) > 1e-3


def test_arith_dpo_lora_section_parses_from_the_command_line():
    from jaxalign.experiments.arith_kit import ArithDPOConfig
    from jaxalign.overrides import ConfigError, apply_overrides

    assert ArithDPOConfig().lora.config() is None  # rank 0: full fine-tuning, the default
    cfg = apply_overrides(ArithDPOConfig(), ["lora.rank=4", "lora.alpha=8", "lora.targets=attn/(q|v), mlp/up"])
    assert cfg.lora.config() == LoraConfig(rank=4, alpha=8.0, targets=("attn/(q|v)", "mlp/up"))
    for bad, message in (("lora.rank=-1", "lora.rank must be an integer >= 0, got -1"),
                         ("lora.alpha=0", "lora.alpha must be a finite number > 0"),
                         ("lora.targets=attn/(q", "is not a valid regular expression")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            apply_overrides(ArithDPOConfig(), ["lora.rank=2", bad])
