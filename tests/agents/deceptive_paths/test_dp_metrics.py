"""Path metrics on hand-made paths of a 5x5 open map (S bottom middle, G top left, D top right)."""
import pytest

from agents.deceptive_paths import maps, metrics

GRID = maps.parse_map("G...D\n.....\n.....\n.....\n..S..\n")
UP_THEN_LEFT = [(4, 2), (3, 2), (2, 2), (1, 2), (0, 2), (0, 1), (0, 0)]
LEFT_THEN_UP = [(4, 2), (4, 1), (4, 0), (3, 0), (2, 0), (1, 0), (0, 0)]


def test_path_up_the_middle_deceives_for_four_steps():
    # Steps 1-4 move up the middle column: both goals one closer each time (ties, deceptive); steps 5, 6 go left.
    m = metrics.path_metrics(GRID, UP_THEN_LEFT, budget=10)
    assert m.goal_reached and m.length == 6
    assert m.deceptive_fraction == pytest.approx(4 / 6)
    assert (m.truthful_from, m.truthful_from_fraction) == (5, pytest.approx(5 / 6))
    assert m.length_over_budget == pytest.approx(0.6)
    assert metrics.max_budget(GRID) == 10
    # The value observer ties too on the middle column.
    v = metrics.path_metrics(GRID, UP_THEN_LEFT, budget=10, observer_name="value")
    assert v.deceptive_fraction == pytest.approx(4 / 6) and v.truthful_from == 5


def test_honest_left_first_path_is_truthful_from_the_first_step():
    m = metrics.path_metrics(GRID, LEFT_THEN_UP, budget=6)
    assert m.goal_reached and m.deceptive_fraction == 0.0 and m.truthful_from == 1
    assert m.truthful_from_fraction == 1 / 6 and m.length_over_budget == 1.0


def test_unfinished_and_over_budget_paths():
    m = metrics.path_metrics(GRID, UP_THEN_LEFT[:3], budget=10)
    assert not m.goal_reached and m.deceptive_fraction == 1.0 and m.truthful_from is None
    assert metrics.mean_metrics([m])["truthful_from_fraction"] is None
    late = metrics.path_metrics(GRID, UP_THEN_LEFT, budget=5)
    assert not late.goal_reached and late.length_over_budget == pytest.approx(6 / 5)
    # A detour that goes back to deceptive ground after a truthful step: truthful_from is after the last one.
    detour = [(4, 2), (4, 1), (4, 2), (3, 2), (2, 2), (2, 1), (1, 1), (0, 1), (0, 0)]
    d = metrics.path_metrics(GRID, detour, budget=10)
    favoured = metrics.true_goal_favoured(GRID, detour)[1:].tolist()
    assert favoured == [True, False, False, False, True, True, True, True]
    assert d.truthful_from == 5 and d.deceptive_fraction == pytest.approx(3 / 8)


def test_measuring_against_a_moved_decoy():
    # Decoy moved to (4, 0): d(S, D) = 2. Step 1 (4, 1): costdif G = 5 - 6, D = 1 - 2 (tie); step 2 (4, 0): -2, -2
    # (tie); step 3 (3, 0): -3 vs -1, truthful from then on.
    m = metrics.path_metrics(GRID, LEFT_THEN_UP, budget=10, decoy=(4, 0))
    assert m.deceptive_fraction == pytest.approx(2 / 6) and m.truthful_from == 3
    assert metrics.path_metrics(GRID, LEFT_THEN_UP, budget=10).deceptive_fraction == 0.0


@pytest.mark.parametrize("path, message", [
    ([(4, 2)], "at least one move"),
    ([(3, 2), (2, 2)], "not at the start"),
    ([(4, 2), (2, 2)], "step 1 of the path, \\(4, 2\\) -> \\(2, 2\\), is not a move"),
    ([(4, 2), (4, 3), (4, 4), (4, 5)], "step 3"),
])
def test_bad_paths_are_named(path, message):
    with pytest.raises(ValueError, match=message):
        metrics.path_metrics(GRID, path, budget=10)
    with pytest.raises(ValueError, match="observer must be one of"):
        metrics.path_metrics(GRID, UP_THEN_LEFT, budget=10, observer_name="oracle")


def test_bucketing_the_path_changes_no_reading():
    """Paths padded to a bucket of rows before the observer (one compilation per bucket) read exactly as a plain
    Python comparison of cost differences, across the bucket boundary (66 cells) and for a short path."""
    back_and_forth = [(4, 2)] + [(3, 2), (4, 2)] * 32 + [(4, 1)]
    to_g, to_d = maps.bfs_distances(GRID.walls, GRID.goal), maps.bfs_distances(GRID.walls, GRID.decoy)
    for path in (back_and_forth, UP_THEN_LEFT):
        expected = [to_g[c] - to_g[GRID.start] < to_d[c] - to_d[GRID.start] for c in path]
        assert metrics.true_goal_favoured(GRID, path).tolist() == expected
    assert [len(metrics.bucketed(metrics.np.zeros((n, 2)))) for n in (66, 64, 1)] == [128, 64, 64]
