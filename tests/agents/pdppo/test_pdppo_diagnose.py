"""`python -m agents.pdppo.diagnose RUN`: why PDPPO's minimum of two critics can bias its policy gradient, and the
quantities the diagnosis reports, each against an independent computation."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.pdppo import diagnose as D
from agents.pdppo import experiment as X
from agents.pdppo import reference
from agents.pdppo.env import LotSizingState, observation, params_from_instance
from agents.pdppo.instances import generate
from agents.pdppo.learners import LearnerConfig, learner_loss, make_learner
from jaxalign.overrides import apply_overrides


def test_only_the_smaller_critic_gets_a_value_gradient():
    """The paper's value loss MSE(min(V, V_post), R) reaches one critic per sample: where V(s) is the minimum on
    every sample, V_post is never trained, and the other way round (the diagnosis's `post_is_min` says which)."""
    returns = jnp.array([0.3, -1.0, 0.5])

    def value_grads(v, v_post):
        def loss(v, v_post):
            estimate = jnp.minimum(v, v_post)
            return learner_loss(jnp.zeros((3, 1, 2)), estimate, jnp.zeros((3, 1), jnp.int32), jnp.zeros((3, 1)),
                                returns, clip_eps=0.2, vf_coef=0.5, ent_coef=0.0)[0]
        return jax.grad(loss, argnums=(0, 1))(v, v_post)

    g_v, g_post = value_grads(jnp.array([0.0, 0.1, -0.2]), jnp.array([1.0, 2.0, 0.5]))
    assert np.all(np.asarray(g_v) != 0) and np.all(np.asarray(g_post) == 0)
    g_v, g_post = value_grads(jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, 0.1, -0.2]))
    assert np.all(np.asarray(g_v) == 0) and np.all(np.asarray(g_post) != 0)


def test_alternative_baselines_replace_one_machines_choice_against_the_numpy_reference():
    instance = generate("15i5m", 0)
    env_params = params_from_instance(instance)
    learner = make_learner(LearnerConfig(num_envs=2), instance)
    params = jax.jit(learner.init)(jax.random.key(3)).train_state.params
    rng = np.random.default_rng(1)
    inventory = rng.integers(0, instance.inventory_cap + 1, instance.n_items)
    setup = rng.integers(0, instance.n_items + 1, instance.n_machines)
    action = rng.integers(0, instance.n_items + 1, instance.n_machines)
    state = LotSizingState(jnp.asarray(inventory, jnp.int32), jnp.asarray(setup, jnp.int32), jnp.asarray(7, jnp.int32))
    value = learner.networks.critic.apply(params["critic"], observation(env_params, state))[0]
    got = np.asarray(D.alternative_baselines(learner, env_params, params, state, jnp.asarray(action, jnp.int32),
                                             value))
    assert got.shape == (instance.n_machines, instance.n_items + 1)
    for m in range(instance.n_machines):
        for c in (0, 1, instance.n_items):
            changed = action.copy()
            changed[m] = c
            post_inv, post_setup, _ = reference.post_decision(instance, inventory, setup, changed)
            post = LotSizingState(jnp.asarray(post_inv, jnp.int32), jnp.asarray(post_setup, jnp.int32),
                                  jnp.asarray(7, jnp.int32))
            v_post = learner.networks.critic.apply(params["post_critic"], observation(env_params, post))[0]
            assert got[m, c] == pytest.approx(float(min(value, v_post)), abs=1e-6), (m, c)


def test_a_finished_run_is_diagnosed_per_arm_and_seed_without_changing_it(tmp_path, capsys):
    cfg = apply_overrides(X.PDPPOLotSizingConfig(), [
        "instance=tiny", "seeds=0,1", "learner.num_envs=2", "learner.total_timesteps=400", "learner.update_epochs=1",
        "num_chunks=1", "eval_episodes=2", "show_progress=false"])
    run = tmp_path / "run"
    X.run(cfg, str(run))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.parent.name != "logs"}

    assert D.main([str(run), "--episodes", "3", "--json", str(tmp_path / "d.json")]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["seeds"] == [0, 1] and report["episodes"] == 3
    assert set(report["ppo"]) == {"idle", "greedy_idle", "rmse_v", "mean_episode_cost"}
    pd = report["pdppo"]
    for key in ("idle", "greedy_idle", "post_is_min"):
        assert all(0.0 <= x <= 1.0 for x in pd[key]), (key, pd[key])
    for i in range(2):  # where one critic is the minimum on every sample, the minimum's error is that critic's
        if pd["post_is_min"][i] == 1.0:
            assert pd["rmse_min"][i] == pytest.approx(pd["rmse_post"][i])
        if pd["post_is_min"][i] == 0.0:
            assert pd["rmse_min"][i] == pytest.approx(pd["rmse_v"][i])
    assert all(c > 0 for c in pd["mean_episode_cost"] + report["ppo"]["mean_episode_cost"])
    table = capsys.readouterr().out
    assert "| pdppo seed | " in table and "prefers_low_baseline" in table
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.parent.name != "logs"}
    assert after == before

    assert D.main([str(run), "--json", str(tmp_path / "d.json")]) == 2  # never overwrites
    assert "d.json exists" in capsys.readouterr().err
    (run / "results.json").unlink()
    assert D.main([str(run)]) == 2
    assert "no results.json (is the run finished?)" in capsys.readouterr().err
