"""The confounded variant (learner.confounded): after a real update only the actor's output layer and the critics
moved; weight decay and gradient clipping act in the PDPPO arm only (checked on the optimiser with fixed gradients,
against the fair default where both arms get both)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from agents.pdppo import exact
from agents.pdppo import learners as L

SMALL = dict(num_envs=4, num_steps=8, total_timesteps=32, update_epochs=2, actor_hidden=(16, 16),
             critic_hidden=(16, 16), actor_learning_rate=3e-3, critic_learning_rate=3e-3)
# LLVM at -O0 for the one real update: compiling it is most of this file's time, and which parameters moved does not
# depend on the backend's code generation.
O0 = {"xla_backend_optimization_level": 0}


def _changed(before, after):
    return {jax.tree_util.keystr(path): bool(jnp.any(a != b)) for (path, a), b in
            zip(jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves(after))}


def test_confounded_update_freezes_all_but_the_actors_last_layer():
    learner = L.make_learner(L.LearnerConfig(algorithm="pdppo", confounded=True, weight_decay=1e-2, **SMALL),
                             exact.tiny_instance())
    start = learner.init(jax.random.key(0))
    after, _ = jax.jit(learner.update, compiler_options=O0)(start)
    changed = _changed(start.train_state.params, after.train_state.params)
    assert len(changed) == 18
    for name, moved in changed.items():
        frozen = name.startswith("['actor']") and "Dense_2" not in name
        assert moved != frozen, (name, moved)


def _step(config, params, grads):
    tx = L.make_optimizer(config, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_weight_decay_and_clipping_reach_the_pdppo_arm_only_when_confounded():
    learner = L.make_learner(L.LearnerConfig(algorithm="pdppo", **SMALL), exact.tiny_instance())
    params = learner.init(jax.random.key(0)).train_state.params
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    big = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 3.0), params)

    def config(algorithm, confounded, **changes):
        return L.LearnerConfig(algorithm=algorithm, confounded=confounded, **{**SMALL, **changes})

    def decays(cfg):  # zero gradients: AdamW moves a parameter only through its weight decay
        return any(bool(jnp.any(u != 0)) for u in jax.tree_util.tree_leaves(_step(cfg, params, zeros)))

    def clips(cfg):  # a tiny clip norm shrinks the gradients to ~eps, so Adam's first step changes with it
        loose = _step(dataclasses.replace(cfg, max_grad_norm=1e6), params, big)
        tight = _step(dataclasses.replace(cfg, max_grad_norm=1e-9), params, big)
        return any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(loose),
                                                        jax.tree_util.tree_leaves(tight)))

    for algorithm in ("ppo", "pdppo"):
        fair = config(algorithm, False, weight_decay=1e-2)
        assert decays(fair) and clips(fair), algorithm
    assert decays(config("pdppo", True, weight_decay=1e-2)) and clips(config("pdppo", True))
    assert not decays(config("ppo", True, weight_decay=1e-2)) and not clips(config("ppo", True))
