"""PPO: the loss against NumPy, chunked runs equal one scan, vmap over seeds, config errors, and learning."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.envs import CartPole
from rl.ppo import PPOConfig, make_ppo, ppo_loss
from rl.rollout import evaluate_episodes


def _loss_numpy(logits, values, actions, old_logp, old_values, adv, targets, eps, vf, ent, clip_value, norm):
    logp_all = logits - logits.max(1, keepdims=True)
    logp_all = logp_all - np.log(np.exp(logp_all).sum(1, keepdims=True))
    ratio = np.exp(logp_all[np.arange(len(actions)), actions] - old_logp)
    if norm:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg = -np.mean(np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv))
    err = (values - targets) ** 2
    if clip_value:
        err = np.maximum(err, (old_values + np.clip(values - old_values, -eps, eps) - targets) ** 2)
    v = 0.5 * err.mean()
    entropy = np.mean(-(np.exp(logp_all) * logp_all).sum(1))
    return pg + vf * v - ent * entropy, pg, v, entropy


@pytest.mark.parametrize("clip_value,norm", [(True, True), (False, False)])
def test_ppo_loss_matches_numpy(clip_value, norm):
    rng = np.random.default_rng(0)
    b, a = 64, 3
    logits, values = rng.normal(size=(b, a)), rng.normal(size=b)
    actions = rng.integers(0, a, size=b)
    old_logp = np.log(rng.dirichlet(np.ones(a), size=b))[np.arange(b), actions]  # ratios far from 1: clipping bites
    old_values, adv, targets = values + rng.normal(scale=0.5, size=b), rng.normal(size=b), rng.normal(size=b)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, metrics = ppo_loss(f32(logits), f32(values), jnp.asarray(actions), f32(old_logp), f32(old_values), f32(adv),
                             f32(targets), clip_eps=0.2, vf_coef=0.5, ent_coef=0.01, clip_value=clip_value,
                             normalize_advantages=norm)
    total, pg, v, entropy = _loss_numpy(logits, values, actions, old_logp, old_values, adv, targets, 0.2, 0.5, 0.01,
                                        clip_value, norm)
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    np.testing.assert_allclose([float(metrics["policy_loss"]), float(metrics["value_loss"]),
                                float(metrics["entropy"])], [pg, v, entropy], rtol=1e-5)
    assert 0 < float(metrics["clip_fraction"]) < 1


def test_chunked_runs_compute_what_one_scan_computes_and_seeds_vmap():
    cfg = PPOConfig(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 4, num_minibatches=2, update_epochs=2)
    ppo = make_ppo(cfg, CartPole())
    # One agent per seed with vmap (the first seed is the reference run), ... The initial states are built one seed
    # at a time and stacked: a vmapped init runs the orthogonal initialisers' QR as a batched LAPACK call, and two
    # of those at once (this test beside another worker's) can deadlock XLA:CPU's thread pool (README, RL section;
    # seen twice on the 2-core machine even with single-threaded Eigen). The vmapped training scan is unchanged.
    seeds = jax.random.split(jax.random.key(0), 2)
    initial = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[jax.jit(ppo.init)(seed) for seed in seeds])
    states, metrics = jax.jit(jax.vmap(lambda state: ppo.run(state, cfg.num_updates)))(initial)
    assert metrics["loss"].shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(metrics["env_steps"][0]), [64, 128, 192, 256])
    kernels = np.asarray(states.train_state.params["params"]["actor"]["Dense_0"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1])
    # ... and the same first seed's run in two chunks of two updates ends with the same parameters.
    run = jax.jit(ppo.run, static_argnums=1)
    state = jax.jit(ppo.init)(jax.random.split(jax.random.key(0), 2)[0])
    state, first = run(state, 2)
    state, second = run(state, 2)
    for a, b in zip(jax.tree_util.tree_leaves(states.train_state.params),
                    jax.tree_util.tree_leaves(state.train_state.params)):
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([first["env_steps"], second["env_steps"]]), [64, 128, 192, 256])


@pytest.mark.parametrize("change,fragment", [
    ({"num_minibatches": 3}, "divisible by ppo.num_minibatches=3"),
    ({"total_timesteps": 100}, "less than one update's batch"),
    ({"gamma": 1.5}, "[0, 1]"),
    ({"activation": "gelu"}, "ppo.activation"),
])
def test_bad_config_is_one_clear_error(change, fragment):
    with pytest.raises(ValueError) as err:
        dataclasses.replace(PPOConfig(), **change)
    assert fragment in str(err.value)


def test_ppo_learns_cartpole():
    """32,768 env steps (16 updates, about 6 s on a 2-core CPU), seed 0: the greedy policy's mean return over 32
    episodes passes 200 (a random policy gets about 22; measured 306 for this seed) and the training episodes'
    return grows at least fourfold."""
    env = CartPole()
    ppo = make_ppo(PPOConfig(total_timesteps=32_768), env)
    state, metrics = jax.jit(ppo.train)(jax.random.key(0))
    returns = np.asarray(metrics["episode_return"])
    assert np.nanmean(returns[-2:]) > 4 * np.nanmean(returns[:2]), returns
    episodes = evaluate_episodes(env, env.default_params, ppo.greedy_policy, state.train_state.params,
                                 jax.random.key(1), 32, 500)
    assert float(episodes["return"].mean()) > 200, np.asarray(episodes["return"])


@pytest.mark.parametrize("bootstrap", [True, False])
def test_truncated_steps_bootstrap_from_the_pre_reset_observation(bootstrap):
    """Two steps of one environment, the first truncated by the time limit: its value target is r + gamma V(s'),
    s' being the observation that ended the episode, not the next episode's first one (or just r when truncation
    is treated as termination)."""
    from rl.rollout import Transition

    cfg = PPOConfig(num_envs=1, num_steps=2, total_timesteps=2, num_minibatches=1, bootstrap_truncation=bootstrap)
    ppo = make_ppo(cfg, CartPole())
    params = ppo.init(jax.random.key(0)).train_state.params
    value = lambda obs: ppo.network.apply(params, obs)[1]  # noqa: E731
    obs = jnp.array([[[0.01, 0.0, 0.02, 0.0]], [[0.0, 0.03, 0.0, -0.01]]])  # s0; s1 (a fresh episode)
    final = jnp.array([[[1.0, 0.5, -0.1, 0.3]], [[0.0, 0.0, 0.0, 0.0]]])  # the observation that ended episode 1
    last = jnp.array([[0.2, 0.0, 0.0, 0.0]])
    tr = Transition(obs=obs, action=jnp.zeros((2, 1), jnp.int32), reward=jnp.ones((2, 1)),
                    terminated=jnp.zeros((2, 1), bool), truncated=jnp.array([[True], [False]]),
                    next_obs=final.at[1].set(last), extras={"value": value(obs)})
    _, targets = ppo.advantages(params, tr, last)
    expected_first = 1.0 + cfg.gamma * float(value(final[0])[0]) if bootstrap else 1.0
    np.testing.assert_allclose(float(targets[0, 0]), expected_first, rtol=1e-5)
    np.testing.assert_allclose(float(targets[1, 0]), 1.0 + cfg.gamma * float(value(last)[0]), rtol=1e-5)
