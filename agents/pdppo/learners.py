"""PPO and PDPPO on the lot-sizing env, PureJaxRL-style, as one learner with a switch, so the two arms share every
choice but the critic (Felizardo et al. 2025, "Post-Decision Proximal Policy Optimization with Dual Critic
Networks"; PPO: Schulman et al. 2017, arXiv 1707.06347).

Shared by both arms: one actor MLP whose output is one categorical per machine over {idle, item 1..I}; the
clipped surrogate takes one ratio per machine (`surrogate="per_machine"`, the authors' code) or one ratio of the
joint action (`"joint"`; `learner_loss` says why the default is per machine); whole-episode rollouts (num_steps a
multiple of the horizon, every env starts at t = 0), so Monte-Carlo returns R_t = sum_k gamma^k r_{t+k} are
exact and need no bootstrap; returns z-normalised over the batch (as in the paper); `update_epochs` passes of
clipped-surrogate updates (eq. 7 of Schulman et al.) with an entropy bonus; one optimiser, Adam with decoupled
weight decay, global-norm gradient clipping and separate actor / critic learning rates, applied to every parameter
of every network.

The two confounds of the authors' public code are off by default and exist only to show what they did:
`confounded=True` (a) trains only the actor's output layer (its hidden layers keep their initial weights; the
critics train in full) and (b) gives weight decay (`weight_decay`) and global-norm clipping (`max_grad_norm`) to
the PDPPO arm only; the PPO arm then gets neither. With `confounded=False` both arms get both.

The arms differ in the critic only:
  PPO:    V(s);                        estimate E = V(s)
  PDPPO:  V(s) and V_post(s^x) on the post-decision observation;  E = min(V(s), V_post(s^x))
(`make_learner(..., combine=f)` replaces the minimum by another combination f(V, V_post), e.g. the mean.)
Advantage A_t = R_t - E_t (E held fixed: no gradient through the advantage), value loss mean((E - R)^2): the
paper's advantage and value target for PDPPO, and their one-critic reduction for PPO.

`make_learner(config, instance)` returns `init(key) -> runner state` and `update(state) -> (state, metrics)`, pure
and jittable; `make_trainer` hands them to `rl.harness`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from agents.pdppo.env import LotSizing, observation
from agents.pdppo.instances import Instance
from rl import harness
from rl.networks import MLP
from rl.ppo import shuffled_minibatch_epochs
from rl.returns import monte_carlo_returns
from rl.rollout import completed_episode_stats, reset_envs, rollout
from rl.wrappers import AutoReset, EpisodeStats

ALGORITHMS = ("ppo", "pdppo")
SURROGATES = ("per_machine", "joint")
CRITIC_LOSSES = ("min", "each")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Hyper-parameters shared by both arms (defaults: the paper's set-up, Felizardo et al. 2025; docs/agents.md)."""

    algorithm: str = "pdppo"  # "pdppo" (critics V(s) and V_post(s^x), their minimum) or "ppo" (V(s) alone)
    num_envs: int = 40  # environments stepped in parallel (vmapped)
    num_steps: int = 100  # per env and update: whole episodes (a multiple of the horizon)
    total_timesteps: int = 1_000_000  # environment steps per run (the paper's budget is 1M)
    update_epochs: int = 60  # passes over each update's batch
    num_minibatches: int = 1  # minibatches per pass (num_envs * num_steps must divide)
    actor_learning_rate: float = 5.5e-4  # Adam step size of the actor
    critic_learning_rate: float = 1e-3  # Adam step size of the critic(s)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay, both arms (only PDPPO's when confounded)
    max_grad_norm: float = 0.5  # global-norm gradient clipping, both arms (only PDPPO's when confounded)
    clip_eps: float = 0.2  # PPO's ratio clip epsilon (Schulman et al. 2017, eq. 7)
    gamma: float = 0.99  # discount of the Monte-Carlo returns
    vf_coef: float = 0.5  # weight of the critics' squared error in the loss
    ent_coef: float = 0.012  # weight of the policy's entropy bonus
    normalize_returns: bool = True  # z-normalise each update's returns before they serve as targets
    actor_hidden: tuple[int, ...] = (128, 128)  # hidden widths of the actor MLP (one categorical per machine)
    critic_hidden: tuple[int, ...] = (128, 128)  # hidden widths of each critic MLP
    confounded: bool = False  # the authors' two confounds (module doc); never the fair comparison
    surrogate: str = "per_machine"  # "per_machine" (one clipped ratio per machine, the authors') or "joint"
    # z-normalise the advantages over each minibatch (not in the authors' code; `learner_loss` says why)
    normalize_advantages: bool = True
    # "min": the paper's MSE(min(V, V_post), R), which trains only the smaller critic; "each": both toward R
    critic_loss: str = "min"

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"learner.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"learner.surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        if self.critic_loss not in CRITIC_LOSSES:
            raise ValueError(f"learner.critic_loss must be one of {CRITIC_LOSSES}, got {self.critic_loss!r}")
        for name in ("num_envs", "num_steps", "update_epochs", "num_minibatches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"learner.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"learner.num_envs * learner.num_steps = {self.batch_size} must be divisible by "
                             f"learner.num_minibatches={self.num_minibatches}")
        if self.total_timesteps < self.batch_size:
            raise ValueError(f"learner.total_timesteps={self.total_timesteps} is less than one update's batch "
                             f"({self.batch_size})")
        for name in ("actor_learning_rate", "critic_learning_rate", "clip_eps", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"learner.{name} must be positive, got {getattr(self, name)!r}")
        if not 0.0 <= self.gamma <= 1.0 or self.weight_decay < 0 or self.vf_coef < 0 or self.ent_coef < 0:
            raise ValueError("learner.gamma must lie in [0, 1] and weight_decay, vf_coef, ent_coef be >= 0; got "
                             f"{self.gamma!r}, {self.weight_decay!r}, {self.vf_coef!r}, {self.ent_coef!r}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size


def policy_terms(logits: jax.Array, actions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log-probability [B, M], entropy [B, M]) of each machine's categorical; logits [B, M, C], actions [B, M].
    The joint action's log-probability and entropy are their sums over machines."""
    log_pi = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_pi, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1)
    return log_prob, entropy


def learner_loss(logits, estimate, actions, old_log_prob, returns, *, clip_eps: float, vf_coef: float,
                 ent_coef: float, surrogate: str = "per_machine", normalize_advantages: bool = False,
                 critic_values: tuple[jax.Array, ...] | None = None) -> tuple[jax.Array, dict]:
    """The shared objective on a minibatch: `estimate` is V(s) (PPO) or min(V(s), V_post(s^x)) (PDPPO), [B];
    `old_log_prob` [B, M] holds each machine's log-probability under the rollout policy.

        A = R - sg(E)
        joint:        r = prod_m pi_m(a_m|s) / pi_old,m(a_m|s),  H = sum_m H(pi_m)
                      L = -mean_b(min(r A, clip(r, 1 - eps, 1 + eps) A)) + vf_coef mean((E - R)^2) - ent_coef mean_b(H)
        per_machine:  r_m = pi_m(a_m|s) / pi_old,m(a_m|s)
                      L = -mean_{b,m}(min(r_m A, clip(r_m, 1 - eps, 1 + eps) A)) + vf_coef mean((E - R)^2)
                          - ent_coef mean_{b,m}(H(pi_m))

    "per_machine" is the authors' code (each machine's ratio clipped on its own, the entropy averaged over
    machines). The joint ratio is a product of M factors, so with ten machines it leaves the clip range after small
    per-machine changes and most samples stop contributing a policy gradient (README).

    `normalize_advantages` z-normalises A over the minibatch. The authors' code does not, but its observation has
    no time step, so its critic cannot explain the time-to-go part of the returns and its advantages stay of order
    one. Here time is observed (the horizon is finite, so the state needs it), the critic explains nearly all of
    the normalised returns, the raw advantages are a few hundredths, and the 0.012 entropy bonus then holds the
    policy near uniform (README).

    The value loss is the paper's mean((E - R)^2); through the minimum it trains only the smaller critic on each
    sample. Given `critic_values` (each critic's prediction, [B] each) it is instead sum_k mean((v_k - R)^2): every
    critic learns R on every sample (`critic_loss="each"`, an ablation; `critics.py` says why it is worth one).
    """
    log_prob, entropy = policy_terms(logits, actions)
    advantage = returns - jax.lax.stop_gradient(estimate)
    if normalize_advantages:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    if surrogate == "joint":
        log_prob, old_log_prob, entropy = log_prob.sum(-1), old_log_prob.sum(-1), entropy.sum(-1)
    elif surrogate == "per_machine":
        advantage, entropy = advantage[:, None], entropy.mean(-1)
    else:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    log_ratio = log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    surrogate_value = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantage)
    policy_loss = -jnp.mean(surrogate_value)
    if critic_values is None:
        value_loss = jnp.mean(jnp.square(estimate - returns))
    else:
        value_loss = sum(jnp.mean(jnp.square(v - returns)) for v in critic_values)
    loss = policy_loss + vf_coef * value_loss - ent_coef * jnp.mean(entropy)
    return loss, {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
                  "entropy": jnp.mean(entropy), "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
                  "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32))}


class Networks(NamedTuple):
    actor: MLP
    critic: MLP
    n_machines: int
    n_choices: int
    combine: Callable[[jax.Array, jax.Array], jax.Array] = jnp.minimum  # PDPPO's E from (V(s), V_post(s^x))

    def logits(self, params, obs):
        out = self.actor.apply(params["actor"], obs)
        return out.reshape(out.shape[:-1] + (self.n_machines, self.n_choices))

    def critic_values(self, params, obs, post_obs) -> tuple[jax.Array, ...]:
        """(V(s),) for PPO (params without "post_critic"), (V(s), V_post(s^x)) for PDPPO."""
        value = self.critic.apply(params["critic"], obs)[..., 0]
        if "post_critic" not in params:
            return (value,)
        return value, self.critic.apply(params["post_critic"], post_obs)[..., 0]

    def combined(self, values: tuple[jax.Array, ...]) -> jax.Array:
        """E from `critic_values`: V(s) for PPO, combine(V(s), V_post(s^x)) for PDPPO (the minimum unless the
        learner was made with another `combine`)."""
        return values[0] if len(values) == 1 else self.combine(*values)

    def estimate(self, params, obs, post_obs):
        return self.combined(self.critic_values(params, obs, post_obs))


def make_networks(config: LearnerConfig, instance: Instance, combine: Callable = jnp.minimum) -> Networks:
    choices = instance.n_items + 1
    actor = MLP(config.actor_hidden, instance.n_machines * choices, "relu", out_gain=0.01)
    critic = MLP(config.critic_hidden, 1, "tanh", out_gain=1.0)
    return Networks(actor, critic, instance.n_machines, choices, combine)


def actor_output_layer(config: LearnerConfig) -> str:
    """The flax name of the actor MLP's output layer (its hidden layers come first: Dense_0 ...)."""
    return f"Dense_{len(config.actor_hidden)}"


def parameter_labels(config: LearnerConfig, params) -> dict:
    """Each parameter's optimiser group: "actor", "critic", or "frozen" (the actor's hidden layers, only when
    `config.confounded`)."""
    def label(name, path):
        if name != "actor":
            return "critic"
        layer = path[1].key  # params["actor"]["params"][layer][kernel | bias]
        return "frozen" if config.confounded and layer != actor_output_layer(config) else "actor"

    return {name: jax.tree_util.tree_map_with_path(lambda path, _, name=name: label(name, path), sub)
            for name, sub in params.items()}


def make_optimizer(config: LearnerConfig, params) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW per network (actor / critics learning rates): the same in both arms
    unless `config.confounded` (module doc), which freezes the actor's hidden layers and keeps weight decay and
    clipping for the PDPPO arm only."""
    labels = parameter_labels(config, params)
    regularised = not config.confounded or config.algorithm == "pdppo"
    decay = config.weight_decay if regularised else 0.0
    groups = {"actor": optax.adamw(config.actor_learning_rate, weight_decay=decay),
              "critic": optax.adamw(config.critic_learning_rate, weight_decay=decay),
              "frozen": optax.set_to_zero()}
    # Frozen gradients are zeroed before the clip, so the norm that is clipped is that of the trained layers.
    frozen = jax.tree_util.tree_map(lambda group: group == "frozen", labels)
    chain = [optax.masked(optax.set_to_zero(), frozen)] if config.confounded else []
    chain += [optax.clip_by_global_norm(config.max_grad_norm)] if regularised else []
    return optax.chain(*chain, optax.multi_transform(groups, labels))


@struct.dataclass
class RunnerState:
    train_state: TrainState
    env_state: Any
    obs: jax.Array
    key: jax.Array
    update_step: jax.Array


class Learner(NamedTuple):
    config: LearnerConfig
    networks: Networks
    init: Callable[[jax.Array], RunnerState]
    update: Callable[[RunnerState], tuple[RunnerState, dict]]
    env_policy: Callable  # env_policy(params, greedy) -> policy(env_params, state, key) for env.episode_cost


def make_learner(config: LearnerConfig, instance: Instance, combine: Callable = jnp.minimum) -> Learner:
    """The learner of `config.algorithm` on `instance`; `combine(V, V_post)` is PDPPO's critic combination."""
    if config.num_steps % instance.horizon:
        raise ValueError(f"learner.num_steps={config.num_steps} must be a multiple of the instance's horizon "
                         f"({instance.horizon}) so that rollouts are whole episodes")
    env = LotSizing(instance)
    env_params = env.default_params
    train_env = EpisodeStats(AutoReset(env))
    networks = make_networks(config, instance, combine)
    obs_size = env.observation_space(env_params).shape[0]
    critics = ("critic", "post_critic") if config.algorithm == "pdppo" else ("critic",)

    def rollout_policy(params, obs, key):
        logits = networks.logits(params, obs)
        action = jax.random.categorical(key, logits).astype(jnp.int32)
        log_prob, _ = policy_terms(logits, action)
        return action, {"log_prob": log_prob}

    def init(key):
        # Four keys in both arms: with the same key, PPO and PDPPO start from the same actor, V(s) and envs.
        keys = jax.random.split(key, 4)
        dummy = jnp.zeros((1, obs_size), jnp.float32)
        params = {"actor": networks.actor.init(keys[0], dummy)}
        for name, k in zip(critics, keys[2:]):
            params[name] = networks.critic.init(k, dummy)
        train_state = TrainState.create(apply_fn=None, params=params, tx=make_optimizer(config, params))
        obs, env_state = reset_envs(train_env, env_params, keys[1], config.num_envs)
        return RunnerState(train_state, env_state, obs, jax.random.fold_in(key, 1), jnp.zeros((), jnp.int32))

    def loss_fn(params, batch):
        values = networks.critic_values(params, batch["obs"], batch["post_obs"])
        return learner_loss(networks.logits(params, batch["obs"]), networks.combined(values), batch["action"],
                            batch["log_prob"], batch["return"], clip_eps=config.clip_eps, vf_coef=config.vf_coef,
                            ent_coef=config.ent_coef, surrogate=config.surrogate,
                            normalize_advantages=config.normalize_advantages,
                            critic_values=values if config.critic_loss == "each" else None)

    def minibatch_step(train_state, batch):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(train_state.params, batch)
        return train_state.apply_gradients(grads=grads), metrics

    def update(state: RunnerState):
        key, key_rollout, key_epochs = jax.random.split(state.key, 3)
        (env_state, obs), tr = rollout(train_env, env_params, rollout_policy, state.train_state.params,
                                       state.env_state, state.obs, key_rollout, config.num_steps)
        returns = monte_carlo_returns(tr.reward, jnp.zeros_like(tr.reward), tr.terminated, tr.truncated,
                                      config.gamma)
        if config.normalize_returns:
            returns = (returns - returns.mean()) / (returns.std() + 1e-8)
        batch = {"obs": tr.obs, "post_obs": tr.info["post_observation"], "action": tr.action,
                 "log_prob": tr.extras["log_prob"], "return": returns}
        batch = jax.tree_util.tree_map(lambda x: x.reshape((config.batch_size,) + x.shape[2:]), batch)
        train_state, loss_metrics = shuffled_minibatch_epochs(minibatch_step, state.train_state, batch, key_epochs,
                                                              config.update_epochs, config.num_minibatches)
        metrics = {k: v.mean() for k, v in loss_metrics.items()}
        metrics["first_epoch_loss"] = loss_metrics["loss"][0].mean()
        metrics["last_epoch_loss"] = loss_metrics["loss"][-1].mean()
        episodes = completed_episode_stats(tr)
        metrics["episode_cost"] = -episodes["episode_return"]
        metrics["env_steps"] = (state.update_step + 1) * config.batch_size
        return RunnerState(train_state, env_state, obs, key, state.update_step + 1), metrics

    def env_policy(params, greedy: bool = False):
        def policy(env_params_, state, key):
            logits = networks.logits(params, observation(env_params_, state))
            return jnp.argmax(logits, -1) if greedy else jax.random.categorical(key, logits)

        return policy

    return Learner(config, networks, init, update, env_policy)


def make_trainer(config: LearnerConfig, instance: Instance) -> harness.Trainer:
    learner = make_learner(config, instance)

    def env_axes(state: RunnerState) -> RunnerState:
        return RunnerState(train_state=harness.REPLICATED, env_state=harness.env_batch(), obs=harness.env_batch(),
                           key=harness.REPLICATED, update_step=harness.REPLICATED)

    return harness.Trainer(init=learner.init, update=learner.update, num_updates=config.num_updates,
                           env_steps_per_update=config.batch_size, env_axes=env_axes)
