"""Proximal Policy Optimization (Schulman et al. 2017, arXiv 1707.06347) for discrete actions, PureJaxRL-style:
`make_train(config)` returns `train(key)`, the whole run (rollouts and updates) as one jitted lax.scan that can be
vmapped over seeds.

One update: roll out `num_envs` auto-resetting environments for `num_steps` steps (`rl.rollout`), compute GAE
advantages and value targets (`rl.returns`, bootstrapping from the pre-reset observation at time-limit truncations),
then `update_epochs` passes over the batch in `num_minibatches` shuffled minibatches of Adam steps on `ppo_loss`.

For progress bars and checkpoints between chunks, `make_ppo` exposes the pieces: `init(key)` builds the runner
state and `run(state, n)` does n updates in one scan; `train(key) == run(init(key), num_updates)`.
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

from rl.env import Discrete, Environment
from rl.networks import ActorCritic, categorical_sample_and_log_prob
from rl.returns import generalized_advantage_estimation, shifted_next_values
from rl.rollout import Transition, completed_episode_stats, reset_envs, rollout, scan_updates
from rl.wrappers import AutoReset, EpisodeStats


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters; one update consumes num_envs * num_steps environment steps."""

    num_envs: int = 16  # environments stepped side by side in every rollout (each reset when its episode ends)
    num_steps: int = 128  # steps per environment in one update's rollout
    total_timesteps: int = 262_144  # environment steps of the run; updates = this // (num_envs * num_steps)
    update_epochs: int = 4  # passes over each rollout batch, each in a fresh shuffled order
    num_minibatches: int = 4  # Adam steps per epoch, each on num_envs * num_steps / num_minibatches transitions
    learning_rate: float = 2.5e-3  # Adam's step size (the initial one with anneal_lr)
    anneal_lr: bool = True  # decay the learning rate linearly to 0 over all the run's Adam steps
    gamma: float = 0.99  # discount per environment step
    gae_lambda: float = 0.95  # GAE's lambda (Schulman et al. 2016): 0 one-step TD, 1 Monte-Carlo returns
    clip_eps: float = 0.2  # PPO's ratio clip epsilon (eq. 7), also the value clip with clip_value
    clip_value: bool = True  # clip the value loss around the rollout's values, as the authors' baselines code
    vf_coef: float = 0.5  # weight of the value loss in the total loss
    ent_coef: float = 0.01  # weight of the entropy bonus subtracted from the loss
    max_grad_norm: float = 0.5  # gradients are clipped to this global norm before each Adam step
    normalize_advantages: bool = True  # standardise the advantages over each minibatch
    bootstrap_truncation: bool = True  # a time-limit cut bootstraps from V(final obs); false: treated as a termination
    hidden_size: int = 64  # width of every hidden layer of the separate actor and critic MLPs
    num_layers: int = 2  # hidden layers of each of the actor and critic MLPs
    activation: str = "tanh"  # hidden activation of both MLPs: "tanh" or "relu"

    def __post_init__(self):
        for name in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "hidden_size", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ppo.{name} must be positive, got {getattr(self, name)!r}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"ppo.num_envs * ppo.num_steps = {self.batch_size} must be divisible by "
                             f"ppo.num_minibatches={self.num_minibatches}")
        if self.total_timesteps < self.batch_size:
            raise ValueError(f"ppo.total_timesteps={self.total_timesteps} is less than one update's batch "
                             f"(num_envs * num_steps = {self.batch_size})")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"ppo.gamma and ppo.gae_lambda must lie in [0, 1], got {self.gamma!r}, "
                             f"{self.gae_lambda!r}")
        if self.clip_eps <= 0:
            raise ValueError(f"ppo.clip_eps must be positive, got {self.clip_eps!r}")
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"ppo.activation must be 'tanh' or 'relu', got {self.activation!r}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


def ppo_loss(logits, values, actions, old_log_probs, old_values, advantages, targets, *, clip_eps: float,
             vf_coef: float, ent_coef: float, clip_value: bool = True,
             normalize_advantages: bool = True) -> tuple[jax.Array, dict]:
    """The PPO objective on a minibatch, from the network's outputs (logits [B, A], values [B]).

    Policy (Schulman et al. 2017, eq. 7), with r = pi(a|s) / pi_old(a|s):
        L_clip = -mean(min(r A, clip(r, 1 - eps, 1 + eps) A))
    Value (eq. 9's L_VF term), optionally clipped around the rollout's values as in the authors' baselines code:
        L_V = 0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))   or   0.5 mean((V - R)^2)
    Entropy bonus S = mean(H(pi(.|s))). Total: L_clip + vf_coef L_V - ent_coef S.
    With `normalize_advantages`, A is standardised over the minibatch first.

    Returns (loss, metrics) with the three terms, the approximate KL (mean of (r - 1) - log r, Schulman's k3
    estimator) and the fraction of clipped ratios.
    """
    log_pi = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_pi, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]
    log_ratio = log_prob - old_log_probs
    ratio = jnp.exp(log_ratio)
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages))
    value_error = jnp.square(values - targets)
    if clip_value:
        clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        value_error = jnp.maximum(value_error, jnp.square(clipped_values - targets))
    value_loss = 0.5 * jnp.mean(value_error)
    entropy = jnp.mean(-jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1))
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": entropy,
        "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)),
    }
    return loss, metrics


@struct.dataclass
class RunnerState:
    """Everything a PPO run carries from one update to the next."""

    train_state: TrainState
    env_state: Any
    obs: jax.Array
    key: jax.Array
    update_step: jax.Array


class PPO(NamedTuple):
    """The pieces of a PPO run on one environment (see the module docstring)."""

    config: PPOConfig
    env: Environment
    env_params: Any
    network: ActorCritic
    init: Callable[[jax.Array], RunnerState]
    update: Callable[[RunnerState], tuple[RunnerState, dict]]
    run: Callable[[RunnerState, int], tuple[RunnerState, dict]]
    train: Callable[[jax.Array], tuple[RunnerState, dict]]
    advantages: Callable  # advantages(params, transitions, last_obs) -> (GAE advantages, value targets)
    policy: Callable  # policy(params, obs, key) -> (action, {"log_prob", "value"})
    greedy_policy: Callable  # greedy_policy(params, obs, key) -> (argmax action, {})


class Learner(NamedTuple):
    """The environment-independent half of PPO: the network, the optimizer and the learning step from a rollout.
    `make_ppo` runs it on a JAX environment inside one jitted scan; `rl.experiments.ppo_gymnasium` on transitions
    that `GymnasiumDriver` collects on the host."""

    network: ActorCritic
    tx: optax.GradientTransformation
    policy: Callable  # policy(params, obs, key) -> (action, {"log_prob", "value"})
    greedy_policy: Callable  # greedy_policy(params, obs, key) -> (argmax action, {})
    advantages: Callable  # advantages(params, transitions, last_obs) -> (GAE advantages, value targets)
    learn: Callable  # learn(train_state, transitions, last_obs, key) -> (train_state, mean loss metrics)


def shuffled_minibatch_epochs(minibatch_step, train_state, batch, key, epochs: int, num_minibatches: int):
    """PPO's optimisation phase (Schulman et al. 2017, Algorithm 1: K epochs of minibatch SGD on the rollout):
    `epochs` passes over `batch` (leaves [B, ...]), each through a fresh permutation cut into `num_minibatches`
    equal minibatches and scanned by `minibatch_step(train_state, minibatch) -> (train_state, metrics)`.
    Returns (train_state, metrics stacked [epochs, num_minibatches]). Every PPO learner in rl/ and agents/ uses it."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    shape = (num_minibatches, size // num_minibatches)

    def epoch(train_state, key):
        order = jax.random.permutation(key, size)
        minibatches = jax.tree_util.tree_map(lambda x: x[order].reshape(shape + x.shape[1:]), batch)
        return jax.lax.scan(minibatch_step, train_state, minibatches)

    return jax.lax.scan(epoch, train_state, jax.random.split(key, epochs))


def make_learner(config: PPOConfig, num_actions: int) -> Learner:
    """PPO's network (an MLP actor-critic with `num_actions` logits), Adam with global-norm clipping (learning rate
    annealed linearly to 0 over the run when `anneal_lr`), and `learn`: GAE on a [T, N] rollout, then
    `update_epochs` passes over `num_minibatches` shuffled minibatches of `ppo_loss`."""
    network = ActorCritic(num_actions, (config.hidden_size,) * config.num_layers, config.activation)
    grad_steps = config.num_updates * config.update_epochs * config.num_minibatches
    learning_rate = (optax.linear_schedule(config.learning_rate, 0.0, grad_steps) if config.anneal_lr
                     else config.learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(learning_rate, eps=1e-5))

    def policy(params, obs, key):
        logits, value = network.apply(params, obs)
        action, log_prob = categorical_sample_and_log_prob(logits, key)
        return action, {"log_prob": log_prob, "value": value}

    def greedy_policy(params, obs, key):
        logits, _ = network.apply(params, obs)
        return jnp.argmax(logits, axis=-1), {}

    def advantages_and_targets(params, transitions: Transition, last_obs):
        """GAE over the rollout. With `bootstrap_truncation`, a time-limit truncation bootstraps from the value of
        the observation that ended the episode (before the auto-reset); without it, a truncation counts as a
        termination (the common simplification, biased low near the time limit)."""
        values = transitions.extras["value"]
        _, last_value = network.apply(params, last_obs)
        next_values = shifted_next_values(values, last_value)
        terminated = transitions.terminated
        if config.bootstrap_truncation:
            _, final_values = network.apply(params, transitions.next_obs)
            next_values = jnp.where(transitions.truncated, final_values, next_values)
        else:
            terminated = jnp.logical_or(terminated, transitions.truncated)
        return generalized_advantage_estimation(transitions.reward, values, next_values, terminated,
                                                transitions.truncated, config.gamma, config.gae_lambda)

    def loss_fn(params, batch):
        logits, values = network.apply(params, batch["obs"])
        return ppo_loss(logits, values, batch["action"], batch["log_prob"], batch["value"], batch["advantage"],
                        batch["target"], clip_eps=config.clip_eps, vf_coef=config.vf_coef,
                        ent_coef=config.ent_coef, clip_value=config.clip_value,
                        normalize_advantages=config.normalize_advantages)

    def minibatch_step(train_state, batch):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(train_state.params, batch)
        return train_state.apply_gradients(grads=grads), metrics

    def learn(train_state, transitions: Transition, last_obs, key_epochs):
        advantages, targets = advantages_and_targets(train_state.params, transitions, last_obs)
        batch = {"obs": transitions.obs, "action": transitions.action, "log_prob": transitions.extras["log_prob"],
                 "value": transitions.extras["value"], "advantage": advantages, "target": targets}
        batch = jax.tree_util.tree_map(lambda x: x.reshape((config.batch_size,) + x.shape[2:]), batch)
        train_state, loss_metrics = shuffled_minibatch_epochs(minibatch_step, train_state, batch, key_epochs,
                                                              config.update_epochs, config.num_minibatches)
        return train_state, {k: v.mean() for k, v in loss_metrics.items()}

    return Learner(network, tx, policy, greedy_policy, advantages_and_targets, learn)


def make_ppo(config: PPOConfig, env: Environment, env_params: Any = None) -> PPO:
    """Build the PPO pieces for `env` (discrete actions). `env` is wrapped in EpisodeStats(AutoReset(env))."""
    env_params = env.default_params if env_params is None else env_params
    action_space = env.action_space(env_params)
    if not isinstance(action_space, Discrete):
        raise ValueError(f"PPO here supports Discrete action spaces; {env.name} has {action_space!r}")
    obs_shape = env.observation_space(env_params).shape
    train_env = EpisodeStats(AutoReset(env))
    learner = make_learner(config, action_space.n)

    def init(key):
        key_net, key_env, key_run = jax.random.split(key, 3)
        params = learner.network.init(key_net, jnp.zeros((1,) + tuple(obs_shape), jnp.float32))
        train_state = TrainState.create(apply_fn=learner.network.apply, params=params, tx=learner.tx)
        obs, env_state = reset_envs(train_env, env_params, key_env, config.num_envs)
        return RunnerState(train_state, env_state, obs, key_run, jnp.zeros((), jnp.int32))

    def update(state: RunnerState):
        key, key_rollout, key_epochs = jax.random.split(state.key, 3)
        (env_state, obs), transitions = rollout(train_env, env_params, learner.policy, state.train_state.params,
                                                state.env_state, state.obs, key_rollout, config.num_steps)
        train_state, metrics = learner.learn(state.train_state, transitions, obs, key_epochs)
        metrics.update(completed_episode_stats(transitions))
        metrics["env_steps"] = (state.update_step + 1) * config.batch_size
        return RunnerState(train_state, env_state, obs, key, state.update_step + 1), metrics

    run = functools.partial(scan_updates, update)  # run(state, num_updates)

    def train(key):
        return run(init(key), config.num_updates)

    return PPO(config, env, env_params, learner.network, init, update, run, train, learner.advantages,
               learner.policy, learner.greedy_policy)


def make_train(config: PPOConfig, env: Environment, env_params: Any = None) -> Callable:
    """PureJaxRL-style entry point: `train = jax.jit(make_train(cfg, env))`; `train(key)` -> (RunnerState, metrics
    with one entry per update); `jax.jit(jax.vmap(make_train(cfg, env)))(keys)` trains one agent per seed."""
    return make_ppo(config, env, env_params).train
