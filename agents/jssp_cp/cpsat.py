"""The job shop as a CP-SAT model (OR-Tools): one interval variable per operation, precedence within each job, one
no-overlap constraint per machine, and the makespan (the latest end) minimised. A dispatching schedule can be given
as a solution hint, which the solver uses as its first incumbent."""
from __future__ import annotations

import dataclasses

import numpy as np
from ortools.sat.python import cp_model

from agents.jssp_cp.instances import Instance


@dataclasses.dataclass(frozen=True)
class CPResult:
    """start [jobs, operations]; makespan; status 'OPTIMAL' or 'FEASIBLE'; bound: the solver's proven lower bound
    on the optimum; wall_time in seconds."""

    start: np.ndarray
    makespan: int
    status: str
    bound: int
    wall_time: float


def solve(instance: Instance, time_limit: float = 10.0, workers: int = 2, hint=None, seed: int = 0) -> CPResult:
    """Minimises the makespan within `time_limit` seconds using `workers` search workers.

    hint: optional start times [jobs, operations] of a feasible schedule (e.g. from `rules.dispatch`). Raises
    RuntimeError when no schedule is found in time (the model itself is always feasible)."""
    if time_limit <= 0 or workers < 1:
        raise ValueError(f"solve needs time_limit > 0 and workers >= 1; got {time_limit} and {workers}")
    jobs, ops = instance.machines.shape
    horizon = int(instance.durations.sum())
    model = cp_model.CpModel()
    starts = [[model.new_int_var(0, horizon, f"s{j}_{k}") for k in range(ops)] for j in range(jobs)]
    intervals = {}
    for j in range(jobs):
        for k in range(ops):
            d = int(instance.durations[j, k])
            interval = model.new_fixed_size_interval_var(starts[j][k], d, f"i{j}_{k}")
            intervals.setdefault(int(instance.machines[j, k]), []).append(interval)
            if k:
                model.add(starts[j][k] >= starts[j][k - 1] + int(instance.durations[j, k - 1]))
    for machine_intervals in intervals.values():
        model.add_no_overlap(machine_intervals)
    makespan = model.new_int_var(0, horizon, "makespan")
    for j in range(jobs):
        model.add(makespan >= starts[j][-1] + int(instance.durations[j, -1]))
    model.minimize(makespan)
    if hint is not None:
        hint = np.asarray(hint)
        if hint.shape != (jobs, ops):
            raise ValueError(f"hint has shape {hint.shape}; the instance has {(jobs, ops)}")
        for j in range(jobs):
            for k in range(ops):
                model.add_hint(starts[j][k], int(hint[j, k]))
        model.add_hint(makespan, int((hint + instance.durations).max()))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_search_workers = int(workers)
    solver.parameters.random_seed = int(seed)
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"CP-SAT found no schedule for {instance.name!r} within {time_limit} s "
                           f"(status {solver.status_name(status)})")
    start = np.array([[solver.value(v) for v in row] for row in starts], np.int64)
    return CPResult(start=start, makespan=int(solver.value(makespan)), status=solver.status_name(status),
                    bound=int(solver.best_objective_bound), wall_time=float(solver.wall_time))
