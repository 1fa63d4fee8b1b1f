"""`jaxalign bench reference-cost`: seconds per DPO step with an online reference vs cached reference log-probs.

Both variants are the main job's DPO step (`dpo_loss_fn` + `make_train_step` + `jit_train_step`, sigmoid objective,
the main job's preference settings) on the same random batch and model; they differ only in where the reference log-probs come
from (issue 3, "reference strategies"):

- online: the frozen reference parameters run one extra forward pass inside every step;
- cached: the batch carries precomputed per-token reference log-probs (`jaxalign.train.reference`), so the step has
  no reference forward pass at all. The one-time cost of computing them for the batch is timed too, and the
  break-even point (steps after which caching has paid for itself) is printed.
- sync (TR-DPO): the reference lives in the train state and is mixed into it every k steps; it still runs the
  online forward pass, shown for completeness.

Timing: after `--warmup` untimed calls (the first compiles), the variants take turns, one step each per round for
`--steps` rounds, each call blocked until its outputs are ready, so a slow phase of the shared CPU hits every
variant alike. The ratio online/cached is the headline number.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from jaxalign import paths
from jaxalign.bench.dpo_throughput import model_for, random_batch
from jaxalign.bench.report import csv_text, load_average
from jaxalign.data.position import DataPosition
from jaxalign.experiments.arith_kit import ARITH_DPO
from jaxalign.models.llama import DecoderLM, init_params
from jaxalign.sharding import MeshConfig, init_sharded, make_mesh, put_batch
from jaxalign.train.preference import objective_kwargs
from jaxalign.train.optim import make_optimizer
from jaxalign.train.reference import ReferenceSync, compute_reference_logprobs
from jaxalign.train.setup import sharded_train_state
from jaxalign.train.step import dpo_loss_fn, jit_train_step, logits_fn, make_train_step

VARIANTS = ("online", "cached", "sync")
FILE_STEM = "reference_cost"


def build_variants(cfg, mesh, total_steps: int, sync_every: int):
    """{variant: (step_fn, state, frozen)} built like the preference phase (`jaxalign.train.preference`) builds them."""
    dpo = ARITH_DPO
    model = DecoderLM(cfg)
    tx = make_optimizer(dpo.optim, total_steps)
    loss = dpo_loss_fn(model, dpo.objective, sft_weight=dpo.sft_weight, **objective_kwargs(dpo))
    reference, param_shardings = init_sharded(lambda r: init_params(cfg, r), jax.random.key(0), mesh)
    variants = {}
    for name in VARIANTS:
        state, shardings = sharded_train_state(cfg, tx, mesh, jax.random.key(1), params=reference,
                                               track_reference=name == "sync")
        sync = ReferenceSync(sync_every, 0.6) if name == "sync" else None
        frozen = reference if name == "online" else None
        step = jit_train_step(make_train_step(loss, 1, reference_sync=sync), mesh, shardings,
                              param_shardings if frozen is not None else None)
        variants[name] = (step, state, frozen)
    return variants, model, reference


def measure(size: str, batch_pairs: int, prompt_len: int, completion_len: int, steps: int, warmup: int,
            sync_every: int, mesh) -> dict:
    cfg = model_for(size, prompt_len + completion_len)
    variants, model, reference = build_variants(cfg, mesh, warmup + steps, sync_every)
    host = random_batch(cfg, batch_pairs, prompt_len, completion_len)
    apply = logits_fn(model)
    compute_reference_logprobs(apply, reference, host, batch_pairs)  # compile once, untimed
    start = time.perf_counter()
    cached_logps = compute_reference_logprobs(apply, reference, host, batch_pairs)
    precompute = time.perf_counter() - start
    batches = {name: dict(host, **cached_logps) if name == "cached" else host for name in VARIANTS}
    position = jax.device_get(DataPosition.start())
    states = {name: v[1] for name, v in variants.items()}
    durations = {name: [] for name in VARIANTS}
    for i in range(warmup + steps):
        for name in VARIANTS:
            step, _, frozen = variants[name]
            start = time.perf_counter()
            states[name], metrics = step(states[name], frozen, put_batch(batches[name], mesh), position)
            jax.block_until_ready((states[name], metrics))
            if i >= warmup:
                durations[name].append(time.perf_counter() - start)
    seconds = {name: float(np.mean(d)) for name, d in durations.items()}
    saved = seconds["online"] - seconds["cached"]
    return {
        "size": size, "batch_pairs": batch_pairs, "seq_len": prompt_len + completion_len,
        **{f"{name}_seconds_per_step": seconds[name] for name in VARIANTS},
        "online_over_cached": seconds["online"] / seconds["cached"],
        "sync_over_cached": seconds["sync"] / seconds["cached"],
        "precompute_seconds_per_batch": precompute,
        "break_even_epochs": precompute / saved if saved > 0 else float("inf"),
    }


def write_outputs(rows: list[dict], header: list[str], out_dir: str) -> list[str]:
    paths.makedirs(out_dir)
    csv_path, md_path = (paths.join(out_dir, f"{FILE_STEM}.{ext}") for ext in ("csv", "md"))
    paths.write_atomic(csv_path, csv_text(rows))
    paths.write_atomic(md_path, "# DPO step cost by reference strategy\n\n" + "".join(f"- {line}\n" for line in header)
                       + "\n" + format_table(rows, markdown=True) + "\n")
    return [csv_path, md_path]


def format_table(rows: list[dict], markdown: bool = False) -> str:
    titles = ["size", "online s/step", "cached s/step", "sync s/step", "online/cached", "precompute s/batch",
              "break-even (epochs)"]
    keys = ["size", "online_seconds_per_step", "cached_seconds_per_step", "sync_seconds_per_step",
            "online_over_cached", "precompute_seconds_per_batch", "break_even_epochs"]
    cells = [[r["size"]] + [f"{r[k]:.4f}" if "seconds" in k else f"{r[k]:.2f}" for k in keys[1:]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] + ["---:"] * (len(titles) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, t in enumerate(titles)]
    lines = ["  ".join(t.rjust(w) for t, w in zip(titles, widths))]
    return "\n".join(lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="jaxalign bench reference-cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small,medium")
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--out", default=None, help="directory for the CSV and markdown table")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if min(args.batch_pairs, args.prompt_len, args.completion_len, args.steps, args.warmup, args.sync_every) < 1:
        parser.error("--batch-pairs, --prompt-len, --completion-len, --steps, --warmup, --sync-every must be >= 1")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in sizes:
        model_for(size, 1)  # unknown names fail before anything is timed
    mesh = make_mesh(MeshConfig())
    clock = time.perf_counter()
    rows = []
    for size in sizes:
        print(f"[reference-cost] {size} ...", file=sys.stderr, flush=True)
        rows.append(measure(size, args.batch_pairs, args.prompt_len, args.completion_len, args.steps, args.warmup,
                            args.sync_every, mesh))
    header = [
        f"machine: {jax.devices()} ({jax.default_backend()}), 1-min load average "
        f"{load_average():.1f}",
        f"workload: {args.batch_pairs} pairs x ({args.prompt_len} + {args.completion_len}) tokens, fp32, sigmoid DPO, "
        f"AdamW; {args.warmup} warmup + {args.steps} interleaved timed rounds; sync every {args.sync_every} steps",
        "break-even: precompute time / (online - cached seconds per step), i.e. passes over the data after which "
        "caching has paid for itself",
    ]
    print("\n".join(header))
    print(format_table(rows))
    if args.out:
        print("wrote " + ", ".join(write_outputs(rows, header, args.out)))
    print(f"total wall time: {time.perf_counter() - clock:.1f} s")
    return rows
