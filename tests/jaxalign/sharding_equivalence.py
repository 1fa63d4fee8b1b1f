"""Runner for tests/jaxalign/test_sharding.py: the real sharded train step on many mesh shapes of 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python sharding_equivalence.py OUT CONFIG MESH[,MESH...] [--errors]

CONFIG is `mha` or `gqa`, each MESH is DATAxFSDPxTENSOR (e.g. 2x2x2). For fixed fp32 parameters and fixed batches
it builds the train state with shardings derived from the logical rules, runs
`jit_train_step(make_train_step(...))` (SFT with 2 accumulation steps, DPO with an online frozen reference) on each
mesh (1x1x1 on ONE device, the others on all 8) and writes to OUT, per run `<config>_<objective>_<mesh>`:

- `.npz`: loss, grad_norm, the exact mean gradient (recorded by a pass-through optimizer stage) and the parameters
  after the update, as flat `name -> array` entries;
- `.json`: the sharding specs and per-device shard shapes of a few parameters and of the batch, whether the donated
  input state was deleted, whether AdamW's moments would be sharded exactly like the parameters, and how many
  sharding constraints the compiled step carries;

and with --errors `errors.json`, the messages of deliberately bad mesh/model combinations on a real 8-device mesh.
The test compares every mesh with the single-device run; this script asserts nothing itself.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.data.position import DataPosition
from jaxalign.models.llama import DecoderLM, ModelConfig, check_model_fits_mesh, init_params
from jaxalign.sharding import MeshConfig, logical_shardings, make_mesh, put_batch
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.state import TrainState
from jaxalign.train.step import dpo_loss_fn, jit_train_step, make_train_step, sft_loss_fn

# Every dimension the rules shard (heads, kv_heads, mlp, vocab over tensor; embed over fsdp) divides by 8.
MHA = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=4, mlp_dim=64, max_len=16)
# Grouped-query attention (2 kv heads: tensor <= 2) with the layers under nn.scan (the 'layers' logical axis).
GQA = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=4, mlp_dim=64, max_len=16,
                  scan_layers=True)
CONFIGS = {"mha": MHA, "gqa": GQA}
WIDTH = 8
SFT_BATCH, SFT_ACCUM = 16, 2  # microbatches of 8 rows: one per batch shard on the (8, 1, 1) and (1, 8, 1) meshes
DPO_PAIRS = 8


def record_gradients() -> optax.GradientTransformation:
    """A pass-through stage whose state is the last gradient it saw, so the step's output state holds the exact
    accumulated gradient, sharded like the parameters."""
    return optax.GradientTransformation(lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (g, g))


# SGD after the recording stage: the optimizer is elementwise, so the real AdamW adds compile time and no sharding
# question; its state's shardings are checked without running it (adam_moments_sharded_like_params).
TX = optax.chain(record_gradients(), optax.sgd(0.1))
ADAMW = make_optimizer(OptimConfig(), total_steps=10)


def fixed_params(cfg: ModelConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(cfg, key)), jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def right_padded(rng, rows: int, prompt: int):
    tokens = rng.integers(1, 64, (rows, WIDTH)).astype(np.int32)
    lengths = rng.integers(1, WIDTH - prompt + 1, rows)
    attention = (np.arange(WIDTH)[None] < prompt + lengths[:, None]).astype(np.int32)
    completion = attention * (np.arange(WIDTH)[None] >= prompt)
    return np.where(attention == 1, tokens, 0), attention, completion


def batches() -> dict:
    rng = np.random.default_rng(0)
    tokens, attention, completion = right_padded(rng, SFT_BATCH, prompt=2)
    sft = {"tokens": tokens, "attention_mask": attention, "completion_mask": completion}
    c_tok, c_att, c_comp = right_padded(rng, DPO_PAIRS, prompt=3)
    r_tok, r_att, r_comp = right_padded(rng, DPO_PAIRS, prompt=3)
    r_tok[:, :3] = c_tok[:, :3]
    dpo = {"chosen_tokens": c_tok, "chosen_attention_mask": c_att, "chosen_completion_mask": c_comp,
           "rejected_tokens": r_tok, "rejected_attention_mask": r_att, "rejected_completion_mask": r_comp}
    return {"sft": sft, "dpo": dpo}


def flat(tree, prefix: str) -> dict:
    return {prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def spec_and_shard(x) -> dict:
    return {"spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
            "shard_shape": list(x.addressable_shards[0].data.shape), "shape": list(x.shape)}


def activation_constraints(step, *args) -> int:
    """How many sharding constraints the step's program carries: the model's logical activation constraints
    (`nn.with_logical_constraint`) only take effect while a mesh is set with `jax.set_mesh`, as the step's call
    does; under the deprecated `with mesh:` flax treated them all as no-ops."""
    with jax.set_mesh(step.mesh):
        return step.jitted.lower(*args).as_text().count("sdy.sharding_constraint")


def run(out_dir: str, name: str, mesh_shapes: list[tuple[int, int, int]]) -> None:
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"
    # The library must not enter a mesh the deprecated way anywhere on the path of a sharded step.
    warnings.filterwarnings("error", message=".*with mesh.*", category=DeprecationWarning)
    data = batches()
    cfg = CONFIGS[name]
    model = DecoderLM(cfg)
    policy, reference = fixed_params(cfg, 0), fixed_params(cfg, 1)
    abstract = jax.eval_shape(lambda r: TrainState.create(init_params(cfg, r), TX, r), jax.random.key(0))
    adam_abstract = jax.eval_shape(lambda r: TrainState.create(init_params(cfg, r), ADAMW, r), jax.random.key(0))
    losses = {"sft": (sft_loss_fn(model), SFT_ACCUM), "dpo": (dpo_loss_fn(model, beta=0.5), 1)}
    for shape in mesh_shapes:
        devices = jax.devices()[:1] if shape == (1, 1, 1) else jax.devices()
        mesh = make_mesh(MeshConfig(*shape), devices)
        check_model_fits_mesh(cfg, mesh)
        state_shardings = logical_shardings(abstract, mesh)
        param_shardings = state_shardings.params
        adam = logical_shardings(adam_abstract, mesh)
        adam_like_params = all(
            all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                lambda a, b: a == b, optax.tree_utils.tree_get(adam.opt_state, moment), adam.params)))
            for moment in ("mu", "nu"))
        for objective, (loss_fn, accum) in losses.items():
            start = time.perf_counter()
            # Fresh device buffers from host arrays for every run (the step donates the state).
            state = jax.device_put(TrainState.create(policy, TX, jax.random.key(0)), state_shardings)
            frozen = jax.device_put(reference, param_shardings) if objective == "dpo" else None
            batch = put_batch(data[objective], mesh)
            step = jit_train_step(make_train_step(loss_fn, accum), mesh, state_shardings,
                                  param_shardings if objective == "dpo" else None)
            constraints = activation_constraints(step, state, frozen, batch, DataPosition.start())
            old_leaves = jax.tree_util.tree_leaves_with_path(state)
            new_state, metrics = step(state, frozen, batch, DataPosition.start())
            jax.block_until_ready(new_state)
            tag = f"{name}_{objective}_{'x'.join(map(str, shape))}"
            grads = new_state.opt_state[0]
            np.savez(os.path.join(out_dir, tag + ".npz"), loss=np.asarray(metrics["loss"]),
                     grad_norm=np.asarray(metrics["grad_norm"]), **flat(grads, "grad"),
                     **flat(new_state.params, "param"))
            layer = new_state.params["layers"] if cfg.scan_layers else new_state.params["layer_0"]
            facts = {
                "mesh": dict(mesh.shape),
                "devices": len(mesh.devices.flat),
                "q_kernel": spec_and_shard(layer["attn"]["q"]["kernel"]),
                "k_kernel": spec_and_shard(layer["attn"]["k"]["kernel"]),
                "mlp_down": spec_and_shard(layer["mlp"]["down"]["kernel"]),
                "embedding": spec_and_shard(new_state.params["embed"]["embedding"]),
                "embedding_grad": spec_and_shard(grads["embed"]["embedding"]),
                "batch": {k: spec_and_shard(v) for k, v in batch.items()},
                "donated_state_deleted": {jax.tree_util.keystr(path): bool(x.is_deleted()) for path, x in old_leaves},
                "adam_moments_sharded_like_params": adam_like_params,
                "activation_constraints": constraints,
                "seconds": time.perf_counter() - start,
            }
            with open(os.path.join(out_dir, tag + ".json"), "w") as f:
                json.dump(facts, f, indent=1)
            print(f"{tag}: loss {float(metrics['loss']):.6f} in {facts['seconds']:.1f}s", file=sys.stderr, flush=True)


def bad_configurations(out_dir: str) -> None:
    """The ValueError messages of bad mesh / model combinations on a real 8-device mesh (None: no error)."""
    errors = {}
    for tag, fn in (
        ("mesh_3_devices", lambda: make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))),
        ("mesh_fsdp_3", lambda: make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))),
        ("kv_heads_tensor_8", lambda: check_model_fits_mesh(GQA, make_mesh(MeshConfig(1, 1, 8)))),
    ):
        try:
            fn()
            errors[tag] = None
        except ValueError as error:
            errors[tag] = str(error)
    with open(os.path.join(out_dir, "errors.json"), "w") as f:
        json.dump(errors, f, indent=1)


if __name__ == "__main__":
    out, config, meshes = sys.argv[1:4]
    run(out, config, [tuple(int(n) for n in mesh.split("x")) for mesh in meshes.split(",")])
    if "--errors" in sys.argv[4:]:
        bad_configurations(out)
