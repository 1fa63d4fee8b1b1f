"""`jaxalign bench ppo-throughput`: PPO training env-steps/s of `rl.ppo` on the JAX CartPole as a function of the
number of environments, next to Stable-Baselines3's PPO on gymnasium's CartPole-v1 at its own best setting, in one
command; prints the table and the ratio of the two bests.

    jaxalign bench ppo-throughput [--num-envs 16,64,256,1024,4096] [--sb3-num-envs 1,4,16,64,256,1024]
                                  [--num-steps 128] [--timesteps N] [--sb3-timesteps N] [--threads 1] [--no-sb3]
                                  [--out DIR]

What is timed, on each side, is whole PPO training (rollouts, advantage computation and the minibatch updates), once
per number of environments (`--num-envs`, a comma list or one value); everything else is one PPOConfig, the same on
both sides: n_steps, epochs, a fixed number of minibatches (so the minibatch size grows with the batch), learning
rate (linearly annealed on both sides), gamma, GAE lambda, clip range, entropy and value coefficients, gradient
clipping, advantage normalisation, Adam eps 1e-5, and separate 64-64 tanh actor and critic MLPs with orthogonal
init. Value clipping differs in form: SB3 clips V around the rollout value and takes a plain MSE (`clip_range_vf`),
ours takes the max of clipped and unclipped errors; both clip with the same range.
- ours: `rl.ppo.make_ppo(PPOConfig)`'s `run(state, n)`, the whole training loop (n updates under one `lax.scan`,
  rollouts and minibatch epochs scanned inside each) jitted as one program. It is compiled ahead of time
  (`lower(...).compile()`, reported as `compile_seconds`, not timed) and then one call is timed to
  `jax.block_until_ready`. Per point it runs `--timesteps // batch` updates (at least 1); by default 262,144 env
  steps or 2 updates, whichever is more, so that small batches run about 2 s and the big ones still a few updates.
- SB3: `stable_baselines3.PPO("MlpPolicy")` on `make_vec_env("CartPole-v1", n_envs)` (DummyVecEnv), PyTorch CPU,
  one untimed warmup update, then `model.learn` of `--sb3-timesteps // batch` updates (at least 1) timed; by
  default as many updates as the warmup's pace fills in about 2 s (at least 1), since SB3's pace per step varies
  30-fold over its sweep and a fixed step budget would either take long at 1 env or time a fraction of a second.

SB3 at its own best setting: SB3 steps its environments one at a time in Python and its policy and minibatch calls
carry a fixed overhead each, so its env-steps/s rises with n_envs while more environments amortise those calls and
then flattens (measured on the 2-core CPU: about 1.6k env-steps/s at 1 env, 17k at 16, 38k at 64, 48-53k at 256 and
1,024, no more at 4,096), while a 4,096 x 128 batch costs 524k steps per update (about 18 s, plus a warmup update).
It is therefore swept over its own list, `--sb3-num-envs` (default 1,4,16,64,256,1024, which reaches that plateau;
with a single `--num-envs` value and no `--sb3-num-envs`, SB3 runs that same value, the original
same-hyper-parameters side by side), and the baseline is its best env-steps/s over that sweep. The ratio is our best
over our sweep divided by SB3's best over its sweep. The issue's target, ours >= 50x SB3's best, is printed next to
the measurement and drawn on the plot; nothing asserts it.

Threads: torch gets `--threads` intra-op threads, default 1: SB3's small per-minibatch ops gain nothing from more,
and on a loaded 2-core machine two OpenMP threads made SB3 25x slower (measured: 303 vs 7,724 env-steps/s), so 1 is
the baseline's best case. XLA's CPU backend sizes its own pool to the cores the process may run on; to give both
sides one core, run the whole command under `taskset -c 0`. Absolute numbers on a shared CPU are noise; the ratio
measured side by side is the result.

Outputs under `--out` (default runs/bench/ppo_throughput): ppo_throughput.json (the summary below),
ppo_throughput.csv (the sweep table, one row per n_envs) and ppo_throughput.png (env-steps/s against n_envs,
log-log, both implementations, SB3's best and the 50x target as horizontal lines).

`main(argv) -> dict` returns the summary; these keys are stable (`jaxalign bench all` reads them):
- "sweep": one row per n_envs timed on either side, ascending, each {"n_envs", "ours_env_steps_per_second",
  "ours_env_steps", "ours_seconds", "ours_compile_seconds", "sb3_env_steps_per_second", "sb3_env_steps",
  "sb3_seconds", "sb3_warmup_seconds", "ratio_to_sb3_best"}; a side not run at that n_envs has None in its fields,
  and "ratio_to_sb3_best" (ours at this n_envs / SB3's best) is None without SB3.
- "ours_best", "sb3_best": {"n_envs", "env_steps_per_second"} of each side's fastest point ("sb3_best" None with
  --no-sb3).
- "ratio": ours_best / sb3_best env-steps/s (None with --no-sb3); "target_ratio": 50.
- "rows": every timing, ours' then SB3's, each {"implementation", "n_envs", "num_steps", "updates", "env_steps",
  "seconds", "env_steps_per_second", "compile_seconds" or "warmup_seconds", "ratio_to_sb3"} (the last: to SB3's
  best, None without SB3).
- "config" (the PPOConfig shared by every point, num_envs and total_timesteps aside), "threads", "cores", "jax",
  and "stable_baselines3" (its version, with SB3).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import importlib.util
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
DEFAULT_NUM_ENVS = "16,64,256,1024,4096"
DEFAULT_SB3_NUM_ENVS = "1,4,16,64,256,1024"
# Per-point budgets when --timesteps / --sb3-timesteps are not given (see the module docstring).
DEFAULT_TIMESTEPS, DEFAULT_MIN_UPDATES = 262_144, 2
SB3_TARGET_SECONDS = 2.0  # SB3's timed learn per point without --sb3-timesteps
TARGET_RATIO = 50  # the target for ours' best over SB3's best; reported, never asserted
SWEEP_FIELDS = ("n_envs", "ours_env_steps_per_second", "ours_env_steps", "ours_seconds", "ours_compile_seconds",
                "sb3_env_steps_per_second", "sb3_env_steps", "sb3_seconds", "sb3_warmup_seconds",
                "ratio_to_sb3_best")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_num_envs(flag: str, text: str) -> list[int]:
    """A comma list of positive integers (one value is a list of one), deduplicated and ascending."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} must be a comma list of positive integers such as 16,64,256, got {text!r}")
    return sorted(set(values))


def point_config(n_envs: int, num_steps: int, updates: int) -> PPOConfig:
    """The shared PPOConfig at `n_envs` environments, sized for `updates` updates (the learning-rate schedule's
    length; it changes nothing in the cost of a step)."""
    return dataclasses.replace(PPOConfig(), num_envs=n_envs, num_steps=num_steps,
                               total_timesteps=updates * n_envs * num_steps)


def updates_for(batch: int, timesteps: int | None, default_timesteps: int, min_updates: int) -> int:
    """Updates of ours to time at one point: `timesteps // batch` (at least 1) when given, else the default budget
    with at least `min_updates` so that large batches still time more than one update."""
    if timesteps is not None:
        return max(1, timesteps // batch)
    return max(min_updates, default_timesteps // batch)


def jax_steps_per_second(cfg: PPOConfig, updates: int, seed: int = 0) -> dict:
    """Env-steps/s of our PPO training: `run(state, updates)` (one lax.scan over updates) compiled ahead of time,
    then one call timed."""
    ppo = make_ppo(cfg, CartPole())
    state = jax.jit(ppo.init)(jax.random.key(seed))
    jax.block_until_ready(state)
    compile_start = time.perf_counter()
    run = jax.jit(ppo.run, static_argnums=1).lower(state, updates).compile()
    compile_seconds = time.perf_counter() - compile_start
    start = time.perf_counter()
    state, metrics = run(state)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    steps = updates * cfg.batch_size
    return {"implementation": f"jaxalign rl.ppo (JAX {jax.__version__}, {jax.devices()[0].platform})",
            "n_envs": cfg.num_envs, "num_steps": cfg.num_steps, "updates": updates, "env_steps": steps,
            "seconds": seconds, "env_steps_per_second": steps / seconds, "compile_seconds": compile_seconds}


def sb3_steps_per_second(cfg: PPOConfig, updates: int | None, threads: int, seed: int = 0,
                         target_seconds: float = SB3_TARGET_SECONDS) -> dict:
    """Env-steps/s of Stable-Baselines3 PPO with the same hyper-parameters on gymnasium's CartPole-v1: `updates`
    updates timed after one untimed warmup update (torch's first calls); `updates=None` times as many as the
    warmup's pace fills in `target_seconds` (at least 1)."""
    try:
        import stable_baselines3
        import torch
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.logger import Logger
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
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default logger makes a /tmp/SB3-* dir per learn
    warmup_start = time.perf_counter()
    model.learn(total_timesteps=cfg.batch_size)
    warmup_seconds = time.perf_counter() - warmup_start
    if updates is None:
        updates = max(1, round(target_seconds / warmup_seconds))
    start = time.perf_counter()
    model.learn(total_timesteps=updates * cfg.batch_size, reset_num_timesteps=True)
    seconds = time.perf_counter() - start
    steps = updates * cfg.batch_size
    return {"implementation": f"Stable-Baselines3 {stable_baselines3.__version__} PPO (torch {torch.__version__}, "
                              f"{threads} threads)",
            "n_envs": cfg.num_envs, "num_steps": cfg.num_steps, "updates": updates, "env_steps": steps,
            "seconds": seconds, "env_steps_per_second": steps / seconds, "warmup_seconds": warmup_seconds}


def parse_args(argv):
    """The flags, checked in full (lists, budgets, every point's PPOConfig, SB3 installed) before any work."""
    parser = argparse.ArgumentParser(prog="jaxalign bench ppo-throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-envs", default=DEFAULT_NUM_ENVS,
                        help=f"ours' sweep, a comma list or one value (default {DEFAULT_NUM_ENVS})")
    parser.add_argument("--sb3-num-envs", default=None,
                        help=f"SB3's own sweep (default {DEFAULT_SB3_NUM_ENVS}; with one --num-envs value, that "
                             "value)")
    parser.add_argument("--num-steps", type=int, default=PPOConfig.num_steps, help="steps per env per update")
    parser.add_argument("--timesteps", type=int, default=None,
                        help=f"env steps timed for ours per point (default {DEFAULT_TIMESTEPS:,} or "
                             f"{DEFAULT_MIN_UPDATES} updates, whichever is more)")
    parser.add_argument("--sb3-timesteps", type=int, default=None,
                        help=f"env steps timed for SB3 per point (default: the updates that fill about "
                             f"{SB3_TARGET_SECONDS:g} s at the warmup update's pace)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    parser.add_argument("--no-sb3", action="store_true", help="time ours only")
    parser.add_argument("--out", default="runs/bench/ppo_throughput", help="where the table and plot go")
    args = parser.parse_args(argv)
    for name in ("num_steps", "timesteps", "sb3_timesteps", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    args.num_envs = parse_num_envs("--num-envs", args.num_envs)
    if args.sb3_num_envs is None:  # one value keeps the original same-setting side by side
        args.sb3_num_envs = DEFAULT_SB3_NUM_ENVS if len(args.num_envs) > 1 else str(args.num_envs[0])
    args.sb3_num_envs = parse_num_envs("--sb3-num-envs", args.sb3_num_envs)
    for flag, values in (("--num-envs", args.num_envs), ("--sb3-num-envs", [] if args.no_sb3 else args.sb3_num_envs)):
        for n_envs in values:
            try:
                point_config(n_envs, args.num_steps, 1)
            except ValueError as e:
                raise ValueError(f"{flag} {n_envs} with --num-steps {args.num_steps}: {e}") from None
    if not args.no_sb3 and importlib.util.find_spec("stable_baselines3") is None:
        raise ValueError(f"{MISSING_EXTRA} (or pass --no-sb3)")
    return args


def best(rows: list[dict]) -> dict | None:
    """{"n_envs", "env_steps_per_second"} of the fastest timing in `rows`, or None when there is none."""
    if not rows:
        return None
    top = max(rows, key=lambda row: row["env_steps_per_second"])
    return {"n_envs": top["n_envs"], "env_steps_per_second": top["env_steps_per_second"]}


def sweep_table(ours: list[dict], sb3: list[dict], sb3_best: dict | None) -> list[dict]:
    """One row per n_envs timed on either side (ascending) with both sides' figures, None where a side did not run
    at that n_envs, and ours over SB3's best."""
    by_n = {side: {row["n_envs"]: row for row in rows} for side, rows in (("ours", ours), ("sb3", sb3))}
    table = []
    for n_envs in sorted(set(by_n["ours"]) | set(by_n["sb3"])):
        row = dict.fromkeys(SWEEP_FIELDS)
        row["n_envs"] = n_envs
        for side, extra in (("ours", "compile_seconds"), ("sb3", "warmup_seconds")):
            timing = by_n[side].get(n_envs)
            if timing is not None:
                for key in ("env_steps_per_second", "env_steps", "seconds", extra):
                    row[f"{side}_{key}"] = timing[key]
        if row["ours_env_steps_per_second"] is not None and sb3_best is not None:
            row["ratio_to_sb3_best"] = row["ours_env_steps_per_second"] / sb3_best["env_steps_per_second"]
        table.append(row)
    return table


def print_table(sweep: list[dict]) -> None:
    """The sweep as a fixed-width table, '-' where a side was not run."""
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    print(f"{'n_envs':>7s} {'ours env-steps/s':>17s} {'SB3 env-steps/s':>16s} {'ours / SB3 best':>16s}")
    for row in sweep:
        ratio = "-" if row["ratio_to_sb3_best"] is None else f"{row['ratio_to_sb3_best']:.1f}x"
        print(f"{row['n_envs']:7d} {cell(row['ours_env_steps_per_second'], ',.0f'):>17s} "
              f"{cell(row['sb3_env_steps_per_second'], ',.0f'):>16s} {ratio:>16s}")


def progress(label: str, row: dict) -> None:
    """One line per finished timing, flushed so a long sweep shows where it is."""
    setup = (f"compile {row['compile_seconds']:.1f} s" if "compile_seconds" in row
             else f"warmup {row['warmup_seconds']:.1f} s")
    print(f"  {label} n_envs={row['n_envs']}: {row['updates']} updates x {row['n_envs'] * row['num_steps']:,} "
          f"steps in {row['seconds']:.2f} s ({setup}): {row['env_steps_per_second']:,.0f} env-steps/s", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv or [])
    cfg = point_config(args.num_envs[0], args.num_steps, 1)
    print(f"PPO training throughput on CartPole-v1: n_envs {','.join(map(str, args.num_envs))} (ours), "
          f"{'not run' if args.no_sb3 else ','.join(map(str, args.sb3_num_envs))} (SB3) x {cfg.num_steps} steps "
          f"per update, {cfg.update_epochs} epochs x {cfg.num_minibatches} minibatches, MLP {cfg.num_layers}x"
          f"{cfg.hidden_size} {cfg.activation}; {available_cores()} cores, torch threads {args.threads}", flush=True)
    ours = []
    for n_envs in args.num_envs:
        updates = updates_for(n_envs * args.num_steps, args.timesteps, DEFAULT_TIMESTEPS, DEFAULT_MIN_UPDATES)
        ours.append(jax_steps_per_second(point_config(n_envs, args.num_steps, updates), updates))
        progress("ours", ours[-1])
    sb3 = []
    for n_envs in [] if args.no_sb3 else args.sb3_num_envs:
        updates = None if args.sb3_timesteps is None else max(1, args.sb3_timesteps // (n_envs * args.num_steps))
        sb3.append(sb3_steps_per_second(point_config(n_envs, args.num_steps, updates or 1), updates, args.threads))
        progress("SB3 ", sb3[-1])
    ours_best, sb3_best = best(ours), best(sb3)
    for row in ours + sb3:
        row["ratio_to_sb3"] = None if sb3_best is None else row["env_steps_per_second"] / sb3_best[
            "env_steps_per_second"]
    sweep = sweep_table(ours, sb3, sb3_best)
    print(f"ours: {ours[0]['implementation']}")
    if sb3:
        print(f"SB3:  {sb3[0]['implementation']}")
    print_table(sweep)
    summary = {"sweep": sweep, "ours_best": ours_best, "sb3_best": sb3_best, "ratio": None,
               "target_ratio": TARGET_RATIO, "rows": ours + sb3,
               "config": dataclasses.asdict(cfg), "threads": args.threads, "cores": available_cores(),
               "jax": jax.__version__}
    if sb3_best is not None:
        summary["ratio"] = ours_best["env_steps_per_second"] / sb3_best["env_steps_per_second"]
        summary["stable_baselines3"] = importlib.metadata.version("stable-baselines3")
        print(f"ratio (ours / SB3), each at its best: {summary['ratio']:.1f}x: ours "
              f"{ours_best['env_steps_per_second']:,.0f} env-steps/s at {ours_best['n_envs']} envs, SB3 "
              f"{sb3_best['env_steps_per_second']:,.0f} at {sb3_best['n_envs']} envs (issue target: "
              f">= {TARGET_RATIO}x, {'met' if summary['ratio'] >= TARGET_RATIO else 'not met'})")
    _save(summary, args.out)
    return summary


def _save(summary: dict, out: str) -> None:
    paths.makedirs(out)
    paths.write_atomic(RunDir(out).file("ppo_throughput.json"), json.dumps(summary, indent=2))
    table = io.StringIO(newline="")  # csv's own CRLF line ends, as a file opened with newline="" keeps them
    writer = csv.DictWriter(table, fieldnames=list(SWEEP_FIELDS))
    writer.writeheader()
    writer.writerows(summary["sweep"])
    paths.write_atomic(paths.join(out, "ppo_throughput.csv"), table.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for side, label, marker in (("ours", "jaxalign rl.ppo (JAX)", "o"), ("sb3", "Stable-Baselines3", "s")):
        points = [(r["n_envs"], r[f"{side}_env_steps_per_second"]) for r in summary["sweep"]
                  if r[f"{side}_env_steps_per_second"] is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)
    if summary["sb3_best"] is not None:
        level = summary["sb3_best"]["env_steps_per_second"]
        ax.axhline(level, color="gray", linestyle="--", label=f"SB3 best ({summary['sb3_best']['n_envs']} envs)")
        ax.axhline(TARGET_RATIO * level, color="gray", linestyle=":", label=f"{TARGET_RATIO}x SB3 best (target)")
    ax.set(xscale="log", yscale="log", xlabel="environments (n_envs)", ylabel="training env-steps/s",
           title="PPO on CartPole-v1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.save_figure(fig, RunDir(out).file("ppo_throughput.png"), dpi=120)
    plt.close(fig)
    print(f"saved {out}/ppo_throughput.{{json,csv,png}}")
