"""The `jaxalign` command line: list and run experiments, run benchmarks.

    jaxalign list
    jaxalign objectives
    jaxalign [--debug] run NAME --workdir DIR [key=value ...]     (--debug: an error's traceback on the terminal too)
    jaxalign local --processes N [--devices-per-process M] [--port P] run NAME --workdir DIR [key=value ...]
    jaxalign sweep NAME --workdir DIR [--print] key=v1,v2 [other=a,b ...]
    jaxalign bench dpo-throughput [--sizes tiny,small] [--steps N] [--no-trl]
    jaxalign bench arith-seeds --workdir DIR [--seeds 0,1,2] [key=value ...]
    jaxalign bench ppo-throughput [--num-envs 16,64,...,4096] [--sb3-num-envs 1,4,...] [--timesteps N] [--no-sb3]
    jaxalign bench objectives --workdir DIR [--seeds 0,1,2] [--tasks ...] [--objectives ...] [key=value ...]
    jaxalign bench reference-cost [--sizes tiny,small,medium] [--steps N] [--out DIR]
    jaxalign bench step-profile --out DIR [--sizes small,medium,large] [--prompt-len N] [--completion-len N]
    jaxalign bench lm-step [--size medium] [--batch 16] [--seq-len 128] [--repeats 10] [--out DIR]
    jaxalign bench all --out DIR [--only NAME,...] [--quick] [--overwrite]   (launch/bench_all.py: perf.md, perf.json)
    jaxalign bench iterative --workdir DIR [--seeds 0,1,2] [--algorithms ...] [--no-arith] [key=value ...]
    jaxalign bench pdppo --workdir DIR [--budget N] [--seeds 0,1,2,3,4] [--instances 15i5m,20i10m,25i15m] [--no-tiny]
    jaxalign convert hf-to-jaxalign|jaxalign-to-hf SRC DST [--family F] [--dtype D]      (launch/convert.py)
    jaxalign data prepare FORMAT --input FILE --output DIR [--on-error skip] [--tokenizer T --max-length N]
                                                                                          (launch/data.py)
    jaxalign jssp solve INSTANCE_FILE --method agent|cp-sat|spt|lpt|mwkr|mor|fifo [--time-limit S] [--checkpoint DIR]
                        [--out DIR]                                                       (launch/jssp.py)
    jaxalign bench jssp --workdir DIR [--groups 15x15,20x15] [--time-limit S] [--checkpoint DIR] [--agent-time S]
    jaxalign generate --checkpoint DIR|--model HF_DIR --prompt TEXT|--prompts FILE [--chat] [sampling options]
                                                                                          (launch/generate.py)
    jaxalign deceptive-paths plan MAP.txt --checkpoint DIR [--out DIR] [--budget-fraction F]
                                                                                          (launch/deceptive_paths.py)
    jaxalign tpu create|setup|run|logs|ssh|status|delete NAME --zone Z ... [--dry-run]   (launch/tpu.py)
    jaxalign ssh --hosts FILE [--dry-run] setup|run|logs ...                             (launch/ssh.py)
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from jaxalign.plugins import load_plugins, split_plugin_arguments
from jaxalign.registry import (EXPERIMENTS, add_debug_argument, add_run_arguments, configure, error_line,
                               experiment_help, refusal_line, report_errors, run_command, wants_experiment_help)
from launch.sweep import add_arguments as add_sweep_arguments
from launch.sweep import command as sweep_command


def _run(args) -> int:
    return run_command(args.name, args.workdir, args.overrides, args.debug, args.on_nonfinite, args.config)


def _local(args) -> int:
    """`jaxalign local ... run NAME --workdir DIR ...`: the run command is parsed here first, so a mistake in it is
    one error from the launcher rather than N from its processes."""
    from launch.local import launch

    if not args.rest or args.rest[0] != "run":
        raise ValueError(f"jaxalign local expects `run NAME --workdir DIR [key=value ...]` after its options, got "
                         f"{' '.join(args.rest) or 'nothing'}")
    run_args, extra = build_parser().parse_known_args(args.rest)
    configure(run_args.name, list(run_args.overrides) + extra)
    return launch(args.rest, run_args.workdir, args.processes, args.devices_per_process, args.port)


BENCHMARKS = {
    "dpo-throughput": "jaxalign.bench.dpo_throughput",
    "arith-seeds": "jaxalign.bench.arith_seeds",
    "ppo-throughput": "rl.bench.ppo_throughput",
    "reference-cost": "jaxalign.bench.reference_cost",
    "objectives": "jaxalign.bench.objectives",
    "sampling": "jaxalign.bench.sampling",
    "logprob-memory": "jaxalign.bench.logprob_memory",
    "step-profile": "jaxalign.bench.step_profile",
    "lm-step": "jaxalign.bench.lm_step",
    "all": "launch.bench_all",
    "packing": "jaxalign.bench.packing",
    "iterative": "jaxalign.bench.iterative",
    "jssp": "agents.jssp_cp.bench",
    "pdppo": "agents.pdppo.bench",
}


def objectives_table(names_only: bool = False) -> str:
    """`jaxalign objectives`: one line per registered objective, sorted by name."""
    from jaxalign.losses import SPECS

    if names_only:
        return "\n".join(sorted(SPECS))
    rows = [("objective", "family", "reference", "extras", "state", "hyper-parameters")]
    for name in sorted(SPECS):
        spec = SPECS[name]
        rows.append((name, spec.family, "yes" if spec.needs_reference else "no", ",".join(spec.extras) or "-",
                     "yes" if spec.state is not None else "-", ",".join(sorted(spec.hyperparameters)) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows)


def _bench(args) -> int:
    if args.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {args.benchmark!r}; available: {', '.join(BENCHMARKS)}")
    importlib.import_module(BENCHMARKS[args.benchmark]).main(args.rest)
    return 0


# Remote launchers: each module parses its own arguments (`jaxalign tpu --help`, `jaxalign ssh --help`).
LAUNCHERS = {"tpu": "launch.tpu", "ssh": "launch.ssh"}


def _launch(command: str, rest: list[str]) -> int:
    try:
        return importlib.import_module(LAUNCHERS[command]).main(rest)
    except ValueError as e:  # launch.remote.LaunchError: a bad value or a failed remote step, one line
        print(f"jaxalign: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = add_debug_argument(argparse.ArgumentParser(prog="jaxalign", description=__doc__.split("\n\n")[0]))
    parser.add_argument("--plugin", action="append", metavar="MODULE_OR_FILE.py",
                        help="import your own module first (repeatable; also JAXALIGN_PLUGINS and the "
                             "'jaxalign.plugins' entry-point group): its objectives and experiments then work in "
                             "run, sweep, local, tpu, ssh and the benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered experiments")
    objectives = sub.add_parser("objectives", help="every registered objective: family, whether it reads the "
                                "reference, extras, stateful, its hyper-parameters (--names: the names only)")
    objectives.add_argument("--names", action="store_true", help="print the names only, one per line")
    add_run_arguments(sub.add_parser("run", help="run (or resume) an experiment in a work directory"))
    sweep = sub.add_parser("sweep", help="run a grid of runs (key=v1,v2 ...) one after another, aggregate their "
                           "results into WORKDIR/sweep.csv and sweep.md")
    add_sweep_arguments(sweep)
    local = sub.add_parser("local", help="run N processes on this machine joined by jax.distributed (CPU, gloo): "
                           "the multi-process code path of a pod")
    local.add_argument("--processes", type=int, required=True)
    local.add_argument("--devices-per-process", type=int, default=1)
    local.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    local.add_argument("rest", nargs=argparse.REMAINDER, help="run NAME --workdir DIR [key=value ...]")
    bench = sub.add_parser("bench", help="run a benchmark", formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="run a benchmark (`jaxalign bench NAME --help` gives its options):\n"
                           + "\n".join(f"  {name}" for name in sorted(BENCHMARKS)))
    bench.add_argument("benchmark", help="the benchmark's name (listed above)")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    from launch.convert import add_arguments as add_convert_arguments

    add_convert_arguments(sub.add_parser("convert", help="convert a model between Hugging Face checkpoints "
                                         "(Llama, Mistral, Qwen2, Gemma) and jaxalign model directories"))
    from launch.data import add_arguments as add_data_arguments

    add_data_arguments(sub.add_parser("data", help="build a TFDS dataset from your own preference file "
                                      "(JSONL/Parquet) and report malformed rows"))
    from launch.jssp import add_arguments as add_jssp_arguments

    add_jssp_arguments(sub.add_parser("jssp", help="agent (d): schedule a job-shop instance file with a rule, "
                                      "CP-SAT or a trained agent"))
    from launch.generate import add_arguments as add_generate_arguments

    add_generate_arguments(sub.add_parser("generate", help="completions from a checkpoint of any LM experiment "
                                          "(LoRA merged) or a Hugging Face directory, with the run's tokenizer"))
    from launch.deceptive_paths import add_arguments as add_deceptive_paths_arguments

    add_deceptive_paths_arguments(sub.add_parser("deceptive-paths", help="agent (c): plan on a map file with a "
                                                 "trained deceptive-path policy and the baselines"))
    for name, what in (("tpu", "Cloud TPU slices via gcloud: create|setup|run|logs|ssh|status|delete"),
                       ("ssh", "any hosts via ssh (GPU clusters): --hosts FILE setup|run|logs")):
        sub.add_parser(name, add_help=False, help=f"{what} (see `jaxalign {name} --help`)").add_argument(
            "rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # before anything is resolved: a plugin's objectives and experiments are then like built-in ones
        plugins, argv = split_plugin_arguments(argv)
        load_plugins(plugins)
    except ValueError as e:
        print(f"jaxalign: error: {error_line(e)}", file=sys.stderr)
        return 2
    if argv[:1] and argv[0] in LAUNCHERS:  # before parsing: their options must not be split off as "extra"
        return _launch(argv[0], argv[1:])
    if argv[:1] == ["run"] and wants_experiment_help(argv[1:]):
        return report_errors(lambda: print(experiment_help(argv[1])))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("run", "sweep"):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "list":
            for name, (description, _) in sorted(EXPERIMENTS.items()):
                print(f"{name:24s} {description}")
            return 0
        if args.command == "objectives":
            print(objectives_table(names_only=args.names))
            return 0
        if args.command == "run":
            return _run(args)
        if args.command == "sweep":
            return sweep_command(args)
        if args.command == "local":
            return _local(args)
        if args.command == "convert":
            from launch.convert import command as convert_command

            return convert_command(args)
        if args.command == "data":
            from launch.data import command as data_command

            return data_command(args)
        if args.command == "jssp":
            from launch.jssp import command as jssp_command

            return jssp_command(args)
        if args.command == "generate":
            from launch.generate import command as generate_command

            return generate_command(args)
        if args.command == "deceptive-paths":
            from launch.deceptive_paths import command as deceptive_paths_command

            return deceptive_paths_command(args)
        return _bench(args)
    except Exception as e:  # noqa: BLE001 - anything that is not a refusal is re-raised with its traceback
        line = refusal_line(e)
        if line is None:
            raise
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        print(f"jaxalign: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
