"""`jaxalign deceptive-paths plan MAP.txt --checkpoint DIR [--out DIR] [--budget-fraction F] [--observer O]`.

Plans on a user's map (the text format of agents/deceptive_paths/maps.py: `#` wall, `.` free, `S` start, `G` goal,
`D` decoy) with the policy of a finished `jaxalign run deceptive_paths --workdir DIR` (its DIR/policy/), next to
the honest shortest path and Masters and Sardina's pi_d4; prints each path and its metrics, and writes
OUT/plan.png (the paths, and the observer's posterior of the true goal along each; OUT defaults to the current
directory). A malformed or unsolvable map, or a DIR without a trained policy, is one `jaxalign: error:` line naming
the file (and the line and column) and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    plan = sub.add_parser("plan", help="plan on a map file with a trained policy and the baselines")
    plan.add_argument("map", help="the map file (# . S G D)")
    plan.add_argument("--checkpoint", required=True, help="the work directory of a finished deceptive_paths run")
    plan.add_argument("--out", default=".", help="where plan.png is written (default: the current directory)")
    plan.add_argument("--budget-fraction", type=float, default=1.0,
                      help="T_max = d(S,G) + f (d(S,D) + d(D,G) - d(S,G)), f in [0, 1] (default 1)")
    plan.add_argument("--observer", default="cost_difference", choices=("cost_difference", "value"))


def command(args) -> int:
    from agents.deceptive_paths.maps import load_map
    from agents.deceptive_paths.planning import load_policy, plan
    from agents.deceptive_paths.plots import paths_figure

    if not 0.0 <= args.budget_fraction <= 1.0:
        raise ValueError(f"--budget-fraction must lie in [0, 1], got {args.budget_fraction}")
    if not Path(args.map).is_file():
        raise ValueError(f"{args.map}: no such map file")
    grid = load_map(args.map)
    network, params, spec = load_policy(args.checkpoint)
    result = plan(grid, network, params, spec["ego_radius"], args.budget_fraction, args.observer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "plan.png"
    paths_figure([(f"{Path(args.map).name}, T_max = {result['budget']}", grid, result["paths"], result["budget"])],
                 figure)
    print(f"map {args.map}: {grid.shape[0]}x{grid.shape[1]}, T_max = {result['budget']} "
          f"(budget fraction {args.budget_fraction}), policy trained with the {spec['bonus']} bonus")
    for name, path in result["paths"].items():
        print(f"{name:7s} path ({len(path) - 1} moves): {' '.join(f'{r},{c}' for r, c in path)}")
        print(f"{'':7s} metrics: {json.dumps(result['metrics'][name])}")
    print(f"wrote {figure}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jaxalign.registry import refusal_line

    parser = argparse.ArgumentParser(prog="jaxalign deceptive-paths", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(args)
    except Exception as e:  # noqa: BLE001 - a refusal is one line; anything else keeps its traceback
        line = refusal_line(e)
        if line is None:
            raise
        print(f"jaxalign: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
