"""Reference run: PPO on the JAX CartPole-v1, evaluated over 100 episodes (`jaxalign run ppo_cartpole --workdir DIR`).

Training is `rl.ppo`'s jitted scan over updates (16 vmapped environments x 128 steps per update), run in
`num_chunks` equal chunks so a progress bar can report rate and ETA between them (the chunks compute exactly
what one scan would). Evaluation runs `eval_episodes` fresh episodes of the final policy, greedy (argmax of the
logits) by default or sampled with `eval_greedy=false`, to the 500-step time limit.

Writes to the work directory: config.json (the resolved config), metrics.jsonl (one line per update: env steps,
mean return of the episodes finished in that rollout, losses), results.json and learning_curve.png.
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

from jaxalign.experiments.arith_dpo import write_json_atomic
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


def run(cfg: PPOCartPoleConfig, workdir: str) -> dict:
    clock = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "config.json"), dataclasses.asdict(cfg))
    env = CartPole()
    env_params = env.default_params
    ppo = make_ppo(cfg.ppo, env, env_params)
    run_chunk = jax.jit(ppo.run, static_argnums=1)

    state = jax.jit(ppo.init)(jax.random.key(cfg.seed))
    sizes = chunk_sizes(cfg.ppo.num_updates, cfg.num_chunks)
    history: list[dict] = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    train_start = time.perf_counter()
    first_chunk_seconds = 0.0
    with open(metrics_path, "w") as log, tqdm(total=cfg.ppo.num_updates, desc="ppo cartpole", unit="update",
                                              disable=not cfg.show_progress, dynamic_ncols=True) as bar:
        for i, size in enumerate(sizes):
            chunk_start = time.perf_counter()
            state, metrics = run_chunk(state, size)
            metrics = _host(metrics)  # blocks until the chunk is done
            if i == 0:
                first_chunk_seconds = time.perf_counter() - chunk_start
            for j in range(size):
                record = {k: float(v[j]) for k, v in metrics.items()}
                record["update"] = len(history) + 1
                history.append(record)
                log.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                      for k, v in record.items()}) + "\n")
            log.flush()
            recent = [r["episode_return"] for r in history[-size:] if not math.isnan(r["episode_return"])]
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
    after_first = len(sizes) > 1 and train_seconds > first_chunk_seconds
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
        "env_steps_per_second": env_steps / train_seconds,
        "env_steps_per_second_after_compile": ((env_steps - sizes[0] * cfg.ppo.batch_size)
                                               / (train_seconds - first_chunk_seconds)) if after_first else None,
        "first_chunk_seconds_with_compile": first_chunk_seconds,
        "final_train_episode_return": _last_finite(history, "episode_return"),
        "wall_seconds": time.perf_counter() - clock,
        "seed": cfg.seed,
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
