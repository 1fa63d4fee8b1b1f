"""Deep Q-Networks (Mnih et al. 2015, "Human-level control through deep reinforcement learning") with double Q-learning
(van Hasselt, Guez & Silver 2016), PureJaxRL-style: `make_train(config, env)` returns `train(key)`, one jitted scan.
`make_learner` is the environment-independent half (network, optimizer, exploration, one iteration's learning),
which `rl.experiments.dqn_gymnasium` drives on host-side gymnasium environments.

Each iteration steps `num_envs` auto-resetting environments once with an epsilon-greedy policy (epsilon decays
linearly), adds the transitions to a uniform replay buffer (`rl.replay`), and, once `learning_starts` steps are
stored, takes one Adam step on a minibatch every `train_frequency` iterations; the target network is copied from
the online one every `target_update_interval` iterations. Time-limit truncations bootstrap from the pre-reset next
observation; only terminations cut the bootstrap (see `rl.returns`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from rl import replay
from rl.env import Discrete, Environment
from rl.networks import QNetwork
from rl.rollout import Transition, completed_episode_stats, reset_envs, rollout, scan_updates
from rl.wrappers import AutoReset, EpisodeStats


@dataclasses.dataclass(frozen=True)
class DQNConfig:
    """DQN hyper-parameters; one iteration steps every environment once."""

    num_envs: int = 8  # environments stepped side by side (each reset when its episode ends)
    total_timesteps: int = 100_000  # environment steps of the run; iterations = this // num_envs
    buffer_size: int = 10_000  # replay capacity in transitions (the oldest are overwritten)
    batch_size: int = 64  # transitions per Adam step, drawn uniformly with replacement from the replay buffer
    learning_rate: float = 1e-3  # Adam's step size
    gamma: float = 0.99  # discount per environment step
    epsilon_start: float = 1.0  # exploration rate at the first iteration
    epsilon_end: float = 0.05  # exploration rate after the linear decay
    exploration_fraction: float = 0.3  # fraction of the iterations over which epsilon decays linearly
    learning_starts: int = 1_000  # stored transitions before the first Adam step
    train_frequency: int = 1  # iterations between Adam steps
    target_update_interval: int = 50  # iterations between copies of the online network into the target network
    double_q: bool = True  # double DQN's target (van Hasselt et al. 2016): the online network picks a*
    huber_delta: float = 0.0  # Huber loss threshold; 0 is squared error (see dqn_loss for why it is the default)
    max_grad_norm: float = 10.0  # gradients are clipped to this global norm before each Adam step
    hidden_size: int = 64  # width of every hidden layer of the Q-network
    num_layers: int = 2  # hidden layers of the Q-network

    def __post_init__(self):
        for name in ("num_envs", "buffer_size", "batch_size", "train_frequency", "target_update_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"dqn.{name} must be positive, got {getattr(self, name)!r}")
        if self.buffer_size < self.num_envs:
            raise ValueError(f"dqn.buffer_size={self.buffer_size} must hold at least one step of all "
                             f"dqn.num_envs={self.num_envs} environments")
        for name in ("gamma", "epsilon_start", "epsilon_end", "exploration_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"dqn.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.learning_starts < 0 or self.huber_delta < 0:
            raise ValueError(f"dqn.learning_starts and dqn.huber_delta must be >= 0, got {self.learning_starts!r}, "
                             f"{self.huber_delta!r}")
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


class Learner(NamedTuple):
    """The environment-independent half of DQN: the Q-network, the optimizer, the exploration schedule and one
    iteration's learning from one step of N environments. `make_dqn` runs it on a JAX environment inside one
    jitted scan; `rl.experiments.dqn_gymnasium` on transitions that `GymnasiumDriver` collects on the host."""

    config: DQNConfig
    network: QNetwork
    tx: optax.GradientTransformation
    epsilon: Callable  # epsilon(iteration) -> the exploration rate of that iteration (linear decay)
    epsilon_greedy: Callable  # epsilon_greedy((params, epsilon), obs, key) -> (action, {})
    greedy_policy: Callable  # greedy_policy(params, obs, key) -> (argmax action, {})
    init: Callable  # init(key, example_obs) -> (train_state, target_params, empty replay buffer)
    observe: Callable  # observe(train_state, target_params, buffer, transitions, iteration, key) -> (..., metrics)


def make_learner(config: DQNConfig, num_actions: int) -> Learner:
    """DQN's pieces for `num_actions` actions. `observe` stores one step of transitions ([1, N] time-major, as a
    rollout returns them) taken at `iteration`, takes one Adam step on a replay minibatch once `learning_starts`
    items are stored (every `train_frequency` iterations) and copies the online network into the target network
    every `target_update_interval` iterations."""
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

    def init(key, example_obs):
        params = network.init(key, jnp.zeros((1,) + tuple(example_obs.shape), jnp.float32))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        item = {"obs": example_obs, "action": jnp.zeros((), jnp.int32), "reward": jnp.zeros(()),
                "discount": jnp.zeros(()), "next_obs": example_obs}
        return train_state, params, replay.init(item, config.buffer_size)

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

    def observe(train_state, target_params, buffer, tr: Transition, iteration, key):
        # Only terminations cut the bootstrap: at a time-limit truncation next_obs is the final observation.
        items = {"obs": tr.obs[0], "action": tr.action[0].astype(jnp.int32), "reward": tr.reward[0],
                 "discount": config.gamma * (1.0 - tr.terminated[0].astype(jnp.float32)),
                 "next_obs": tr.next_obs[0]}
        buffer = replay.add(buffer, items)
        iteration = iteration + 1
        ready = (buffer.size >= config.learning_starts) & (iteration % config.train_frequency == 0)
        train_state, metrics = jax.lax.cond(ready, learn, skip, train_state, target_params, buffer, key)
        target_params = jax.tree_util.tree_map(
            lambda online, target: jnp.where(iteration % config.target_update_interval == 0, online, target),
            train_state.params, target_params)
        metrics = dict(metrics, learned=ready.astype(jnp.float32), epsilon=epsilon_schedule(iteration - 1),
                       env_steps=iteration * tr.obs.shape[1], **completed_episode_stats(tr))
        return train_state, target_params, buffer, metrics

    return Learner(config, network, tx, epsilon_schedule, epsilon_greedy, greedy_policy, init, observe)


class DQN(NamedTuple):
    config: DQNConfig
    network: QNetwork
    init: Callable[[jax.Array], DQNState]
    update: Callable[[DQNState], tuple[DQNState, dict]]
    run: Callable[[DQNState, int], tuple[DQNState, dict]]
    train: Callable[[jax.Array], tuple[DQNState, dict]]
    greedy_policy: Callable


def make_dqn(config: DQNConfig, env: Environment, env_params: Any = None) -> DQN:
    """DQN on a JAX environment: the learner's `observe` after each one-step rollout of `num_envs` auto-resetting
    copies of `env` (wrapped in EpisodeStats(AutoReset(env)))."""
    env_params = env.default_params if env_params is None else env_params
    action_space = env.action_space(env_params)
    if not isinstance(action_space, Discrete):
        raise ValueError(f"DQN needs a Discrete action space; {env.name} has {action_space!r}")
    train_env = EpisodeStats(AutoReset(env))
    learner = make_learner(config, action_space.n)

    def init(key):
        key_net, key_env, key_run = jax.random.split(key, 3)
        obs, env_state = reset_envs(train_env, env_params, key_env, config.num_envs)
        train_state, target_params, buffer = learner.init(key_net, obs[0])
        return DQNState(train_state, target_params, buffer, env_state, obs, key_run, jnp.zeros((), jnp.int32))

    def update(state: DQNState):
        key, key_step, key_learn = jax.random.split(state.key, 3)
        epsilon = learner.epsilon(state.iteration)
        (env_state, obs), tr = rollout(train_env, env_params, learner.epsilon_greedy,
                                       (state.train_state.params, epsilon), state.env_state, state.obs, key_step, 1)
        train_state, target_params, buffer, metrics = learner.observe(
            state.train_state, state.target_params, state.buffer, tr, state.iteration, key_learn)
        return DQNState(train_state, target_params, buffer, env_state, obs, key, state.iteration + 1), metrics

    run = functools.partial(scan_updates, update)  # run(state, num_iterations)

    def train(key):
        return run(init(key), config.num_iterations)

    return DQN(config, learner.network, init, update, run, train, learner.greedy_policy)


def make_train(config: DQNConfig, env: Environment, env_params: Any = None) -> Callable:
    """PureJaxRL-style: `jax.jit(make_train(cfg, env))(key)` -> (DQNState, per-iteration metrics)."""
    return make_dqn(config, env, env_params).train
