"""PPO on any gymnasium environment with discrete actions, stepped on the host (`jaxalign run ppo_gymnasium
--workdir DIR env=Acrobot-v1`).

The JAX path (`ppo_cartpole`) compiles environment and learner into one scan; a gymnasium environment is Python,
so here `rl.wrappers.GymnasiumDriver` steps `ppo.num_envs` copies of it on the host with the jitted policy, and
the learning step is the same compiled function the JAX path uses (`rl.ppo.make_learner`: GAE, then
`update_epochs` passes of `ppo_loss` over shuffled minibatches). Same config, logging, checkpoints and resume as
the JAX path (`rl.host.train`): metrics.jsonl (one record per update), checkpoints/ after every chunk (network,
optimizer state, PRNG key and the metric history), results.json with a greedy evaluation and a learning-curve PNG.
Every chunk starts from environments reset with chunk-derived seeds, so a killed run resumes bit for bit
(`rl.host`).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from rl import host
from rl.ppo import PPOConfig, make_learner
from rl.rollout import completed_episode_stats


@dataclasses.dataclass(frozen=True)
class PPOGymnasiumConfig:
    """PPO on a gymnasium environment stepped on the host (module docstring)."""

    env: str = "CartPole-v1"  # any registered gymnasium id with a Discrete action space and a Box observation
    seed: int = 0  # network initialisation, action sampling, minibatch order and the environments' seeds
    ppo: PPOConfig = PPOConfig(num_envs=8, num_steps=256, total_timesteps=204_800, learning_rate=2.5e-4,
                               update_epochs=4, num_minibatches=4)
    num_chunks: int = 10  # checkpoints (and environment resets) between updates, evenly spaced
    eval_episodes: int = 20  # greedy evaluation episodes of the final policy
    show_progress: bool = True  # a progress bar with rate and ETA

    def __post_init__(self):
        if self.eval_episodes <= 0:
            raise ValueError(f"eval_episodes must be positive, got {self.eval_episodes!r}")
        if not 1 <= self.num_chunks <= self.ppo.num_updates:
            raise ValueError(f"num_chunks must lie in [1, ppo.num_updates={self.ppo.num_updates}], "
                             f"got {self.num_chunks!r}")


def run(cfg: PPOGymnasiumConfig, workdir: str) -> dict:
    """Train (or resume; module docstring), evaluate greedily, and write results.json."""
    clock = time.perf_counter()
    envs = host.make_envs(cfg.env, cfg.ppo.num_envs, "PPO")  # before the directory is claimed
    learner = make_learner(cfg.ppo, int(envs[0].action_space.n))
    key_net, key = jax.random.split(jax.random.key(cfg.seed))
    params = learner.network.init(key_net, jnp.zeros((1,) + envs[0].observation_space.shape, jnp.float32))
    # Arrays all the way down (TrainState.create leaves step a Python int), as the checkpointer stores them.
    state = jax.tree_util.tree_map(jnp.asarray, {
        "train_state": TrainState.create(apply_fn=learner.network.apply, params=params, tx=learner.tx), "key": key})
    learn = jax.jit(learner.learn)
    steps = cfg.ppo.batch_size

    def run_chunk(state, driver, done, size, advance):
        raw = []
        for update in range(done + 1, done + size + 1):
            key, key_rollout, key_epochs = jax.random.split(state["key"], 3)
            transitions = driver.rollout(learner.policy, state["train_state"].params, key_rollout, cfg.ppo.num_steps)
            train_state, metrics = learn(state["train_state"], transitions, jnp.asarray(driver.obs), key_epochs)
            state = {"train_state": train_state, "key": key}
            raw.append({**host.host_metrics(metrics), **host.host_metrics(completed_episode_stats(transitions)),
                        "env_steps": update * steps})
            advance(1)
        return host.ChunkResult(state, raw, {k: np.asarray([r[k] for r in raw]) for k in raw[0]})

    trained = host.train(cfg, workdir, envs, state, seed=cfg.seed, num_updates=cfg.ppo.num_updates,
                         num_chunks=cfg.num_chunks, steps_per_update=steps, run_chunk=run_chunk,
                         desc=f"ppo {cfg.env}", show_progress=cfg.show_progress)
    return host.write_report(cfg, workdir, trained, learner.greedy_policy, trained.state["train_state"].params,
                             algorithm="PPO", num_updates=cfg.ppo.num_updates, update_unit="updates",
                             steps_per_update=steps, curve_label="training episodes (sampled policy)", started=clock)
