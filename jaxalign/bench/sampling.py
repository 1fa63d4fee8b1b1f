"""`jaxalign bench sampling`: greedy decoding tokens/s of the jitted KV-cache sampler against transformers' `generate`
on the same weights (and, optionally, a recompute-everything loop), with the same tokens checked on every side.

What is timed, for each (model size, number of new tokens) case, side by side in one process:

- ours: `jaxalign.sampling.generate` (the sampler every experiment uses), greedy: one jitted call that runs the
  prompt through the model once, filling the key/value cache, then a `lax.while_loop` that feeds one token per step
  (it stops once every row has finished; with no EOS here every row runs all new tokens). Timed to
  `jax.block_until_ready` on the tokens.
- transformers (`--no-transformers` skips it): the same parameters exported with the repo's own exporter
  (`jaxalign.models.hf.save_pretrained`, family "llama", fp32: what `jaxalign convert` writes) and loaded back with
  `transformers.AutoModelForCausalLM.from_pretrained` (fp32, CPU, eval mode, its default attention implementation,
  printed in the header). Timed: one `model.generate(input_ids, attention_mask, max_new_tokens=N,
  min_new_tokens=N, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None, use_cache=True,
  suppress_tokens=[PAD_ID])` call under `torch.inference_mode()`, as a user makes it: eager PyTorch, its default
  dynamic cache (no static cache, no torch.compile), its per-call set-up included; the int64 input tensors are
  built before the clock starts.
- recompute (`--no-recompute` skips it): a Python loop that, for every new token, runs the full forward pass over the
  whole prefix (left-padded prompt + everything generated so far, no cache), takes the argmax at the last real
  position and writes it after the prefix. Each step is one jitted call (forward + argmax + write), so the baseline
  pays no Python-level overhead beyond one dispatch per token. A prefix that grows by one token per step would need
  one compilation per length (seconds each on a small CPU), so the forward runs on the prefix right-padded to the
  next multiple of `--bucket` tokens (padding is masked and, attention being causal, changes no logit); every width
  is compiled in an untimed warm-up pass. The padding is extra work for this baseline: the table's "pad" column is
  the padded width summed over steps over the true prefix length summed over steps, minus 1 (`--bucket 1`: none).

What is the same on every side: the parameters (the model's own initialisation, `init_params`, seeded), the
architecture (the exported config.json is `config_to_hf`'s; transformers numbers positions of left-padded rows
from the attention mask as we do), fp32 compute, the batch of left-padded prompts (rows of different lengths), the
prompt width and the number of new tokens, greedy decoding with the pad id banned (our sampler never draws it;
transformers' `suppress_tokens=[PAD_ID]` sets its logit to -inf at every step, the same rule) and no EOS (every
row generates exactly `new_tokens` tokens, so every side does the same number of steps).

"Same tokens": after an untimed warm-up call per side, the [batch, new_tokens] greedy tokens of each baseline must
equal ours exactly, every row and position (transformers': its output after the prompt columns); a mismatch stops
the run with an error naming the case, the baseline and the first differing row and step. fp32 rounding differs
between XLA and PyTorch, so a near-tie between the two best logits could flip one argmax and every token after it;
with these seeded random weights none does.

tokens/s = batch x new_tokens / seconds for the whole decode (prompt pass included), the median over `repeats`
timed runs that alternate between the sides (ours, recompute, transformers, ours, ...) so that load on a shared
machine hits all of them alike; "vs HF" is ours / transformers' tokens/s, "speed-up" ours / recompute's.

Threads: XLA's CPU backend sizes its intra-op pool to the cores the process may run on when it starts and cannot be
resized at run time. torch's intra-op threads are set with `torch.set_num_threads` around the transformers calls
(and restored after): `--threads N` fixes N; the default, "auto", times one untimed `generate` at 1 thread and at
all usable cores and keeps the faster, because on a small shared CPU torch's OpenMP threads can run many times
slower at one per core than at one (the baseline gets its best setting; the row's `torch_threads` says which). To
give both sides N < all cores, run the whole command under `taskset`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import statistics
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign import paths
from jaxalign.bench.dpo_throughput import SIZES
from jaxalign.bench.report import (available_cores, import_offline, load_average, missing_packages, package_version,
                                   text_table, write_csv_and_markdown)
from jaxalign.models.llama import DecoderLM, ModelConfig, count_params, init_params
from jaxalign.sampling import SamplingConfig, generate

PAD_ID = 0
NO_EOS = -1  # an id the model can never draw: every row decodes all new tokens
FILE_STEM = "sampling"
TRANSFORMERS_EXTRA = ("torch", "transformers")
MISSING_EXTRA = "the transformers baseline needs the benchmark extra: pip install -e '.[bench]'"
HF_FAMILY = "llama"  # SIZES are plain Llama decoders (no biases, SwiGLU, RMSNorm, default rotary)


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


def check_equal(kv: np.ndarray, other: np.ndarray, what: str, baseline: str = "the recompute loop") -> None:
    """The baseline must emit our greedy tokens exactly; otherwise say where they first differ."""
    if kv.shape != other.shape:
        raise RuntimeError(f"{what}: KV-cache output has shape {kv.shape}, {baseline} {other.shape}")
    differ = np.argwhere(kv != other)
    if len(differ):
        row, step = differ[0]
        raise RuntimeError(f"{what}: greedy tokens differ between the KV-cache sampler and {baseline} "
                           f"({len(differ)} positions; first at row {row}, step {step}: {kv[row, step]} vs "
                           f"{other[row, step]})")


# ---------------------------------------------------------------------------------------------------------------
# The transformers baseline.


def transformers_missing() -> list[str]:
    """The bench extra's packages this baseline needs that are not installed."""
    return missing_packages(TRANSFORMERS_EXTRA)


def _import_torch_transformers():
    """(torch, transformers), with Hugging Face's offline switches set first: nothing is downloaded."""
    return tuple(import_offline(TRANSFORMERS_EXTRA, MISSING_EXTRA))


@contextlib.contextmanager
def _quiet_transformers(transformers):
    """transformers' warnings and loading progress bar off for the block, as they were after it (its logging
    settings are process-wide)."""
    logging = transformers.utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


@contextlib.contextmanager
def torch_threads(torch, threads: int):
    """torch.set_num_threads(threads) for the block; the previous count after it (it is process-wide)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_transformers_model(params, cfg: ModelConfig, directory: str):
    """`params` written as a Hugging Face Llama checkpoint by the repo's exporter (`jaxalign.models.hf
    .save_pretrained`, fp32) and loaded back with `AutoModelForCausalLM.from_pretrained`: fp32, CPU, eval mode."""
    from jaxalign.models import hf

    torch, transformers = _import_torch_transformers()
    hf.save_pretrained(params, cfg, directory, HF_FAMILY, dtype=np.float32)
    with _quiet_transformers(transformers):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def transformers_generate(model, input_ids, attention_mask, new_tokens: int) -> np.ndarray:
    """transformers' greedy `generate` on the left-padded prompts (torch int64 [B, P]) as the table times it:
    exactly `new_tokens` tokens (no EOS), the pad id suppressed as our sampler bans it; returns the generated
    tokens [B, new_tokens] (its output after the prompt columns)."""
    torch, transformers = _import_torch_transformers()
    with torch.inference_mode(), _quiet_transformers(transformers):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None,
                             use_cache=True, suppress_tokens=[PAD_ID])
    return out[:, input_ids.shape[1]:].numpy()


def pick_threads(run, cores: int) -> int:
    """The faster of 1 and `cores` torch threads for one untimed call of `run` each (module docstring)."""
    torch, _ = _import_torch_transformers()
    seconds = {}
    for threads in sorted({1, cores}):
        with torch_threads(torch, threads):
            start = time.perf_counter()
            run()
            seconds[threads] = time.perf_counter() - start
    return min(seconds, key=seconds.get)


# ---------------------------------------------------------------------------------------------------------------
# One case.


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(size: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, bucket: int = 16,
             seed: int = 0, recompute: bool = True, transformers: bool = True, threads: int | None = None) -> dict:
    """Warm every side up (compiling, exporting, loading), check their tokens equal ours, then time them
    alternately; one table row. `threads` None: torch's thread count is picked by `pick_threads`."""
    cfg = model_for(size, prompt_len + new_tokens)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(seed)))
    tokens, mask = random_prompts(cfg, batch, prompt_len, seed)
    what = f"{size}, {batch} x ({prompt_len} + {new_tokens})"
    label = f"[sampling] {size} +{new_tokens}"

    kv_out = np.asarray(kv_generate(cfg, params, tokens, mask, new_tokens))
    sides = {"kv": lambda: jax.block_until_ready(kv_generate(cfg, params, tokens, mask, new_tokens))}
    row = {"size": size, "params": count_params(params), "batch": batch, "prompt_len": prompt_len,
           "new_tokens": new_tokens, "repeats": repeats, "bucket": bucket,
           "pad_waste": pad_waste(prompt_len, new_tokens, bucket) if recompute else None}

    if recompute:
        step = recompute_step(cfg)
        check_equal(kv_out, np.asarray(recompute_generate(step, params, tokens, mask, new_tokens, bucket,
                                                          progress=f"{label}: compiling the baseline")), what)
        sides["recompute"] = lambda: jax.block_until_ready(
            recompute_generate(step, params, tokens, mask, new_tokens, bucket))

    torch_threads_used = attention = None
    with contextlib.ExitStack() as stack:
        if transformers:
            torch, _ = _import_torch_transformers()
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="jaxalign-sampling-hf-"))
            model = load_transformers_model(params, cfg, directory)
            attention = getattr(model.config, "_attn_implementation", "?")  # what from_pretrained chose
            input_ids, attention_mask = (torch.from_numpy(a.astype(np.int64)) for a in (tokens, mask))
            hf_run = functools.partial(transformers_generate, model, input_ids, attention_mask, new_tokens)
            check_equal(kv_out, hf_run(), what, "transformers' generate")
            torch_threads_used = threads or pick_threads(hf_run, available_cores())
            stack.enter_context(torch_threads(torch, torch_threads_used))
            sides["transformers"] = hf_run

        times = {name: [] for name in sides}
        for _ in tqdm(range(repeats), desc=f"{label}: timing", leave=False, unit="run"):
            for name, run in sides.items():  # alternate, so that load changes hit every side alike
                times[name].append(_timed(run))

    generated = batch * new_tokens
    seconds = {name: statistics.median(t) for name, t in times.items()}
    kv_rate = generated / seconds["kv"]
    base, hf_seconds = seconds.get("recompute"), seconds.get("transformers")
    row.update({
        "kv_seconds": seconds["kv"], "kv_tokens_per_second": kv_rate,
        "recompute_seconds": base, "recompute_tokens_per_second": None if base is None else generated / base,
        "speedup": None if base is None else base / seconds["kv"], "outputs_equal": True if recompute else None,
        "transformers_seconds": hf_seconds,
        "transformers_tokens_per_second": None if hf_seconds is None else generated / hf_seconds,
        "ratio_to_transformers": None if hf_seconds is None else hf_seconds / seconds["kv"],
        "same_tokens_transformers": True if transformers else None, "torch_threads": torch_threads_used,
        "transformers_attention": attention,
    })
    return row


COLUMNS = (  # (title, width, row key, format)
    ("size", 6, "size", "s"),
    ("params", 9, "params", ",d"),
    ("batch", 5, "batch", "d"),
    ("prompt", 6, "prompt_len", "d"),
    ("new", 4, "new_tokens", "d"),
    ("KV-cache tok/s", 14, "kv_tokens_per_second", ",.0f"),
    ("HF tok/s", 9, "transformers_tokens_per_second", ",.0f"),
    ("vs HF", 6, "ratio_to_transformers", ".2f"),
    ("same (HF)", 9, "same_tokens_transformers", ""),
    ("threads", 7, "torch_threads", "d"),
    ("recompute tok/s", 15, "recompute_tokens_per_second", ",.0f"),
    ("speed-up", 8, "speedup", ".2f"),
    ("pad", 4, "pad_waste", ".0%"),
    ("same (rec.)", 11, "outputs_equal", ""),
)


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table, one line per case; `n/a` for a baseline that was not run."""
    return text_table(rows, COLUMNS)


def write_outputs(rows: list[dict], header: list[str], out_dir: str) -> list[str]:
    """CSV (all fields), markdown (header + table) and a PNG of tokens/s per case and side; returns the paths."""
    csv_path, md_path = write_csv_and_markdown(rows, COLUMNS, "Sampling throughput", header, out_dir, FILE_STEM)
    png_path = paths.join(out_dir, f"{FILE_STEM}.png")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [("kv_tokens_per_second", "KV cache (generate)", None),
             ("transformers_tokens_per_second", "transformers generate", "ratio_to_transformers"),
             ("recompute_tokens_per_second", "recompute every step", "speedup")]
    sides = [side for side in sides if any(r[side[0]] is not None for r in rows)]  # skip baselines not run
    width = 0.8 / len(sides)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 3, 3.5))
    for i, (key, label, ratio) in enumerate(sides):
        bars = ax.bar(x + (i - (len(sides) - 1) / 2) * width, [r[key] or 0.0 for r in rows], width, label=label)
        for bar, row in zip(bars, rows):
            if ratio and row[ratio] is not None:  # how many times faster ours is than this baseline
                ax.annotate(f"{row[ratio]:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
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


def _threads(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--threads must be 'auto' or an integer >= 1, got {text!r}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxalign bench sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small,medium", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--new-tokens", default="96", type=lambda t: _int_list(t, "--new-tokens"),
                        help="comma list: tokens generated per row, one case per size and value")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt width (rows are 1/2 to all of it)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (the median is reported)")
    parser.add_argument("--bucket", type=int, default=16,
                        help="the recompute baseline's prefix is right-padded to a multiple of this (1 = exact "
                             "prefix, one compilation per length)")
    parser.add_argument("--threads", type=_threads, default=None, metavar="auto|N",
                        help="torch intra-op threads for transformers (default auto: the faster of 1 and all "
                             "usable cores, timed once per case)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers generate baseline")
    parser.add_argument("--no-recompute", action="store_true", help="skip the recompute-everything baseline")
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


def _header(args, run_transformers: bool, rows: list[dict], load: float, cores: int) -> list[str]:
    """What the table's numbers are (module docstring), for the printed output and the markdown file."""
    header = [
        f"machine: {jax.devices()} ({jax.default_backend()}), usable cores={cores}, 1-min load average at start "
        f"{load:.1f} (other processes compete for the cores when it exceeds them)",
        "ours (KV cache): jaxalign.sampling.generate, greedy, one jitted call (prompt pass + lax.while_loop over new "
        "tokens)",
    ]
    if run_transformers:
        threads = sorted({r["torch_threads"] for r in rows})
        attention = "/".join(sorted({r["transformers_attention"] for r in rows}))
        header.append(
            f"transformers {package_version('transformers')} (torch {package_version('torch')}): the same parameters "
            "exported by "
            f"jaxalign.models.hf.save_pretrained ({HF_FAMILY}, fp32), AutoModelForCausalLM.from_pretrained, eval, "
            f"{attention} attention; timed: model.generate(greedy, max/min_new_tokens=new, "
            f"eos_token_id=None, suppress_tokens=[pad], use_cache=True) under torch.inference_mode()")
        header.append(
            f"threads: XLA's CPU pool is sized to the {cores} usable cores at start-up; torch.set_num_threads"
            f"({'/'.join(map(str, threads))}) "
            + ("(fixed by --threads)" if args.threads else "(auto: the faster of 1 and all cores, per case)"))
    else:
        header.append("transformers: not run (--no-transformers or bench extra missing)")
    if not args.no_recompute:
        header.append(
            f"recompute: per new token, one jitted call = full forward over the whole prefix without a cache + argmax "
            f"+ write, the prefix right-padded to a multiple of {args.bucket} (masked; 'pad' = the extra columns "
            f"this costs the baseline); every width compiled in an untimed warm-up pass")
    header.append(
        f"workload: fp32, {args.batch} left-padded prompts of {(args.prompt_len + 1) // 2}-{args.prompt_len} tokens, "
        f"pad id banned, no EOS (every row decodes all new tokens); tokens/s = batch x new / seconds (prompt pass "
        f"included), median of {args.repeats} alternating timed runs per side; greedy tokens checked equal to ours "
        f"on every side before timing ('same' columns); 'vs HF' = ours / transformers tokens/s")
    return header


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every case, print the header and table (and write files under --out); returns the table's rows (keys
    `transformers_tokens_per_second`, `ratio_to_transformers`, `same_tokens_transformers` None when transformers
    was not run)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    clock = time.perf_counter()
    run_transformers = not args.no_transformers
    if run_transformers and (missing := transformers_missing()):
        print(f"NOTE: {MISSING_EXTRA} (missing: {', '.join(missing)}); running without the transformers baseline.",
              flush=True)
        run_transformers = False
    load = load_average()
    cases = [(size, new) for size in args.sizes for new in args.new_tokens]
    rows = []
    for size, new_tokens in tqdm(cases, desc="[sampling] cases", unit="case", disable=len(cases) < 2):
        rows.append(run_case(size, args.batch, args.prompt_len, new_tokens, args.repeats, args.bucket, args.seed,
                             recompute=not args.no_recompute, transformers=run_transformers, threads=args.threads))
    header = _header(args, run_transformers, rows, load, available_cores())
    print("\n".join(header))
    print(format_table(rows))
    if args.out:
        print("wrote " + ", ".join(write_outputs(rows, header, args.out)))
    print(f"total wall time: {time.perf_counter() - clock:.1f} s")
    return rows
