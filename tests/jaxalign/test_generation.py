"""`jaxalign.generation` and `jaxalign generate`: text from a checkpoint without a TrainState template.

Each run directory here is written by the library's own checkpointer (a random tiny ARITH model, an SFT phase and a
LoRA "dpo" phase on it), and every greedy completion is checked against an independent decode: the full forward
pass recomputed for every new token (no KV cache), with the LoRA adapters merged by hand.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.generation import generate_text, load_policy, resolve_step_dir
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.models.lora import LoraConfig, init_lora
from jaxalign.sampling import SamplingConfig
from jaxalign.sharding import MeshConfig, make_mesh
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
from jaxalign.train.setup import sharded_train_state
from jaxalign.train.state import TrainState

MODEL = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                    max_len=24)
LORA = LoraConfig(rank=2, alpha=4.0, targets=("attn/q", "attn/v"))
PROMPTS = ["1+2+3=", "9+8="]
TOK = CharTokenizer()


def _save(directory: Path, state: TrainState, metadata: dict) -> None:
    with Checkpointer(str(directory), CheckpointConfig(every_steps=1, keep_last=3), metadata) as ckpt:
        ckpt.save(state, force=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """WORKDIR with config.json (an ARITH run: a `task` section), checkpoints/sft/{3,5} and checkpoints/dpo/2
    (LoRA adapters with non-zero B, so the merge matters). Returns (workdir, sft params, adapters)."""
    workdir = tmp_path_factory.mktemp("run")
    (workdir / "config.json").write_text(json.dumps({"task": {"num_operands": 3}, "seed": 0}))
    mesh = make_mesh(MeshConfig())
    state, _ = sharded_train_state(MODEL, optax.sgd(0.1), mesh, jax.random.key(0))
    meta = {"phase": "sft", "model": dataclasses.asdict(MODEL)}
    _save(workdir / "checkpoints" / "sft", state.replace(step=jnp.asarray(3)), meta)
    sft = jax.tree_util.tree_map(lambda x: x * 1.5, state.params)  # the newest SFT step differs from the older
    _save(workdir / "checkpoints" / "sft", state.replace(step=jnp.asarray(5), params=sft), meta)
    boxed = jax.eval_shape(lambda key: init_params(MODEL, key), jax.random.key(0))
    adapters = nn.meta.unbox(init_lora(boxed, LORA, jax.random.key(1)))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.3, adapters)  # B = 0 at init would make the merge a no-op
    lora_state = TrainState.create(adapters, optax.sgd(0.1), jax.random.key(2)).replace(step=jnp.asarray(2))
    _save(workdir / "checkpoints" / "dpo", lora_state,
          {"phase": "dpo", "model": dataclasses.asdict(MODEL), "lora": dataclasses.asdict(LORA)})
    return workdir, sft, adapters


@jax.jit
def _full_forward(params, tokens, mask):
    return DecoderLM(MODEL).apply({"params": params}, tokens, mask)[0]


def reference_greedy(params, prompt: str, steps: int) -> str:
    """Greedy decoding by recomputing the whole forward pass for every token (no cache), up to EOS: the sequence
    right-padded to the context length (causal attention: position n never sees what follows it)."""
    ids = TOK.encode(prompt)
    out = []
    for _ in range(steps):
        row = ids + out
        tokens = np.zeros((1, MODEL.max_len), np.int32)
        mask = np.zeros((1, MODEL.max_len), np.int32)
        tokens[0, :len(row)], mask[0, :len(row)] = row, 1
        logits = _full_forward(params, tokens, mask)[0, len(row) - 1, :TOK.vocab_size].at[TOK.PAD_ID].set(-jnp.inf)
        token = int(jnp.argmax(logits))
        if token == TOK.EOS_ID:
            break
        out.append(token)
    return TOK.decode(out)


def merged_by_hand(base, adapters):
    """W0 + (alpha / rank) A B for every adapted kernel (A [in, r], B [r, *out]), in NumPy, walking the tree."""
    out = jax.tree_util.tree_map(np.asarray, base)
    for layer, modules in adapters.items():
        for module, projections in modules.items():
            for name, node in projections.items():
                a, b = np.asarray(node["kernel"]["a"]), np.asarray(node["kernel"]["b"])
                kernel = out[layer][module][name]["kernel"]
                out[layer][module][name]["kernel"] = kernel + LORA.alpha / LORA.rank * np.tensordot(a, b, axes=1)
    return out


def test_step_resolution(run_dir):
    workdir, _, _ = run_dir
    assert resolve_step_dir(str(workdir)).endswith("checkpoints/dpo/2")  # dpo is the default phase
    assert resolve_step_dir(str(workdir), phase="sft").endswith("checkpoints/sft/5")  # the newest step
    assert resolve_step_dir(str(workdir / "checkpoints" / "sft"), step=3).endswith("sft/3")
    with pytest.raises(ValueError, match="no step 4; saved steps: 3, 5"):
        resolve_step_dir(str(workdir / "checkpoints" / "sft"), step=4)
    with pytest.raises(ValueError, match="no phase 'rl'; phases with checkpoints: dpo, sft"):
        resolve_step_dir(str(workdir), phase="rl")


def test_greedy_completions_of_the_sft_checkpoint_match_a_full_recompute(run_dir):
    workdir, sft, _ = run_dir
    policy = load_policy(str(workdir), phase="sft")
    assert policy.model == MODEL
    texts = generate_text(policy, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert texts == [reference_greedy(sft, p, 12) for p in PROMPTS]


def test_a_lora_checkpoint_is_merged_into_the_runs_sft_policy(run_dir):
    workdir, sft, adapters = run_dir
    policy = load_policy(str(workdir))
    merged = merged_by_hand(sft, adapters)
    for got, want in zip(jax.tree_util.tree_leaves(policy.params), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    texts = generate_text(policy, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert texts == [reference_greedy(merged, p, 12) for p in PROMPTS]
    assert texts != generate_text(load_policy(str(workdir), phase="sft"), PROMPTS,
                                  SamplingConfig(max_new_tokens=12, temperature=0.0))


def test_the_command_prints_and_writes_jsonl_and_refuses_bad_input_in_one_line(run_dir, tmp_path, capsys):
    from launch.cli import main

    workdir, sft, _ = run_dir
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--checkpoint", str(workdir), "--phase", "sft", "--prompt", PROMPTS[0], "--prompt",
                 PROMPTS[1], "--max-new-tokens", "12", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": p, "completion": reference_greedy(sft, p, 12)} for p in PROMPTS]

    for argv, message in [
        (["--checkpoint", str(workdir), "--prompt", "1+1=", "--out", str(out)],
         f"--out {out} exists; choose another file (nothing is overwritten)"),
        (["--checkpoint", str(tmp_path / "nothing"), "--prompt", "1+1="], "no such directory"),
        (["--checkpoint", str(workdir), "--prompt", "1+2+3=", "--max-new-tokens", "40"],
         "exceeds the model's context of 24"),
    ]:
        assert main(["generate", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxalign: error: ") and message in err and len(err.splitlines()) == 1, err
