"""Reference run: PPO on the JAX CartPole-v1, evaluated over 100 episodes (`jaxalign run ppo_cartpole --workdir DIR`).

Training is `rl.ppo`'s jitted scan over updates (16 vmapped environments x 128 steps per update), run in
`num_chunks` equal chunks so a progress bar can report rate and ETA between them (the chunks compute exactly
what one scan would). Evaluation runs `eval_episodes` fresh episodes of the final policy, greedy (argmax of the
logits) by default or sampled with `eval_greedy=false`, to the 500-step time limit.

Writes to the work directory: config.json (the resolved config), metrics.jsonl (one line per update: env steps,
mean return of the episodes finished in that rollout, losses), checkpoints/ (after every chunk), results.json and
learning_curve.png.

Resume: re-running the same command continues a killed run. After every chunk the whole `RunnerState` (network
params, optimizer state, environment states, observations, PRNG key, update counter) and the metric history so far
are checkpointed atomically (`rl.checkpoint`); a re-run restores the newest chunk, rewrites metrics.jsonl from the
restored history (so no update is logged twice) and runs the remaining chunks, which compute exactly what the
uninterrupted run computes (same chunk sizes, same keys): its final params and results are bit-identical. A work
directory whose config.json records a different config (`show_progress` aside) is refused (`claim_workdir`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxalign.experiments.arith_dpo import claim_workdir, params_sha256, without_presentation_fields, write_json_atomic
from rl.checkpoint import PytreeCheckpointer
from rl.envs import CartPole
from rl.ppo import PPOConfig, make_ppo
from rl.rollout import evaluate_episodes

SOLVED_RETURN = 475.0  # gymnasium's reward_threshold for CartPole-v1


@dataclasses.dataclass(frozen=True)
class PPOCartPoleConfig:
    seed: int = 0
    ppo: PPOConfig = PPOConfig()
    eval_episodes: int = 100
    eval_greedy: bool = True
    num_chunks: int = 16
    show_progress: bool = True

    def __post_init__(self):
        if self.eval_episodes <= 0:
            raise ValueError(f"eval_episodes must be positive, got {self.eval_episodes!r}")
        if not 1 <= self.num_chunks <= self.ppo.num_updates:
            raise ValueError(f"num_chunks must lie in [1, ppo.num_updates={self.ppo.num_updates}], "
                             f"got {self.num_chunks!r}")


def chunk_sizes(num_updates: int, num_chunks: int) -> list[int]:
    """Split the updates into chunks of one size plus at most one remainder chunk (at most two compilations)."""
    size = math.ceil(num_updates / num_chunks)
    sizes = [size] * (num_updates // size)
    if num_updates % size:
        sizes.append(num_updates % size)
    return sizes


def _host(metrics: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def json_record(record: dict) -> dict:
    """A metrics record as JSON (NaN, e.g. the return of an update in which no episode finished, as null)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def from_json_record(record: dict) -> dict:
    """The inverse of `json_record`: null back to NaN, so a restored history equals the one the run computed."""
    return {k: (math.nan if v is None else v) for k, v in record.items()}


def write_metrics(path: str, history: list[dict]) -> None:
    """Replace metrics.jsonl by `history`, atomically: on resume the file holds exactly the checkpointed updates,
    whatever a killed run appended after its last checkpoint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(json_record(r)) + "\n" for r in history)
    os.replace(tmp, path)


def run(cfg: PPOCartPoleConfig, workdir: str) -> dict:
    """Train (or resume; module docstring), evaluate, and write results.json."""
    clock = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    claim_workdir(cfg, workdir)
    env = CartPole()
    env_params = env.default_params
    ppo = make_ppo(cfg.ppo, env, env_params)
    run_chunk = jax.jit(ppo.run, static_argnums=1)

    state = jax.jit(ppo.init)(jax.random.key(cfg.seed))
    sizes = chunk_sizes(cfg.ppo.num_updates, cfg.num_chunks)
    history: list[dict] = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    with PytreeCheckpointer(os.path.join(workdir, "checkpoints"), without_presentation_fields(dataclasses.asdict(cfg)),
                            keep_last=2) as checkpoints:
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            _, state, saved_history = restored
            history = [from_json_record(r) for r in saved_history]
        write_metrics(metrics_path, history)
        done = len(history)  # updates already trained; always a chunk boundary
        train_start = time.perf_counter()
        first_chunk_seconds, first_chunk_updates = 0.0, 0
        trained_here = 0  # updates trained by this process (timings cover these only)
        with open(metrics_path, "a") as log, \
                tqdm(total=cfg.ppo.num_updates, initial=done, desc="ppo cartpole", unit="update",
                     disable=not cfg.show_progress, dynamic_ncols=True) as bar:
            for i, size in enumerate(sizes):
                if sum(sizes[:i + 1]) <= done:
                    continue
                chunk_start = time.perf_counter()
                state, metrics = run_chunk(state, size)
                metrics = _host(metrics)  # blocks until the chunk is done
                if trained_here == 0:
                    first_chunk_seconds, first_chunk_updates = time.perf_counter() - chunk_start, size
                trained_here += size
                records = []
                for j in range(size):
                    record = {k: float(v[j]) for k, v in metrics.items()}
                    record["update"] = len(history) + 1
                    history.append(record)
                    records.append(record)
                # Checkpoint first, then log: a kill between the two loses no record, since a resume rewrites
                # metrics.jsonl from the checkpointed history.
                checkpoints.save(len(history), state, [json_record(r) for r in history])
                log.writelines(json.dumps(json_record(r)) + "\n" for r in records)
                log.flush()
                recent = [r["episode_return"] for r in records if not math.isnan(r["episode_return"])]
                bar.set_postfix(ret=f"{np.mean(recent):.1f}" if recent else "n/a",
                                sps=f"{size * cfg.ppo.batch_size / (time.perf_counter() - chunk_start):.0f}")
                bar.update(size)
    train_seconds = time.perf_counter() - train_start
    env_steps = cfg.ppo.num_updates * cfg.ppo.batch_size

    policy = ppo.greedy_policy if cfg.eval_greedy else ppo.policy
    evaluate = jax.jit(lambda params, key: evaluate_episodes(env, env_params, policy, params, key, cfg.eval_episodes,
                                                             int(env_params.max_steps)))
    episodes = _host(evaluate(state.train_state.params, jax.random.key(cfg.seed + 1_000_003)))
    returns = episodes["return"]
    trained_steps = trained_here * cfg.ppo.batch_size
    after_first = trained_here > first_chunk_updates and train_seconds > first_chunk_seconds
    results = {
        "mean_return": float(returns.mean()),
        "eval_return_std": float(returns.std()),
        "eval_return_min": float(returns.min()),
        "eval_episodes": cfg.eval_episodes,
        "eval_policy": "greedy" if cfg.eval_greedy else "sampled",
        "solved": bool(returns.mean() >= SOLVED_RETURN),
        "solved_threshold": SOLVED_RETURN,
        "env_steps": env_steps,
        "updates": cfg.ppo.num_updates,
        "train_seconds": train_seconds,
        "env_steps_per_second": trained_steps / train_seconds if trained_steps else None,
        "env_steps_per_second_after_compile": ((trained_steps - first_chunk_updates * cfg.ppo.batch_size)
                                               / (train_seconds - first_chunk_seconds)) if after_first else None,
        "first_chunk_seconds_with_compile": first_chunk_seconds,
        "final_train_episode_return": _last_finite(history, "episode_return"),
        "wall_seconds": time.perf_counter() - clock,
        "seed": cfg.seed,
        "params_sha256": params_sha256(state.train_state.params),
        "device": str(jax.devices()[0]),
        "config": dataclasses.asdict(cfg),
    }
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    _plot(history, results, os.path.join(workdir, "learning_curve.png"))
    return results


def _last_finite(history: list[dict], key: str):
    values = [r[key] for r in history if not math.isnan(r[key])]
    return values[-1] if values else None


def _plot(history: list[dict], results: dict, path: str) -> None:
    """Mean return of the episodes finished in each update's rollout against environment steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["env_steps"], r["episode_return"]) for r in history if not math.isnan(r["episode_return"])]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        ax.plot(*zip(*points), label="training episodes (sampled policy)")
    ax.axhline(results["mean_return"], color="tab:green", linestyle="--",
               label=f"final evaluation ({results['eval_policy']}, {results['eval_episodes']} episodes): "
                     f"{results['mean_return']:.1f}")
    ax.set(xlabel="environment steps", ylabel="episode return", title="PPO on CartPole-v1 (JAX)", ylim=(0, 520))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
