"""The map format's errors, BFS distances against Bellman-Ford, the padded arrays, random maps, shipped map sets."""
import numpy as np
import pytest

from agents.deceptive_paths import maps

CORRIDOR = "D.S.G\n"
SMALL = "S.#G\n..#.\n....\n#D..\n"


def bellman_ford(walls, source):
    """Distances by repeated relaxation over every free cell (no queue): an independent check of BFS."""
    h, w = walls.shape
    inf = 10 ** 9
    dist = {(r, c): inf for r in range(h) for c in range(w) if not walls[r, c]}
    dist[source] = 0
    for _ in range(h * w):
        for (r, c), d in list(dist.items()):
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                if (r + dr, c + dc) in dist and d + 1 < dist[(r + dr, c + dc)]:
                    dist[(r + dr, c + dc)] = d + 1
    out = np.full((h, w), -1)
    for cell, d in dist.items():
        out[cell] = -1 if d == inf else d
    return out


def test_parse_and_format_round_trip():
    grid = maps.parse_map(SMALL)
    assert grid.shape == (4, 4) and grid.start == (0, 0) and grid.goal == (0, 3) and grid.decoy == (3, 1)
    assert grid.walls[0, 2] and grid.walls[3, 0] and not grid.walls[3, 1]
    assert maps.format_map(grid) == SMALL
    assert maps.parse_map(SMALL.replace("\n", "\r\n") + "\n\n") == grid


@pytest.mark.parametrize("text, where, message", [
    ("S.G\n..\nD..\n", "line 2, column 3", "row has 2 columns; expected 3"),
    ("S.G\n...D\n", "line 2, column 4", "row has 4 columns; expected 3"),
    ("S.G\n.x.\nD..\n", "line 2, column 2", "unknown character 'x'"),
    ("S.G\n...\n...\n", "line 3, column 3", "no decoy 'D'"),
    ("..G\n...\nD..\n", "line 3, column 3", "no start 'S'"),
    ("S..\n...\nD..\n", "line 3, column 3", "no goal 'G'"),
    ("S.G\n.S.\nD..\n", "line 2, column 2", "a second start 'S' \\(the first is at line 1, column 1\\)"),
    ("S.G\n...\nDG.\n", "line 3, column 2", "a second goal 'G'"),
    ("S.#G\n..##\nD...\n", "line 1, column 4", "the goal 'G' is not reachable from the start 'S' at line 1, "
                                             "column 1"),
    ("S...\n##..\nD#.G\n", "line 3, column 1", "the decoy 'D' is not reachable"),
    ("", "line 1, column 1", "the map is empty"),
])
def test_bad_maps_name_file_line_and_column(tmp_path, text, where, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: {where}: {message}"):
        maps.load_map(path)


def test_bfs_matches_bellman_ford_on_random_maps():
    for seed in range(3):
        grid = maps.random_map(seed, 7, 9, density=0.3)
        for source in (grid.start, grid.goal, grid.decoy):
            np.testing.assert_array_equal(maps.bfs_distances(grid.walls, source), bellman_ford(grid.walls, source))
    # Hand-counted: the goal of SMALL is 7 moves from S around the wall column.
    grid = maps.parse_map(SMALL)
    assert grid.distances_from(grid.start)[grid.goal] == 7
    assert grid.distances_from(grid.start)[grid.decoy] == 4


def test_padded_arrays_and_neighbour_table():
    grid = maps.parse_map(SMALL)
    arrays = maps.map_arrays(grid, padded_shape=(5, 6), moved_decoy=(2, 3))
    n = 30
    assert arrays.free.shape == (n,) and arrays.neighbours.shape == (n, 4)
    # Padding is wall: no free cell outside the 4x4 map, and no edge into it.
    free = arrays.free.reshape(5, 6)
    assert not free[4].any() and not free[:, 4:].any()
    for cell in range(n):
        r, c = divmod(cell, 6)
        for a, (dr, dc) in enumerate(maps.MOVES):
            nr, nc = r + dr, c + dc
            inside = 0 <= nr < 5 and 0 <= nc < 6
            expected = nr * 6 + nc if free[r, c] and inside and free[nr, nc] else -1
            assert arrays.neighbours[cell, a] == expected
    assert (arrays.start, arrays.goal, arrays.decoy, arrays.moved_decoy) == (0, 3, 19, 15)
    assert arrays.dist_goal[arrays.start] == 7 and arrays.dist_start[arrays.decoy] == 4
    assert arrays.dist_moved_decoy[arrays.goal] == 2
    assert arrays.dist_goal[29] == maps.unreachable(n)  # padding
    assert (int(arrays.height), int(arrays.width)) == (4, 4)
    stacked = maps.stack_maps([grid, maps.parse_map(CORRIDOR)])
    assert stacked.free.shape == (2, 20) and stacked.neighbours.shape == (2, 20, 4)
    np.testing.assert_array_equal(maps.select_map(stacked, 1).dist_goal[:5], [4, 3, 2, 1, 0])


def test_moved_decoy_is_a_reachable_new_cell():
    grid = maps.parse_map(SMALL)
    for seed in range(5):
        moved = maps.choose_moved_decoy(grid, seed)
        assert moved not in (grid.start, grid.goal, grid.decoy)
        assert grid.distances_from(grid.start)[moved] >= 0 and grid.distances_from(grid.goal)[moved] >= 2


def test_random_maps_are_seeded_solvable_and_leave_room_to_deceive():
    assert maps.random_map(11, 8, 8) == maps.random_map(11, 8, 8)
    assert maps.random_map(11, 8, 8) != maps.random_map(12, 8, 8)
    for seed in range(10):
        grid = maps.random_map(seed, 8, 8, density=0.25, min_distance=3)
        from_s, from_g = grid.distances_from(grid.start), grid.distances_from(grid.goal)
        d_sg, d_sd, d_dg = from_s[grid.goal], from_s[grid.decoy], from_g[grid.decoy]
        assert min(d_sg, d_sd, d_dg) >= 3
        assert d_sd + d_dg > d_sg and d_sg + d_dg > d_sd
        assert maps.parse_map(maps.format_map(grid)) == grid
    with pytest.raises(ValueError, match="no solvable map in 5 tries"):
        maps.random_map(0, 3, 3, min_distance=10, max_tries=5)


@pytest.mark.parametrize("name", sorted(maps.MAP_SETS))
def test_shipped_map_sets_regenerate_from_their_seeds(name):
    spec = maps.MAP_SETS[name]
    shipped = maps.load_map_set(name)
    assert len(shipped) == spec.count
    assert all(g.shape == (spec.size, spec.size) for g in shipped)
    assert shipped == spec.generate()


def test_shipped_train_and_test_maps_are_disjoint():
    for size in (8, 16):
        train = {maps.format_map(g) for g in maps.load_map_set(f"train_{size}x{size}")}
        test = {maps.format_map(g) for g in maps.load_map_set(f"test_{size}x{size}")}
        assert not train & test
    with pytest.raises(ValueError, match="unknown map set 'nope'"):
        maps.load_map_set("nope")
