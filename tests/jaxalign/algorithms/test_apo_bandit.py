"""APO on a tabular bandit (jaxalign.algorithms.apo_bandit): the closed-form proximal step against a numerical
minimiser of the library's apo_dpo loss, iterative DPO as repeated steps, acceleration, ties, monotonicity, errors."""
from __future__ import annotations

import numpy as np
import pytest

from jaxalign.algorithms import apo_bandit as ab


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.max(x) - np.log(np.sum(np.exp(x - np.max(x))))


def _centered(log_p):
    """log-probs up to an additive constant (the population minimiser is identified only up to one)."""
    return log_p - np.mean(log_p)


def _coefficients(alpha, iterations):
    """c_t with log pi_t = log pi_0 + c_t r / beta + const, from the scalar recursion d_{t+1} = c_t + 1 (proximal),
    c_{t+1} = (1 + a) d_{t+1} - a d_t (extrapolation), d_0 = c_0 = 0; derived by hand, not from the module."""
    c, d = [0.0], 0.0
    for _ in range(iterations):
        d_next = c[-1] + 1.0
        c.append((1.0 + alpha) * d_next - alpha * d)
        d = d_next
    return np.array(c)


REWARDS, PI0 = ab.make_bandit(0, num_arms=6)


# ----------------------------------------------------------------------------------------------------------------
# the closed form against the numerical minimiser of apo_dpo


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_closed_form_matches_numerical_minimiser_of_apo_dpo(beta, alpha):
    # Three iterations in, so that pihat_t != pihat_{t-1} and the APO reference really is extrapolated.
    run = ab.run_apo_bandit(REWARDS, PI0, beta, alpha, iterations=3)
    hat, hat_prev = run.log_proximal[3], run.log_proximal[2]
    numeric, info = ab.numerical_proximal_step(hat, hat_prev, REWARDS, beta, alpha, return_info=True)
    closed = ab.proximal_step(run.log_policies[3], REWARDS, beta)  # pi_t * exp(r / beta), pi_t extrapolated
    assert info["grad_max"] < 1e-9, info
    np.testing.assert_allclose(np.exp(numeric), np.exp(closed), atol=1e-8)
    np.testing.assert_allclose(_centered(numeric), _centered(closed), atol=1e-4)
    # The check can fail: the step from the latest checkpoint alone (no extrapolation) is a different policy when
    # alpha > 0, and the start of the minimiser (pihat_t) is far from the answer.
    unextrapolated = ab.proximal_step(hat, REWARDS, beta)
    assert np.max(np.abs(np.exp(hat) - np.exp(closed))) > 1e-2
    if alpha > 0:
        assert np.max(np.abs(np.exp(unextrapolated) - np.exp(closed))) > 1e-3


def test_population_loss_is_stationary_only_at_the_closed_form():
    import jax

    with jax.enable_x64(True):
        run = ab.run_apo_bandit(REWARDS, PI0, 1.0, 0.5, iterations=2)
        hat, hat_prev = run.log_proximal[2], run.log_proximal[1]
        closed = ab.proximal_step(run.log_policies[2], REWARDS, 1.0)
        grad = jax.grad(ab.population_dpo_loss)
        at_closed = np.asarray(grad(closed, hat, hat_prev, REWARDS, 1.0, 0.5))
        # pi_t e^{r/2} where the loss has beta = 1: a wrong temperature must show a clearly non-zero gradient
        wrong = np.asarray(grad(ab.proximal_step(run.log_policies[2], REWARDS, 2.0), hat, hat_prev, REWARDS, 1.0, 0.5))
    assert np.max(np.abs(at_closed)) < 1e-12
    assert np.max(np.abs(wrong)) > 1e-3


def test_population_loss_value_against_numpy():
    # The minimiser does not depend on the pair weights (any full-support sampling policy gives the same one), so
    # the weights pi_t(y) pi_t(y') P(y > y') are checked on the loss value, written out directly in NumPy.
    import jax

    beta, alpha = 0.8, 0.5
    hat_prev, hat = _log_softmax([0.1, -0.3, 0.5, 0.0]), _log_softmax([0.4, -0.6, 0.9, -0.2])
    rewards, logits = np.array([0.2, -1.0, 1.3, 0.4]), np.array([0.3, 0.1, -0.2, 0.5])
    sampling = np.exp(_log_softmax(1.5 * hat - 0.5 * hat_prev))
    log_pi = _log_softmax(logits)
    expected = 0.0
    for y in range(4):
        for y2 in range(4):
            ref = (1 + alpha) * (hat[y] - hat[y2]) - alpha * (hat_prev[y] - hat_prev[y2])
            u = beta * (log_pi[y] - log_pi[y2] - ref)
            expected += sampling[y] * sampling[y2] / (1 + np.exp(rewards[y2] - rewards[y])) * np.log1p(np.exp(-u))
    with jax.enable_x64(True):
        got = float(ab.population_dpo_loss(logits, hat, hat_prev, rewards, beta, alpha))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_numerical_method_runs_side_by_side_with_the_closed_form():
    closed = ab.run_apo_bandit(REWARDS, PI0, 1.0, 0.3, iterations=4)
    numeric = ab.run_apo_bandit(REWARDS, PI0, 1.0, 0.3, iterations=4, method="numerical")
    np.testing.assert_allclose(np.exp(numeric.log_policies), np.exp(closed.log_policies), atol=1e-8)
    np.testing.assert_allclose(numeric.expected_reward, closed.expected_reward, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# the recursion


def test_alpha_zero_is_plain_repeated_dpo_steps():
    beta, T = 0.7, 7
    run = ab.run_apo_bandit(REWARDS, PI0, beta, 0.0, iterations=T)
    log_pi = _log_softmax(np.log(PI0))
    for t in range(1, T + 1):
        log_pi = ab.proximal_step(log_pi, REWARDS, beta)
        np.testing.assert_array_equal(run.log_policies[t], log_pi)  # bit for bit: no extrapolation at a = 0
    np.testing.assert_array_equal(run.log_policies, run.log_proximal)
    # pi_T proportional to pi_0 exp(T r / beta)
    np.testing.assert_allclose(run.log_policies[T], _log_softmax(np.log(PI0) + T * REWARDS / beta), atol=1e-12)


@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_apo_policy_is_pi0_tilted_by_the_nesterov_coefficients(alpha):
    beta, T = 1.5, 6
    run = ab.run_apo_bandit(REWARDS, PI0, beta, alpha, iterations=T)
    c = _coefficients(alpha, T)
    assert np.all(np.diff(c) > 1.0)  # faster than iterative DPO's c_t = t at every step
    for t in range(T + 1):
        np.testing.assert_allclose(run.log_policies[t], _log_softmax(np.log(PI0) + c[t] * REWARDS / beta),
                                   atol=1e-10)


def test_apo_reaches_iterative_dpo_final_reward_in_strictly_fewer_iterations():
    T = 10
    rows = ab.bandit_demo(seeds=(0, 1, 2), alphas=(0.0, 0.3, 0.5), num_arms=8, beta=1.0, iterations=T)
    reached = {(r["seed"], r["alpha"]): r["iterations_to_target"] for r in rows}
    for seed in (0, 1, 2):
        assert reached[(seed, 0.0)] == T
        for alpha in (0.3, 0.5):
            assert reached[(seed, alpha)] is not None and reached[(seed, alpha)] < T
            # the first t with c_t >= T (module docstring): 8 for a = 0.3, 6 for a = 0.5
            assert reached[(seed, alpha)] == int(np.argmax(_coefficients(alpha, T) >= T))
        assert reached[(seed, 0.5)] < reached[(seed, 0.3)]
        final = {a: r["expected_reward"] for r in rows for a in [r["alpha"]] if r["seed"] == seed
                 and r["iteration"] == T}
        assert final[0.5] > final[0.3] > final[0.0]


def test_explicit_target_and_unreachable_target():
    rows = ab.bandit_demo(seeds=(0,), alphas=(0.5,), iterations=3, target=1e6)
    assert {r["iterations_to_target"] for r in rows} == {None}
    rows = ab.bandit_demo(seeds=(0,), alphas=(0.5,), iterations=3, target=-1e6)
    assert {r["iterations_to_target"] for r in rows} == {0}
    # alpha=0 is run for the default target even when not among the alphas
    only_apo = ab.bandit_demo(seeds=(1,), alphas=(0.5,), iterations=5)
    both = ab.bandit_demo(seeds=(1,), alphas=(0.0, 0.5), iterations=5)
    assert only_apo[0]["target"] == both[0]["target"]


@pytest.mark.parametrize("method", ["closed_form", "numerical"])
def test_tied_rewards_never_change_the_policy(method):
    rewards = np.full(5, 0.7)
    pi0 = np.exp(_log_softmax(np.arange(5.0) * 0.3))
    run = ab.run_apo_bandit(rewards, pi0, 0.5, 0.5, iterations=4, method=method)
    for t in range(5):
        np.testing.assert_allclose(run.log_policies[t], np.log(pi0), atol=1e-12)
        np.testing.assert_allclose(run.log_proximal[t], np.log(pi0), atol=1e-12)
    np.testing.assert_allclose(run.expected_reward, 0.7, atol=1e-12)
    assert ab.iterations_to_reach(run.expected_reward, run.expected_reward[-1]) == 0


def test_expected_reward_improves_monotonically():
    for seed in (0, 1, 2, 3):
        rewards, pi0 = ab.make_bandit(seed, num_arms=8, initial="uniform" if seed == 3 else "random")
        for alpha in (0.0, 0.3, 0.5):
            run = ab.run_apo_bandit(rewards, pi0, 2.0, alpha, iterations=8)
            assert np.all(np.diff(run.expected_reward) > 0), (seed, alpha, run.expected_reward)
            assert np.all(np.diff(run.proximal_expected_reward) > 0), (seed, alpha)
            assert run.regret[-1] > 1e-6  # not saturated, so strict improvement is a real claim
            np.testing.assert_allclose(run.regret, np.max(rewards) - run.expected_reward)
        # a = 0.9 reaches the best arm to float64 precision within a few steps: from there on the reward can only
        # stay put, never drop.
        run = ab.run_apo_bandit(rewards, pi0, 1.0, 0.9, iterations=8)
        assert np.all(np.diff(run.expected_reward) >= 0), (seed, run.expected_reward)


def test_bt_preferences_and_make_bandit():
    p = ab.bt_preferences([0.0, 1.0, -2.0])
    np.testing.assert_allclose(p + p.T, 1.0)
    np.testing.assert_allclose(p[1, 0], 1.0 / (1.0 + np.exp(-1.0)))
    np.testing.assert_allclose(ab.bt_preferences([0.0, 800.0])[1, 0], 1.0)  # no overflow
    r1, p1 = ab.make_bandit(4, 5)
    r2, p2 = ab.make_bandit(4, 5)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(p1, p2)
    assert np.all(p1 > 0) and abs(p1.sum() - 1) < 1e-12
    np.testing.assert_allclose(ab.make_bandit(4, 5, initial="uniform")[1], 0.2)


# ----------------------------------------------------------------------------------------------------------------
# errors and the plot


LOG_PI0 = np.log(PI0)


@pytest.mark.parametrize("call, match", [
    (lambda: ab.run_apo_bandit(REWARDS, PI0, beta=0.0), r"run_apo_bandit: beta must be .*> 0.*got 0\.0"),
    (lambda: ab.run_apo_bandit(REWARDS, PI0, beta=-1.0), r"run_apo_bandit: beta .*got -1\.0"),
    (lambda: ab.run_apo_bandit(REWARDS, PI0, beta=float("nan")), r"run_apo_bandit: beta .*got nan"),
    (lambda: ab.run_apo_bandit(REWARDS, PI0, alpha=1.0), r"run_apo_bandit: alpha must .*0 <= alpha < 1.*got 1\.0"),
    (lambda: ab.run_apo_bandit(REWARDS, PI0, alpha=-0.1), r"run_apo_bandit: alpha .*got -0\.1"),
    (lambda: ab.run_apo_bandit(np.r_[0.0, np.inf, 1, 1, 1, 1], PI0), r"run_apo_bandit: rewards must be finite; arm 1"),
    (lambda: ab.run_apo_bandit(np.zeros((2, 3)), PI0), r"run_apo_bandit: rewards must be a 1-D array .*\(2, 3\)"),
    (lambda: ab.run_apo_bandit([1.0], [1.0]), r"run_apo_bandit: rewards must be a 1-D array of K >= 2"),
    (lambda: ab.run_apo_bandit(REWARDS, PI0 * 2), r"run_apo_bandit: initial_policy must be a distribution"),
    (lambda: ab.run_apo_bandit(REWARDS, np.r_[-0.1, 1.1, 0, 0, 0, 0]), r"initial_policy must hold finite prob"),
    (lambda: ab.run_apo_bandit(REWARDS, np.r_[0.5, 0.5, 0, 0, 0, 0]),
     r"initial_policy must have full support.*\[2, 3, 4, 5\]"),
    (lambda: ab.run_apo_bandit(REWARDS, PI0[:3] / PI0[:3].sum()), r"initial_policy must have shape \(6,\)"),
    (lambda: ab.run_apo_bandit(REWARDS, PI0, iterations=0), r"run_apo_bandit: iterations must be an integer >= 1.*0"),
    (lambda: ab.run_apo_bandit(REWARDS, PI0, method="adam"), r"run_apo_bandit: method must be one of .*'adam'"),
    (lambda: ab.proximal_step(LOG_PI0 + 1.0, REWARDS, 1.0), r"proximal_step: log_reference must be normalised"),
    (lambda: ab.proximal_step(np.r_[0, -np.inf], [0.0, 1.0], 1.0), r"proximal_step: log_reference must be fin.*arm 1"),
    (lambda: ab.proximal_step(LOG_PI0, REWARDS, 0), r"proximal_step: beta .*got 0"),
    (lambda: ab.extrapolate(LOG_PI0, LOG_PI0, 1.5), r"extrapolate: alpha .*got 1\.5"),
    (lambda: ab.extrapolate(LOG_PI0, LOG_PI0[:3], 0.5), r"extrapolate: log_hat_prev must have shape \(6,\)"),
    (lambda: ab.numerical_proximal_step(LOG_PI0, LOG_PI0, REWARDS, -2.0), r"numerical_proximal_step: beta .*-2\.0"),
    (lambda: ab.numerical_proximal_step(LOG_PI0, LOG_PI0 - 1, REWARDS, 1.0),
     r"numerical_proximal_step: log_hat_prev must be normalised"),
    (lambda: ab.bandit_demo(seeds=()), r"bandit_demo: seeds must be a non-empty"),
    (lambda: ab.bandit_demo(seeds=(0,), alphas=(0.0, True)), r"bandit_demo: alpha .*got True"),
    (lambda: ab.bandit_demo(seeds=(-1,)), r"bandit_demo: each seed must be an integer >= 0, got -1"),
    (lambda: ab.bandit_demo(seeds=(0,), target=float("inf")), r"bandit_demo: target must be None .*got inf"),
    (lambda: ab.make_bandit(0, num_arms=1), r"make_bandit: num_arms must be an integer >= 2, got 1"),
    (lambda: ab.make_bandit(0, initial="peaked"), r"make_bandit: initial must be 'random' or 'uniform'"),
    (lambda: ab.iterations_to_reach([0.0, np.nan], 1.0), r"iterations_to_reach: expected_rewards must be"),
    (lambda: ab.plot_bandit([], "x.png"), r"plot_bandit: rows must be the non-empty list"),
    (lambda: ab.plot_bandit([{"seed": 0}], "x.png"), r"plot_bandit: rows\[0\] lacks"),
])  # fmt: skip
def test_bad_inputs_raise_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plot_and_summary_are_written(tmp_path):
    rows = ab.bandit_demo(seeds=(0, 1), alphas=(0.0, 0.5), iterations=4)
    rows += ab.bandit_demo(seeds=(0, 1), alphas=(0.0, 0.5), iterations=4, method="numerical")
    path = ab.plot_bandit(rows, str(tmp_path / "apo_bandit.png"))
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "apo_bandit.png").stat().st_size > 5000
    table = ab.summarize(rows).splitlines()
    assert len(table) == 1 + 4  # header + 2 methods x 2 alphas
    assert table[1].split()[:4] == ["closed_form", "0.00", "4", "4"]
    assert table[2].split()[:2] == ["closed_form", "0.50"] and int(table[2].split()[2]) < 4
