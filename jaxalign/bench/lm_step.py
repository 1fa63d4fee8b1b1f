"""`jaxalign bench lm-step`: forward + backward of a language-model loss, and of attention alone, next to PyTorch.

Two measurements, each interleaved round by round with its baseline in one process (median over `--repeats`):

1. Model: the next-token cross-entropy of `DecoderLM` (a `--size` of `jaxalign bench dpo-throughput`) on
   `--batch` random rows of `--seq-len` tokens, `jax.value_and_grad` jitted, against the same Llama configuration
   as a `transformers.LlamaForCausalLM` (PyTorch SDPA attention, fp32, the DPO benchmark's TRL model) doing
   `loss.backward()` on the same token ids (labels = the ids, so transformers shifts them as we do).
2. Attention core, one layer (the model's heads, batch and length; q, k, v random, gradient of the sum of the
   output with respect to q, k and v), four ways:
   - `grouped`: `llama.grouped_attention` over all keys with a causal mask (the decoding layout, five-axis scores);
   - `head-major`: `llama.head_major_attention` with one query block (every score tile computed, then masked);
   - `head-major, causal blocks`: the same with the four query blocks training uses (10 of 16 tiles computed);
   - `torch SDPA`: `torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)` with the key/value heads
     repeated, the kernel PyTorch's Llama uses on CPU.

This is the evidence behind the README's account of where the DPO step's time goes: how far our forward + backward
is from PyTorch's on the same model, and what the attention layout and causal blocking are worth. Torch gets
`--threads` intra-op threads (default: the usable cores, as XLA's pool). CPU timings move between runs and differ
across machines; compare rows of one run only.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import paths
from jaxalign.bench import dpo_throughput
from jaxalign.bench.report import import_offline, load_average, text_table, write_csv_and_markdown
from jaxalign.models.llama import DecoderLM, grouped_attention, head_major_attention, init_params

MISSING_EXTRA = "the PyTorch side needs the benchmark extra: pip install -e '.[bench]'"
MODEL_COLUMNS = [("implementation", 34, "implementation", "s"), ("ms", 9, "ms", ".1f"),
                 ("vs torch", 9, "ratio_to_torch", ".2f")]
ATTENTION_COLUMNS = [("attention core, fwd + bwd", 34, "implementation", "s"), ("ms", 9, "ms", ".2f"),
                     ("vs torch", 9, "ratio_to_torch", ".2f")]


def interleaved_medians(callables: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable over `repeats` rounds, one call of each per round (after one warm-up call
    each), so that a slow phase of a shared machine hits all of them alike."""
    for fn in callables.values():
        fn()
    seconds = {name: [] for name in callables}
    for _ in range(repeats):
        for name, fn in callables.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def jax_lm_loss_grad(cfg, tokens: np.ndarray):
    """A call that runs our jitted LM-loss value_and_grad on `tokens` to completion."""
    model = DecoderLM(cfg)
    params = jax.jit(lambda key: nn.meta.unbox(init_params(cfg, key)))(jax.random.key(0))

    def loss(p, ids):
        logits, _ = model.apply({"params": p}, ids)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    ids = jnp.asarray(tokens)
    return lambda: jax.block_until_ready(step(params, ids))


def torch_lm_loss_grad(cfg, tokens: np.ndarray, torch, transformers):
    """A call that runs forward + backward of transformers' Llama with the same configuration on `tokens`."""
    from jaxalign.bench.trl_baseline import MODEL_KEYS, _llama

    ids_only = types.SimpleNamespace(eos_token_id=0, pad_token_id=1)
    model = _llama(transformers, {k: getattr(cfg, k) for k in MODEL_KEYS}, ids_only)
    model.train()
    ids = torch.as_tensor(tokens, dtype=torch.long)

    def run():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return run


def attention_inputs(cfg, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape_q = (batch, seq_len, cfg.n_heads, cfg.head_dim)
    shape_kv = (batch, seq_len, cfg.n_kv_heads, cfg.head_dim)
    return {"q": rng.standard_normal(shape_q, np.float32), "k": rng.standard_normal(shape_kv, np.float32),
            "v": rng.standard_normal(shape_kv, np.float32)}


def jax_attention_variants(cfg, inputs: dict[str, np.ndarray]) -> dict:
    """Calls running forward + backward of each of our attention variants on the same q, k, v."""
    seq_len = inputs["q"].shape[1]
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((seq_len, seq_len), bool)), (inputs["q"].shape[0], seq_len, seq_len))
    q, k, v = (jnp.asarray(inputs[n]) for n in "qkv")
    variants = {
        "jaxalign grouped (all keys)": lambda q, k, v: grouped_attention(q, k.transpose(0, 2, 1, 3),
                                                                         v.transpose(0, 2, 1, 3), causal, cfg),
        "jaxalign head-major (one block)": lambda q, k, v: head_major_attention(q, k, v, causal, cfg, max_blocks=1),
        "jaxalign head-major, causal blocks": lambda q, k, v: head_major_attention(q, k, v, causal, cfg),
    }
    calls = {}
    for name, attend in variants.items():
        grad = jax.jit(jax.grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))
        calls[name] = lambda grad=grad: jax.block_until_ready(grad(q, k, v))
    return calls


def torch_attention(cfg, inputs: dict[str, np.ndarray], torch):
    """A call running forward + backward of PyTorch's causal SDPA, key/value heads repeated, [b, h, t, d] layout."""
    groups = cfg.n_heads // cfg.n_kv_heads
    q = torch.tensor(inputs["q"]).transpose(1, 2).contiguous().requires_grad_()
    k = torch.tensor(inputs["k"]).transpose(1, 2).contiguous().requires_grad_()
    v = torch.tensor(inputs["v"]).transpose(1, 2).contiguous().requires_grad_()

    def run():
        for t in (q, k, v):
            t.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), is_causal=True)
        out.sum().backward()

    return run


def with_ratios(seconds: dict[str, float], baseline: str) -> list[dict]:
    return [{"implementation": name, "ms": 1e3 * s, "ratio_to_torch": s / seconds[baseline]}
            for name, s in seconds.items()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxalign bench lm-step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium", help=f"one of {', '.join(dpo_throughput.SIZES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=dpo_throughput.available_cores(), help="torch threads")
    parser.add_argument("--out", default=None, help="directory for lm_step.{csv,md} (optional)")
    args = parser.parse_args(argv)
    dpo_throughput.model_for(args.size, 1)  # an unknown size fails before anything runs
    for flag in ("batch", "seq_len", "repeats", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.seq_len < 2:
        parser.error(f"--seq-len must be >= 2 (a next-token loss), got {args.seq_len}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Time both measurements, print two tables (and write them under --out); returns {"model": rows,
    "attention": rows, ...} where each row has implementation, ms and ratio_to_torch (> 1: slower than torch)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        torch, transformers = import_offline(("torch", "transformers"), MISSING_EXTRA)
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(dpo_throughput.model_for(args.size, args.seq_len), max_len=max(64, args.seq_len))
    tokens = np.random.default_rng(0).integers(dpo_throughput.FIRST_TOKEN, cfg.vocab_size, (args.batch, args.seq_len))
    load = load_average()
    header = [f"machine: {jax.devices()[0].device_kind} ({jax.default_backend()}), usable cores "
              f"{dpo_throughput.available_cores()}, torch {torch.__version__} with {args.threads} threads, "
              f"transformers {transformers.__version__}, 1-min load average at start {load:.1f}",
              f"model {args.size} ({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / "
              f"{cfg.n_kv_heads} kv heads of {cfg.head_dim}), {args.batch} x {args.seq_len} tokens, fp32, "
              f"median of {args.repeats} interleaved rounds"]
    print("\n".join(header), flush=True)
    model_seconds = interleaved_medians(
        {"jaxalign DecoderLM": jax_lm_loss_grad(cfg, tokens),
         "transformers LlamaForCausalLM": torch_lm_loss_grad(cfg, tokens, torch, transformers)}, args.repeats)
    model_rows = with_ratios(model_seconds, "transformers LlamaForCausalLM")
    print("\nLM loss, forward + backward\n" + text_table(model_rows, MODEL_COLUMNS), flush=True)
    inputs = attention_inputs(cfg, args.batch, args.seq_len)
    attention_seconds = interleaved_medians(
        {**jax_attention_variants(cfg, inputs), "torch SDPA (causal)": torch_attention(cfg, inputs, torch)},
        args.repeats)
    attention_rows = with_ratios(attention_seconds, "torch SDPA (causal)")
    print("\none layer\n" + text_table(attention_rows, ATTENTION_COLUMNS), flush=True)
    if args.out:
        paths.makedirs(args.out)
        write_csv_and_markdown(model_rows, MODEL_COLUMNS, "LM loss forward + backward", header, args.out,
                               "lm_step_model")
        write_csv_and_markdown(attention_rows, ATTENTION_COLUMNS, "Attention core forward + backward, one layer",
                               header, args.out, "lm_step_attention")
        print(f"saved {args.out}/lm_step_{{model,attention}}.{{csv,md}}")
    return {"model": model_rows, "attention": attention_rows, "load": load, "header": header}


if __name__ == "__main__":
    main()
