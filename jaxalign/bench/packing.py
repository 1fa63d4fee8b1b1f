"""`jaxalign bench packing`: effective (non-pad) tokens/s of the DPO step, packed vs padded, on a heavy-tailed mix.

Batches of `--pairs` preference pairs whose completion lengths are log-normal (median `--median`, capped so a
sequence fits `--max-len`) are scored by the jitted DPO gradient (sigmoid, cached reference log-probs in the
batch, `dpo_loss_fn` + `accumulated_gradients`) twice: padded to the batch's longest sequence (dynamic padding,
what a length-bucketing collator does) and packed (`dpo.packing`: `pack_pair_batch`, rows as long as the longest
pair, bucketed, one segment-aware pass). Every batch is run once per variant first (each batch shape compiles once);
then the variants take turns, one batch each, for `--rounds` passes over the batches, each call blocked until
its outputs are ready, so a slow phase of the machine hits both alike. Effective tokens/s = the batches' real
tokens (both attention masks) / the variant's total time. The losses of the two variants are compared per batch.

No TRL column: TRL 1.16's DPOTrainer turns `padding_free=True` off with a warning ("temporarily unavailable after
a refactor") and pads, so there is no packed TRL step to run beside ours.
"""
from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.bench.report import load_average
from jaxalign.data.packing import pack_pair_batch
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.train.step import accumulated_gradients, dpo_loss_fn

PROMPT = 32


def heavy_tailed_batches(count: int, pairs: int, median: float, sigma: float, max_len: int, vocab: int,
                         seed: int) -> list[dict]:
    """Right-padded pair batches (prompt of PROMPT tokens, log-normal completion lengths) padded to their own
    longest sequence, with zero cached reference log-probs (the step's cost does not depend on their values)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        lengths = np.clip(rng.lognormal(np.log(median), sigma, (2, pairs)).astype(int), 1, max_len - PROMPT)
        width = PROMPT + int(lengths.max())
        batch = {}
        prompt = rng.integers(1, vocab, (pairs, PROMPT))
        for side, side_lengths in zip(("chosen", "rejected"), lengths):
            tokens = np.zeros((pairs, width), np.int32)
            attention = np.zeros((pairs, width), np.int32)
            completion = np.zeros((pairs, width), np.int32)
            for i, n in enumerate(side_lengths):
                tokens[i, :PROMPT] = prompt[i]
                tokens[i, PROMPT:PROMPT + n] = rng.integers(1, vocab, n)
                attention[i, :PROMPT + n] = 1
                completion[i, PROMPT:PROMPT + n] = 1
            batch.update({f"{side}_tokens": tokens, f"{side}_attention_mask": attention,
                          f"{side}_completion_mask": completion,
                          f"reference_{side}": np.zeros((pairs, width), np.float32)})
        batches.append(batch)
    return batches


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="jaxalign bench packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--median", type=float, default=200.0)
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal shape of the completion lengths")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if min(args.pairs, args.batches, args.rounds, args.max_len - PROMPT, args.d_model, args.layers) < 1:
        parser.error("--pairs, --batches, --rounds, --d-model, --layers must be >= 1 and --max-len > 32")
    cfg = ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                      head_dim=args.d_model // 4, mlp_dim=int(2.75 * args.d_model), max_len=2 * args.max_len)
    model = DecoderLM(cfg)
    params = jax.jit(lambda key: nn.meta.unbox(init_params(cfg, key)))(jax.random.key(0))
    batches = heavy_tailed_batches(args.batches, args.pairs, args.median, args.sigma, args.max_len, cfg.vocab_size, 0)
    variants = {
        "padded": (jax.jit(lambda p, b: accumulated_gradients(dpo_loss_fn(model, "sigmoid"), p, None, b, 1)),
                   batches),
        "packed": (jax.jit(lambda p, b: accumulated_gradients(dpo_loss_fn(model, "sigmoid", packing=True), p, None,
                                                              b, 1)),
                   [pack_pair_batch(b) for b in batches]),
    }
    real = sum(int(b[f"{s}_attention_mask"].sum()) for b in batches for s in ("chosen", "rejected"))
    padded_cells = sum(2 * b["chosen_tokens"].size for b in batches)
    packed_cells = sum(b["packed_tokens"].size for b in variants["packed"][1])
    losses = {name: [float(step(params, jax.tree_util.tree_map(jnp.asarray, b))[0]) for b in data]
              for name, (step, data) in variants.items()}  # compiles every batch shape
    seconds = dict.fromkeys(variants, 0.0)
    device_batches = {name: [jax.tree_util.tree_map(jnp.asarray, b) for b in data]
                      for name, (_, data) in variants.items()}
    for _ in range(args.rounds):
        for i in range(len(batches)):
            for name, (step, _) in variants.items():
                clock = time.perf_counter()
                jax.block_until_ready(step(params, device_batches[name][i]))
                seconds[name] += time.perf_counter() - clock
    rate = {name: args.rounds * real / seconds[name] for name in variants}
    load = load_average()
    print(f"machine: {jax.devices()[0]} ({jax.default_backend()}), 1-min load average {load:.1f}; "
          f"{args.batches} batches x {args.pairs} pairs, completion lengths log-normal (median {args.median:g}, "
          f"sigma {args.sigma:g}, at most {args.max_len - PROMPT}), model d_model {args.d_model}, {args.layers} layers")
    print(f"real tokens {real:,}; padded cells {padded_cells:,} (fill {real / padded_cells:.2f}); packed cells "
          f"{packed_cells:,} (fill {real / packed_cells:.2f})")
    for name in variants:
        print(f"{name:<7} {rate[name]:>12,.0f} effective tokens/s ({seconds[name]:.2f} s for {args.rounds} rounds)")
    diff = max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"]))
    print(f"packed / padded: {rate['packed'] / rate['padded']:.2f}x; max |loss difference| over batches {diff:.1e}")
    return {"rate": rate, "ratio": rate["packed"] / rate["padded"], "loss_max_abs_diff": diff,
            "fill_padded": real / padded_cells, "fill_packed": real / packed_cells, "load": load}


if __name__ == "__main__":
    main()
