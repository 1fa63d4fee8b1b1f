"""`jaxalign bench arith-seeds`: the main job over several seeds, summarised in one table.

    jaxalign bench arith-seeds --workdir runs/seeds [--seeds 0,1,2] [key=value ...]

Each seed runs as its own `jaxalign run arith_dpo --workdir DIR/seed_N seed=N ...` process, started as `python -m
jaxalign.registry` (so `wall_seconds` is what a user's command costs, compilation included; an interrupted sweep
resumes). The table (printed and saved as DIR/summary.md and DIR/summary.json) has one row per seed and the mean
and standard deviation across seeds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
from jaxalign import paths
from jaxalign.rundir import RunDir, strict_json_text

COLUMNS = (
    "sft_accuracy", "dpo_accuracy", "dpo_accuracy_on_sft_correct", "dpo_last_step_accuracy",
    "dpo_last_step_accuracy_on_sft_correct", "sft_mean_length", "dpo_mean_length", "dpo_last_step_mean_length",
    "selected_step", "wall_seconds",
)


def row_from_results(seed: int, results: dict) -> dict:
    row = {"seed": seed, **{k: results[k] for k in COLUMNS if k in results}}
    row["selected_step"] = results["guard"]["selected_step"]
    return row


def markdown_table(rows: list[dict]) -> str:
    header = ["seed", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    for row in rows:
        lines.append("| " + " | ".join(fmt(row[k]) for k in header) + " |")
    for name, reduce in (("mean", np.mean), ("std", np.std)):
        cells = [name] + [f"{reduce([r[k] for r in rows]):.4g}" for k in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(prog="jaxalign bench arith-seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    args, overrides = parser.parse_known_args(argv)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        workdir = paths.join(args.workdir, f"seed_{seed}")
        command = [sys.executable, "-m", "jaxalign.registry", "arith_dpo", "--workdir", workdir, f"seed={seed}",
                   "show_progress=false", *overrides]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        rows.append(row_from_results(seed, json.loads(paths.read_text(RunDir(workdir).results))))
    table = markdown_table(rows)
    print(table)
    paths.write_atomic(paths.join(args.workdir, "summary.md"),
                       f"overrides: {' '.join(overrides) or '(defaults)'}\n\n{table}\n")
    paths.write_atomic(paths.join(args.workdir, "summary.json"),
                       strict_json_text({"overrides": overrides, "rows": rows}, indent=2))
    return rows
