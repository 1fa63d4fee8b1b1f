"""Exact optima of tiny job shops by enumeration, two independent ways.

- `optimum_by_orders`: every combination of per-machine job orders; each consistent one gives its semi-active
  schedule (`schedule.semi_active`), and an optimal schedule is semi-active, so the minimum is the optimum.
- `best_by_decisions`: every sequence of dispatching decisions under the non-delay rules of env.py's docstring;
  with No-Ops allowed this reaches every semi-active schedule (env.py's docstring), without them only the non-delay
  schedules, whose best can exceed the optimum.

Both grow factorially: meant for instances of up to about 3 jobs x 3 machines (or 4 x 2).
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

from agents.jssp_cp.instances import Instance
from agents.jssp_cp.schedule import makespan_of, semi_active


def optimum_by_orders(instance: Instance) -> tuple[int, np.ndarray]:
    """(optimal makespan, one optimal start array) over all per-machine orders."""
    machines = range(instance.num_machines)
    visits = [sorted(int(j) for j, _ in zip(*np.nonzero(instance.machines == m))) for m in machines]
    choices = [sorted(set(itertools.permutations(v))) for v in visits]
    best, best_start = None, None
    for orders in itertools.product(*choices):
        start = semi_active(instance, orders)
        if start is None:
            continue
        value = makespan_of(instance, start)
        if best is None or value < best:
            best, best_start = value, start
    return best, best_start


def best_by_decisions(instance: Instance, noop: bool = True) -> int:
    """The best makespan over every complete decision sequence of the non-delay rules (No-Ops only when `noop`).

    A depth-first search over states (next operations, job ends, machine ends, floor), memoised because many
    decision orders reach the same state; the rules are restated here in a few lines, apart from env.py."""
    jobs, ops = instance.machines.shape
    machines = [[int(x) for x in row] for row in instance.machines]
    durations = [[int(x) for x in row] for row in instance.durations]

    @functools.lru_cache(maxsize=None)
    def best(nxt, job_end, machine_end, floor):
        waiting = [j for j in range(jobs) if nxt[j] < ops]
        if not waiting:
            return max(job_end)
        bound = {j: max(job_end[j], machine_end[machines[j][nxt[j]]]) for j in waiting}
        now = max(floor, min(bound.values()))
        values = []
        for j in waiting:
            if bound[j] <= now:
                m, end = machines[j][nxt[j]], now + durations[j][nxt[j]]
                values.append(best(_set(nxt, j, nxt[j] + 1), _set(job_end, j, end), _set(machine_end, m, end), floor))
        later = [b for b in bound.values() if b > now]
        if noop and later:
            values.append(best(nxt, job_end, machine_end, min(later)))
        return min(values)

    return best((0,) * jobs, (0,) * jobs, (0,) * instance.num_machines, 0)


def _set(values: tuple, index: int, value) -> tuple:
    return values[:index] + (value,) + values[index + 1:]
