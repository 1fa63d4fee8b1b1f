"""Checking schedules, independently of how they were made.

`validate` lists every way a schedule breaks the job-shop constraints; `simulate` replays a sequence of dispatching
decisions in plain Python, written apart from the JAX environment (agents/jssp_cp/env.py) so that each checks the
other; `semi_active` builds the earliest schedule for given machine orders (the brute force's building block).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from agents.jssp_cp.instances import Instance

NOOP = None


def validate(instance: Instance, start, end=None, makespan=None) -> list[str]:
    """Every violated constraint, as readable strings (an empty list for a valid schedule).

    start: [jobs, operations] start times; end: optional end times (each must be start + duration); makespan:
    optional claimed makespan (must equal the latest end). Checks: every operation fixed at an integer time >= 0;
    precedence within each job; at most one operation at a time on each machine (zero-length operations overlap
    nothing)."""
    start = np.asarray(start)
    shape = instance.machines.shape
    if start.shape != shape:
        return [f"start times have shape {start.shape}; the instance has {shape}"]
    if not np.issubdtype(start.dtype, np.integer):
        if not np.all(np.asarray(start, float) == np.round(start)):
            return ["start times must be integers"]
        start = np.round(start).astype(np.int64)
    violations = []
    duration = instance.durations.astype(np.int64)
    finish = start + duration
    for j, k in zip(*np.nonzero(start < 0)):
        violations.append(f"job {j} operation {k} is not scheduled (start {start[j, k]})")
    if end is not None:
        end = np.asarray(end)
        if end.shape != shape:
            violations.append(f"end times have shape {end.shape}; the instance has {shape}")
        else:
            for j, k in zip(*np.nonzero(end != finish)):
                violations.append(f"job {j} operation {k} ends at {end[j, k]}; start {start[j, k]} + duration "
                                  f"{duration[j, k]} = {finish[j, k]}")
    for j in range(shape[0]):
        for k in range(1, shape[1]):
            if start[j, k] < finish[j, k - 1]:
                violations.append(f"job {j} operation {k} starts at {start[j, k]} before operation {k - 1} ends "
                                  f"at {finish[j, k - 1]}")
    for m in np.unique(instance.machines):
        ops = [(start[j, k], finish[j, k], j, k) for j, k in zip(*np.nonzero(instance.machines == m))
               if duration[j, k] > 0]
        ops.sort()
        for (s1, e1, j1, k1), (s2, e2, j2, k2) in zip(ops, ops[1:]):
            if s2 < e1:
                violations.append(f"machine {m}: job {j1} operation {k1} [{s1}, {e1}) overlaps job {j2} operation "
                                  f"{k2} [{s2}, {e2})")
    if makespan is not None and makespan != finish.max():
        violations.append(f"claimed makespan {makespan} differs from the latest end {finish.max()}")
    return violations


def makespan_of(instance: Instance, start) -> int:
    return int((np.asarray(start) + instance.durations).max())


def simulate(instance: Instance, decisions: Sequence[int | None]) -> tuple[np.ndarray, list[list[int]]]:
    """Replays decisions (a job index, or None for No-Op) under the non-delay rules of env.py's docstring.

    Returns (start [jobs, operations] with -1 where unfixed, legal): legal[i] lists the legal jobs before decision i
    (plus -1 when No-Op is legal), and legal[-1] those after the last decision (empty once every operation is
    fixed). Raises ValueError on an illegal decision."""
    jobs, ops = instance.machines.shape
    nxt = [0] * jobs
    job_end = [0] * jobs
    machine_end = {}
    floor = 0
    start = np.full((jobs, ops), -1, np.int64)
    history = []

    def bound(j):
        return max(job_end[j], machine_end.get(int(instance.machines[j, nxt[j]]), 0))

    def options():
        waiting = [j for j in range(jobs) if nxt[j] < ops]
        if not waiting:
            return floor, [], []
        now = max(floor, min(bound(j) for j in waiting))
        return now, [j for j in waiting if bound(j) <= now], sorted({bound(j) for j in waiting if bound(j) > now})

    for i, decision in enumerate(decisions):
        now, ready, later = options()
        if not ready:
            raise ValueError(f"decision {i}: every operation is already scheduled")
        history.append(ready + ([-1] if later else []))
        if decision is NOOP:
            if not later:
                raise ValueError(f"decision {i}: No-Op is illegal at time {now}: every waiting job can start now")
            floor = later[0]
            continue
        if decision not in ready:
            raise ValueError(f"decision {i}: job {decision} cannot start at time {now}; legal jobs: {ready}")
        k = nxt[decision]
        start[decision, k] = now
        job_end[decision] = now + int(instance.durations[decision, k])
        machine_end[int(instance.machines[decision, k])] = job_end[decision]
        nxt[decision] += 1
    now, ready, later = options()
    history.append(ready + ([-1] if later else []))
    return start, history


def semi_active(instance: Instance, orders: Sequence[Sequence[int]]) -> np.ndarray | None:
    """The earliest start times given, per machine, the order of the jobs on it (orders[m] = job ids, each job once
    per visit of m); None when the orders contradict the job routes (a cycle)."""
    jobs, ops = instance.machines.shape
    # the k-th visit of job j to machine m is operation k_visit[m][pos]
    queue = {m: [] for m in range(len(orders))}
    for m, order in enumerate(orders):
        seen = {}
        for j in order:
            visits = [k for k in range(ops) if instance.machines[j, k] == m]
            queue[m].append((j, visits[seen.get(j, 0)]))
            seen[j] = seen.get(j, 0) + 1
    start = np.full((jobs, ops), -1, np.int64)
    nxt = [0] * jobs
    pos = [0] * len(orders)
    machine_end = [0] * len(orders)
    job_end = [0] * jobs
    for _ in range(jobs * ops):
        progressed = False
        for m in range(len(orders)):
            if pos[m] == len(queue[m]):
                continue
            j, k = queue[m][pos[m]]
            if nxt[j] != k:
                continue
            start[j, k] = max(job_end[j], machine_end[m])
            job_end[j] = machine_end[m] = start[j, k] + int(instance.durations[j, k])
            nxt[j] += 1
            pos[m] += 1
            progressed = True
        if not progressed:
            break
    return start if all(n == ops for n in nxt) else None
