"""`jaxalign bench dpo-throughput`: DPO training tokens/s of jaxalign, its FLOP/s, and TRL's DPOTrainer beside it.

What is measured, per model size (`SIZES`, all Llama-style decoders that a small CPU trains in seconds):

- jaxalign: the main job's DPO step (`jaxalign.train.preference`'s code path, built from the same
  library calls): `dpo_loss_fn` with the sigmoid objective and `DPOConfig`'s beta, an online frozen reference (one
  extra forward pass per step, no gradient), AdamW with global-norm clipping from `make_optimizer`, jitted with
  explicit shardings and donated state by `jit_train_step` on a mesh over all of JAX's devices. The batch is
  `batch_pairs` random (chosen, rejected) pairs of prompt_len + completion_len tokens, all real (no padding), put on
  the mesh with `put_batch` inside the timed region as `train_loop` does. After `warmup` steps (the first one
  compiles), each of `steps` calls is timed to `jax.block_until_ready` on the new state and metrics; seconds/step
  is their mean.
- tokens/s = 2 * batch_pairs * (prompt_len + completion_len) / seconds-per-step (every prompt and completion token
  of the chosen and the rejected sequence, the policy's tokens; the reference's forward pass is not counted again).
- achieved FLOP/s = `flops.dpo_step_flops(cfg, batch_pairs, seq_len)` (policy forward + backward and reference
  forward, matmuls only, see `jaxalign.bench.flops`) / seconds-per-step, and its fraction of the dense-matmul
  ceiling `flops.measure_matmul_flops()` measured at start-up in this process (fp32, 1024 x 1024).
- TRL: `jaxalign.bench.trl_baseline.trl_dpo_tokens_per_second` on the same ModelConfig, batch and lengths (TRL
  1.16 DPOTrainer, PyTorch CPU fp32, sigmoid loss, online reference, AdamW; see that module for what it times).
  All jaxalign sizes run before the first TRL run, so torch's threads never compete with XLA's timings.

Threads: torch gets `--threads` intra-op threads (default: the cores this process may run on). XLA's CPU backend
uses its own intra-op thread pool, sized at backend start-up to the cores the process may run on, and it cannot be
resized at run time; with the default both sides use the same number. To give both N < all cores, run the whole
command under `taskset -c 0-(N-1)`. The printed header says which case applied.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import numpy as np

from jaxalign import paths
from jaxalign.bench import flops
from jaxalign.bench.report import (available_cores, load_average, missing_packages, package_version, text_table,
                                   write_csv_and_markdown)
from jaxalign.data.position import DataPosition
from jaxalign.models.llama import DecoderLM, ModelConfig, check_model_fits_mesh, count_params, init_params
from jaxalign.sharding import (
    MeshConfig,
    check_batch_fits_mesh,
    init_sharded,
    make_mesh,
    put_batch,
)
from jaxalign.train.optim import make_optimizer
from jaxalign.train.setup import sharded_train_state
from jaxalign.train.step import dpo_loss_fn, jit_train_step, make_train_step

# Increasing sizes for a 2-core CPU; max_len is raised to prompt_len + completion_len when that is longer.
SIZES = {
    "tiny": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=172,
                        max_len=64),
    "small": ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=344,
                         max_len=64),
    "medium": ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, mlp_dim=688,
                          max_len=64),
    # Matmuls dominate: about 40M parameters, a 32k vocabulary (run it with --prompt-len/--completion-len summing
    # to 256); seconds per step on a 2-core CPU.
    "large": ModelConfig(vocab_size=32_000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64,
                         mlp_dim=1376, max_len=256),
}
FIRST_TOKEN = 3  # ids 0-2 are special in the TRL baseline's tokenizer; both sides draw tokens from [3, vocab)
BENCH_EXTRA = ("datasets", "tokenizers", "torch", "transformers", "trl")
FILE_STEM = "dpo_throughput"


def model_for(size: str, seq_len: int) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; available: {', '.join(SIZES)}")
    cfg = SIZES[size]
    return dataclasses.replace(cfg, max_len=max(cfg.max_len, seq_len))


def step_flops(cfg: ModelConfig, batch_pairs: int, seq_len: int) -> float:
    """FLOPs of one jaxalign DPO step as the table counts them: policy fwd+bwd and the online reference's forward."""
    return flops.dpo_step_flops(cfg, batch_pairs, seq_len, with_reference=True)


def random_batch(cfg: ModelConfig, batch_pairs: int, prompt_len: int, completion_len: int, seed: int = 0) -> dict:
    """Host DPO batch of random tokens: shared prompt, distinct completions, every token real (no padding)."""
    rng = np.random.default_rng(seed)
    seq_len = prompt_len + completion_len
    prompt = rng.integers(FIRST_TOKEN, cfg.vocab_size, (batch_pairs, prompt_len), dtype=np.int32)
    completion_mask = np.concatenate([np.zeros((batch_pairs, prompt_len), np.int32),
                                      np.ones((batch_pairs, completion_len), np.int32)], axis=1)
    batch = {}
    for side in ("chosen", "rejected"):
        completion = rng.integers(FIRST_TOKEN, cfg.vocab_size, (batch_pairs, completion_len), dtype=np.int32)
        batch[f"{side}_tokens"] = np.concatenate([prompt, completion], axis=1)
        batch[f"{side}_attention_mask"] = np.ones((batch_pairs, seq_len), np.int32)
        batch[f"{side}_completion_mask"] = completion_mask
    return batch


def build_dpo_step(cfg: ModelConfig, mesh, total_steps: int, seed: int = 0):
    """(step_fn, state, reference params) built as the preference phase builds them (`jaxalign.train.preference`),
    with the main job's settings (`arith_kit.ARITH_DPO`)."""
    from jaxalign.experiments.arith_kit import ARITH_DPO as dpo
    from jaxalign.train.preference import objective_kwargs

    model = DecoderLM(cfg)
    tx = make_optimizer(dpo.optim, total_steps)
    reference, param_shardings = init_sharded(lambda r: init_params(cfg, r), jax.random.key(seed), mesh)
    state, shardings = sharded_train_state(cfg, tx, mesh, jax.random.key(seed + 1), params=reference)
    loss = dpo_loss_fn(model, dpo.objective, sft_weight=dpo.sft_weight, **objective_kwargs(dpo))
    step_fn = jit_train_step(make_train_step(loss, 1), mesh, shardings, param_shardings)
    return step_fn, state, reference


def time_jaxalign(cfg: ModelConfig, batch_pairs: int, prompt_len: int, completion_len: int, steps: int, warmup: int,
                  mesh) -> dict:
    """Mean seconds per DPO step over `steps` blocked calls after `warmup` (>= 1: the first call compiles)."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"need warmup >= 1 (the first call compiles) and steps >= 1, got {warmup}, {steps}")
    check_model_fits_mesh(cfg, mesh)
    check_batch_fits_mesh(batch_pairs, mesh, "--batch-pairs")
    step_fn, state, reference = build_dpo_step(cfg, mesh, warmup + steps)
    host_batch = random_batch(cfg, batch_pairs, prompt_len, completion_len)
    position = jax.device_get(DataPosition.start())
    num_params = count_params(state.params)
    durations = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, reference, put_batch(host_batch, mesh), position)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            durations.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise RuntimeError(f"jaxalign DPO loss is {loss} after {warmup + steps} steps")
    return {"seconds_per_step": sum(durations) / steps, "params": num_params}


def trl_missing() -> list[str]:
    return missing_packages(BENCH_EXTRA)


COLUMNS = (  # (title, width, row key, format)
    ("size", 8, "size", "s"),
    ("params", 10, "params", ",d"),
    ("tokens/step", 11, "tokens_per_step", "d"),
    ("jaxalign tok/s", 14, "jax_tokens_per_second", ",.0f"),
    ("GFLOP/s", 9, "achieved_gflops", ".2f"),
    ("frac. peak", 10, "peak_fraction", ".3f"),
    ("TRL tok/s", 11, "trl_tokens_per_second", ",.0f"),
    ("speed-up", 8, "speedup", ".2f"),
)


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table, one line per size; `n/a` where TRL was not run."""
    return text_table(rows, COLUMNS)


def write_outputs(rows: list[dict], header: list[str], out_dir: str) -> list[str]:
    """CSV (all fields), markdown (header + table) and a PNG bar plot of tokens/s per size; returns the paths."""
    csv_path, md_path = write_csv_and_markdown(rows, COLUMNS, "DPO training throughput", header, out_dir, FILE_STEM)
    png_path = paths.join(out_dir, f"{FILE_STEM}.png")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 3, 3.5))
    ax.bar(x - 0.2, [r["jax_tokens_per_second"] for r in rows], 0.4, label="jaxalign (JAX)")
    trl = [r["trl_tokens_per_second"] for r in rows]
    if any(v is not None for v in trl):
        bars = ax.bar(x + 0.2, [v or 0.0 for v in trl], 0.4, label="TRL DPOTrainer (PyTorch)")
        for bar, row in zip(bars, rows):
            if row["speedup"] is not None:
                ax.annotate(f"{row['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{r['size']}\n{r['params']:,} params" for r in rows])
    ax.set(ylabel="training tokens / s (log scale)", title="DPO step throughput (CPU, fp32)", yscale="log")
    ax.legend()
    fig.tight_layout()
    paths.save_figure(fig, png_path, dpi=120)
    plt.close(fig)
    return [csv_path, md_path, png_path]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxalign bench dpo-throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small,medium", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1; the first compiles)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for TRL (default: the cores this process may run on)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    parser.add_argument("--out", default=None, help="directory for the CSV, markdown table and PNG plot")
    parser.add_argument("--smoke", action="store_true", help="tiny size only, 1 warmup step, 2 timed steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.warmup, args.steps = "tiny", 1, 2
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in args.sizes:
        model_for(size, 1)  # unknown names fail before anything is timed
    if min(args.batch_pairs, args.prompt_len, args.completion_len, args.steps) < 1 or args.warmup < 1:
        parser.error("--batch-pairs, --prompt-len, --completion-len and --steps must be >= 1, --warmup >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the header and table (and write files under --out); returns the table's rows."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    clock = time.perf_counter()
    seq_len = args.prompt_len + args.completion_len
    tokens_per_step = 2 * args.batch_pairs * seq_len
    cores = available_cores()
    threads = args.threads or cores
    run_trl = not args.no_trl
    if run_trl and (missing := trl_missing()):
        from jaxalign.bench.trl_baseline import MISSING_EXTRA

        print(f"NOTE: {MISSING_EXTRA} (missing: {', '.join(missing)}); running the jaxalign side only.", flush=True)
        run_trl = False

    load = load_average()
    mesh = make_mesh(MeshConfig())
    peak = flops.measure_matmul_flops()
    rows = []
    for size in args.sizes:
        cfg = model_for(size, seq_len)
        print(f"[dpo-throughput] jaxalign {size} ...", file=sys.stderr, flush=True)
        jax_result = time_jaxalign(cfg, args.batch_pairs, args.prompt_len, args.completion_len, args.steps,
                                   args.warmup, mesh)
        step = step_flops(cfg, args.batch_pairs, seq_len)
        achieved = step / jax_result["seconds_per_step"]
        rows.append({
            "size": size, "params": jax_result["params"], "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "vocab_size": cfg.vocab_size, "batch_pairs": args.batch_pairs, "prompt_len": args.prompt_len,
            "completion_len": args.completion_len, "tokens_per_step": tokens_per_step,
            "jax_seconds_per_step": jax_result["seconds_per_step"],
            "jax_tokens_per_second": tokens_per_step / jax_result["seconds_per_step"],
            "step_flops": step, "achieved_gflops": achieved / 1e9, "matmul_peak_gflops": peak / 1e9,
            "peak_fraction": achieved / peak,
            "trl_seconds_per_step": None, "trl_tokens_per_second": None, "speedup": None, "torch_threads": None,
        })
    if run_trl:
        from jaxalign.bench.trl_baseline import MODEL_KEYS, trl_dpo_tokens_per_second

        for row, size in zip(rows, args.sizes):
            cfg = model_for(size, seq_len)
            print(f"[dpo-throughput] TRL {size} ...", file=sys.stderr, flush=True)
            trl = trl_dpo_tokens_per_second({k: getattr(cfg, k) for k in MODEL_KEYS}, args.batch_pairs,
                                            args.prompt_len, args.completion_len, args.steps, args.warmup, threads)
            row.update(trl_seconds_per_step=trl["seconds_per_step"], trl_tokens_per_second=trl["tokens_per_second"],
                       speedup=row["jax_tokens_per_second"] / trl["tokens_per_second"],
                       torch_threads=trl["torch_threads"])

    if threads == cores:
        thread_note = f"torch.set_num_threads({threads}); XLA's CPU pool is sized to the same {cores} usable cores"
    else:
        thread_note = (f"torch.set_num_threads({threads}); XLA's CPU pool is sized to the {cores} usable cores at "
                       f"start-up and cannot be changed at run time (run under `taskset` to give both {threads})")
    header = [
        f"machine: {jax.devices()} ({jax.default_backend()}), os.cpu_count()={os.cpu_count()}, usable cores={cores}, "
        f"1-min load average at start {load:.1f} (other processes compete for the cores when it exceeds them)",
        f"matmul ceiling (jnp.dot fp32 1024^3, this process): {peak / 1e9:.1f} GFLOP/s",
        f"threads: {thread_note}" if run_trl else f"threads: XLA's CPU pool, sized to the {cores} usable cores",
        (f"baseline: TRL {package_version('trl')} DPOTrainer (PyTorch CPU), torch {package_version('torch')}" if run_trl
         else "baseline: not run (--no-trl or bench extra missing)"),
        f"workload: {args.batch_pairs} pairs x ({args.prompt_len} prompt + {args.completion_len} completion) tokens, "
        f"fp32, sigmoid DPO with online reference, AdamW + clipping; {args.warmup} warmup + {args.steps} timed steps",
    ]
    if run_trl and threads > 1 and load > cores:
        header.append(f"WARNING: load {load:.1f} > {cores} cores: torch with {threads} OpenMP threads can run many "
                      "times slower when other processes hold the cores; compare with --threads 1")
    print("\n".join(header))
    print(format_table(rows))
    if args.out:
        written = write_outputs(rows, header, args.out)
        print("wrote " + ", ".join(written))
    print(f"total wall time: {time.perf_counter() - clock:.1f} s")
    return rows
