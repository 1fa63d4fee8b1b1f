"""Grid maps for deceptive path planning: the text format, BFS distances, padded graph arrays, random maps.

The set-up is Fatemi, Suttle and Sadler (AAMAS 2024): a 4-connected grid with obstacles, a start S, a true goal G and
a decoy goal D. A map is written as text, one character a cell, every row the same width:

    #  wall            .  free            S  start (free)            G  true goal (free)            D  decoy (free)

exactly one S, one G and one D, and both G and D reachable from S. Anything else raises one `ValueError` that
names the source, the line and the column (1-based).

The jitted path never sees a Python graph: `map_arrays` turns a map into fixed-shape arrays (`MapArrays`) over the
cells of a grid padded with walls to (height, width) -- node n is cell (n // width, n % width) -- with a neighbour
table [N, 4] (-1 where there is a wall, the border or padding) in the action order up, right, down, left, and BFS
distances to the goal, the decoy and a moved decoy (for the real-time adaptation test). `stack_maps` pads every
map of a set to the largest one and stacks them along a leading axis.

Distances are integers; a cell not connected to the target gets `UNREACHABLE(N) = N` (larger than any path in the
padded grid), which never reaches the jitted features since every cell the agent can visit is connected to S, G
and D.
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from flax import struct

WALL, FREE, START, GOAL, DECOY = "#", ".", "S", "G", "D"
CHARACTERS = (WALL, FREE, START, GOAL, DECOY)
# Action order of every neighbour table: up, right, down, left, as (row, column) steps.
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))
DATA_DIR = Path(__file__).resolve().parent / "data"
_ROLES = {START: "start", GOAL: "goal", DECOY: "decoy"}


@dataclasses.dataclass(frozen=True, eq=False)
class GridMap:
    """A parsed map: `walls` bool [H, W]; `start`, `goal`, `decoy` as (row, column); `source` names it in errors."""

    walls: np.ndarray
    start: tuple[int, int]
    goal: tuple[int, int]
    decoy: tuple[int, int]
    source: str = "<map>"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.walls.shape)

    def __eq__(self, other) -> bool:
        return (isinstance(other, GridMap) and np.array_equal(self.walls, other.walls)
                and (self.start, self.goal, self.decoy) == (other.start, other.goal, other.decoy))

    def distances_from(self, cell: tuple[int, int]) -> np.ndarray:
        return bfs_distances(self.walls, cell)


def _where(source: str, line: int, column: int) -> str:
    return f"{source}: line {line}, column {column}"


def parse_map(text: str, source: str = "<string>") -> GridMap:
    """Parse the text format (module docstring); trailing blank lines and '\\r' are ignored."""
    rows = text.replace("\r", "").split("\n")
    while rows and rows[-1] == "":
        rows.pop()
    if not rows:
        raise ValueError(f"{_where(source, 1, 1)}: the map is empty; expected rows of {''.join(CHARACTERS)!r}")
    width = len(rows[0])
    found: dict[str, tuple[int, int]] = {}
    walls = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        if len(row) != width:
            column = min(len(row), width) + 1
            raise ValueError(f"{_where(source, i + 1, column)}: row has {len(row)} columns; expected {width} "
                             f"(the width of line 1); every row of a map must have the same width")
        for j, ch in enumerate(row):
            if ch not in CHARACTERS:
                raise ValueError(f"{_where(source, i + 1, j + 1)}: unknown character {ch!r}; expected one of "
                                 f"'#' wall, '.' free, 'S' start, 'G' goal, 'D' decoy")
            walls[i, j] = ch == WALL
            if ch in _ROLES:
                if ch in found:
                    fi, fj = found[ch]
                    raise ValueError(f"{_where(source, i + 1, j + 1)}: a second {_ROLES[ch]} {ch!r} (the first is "
                                     f"at line {fi + 1}, column {fj + 1}); a map has exactly one")
                found[ch] = (i, j)
    for ch in (START, GOAL, DECOY):
        if ch not in found:
            raise ValueError(f"{_where(source, len(rows), width)}: no {_ROLES[ch]} {ch!r} anywhere in the map "
                             f"(reported at its last cell); a map has exactly one")
    grid = GridMap(walls, found[START], found[GOAL], found[DECOY], source)
    from_start = bfs_distances(walls, grid.start)
    for ch in (GOAL, DECOY):
        i, j = found[ch]
        if from_start[i, j] < 0:
            si, sj = grid.start
            raise ValueError(f"{_where(source, i + 1, j + 1)}: the {_ROLES[ch]} {ch!r} is not reachable from the "
                             f"start 'S' at line {si + 1}, column {sj + 1} (walls cut it off); the map is "
                             f"unsolvable")
    return grid


def load_map(path) -> GridMap:
    path = Path(path)
    return parse_map(path.read_text(), source=str(path))


def format_map(grid: GridMap) -> str:
    """The text of `grid` (ends with a newline); `parse_map(format_map(m)) == m`."""
    chars = np.where(grid.walls, WALL, FREE).astype("<U1")
    for cell, ch in ((grid.start, START), (grid.goal, GOAL), (grid.decoy, DECOY)):
        chars[cell] = ch
    return "".join("".join(row) + "\n" for row in chars)


def save_map(grid: GridMap, path) -> None:
    Path(path).write_text(format_map(grid))


def bfs_distances(walls: np.ndarray, source: tuple[int, int]) -> np.ndarray:
    """Shortest 4-connected path lengths from `source` to every cell, int [H, W]; -1 for walls and cut-off cells."""
    h, w = walls.shape
    dist = np.full((h, w), -1, dtype=np.int64)
    if walls[source]:
        return dist
    dist[source] = 0
    queue = collections.deque([source])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES:
            nr, nc = r + dr, c + dc
            if 0 <= nr < h and 0 <= nc < w and not walls[nr, nc] and dist[nr, nc] < 0:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist


# ---------------------------------------------------------------------------------------------------------------
# Padded arrays


@struct.dataclass
class MapArrays:
    """One map (or, stacked, a set of maps along a leading axis) as fixed-shape arrays over N = height * width cells
    of the padded grid. Cell indices are int32; -1 marks a missing neighbour.

      free        bool [N]     not a wall and not padding
      neighbours  int32 [N, 4] the cell one step up / right / down / left, -1 where blocked
      coords      int32 [N, 2] (row, column) of each cell
      start, goal, decoy, moved_decoy   int32 []  cells; `moved_decoy` is where the decoy jumps to, if it moves
      dist_goal, dist_decoy, dist_moved_decoy, dist_start   int32 [N]  BFS distances (UNREACHABLE = N if cut off)
      height, width   int32 []  the map's own size before padding
    """

    free: np.ndarray
    neighbours: np.ndarray
    coords: np.ndarray
    start: np.ndarray
    goal: np.ndarray
    decoy: np.ndarray
    moved_decoy: np.ndarray
    dist_goal: np.ndarray
    dist_decoy: np.ndarray
    dist_moved_decoy: np.ndarray
    dist_start: np.ndarray
    height: np.ndarray
    width: np.ndarray


def unreachable(num_cells: int) -> int:
    return num_cells


def neighbour_table(walls: np.ndarray) -> np.ndarray:
    """int32 [H * W, 4]: the index of the free cell one move away in each direction, -1 where blocked."""
    h, w = walls.shape
    table = np.full((h * w, 4), -1, dtype=np.int32)
    for r in range(h):
        for c in range(w):
            if walls[r, c]:
                continue
            for a, (dr, dc) in enumerate(MOVES):
                nr, nc = r + dr, c + dc
                if 0 <= nr < h and 0 <= nc < w and not walls[nr, nc]:
                    table[r * w + c, a] = nr * w + nc
    return table


def choose_moved_decoy(grid: GridMap, seed: int = 0) -> tuple[int, int]:
    """Where the decoy moves to mid-episode: a cell drawn (keyed by `seed`) among the free cells reachable from S
    other than S, G and D and at least 2 moves from G, so that the moved decoy is a real alternative goal."""
    from_start = grid.distances_from(grid.start)
    from_goal = grid.distances_from(grid.goal)
    taken = {grid.start, grid.goal, grid.decoy}
    candidates = [(r, c) for r, c in zip(*np.nonzero(from_start >= 0))
                  if (int(r), int(c)) not in taken and from_goal[r, c] >= 2]
    if not candidates:
        return grid.decoy
    r, c = candidates[int(np.random.default_rng(seed).integers(len(candidates)))]
    return int(r), int(c)


def map_arrays(grid: GridMap, padded_shape: tuple[int, int] | None = None,
               moved_decoy: tuple[int, int] | None = None) -> MapArrays:
    """`grid` padded with walls (bottom and right) to `padded_shape` as `MapArrays` (NumPy leaves).

    `moved_decoy` defaults to `choose_moved_decoy(grid)`.
    """
    h, w = grid.shape
    ph, pw = padded_shape or (h, w)
    if ph < h or pw < w:
        raise ValueError(f"{grid.source}: padded shape {(ph, pw)} is smaller than the map's {(h, w)}")
    walls = np.ones((ph, pw), dtype=bool)
    walls[:h, :w] = grid.walls
    moved = choose_moved_decoy(grid) if moved_decoy is None else moved_decoy
    n = ph * pw

    def flat(cell):
        return np.int32(cell[0] * pw + cell[1])

    def dist(cell):
        d = bfs_distances(walls, cell).reshape(-1)
        return np.where(d < 0, unreachable(n), d).astype(np.int32)

    rows, cols = np.divmod(np.arange(n, dtype=np.int32), pw)
    return MapArrays(free=~walls.reshape(-1), neighbours=neighbour_table(walls),
                     coords=np.stack([rows, cols], axis=1).astype(np.int32),
                     start=flat(grid.start), goal=flat(grid.goal), decoy=flat(grid.decoy), moved_decoy=flat(moved),
                     dist_goal=dist(grid.goal), dist_decoy=dist(grid.decoy), dist_moved_decoy=dist(moved),
                     dist_start=dist(grid.start), height=np.int32(h), width=np.int32(w))


def stack_maps(grids: Sequence[GridMap], padded_shape: tuple[int, int] | None = None) -> MapArrays:
    """Every map padded to the largest height and width among them (or `padded_shape`), stacked on axis 0."""
    if not grids:
        raise ValueError("stack_maps needs at least one map")
    shape = padded_shape or (max(g.shape[0] for g in grids), max(g.shape[1] for g in grids))
    arrays = [map_arrays(g, shape) for g in grids]
    return MapArrays(**{f.name: np.stack([getattr(a, f.name) for a in arrays])
                        for f in dataclasses.fields(MapArrays)})


def select_map(maps: MapArrays, index: int) -> MapArrays:
    return MapArrays(**{f.name: np.asarray(getattr(maps, f.name))[index] for f in dataclasses.fields(MapArrays)})


# ---------------------------------------------------------------------------------------------------------------
# Random maps and the shipped map sets


def _has_room_to_deceive(d_sg: int, d_sd: int, d_dg: int) -> bool:
    # The decoy is not on a shortest S-G path (d_sd + d_dg > d_sg) and the goal is not on a shortest S-D path
    # (d_sg + d_dg > d_sd); without both, the observer can tell the goals apart from the first move.
    return d_sd + d_dg > d_sg and d_sg + d_dg > d_sd


def random_map(seed: int, height: int, width: int, density: float = 0.2, min_distance: int | None = None,
               max_tries: int = 1000, source: str | None = None) -> GridMap:
    """A random solvable map keyed by `seed`: each cell a wall with probability `density`; S, G, D drawn among the
    free cells with pairwise BFS distances >= `min_distance` (default (height + width) // 4), both goals reachable
    from S, and room to deceive (neither goal on a shortest path from S to the other). Deterministic in its
    arguments (NumPy's PCG64 via `default_rng(seed)`)."""
    if height < 2 or width < 2 or not 0.0 <= density < 1.0:
        raise ValueError(f"random_map needs height, width >= 2 and 0 <= density < 1; got {height}x{width}, "
                         f"density={density}")
    min_distance = (height + width) // 4 if min_distance is None else min_distance
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        walls = rng.random((height, width)) < density
        free = np.argwhere(~walls)
        if len(free) < 3:
            continue
        s, g, d = (tuple(int(x) for x in free[i]) for i in rng.choice(len(free), size=3, replace=False))
        from_s, from_g = bfs_distances(walls, s), bfs_distances(walls, g)
        d_sg, d_sd, d_dg = int(from_s[g]), int(from_s[d]), int(from_g[d])
        if min(d_sg, d_sd, d_dg) < max(min_distance, 1) or not _has_room_to_deceive(d_sg, d_sd, d_dg):
            continue
        return GridMap(walls, s, g, d, source or f"random_map(seed={seed}, {height}x{width})")
    raise ValueError(f"random_map(seed={seed}, {height}x{width}, density={density}, min_distance={min_distance}): "
                     f"no solvable map in {max_tries} tries; lower the density or the minimum distance")


@dataclasses.dataclass(frozen=True)
class MapSetSpec:
    """A shipped map set: map i is `random_map(base_seed + i, size, size, density)`, stored as
    data/{name}/{i:03d}.txt."""

    name: str
    size: int
    count: int
    base_seed: int
    density: float = 0.2

    def seeds(self) -> list[int]:
        return [self.base_seed + i for i in range(self.count)]

    def generate(self) -> list[GridMap]:
        return [random_map(seed, self.size, self.size, self.density, source=f"{self.name}/{i:03d}")
                for i, seed in enumerate(self.seeds())]


MAP_SETS = {spec.name: spec for spec in (
    MapSetSpec("train_8x8", 8, 16, 8_000),
    MapSetSpec("test_8x8", 8, 8, 8_100),
    MapSetSpec("train_16x16", 16, 16, 16_000),
    MapSetSpec("test_16x16", 16, 8, 16_100),
    MapSetSpec("unseen_24x24", 24, 8, 24_000),
    MapSetSpec("unseen_32x32", 32, 8, 32_000),
)}


def write_map_sets(directory=DATA_DIR, names: Iterable[str] | None = None) -> list[Path]:
    """(Re)write the shipped map sets as text files under `directory`; returns the written paths."""
    written = []
    for name in names or MAP_SETS:
        folder = Path(directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, grid in enumerate(MAP_SETS[name].generate()):
            path = folder / f"{i:03d}.txt"
            save_map(grid, path)
            written.append(path)
    return written


def load_map_set(name: str, directory=DATA_DIR) -> list[GridMap]:
    """The shipped maps of set `name` (a key of `MAP_SETS`), in index order."""
    if name not in MAP_SETS:
        raise ValueError(f"unknown map set {name!r}; expected one of {sorted(MAP_SETS)}")
    paths = sorted((Path(directory) / name).glob("*.txt"))
    if len(paths) != MAP_SETS[name].count:
        raise ValueError(f"{Path(directory) / name}: found {len(paths)} map files; expected "
                         f"{MAP_SETS[name].count} (regenerate with agents.deceptive_paths.maps.write_map_sets)")
    return [load_map(p) for p in paths]
