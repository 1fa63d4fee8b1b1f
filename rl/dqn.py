"""Deep Q-Networks (Mnih et al. 2015, "Human-level control through deep reinforcement learning") with double Q-learning
(van Hasselt, Guez & Silver 2016), PureJaxRL-style: `make_train(config, env)` returns `train(key)`, one jitted scan.

Each iteration steps `num_envs` auto-resetting environments once with an epsilon-greedy policy (epsilon decays
linearly), adds the transitions to a uniform replay buffer (`rl.replay`), and, once `learning_starts` steps are
stored, takes one Adam step on a minibatch every `train_frequency` iterations; the target network is copied from
the online one every `target_update_interval` iterations. Time-limit truncations bootstrap from the pre-reset next
observation; only terminations cut the bootstrap (see `rl.returns`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from rl import replay
from rl.env import Discrete, Environment
from rl.networks import QNetwork
from rl.rollout import completed_episode_stats, reset_envs, rollout
from rl.wrappers import AutoReset, EpisodeStats


@dataclasses.dataclass(frozen=True)
class DQNConfig:
    num_envs: int = 8
    total_timesteps: int = 100_000
    buffer_size: int = 10_000
    batch_size: int = 64
    learning_rate: float = 1e-3
    gamma: float = 0.99
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    exploration_fraction: float = 0.3
    learning_starts: int = 1_000
    train_frequency: int = 1
    target_update_interval: int = 50
    double_q: bool = True
    huber_delta: float = 0.0  # squared error; see dqn_loss for why not Huber by default
    max_grad_norm: float = 10.0
    hidden_size: int = 64
    num_layers: int = 2

    def __post_init__(self):
        for name in ("num_envs", "buffer_size", "batch_size", "train_frequency", "target_update_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"dqn.{name} must be positive, got {getattr(self, name)!r}")
        if self.buffer_size < self.num_envs:
            raise ValueError(f"dqn.buffer_size={self.buffer_size} must hold at least one step of all "
                             f"dqn.num_envs={self.num_envs} environments")
        if self.total_timesteps < self.num_envs:
            raise ValueError(f"dqn.total_timesteps={self.total_timesteps} < dqn.num_envs={self.num_envs}")

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.num_envs


def q_learning_targets(rewards, discounts, next_q_target, next_q_online=None) -> jax.Array:
    """One-step bootstrap targets y = r + discount * Q_target(s', a*).

    DQN (Mnih et al. 2015, Methods eq. 2): a* = argmax_a Q_target(s', a). Double DQN (van Hasselt et al. 2016,
    eq. 4): a* = argmax_a Q_online(s', a), evaluated by the target network. `discounts` is gamma, or 0 where s' is
    terminal. Shapes: rewards/discounts [B], next Q-values [B, A]. No gradient flows into the result.
    """
    if next_q_online is None:
        bootstrap = jnp.max(next_q_target, axis=-1)
    else:
        best = jnp.argmax(next_q_online, axis=-1)
        bootstrap = jnp.take_along_axis(next_q_target, best[:, None], axis=-1)[:, 0]
    return jax.lax.stop_gradient(rewards + discounts * bootstrap)


def dqn_loss(q_values, actions, targets, huber_delta: float = 1.0) -> tuple[jax.Array, dict]:
    """Mean Huber loss (delta = `huber_delta`; 0 means squared error / 2) between Q(s, a) and the targets.

    Squared error is the default: with Huber's bounded gradient the few terminal transitions (target r, large
    error once Q overestimates) cannot outweigh the many bootstrapped ones, and on CartPole without reward
    clipping Q then drifts upwards without bound (measured: Q ~ 580 after 20k steps, where returns are <= 100).
    """
    chosen = jnp.take_along_axis(q_values, actions[:, None].astype(jnp.int32), axis=-1)[:, 0]
    error = targets - chosen
    loss = jnp.mean(optax.huber_loss(error, delta=huber_delta) if huber_delta > 0 else 0.5 * jnp.square(error))
    return loss, {"loss": loss, "q_mean": chosen.mean(), "td_abs": jnp.abs(error).mean()}


@struct.dataclass
class DQNState:
    train_state: TrainState
    target_params: Any
    buffer: replay.ReplayBuffer
    env_state: Any
    obs: jax.Array
    key: jax.Array
    iteration: jax.Array


class DQN(NamedTuple):
    config: DQNConfig
    network: QNetwork
    init: Callable[[jax.Array], DQNState]
    update: Callable[[DQNState], tuple[DQNState, dict]]
    run: Callable[[DQNState, int], tuple[DQNState, dict]]
    train: Callable[[jax.Array], tuple[DQNState, dict]]
    greedy_policy: Callable


def make_dqn(config: DQNConfig, env: Environment, env_params: Any = None) -> DQN:
    env_params = env.default_params if env_params is None else env_params
    action_space = env.action_space(env_params)
    if not isinstance(action_space, Discrete):
        raise ValueError(f"DQN needs a Discrete action space; {env.name} has {action_space!r}")
    num_actions = action_space.n
    obs_shape = tuple(env.observation_space(env_params).shape)
    train_env = EpisodeStats(AutoReset(env))
    network = QNetwork(num_actions, (config.hidden_size,) * config.num_layers)
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.learning_rate))
    decay_iterations = max(1, int(config.exploration_fraction * config.num_iterations))
    epsilon_schedule = optax.linear_schedule(config.epsilon_start, config.epsilon_end, decay_iterations)

    def epsilon_greedy(params_and_epsilon, obs, key):
        params, epsilon = params_and_epsilon
        key_explore, key_random = jax.random.split(key)
        greedy = jnp.argmax(network.apply(params, obs), axis=-1)
        random = jax.random.randint(key_random, greedy.shape, 0, num_actions)
        explore = jax.random.uniform(key_explore, greedy.shape) < epsilon
        return jnp.where(explore, random, greedy), {}

    def greedy_policy(params, obs, key):
        return jnp.argmax(network.apply(params, obs), axis=-1), {}

    def init(key):
        key_net, key_env, key_run = jax.random.split(key, 3)
        params = network.init(key_net, jnp.zeros((1,) + obs_shape, jnp.float32))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        obs, env_state = reset_envs(train_env, env_params, key_env, config.num_envs)
        item = {"obs": obs[0], "action": jnp.zeros((), jnp.int32), "reward": jnp.zeros(()),
                "discount": jnp.zeros(()), "next_obs": obs[0]}
        return DQNState(train_state, params, replay.init(item, config.buffer_size), env_state, obs, key_run,
                        jnp.zeros((), jnp.int32))

    def loss_fn(params, target_params, batch):
        next_q_target = network.apply(target_params, batch["next_obs"])
        next_q_online = network.apply(params, batch["next_obs"]) if config.double_q else None
        targets = q_learning_targets(batch["reward"], batch["discount"], next_q_target, next_q_online)
        return dqn_loss(network.apply(params, batch["obs"]), batch["action"], targets, config.huber_delta)

    def learn(train_state, target_params, buffer, key):
        batch = replay.sample(buffer, key, config.batch_size)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(train_state.params, target_params, batch)
        return train_state.apply_gradients(grads=grads), metrics

    def skip(train_state, target_params, buffer, key):
        zero = jnp.zeros(())
        return train_state, {"loss": zero, "q_mean": zero, "td_abs": zero}

    def update(state: DQNState):
        key, key_step, key_learn = jax.random.split(state.key, 3)
        epsilon = epsilon_schedule(state.iteration)
        (env_state, obs), tr = rollout(train_env, env_params, epsilon_greedy, (state.train_state.params, epsilon),
                                       state.env_state, state.obs, key_step, 1)
        items = {"obs": tr.obs[0], "action": tr.action[0].astype(jnp.int32), "reward": tr.reward[0],
                 "discount": config.gamma * (1.0 - tr.terminated[0].astype(jnp.float32)),
                 "next_obs": tr.next_obs[0]}
        buffer = replay.add(state.buffer, items)
        iteration = state.iteration + 1
        ready = (buffer.size >= config.learning_starts) & (iteration % config.train_frequency == 0)
        train_state, metrics = jax.lax.cond(ready, learn, skip, state.train_state, state.target_params, buffer,
                                            key_learn)
        target_params = jax.tree_util.tree_map(
            lambda online, target: jnp.where(iteration % config.target_update_interval == 0, online, target),
            train_state.params, state.target_params)
        metrics = dict(metrics, epsilon=epsilon, env_steps=iteration * config.num_envs,
                       **completed_episode_stats(tr))
        return DQNState(train_state, target_params, buffer, env_state, obs, key, iteration), metrics

    def run(state: DQNState, num_iterations: int):
        return jax.lax.scan(lambda s, _: update(s), state, None, length=num_iterations)

    def train(key):
        return run(init(key), config.num_iterations)

    return DQN(config, network, init, update, run, train, greedy_policy)


def make_train(config: DQNConfig, env: Environment, env_params: Any = None) -> Callable:
    """PureJaxRL-style: `jax.jit(make_train(cfg, env))(key)` -> (DQNState, per-iteration metrics)."""
    return make_dqn(config, env, env_params).train
