"""`jaxalign bench pdppo`: PPO vs PDPPO on the paper's configurations, one table.

    jaxalign bench pdppo --workdir DIR [--budget N] [--seeds 0,1,2,3,4] [--instances 15i5m,20i10m,25i15m]
                         [--no-tiny] [key=value ...]

Each configuration runs as its own `jaxalign run pdppo_lot_sizing --workdir DIR/INSTANCE instance=INSTANCE
seeds=SEEDS learner.total_timesteps=BUDGET ...` process (`python -m jaxalign.registry`, so an interrupted bench
resumes where it stopped), the tiny instance too unless --no-tiny (its rows add each arm's gap to the exact
optimum). The table, one row per configuration, is printed and written to DIR/bench.md and DIR/bench.csv:
configuration, budget, seeds, PPO / PDPPO / base-stock cost per episode with 95 % intervals, the ratio PPO/PDPPO, the
verdict ("holds" when PDPPO's interval over seeds lies wholly below PPO's) and the paper's figure beside it.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys

from agents.pdppo.experiment import TINY
from agents.pdppo.instances import CONFIGS
from jaxalign import paths
from jaxalign.rundir import RunDir

DEFAULT_INSTANCES = ("15i5m", "20i10m", "25i15m")
# Felizardo et al. 2025, from the authors' logs at 1M environment steps per run.
PAPER = {"15i5m": "no difference (within noise)", "20i10m": "PDPPO ~24 % lower cost (PPO/PDPPO ~1.3)",
         "25i15m": "PPO cost 1.2-1.8x PDPPO's", TINY: "(not in the paper)"}
COLUMNS = ("configuration", "budget", "seeds", "ppo_cost", "ppo_ci95_low", "ppo_ci95_high", "pdppo_cost",
           "pdppo_ci95_low", "pdppo_ci95_high", "heuristic_cost", "heuristic_ci95_low", "heuristic_ci95_high",
           "ratio_ppo_over_pdppo", "paired_difference", "paired_ci95_low", "paired_ci95_high", "verdict",
           "gap_ppo", "gap_pdppo", "wall_seconds", "paper")


def row_from_results(configuration: str, results: dict) -> dict:
    row = {"configuration": configuration, "budget": results["env_steps_per_run"], "seeds": len(results["seeds"])}
    for arm in ("ppo", "pdppo", "heuristic"):
        row[f"{arm}_cost"] = results[arm]["mean_cost"]
        row[f"{arm}_ci95_low"], row[f"{arm}_ci95_high"] = results[arm]["ci95_low"], results[arm]["ci95_high"]
    paired = results["paired_difference_ppo_minus_pdppo"]
    row.update(ratio_ppo_over_pdppo=results["ratio_ppo_over_pdppo"], paired_difference=paired["mean"],
               paired_ci95_low=paired["ci95_low"], paired_ci95_high=paired["ci95_high"], verdict=results["verdict"])
    gaps = results.get("gap_to_optimum", {})
    row["gap_ppo"] = gaps["ppo"]["mean"] if gaps else None
    row["gap_pdppo"] = gaps["pdppo"]["mean"] if gaps else None
    row["wall_seconds"] = results["wall_seconds"]
    row["paper"] = PAPER.get(configuration, "")
    return row


def _interval(row: dict, arm: str) -> str:
    return f"{row[f'{arm}_cost']:.1f} [{row[f'{arm}_ci95_low']:.1f}, {row[f'{arm}_ci95_high']:.1f}]"


def markdown_table(rows: list[dict]) -> str:
    header = ["configuration", "env steps per run", "seeds", "PPO cost [95 % CI]", "PDPPO cost [95 % CI]",
              "base-stock cost [95 % CI]", "PPO/PDPPO", "PPO - PDPPO, paired [95 % CI]", "PDPPO cheaper",
              "gap to optimum PPO / PDPPO", "paper (1M steps)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        gap = f"{r['gap_ppo']:+.1%} / {r['gap_pdppo']:+.1%}" if r["gap_ppo"] is not None else "-"
        paired = f"{r['paired_difference']:.1f} [{r['paired_ci95_low']:.1f}, {r['paired_ci95_high']:.1f}]"
        cells = [r["configuration"], f"{r['budget']:,}", str(r["seeds"]), _interval(r, "ppo"), _interval(r, "pdppo"),
                 _interval(r, "heuristic"), f"{r['ratio_ppo_over_pdppo']:.3f}", paired, r["verdict"], gap, r["paper"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="jaxalign bench pdppo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--budget", type=int, default=None,
                        help="environment steps per run (learner.total_timesteps; default: the config's, 1M)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--instances", default=",".join(DEFAULT_INSTANCES))
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny instance (exact optimum)")
    args, overrides = parser.parse_known_args(argv)
    instances = [i for i in args.instances.split(",") if i]
    unknown = [i for i in instances if i not in CONFIGS]
    if unknown or not instances:
        raise ValueError(f"--instances={args.instances!r}: expected names among {', '.join(CONFIGS)}")
    if args.budget is not None and args.budget <= 0:
        raise ValueError(f"--budget={args.budget}: expected a positive number of environment steps per run")
    args.instances = instances + ([] if args.no_tiny else [TINY])
    return args, overrides


def main(argv: list[str]) -> list[dict]:
    args, overrides = parse_arguments(argv)
    from jaxalign.registry import configure

    budget = [] if args.budget is None else [f"learner.total_timesteps={args.budget}"]
    commands = {}
    for instance in args.instances:  # every command is checked before the first one runs
        run_overrides = [f"instance={instance}", f"seeds={args.seeds}", *budget, "show_progress=false", *overrides]
        configure("pdppo_lot_sizing", run_overrides)
        commands[instance] = [sys.executable, "-m", "jaxalign.registry", "pdppo_lot_sizing", "--workdir",
                              paths.join(args.workdir, instance), *run_overrides]
    rows = []
    for instance, command in commands.items():
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        results = paths.read_text(RunDir(paths.join(args.workdir, instance)).results)
        rows.append(row_from_results(instance, json.loads(results)))
    table = markdown_table(rows)
    print(table)
    paths.makedirs(args.workdir)
    paths.write_atomic(paths.join(args.workdir, "bench.md"), f"jaxalign bench pdppo {' '.join(argv)}\n\n{table}\n")
    paths.write_atomic(paths.join(args.workdir, "bench.csv"), csv_text(rows))
    return rows
