"""Runner for tests/rl/test_harness.py: a few PPO updates on CartPole through `rl.harness.train`, on every device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python harness_equivalence.py OUT

Trains `TINY` (16 environments, 3 updates in one chunk) in OUT/run on a mesh of all devices and writes OUT/params.npz
(the final parameters, flat `path -> array`) and OUT/layout.json (the device count, how the observations and the
parameters are laid out, and the error for an environment batch that does not split over the devices, raised
before anything is written). The test
runs `train_tiny` itself on one device and compares; this script asserts nothing itself.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from rl import harness
from rl.envs import CartPole
from rl.experiments.ppo_cartpole import PPOCartPoleConfig, ppo_trainer
from rl.ppo import PPOConfig, make_ppo

TINY = PPOCartPoleConfig(seed=11, ppo=PPOConfig(num_envs=16, num_steps=16, total_timesteps=3 * 16 * 16,
                                                 num_minibatches=2, update_epochs=2),
                         num_chunks=1, show_progress=False)


def train_tiny(workdir: str, mesh=None, cfg: PPOCartPoleConfig = TINY) -> harness.Trained:
    ppo = make_ppo(cfg.ppo, CartPole())
    return harness.train(ppo_trainer(ppo), cfg, workdir, jax.random.key(cfg.seed), cfg.num_chunks,
                         show_progress=False, mesh=mesh)


def flat_params(trained: harness.Trained) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(trained.state.train_state.params)[0]
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def main(out: str) -> None:
    trained = train_tiny(os.path.join(out, "run"))
    np.savez(os.path.join(out, "params.npz"), **flat_params(trained))
    state = trained.state
    kernel = jax.tree_util.tree_leaves(state.train_state.params)[0]
    layout = {
        "devices": jax.device_count(),
        "obs_spec": str(state.obs.sharding.spec),
        "obs_shard_shape": list(state.obs.addressable_shards[0].data.shape),
        "params_replicated": bool(kernel.sharding.is_fully_replicated),
        "history": trained.history,
    }
    try:
        train_tiny(os.path.join(out, "uneven"),
                   cfg=PPOCartPoleConfig(ppo=PPOConfig(num_envs=12, num_steps=16, total_timesteps=192,
                                                       num_minibatches=2), num_chunks=1, show_progress=False))
        layout["uneven_error"] = None
    except ValueError as e:
        layout["uneven_error"] = str(e)
    layout["uneven_wrote"] = os.path.exists(os.path.join(out, "uneven"))
    with open(os.path.join(out, "layout.json"), "w") as f:
        json.dump(layout, f)


if __name__ == "__main__":
    main(sys.argv[1])
