"""`jaxalign bench ppo-throughput`: PPO training env-steps/s of `rl.ppo` on the JAX CartPole next to
Stable-Baselines3's PPO on gymnasium's CartPole-v1, same hyper-parameters, in one command; prints the ratio.

What is timed, on each side, is whole PPO training (rollouts, advantage computation and the minibatch updates):
- ours: `rl.ppo.make_ppo(PPOConfig)`'s `run` over `--timesteps` environment steps of updates, jitted; its first
  call compiles and is not timed, the second (continuing training) is timed to `jax.block_until_ready`.
- SB3: `stable_baselines3.PPO("MlpPolicy")` on `make_vec_env("CartPole-v1", n_envs)` (DummyVecEnv), PyTorch CPU,
  `model.learn(--sb3-timesteps)` timed after one warmup update's worth of `learn`.
Both use the same PPOConfig: n_envs, n_steps, epochs, minibatch size (SB3's batch_size), learning rate (linearly
annealed on both sides), gamma, GAE lambda, clip range, entropy and value coefficients, gradient clipping, advantage
normalisation, Adam eps 1e-5, and separate 64-64 tanh actor and critic MLPs with orthogonal init. Value clipping
differs in form: SB3 clips V around the rollout value and takes a plain MSE (`clip_range_vf`), ours takes the
max of clipped and unclipped errors; both clip with the same range.

Threads: torch gets `--threads` intra-op threads, default 1: SB3's small per-minibatch ops gain nothing from more,
and on a loaded 2-core machine two OpenMP threads made SB3 25x slower (measured: 303 vs 7,724 env-steps/s), so 1 is
the baseline's best case. XLA's CPU backend sizes its own pool to the cores the process may run on; to give both
sides one core, run the whole command under `taskset -c 0`. Absolute numbers on a shared CPU are noise; the ratio
measured side by side is the result. A table is printed and saved (CSV and JSON) with a bar chart under `--out`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import io
import json
import os
import time

import jax

from rl.envs import CartPole
from rl.ppo import PPOConfig, make_ppo
from jaxalign import paths
from jaxalign.rundir import RunDir

MISSING_EXTRA = "the Stable-Baselines3 baseline needs the benchmark extra: pip install -e '.[bench]'"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def jax_steps_per_second(cfg: PPOConfig, timesteps: int, seed: int = 0) -> dict:
    """Env-steps/s of our PPO training after a one-update warmup (which compiles)."""
    ppo = make_ppo(cfg, CartPole())
    updates = max(1, timesteps // cfg.batch_size)
    run = jax.jit(ppo.run, static_argnums=1)
    state = jax.jit(ppo.init)(jax.random.key(seed))
    warmup_start = time.perf_counter()
    state, _ = run(state, updates)  # compiles, then runs once untimed; the second call below is timed
    jax.block_until_ready(state)
    warmup_seconds = time.perf_counter() - warmup_start
    start = time.perf_counter()
    state, metrics = run(state, updates)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    steps = updates * cfg.batch_size
    return {"implementation": f"jaxalign rl.ppo (JAX {jax.__version__}, {jax.devices()[0].platform})",
            "env_steps": steps, "seconds": seconds, "env_steps_per_second": steps / seconds,
            "warmup_seconds": warmup_seconds}


def sb3_steps_per_second(cfg: PPOConfig, timesteps: int, threads: int, seed: int = 0) -> dict:
    """Env-steps/s of Stable-Baselines3 PPO with the same hyper-parameters on gymnasium's CartPole-v1."""
    try:
        import stable_baselines3
        import torch
        from stable_baselines3.common.env_util import make_vec_env
    except ImportError as e:
        raise ValueError(f"{MISSING_EXTRA} ({e})") from None
    torch.set_num_threads(threads)
    if cfg.num_layers <= 0 or cfg.activation not in ("tanh", "relu"):
        raise ValueError(f"cannot mirror ppo.activation={cfg.activation!r} in SB3")
    lr = cfg.learning_rate
    model = stable_baselines3.PPO(
        "MlpPolicy", make_vec_env("CartPole-v1", n_envs=cfg.num_envs, seed=seed), n_steps=cfg.num_steps,
        batch_size=cfg.minibatch_size, n_epochs=cfg.update_epochs,
        learning_rate=(lambda progress: lr * progress) if cfg.anneal_lr else lr, gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_eps, clip_range_vf=cfg.clip_eps if cfg.clip_value else None,
        normalize_advantage=cfg.normalize_advantages, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
        max_grad_norm=cfg.max_grad_norm, seed=seed, device="cpu", verbose=0,
        policy_kwargs={"net_arch": {"pi": [cfg.hidden_size] * cfg.num_layers,
                                    "vf": [cfg.hidden_size] * cfg.num_layers},
                       "activation_fn": torch.nn.Tanh if cfg.activation == "tanh" else torch.nn.ReLU,
                       "ortho_init": True},
    )
    warmup_start = time.perf_counter()
    model.learn(total_timesteps=cfg.batch_size)
    warmup_seconds = time.perf_counter() - warmup_start
    updates = max(1, timesteps // cfg.batch_size)
    start = time.perf_counter()
    model.learn(total_timesteps=updates * cfg.batch_size, reset_num_timesteps=True)
    seconds = time.perf_counter() - start
    steps = updates * cfg.batch_size
    return {"implementation": f"Stable-Baselines3 {stable_baselines3.__version__} PPO (torch {torch.__version__}, "
                              f"{threads} threads)",
            "env_steps": steps, "seconds": seconds, "env_steps_per_second": steps / seconds,
            "warmup_seconds": warmup_seconds}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="jaxalign bench ppo-throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, default=262_144, help="env steps timed for ours")
    parser.add_argument("--sb3-timesteps", type=int, default=32_768, help="env steps timed for SB3")
    parser.add_argument("--num-envs", type=int, default=PPOConfig.num_envs)
    parser.add_argument("--num-steps", type=int, default=PPOConfig.num_steps)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    parser.add_argument("--no-sb3", action="store_true", help="time ours only")
    parser.add_argument("--out", default="runs/bench/ppo_throughput", help="where the table and plot go")
    args = parser.parse_args(argv)
    for name in ("timesteps", "sb3_timesteps", "threads"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv or [])
    cfg = dataclasses.replace(PPOConfig(), num_envs=args.num_envs, num_steps=args.num_steps,
                              total_timesteps=max(args.timesteps, args.sb3_timesteps, args.num_envs * args.num_steps))
    print(f"PPO training throughput on CartPole-v1: {cfg.num_envs} envs x {cfg.num_steps} steps per update, "
          f"{cfg.update_epochs} epochs x {cfg.num_minibatches} minibatches of {cfg.minibatch_size}, MLP "
          f"{cfg.num_layers}x{cfg.hidden_size} {cfg.activation}; {available_cores()} cores, torch threads "
          f"{args.threads}", flush=True)
    rows = [jax_steps_per_second(cfg, args.timesteps)]
    print(f"  ours: {rows[0]['env_steps_per_second']:,.0f} env-steps/s", flush=True)
    if not args.no_sb3:
        rows.append(sb3_steps_per_second(cfg, args.sb3_timesteps, args.threads))
        print(f"  SB3:  {rows[1]['env_steps_per_second']:,.0f} env-steps/s", flush=True)
    base = rows[-1]["env_steps_per_second"]
    for row in rows:
        row["ratio_to_sb3"] = row["env_steps_per_second"] / base if not args.no_sb3 else None
    header = f"{'implementation':78s} {'env steps':>10s} {'seconds':>8s} {'env-steps/s':>12s} {'vs SB3':>8s}"
    print(header)
    for row in rows:
        ratio = f"{row['ratio_to_sb3']:.1f}x" if row["ratio_to_sb3"] is not None else "-"
        print(f"{row['implementation']:78s} {row['env_steps']:10d} {row['seconds']:8.2f} "
              f"{row['env_steps_per_second']:12,.0f} {ratio:>8s}")
    summary = {"rows": rows, "config": dataclasses.asdict(cfg), "threads": args.threads,
               "cores": available_cores()}
    if not args.no_sb3:
        summary["ratio"] = rows[0]["env_steps_per_second"] / rows[1]["env_steps_per_second"]
        summary["stable_baselines3"] = importlib.metadata.version("stable-baselines3")
        print(f"ratio (ours / SB3): {summary['ratio']:.1f}x")
    _save(summary, args.out)
    return summary


def _save(summary: dict, out: str) -> None:
    paths.makedirs(out)
    paths.write_atomic(RunDir(out).file("ppo_throughput.json"), json.dumps(summary, indent=2))
    table = io.StringIO(newline="")  # csv's own CRLF line ends, as a file opened with newline="" keeps them
    writer = csv.DictWriter(table, fieldnames=list(summary["rows"][0]))
    writer.writeheader()
    writer.writerows(summary["rows"])
    paths.write_atomic(paths.join(out, "ppo_throughput.csv"), table.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    names = [r["implementation"].split(" (")[0] for r in summary["rows"]]
    ax.barh(names, [r["env_steps_per_second"] for r in summary["rows"]])
    ax.set(xscale="log", xlabel="training env-steps/s (log scale)", title="PPO on CartPole-v1")
    fig.tight_layout()
    paths.save_figure(fig, RunDir(out).file("ppo_throughput.png"), dpi=120)
    plt.close(fig)
    print(f"saved {out}/ppo_throughput.{{json,csv,png}}")
