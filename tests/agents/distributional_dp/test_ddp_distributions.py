"""Stock grids and exact categorical pmfs over integer stocks."""
import numpy as np
import pytest

from agents.distributional_dp import StockGrid, backup, lucky_start_mdp, mix, point_mass, random_mdp, shift


def test_stock_grid_ranges_follow_the_reward_bounds():
    mdp = random_mdp(0, horizon=3)  # rewards in [-1, 2]
    grid = StockGrid.for_mdp(mdp, (-2, 1))
    assert [(grid.lo(t), grid.hi(t)) for t in range(4)] == [(-2, 1), (-3, 3), (-4, 5), (-5, 7)]
    np.testing.assert_array_equal(grid.final_support, np.arange(-5, 8))
    assert grid.index(2, -4) == 0 and grid.index(2, 5) == 9
    with pytest.raises(ValueError, match="outside the grid"):
        grid.index(1, 4)
    with pytest.raises(ValueError, match="c0_min <= c0_max"):
        StockGrid.for_mdp(mdp, (1, 0))
    assert StockGrid.for_mdp(mdp, 3) == StockGrid.for_mdp(mdp, (3, 3))


def test_point_mass_shift_mix():
    support = np.arange(-2, 3)
    delta = point_mass(1, support)
    np.testing.assert_array_equal(delta, [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(shift(delta, -3, support), point_mass(-2, support))
    np.testing.assert_array_equal(shift(delta, 0, support), delta)
    with pytest.raises(ValueError, match="outside the support"):
        shift(delta, 2, support)
    with pytest.raises(ValueError, match="outside the support"):
        point_mass(3, support)
    m = mix([0.25, 0.75], [point_mass(-2, support), delta])
    np.testing.assert_allclose(m, [0.25, 0, 0, 0.75, 0])
    with pytest.raises(ValueError, match="probability vector"):
        mix([0.5, 0.6], [delta, delta])


def test_backup_is_the_stock_indexed_mixture():
    """One backup at t = 1 of lucky_start_mdp from the terminal point masses: in state 1 with stock c, action 0
    gives delta_{c+1} and action 1 gives (delta_c + delta_{c+3}) / 2, exactly."""
    mdp = lucky_start_mdp()
    grid = StockGrid.for_mdp(mdp, 0)
    support = grid.final_support
    n = len(support)
    terminal = np.broadcast_to(np.eye(n), (2, n, n))
    q = backup(mdp, grid, 1, terminal)
    assert q.shape == (2, 2, grid.size(1), n)
    for i, c in enumerate(grid.stocks(1)):
        np.testing.assert_array_equal(q[1, 0, i], point_mass(c + 1, support))
        np.testing.assert_array_equal(q[1, 1, i], 0.5 * point_mass(c, support) + 0.5 * point_mass(c + 3, support))
    with pytest.raises(ValueError, match="expected"):
        backup(mdp, grid, 0, terminal)
