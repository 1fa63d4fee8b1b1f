"""`jaxalign bench sampling`: greedy decoding tokens/s of the jitted KV-cache sampler against a recompute-everything loop.

What is measured, for each (model size, number of new tokens) case, side by side in one process:

- KV cache: `jaxalign.sampling.generate` (the sampler every experiment uses): one jitted call that runs the prompt
  through the model once, filling the key/value cache, then a `lax.scan` that feeds one token per step.
- recompute (the named baseline): a Python loop that, for every new token, runs the full forward pass over the whole
  prefix (left-padded prompt + everything generated so far, no cache), takes the argmax at the last real position
  and writes it after the prefix. Each step is one jitted call (forward + argmax + write), so the baseline pays no
  Python-level overhead beyond one dispatch per token. A prefix that grows by one token per step would need one
  compilation per length (seconds each on a small CPU), so the forward runs on the prefix right-padded to the next
  multiple of `--bucket` tokens (padding is masked and, attention being causal, changes no logit); every width is
  compiled in an untimed warm-up pass. The padding is extra work for the baseline: the table's "pad" column is the
  padded width summed over steps over the true prefix length summed over steps, minus 1 (`--bucket 1`: none).

Both sides decode the same prompts with the same parameters (the model's own initialisation, `init_params`), fp32,
greedily, with the pad id banned and no EOS (every row generates exactly `new_tokens` tokens, so both do the same
number of steps), and their tokens are checked equal before anything is reported. tokens/s = batch x new_tokens /
seconds for the whole decode (prompt pass included), the median over `repeats` timed runs that alternate between the
two sides so that load on a shared machine hits both alike; the speed-up is their ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign import paths
from jaxalign.bench.dpo_throughput import SIZES
from jaxalign.bench.report import text_table, write_csv_and_markdown
from jaxalign.models.llama import DecoderLM, ModelConfig, count_params, init_params
from jaxalign.sampling import SamplingConfig, generate

PAD_ID = 0
NO_EOS = -1  # an id the model can never draw: every row decodes all new tokens
FILE_STEM = "sampling"


def model_for(size: str, seq_len: int) -> ModelConfig:
    """SIZES[size] (the dpo-throughput sizes) with max_len raised to seq_len when that is longer."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; available: {', '.join(SIZES)}")
    cfg = SIZES[size]
    return dataclasses.replace(cfg, max_len=max(cfg.max_len, seq_len))


def random_prompts(cfg: ModelConfig, batch: int, prompt_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [batch, prompt_len] of random lengths in [ceil(prompt_len / 2), prompt_len] (rows of
    different lengths, as the sampler sees them in practice), ids in [1, vocab) so that none is the pad id."""
    rng = np.random.default_rng(seed)
    tokens = np.full((batch, prompt_len), PAD_ID, np.int32)
    mask = np.zeros((batch, prompt_len), np.int32)
    for row, length in enumerate(rng.integers((prompt_len + 1) // 2, prompt_len + 1, batch)):
        tokens[row, prompt_len - length:] = rng.integers(1, cfg.vocab_size, length)
        mask[row, prompt_len - length:] = 1
    return tokens, mask


def bucket_width(length: int, bucket: int, limit: int) -> int:
    """The width the baseline runs its forward at for a prefix of `length` tokens: the next multiple of `bucket`,
    at most `limit` (the buffer)."""
    return min(-(-length // bucket) * bucket, limit)


def recompute_step(cfg: ModelConfig):
    """Jitted (params, tokens [B, W], mask [B, W], length, width) -> (tokens, mask): the full forward pass without a
    cache over the first `width` (static) columns, the argmax at column length - 1 (pad banned, as `generate` bans
    it) written at column `length`. Positions count real tokens only (the model's default), exactly as `generate`
    numbers them; columns from `length` on are masked out, so they change nothing before it."""
    model = DecoderLM(cfg)

    @functools.partial(jax.jit, static_argnames="width")
    def step(params, tokens, mask, length, width):
        logits = model.apply({"params": params}, tokens[:, :width], mask[:, :width])[0]
        last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
        token = jnp.argmax(last.at[:, PAD_ID].set(-jnp.inf), axis=-1).astype(tokens.dtype)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, length))
        mask = jax.lax.dynamic_update_slice(mask, jnp.ones_like(mask[:, :1]), (0, length))
        return tokens, mask

    return step


def recompute_generate(step, params, tokens, mask, new_tokens: int, bucket: int,
                       progress: str | None = None) -> jax.Array:
    """The baseline decode loop on left-padded prompts [B, P]: `new_tokens` calls of `step`, each over the prefix so
    far (bucketed); returns the generated tokens [B, new_tokens]."""
    batch, prompt_len = tokens.shape
    limit = prompt_len + new_tokens
    tokens = jnp.asarray(np.pad(tokens, ((0, 0), (0, new_tokens)), constant_values=PAD_ID))
    mask = jnp.asarray(np.pad(mask, ((0, 0), (0, new_tokens))))
    for length in tqdm(range(prompt_len, limit), desc=progress, disable=progress is None, leave=False, unit="tok"):
        tokens, mask = step(params, tokens, mask, length, width=bucket_width(length, bucket, limit))
    return tokens[:, prompt_len:]


def pad_waste(prompt_len: int, new_tokens: int, bucket: int) -> float:
    """Extra columns the bucketed baseline computes: sum of padded widths / sum of true prefix lengths - 1."""
    lengths = range(prompt_len, prompt_len + new_tokens)
    return sum(bucket_width(n, bucket, prompt_len + new_tokens) for n in lengths) / sum(lengths) - 1


def kv_generate(cfg: ModelConfig, params, tokens, mask, new_tokens: int) -> jax.Array:
    """The sampler under test, greedy, as the table times it."""
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    return generate(params, tokens, mask, jax.random.key(0), cfg=cfg, sampling=sampling, eos_id=NO_EOS,
                    pad_id=PAD_ID)[0]


def check_equal(kv: np.ndarray, recompute: np.ndarray, what: str) -> None:
    """Both decoders must emit the same greedy tokens; otherwise say where they first differ."""
    if kv.shape != recompute.shape:
        raise RuntimeError(f"{what}: KV-cache output has shape {kv.shape}, recompute {recompute.shape}")
    differ = np.argwhere(kv != recompute)
    if len(differ):
        row, step = differ[0]
        raise RuntimeError(f"{what}: greedy tokens differ between the KV-cache sampler and the recompute loop "
                           f"({len(differ)} positions; first at row {row}, step {step}: {kv[row, step]} vs "
                           f"{recompute[row, step]})")


def run_case(size: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, bucket: int = 16,
             seed: int = 0) -> dict:
    """Warm both decoders up (compiling), check their outputs equal, then time them alternately; one table row."""
    cfg = model_for(size, prompt_len + new_tokens)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(seed)))
    tokens, mask = random_prompts(cfg, batch, prompt_len, seed)
    step = recompute_step(cfg)
    what = f"{size}, {batch} x ({prompt_len} + {new_tokens})"

    kv_out = np.asarray(kv_generate(cfg, params, tokens, mask, new_tokens))
    base_out = np.asarray(recompute_generate(step, params, tokens, mask, new_tokens, bucket,
                                             progress=f"[sampling] {size} +{new_tokens}: compiling the baseline"))
    check_equal(kv_out, base_out, what)

    kv_times, base_times = [], []
    for _ in tqdm(range(repeats), desc=f"[sampling] {size} +{new_tokens}: timing", leave=False, unit="run"):
        start = time.perf_counter()
        jax.block_until_ready(kv_generate(cfg, params, tokens, mask, new_tokens))
        kv_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(recompute_generate(step, params, tokens, mask, new_tokens, bucket))
        base_times.append(time.perf_counter() - start)

    generated = batch * new_tokens
    kv_seconds, base_seconds = statistics.median(kv_times), statistics.median(base_times)
    return {
        "size": size, "params": count_params(params), "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "kv_seconds": kv_seconds, "recompute_seconds": base_seconds,
        "kv_tokens_per_second": generated / kv_seconds, "recompute_tokens_per_second": generated / base_seconds,
        "speedup": base_seconds / kv_seconds, "outputs_equal": True, "repeats": repeats, "bucket": bucket,
        "pad_waste": pad_waste(prompt_len, new_tokens, bucket),
    }


COLUMNS = (  # (title, width, row key, format)
    ("size", 6, "size", "s"),
    ("params", 9, "params", ",d"),
    ("batch", 5, "batch", "d"),
    ("prompt", 6, "prompt_len", "d"),
    ("new", 4, "new_tokens", "d"),
    ("KV-cache tok/s", 14, "kv_tokens_per_second", ",.0f"),
    ("recompute tok/s", 15, "recompute_tokens_per_second", ",.0f"),
    ("speed-up", 8, "speedup", ".2f"),
    ("pad", 4, "pad_waste", ".0%"),
    ("same tokens", 11, "outputs_equal", ""),
)


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table, one line per case."""
    return text_table(rows, COLUMNS)


def write_outputs(rows: list[dict], header: list[str], out_dir: str) -> list[str]:
    """CSV (all fields), markdown (header + table) and a PNG of tokens/s per case; returns the paths."""
    csv_path, md_path = write_csv_and_markdown(rows, COLUMNS, "Sampling throughput", header, out_dir, FILE_STEM)
    png_path = paths.join(out_dir, f"{FILE_STEM}.png")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 3.5))
    ax.bar(x - 0.2, [r["kv_tokens_per_second"] for r in rows], 0.4, label="KV cache (generate)")
    bars = ax.bar(x + 0.2, [r["recompute_tokens_per_second"] for r in rows], 0.4, label="recompute every step")
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['speedup']:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{r['size']}\n{r['prompt_len']}+{r['new_tokens']}" for r in rows])
    ax.set(ylabel="generated tokens / s (log scale)", title="Greedy decoding throughput (fp32)", yscale="log")
    ax.legend()
    fig.tight_layout()
    paths.save_figure(fig, png_path, dpi=120)
    plt.close(fig)
    return [csv_path, md_path, png_path]


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{flag} must be a comma list of integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxalign bench sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--new-tokens", default="32,128", type=lambda t: _int_list(t, "--new-tokens"),
                        help="comma list: tokens generated per row, one case per size and value")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt width (rows are 1/2 to all of it)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (the median is reported)")
    parser.add_argument("--bucket", type=int, default=16,
                        help="the baseline's prefix is right-padded to a multiple of this (1 = exact prefix, one "
                             "compilation per length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for the CSV, markdown table and PNG plot")
    parser.add_argument("--quick", action="store_true",
                        help="one small case (tiny, batch 4, 8-token prompts, 16 new tokens, 1 timed run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.new_tokens, args.prompt_len, args.batch, args.repeats = "tiny", [16], 8, 4, 1
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in args.sizes:
        model_for(size, 1)  # unknown names fail before anything is compiled
    if min(args.prompt_len, args.batch, args.repeats, args.bucket) < 1:
        parser.error("--prompt-len, --batch, --repeats and --bucket must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every case, print the header and table (and write files under --out); returns the table's rows."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    clock = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cases = [(size, new) for size in args.sizes for new in args.new_tokens]
    rows = []
    for size, new_tokens in tqdm(cases, desc="[sampling] cases", unit="case", disable=len(cases) < 2):
        rows.append(run_case(size, args.batch, args.prompt_len, new_tokens, args.repeats, args.bucket, args.seed))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = [
        f"machine: {jax.devices()} ({jax.default_backend()}), usable cores={cores}, 1-min load average at start "
        f"{load:.1f} (other processes compete for the cores when it exceeds them)",
        "KV cache: jaxalign.sampling.generate, greedy, one jitted call (prompt pass + lax.scan over new tokens)",
        f"baseline (recompute): per new token, one jitted call = full forward over the whole prefix without a cache "
        f"+ argmax + write, the prefix right-padded to a multiple of {args.bucket} (masked; 'pad' = the extra "
        f"columns this costs the baseline); every width compiled in an untimed warm-up pass",
        f"workload: fp32, {args.batch} left-padded prompts of {(args.prompt_len + 1) // 2}-{args.prompt_len} tokens, "
        f"no EOS (every row decodes all new tokens); tokens/s = batch x new / seconds (prompt pass included), "
        f"median of {args.repeats} alternating timed runs per side; greedy tokens checked equal on both sides",
    ]
    print("\n".join(header))
    print(format_table(rows))
    if args.out:
        print("wrote " + ", ".join(write_outputs(rows, header, args.out)))
    print(f"total wall time: {time.perf_counter() - clock:.1f} s")
    return rows
