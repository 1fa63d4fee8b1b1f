"""`jaxalign bench step-profile`: where the DPO step's time goes, part by part of the model, from an XLA trace.

The step is the one `jaxalign bench dpo-throughput` times (`dpo_throughput.build_dpo_step`: the main job's sigmoid
DPO with an online reference, AdamW, clipping) on the same random batch. It is compiled once more with XLA's
per-operation trace events on (`xla_cpu_enable_xprof_traceme`, a compile option, so no environment variable is
needed), run `--steps` times under `jax.profiler.trace`, and every traced operation (a fusion, a dot, a copy) is
attributed, through the `op_name` metadata of the compiled HLO, to a part of the model and to the forward or the
backward pass:

    mlp              the gated MLP's three projections and its activation
    attention core   rotary embedding, scores, mask, softmax and the weighted sum of values (no parameters)
    attention proj.  the q, k, v and output projections
    norms            every RMSNorm
    embedding/logits the token embedding and the output projection
    loss/optimizer   log-softmax, the log-prob gather, the DPO loss, clipping and AdamW

Times are summed over the operations of each part and divided by the steps. On a multi-core CPU XLA runs
independent operations side by side, so the sums are CPU time, not wall time: compare the parts' shares, and
time the step itself with `dpo-throughput` (or ablate a part and time again). The trace stays in `--out` for
TensorBoard's or Perfetto's viewer.

`--decode` profiles the sampler the same way: `jaxalign.sampling.generate` (greedy, KV cache, `--rows` prompts of
`--prompt-len` tokens, `--new-tokens` each), with the prompt pass in place of the forward column and the decoding
loop, per generated token, in place of the backward one (`jaxalign bench sampling` times it against transformers).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

import flax.linen as nn
import jax
import numpy as np

from jaxalign import paths
from jaxalign.bench import dpo_throughput
from jaxalign.bench.report import load_average, text_table
from jaxalign.data.position import DataPosition
from jaxalign.models.llama import init_params
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.sharding import MeshConfig, make_mesh, put_batch

PARTS = ("mlp", "attention core", "attention proj.", "norms", "embedding/logits", "loss/optimizer")
COLUMNS = (("part", 18, "part", "s"), ("forward ms", 10, "forward_ms", ".2f"),
           ("backward ms", 11, "backward_ms", ".2f"), ("share", 6, "share", ".3f"))
# --decode: the last part ("loss/optimizer") holds the sampler's own work (argmax, bookkeeping, the loop)
DECODE_COLUMNS = (("part", 18, "part", "s"), ("prompt ms", 10, "forward_ms", ".2f"),
                  ("decode us/token", 15, "decode_us_per_token", ".1f"), ("share", 6, "share", ".3f"))


def part_of(op_name: str) -> str:
    """The model part an operation belongs to, from its HLO `op_name` metadata (module docstring)."""
    if re.search(r"/attn/(q|k|v|o)/", op_name):
        return "attention proj."
    if "/attn/" in op_name:
        return "attention core"
    if "/mlp/" in op_name:
        return "mlp"
    if "norm" in op_name:
        return "norms"
    if "/embed" in op_name:
        return "embedding/logits"
    return "loss/optimizer"


def is_backward(op_name: str) -> bool:
    """Operations of the backward pass carry JAX's `transpose(...)` in their name."""
    return "transpose(" in op_name


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: op_name metadata} for every instruction of a compiled HLO module's text."""
    names = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if match:
            op_name = re.search(r'op_name="([^"]+)"', line)
            names.setdefault(match.group(1), op_name.group(1) if op_name else "")
    return names


def control_flow_ops(hlo_text: str) -> set[str]:
    """Instructions of a compiled HLO module that only run others (while, conditional, call): the trace times them
    as spans enclosing their bodies' operations, so counting them would count those operations twice."""
    return set(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b(?:while|conditional|call)\(", hlo_text, re.M))


def traced_op_microseconds(trace_dir: str, module: str) -> dict[str, float]:
    """Summed duration (us) per HLO operation of `module` in the Perfetto trace `jax.profiler.trace` wrote."""
    found = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise RuntimeError(f"no trace was written under {trace_dir}")
    with gzip.open(max(found, key=os.path.getmtime)) as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        args = event.get("args", {})
        if event.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            totals[args["hlo_op"]] += event["dur"]
    return totals


def is_decode_loop(op_name: str) -> bool:
    """Operations of the sampler's token-by-token loop (inside its `lax.while_loop`), not of the prompt pass."""
    return "/while/" in op_name


def breakdown(op_microseconds: dict[str, float], op_names: dict[str, str], steps: int,
              second_pass=is_backward, skip: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """One row per part: milliseconds per step of the first pass (forward; the prompt pass when profiling the
    sampler) and of the second (`second_pass`: backward; the decoding loop), and the part's share of the total.
    Operations in `skip` (`control_flow_ops`) are left out."""
    forward = dict.fromkeys(PARTS, 0.0)
    backward = dict.fromkeys(PARTS, 0.0)
    for op, microseconds in op_microseconds.items():
        if op in skip:
            continue
        op_name = op_names.get(op, "")
        (backward if second_pass(op_name) else forward)[part_of(op_name)] += microseconds / 1000 / steps
    total = sum(forward.values()) + sum(backward.values())
    return [{"part": part, "forward_ms": forward[part], "backward_ms": backward[part],
             "share": (forward[part] + backward[part]) / total if total else 0.0} for part in PARTS]


def profile(size: str, batch_pairs: int, prompt_len: int, completion_len: int, steps: int, trace_dir: str) -> dict:
    """Trace `steps` DPO steps of `size` (after two untraced ones) and return the breakdown and step facts."""
    seq_len = prompt_len + completion_len
    cfg = dpo_throughput.model_for(size, seq_len)
    mesh = make_mesh(MeshConfig())
    step_fn, state, reference = dpo_throughput.build_dpo_step(cfg, mesh, steps + 2)
    batch = put_batch(dpo_throughput.random_batch(cfg, batch_pairs, prompt_len, completion_len), mesh)
    position = jax.device_get(DataPosition.start())
    with jax.set_mesh(mesh):
        compiled = step_fn.jitted.lower(state, reference, batch, position).compile(
            compiler_options={"xla_cpu_enable_xprof_traceme": True})
        for _ in range(2):
            state, metrics = compiled(state, reference, batch, position)
        jax.block_until_ready(metrics)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = compiled(state, reference, batch, position)
            jax.block_until_ready(metrics)
    hlo = compiled.as_text()
    module = re.search(r"HloModule ([\w.\-]+)", hlo).group(1)
    rows = breakdown(traced_op_microseconds(trace_dir, module), hlo_op_names(hlo), steps,
                     skip=control_flow_ops(hlo))
    return {"size": size, "batch_pairs": batch_pairs, "prompt_len": prompt_len, "completion_len": completion_len,
            "steps": steps, "loss": float(metrics["loss"]), "parts": rows}


def profile_decode(size: str, rows: int, prompt_len: int, new_tokens: int, calls: int, trace_dir: str) -> dict:
    """Trace `calls` greedy `jaxalign.sampling.generate` calls of `size` (after one untraced) on `rows` random
    prompts of `prompt_len` tokens decoding `new_tokens` each (no EOS: every row decodes them all), and return the
    breakdown: "forward" = the prompt pass, "backward" = the decoding loop, per call."""
    cfg = dpo_throughput.model_for(size, prompt_len + new_tokens)
    params = jax.jit(lambda key: nn.meta.unbox(init_params(cfg, key)))(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (rows, prompt_len)).astype(np.int32)
    mask = np.ones_like(tokens)
    options = {"cfg": cfg, "sampling": SamplingConfig(max_new_tokens=new_tokens, temperature=0.0), "eos_id": -1,
               "pad_id": 0}
    compiled = generate.lower(params, tokens, mask, jax.random.key(0), **options).compile(
        compiler_options={"xla_cpu_enable_xprof_traceme": True})
    jax.block_until_ready(compiled(params, tokens, mask, jax.random.key(0)))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            out = compiled(params, tokens, mask, jax.random.key(0))
        jax.block_until_ready(out)
    hlo = compiled.as_text()
    module = re.search(r"HloModule ([\w.\-]+)", hlo).group(1)
    rows_out = breakdown(traced_op_microseconds(trace_dir, module), hlo_op_names(hlo), calls, is_decode_loop,
                         control_flow_ops(hlo))
    for row in rows_out:
        row["decode_us_per_token"] = 1000 * row["backward_ms"] / new_tokens
    return {"size": size, "rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens, "calls": calls,
            "parts": rows_out}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxalign bench step-profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium", help=f"comma list of {', '.join(dpo_throughput.SIZES)}")
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3, help="traced steps (after two untraced ones)")
    parser.add_argument("--decode", action="store_true",
                        help="profile the sampler instead: greedy decoding of --rows prompts of --prompt-len tokens, "
                             "--new-tokens each (prompt pass vs decoding loop)")
    parser.add_argument("--rows", type=int, default=8, help="--decode: prompts decoded together")
    parser.add_argument("--new-tokens", type=int, default=96, help="--decode: tokens decoded per prompt")
    parser.add_argument("--out", required=True, help="directory for step_profile.json and the traces")
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in args.sizes:
        dpo_throughput.model_for(size, 1)  # unknown names fail before anything runs
    if min(args.batch_pairs, args.prompt_len, args.completion_len, args.steps, args.rows, args.new_tokens) < 1:
        parser.error("--batch-pairs, --prompt-len, --completion-len, --steps, --rows and --new-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Profile every size, print one table per size and write step_profile.json; returns the results."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    paths.makedirs(args.out)
    load = load_average()
    print(f"machine: {jax.devices()} ({jax.default_backend()}), usable cores={dpo_throughput.available_cores()}, "
          f"1-min load average at start {load:.1f}; times are CPU time summed per part (module docstring)")
    results = []
    for size in args.sizes:
        trace_dir = paths.join(args.out, f"trace_{size}" + ("_decode" if args.decode else ""))
        if args.decode:
            result = profile_decode(size, args.rows, args.prompt_len, args.new_tokens, args.steps, trace_dir)
            print(f"\n{size}: greedy decoding, {args.rows} prompts x {args.prompt_len} tokens + {args.new_tokens} "
                  f"new, {args.steps} traced calls")
            print(text_table(result["parts"], DECODE_COLUMNS))
        else:
            result = profile(size, args.batch_pairs, args.prompt_len, args.completion_len, args.steps, trace_dir)
            print(f"\n{size}: {args.batch_pairs} pairs x ({args.prompt_len} + {args.completion_len}) tokens, "
                  f"{args.steps} traced steps")
            print(text_table(result["parts"], COLUMNS))
        results.append(result)
    paths.write_atomic(paths.join(args.out, "step_profile_decode.json" if args.decode else "step_profile.json"),
                       json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
