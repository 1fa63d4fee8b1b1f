"""`jaxalign bench all --out DIR`: every performance benchmark in one run, one report (perf.md and perf.json).

Runs, one after the other in this process, each with its own baseline side by side (the benchmark's own
docstring says what is timed):

    dpo-throughput   DPO step tokens/s, small / medium / large, vs TRL's DPOTrainer; share of the matmul ceiling
    lm-step          LM-loss forward + backward and the attention core vs PyTorch (no target: the evidence)
    sampling         greedy KV-cache decoding tokens/s vs transformers' generate on the same weights, same tokens
    packing          effective tokens/s of the packed DPO step vs the padded one on a heavy-tailed length mix
    logprob-memory   peak temporaries of the DPO gradient, chunked log-probs vs materialised logits (vocab 128,256)
    ppo-throughput   PPO training env-steps/s over 16 to 4,096 environments vs Stable-Baselines3's best setting

and writes DIR/perf.json (every measured ratio with its target and whether it was met, the machine, the 1-minute
load before and after each benchmark, the package versions, the git commit, the exact argument lists) and
DIR/perf.md (the same as a table), with each benchmark's own files under DIR/NAME/. The README's performance table
is copied from perf.md. `--quick` runs every benchmark on toy sizes (a smoke test of the whole pipeline; its
ratios mean nothing). A benchmark that fails is reported in perf.md with its error and the others still run; the
command then exits non-zero.

Targets are those of the performance issue: DPO step >= 1.5x TRL for every size and >= 0.7 of the matmul ceiling
for medium and large; sampling >= 3x transformers with the same tokens; packing >= 1.8x padded with the same
losses; chunked log-prob memory >= 4x below materialised; PPO >= 50x SB3's best. Run it on an idle machine: the
load is printed before each benchmark and a warning is printed when it exceeds the usable cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable

from jaxalign import paths
from jaxalign.bench.report import available_cores, load_average, package_version

VERSIONS = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "trl", "stable-baselines3")


@dataclasses.dataclass(frozen=True)
class Check:
    """One reported number: `value` of `metric` against `baseline`, met when value >= target (no target: shown
    for information)."""
    benchmark: str
    metric: str
    value: float | None
    target: float | None = None
    baseline: str = ""
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value is not None and self.value >= self.target


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str
    module: str
    argv: Callable[[str, bool], list[str]]  # (its output directory, quick) -> argument list
    checks: Callable[[object], list[Check]]  # the benchmark's return value -> the numbers reported
    typical_seconds: float  # full-size run on the 2-core development CPU, for the ETA only


def dpo_checks(rows) -> list[Check]:
    checks = []
    for row in rows:
        checks.append(Check("dpo-throughput", f"{row['size']}: tokens/s vs TRL", row["speedup"], 1.5,
                            "TRL DPOTrainer", f"{row['jax_tokens_per_second']:,.0f} tok/s vs "
                            + (f"{row['trl_tokens_per_second']:,.0f}" if row["trl_tokens_per_second"] else "n/a")))
        if row["size"] in ("medium", "large"):
            checks.append(Check("dpo-throughput", f"{row['size']}: share of the matmul ceiling", row["peak_fraction"],
                                0.7, "jnp.dot 1024^3, same process",
                                f"{row['achieved_gflops']:.0f} of {row['matmul_peak_gflops']:.0f} GFLOP/s"))
    return checks


def lm_step_checks(result) -> list[Check]:
    def faster(row):  # torch time / ours: > 1 means ours is faster, as every other ratio here
        return 1.0 / row["ratio_to_torch"]
    return [Check("lm-step", f"{row['implementation']}: speed vs torch", faster(row), None,
                  "PyTorch " + ("LlamaForCausalLM" if part == "model" else "SDPA"), f"{row['ms']:.1f} ms")
            for part in ("model", "attention") for row in result[part] if "jaxalign" in row["implementation"]]


def sampling_checks(rows) -> list[Check]:
    return [Check("sampling", f"{row['size']}, {row['batch']} x {row['prompt_len']} prompt, {row['new_tokens']} new: "
                  "tokens/s vs transformers", row["ratio_to_transformers"], 3.0, "transformers generate",
                  "same tokens" if row["same_tokens_transformers"] else "TOKENS DIFFER")
            for row in rows]


def packing_checks(result) -> list[Check]:
    return [Check("packing", "effective tokens/s, packed vs padded", result["ratio"], 1.8, "padded batch",
                  f"fill {result['fill_padded']:.2f} -> {result['fill_packed']:.2f}; max loss difference "
                  f"{result['loss_max_abs_diff']:.1e}")]


def memory_checks(result) -> list[Check]:
    chunked = [v for k, v in result["variants"].items() if k != "materialised"][0]
    return [Check("logprob-memory", f"peak temporaries, vocab {result['vocab']:,}: materialised / chunked",
                  result["temp_ratio"], 4.0, "materialised logits",
                  f"{result['variants']['materialised']['temp_bytes'] / 2**20:,.0f} vs "
                  f"{chunked['temp_bytes'] / 2**20:,.0f} MiB; max gradient difference "
                  f"{result['grad_max_abs_diff']:.1e}")]


def ppo_checks(summary) -> list[Check]:
    best = summary.get("sb3_best") or {}
    return [Check("ppo-throughput", "best env-steps/s vs SB3's best", summary.get("ratio"), 50.0,
                  "Stable-Baselines3 PPO", f"SB3 best {best.get('env_steps_per_second', float('nan')):,.0f} "
                  f"env-steps/s at {best.get('n_envs', '?')} envs")]


BENCHES = [
    Bench("dpo-throughput", "jaxalign.bench.dpo_throughput",
          lambda out, quick: (["--smoke"] if quick else
                              ["--sizes", "small,medium,large", "--prompt-len", "64", "--completion-len", "192",
                               "--steps", "5"]) + ["--out", out], dpo_checks, 420),
    Bench("lm-step", "jaxalign.bench.lm_step",  # at the DPO benchmark's 256 tokens per sequence
          lambda out, quick: (["--size", "tiny", "--batch", "2", "--seq-len", "32", "--repeats", "1"] if quick else
                              ["--seq-len", "256", "--repeats", "6"]) + ["--out", out], lm_step_checks, 60),
    Bench("sampling", "jaxalign.bench.sampling",
          lambda out, quick: (["--sizes", "tiny", "--new-tokens", "4", "--repeats", "1", "--no-recompute"] if quick
                              else ["--no-recompute"]) + ["--out", out], sampling_checks, 90),
    Bench("packing", "jaxalign.bench.packing",
          lambda out, quick: ["--pairs", "2", "--batches", "1", "--rounds", "1", "--median", "8", "--max-len", "64",
                              "--d-model", "32", "--layers", "1"] if quick else [], packing_checks, 150),
    Bench("logprob-memory", "jaxalign.bench.logprob_memory",
          lambda out, quick: (["--vocab", "512", "--length", "64", "--d-model", "32", "--chunk", "16"] if quick else [])
          + ["--out", out], memory_checks, 60),
    Bench("ppo-throughput", "rl.bench.ppo_throughput",
          lambda out, quick: (["--num-envs", "4,8", "--num-steps", "8", "--timesteps", "256", "--sb3-num-envs", "2",
                               "--sb3-timesteps", "64"] if quick else []) + ["--out", out], ppo_checks, 240),
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    return {name: package_version(name, missing="not installed") for name in VERSIONS}


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    return {"cpu": cpu_model(), "usable_cores": available_cores(), "os_cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions(),
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Performance: `{report['command']}`", "",
             f"- machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['platform']}, Python {m['python']})",
             f"- commit {m['commit']}, {m['date']}; total wall time {report['wall_seconds'] / 60:.1f} min",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             "- 1-minute load before / after each benchmark (it counts this run's own threads too, so only the "
             "value before the first benchmark measures other processes): " + "; ".join(
                 f"{r['name']} {r['load_before']:.1f} / {r['load_after']:.1f}" for r in report["benchmarks"]),
             "- ratio > 1: jaxalign is better; a target is met when ratio >= target", "",
             "| benchmark | measure | baseline | ratio | target | met | detail |", "|---|---|---|---:|---:|---|---|"]
    for c in report["checks"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        target = "-" if c["target"] is None else f"{c['target']:g}"
        met = {True: "yes", False: "**no**", None: "-"}[c["met"]]
        lines.append(f"| {c['benchmark']} | {c['metric']} | {c['baseline']} | {value} | {target} | {met} | "
                     f"{c['note']} |")
    failed = [r for r in report["benchmarks"] if r["error"]]
    if failed:
        lines += ["", "Failed:"] + [f"- {r['name']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def run_one(bench: Bench, out_dir: str, quick: bool) -> tuple[dict, list[Check]]:
    argv = bench.argv(paths.join(out_dir, bench.name), quick)
    record = {"name": bench.name, "argv": argv, "load_before": load_average(), "error": None}
    start = time.perf_counter()
    checks: list[Check] = []
    try:
        result = importlib.import_module(bench.module).main(argv)
        checks = bench.checks(result)
    except Exception as exc:  # one benchmark failing (e.g. a missing baseline) must not lose the others' numbers
        record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        traceback.print_exc()
    record.update(seconds=time.perf_counter() - start, load_after=load_average())
    return record, checks


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxalign bench all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for perf.md, perf.json and each benchmark's files")
    parser.add_argument("--only", default=None, help=f"comma list of {', '.join(b.name for b in BENCHES)}")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the pipeline, measures nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/perf.json")
    args = parser.parse_args(argv)
    names = [b.name for b in BENCHES]
    args.only = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in names]
    if unknown or not args.only:
        parser.error(f"--only: unknown benchmark {', '.join(unknown) or '(none given)'}; available: {', '.join(names)}")
    if paths.exists(paths.join(args.out, "perf.json")) and not args.overwrite:
        parser.error(f"--out {args.out} already holds perf.json (pass --overwrite to replace it)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    paths.makedirs(args.out)
    selected = [b for b in BENCHES if b.name in args.only]
    command = "jaxalign bench all " + " ".join(sys.argv[3:] if argv is None else argv)
    cores, start = available_cores(), time.perf_counter()
    records, checks = [], []
    for i, bench in enumerate(selected):
        remaining = sum(b.typical_seconds for b in selected[i:]) * (0.1 if args.quick else 1.0)
        load = load_average()
        print(f"[bench all] {i + 1}/{len(selected)} {bench.name}: load {load:.1f}"
              + (f" (WARNING: above the {cores} usable cores; timings will be distorted)" if load > cores else "")
              + f"; elapsed {time.perf_counter() - start:.0f} s, ETA about {remaining:.0f} s", flush=True)
        record, bench_checks = run_one(bench, args.out, args.quick)
        records.append(record)
        checks += bench_checks
    report = {"command": command, "quick": args.quick, "machine": machine(),
              "wall_seconds": time.perf_counter() - start, "benchmarks": records,
              "checks": [{**dataclasses.asdict(c), "met": c.met} for c in checks]}
    paths.write_atomic(paths.join(args.out, "perf.json"), json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    paths.write_atomic(paths.join(args.out, "perf.md"), text)
    print("\n" + text + f"\nwrote {paths.join(args.out, 'perf.md')} and perf.json", flush=True)
    if any(r["error"] for r in records):
        raise SystemExit(f"jaxalign bench all: {sum(bool(r['error']) for r in records)} benchmark(s) failed: "
                         + ", ".join(r["name"] for r in records if r["error"]) + f" (see {args.out}/perf.md)")
    return report


if __name__ == "__main__":
    main()
