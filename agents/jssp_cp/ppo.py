"""PPO on the makespan for the dispatching policy, PureJaxRL-style on the RL harness (`rl.harness.Trainer`).

One update (Schulman et al. 2017, arXiv 1707.06347; the loss is `rl.ppo.ppo_loss`, the advantages
`rl.returns.generalized_advantage_estimation`, both as they are): `num_envs` job shops step `num_steps` decisions
in lock-step under one lax.scan, each drawing a fresh random instance when its episode ends; then `update_epochs`
passes of `num_minibatches` shuffled minibatches. Each update draws one training size (jobs, machines) from the
config's list, and the instances its finished episodes restart with have that size; every instance is padded to the
largest size, which the network ignores (agents/jssp_cp/network.py), so one compiled update serves every size.

Reward: the environment's reward, minus the increase of the partial makespan, divided by the instance's trivial
lower bound max(largest machine load, longest job). The undiscounted return (gamma = 1) is then exactly
-makespan / lower bound, on the same scale (about -1 to -2) for every size, so one value head and one advantage
normalisation serve all sizes.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from agents.jssp_cp import env
from rl import harness
from rl.ppo import ppo_loss, shuffled_minibatch_epochs
from rl.returns import generalized_advantage_estimation, shifted_next_values


@dataclasses.dataclass(frozen=True)
class JSSPPPOConfig:
    num_envs: int = 16  # job shops stepped side by side, each drawing a new instance when its schedule is done
    num_steps: int = 64  # dispatching decisions per job shop in one update's rollout
    num_updates: int = 40  # PPO updates of the run, each on num_envs * num_steps decisions
    update_epochs: int = 2  # passes over each rollout batch, each in a fresh shuffled order
    num_minibatches: int = 4  # Adam steps per epoch, each on num_envs * num_steps / num_minibatches decisions
    learning_rate: float = 1e-4  # Adam's step size (constant)
    gae_lambda: float = 0.95  # GAE's lambda (Schulman et al. 2016) on the undiscounted return (gamma = 1)
    clip_eps: float = 0.2  # PPO's ratio clip epsilon (eq. 7), also the clip of the value loss
    vf_coef: float = 0.5  # weight of the value loss in the total loss
    ent_coef: float = 0.005  # weight of the entropy bonus subtracted from the loss
    max_grad_norm: float = 0.5  # gradients are clipped to this global norm before each Adam step

    def __post_init__(self):
        for name in ("num_envs", "num_steps", "num_updates", "update_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)!r}")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(f"ppo.num_envs * ppo.num_steps = {self.num_envs * self.num_steps} must be divisible by "
                             f"ppo.num_minibatches={self.num_minibatches}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps


def random_padded(key: jax.Array, jobs: jax.Array, machines: jax.Array, max_jobs: int, max_machines: int,
                  max_duration: int = 99) -> env.JobShop:
    """A Taillard-style random instance of `jobs` x `machines` (traced ints) padded to max_jobs x max_machines:
    durations U[1, max_duration], each job's route a uniform permutation of the first `machines` machines (the
    unused slots sort last, so the first `machines` entries of an argsort are that permutation)."""
    k_dur, k_perm = jax.random.split(key)
    slot = jnp.arange(max_machines)
    durations = jax.random.randint(k_dur, (max_jobs, max_machines), 1, max_duration + 1, dtype=jnp.int32)
    noise = jnp.where(slot < machines, jax.random.uniform(k_perm, (max_jobs, max_machines)), 2.0)
    routes = jnp.argsort(noise, axis=1).astype(jnp.int32)
    real = (jnp.arange(max_jobs)[:, None] < jobs) & (slot[None, :] < machines)
    return env.JobShop(machines=jnp.where(real, routes, 0), durations=jnp.where(real, durations, 0),
                       num_ops=jnp.where(jnp.arange(max_jobs) < jobs, machines, 0).astype(jnp.int32),
                       machine_valid=slot < machines)


def lower_bound(instance: env.JobShop) -> jax.Array:
    """max(largest machine load, longest job): no schedule is shorter."""
    loads = jnp.zeros(instance.machine_valid.shape[0], jnp.int32).at[instance.machines].add(instance.durations)
    return jnp.maximum(loads.max(), instance.durations.sum(axis=1).max())


@struct.dataclass
class Runner:
    """The PPO run's carry: parameters and optimizer, N environment states, their reward normalisers, the running
    lower-bound ratio bookkeeping, the update's size index, the PRNG key and the update count."""

    train_state: TrainState
    env_state: env.State
    norm: jax.Array
    key: jax.Array
    update_step: jax.Array


def make_trainer(apply, params, cfg: JSSPPPOConfig, sizes: Sequence[tuple[int, int]]) -> harness.Trainer:
    """The harness Trainer: init starts from `params` (the imitation policy); `update` is one PPO update."""
    max_jobs = max(j for j, _ in sizes)
    max_machines = max(m for _, m in sizes)
    size_jobs = jnp.array([j for j, _ in sizes], jnp.int32)
    size_machines = jnp.array([m for _, m in sizes], jnp.int32)
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.learning_rate, eps=1e-5))

    def fresh(key, size):
        inst = random_padded(key, size_jobs[size], size_machines[size], max_jobs, max_machines)
        return env.reset(inst), lower_bound(inst).astype(jnp.float32)

    def init(key):
        k_size, k_env = jax.random.split(key)
        size = jax.random.randint(k_size, (), 0, len(sizes))
        states, norms = jax.vmap(fresh, in_axes=(0, None))(jax.random.split(k_env, cfg.num_envs), size)
        train_state = TrainState.create(apply_fn=apply, params=params, tx=tx)
        return Runner(train_state, states, norms, key, jnp.zeros((), jnp.int32))

    def env_step(carry, key, params, size):
        states, norms = carry
        k_act, k_reset = jax.random.split(key)
        obs = jax.vmap(env.observe)(states)
        logits, value = apply(params, obs)
        action = jax.random.categorical(k_act, logits)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[:, 0]
        nxt = jax.vmap(env.transition)(states, action)
        reward = (states.makespan - nxt.makespan).astype(jnp.float32) / norms
        done = jax.vmap(env.done)(nxt)
        ratio = nxt.makespan.astype(jnp.float32) / norms
        new_states, new_norms = jax.vmap(fresh, in_axes=(0, None))(jax.random.split(k_reset, cfg.num_envs), size)
        states = jax.tree_util.tree_map(lambda a, b: jnp.where(done.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                                        new_states, nxt)
        norms = jnp.where(done, new_norms, norms)
        out = {"obs": obs, "action": action, "log_prob": log_prob, "value": value, "reward": reward, "done": done,
               "ratio": ratio}
        return (states, norms), out

    def loss_fn(params, batch):
        logits, values = apply(params, batch["obs"])
        return ppo_loss(logits, values, batch["action"], batch["log_prob"], batch["value"], batch["advantage"],
                        batch["target"], clip_eps=cfg.clip_eps, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef)

    def minibatch_step(train_state, batch):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(train_state.params, batch)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return train_state.apply_gradients(grads=grads), metrics

    def update(runner: Runner):
        key, k_size, k_roll, k_epochs = jax.random.split(runner.key, 4)
        size = jax.random.randint(k_size, (), 0, len(sizes))
        params = runner.train_state.params
        step = lambda carry, k: env_step(carry, k, params, size)  # noqa: E731
        (states, norms), out = jax.lax.scan(step, (runner.env_state, runner.norm),
                                            jax.random.split(k_roll, cfg.num_steps))
        _, last_value = apply(params, jax.vmap(env.observe)(states))
        done = out["done"]
        advantages, targets = generalized_advantage_estimation(
            out["reward"], out["value"], shifted_next_values(out["value"], last_value), done,
            jnp.zeros_like(done), 1.0, cfg.gae_lambda)
        batch = {"obs": out["obs"], "action": out["action"], "log_prob": out["log_prob"], "value": out["value"],
                 "advantage": advantages, "target": targets}
        batch = jax.tree_util.tree_map(lambda x: x.reshape((cfg.batch_size,) + x.shape[2:]), batch)
        train_state, loss_metrics = shuffled_minibatch_epochs(minibatch_step, runner.train_state, batch, k_epochs,
                                                              cfg.update_epochs, cfg.num_minibatches)
        metrics = {k: v.mean() for k, v in loss_metrics.items()}
        finished = done.sum()
        metrics["episodes"] = finished.astype(jnp.float32)
        metrics["makespan_over_lb"] = jnp.where(finished > 0, (out["ratio"] * done).sum() / jnp.maximum(finished, 1),
                                                jnp.nan)
        metrics["env_steps"] = ((runner.update_step + 1) * cfg.batch_size).astype(jnp.float32)
        return Runner(train_state, states, norms, key, runner.update_step + 1), metrics

    def env_axes(runner: Runner) -> Runner:
        envs, rep = harness.env_batch(0), harness.REPLICATED
        return Runner(train_state=rep, env_state=envs, norm=envs, key=rep, update_step=rep)

    def postfix(records):
        ratio = records[-1].get("makespan_over_lb")
        return {"ms/lb": f"{ratio:.3f}" if ratio is not None and np.isfinite(ratio) else "-"}

    return harness.Trainer(init=init, update=update, num_updates=cfg.num_updates,
                           env_steps_per_update=cfg.batch_size, env_axes=env_axes, postfix=postfix)
