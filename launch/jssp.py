"""`jaxalign jssp solve`: schedule one job-shop instance file with a rule, CP-SAT or a trained agent.

    jaxalign jssp solve INSTANCE_FILE --method agent|cp-sat|spt|lpt|mwkr|mor|fifo [--time-limit S]
                        [--checkpoint DIR] [--samples N] [--out DIR]

INSTANCE_FILE: Taillard or OR-Library format (detected). Prints the makespan and, when the instance's content is one
of Taillard's ta01-ta80, its best-known bounds and the gap to the upper bound; writes OUT/schedule.json and
OUT/gantt.png. Every schedule is validated before it is written. --time-limit: CP-SAT's limit in seconds (default
10, two workers); for the agent, the greedy rollout and then rounds of --samples sampled rollouts while the next one
is expected to end within it (default: one best of --samples, no limit). --checkpoint: a `jaxalign run jssp_cp` work
directory (agent only; default: the policy shipped in agents/jssp_cp/data/pretrained, trained on generated instances
only); --samples: the agent's rollouts, the shortest schedule kept (the greedy one and N-1 sampled at temperatures
0.5-2.0; 0 = greedy only, which refuses --time-limit). A malformed file is one error line naming the file and the
line (exit 2).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("agent", "cp-sat", "spt", "lpt", "mwkr", "mor", "fifo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="jssp_command", required=True)
    solve = sub.add_parser("solve", help="schedule one instance file; print the makespan, write schedule.json and "
                           "gantt.png")
    solve.add_argument("instance", help="a Taillard or OR-Library instance file")
    solve.add_argument("--method", required=True, choices=METHODS)
    solve.add_argument("--time-limit", type=float, default=None, help="seconds: CP-SAT's limit (default 10); the "
                       "agent's budget: greedy, then rounds of --samples sampled rollouts (default: one best of N)")
    solve.add_argument("--checkpoint", default=None, help="a `jaxalign run jssp_cp` work directory (agent; "
                       "default: the shipped pretrained policy)")
    solve.add_argument("--samples", type=int, default=16, help="the agent's rollouts, the best kept: the greedy one "
                       "and N-1 sampled; 0 = greedy only")
    solve.add_argument("--out", default=".", help="directory for schedule.json and gantt.png (default: .)")


def schedule(instance, method: str, time_limit: float | None, checkpoint: str | None, samples: int):
    """(start [jobs, operations], makespan, extra fields for schedule.json), validated."""
    import numpy as np

    from agents.jssp_cp import cpsat, env, inference, rules

    if time_limit is not None and time_limit <= 0:
        raise ValueError(f"--time-limit must be > 0, got {time_limit}")
    if method == "cp-sat":
        result = cpsat.solve(instance, time_limit=10.0 if time_limit is None else time_limit, workers=2)
        start, makespan = result.start, result.makespan
        extra = {"status": result.status, "lower_bound_proved": result.bound, "seconds": result.wall_time}
    elif method == "agent":
        checkpoint = inference.pretrained_dir() if checkpoint is None else checkpoint
        if samples < 0:
            raise ValueError(f"--samples must be >= 0, got {samples}")
        if samples == 0 and time_limit is not None:
            raise ValueError("--time-limit needs --samples >= 1 for the agent: --samples 0 is the greedy rollout "
                             "alone, which has nothing to spend a time limit on")
        apply, params = inference.load_policy(checkpoint)
        found = inference.schedule_with_agent(apply, params, instance, num_samples=samples, seconds=time_limit)
        start, makespan = found.start, found.makespan
        extra = {"samples": samples, "rollouts": found.rollouts, "seconds": found.seconds}
    else:
        start, makespan = rules.dispatch(env.pad(instance), method)
        makespan = int(makespan)
        extra = {}
    start = inference.checked(instance, np.asarray(start), makespan, method)
    return start, int(makespan), extra


def command(args) -> int:
    from agents.jssp_cp.instances import benchmark, benchmark_name, read_instance
    from agents.jssp_cp.plots import gantt

    path = Path(args.instance)
    if not path.is_file():
        raise ValueError(f"{path}: no such instance file")
    instance = read_instance(path)
    start, makespan, extra = schedule(instance, args.method, args.time_limit, args.checkpoint, args.samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"instance": str(path), "method": args.method, "jobs": instance.jobs,
              "machines": instance.num_machines, "makespan": makespan, "start": start.tolist(),
              "end": (start + instance.durations).tolist(), **extra}
    line = f"{path.name}: {args.method} makespan {makespan}"
    name = benchmark_name(instance)
    if name is not None:
        _, lb, ub = benchmark(name)
        gap = 100.0 * (makespan - ub) / ub
        record.update(benchmark=name, best_known_lower_bound=lb, best_known_upper_bound=ub, gap_percent=gap)
        line += f"; Taillard {name}: best-known upper bound {ub}, gap {gap:+.2f} %"
    (out / "schedule.json").write_text(json.dumps(record) + "\n")
    gantt(instance, start, out / "gantt.png", title=f"{path.name} by {args.method}: makespan {makespan}")
    print(line)
    return 0
