"""Figures: paths drawn on a map, next to the observer's posterior of the true goal along each path."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from agents.deceptive_paths.evaluation import posterior_along
from agents.deceptive_paths.maps import GridMap
from jaxalign.paths import save_figure

COLOURS = {"policy": "tab:red", "honest": "tab:blue", "pi_d4": "tab:green", "pi_d1": "tab:purple"}


def colour(name: str, k: int) -> str:
    """The method's colour ("policy (ambiguity)" is a policy), else matplotlib's k-th."""
    return COLOURS.get(name.split()[0], f"C{k + 4}")


def draw_map(ax, grid: GridMap, paths: dict[str, list], title: str) -> None:
    """Walls in grey, S / G / D marked, each path a line through the cell centres (slightly offset per method so
    shared stretches stay visible)."""
    ax.imshow(grid.walls, cmap="Greys", vmin=0, vmax=1.6, origin="upper")
    for k, (name, path) in enumerate(paths.items()):
        rows, cols = np.asarray(path, float).T
        shift = (k - (len(paths) - 1) / 2) * 0.12
        ax.plot(cols + shift, rows + shift, "-", color=colour(name, k), lw=2, alpha=0.85,
                label=f"{name} ({len(path) - 1} moves)")
    for cell, mark, ink in ((grid.start, "S", "black"), (grid.goal, "G", "tab:blue"), (grid.decoy, "D", "tab:orange")):
        ax.text(cell[1], cell[0], mark, ha="center", va="center", fontsize=9, fontweight="bold", color=ink,
                bbox={"boxstyle": "circle,pad=0.15", "fc": "white", "ec": ink})
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8)


def draw_posteriors(ax, grid: GridMap, paths: dict[str, list], budget: int | None = None) -> None:
    for k, (name, path) in enumerate(paths.items()):
        ax.plot(np.arange(len(path)), posterior_along(grid, path), ("-", "--", "-.", ":")[k % 4], marker="o",
                ms=2.5, color=colour(name, k), label=name)  # dashes keep coinciding curves visible
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    if budget is not None:
        ax.axvline(budget, color="black", lw=0.8, ls="--", label=f"T_max = {budget}")
    ax.set(xlabel="step", ylabel="P(true goal | path)", ylim=(0, 1))
    ax.legend(fontsize=7)


def paths_figure(rows: Sequence[tuple[str, GridMap, dict[str, list], int | None]], out_path) -> None:
    """One row per (title, map, {method: path}, budget): the map with the paths, and the posteriors."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False, gridspec_kw={"width_ratios": [1, 1.3]})
    for (title, grid, paths, budget), (ax_map, ax_post) in zip(rows, axes):
        draw_map(ax_map, grid, paths, title)
        draw_posteriors(ax_post, grid, paths, budget)
        ax_post.set_title("cost-difference observer (Ramirez and Geffner 2010), prefix cost included", fontsize=9)
    save_figure(fig, out_path, dpi=100)
