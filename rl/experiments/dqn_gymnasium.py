"""DQN on any gymnasium environment with discrete actions, stepped on the host (`jaxalign run dqn_gymnasium
--workdir DIR env=Acrobot-v1`).

Each iteration steps `dqn.num_envs` copies of the environment once (`rl.wrappers.GymnasiumDriver`, with the
jitted epsilon-greedy policy) and hands the step to the same compiled learner the JAX path uses
(`rl.dqn.make_learner`: store in the replay buffer, one double-DQN Adam step on a minibatch once `learning_starts`
items are stored, target network copied every `target_update_interval` iterations). Same config, logging,
checkpoints and resume as `ppo_gymnasium` (`rl.host.train`): checkpoints/ after every chunk hold the network, the
optimizer state, the target network, the replay buffer, the PRNG key and the iteration counter (so exploration and
learning resume exactly where they stopped), with the metric history; every chunk starts from environments reset
with chunk-derived seeds, so a killed run resumes bit for bit. metrics.jsonl has one record per `record_every`
iterations (closed early at a chunk's end): mean loss, Q and |TD error| over the iterations that learned, epsilon,
and the mean return of the training episodes that ended in it. results.json holds a greedy evaluation, and
learning_curve.png the training returns against environment steps.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from rl import host
from rl.dqn import DQNConfig, make_learner


@dataclasses.dataclass(frozen=True)
class DQNGymnasiumConfig:
    """DQN on a gymnasium environment stepped on the host (module docstring)."""

    env: str = "CartPole-v1"  # any registered gymnasium id with a Discrete action space and a Box observation
    seed: int = 0  # network initialisation, exploration, replay sampling and the environments' seeds
    dqn: DQNConfig = DQNConfig(num_envs=8, total_timesteps=60_000)
    num_chunks: int = 10  # checkpoints (and environment resets) between iterations, evenly spaced
    record_every: int = 100  # iterations summarised by one metrics.jsonl record
    eval_episodes: int = 20  # greedy evaluation episodes of the final policy
    show_progress: bool = True  # a progress bar with rate and ETA

    def __post_init__(self):
        if self.eval_episodes <= 0:
            raise ValueError(f"eval_episodes must be positive, got {self.eval_episodes!r}")
        if self.record_every <= 0:
            raise ValueError(f"record_every must be positive, got {self.record_every!r}")
        if not 1 <= self.num_chunks <= self.dqn.num_iterations:
            raise ValueError(f"num_chunks must lie in [1, dqn.num_iterations={self.dqn.num_iterations}] "
                             f"(dqn.total_timesteps // dqn.num_envs), got {self.num_chunks!r}")


def window_record(metrics: list[dict[str, np.ndarray]]) -> dict:
    """One metrics.jsonl record from the per-iteration metrics of a window: the loss metrics averaged over the
    iterations that learned (None before `learning_starts`), the episode statistics over the episodes that ended
    in it (None when none did), epsilon and env_steps of the window's last iteration."""
    column = {k: np.asarray([m[k] for m in metrics], np.float64) for k in metrics[0]}
    learned, episodes = column["learned"] > 0, column["episodes"]
    record = {k: float(column[k][learned].mean()) if learned.any() else None for k in ("loss", "q_mean", "td_abs")}
    finished = episodes > 0
    for k in ("episode_return", "episode_length"):
        record[k] = (float(np.sum(column[k][finished] * episodes[finished]) / episodes.sum())
                     if finished.any() else None)
    return {**record, "episodes": int(episodes.sum()), "learning_steps": int(learned.sum()),
            "epsilon": float(column["epsilon"][-1]), "env_steps": int(column["env_steps"][-1])}


def run(cfg: DQNGymnasiumConfig, workdir: str) -> dict:
    """Train (or resume; `rl.host`), evaluate greedily, and write results.json."""
    clock = time.perf_counter()
    envs = host.make_envs(cfg.env, cfg.dqn.num_envs, "DQN")  # before the directory is claimed
    learner = make_learner(cfg.dqn, int(envs[0].action_space.n))
    key_net, key = jax.random.split(jax.random.key(cfg.seed))
    example_obs = jnp.zeros(envs[0].observation_space.shape, jnp.float32)
    train_state, target_params, buffer = learner.init(key_net, example_obs)
    # Arrays all the way down (TrainState.create leaves step a Python int), as the checkpointer stores them.
    state = jax.tree_util.tree_map(jnp.asarray, {
        "train_state": train_state, "target_params": target_params, "buffer": buffer, "key": key,
        "iteration": jnp.zeros((), jnp.int32)})

    @jax.jit
    def epsilon_of(iteration):
        return learner.epsilon(iteration)

    @jax.jit
    def observe(state, transitions, key_learn):
        train_state, target_params, buffer, metrics = learner.observe(
            state["train_state"], state["target_params"], state["buffer"], transitions, state["iteration"], key_learn)
        return dict(state, train_state=train_state, target_params=target_params, buffer=buffer,
                    iteration=state["iteration"] + 1), metrics

    def run_chunk(state, driver, done, size, advance):
        records, watched, window = [], {"loss": []}, []
        for iteration in range(done + 1, done + size + 1):
            key, key_step, key_learn = jax.random.split(state["key"], 3)
            policy_params = (state["train_state"].params, epsilon_of(state["iteration"]))
            transitions = driver.rollout(learner.epsilon_greedy, policy_params, key_step, 1)
            state, metrics = observe(dict(state, key=key), transitions, key_learn)
            window.append(metrics)
            if iteration % cfg.record_every == 0 or iteration == done + size:
                window = jax.device_get(window)
                watched["loss"].extend(float(m["loss"]) for m in window)
                records.append(window_record(window))
                advance(len(window))
                window = []
        return host.ChunkResult(state, records, {k: np.asarray(v) for k, v in watched.items()})

    steps = cfg.dqn.num_envs
    trained = host.train(cfg, workdir, envs, state, seed=cfg.seed, num_updates=cfg.dqn.num_iterations,
                         num_chunks=cfg.num_chunks, steps_per_update=steps, run_chunk=run_chunk,
                         desc=f"dqn {cfg.env}", show_progress=cfg.show_progress)
    return host.write_report(cfg, workdir, trained, learner.greedy_policy, trained.state["train_state"].params,
                             algorithm="DQN", num_updates=cfg.dqn.num_iterations, update_unit="iterations",
                             steps_per_update=steps, curve_label="training episodes (epsilon-greedy)", started=clock)
