"""What a trained PPO or PDPPO learner's critics and policy do, per seed: the quantities `experiment.py` adds to
results.json ("diagnosis") and `python -m agents.pdppo.diagnose RUN` prints for any finished run.

PDPPO's baseline min(V(s), V_post(s^x)) depends on the action through the post-decision state s^x (Felizardo et al.
2025, the advantage A = R - min(V(s), V_post(s^x))). A baseline b(s, a) that depends on the action adds
-E_a[b(s, a) grad log pi(a|s)] = -grad_theta E_{a~pi}[b(s, a)] (b held fixed) to the expected policy gradient
(Williams 1992: only an action-independent baseline leaves it unbiased), so the update also moves the policy toward
actions whose baseline is low: toward post-decision states the critic finds expensive. And the paper's value loss,
MSE(min(V, V_post), R), trains only the smaller critic on each sample. This module measures, on rollouts of each
seed's final sampled policy (fresh demand keys):

- `idle`: the fraction of machine-periods the policy leaves idle (sampled actions; `greedy_idle` for the argmax);
- the critics' root-mean-square error against the Monte-Carlo returns, z-normalised over the rollouts as in training
  (`rmse_v`, and for PDPPO `rmse_post`, `rmse_min`), and `post_is_min`, how often V_post(s^x) is the minimum;
- for PDPPO, the baseline over one machine's alternative choices, the others' actions kept: b_c = min(V(s),
  V_post(s^x(a with a_m = c))) for every choice c of every machine m at every visited state. `baseline_spread` is
  the standard deviation of b_c over c, relative to the standard deviation of the advantage R - b;
  `prefers_low_baseline` the mean over (state, machine) of (mean_c b_c - sum_c pi_m(c) b_c) / std_c b_c: positive
  when the policy puts its mass on the choices whose baseline is low, the direction the bias term pushes. Where
  V_post(s^x) is the minimum, b_c is the post-decision value of choice c, and a policy improved by an unbiased
  gradient would prefer the choices the critic values higher (a negative score).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from agents.pdppo.env import (LotSizingState, effective_action, exogenous, initial_state, observation,
                              params_from_instance, post_decision)
from agents.pdppo.instances import Instance
from agents.pdppo.learners import Learner
from rl.returns import monte_carlo_returns

DIAGNOSIS_SEED = 2_000_003  # demand keys of the diagnostic rollouts: neither training's nor evaluation's


def rollouts(learner: Learner, env_params, params, keys: jax.Array, horizon: int) -> dict:
    """Episodes of the sampled policy from the initial state, one per key: states, actions, post-decision states and
    rewards, each with a leading [episodes, horizon] shape."""

    def episode(key):
        def period(state, k):
            k_action, k_demand = jax.random.split(k)
            logits = learner.networks.logits(params, observation(env_params, state))
            action = jax.random.categorical(k_action, logits).astype(jnp.int32)
            post, setup_cost = post_decision(env_params, state, action)
            next_state, cost = exogenous(env_params, post, k_demand)
            return next_state, {"state": state, "action": action, "post": post, "reward": -(setup_cost + cost),
                                "logits": logits}

        return jax.lax.scan(period, initial_state(env_params), jax.random.split(key, horizon))[1]

    return jax.vmap(episode)(keys)


def alternative_baselines(learner: Learner, env_params, params, state: LotSizingState, action: jax.Array,
                          value: jax.Array) -> jax.Array:
    """[M, C]: min(V(s), V_post(s^x)) with machine m's action replaced by choice c, the other machines' kept."""
    n_machines, n_choices = learner.networks.n_machines, learner.networks.n_choices

    def one(m, c):
        post, _ = post_decision(env_params, state, action.at[m].set(c))
        v_post = learner.networks.critic.apply(params["post_critic"], observation(env_params, post))[0]
        return learner.networks.combine(value, v_post)

    machines, choices = jnp.meshgrid(jnp.arange(n_machines), jnp.arange(n_choices), indexing="ij")
    return jax.vmap(jax.vmap(one))(machines, choices)


def seed_diagnostics(learner: Learner, env_params, params, keys: jax.Array, horizon: int) -> dict:
    """The module doc's quantities for one seed's final parameters (arrays of scalars)."""
    tr = rollouts(learner, env_params, params, keys, horizon)
    flat = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), tr)
    rewards = tr["reward"].T  # [horizon, episodes]: whole episodes, so no bootstrap (as in training)
    zeros = jnp.zeros_like(rewards)
    returns = monte_carlo_returns(rewards, zeros, zeros, zeros, learner.config.gamma).T.reshape(-1)
    returns = (returns - returns.mean()) / (returns.std() + 1e-8)
    obs, post_obs = (jax.vmap(lambda s: observation(env_params, s))(flat[k]) for k in ("state", "post"))
    values = learner.networks.critic_values(params, obs, post_obs)
    value, estimate = values[0], learner.networks.combined(values)
    greedy = jax.vmap(lambda a: effective_action(env_params, a))(jnp.argmax(flat["logits"], -1))
    chosen = jax.vmap(lambda a: effective_action(env_params, a))(flat["action"])
    out = {"idle": jnp.mean(chosen == 0), "greedy_idle": jnp.mean(greedy == 0),
           "rmse_v": jnp.sqrt(jnp.mean(jnp.square(value - returns))),
           "mean_episode_cost": -jnp.sum(tr["reward"], axis=1).mean()}
    if len(values) == 1:  # PPO
        return out
    v_post = values[1]
    baselines = jax.vmap(lambda s, a, v: alternative_baselines(learner, env_params, params, s, a, v))(
        flat["state"], flat["action"], value)  # [B, M, C]
    pi = jax.nn.softmax(flat["logits"], axis=-1)
    spread = jnp.std(baselines, axis=-1)
    preference = (jnp.mean(baselines, axis=-1) - jnp.sum(pi * baselines, axis=-1)) / jnp.maximum(spread, 1e-6)
    out.update({
        "rmse_post": jnp.sqrt(jnp.mean(jnp.square(v_post - returns))),
        "rmse_min": jnp.sqrt(jnp.mean(jnp.square(estimate - returns))),
        "post_is_min": jnp.mean(v_post < value),
        "baseline_spread": jnp.mean(spread) / jnp.std(returns - estimate),
        # where b_c does not depend on c (V(s) the minimum for every choice) there is no preference to measure
        "prefers_low_baseline": jnp.sum(jnp.where(spread > 1e-6, preference, 0.0)) / jnp.maximum(
            jnp.sum(spread > 1e-6), 1),
    })
    return out


def diagnosis(learner: Learner, instance: Instance, params, episodes: int = 16) -> dict[str, list[float]]:
    """{quantity: [one value per seed]} for `params` stacked over seeds (the experiment's layout), on `episodes`
    rollouts of fresh demand (keys from DIAGNOSIS_SEED, the same for every seed)."""
    env_params = params_from_instance(instance)
    keys = jax.random.split(jax.random.key(DIAGNOSIS_SEED), episodes)
    per_seed = jax.jit(jax.vmap(lambda p: seed_diagnostics(learner, env_params, p, keys, instance.horizon)))
    values = jax.device_get(per_seed(params))
    return {k: [float(x) for x in np.asarray(v)] for k, v in values.items()}
