"""The deep stock-augmented agent: the stock observation, objective-greedy action selection, the quantile TD target,
the learned CVaR sweep, and a tiny run of the ddp_gridworld experiment."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.distributional_dp.deep import (AgentSpec, DeepDDPConfig, StockAugmented, greedy_actions,
                                           learned_cvar_sweep, make_agent, objective_scores, quantile_td_target,
                                           utility_scores)
from agents.distributional_dp.experiment import DDPGridworldConfig, empirical_cvar, run
from rl.envs.gridworld import Gridworld, GridworldParams


def test_stock_augmented_observation_tracks_c0_plus_rewards():
    env = StockAugmented(Gridworld())
    params = env.params_for(GridworldParams(slip_prob=0.5, horizon=6), 3, 7)
    reset = jax.jit(env.reset)
    step = jax.jit(env.step)
    initial = {int(reset(jax.random.key(i), params)[0][-1]) for i in range(60)}
    assert initial == set(range(3, 8))  # c_0 uniform over the integers 3..7
    obs, state = reset(jax.random.key(0), params)
    inner_obs, _ = Gridworld().reset(jax.random.key(0), params.env)
    np.testing.assert_array_equal(obs[:-1], inner_obs)
    stock = float(obs[-1])
    for t in range(6):
        obs, state, reward, done, info = step(jax.random.key(100 + t), state, jnp.int32(1), params)
        stock += float(reward)
        assert float(obs[-1]) == stock == float(info["stock"]) == float(state.stock)
        if bool(done):
            break
    fixed = env.params_for(GridworldParams(), -4)
    assert float(reset(jax.random.key(5), fixed)[0][-1]) == -4.0
    with pytest.raises(ValueError, match="c0_low <= c0_high"):
        env.params_for(GridworldParams(), 2, 1)


# Two actions, 4 quantiles of the return-to-go each: a0 is a gamble (mean 2.5, a 1/4 tail at -20), a1 is sure.
GAMBLE = np.array([[-20.0, 10.0, 10.0, 10.0], [1.0, 1.0, 1.0, 1.0]])


def test_cvar_greedy_differs_from_mean_greedy_where_it_should():
    q = jnp.asarray(GAMBLE)
    mean_spec, cvar_spec = AgentSpec.make("mean", use_stock=False), AgentSpec.make("cvar")
    assert int(greedy_actions(q, jnp.float32(0.0), mean_spec)) == 0  # mean 2.5 > 1
    # c = -b = -1: E min(c + G, 0) is (-21) / 4 for the gamble and 0 for the sure action.
    np.testing.assert_allclose(objective_scores(q, jnp.float32(-1.0), cvar_spec, tie_break=0.0), [-21 / 4, 0.0])
    assert int(greedy_actions(q, jnp.float32(-1.0), cvar_spec)) == 1
    # With a large stock neither action can end below 0 except the gamble's tail: still the sure action...
    assert int(greedy_actions(q, jnp.float32(15.0), cvar_spec)) == 1
    # ...but once even the tail ends above 0 there is no shortfall and the mean tie-break picks the gamble.
    assert int(greedy_actions(q, jnp.float32(25.0), cvar_spec)) == 0
    # The mean score does not depend on the stock; batched stocks select per row.
    stocks = jnp.asarray([-1.0, 25.0])
    np.testing.assert_array_equal(greedy_actions(jnp.stack([q, q]), stocks, cvar_spec), [1, 0])
    np.testing.assert_array_equal(greedy_actions(jnp.stack([q, q]), stocks, mean_spec), [0, 0])


def test_a_custom_utility_replaces_the_specs_and_keeps_the_stock():
    q = jnp.asarray(GAMBLE)
    # f(x) = min(x, 0) is the CVaR utility without its tie-break: the same scores as the built-in one.
    np.testing.assert_allclose(utility_scores(lambda x: jnp.minimum(x, 0.0), q, jnp.float32(-1.0)),
                               objective_scores(q, jnp.float32(-1.0), AgentSpec.make("cvar"), tie_break=0.0))
    # An agent given f(x) = x acts exactly like the built-in mean agent, whatever its spec says.
    env = StockAugmented(Gridworld())
    params = env.params_for(GridworldParams(horizon=6), -3, 3)
    config = DeepDDPConfig(num_envs=4, total_timesteps=64, buffer_size=64, batch_size=8, hidden_size=16)
    custom, builtin = make_agent(config, env, params, utility=lambda x: x), make_agent(config, env, params)
    state = custom.init(jax.random.key(0), AgentSpec.make("cvar"))
    obs = jax.random.normal(jax.random.key(1), (64, state.obs.shape[-1])) * 3.0
    acted = custom.greedy_policy((state.train_state.params, AgentSpec.make("cvar")), obs, None)[0]
    mean = builtin.greedy_policy((state.train_state.params, AgentSpec.make("mean")), obs, None)[0]
    cvar = builtin.greedy_policy((state.train_state.params, AgentSpec.make("cvar")), obs, None)[0]
    np.testing.assert_array_equal(acted, mean)
    assert not np.array_equal(acted, cvar)  # not vacuous: the spec alone would have chosen otherwise


def test_band_utility_picks_the_action_that_lands_in_the_band():
    q = jnp.asarray(GAMBLE)
    band = AgentSpec.make("band", band_width=0.0)
    # Target m = 1 (c_0 = -1): the sure action ends at exactly 0, in the band; the gamble never does.
    np.testing.assert_allclose(objective_scores(q, jnp.float32(-1.0), band, tie_break=0.0), [0.0, 1.0])
    # Target m = 10 (c_0 = -10): the gamble is in the band with probability 3/4.
    np.testing.assert_allclose(objective_scores(q, jnp.float32(-10.0), band, tie_break=0.0), [0.75, 0.0])
    assert int(greedy_actions(q, jnp.float32(-10.0), band)) == 0
    # A quantile error below 1/2 does not move an integer outcome out of the band.
    assert float(objective_scores(q + 0.3, jnp.float32(-1.0), band, tie_break=0.0)[1]) == 1.0
    # Between w + 1/2 and w + 1 the utility falls linearly (to 0 at the next integer).
    assert float(objective_scores(q + 0.75, jnp.float32(-1.0), band, tie_break=0.0)[1]) == pytest.approx(0.5)
    assert float(objective_scores(q + 1.0, jnp.float32(-1.0), band, tie_break=0.0)[1]) == 0.0
    wide = AgentSpec.make("band", band_width=2.0)  # m = 9, |G - 9| <= 2: the gamble's 10s are in, the sure 1 is not
    np.testing.assert_allclose(objective_scores(q, jnp.float32(-9.0), wide, tie_break=0.0), [0.75, 0.0])
    with pytest.raises(ValueError, match="utility must be one of"):
        AgentSpec.make("median")


def test_quantile_td_target():
    next_q = jnp.asarray([GAMBLE, GAMBLE, GAMBLE + 1.0])  # [B=3, A=2, N=4]
    rewards = jnp.asarray([-1.0, 2.0, -3.0])
    terminated = jnp.asarray([False, False, True])
    targets = quantile_td_target(rewards, terminated, next_q, jnp.asarray([0, 1, 0]))
    np.testing.assert_allclose(targets, [[-21.0, 9.0, 9.0, 9.0], [3.0, 3.0, 3.0, 3.0], [-3.0] * 4])
    # No gradient flows into the target.
    grad = jax.grad(lambda q: quantile_td_target(rewards, terminated, q, jnp.asarray([0, 1, 0])).sum())(next_q)
    assert float(jnp.abs(grad).sum()) == 0.0


def test_learned_cvar_sweep_recovers_b_star_from_quantiles():
    # A stub agent whose quantiles are those of a deterministic return -7 (action 0) or a gamble (action 1):
    # the sweep b + E min(G - b, 0) / alpha peaks at b* = -7 with value -7, as for the exact law.
    def quantiles(params, spec, obs):
        q = jnp.asarray([[-7.0] * 10, [-12.0, -12.0] + [-5.0] * 8])
        return jnp.broadcast_to(q, obs.shape[:-1] + q.shape)

    agent = types.SimpleNamespace(quantiles=quantiles, config=DeepDDPConfig())
    levels = jnp.arange(-14, 1)
    sweep = np.asarray(learned_cvar_sweep(agent, None, AgentSpec.make("cvar"), jnp.zeros(3), levels, 0.1))
    assert int(levels[np.argmax(sweep)]) == -7 and sweep.max() == pytest.approx(-7.0, abs=1e-2)
    assert sweep[list(np.asarray(levels)).index(-5)] < -7.0


def test_empirical_cvar_is_the_lower_tail_mean():
    returns = np.array([-12] * 150 + [-5] * 850)
    assert empirical_cvar(returns, 0.1) == pytest.approx(-12.0)
    returns = np.array([-12] * 50 + [-5] * 950)
    assert empirical_cvar(returns, 0.1) == pytest.approx(-8.5)


def test_tiny_experiment_writes_results_with_every_field(tmp_path):
    cfg = DDPGridworldConfig(deep=DeepDDPConfig(num_envs=8, total_timesteps=800, learning_starts=64, batch_size=32,
                                                hidden_size=32, buffer_size=1000),
                             eval_episodes=200, num_chunks=2, show_progress=False, c0_low=3, c0_high=9)
    results = run(cfg, str(tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    for field in ("cvar_agent", "cvar_optimal", "cvar_qrdqn", "b_star", "eval_episodes", "env_steps", "wall_seconds",
                  "homeostatic", "cvar_agent_exact", "cvar_qrdqn_exact", "b_star_tabular", "learned_sweep"):
        assert field in on_disk, field
    assert on_disk["cvar_optimal"] == pytest.approx(-7.0) and on_disk["b_star_tabular"] == -7
    assert -9 <= on_disk["b_star"] <= -3 and on_disk["eval_episodes"] == 200
    assert on_disk["env_steps"] == 3 * 800 and on_disk["cvar_agent_exact"] <= on_disk["cvar_optimal"] + 1e-9
    assert set(on_disk["homeostatic"]) == {"-5", "-7", "-10"}
    for entry in on_disk["homeostatic"].values():
        assert 0.0 <= entry["probability_agent_exact"] <= entry["probability_optimal"] + 1e-9
        assert 0.0 <= entry["probability_agent"] <= 1.0
    assert json.loads((tmp_path / "config.json").read_text()) == on_disk["config"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert os.path.getsize(tmp_path / "return_distributions.png") > 1000
    assert results["cvar_agent"] == on_disk["cvar_agent"]


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="homeostatic_targets"):
        DDPGridworldConfig(homeostatic_targets="a,b")
    with pytest.raises(ValueError, match="c0_low"):
        DDPGridworldConfig(c0_low=5, c0_high=1)
