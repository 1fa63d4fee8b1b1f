"""Host-side training on gymnasium environments: the loop that `ppo_gymnasium` and `dqn_gymnasium` share.

A gymnasium environment is Python, so its steps cannot join a jitted scan as the JAX environments' steps do in
`rl.harness`; here `rl.wrappers.GymnasiumDriver` steps N copies of it on the host with a jitted policy, and the
agent's learning step is a compiled function called from the host. Everything else is the harness's contract:
the work directory is claimed for the config (`jaxalign.rundir.claim`), the updates run in `num_chunks` chunks
(`rl.harness.chunk_sizes`), each chunk is checked for divergence before it is checkpointed
(`rl.harness.check_chunk`), the checkpoint (the agent's state: parameters, optimizer state, replay buffer, PRNG key,
counters; plus the metric history) is written before the chunk's records are appended to metrics.jsonl, and
progress is shown in environment steps with rate and ETA.

Resume: a gymnasium environment's state is not a pytree, so it cannot be checkpointed. Instead every chunk starts
from freshly reset environments whose seeds depend only on (seed, chunk) (`chunk_seed`); an episode still running
at a chunk's end is cut there. An uninterrupted run does exactly the same, so a killed run resumed from its last
chunk computes what the uninterrupted run computes, bit for bit on the same machine (for environments that are
deterministic given their seed, as the classic-control ones are).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign import paths
from jaxalign.rundir import RunDir, claim, config_to_dict, params_sha256, without_presentation_fields
from jaxalign.train.checkpoint import PytreeCheckpointer, strict_json
from rl import harness
from rl.wrappers import GymnasiumDriver


def make_envs(env_id: str, num_envs: int, algorithm: str) -> list[gymnasium.Env]:
    """`num_envs` copies of the gymnasium env `env_id`, or one clear error (naming the `env` key) for an unknown id,
    a non-Discrete action space or a non-Box observation space."""
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env must be a gymnasium id such as 'Acrobot-v1', got {env_id!r}")
    try:
        envs = [gymnasium.make(env_id) for _ in range(num_envs)]
    except gymnasium.error.Error as e:
        raise ValueError(f"env={env_id!r}: {e}") from None
    if not isinstance(envs[0].action_space, gymnasium.spaces.Discrete):
        raise ValueError(f"env={env_id!r} has action space {envs[0].action_space}; {algorithm} here needs "
                         f"Discrete actions")
    if not isinstance(envs[0].observation_space, gymnasium.spaces.Box):
        raise ValueError(f"env={env_id!r} has observation space {envs[0].observation_space}; a Box is needed")
    return envs


def chunk_seed(seed: int, chunk: int) -> int:
    """The environments' reset seed at the start of `chunk` (environment i gets this + i)."""
    return (seed * 1_000_003 + chunk * 10_007) % 2**31


def evaluate_greedy(env_id: str, greedy_policy: Callable, params: Any, episodes: int) -> np.ndarray:
    """Returns of `episodes` episodes of `greedy_policy(params, obs[None], key) -> (action[1], _)` on a fresh
    environment, reset with seeds 2^31 - 1, 2^31 - 2, ... (seeds `chunk_seed` never gives training)."""
    policy = jax.jit(greedy_policy)
    env = gymnasium.make(env_id)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=2**31 - 1 - episode)
        total, finished = 0.0, False
        while not finished:
            action, _ = policy(params, jnp.asarray(obs)[None], jax.random.key(0))
            obs, reward, terminated, truncated, _ = env.step(int(action[0]))
            total += float(reward)
            finished = terminated or truncated
        returns.append(total)
    return np.asarray(returns)


def host_metrics(metrics: dict) -> dict[str, float]:
    """A dict of scalar device arrays as Python floats (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class ChunkResult(NamedTuple):
    """What an agent's `run_chunk` returns."""

    state: Any  # the agent's state after the chunk (a pytree: what is checkpointed)
    records: list[dict]  # the chunk's metrics.jsonl records, each with "env_steps" and "episode_return" (or None)
    watched: dict[str, np.ndarray]  # per-update columns checked for divergence (`rl.harness.is_watched_metric`)


class HostTrained(NamedTuple):
    state: Any
    history: list[dict]
    train_seconds: float  # from after the restore to the end of the last chunk
    updates_trained: int  # by this process (0 when a finished run is re-run)


def train(cfg: Any, workdir: str, envs: list[gymnasium.Env], state: Any, *, seed: int, num_updates: int,
          num_chunks: int, steps_per_update: int,
          run_chunk: Callable[[Any, GymnasiumDriver, int, int, Callable[[int], None]], ChunkResult],
          desc: str, show_progress: bool) -> HostTrained:
    """Train in `workdir`, resuming from its newest checkpoint (module docstring).

    `state` is the agent's initial state (a pytree); `run_chunk(state, driver, done, size, advance)` runs the `size`
    updates after update `done` on a driver whose environments were just reset for this chunk, calling
    `advance(n)` after every n updates (progress), and returns a `ChunkResult`. One update takes
    `steps_per_update` environment steps.
    """
    run_dir = RunDir(workdir)
    paths.makedirs(run_dir.root)
    claim(cfg, workdir)
    sizes = harness.chunk_sizes(num_updates, num_chunks)
    boundaries = np.cumsum([0] + sizes)
    history: list[dict] = []
    trained = 0
    metadata = without_presentation_fields(config_to_dict(cfg))
    with PytreeCheckpointer(run_dir.file("checkpoints"), metadata, keep_last=2) as checkpoints:
        done = 0
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            done, state, history = restored
        if done not in boundaries:
            raise ValueError(f"{checkpoints.directory} holds update {done}, which is not a chunk boundary "
                             f"{boundaries.tolist()} of this run")
        if jax.process_index() == 0:
            harness.write_metrics(run_dir.metrics, history)
        start = time.perf_counter()
        with tqdm(total=num_updates * steps_per_update, initial=done * steps_per_update, desc=desc, unit="step",
                  unit_scale=True, disable=not show_progress, dynamic_ncols=True) as bar:
            for chunk in range(int(np.searchsorted(boundaries, done)), len(sizes)):
                driver = GymnasiumDriver(envs, seed=chunk_seed(seed, chunk))
                state, raw, watched = run_chunk(state, driver, done, sizes[chunk],
                                                lambda n: bar.update(n * steps_per_update))
                harness.check_chunk(desc, watched, state, done, sizes[chunk], checkpoints)
                records = [strict_json(r) for r in raw]
                history.extend(records)
                done += sizes[chunk]
                checkpoints.save(done, state, history)  # checkpoint first, then log (as the harness does)
                if jax.process_index() == 0:
                    harness.append_metrics(run_dir.metrics, records)
                trained += sizes[chunk]
                recent = [r["episode_return"] for r in records if r["episode_return"] is not None]
                bar.set_postfix({"ret": f"{np.mean(recent):.1f}" if recent else "n/a"})
    return HostTrained(state, history, time.perf_counter() - start, trained)


def write_report(cfg: Any, workdir: str, trained: HostTrained, greedy_policy: Callable, params: Any, *,
                 algorithm: str, num_updates: int, update_unit: str, steps_per_update: int, curve_label: str,
                 started: float) -> dict:
    """Evaluate `params` greedily over `cfg.eval_episodes` episodes of `cfg.env`, write results.json and
    learning_curve.png (training returns against environment steps, the evaluation as a line); returns the results.
    `update_unit` names the update count in results.json ("updates", "iterations"); `started` is the run's
    `time.perf_counter()` at its start."""
    returns = evaluate_greedy(cfg.env, greedy_policy, params, cfg.eval_episodes)
    results = {
        "env": cfg.env,
        "mean_return": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "eval_episodes": cfg.eval_episodes,
        "eval_policy": "greedy",
        "env_steps": num_updates * steps_per_update,
        update_unit: num_updates,
        "train_seconds": trained.train_seconds,
        "env_steps_per_second": (trained.updates_trained * steps_per_update / trained.train_seconds
                                 if trained.updates_trained else None),
        "wall_seconds": time.perf_counter() - started,
        "seed": cfg.seed,
        "params_sha256": params_sha256(params),
        "config": dataclasses.asdict(cfg),
    }
    harness.write_results(workdir, results)
    harness.plot_learning_curve(
        workdir, trained.history, "env_steps", {curve_label: "episode_return"},
        title=f"{algorithm} on {cfg.env} (gymnasium, host-side)", xlabel="environment steps",
        hline=(results["mean_return"], f"final evaluation (greedy, {cfg.eval_episodes} episodes): "
                                       f"{results['mean_return']:.1f}"))
    return results


__all__ = ["ChunkResult", "HostTrained", "chunk_seed", "evaluate_greedy", "host_metrics", "make_envs", "train",
           "write_report"]
