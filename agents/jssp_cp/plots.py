"""Gantt charts of job-shop schedules (matplotlib's object API, no global state)."""
from __future__ import annotations

import numpy as np

from agents.jssp_cp.instances import Instance
from jaxalign import paths


def gantt(instance: Instance, start, path, title: str = "") -> str:
    """One row per machine, one bar per operation coloured by job, the makespan marked; written to `path` (PNG)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    start = np.asarray(start)
    end = start + instance.durations
    machines = instance.num_machines
    colours = colormaps["tab20"].resampled(max(instance.jobs, 1))
    fig = Figure(figsize=(10, 0.3 * machines + 1.5), layout="tight")
    ax = fig.subplots()
    for j in range(instance.jobs):
        bars = [(int(s), int(d)) for s, d in zip(start[j], instance.durations[j])]
        for (s, d), m in zip(bars, instance.machines[j]):
            ax.broken_barh([(s, d)], (m - 0.4, 0.8), facecolors=colours(j), edgecolor="black", linewidth=0.3)
    makespan = int(end.max())
    ax.axvline(makespan, color="black", linestyle="--", linewidth=1)
    ax.set(xlabel="time", ylabel="machine", yticks=range(machines), xlim=(0, makespan * 1.02),
           title=title or f"{instance.name or 'schedule'}: makespan {makespan}")
    ax.invert_yaxis()
    path = str(path)
    paths.save_figure(fig, path, dpi=110)
    return path
