"""`jaxalign bench logprob-memory`: peak memory of the compiled DPO step with materialised vs chunked log-probs.

The gradient of the DPO loss (sigmoid, online reference, `dpo_loss_fn`) on one pair is compiled twice: with the
[2, time, vocab] fp32 logits materialised (the default) and with `logprob_chunk=C` (`chunked_token_logprobs`:
the logits exist `C` positions at a time and are recomputed in the backward pass). XLA's own accounting of the
compiled executables (`jitted.lower(...).compile().memory_analysis()`: temporaries, arguments, outputs) gives the
peak each needs; both steps then run once on the same batch and their losses and gradients are compared. Memory is
a property of the compiled program, not of the machine's load, so this number does not vary between runs.

Defaults: a Llama-3-sized vocabulary (128,256) and 1,024-token sequences on a one-layer model of width 256.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import paths
from jaxalign.bench.report import load_average
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.train.step import accumulated_gradients, dpo_loss_fn


def _batch(vocab: int, length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    half = length // 2
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(1, vocab, (1, length)).astype(np.int32)
        completion = np.zeros((1, length), np.int32)
        completion[:, half:] = 1
        batch.update({f"{side}_tokens": tokens, f"{side}_attention_mask": np.ones((1, length), np.int32),
                      f"{side}_completion_mask": completion})
    batch["rejected_tokens"][:, :half] = batch["chosen_tokens"][:, :half]  # the same prompt
    return batch


def measure(vocab: int, length: int, d_model: int, chunk: int, seed: int = 0) -> dict:
    """Compiled memory of both steps and the largest loss and gradient differences between them."""
    cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=1, n_heads=4, n_kv_heads=2,
                      head_dim=d_model // 4, mlp_dim=2 * d_model, max_len=length)
    model = DecoderLM(cfg)
    params = jax.jit(lambda key: nn.meta.unbox(init_params(cfg, key)))(jax.random.key(seed))
    reference = jax.tree_util.tree_map(lambda x: x * 0.99, params)
    batch = {k: jnp.asarray(v) for k, v in _batch(vocab, length, seed).items()}
    rows = {}
    for name, c in (("materialised", 0), (f"chunked ({chunk})", chunk)):
        step = jax.jit(lambda p, r, b, c=c: accumulated_gradients(dpo_loss_fn(model, "sigmoid", beta=0.1,
                                                                              logprob_chunk=c), p, r, b, 1))
        compiled = step.lower(params, reference, batch).compile()
        stats = compiled.memory_analysis()
        clock = time.perf_counter()
        loss, grads, _ = jax.block_until_ready(compiled(params, reference, batch))
        rows[name] = {"temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
                      "output_bytes": int(stats.output_size_in_bytes), "seconds": time.perf_counter() - clock,
                      "loss": float(loss), "grads": grads}
    (base, chunked) = rows.values()
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(base["grads"]),
                                                                      jax.tree_util.tree_leaves(chunked["grads"])))
    grad_scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(base["grads"]))
    for row in rows.values():
        row.pop("grads")
    return {"vocab": vocab, "length": length, "d_model": d_model, "chunk": chunk, "variants": rows,
            "temp_ratio": base["temp_bytes"] / max(chunked["temp_bytes"], 1),
            "loss_abs_diff": abs(base["loss"] - chunked["loss"]), "grad_max_abs_diff": grad_diff,
            "grad_max_abs": grad_scale}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="jaxalign bench logprob-memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--out", default=None, help="directory for logprob_memory.json (refused if it exists)")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if min(args.vocab, args.length, args.d_model, args.chunk) < 1 or args.d_model % 4:
        parser.error("--vocab, --length, --d-model, --chunk must be >= 1 and --d-model a multiple of 4")
    result = measure(args.vocab, args.length, args.d_model, args.chunk)
    load = load_average()
    print(f"machine: {jax.devices()[0]} ({jax.default_backend()}), 1-min load {load:.1f} (memory does not depend "
          f"on load); vocab {args.vocab}, {args.length} tokens x 2 sequences, d_model {args.d_model}")
    print(f"{'variant':<22} {'temp MiB':>10} {'args MiB':>10} {'loss':>12} {'seconds':>8}")
    for name, row in result["variants"].items():
        print(f"{name:<22} {row['temp_bytes'] / 2**20:>10.1f} {row['argument_bytes'] / 2**20:>10.1f} "
              f"{row['loss']:>12.6f} {row['seconds']:>8.2f}")
    print(f"peak temporaries materialised / chunked: {result['temp_ratio']:.1f}x; |loss difference| "
          f"{result['loss_abs_diff']:.2e}; max |gradient difference| {result['grad_max_abs_diff']:.2e} "
          f"(largest gradient entry {result['grad_max_abs']:.2e})")
    if args.out:
        paths.makedirs(args.out)
        path = paths.join(args.out, "logprob_memory.json")
        if paths.exists(path):  # never overwrite an earlier measurement
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        paths.write_atomic(path, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
