"""The claims over seeds: `python -m agents.deceptive_paths.report RUN_DIR [RUN_DIR ...] [--out FILE.png]`.

Reads the results.json of several finished `jaxalign run deceptive_paths` runs (one per seed, same config apart
from `seed`) and prints, as markdown, each claim of Fatemi, Suttle and Sadler (AAMAS 2024) with the mean, the
standard deviation over seeds (ddof 1) and the per-seed values of the policy's deceptive fraction (the fraction of
steps on which the evaluation observer does not favour the true goal), next to the honest path and pi_d4, which
are deterministic:

  metrics       on the test maps, all four metrics (goal reach, deceptive fraction, the fraction of the path from
                which the true goal is most probable for good, length over budget) of all three methods;
  zero-shot     every map set at the tables' budget fraction: seen train maps, unseen test maps of the train sizes,
                and the unseen, larger 24x24 and 32x32 maps;
  tunability    the test maps' deceptive fraction at each budget fraction, and its rise from the smallest budget
                to the largest; the claim holds when the rise exceeds twice the spread over seeds;
  adaptation    with the decoy moved mid-episode, the deceptive fraction after the move (measured against the new
                decoy) of the policy that sees the move and of the same policy blind to it; holds when the paired
                difference over seeds exceeds twice its spread.

With --out, the tunability curve (mean and per-seed values against the baselines) is saved as a PNG.
A run directory whose config differs from the first in anything but the seed is one error naming it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxalign.paths import save_figure

MAP_SETS = ("train_8x8", "train_16x16", "test_8x8", "test_16x16", "unseen_24x24", "unseen_32x32")
TEST_SETS = ("test_8x8", "test_16x16")
METHODS = ("policy", "honest", "pi_d4")
# metrics.path_metrics' means per map set: goal reached, deceptive steps, the path fraction from which the true goal
# is most probable for good, path length over the budget
METRICS = ("goal_reach_rate", "deceptive_fraction", "truthful_from_fraction", "length_over_budget")


def load_runs(run_dirs: Sequence[str]) -> list[dict]:
    """results.json of every run, checked to differ only in the seed (ValueError naming the directory)."""
    runs = []
    for directory in run_dirs:
        path = Path(directory) / "results.json"
        if not path.is_file():
            raise ValueError(f"{path}: no results.json (is the run finished?)")
        runs.append(json.loads(path.read_text()))
    if len(runs) < 2:
        raise ValueError("the report needs at least two runs (seeds) for a spread over seeds")
    first = {k: v for k, v in runs[0]["config"].items() if k != "seed"}
    for directory, run in zip(run_dirs, runs):
        config = {k: v for k, v in run["config"].items() if k != "seed"}
        if config != first:
            changed = sorted(k for k in set(config) | set(first) if config.get(k) != first.get(k))
            raise ValueError(f"{directory}: its config differs from {run_dirs[0]}'s in {', '.join(changed)}; "
                             "the report compares seeds of one config")
    seeds = [run["config"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the runs repeat a seed: {seeds}")
    return runs


def spread(values: Sequence[float]) -> dict:
    """{"mean", "std" (over seeds, ddof 1), "values"}."""
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)), "values": values.tolist()}


def claims(runs: list[dict]) -> dict:
    """The three claims' numbers over seeds (module docstring)."""
    zero_shot = {}
    for name in MAP_SETS:
        table = [run["tables"][name] for run in runs]
        zero_shot[name] = {"policy": spread([t["policy"]["deceptive_fraction"] for t in table]),
                           "honest": table[0]["honest"]["deceptive_fraction"],
                           "pi_d4": table[0]["pi_d4"]["deceptive_fraction"],
                           "policy_goal_reach": min(t["policy"]["goal_reach_rate"] for t in table)}
    fractions = [point["budget_fraction"] for point in runs[0]["tunability"]]
    curve = [{"budget_fraction": f,
              "policy": spread([run["tunability"][i]["policy"]["deceptive_fraction"] for run in runs]),
              "length_over_budget": spread([run["tunability"][i]["policy"]["length_over_budget"] for run in runs]),
              "honest": runs[0]["tunability"][i]["honest"]["deceptive_fraction"],
              "pi_d4": runs[0]["tunability"][i]["pi_d4"]["deceptive_fraction"]}
             for i, f in enumerate(fractions)]
    rise = spread([run["tunability"][-1]["policy"]["deceptive_fraction"]
                   - run["tunability"][0]["policy"]["deceptive_fraction"] for run in runs])
    seen = [run["adaptation"]["methods"]["policy"]["deceptive_fraction_after_move"] for run in runs]
    blind = [run["adaptation"]["methods"]["policy_without_move"]["deceptive_fraction_after_move"] for run in runs]
    gain = spread(np.subtract(seen, blind))
    test_metrics = {name: {method: {metric: spread([run["tables"][name][method][metric] for run in runs])
                                    for metric in METRICS} for method in METHODS} for name in TEST_SETS}
    return {"seeds": [run["config"]["seed"] for run in runs], "test_metrics": test_metrics, "zero_shot": zero_shot,
            "tunability": {"curve": curve, "rise": rise, "holds": bool(rise["mean"] > 2 * rise["std"])},
            "adaptation": {"sees_the_move": spread(seen), "blind_to_the_move": spread(blind), "difference": gain,
                           "holds": bool(gain["mean"] > 2 * gain["std"])}}


def _cell(s: dict) -> str:
    return f"{s['mean']:.3f} +- {s['std']:.3f} ({', '.join(f'{v:.3f}' for v in s['values'])})"


def markdown(report: dict) -> str:
    lines = [f"seeds {report['seeds']}; mean +- std over seeds (per seed in the other tables)", "",
             "| test maps | method | goal reach | deceptive fraction | true goal for good from | length / budget |",
             "|---|---|---|---|---|---|"]
    for name, methods in report["test_metrics"].items():
        for method, row in methods.items():
            lines.append(f"| {name} | {method} | " + " | ".join(f"{row[m]['mean']:.3f} +- {row[m]['std']:.3f}"
                                                             for m in METRICS) + " |")
    lines += ["", "deceptive fraction by map set:", "",
              "| map set | policy | honest | pi_d4 | policy goal reach (min over seeds) |", "|---|---|---|---|---|"]
    for name, row in report["zero_shot"].items():
        lines.append(f"| {name} | {_cell(row['policy'])} | {row['honest']:.3f} | {row['pi_d4']:.3f} | "
                     f"{row['policy_goal_reach']:.2f} |")
    lines += ["", "| budget fraction | policy | policy length / budget | honest | pi_d4 |", "|---|---|---|---|---|"]
    for point in report["tunability"]["curve"]:
        lines.append(f"| {point['budget_fraction']:g} | {_cell(point['policy'])} | "
                     f"{point['length_over_budget']['mean']:.3f} | {point['honest']:.3f} | {point['pi_d4']:.3f} |")
    tune, adapt = report["tunability"], report["adaptation"]
    lines += ["", f"tunability: rise from the smallest to the largest budget {_cell(tune['rise'])}: "
                  f"{'holds' if tune['holds'] else 'does not hold'} (rise > 2 std)",
              f"adaptation, after the decoy moves: sees the move {_cell(adapt['sees_the_move'])}, blind "
              f"{_cell(adapt['blind_to_the_move'])}, difference {_cell(adapt['difference'])}: "
              f"{'holds' if adapt['holds'] else 'does not hold'} (difference > 2 std)"]
    return "\n".join(lines)


def tunability_figure(report: dict, out_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["tunability"]["curve"]
    f = [p["budget_fraction"] for p in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    per_seed = np.array([p["policy"]["values"] for p in curve])  # [fractions, seeds]
    ax.plot(f, per_seed, color="tab:red", alpha=0.3, lw=1)
    ax.plot(f, per_seed.mean(1), color="tab:red", marker="o", lw=2, label=f"policy (mean of {per_seed.shape[1]})")
    ax.plot(f, [p["pi_d4"] for p in curve], color="tab:green", marker="s", label="pi_d4")
    ax.plot(f, [p["honest"] for p in curve], color="tab:blue", marker="^", label="honest")
    ax.set_xlabel("budget fraction f: T_max = d(s,g) + f (d(s,D) + d(D,g) - d(s,g))")
    ax.set_ylabel("deceptive fraction (test maps)")
    ax.set_title("Tunable deception through the time budget", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.deceptive_paths.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories, one per seed")
    parser.add_argument("--out", help="save the tunability curve to this PNG")
    args = parser.parse_args(argv)
    try:
        report = claims(load_runs(args.runs))
    except ValueError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    print(markdown(report))
    if args.out:
        tunability_figure(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
