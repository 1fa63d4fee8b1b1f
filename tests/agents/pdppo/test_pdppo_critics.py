"""agents.pdppo.critics: why PDPPO's minimum of two critics trains one of them, and the baseline over one machine's
alternative choices against the NumPy reference step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.pdppo import critics as C
from agents.pdppo import reference
from agents.pdppo.env import LotSizingState, observation, params_from_instance
from agents.pdppo.instances import generate
from agents.pdppo.learners import LearnerConfig, learner_loss, make_learner


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
    got = np.asarray(C.alternative_baselines(learner, env_params, params, state, jnp.asarray(action, jnp.int32),
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
