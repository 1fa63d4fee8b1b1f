"""PPO with the GraphSAGE actor-critic on the deceptive path-planning environment, for the RL harness.

PPO (Schulman et al. 2017, arXiv 1707.06347) PureJaxRL-style (Lu et al. 2022): one update rolls out `num_envs`
auto-resetting environments for `num_steps` steps (`rl.rollout.rollout`) over the whole padded train map set (every
reset draws a map and a budget), computes GAE (`rl.returns`) and runs `update_epochs` passes of `num_minibatches`
Adam steps on `rl.ppo.ppo_loss`. Illegal moves are masked inside the network (`network.MASKED_LOGIT`), so the
sampled, greedy and stored log-probabilities all see the same masked distribution.

The curriculum of Fatemi, Suttle and Sadler (AAMAS 2024): the deception bonus is scaled by the agent's running
goal-reach rate, so an agent that does not reach the goal yet is not paid for deceiving. The rate is carried in the
runner state (`reach_rate`, an exponential moving average with step `curriculum_step` of the fraction of the
episodes finished in a rollout that reached the goal, starting at 0) and enters the environment through
`EnvParams.deceptiveness` for the next rollout; with `curriculum=False` the coefficient is 1 throughout.

The environment ends every episode by termination (at G, or at T_max, which the agent observes), never by
truncation, so the GAE bootstrap needs only the shifted values and the value of the rollout's last observation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from agents.deceptive_paths.env import DeceptivePathEnv, EnvParams
from agents.deceptive_paths.network import GraphSAGEActorCritic
from rl import harness
from rl.networks import categorical_sample_and_log_prob
from rl.ppo import PPOConfig, ppo_loss, shuffled_minibatch_epochs
from rl.returns import generalized_advantage_estimation, shifted_next_values
from rl.rollout import completed_episode_stats, reset_envs, rollout
from rl.wrappers import AutoReset, EpisodeStats


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """The bonus curriculum of Fatemi, Suttle and Sadler (AAMAS 2024): see the module docstring."""

    enabled: bool = True  # scale the deception bonus by the running goal-reach rate; false: by 1 throughout
    step: float = 0.05  # step of the goal-reach rate's moving average, once per rollout, in (0, 1]

    def __post_init__(self):
        if not 0.0 < self.step <= 1.0:
            raise ValueError(f"curriculum.step must lie in (0, 1], got {self.step!r}")


@struct.dataclass
class RunnerState:
    train_state: TrainState
    env_state: Any
    obs: jax.Array
    key: jax.Array
    update_step: jax.Array
    reach_rate: jax.Array  # the curriculum coefficient's running goal-reach rate


class Learner(NamedTuple):
    network: GraphSAGEActorCritic
    init: Callable[[jax.Array], RunnerState]
    update: Callable[[RunnerState], tuple[RunnerState, dict]]
    policy: Callable  # (params, obs, key) -> (sampled action, {"log_prob", "value"})
    greedy_policy: Callable  # (params, obs, key) -> (argmax action, {})
    trainer: harness.Trainer


def make_network(ppo: PPOConfig, ego_radius: int) -> GraphSAGEActorCritic:
    return GraphSAGEActorCritic(ego_radius=ego_radius, hidden=ppo.hidden_size, num_layers=ppo.num_layers,
                                activation=ppo.activation)


def updated_reach_rate(rate, reached, done, step: float):
    """The moving average moved towards this rollout's reach rate; unchanged when no episode finished."""
    episodes = done.sum()
    batch_rate = reached.sum() / jnp.maximum(episodes, 1)
    return jnp.where(episodes > 0, (1.0 - step) * rate + step * batch_rate, rate).astype(jnp.float32)


def curriculum_coefficient(reach_rate, curriculum: CurriculumConfig):
    """The bonus scale of the next rollout: the running goal-reach rate, or 1 without the curriculum."""
    return reach_rate if curriculum.enabled else jnp.float32(1.0)


def make_learner(ppo: PPOConfig, env: DeceptivePathEnv, env_params: EnvParams,
                 curriculum: CurriculumConfig = CurriculumConfig()) -> Learner:
    network = make_network(ppo, env.ego_radius)
    train_env = EpisodeStats(AutoReset(env))
    obs_shape = env.observation_space(env_params).shape
    grad_steps = ppo.num_updates * ppo.update_epochs * ppo.num_minibatches
    learning_rate = optax.linear_schedule(ppo.learning_rate, 0.0, grad_steps) if ppo.anneal_lr else ppo.learning_rate
    tx = optax.chain(optax.clip_by_global_norm(ppo.max_grad_norm), optax.adam(learning_rate, eps=1e-5))

    def policy(params, obs, key):
        logits, value = network.apply(params, obs)
        action, log_prob = categorical_sample_and_log_prob(logits, key)
        return action, {"log_prob": log_prob, "value": value}

    def greedy_policy(params, obs, key):
        logits, _ = network.apply(params, obs)
        return jnp.argmax(logits, axis=-1), {}

    def init(key):
        key_net, key_env, key_run = jax.random.split(key, 3)
        params = network.init(key_net, jnp.zeros((1,) + tuple(obs_shape), jnp.float32))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        obs, env_state = reset_envs(train_env, env_params, key_env, ppo.num_envs)
        return RunnerState(train_state, env_state, obs, key_run, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def loss_fn(params, batch):
        logits, values = network.apply(params, batch["obs"])
        return ppo_loss(logits, values, batch["action"], batch["log_prob"], batch["value"], batch["advantage"],
                        batch["target"], clip_eps=ppo.clip_eps, vf_coef=ppo.vf_coef, ent_coef=ppo.ent_coef,
                        clip_value=ppo.clip_value, normalize_advantages=ppo.normalize_advantages)

    def minibatch_step(train_state, batch):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(train_state.params, batch)
        return train_state.apply_gradients(grads=grads), dict(metrics, grad_norm=optax.tree.norm(grads))

    def update(state: RunnerState):
        key, key_rollout, key_epochs = jax.random.split(state.key, 3)
        coefficient = curriculum_coefficient(state.reach_rate, curriculum)
        rollout_params = env_params.replace(deceptiveness=coefficient)
        train_state = state.train_state
        (env_state, obs), tr = rollout(train_env, rollout_params, policy, train_state.params, state.env_state,
                                       state.obs, key_rollout, ppo.num_steps)
        values = tr.extras["value"]
        _, last_value = network.apply(train_state.params, obs)
        advantages, targets = generalized_advantage_estimation(
            tr.reward, values, shifted_next_values(values, last_value), tr.terminated, tr.truncated, ppo.gamma,
            ppo.gae_lambda)
        batch = {"obs": tr.obs, "action": tr.action, "log_prob": tr.extras["log_prob"], "value": values,
                 "advantage": advantages, "target": targets}
        batch = jax.tree_util.tree_map(lambda x: x.reshape((ppo.batch_size,) + x.shape[2:]), batch)
        train_state, loss_metrics = shuffled_minibatch_epochs(minibatch_step, train_state, batch, key_epochs,
                                                              ppo.update_epochs, ppo.num_minibatches)
        done = tr.done
        reached = tr.info["reached_goal"] & done
        metrics = {k: v.mean() for k, v in loss_metrics.items()}
        metrics.update(completed_episode_stats(tr))
        metrics["goal_reach_rate"] = jnp.where(done.sum() > 0, reached.sum() / jnp.maximum(done.sum(), 1), jnp.nan)
        metrics["deceptiveness"] = coefficient
        metrics["bonus_per_step"] = (tr.info["bonus"] * ~tr.info["revisit"]).mean()
        metrics["env_steps"] = (state.update_step + 1) * ppo.batch_size
        reach_rate = updated_reach_rate(state.reach_rate, reached, done, curriculum.step)
        return RunnerState(train_state, env_state, obs, key, state.update_step + 1, reach_rate), metrics

    def env_axes(state: RunnerState) -> RunnerState:
        rep, envs = harness.REPLICATED, harness.env_batch(0)
        return RunnerState(train_state=rep, env_state=envs, obs=envs, key=rep, update_step=rep, reach_rate=rep)

    def postfix(records: list[dict]) -> dict:
        last = records[-1]
        reach = last.get("goal_reach_rate")
        return {"reach": "-" if reach is None else f"{reach:.2f}", "coef": f"{last['deceptiveness']:.2f}"}

    trainer = harness.Trainer(init=init, update=update, num_updates=ppo.num_updates,
                              env_steps_per_update=ppo.batch_size, env_axes=env_axes, postfix=postfix)
    return Learner(network, init, update, policy, greedy_policy, trainer)
