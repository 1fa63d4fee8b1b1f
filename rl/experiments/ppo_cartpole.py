"""Reference run: PPO on the JAX CartPole-v1, evaluated over 100 episodes (`jaxalign run ppo_cartpole --workdir DIR`).

Training is `rl.ppo`'s update (16 vmapped environments x 128 steps per update) run by the RL harness
(`rl.harness`, PureJaxRL-style: Lu et al. 2022, "Discovered Policy Optimisation") as `num_chunks` jitted scans
of equal size, with the environment batch split over the devices' data axis; the chunks compute exactly what one
scan would, and between them the harness checkpoints, logs and reports rate and ETA. Evaluation runs
`eval_episodes` fresh episodes of the final policy, greedy (argmax of the logits) by default or sampled with
`eval_greedy=false`, to the 500-step time limit.

Writes to the work directory: config.json (the resolved config), metrics.jsonl (one line per update: env steps,
mean return of the episodes finished in that rollout, losses), checkpoints/ (after every chunk), results.json and
learning_curve.png.

Resume: re-running the same command continues a killed run. After every chunk the whole `RunnerState` (network
params, optimizer state, environment states, observations, PRNG key, update counter) and the metric history so far
are checkpointed atomically; a re-run restores the newest chunk, rewrites metrics.jsonl from the restored history
(so no update is logged twice) and runs the remaining chunks, which compute exactly what the uninterrupted run
computes (same chunk sizes, same keys): its final params and results are bit-identical. A work directory whose
config.json records a different config (`show_progress` aside) is refused (`jaxalign.rundir.claim`).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jaxalign.rundir import params_sha256
from rl import harness
from rl.envs import CartPole
from rl.ppo import PPO, PPOConfig, RunnerState, make_ppo
from rl.rollout import evaluate_episodes

SOLVED_RETURN = 475.0  # gymnasium's reward_threshold for CartPole-v1


@dataclasses.dataclass(frozen=True)
class PPOCartPoleConfig:
    seed: int = 0  # the PRNG key of the whole run: initialisation, rollouts, minibatch order, evaluation
    ppo: PPOConfig = PPOConfig()
    eval_episodes: int = 100  # fresh episodes of the final policy, each to the 500-step time limit
    eval_greedy: bool = True  # evaluate the argmax action; false: actions sampled from the policy
    num_chunks: int = 16  # jitted scans the updates are split into; checkpoint, log and ETA after each (<= updates)
    show_progress: bool = True  # progress bar with rate and ETA on the terminal (never part of the result)

    def __post_init__(self):
        if self.eval_episodes <= 0:
            raise ValueError(f"eval_episodes must be positive, got {self.eval_episodes!r}")
        if not 1 <= self.num_chunks <= self.ppo.num_updates:
            raise ValueError(f"num_chunks must lie in [1, ppo.num_updates={self.ppo.num_updates}], "
                             f"got {self.num_chunks!r}")


def ppo_trainer(ppo: PPO) -> harness.Trainer:
    """PPO's pieces for the harness: one update per step of the scan, one metrics record per update; the
    environment states and observations are the environment batch (axis 0), the rest is replicated."""
    config = ppo.config

    def env_axes(state: RunnerState) -> RunnerState:
        return RunnerState(train_state=harness.REPLICATED, env_state=harness.env_batch(), obs=harness.env_batch(),
                           key=harness.REPLICATED, update_step=harness.REPLICATED)

    def postfix(records: list[dict]) -> dict:
        recent = [r["episode_return"] for r in records if r["episode_return"] is not None]
        return {"ret": f"{np.mean(recent):.1f}" if recent else "n/a"}

    return harness.Trainer(init=ppo.init, update=ppo.update, num_updates=config.num_updates,
                           env_steps_per_update=config.batch_size, env_axes=env_axes, postfix=postfix)


def _host(metrics: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def run(cfg: PPOCartPoleConfig, workdir: str) -> dict:
    """Train (or resume; module docstring), evaluate, and write results.json."""
    clock = time.perf_counter()
    env = CartPole()
    env_params = env.default_params
    ppo = make_ppo(cfg.ppo, env, env_params)
    trained = harness.train(ppo_trainer(ppo), cfg, workdir, jax.random.key(cfg.seed), cfg.num_chunks,
                            show_progress=cfg.show_progress, desc="ppo cartpole")
    state, history, train_seconds = trained.state, trained.history, trained.train_seconds
    env_steps = cfg.ppo.num_updates * cfg.ppo.batch_size

    policy = ppo.greedy_policy if cfg.eval_greedy else ppo.policy
    evaluate = jax.jit(lambda params, key: evaluate_episodes(env, env_params, policy, params, key, cfg.eval_episodes,
                                                             int(env_params.max_steps)))
    episodes = _host(evaluate(state.train_state.params, jax.random.key(cfg.seed + 1_000_003)))
    returns = episodes["return"]
    trained_steps = trained.updates_trained * cfg.ppo.batch_size
    first_chunk_seconds, first_chunk_updates = trained.first_chunk_seconds, trained.first_chunk_updates
    after_first = trained.updates_trained > first_chunk_updates and train_seconds > first_chunk_seconds
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
    harness.write_results(workdir, results)
    harness.plot_learning_curve(
        workdir, history, "env_steps", {"training episodes (sampled policy)": "episode_return"},
        title="PPO on CartPole-v1 (JAX)", xlabel="environment steps", ylim=(0, 520),
        hline=(results["mean_return"], f"final evaluation ({results['eval_policy']}, {results['eval_episodes']} "
                                       f"episodes): {results['mean_return']:.1f}"))
    return results


def _last_finite(history: list[dict], key: str):
    """The last value of `key` that is not null (null: no episode finished in that update's rollout)."""
    values = [r[key] for r in history if r[key] is not None]
    return values[-1] if values else None
