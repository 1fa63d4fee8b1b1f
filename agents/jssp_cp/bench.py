"""`jaxalign bench jssp`: every method on Taillard's size groups, mean gap to the best-known upper bound and mean
seconds per instance.

    jaxalign bench jssp --workdir DIR [--groups 15x15,20x15,...] [--time-limit S] [--checkpoint RUN_DIR]
                        [--samples N] [--agent-time S] [--per-group K] [--workers W]

Methods: the five dispatching rules; the agent greedy and the best of --samples rollouts (the greedy one and the
rest sampled at temperatures 0.5-2.0), or with --agent-time the greedy rollout and then rounds of --samples sampled
ones while the next is expected to end within that many seconds (`inference.best_within`), when a trained policy
is found (--checkpoint, default DIR itself: a `jaxalign run jssp_cp` work directory); CP-SAT given, per instance, the
sampled agent's time (as the paper compares) and CP-SAT at --time-limit seconds, both with --workers workers and no
hint (an instance where CP-SAT finds no schedule within its limit counts as unsolved, and the mean gap is over the
solved ones). Times exclude compilation (one warm-up per shape); CP-SAT's results depend on the machine, which is
why it runs beside the agent in the same process.

Every schedule goes through the validator (agents/jssp_cp/schedule.py); the violations are counted, written to
the tables, and any violation fails the command after the tables are written. Writes DIR/bench_jssp.csv (one row
per group and method), DIR/bench_jssp_instances.csv (one row per instance and method) and DIR/bench_jssp.md.

A bench at 60 s per instance runs for hours, so it resumes: the per-instance file is rewritten (atomically) after
every instance, each row tagged with a `settings` hash of what decides its numbers, per family of methods: nothing
for the rules (deterministic); the samples, agent time, workers and the policy's bytes for the agent and CP-SAT at
the agent's time; the time limit and workers for CP-SAT at --time-limit. A rerun skips every (instance, family) it
already holds, so a newly trained agent in the same DIR reruns only the agent's family, not the hours of CP-SAT at
60 s. Rows of other settings stay in the file untouched; the group table is made of this command's settings only. A
line per instance gives each method's makespan, the seconds per instance so far and the ETA.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time

import jax
import numpy as np

from agents.jssp_cp import cpsat, env, inference, rules
from agents.jssp_cp.instances import TAILLARD_SIZES, benchmark, taillard_names
from agents.jssp_cp.schedule import validate
from jaxalign import paths
from jaxalign.bench.report import csv_text, read_csv

RULES = ("spt", "lpt", "mwkr", "mor", "fifo")


def group_instances(group: str) -> list[str]:
    """The Taillard names of one size group such as '15x15'."""
    sizes = {f"{j}x{m}": i for i, (j, m) in enumerate(TAILLARD_SIZES)}
    if group not in sizes:
        raise ValueError(f"unknown Taillard size group {group!r}; expected some of {', '.join(sizes)}")
    return taillard_names()[10 * sizes[group]:10 * sizes[group] + 10]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxalign bench jssp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--groups", default="15x15,20x15")
    parser.add_argument("--time-limit", type=float, default=60.0, help="CP-SAT's own limit in seconds")
    parser.add_argument("--checkpoint", default=None, help="a `jaxalign run jssp_cp` work directory (default: "
                        "--workdir when it holds policy.msgpack)")
    parser.add_argument("--samples", type=int, default=16, help="the agent's rollouts (per round with --agent-time)")
    parser.add_argument("--agent-time", type=float, default=None, help="seconds per instance: greedy, then rounds of "
                        "--samples sampled rollouts (default: one best of --samples)")
    parser.add_argument("--per-group", type=int, default=10, help="the first K instances of each group")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if not any(g.strip() for g in args.groups.split(",")):
        raise ValueError(f"bench jssp needs --groups to name at least one size group, got {args.groups!r}")
    if (args.time_limit <= 0 or args.samples < 1 or not 1 <= args.per_group <= 10 or args.workers < 1
            or (args.agent_time is not None and args.agent_time <= 0)):
        raise ValueError(f"bench jssp needs --time-limit > 0, --samples >= 1, --agent-time > 0, --per-group in "
                         f"1..10 and --workers >= 1; got {args.time_limit}, {args.samples}, {args.agent_time}, "
                         f"{args.per_group}, {args.workers}")
    return args


class Bench:
    """Runs the methods on one instance at a time, recording (makespan, seconds, violations) per method."""

    def __init__(self, policy, samples: int, time_limit: float, workers: int, agent_time: float | None = None):
        self.policy, self.samples, self.time_limit, self.workers = policy, samples, time_limit, workers
        self.agent_time = agent_time
        self.warm: set = set()

    def _warm(self, key, run):
        if key not in self.warm:
            jax.block_until_ready(run())
            self.warm.add(key)

    def run(self, instance, families) -> dict:
        """{method: (makespan, seconds, violations)} of the methods of `families` (some of FAMILIES)."""
        padded = env.pad(instance)
        found = {}
        if "rules" in families:
            for rule in RULES:
                self._warm((rule, instance.machines.shape), lambda: rules.dispatch(padded, rule))
                clock = time.perf_counter()
                start, makespan = jax.device_get(rules.dispatch(padded, rule))
                found[rule] = (np.asarray(start), int(makespan), time.perf_counter() - clock)
        if "agent" in families:
            apply, params = self.policy
            for label, samples in (("agent_greedy", 0), ("agent_sampled", self.samples)):
                # These two warm-ups compile what every round of `best_within` runs (greedy, sampled).
                self._warm((label, instance.machines.shape), lambda: _agent(apply, params, instance, samples))
                found[label] = _agent(apply, params, instance, samples, self.agent_time)
            limit = max(found["agent_sampled"][2], 0.05)
            found["cpsat_agent_time"] = self._cpsat(instance, limit)
        if "cpsat" in families:
            found[cpsat_label(self.time_limit)] = self._cpsat(instance, self.time_limit)
        return {k: (makespan, seconds, 0 if start is None else
                    len(validate(instance, np.asarray(start)[:instance.jobs, :instance.operations],
                                 makespan=makespan)))
                for k, (start, makespan, seconds) in found.items()}

    def _cpsat(self, instance, limit: float):
        """(start, makespan, seconds), or (None, None, limit) when CP-SAT found no schedule within the limit (it
        needs some time to find its first one; the tables count such instances as unsolved)."""
        try:
            result = cpsat.solve(instance, time_limit=limit, workers=self.workers)
        except RuntimeError:
            return None, None, limit
        return result.start, result.makespan, result.wall_time


def _agent(apply, params, instance, samples: int, seconds: float | None = None):
    """The agent's (start, makespan, seconds): greedy (samples == 0), best of `samples`, or best of rounds of
    `samples` within `seconds`; validated by the caller like every other method (counted, not raised, so that the
    bench reports every violation)."""
    batch = env.stack([instance])
    clock = time.perf_counter()
    start, makespan, _ = inference.agent_schedules(apply, params, batch, jax.random.key(0), samples, seconds)
    return start[0], int(makespan[0]), time.perf_counter() - clock


def markdown(rows: list[dict]) -> str:
    """The group table; a gap is the mean over the instances the method solved (CP-SAT may find no schedule in a
    very short limit: `unsolved`)."""
    lines = ["| group | method | instances | unsolved | mean gap to best-known UB (%) | mean seconds / instance | "
             "violations |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['method']} | {r['instances']} | {r['unsolved']} | "
              f"{'-' if r['mean_gap_percent'] is None else format(r['mean_gap_percent'], '.2f')} | "
              f"{r['mean_seconds']:.3f} | {r['violations']} |" for r in rows]
    return "\n".join(lines) + "\n"


FAMILIES = ("rules", "agent", "cpsat")


def cpsat_label(time_limit: float) -> str:
    return f"cpsat_{time_limit:g}s"


def family_of(method: str) -> str:
    return "rules" if method in RULES else "agent" if method.startswith("agent") or method == "cpsat_agent_time" \
        else "cpsat"


def settings_keys(args: argparse.Namespace, checkpoint: str | None) -> dict[str, str]:
    """Per family of methods, a short sha256 of what decides its rows' numbers (module docstring); the grouping
    options and the work directory decide none."""
    policy = b"none" if checkpoint is None else b"".join(
        paths.read_bytes(paths.join(checkpoint, name)) for name in (inference.POLICY_PARAMS, inference.POLICY_CONFIG))
    payloads = {"rules": b"rules",
                # "greedy+sampled": the best of N includes the greedy rollout (rows before it are other settings)
                # --agent-time adds to the payload, so rows without it keep their key; "forced-skip": rollouts
                # skip the network on forced decisions (same schedules, less time), so older times are not reused;
                # "greedy-first warm-estimate": best_within's rounds follow the greedy rollout, estimated after a
                # warm-up too
                "agent": f"agent greedy+sampled forced-skip {args.samples} {args.workers} ".encode()
                + (b"" if args.agent_time is None
                   else f"within {args.agent_time!r} greedy-first warm-estimate ".encode())
                + hashlib.sha256(policy).digest(),
                "cpsat": f"cpsat {args.time_limit!r} {args.workers}".encode()}
    return {family: hashlib.sha256(payload).hexdigest()[:12] for family, payload in payloads.items()}


INSTANCE_COLUMNS = ("group", "instance", "method", "makespan", "upper_bound", "gap_percent", "seconds", "violations",
                    "settings")


def read_instance_rows(path: str) -> list[dict]:
    """The rows of a bench_jssp_instances.csv, typed; empty when there is none. A file from before the settings
    column has settings '' (never taken as this command's)."""
    rows = read_csv(path)
    number = lambda text, kind: None if text in ("", "None") else kind(text)
    return [{**r, "makespan": number(r["makespan"], int), "upper_bound": int(r["upper_bound"]),
             "gap_percent": number(r["gap_percent"], float), "seconds": float(r["seconds"]),
             "violations": int(r["violations"]), "settings": r.get("settings") or ""} for r in rows]


def summarise(per_instance: list[dict], groups: list[str]) -> list[dict]:
    """One row per group and method: instances, unsolved, mean gap over the solved ones, mean seconds, violations."""
    rows = []
    for group in groups:
        results: dict[str, list] = {}
        for r in per_instance:
            if r["group"] == group:
                results.setdefault(r["method"], []).append((r["gap_percent"], r["seconds"], r["violations"]))
        for method, values in results.items():
            gaps, seconds, violations = zip(*values)
            solved = [g for g in gaps if g is not None]
            rows.append({"group": group, "method": method, "instances": len(values),
                         "unsolved": len(values) - len(solved),
                         "mean_gap_percent": float(np.mean(solved)) if solved else None,
                         "mean_seconds": float(np.mean(seconds)), "violations": int(sum(violations))})
    return rows


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    names = {g: group_instances(g)[:args.per_group] for g in groups}
    workdir = str(args.workdir)
    checkpoint = args.checkpoint
    if checkpoint is None and paths.exists(paths.join(workdir, inference.POLICY_PARAMS)):
        checkpoint = workdir
    policy = inference.load_policy(checkpoint) if checkpoint is not None else None
    keys = settings_keys(args, None if checkpoint is None else str(checkpoint))
    families = [f for f in FAMILIES if f != "agent" or policy is not None]
    mine = lambda r: r["settings"] == keys[family_of(r["method"])]
    paths.makedirs(workdir)
    instances_csv = paths.join(workdir, "bench_jssp_instances.csv")
    kept = read_instance_rows(instances_csv)
    held = {(r["instance"], family_of(r["method"])) for r in kept if mine(r)}
    wanted = [(g, n) for g in groups for n in names[g]]
    todo = [(g, n, [f for f in families if (n, f) not in held]) for g, n in wanted]
    todo = [(g, n, missing) for g, n, missing in todo if missing]
    reused = sum((n, f) in held for _, n in wanted for f in families)
    if reused:
        print(f"[bench jssp] resuming: {reused} (instance, method family) results of these settings already in "
              f"{instances_csv}; running {sum(len(m) for _, _, m in todo)}", file=sys.stderr, flush=True)
    bench = Bench(policy, args.samples, args.time_limit, args.workers, args.agent_time)
    clock = time.perf_counter()
    for count, (group, name, missing) in enumerate(todo, 1):
        instance, _, ub = benchmark(name)
        found = [{"group": group, "instance": name, "method": method, "makespan": makespan, "upper_bound": ub,
                  "gap_percent": None if makespan is None else 100.0 * (makespan - ub) / ub, "seconds": seconds,
                  "violations": violations, "settings": keys[family_of(method)]}
                 for method, (makespan, seconds, violations) in bench.run(instance, missing).items()]
        kept += found
        paths.write_atomic(instances_csv, csv_text([{k: r[k] for k in INSTANCE_COLUMNS} for r in kept]))
        elapsed = time.perf_counter() - clock
        print(f"[{count}/{len(todo)}] {name}: " + ", ".join(f"{r['method']} {r['makespan']}" for r in found)
              + f" | {elapsed / count:.1f} s/instance, ETA {_duration(elapsed / count * (len(todo) - count))}",
              flush=True)
    wanted_names = {n for _, n in wanted}
    rows = summarise([r for r in kept if mine(r) and r["instance"] in wanted_names], groups)
    paths.write_atomic(paths.join(workdir, "bench_jssp.csv"), csv_text(rows))
    note = "" if policy is not None else "\nNo trained policy was given (--checkpoint): the agent rows are absent.\n"
    text = markdown(rows) + note
    paths.write_atomic(paths.join(workdir, "bench_jssp.md"), text)
    print(text)
    bad = sum(r["violations"] for r in rows)
    if bad:
        table = paths.join(workdir, "bench_jssp.csv")
        raise ValueError(f"{bad} validator violations in the schedules above (see {table})")
    return rows
