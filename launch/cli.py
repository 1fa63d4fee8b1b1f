"""The `jaxalign` command line: list and run experiments, run benchmarks.

    jaxalign list
    jaxalign objectives
    jaxalign run NAME --workdir DIR [key=value ...]
    jaxalign bench dpo-throughput [--sizes tiny,small] [--steps N] [--no-trl]
    jaxalign bench arith-seeds --workdir DIR [--seeds 0,1,2] [key=value ...]
    jaxalign bench ppo-throughput [--timesteps N] [--sb3-timesteps N] [--no-sb3]
    jaxalign bench objectives --workdir DIR [--seeds 0,1,2] [--tasks ...] [--objectives ...] [key=value ...]
    jaxalign bench reference-cost [--sizes tiny,small,medium] [--steps N] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from launch.experiments import EXPERIMENTS, get_experiment
from launch.overrides import ConfigError, apply_overrides


def _run(args) -> int:
    experiment = get_experiment(args.name)
    cfg = apply_overrides(experiment.default_config(), args.overrides)
    results = experiment.run(cfg, args.workdir)
    summary = {k: v for k, v in results.items() if not isinstance(v, (dict, list))}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


BENCHMARKS = {
    "dpo-throughput": "jaxalign.bench.dpo_throughput",
    "arith-seeds": "jaxalign.bench.arith_seeds",
    "ppo-throughput": "rl.bench.ppo_throughput",
    "reference-cost": "jaxalign.bench.reference_cost",
    "objectives": "jaxalign.bench.objectives",
}


def _bench(args) -> int:
    if args.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {args.benchmark!r}; available: {', '.join(BENCHMARKS)}")
    importlib.import_module(BENCHMARKS[args.benchmark]).main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered experiments")
    sub.add_parser("objectives", help="print every registered objective, one per line")
    run = sub.add_parser("run", help="run (or resume) an experiment in a work directory")
    run.add_argument("name")
    run.add_argument("--workdir", required=True)
    run.add_argument("overrides", nargs="*", help="config overrides, key=value (dotted keys for nested fields)")
    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "list":
            for name, (description, _) in sorted(EXPERIMENTS.items()):
                print(f"{name:24s} {description}")
            return 0
        if args.command == "objectives":
            from jaxalign.losses import OBJECTIVES

            print("\n".join(sorted(OBJECTIVES)))
            return 0
        if args.command == "run":
            return _run(args)
        return _bench(args)
    except (ConfigError, ValueError) as e:
        print(f"jaxalign: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
