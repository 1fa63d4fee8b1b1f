"""The brute-force reference checks itself: enumeration, forward evaluation and counting agree."""
import itertools

import numpy as np
import pytest

from agents.distributional_dp import lucky_start_mdp, mean, random_mdp
from agents.distributional_dp import brute_force as bf


@pytest.mark.parametrize("seed", [0, 1])
def test_enumerated_policies_reproduce_their_distributions(seed):
    """Each enumerated policy (a dict history -> action), run through the independent forward expansion, gives the
    same final-stock law as the enumeration; the number of policies matches the count formula."""
    mdp = random_mdp(seed, num_states=2, num_actions=2, horizon=3, num_initial_states=2)
    support, pmfs, policies = bf.enumerate_history_policies(mdp, initial_stock=1, with_policies=True)
    assert len(policies) == pmfs.shape[0] == bf.count_history_policies(mdp)
    np.testing.assert_array_equal(support, bf.final_support(mdp, 1))
    np.testing.assert_allclose(pmfs.sum(-1), 1.0, atol=1e-12)
    rng = np.random.default_rng(seed)
    for j in rng.choice(len(policies), size=40, replace=False):
        got = bf.final_stock_pmf(mdp, lambda h, j=j: policies[j][h], initial_stock=1)
        np.testing.assert_allclose(got, pmfs[j], atol=1e-12)


def test_history_policies_contain_the_markov_ones():
    """Every Markov policy's law appears among the history-dependent ones; there are A^(H S) Markov policies."""
    mdp = random_mdp(5, num_states=2, num_actions=2, horizon=2, num_initial_states=2)
    support, hist, _ = bf.enumerate_history_policies(mdp)
    _, markov, actions = bf.enumerate_markov_policies(mdp)
    assert len(actions) == 2 ** (2 * 2)
    for pmf in markov:
        assert np.min(np.abs(hist - pmf).max(axis=1)) < 1e-12
    _, stationary, _ = bf.enumerate_markov_policies(mdp, stationary=True)
    assert stationary.shape[0] == 4
    assert bf.best_markov_policy(mdp, mean())[0] <= bf.best_history_policy(mdp, mean())[0] + 1e-12


def test_lucky_start_by_hand():
    """lucky_start_mdp has 2 * 2 * 2 = 8 history-dependent policies (the t = 0 action times one action per coin
    outcome); their laws of G are the four combinations of {safe, risky} after each coin outcome, twice."""
    mdp = lucky_start_mdp()
    support, pmfs, _ = bf.enumerate_history_policies(mdp)
    assert pmfs.shape[0] == 8 == bf.count_history_policies(mdp)
    after = {0: {0: {1: 1.0}, 1: {0: 0.5, 3: 0.5}}, 2: {0: {3: 1.0}, 1: {2: 0.5, 5: 0.5}}}
    expected = []
    for a_low, a_high in itertools.product((0, 1), repeat=2):
        pmf = np.zeros(len(support))
        for c, a in ((0, a_low), (2, a_high)):
            for g, p in after[c][a].items():
                pmf[g - support[0]] += 0.5 * p
        expected.append(pmf)
    for pmf in pmfs:
        assert min(np.abs(pmf - e).max() for e in expected) < 1e-12


def test_max_policies_guard():
    mdp = random_mdp(0, num_states=3, num_actions=2, horizon=3, num_initial_states=2)
    with pytest.raises(ValueError, match="max_policies=100"):
        bf.enumerate_history_policies(mdp, max_policies=100)
