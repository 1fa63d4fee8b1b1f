"""PPO on any gymnasium environment with discrete actions, stepped on the host (`jaxalign run ppo_gymnasium
--workdir DIR env=Acrobot-v1`).

The JAX path (`ppo_cartpole`) compiles environment and learner into one scan; a gymnasium environment is Python,
so here `rl.wrappers.GymnasiumDriver` steps `ppo.num_envs` copies of it on the host with the jitted policy, and
the learning step is the same compiled function the JAX path uses (`rl.ppo.make_learner`: GAE, then
`update_epochs` passes of `ppo_loss` over shuffled minibatches). Same config, logging, checkpoints and resume as
the JAX path: metrics.jsonl (one record per update), checkpoints/ after every chunk (network, optimizer state,
PRNG key and the metric history), results.json with a greedy evaluation and a learning-curve PNG.

Resume: a gymnasium environment's state is not a pytree, so it cannot be checkpointed. Instead every chunk starts
from freshly reset environments with seeds that depend only on (seed, chunk); an episode still running at a chunk's
end is cut there (its last value is bootstrapped, as at any rollout's end). An uninterrupted run does exactly the
same, so a killed run resumed from its last chunk computes what the uninterrupted run computes, bit for bit on the
same machine (for environments that are deterministic given their seed, as the classic-control ones are).
"""
from __future__ import annotations

import dataclasses
import time

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState
from tqdm.auto import tqdm

from jaxalign.rundir import RunDir, claim, config_to_dict, params_sha256, without_presentation_fields
from jaxalign.train.checkpoint import PytreeCheckpointer, strict_json
from rl import harness
from rl.ppo import PPOConfig, make_learner
from rl.rollout import completed_episode_stats
from rl.wrappers import GymnasiumDriver


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
        if not isinstance(self.env, str) or not self.env:
            raise ValueError(f"env must be a gymnasium id such as 'Acrobot-v1', got {self.env!r}")
        if self.eval_episodes <= 0:
            raise ValueError(f"eval_episodes must be positive, got {self.eval_episodes!r}")
        if not 1 <= self.num_chunks <= self.ppo.num_updates:
            raise ValueError(f"num_chunks must lie in [1, ppo.num_updates={self.ppo.num_updates}], "
                             f"got {self.num_chunks!r}")


def make_envs(cfg: PPOGymnasiumConfig) -> list[gymnasium.Env]:
    """`ppo.num_envs` copies of `cfg.env`, or one clear error for an unknown id or an unsupported space."""
    try:
        envs = [gymnasium.make(cfg.env) for _ in range(cfg.ppo.num_envs)]
    except gymnasium.error.Error as e:
        raise ValueError(f"env={cfg.env!r}: {e}") from None
    if not isinstance(envs[0].action_space, gymnasium.spaces.Discrete):
        raise ValueError(f"env={cfg.env!r} has action space {envs[0].action_space}; PPO here needs Discrete actions")
    if not isinstance(envs[0].observation_space, gymnasium.spaces.Box):
        raise ValueError(f"env={cfg.env!r} has observation space {envs[0].observation_space}; a Box is needed")
    return envs


def chunk_seed(cfg: PPOGymnasiumConfig, chunk: int) -> int:
    """The environments' reset seed at the start of `chunk` (environment i gets this + i)."""
    return (cfg.seed * 1_000_003 + chunk * 10_007) % 2**31


def _host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run(cfg: PPOGymnasiumConfig, workdir: str) -> dict:
    """Train (or resume; module docstring), evaluate greedily, and write results.json."""
    clock = time.perf_counter()
    envs = make_envs(cfg)  # before the directory is claimed: an unknown id is refused without a trace
    obs_shape = envs[0].observation_space.shape
    learner = make_learner(cfg.ppo, int(envs[0].action_space.n))
    run_dir = RunDir(workdir)
    claim(cfg, workdir)
    key_net, key = jax.random.split(jax.random.key(cfg.seed))
    params = learner.network.init(key_net, jnp.zeros((1,) + tuple(obs_shape), jnp.float32))
    # Arrays all the way down (TrainState.create leaves step a Python int), as the checkpointer stores them.
    state = jax.tree_util.tree_map(jnp.asarray, {
        "train_state": TrainState.create(apply_fn=learner.network.apply, params=params, tx=learner.tx), "key": key})
    learn = jax.jit(learner.learn)
    sizes = harness.chunk_sizes(cfg.ppo.num_updates, cfg.num_chunks)
    boundaries = np.cumsum([0] + sizes)
    history: list[dict] = []
    trained, train_seconds = 0, 0.0
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
        steps = cfg.ppo.batch_size
        with tqdm(total=cfg.ppo.num_updates * steps, initial=done * steps, desc=f"ppo {cfg.env}", unit="step",
                  unit_scale=True, disable=not cfg.show_progress, dynamic_ncols=True) as bar:
            for chunk in range(int(np.searchsorted(boundaries, done)), len(sizes)):
                driver = GymnasiumDriver(envs, seed=chunk_seed(cfg, chunk))
                raw = []
                for _ in range(sizes[chunk]):
                    key, key_rollout, key_epochs = jax.random.split(state["key"], 3)
                    transitions = driver.rollout(learner.policy, state["train_state"].params, key_rollout,
                                                 cfg.ppo.num_steps)
                    train_state, metrics = learn(state["train_state"], transitions, jnp.asarray(driver.obs),
                                                 key_epochs)
                    state = {"train_state": train_state, "key": key}
                    done += 1
                    raw.append({**_host(metrics), **_host(completed_episode_stats(transitions)),
                                "env_steps": done * steps})
                    bar.update(steps)
                columns = {k: np.asarray([r[k] for r in raw]) for k in raw[0]}
                harness.check_chunk(f"ppo {cfg.env}", columns, state["train_state"].params, done - sizes[chunk],
                                    sizes[chunk], checkpoints)
                records = [strict_json(r) for r in raw]
                history.extend(records)
                checkpoints.save(done, state, history)  # checkpoint first, then log (as the harness does)
                if jax.process_index() == 0:
                    harness.append_metrics(run_dir.metrics, records)
                trained += sizes[chunk]
                recent = [r["episode_return"] for r in records if r["episode_return"] is not None]
                bar.set_postfix({"ret": f"{np.mean(recent):.1f}" if recent else "n/a"})
        train_seconds = time.perf_counter() - start

    returns = evaluate(cfg, learner, state["train_state"].params)
    results = {
        "env": cfg.env,
        "mean_return": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "eval_episodes": cfg.eval_episodes,
        "eval_policy": "greedy",
        "env_steps": cfg.ppo.num_updates * steps,
        "updates": cfg.ppo.num_updates,
        "train_seconds": train_seconds,
        "env_steps_per_second": trained * steps / train_seconds if trained else None,
        "wall_seconds": time.perf_counter() - clock,
        "seed": cfg.seed,
        "params_sha256": params_sha256(state["train_state"].params),
        "config": dataclasses.asdict(cfg),
    }
    harness.write_results(workdir, results)
    harness.plot_learning_curve(
        workdir, history, "env_steps", {"training episodes (sampled policy)": "episode_return"},
        title=f"PPO on {cfg.env} (gymnasium, host-side)", xlabel="environment steps",
        hline=(results["mean_return"], f"final evaluation (greedy, {cfg.eval_episodes} episodes): "
                                       f"{results['mean_return']:.1f}"))
    return results


def evaluate(cfg: PPOGymnasiumConfig, learner, params) -> np.ndarray:
    """Returns of `eval_episodes` greedy episodes on fresh environments (seeds never used in training)."""
    policy = jax.jit(learner.greedy_policy)
    env = gymnasium.make(cfg.env)
    returns = []
    for episode in range(cfg.eval_episodes):
        obs, _ = env.reset(seed=2**31 - 1 - episode)
        total, finished = 0.0, False
        while not finished:
            action, _ = policy(params, jnp.asarray(obs)[None], jax.random.key(0))
            obs, reward, terminated, truncated, _ = env.step(int(action[0]))
            total += float(reward)
            finished = terminated or truncated
        returns.append(total)
    return np.asarray(returns)
