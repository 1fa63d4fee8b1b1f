"""Objective functionals against closed forms."""
import numpy as np
import pytest

from agents.distributional_dp import (cvar, expected_utility, homeostatic_deviation, homeostatic_probability, mean,
                                      mean_variance, threshold_probability, value_at_risk)


def _random_pmfs(seed, n=50, atoms=9):
    rng = np.random.default_rng(seed)
    pmfs = rng.dirichlet(np.full(atoms, 0.5), size=n)
    return pmfs, np.arange(-3, atoms - 3)


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.8, 1.0])
def test_cvar_tail_formula_equals_the_rockafellar_uryasev_form(alpha):
    """CVaR_alpha = max_b {b - E(b - X)^+ / alpha}; the maximum over real b is attained at an integer atom."""
    pmfs, x = _random_pmfs(int(alpha * 100))
    tail = cvar(alpha)(pmfs, x)
    b = np.linspace(x[0] - 1, x[-1] + 1, 2001)  # contains every integer atom
    ru = (b[None, :] - (pmfs @ np.maximum(b[None, :] - x[:, None], 0.0)) / alpha).max(axis=1)
    np.testing.assert_allclose(tail, ru, atol=1e-12)


def test_cvar_limits_and_var():
    pmfs, x = _random_pmfs(7)
    np.testing.assert_allclose(cvar(1.0)(pmfs, x), mean()(pmfs, x), atol=1e-12)
    p = np.array([0.1, 0.0, 0.3, 0.6])
    x = np.array([-1, 0, 1, 2])
    assert cvar(0.05)(p, x) == pytest.approx(-1.0)
    assert cvar(0.2)(p, x) == pytest.approx((0.1 * -1 + 0.1 * 1) / 0.2)
    assert [value_at_risk(a)(p, x) for a in (0.05, 0.1, 0.11, 0.4, 0.41, 1.0)] == [-1, -1, 1, 1, 2, 2]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="alpha in \\(0, 1\\]"):
            cvar(bad)
    with pytest.raises(ValueError, match="atoms"):
        mean()(p, x[:3])


def test_expected_utility_objectives_on_a_hand_pmf():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    x = np.array([0, 1, 2, 3])
    assert mean()(p, x) == pytest.approx(2.0)
    assert threshold_probability(2)(p, x) == pytest.approx(0.7)
    assert homeostatic_probability(1, 1)(p, x) == pytest.approx(0.6)
    assert homeostatic_deviation(1)(p, x) == pytest.approx(-(0.1 + 0.3 + 0.8))
    assert homeostatic_deviation(1, power=2)(p, x) == pytest.approx(-(0.1 + 0.3 + 1.6))
    assert expected_utility(np.sqrt)(p, x) == pytest.approx(p @ np.sqrt(x))
    assert mean_variance(0.5)(p, x) == pytest.approx(2.0 - 0.5 * 1.0)
    assert all(o.is_expected_utility for o in (mean(), threshold_probability(1), homeostatic_deviation(0)))
    assert not any(o.is_expected_utility for o in (cvar(0.5), value_at_risk(0.5), mean_variance(1.0)))
