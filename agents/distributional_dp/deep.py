"""Agent (a), deep: a QR-DQN-style network with the stock as input, acting greedily w.r.t. the objective.

Avila Pires et al. 2025, "Optimizing Return Distributions with Distributional Dynamic Programming" (JMLR; arXiv
2501.13028), Section 6 (deep agents): distributional value iteration with the state augmented by the stock,
approximated with a quantile head (Dabney et al. 2018, "Distributional Reinforcement Learning with Quantile
Regression", QR-DQN), a target network and replay (Mnih et al. 2015).

Stock augmentation (gamma = 1): the observation carries the stock c_t, c_{t+1} = c_t + r_t, so the final stock is
c_H = c_0 + G. The network outputs N quantiles theta_i(s, c, a) of the return-to-go G_t; the law of the final stock
from (s, c) is approximated by c + theta_i(s, c, a), i = 1..N (levels tau_i = (2i - 1) / 2N). An objective is an
expected utility K(eta) = E f(X) of the final stock, estimated as

    score(s, c, a) = (1 / N) sum_i f(c + theta_i(s, c, a)),

and both the acting action and the bootstrap action are argmax_a score (not argmax_a mean_i theta_i, which is
what QR-DQN and rlax.quantile_q_learning use). The quantile TD target is the stock-augmented distributional Bellman
target r + theta_target_j(s', c + r, a*) (0 after the terminal step), regressed by the quantile Huber loss.
Utilities (`UTILITIES`):

  mean   f(x) = x: risk-neutral; with the stock input masked this is exactly QR-DQN (the baseline).
  cvar   f(x) = min(x, 0) + tie_break * x: with c_0 = -b, E min(c_0 + G, 0) is Bauerle & Ott's inner problem of
         CVaR_alpha(G) = max_b b + E min(G - b, 0) / alpha; one network trained over a range of c_0 serves every b.
         The small mean term only breaks ties between actions with (numerically) no shortfall, e.g. between the
         shortest safe path and a detour that still ends at c_H >= 0.
  band   f(x) = clip(2 (w + 1 - |x|), 0, 1) - tie_break * |x|: on the integers the first term is 1{|x| <= w}, so
         E f is the homeostatic probability P(|c_0 + G| <= w) (with c_0 = -m: P(|G - m| <= w), one network for every
         target m); between the integers it is 1 up to |x| = w + 1/2 and falls linearly to 0 at w + 1, so quantile
         errors below 1/2 do not change it and larger ones change it gradually rather than by a jump. The
         deviation term breaks ties (e.g. between actions that all miss the band) towards the band.

A researcher's own objective needs no edit here: `make_agent(..., utility=f)` scores actions by
mean_i f(c + theta_i(s, c, a)) for any elementwise JAX utility f of the final stock (the spec's utility is then
ignored; its stock mask still applies), e.g. the expectile's f at a level found by an initial-stock sweep.

`StockAugmented` wraps any functional environment (observation = inner observation + [c_t]; c_0 drawn uniformly
from an integer range at reset). `make_agent` builds a PureJaxRL-style agent: `run(state, n)` is one lax.scan of n
iterations, each stepping `num_envs` vmapped environments once (epsilon-greedy w.r.t. the score), adding the
transitions to replay and taking one Adam step; the agent's `AgentSpec` (utility, stock mask, band width) lives in
its state, so several agents (e.g. CVaR, homeostatic and the QR-DQN baseline) train side by side under one
`jax.vmap`.
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
from rl.distributional import quantile_huber_loss
from rl.env import Box, Discrete, Environment
from rl.networks import DistributionalQNetwork
from rl.rollout import completed_episode_stats, reset_envs, rollout, scan_updates
from rl.wrappers import AutoReset, EpisodeStats, Wrapper

UTILITIES = ("mean", "cvar", "band")


# ---------------------------------------------------------------------------------------------------------------
# The stock-augmented environment.


@struct.dataclass
class StockParams:
    env: Any
    c0_low: Any  # initial stock drawn uniformly from the integers c0_low..c0_high
    c0_high: Any


@struct.dataclass
class StockState:
    env_state: Any
    stock: jax.Array  # c_t


class StockAugmented(Wrapper):
    """Augment the observation with the stock: obs = concat(inner obs, [c_t]), c_{t+1} = c_t + r_t (gamma = 1).

    c_0 is drawn uniformly from the integers [c0_low, c0_high] at reset (set both equal for a fixed c_0). The last
    observation entry is the raw stock (agents scale it themselves); `info["stock"]` is c_{t+1}.
    """

    def __init__(self, env: Environment, c0_low: int = 0, c0_high: int = 0):
        super().__init__(env)
        self._c0 = (int(c0_low), int(c0_high))

    @property
    def default_params(self) -> StockParams:
        return StockParams(self.env.default_params, *self._c0)

    def params_for(self, env_params, c0_low: int, c0_high: int | None = None) -> StockParams:
        c0_high = c0_low if c0_high is None else c0_high
        if c0_high < c0_low:
            raise ValueError(f"StockAugmented needs c0_low <= c0_high; got {c0_low}, {c0_high}")
        return StockParams(env_params, c0_low, c0_high)

    def reset(self, key, params: StockParams):
        key_env, key_stock = jax.random.split(key)
        obs, state = self.env.reset(key_env, params.env)
        stock = jax.random.randint(key_stock, (), params.c0_low, params.c0_high + 1).astype(jnp.float32)
        return self._obs(obs, stock), StockState(state, stock)

    def step(self, key, state: StockState, action, params: StockParams):
        obs, env_state, reward, done, info = self.env.step(key, state.env_state, action, params.env)
        stock = state.stock + reward
        return self._obs(obs, stock), StockState(env_state, stock), reward, done, dict(info, stock=stock)

    @staticmethod
    def _obs(obs, stock):
        return jnp.concatenate([obs.astype(jnp.float32), stock[None]])

    def observation_space(self, params: StockParams) -> Box:
        inner = self.env.observation_space(params.env)
        return Box(low=-jnp.inf, high=jnp.inf, shape=(inner.shape[0] + 1,), dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Objective scores, greedy actions and the quantile TD target (pure functions on arrays).


@struct.dataclass
class AgentSpec:
    """What distinguishes one agent from another trained beside it (arrays, so specs can be vmapped).

    utility: index into UTILITIES; use_stock: 1.0 feeds the stock to the network, 0.0 masks it (QR-DQN);
    band_width: w of the band utility."""

    utility: jax.Array
    use_stock: jax.Array
    band_width: jax.Array

    @classmethod
    def make(cls, utility: str, use_stock: bool = True, band_width: float = 0.0) -> "AgentSpec":
        if utility not in UTILITIES:
            raise ValueError(f"utility must be one of {UTILITIES}; got {utility!r}")
        return cls(jnp.asarray(UTILITIES.index(utility), jnp.int32), jnp.asarray(float(use_stock), jnp.float32),
                   jnp.asarray(band_width, jnp.float32))


def objective_scores(quantiles: jax.Array, stock: jax.Array, spec: AgentSpec, tie_break: float = 1e-3) -> jax.Array:
    """score[..., a] = mean_i f(stock + quantiles[..., a, i]) for the spec's utility f (module docstring).

    quantiles [..., A, N] of the return-to-go; stock [...] the current c_t. Returns [..., A]."""
    final = stock[..., None, None] + quantiles
    mean = final.mean(-1)
    cvar = jnp.minimum(final, 0.0).mean(-1) + tie_break * mean
    inside = jnp.clip(2.0 * (spec.band_width + 1.0 - jnp.abs(final)), 0.0, 1.0)
    band = inside.mean(-1) - tie_break * jnp.abs(final).mean(-1)
    return jnp.where(spec.utility == 0, mean, jnp.where(spec.utility == 1, cvar, band))


def greedy_actions(quantiles: jax.Array, stock: jax.Array, spec: AgentSpec, tie_break: float = 1e-3) -> jax.Array:
    """argmax_a of objective_scores: [..., A, N] -> [...]."""
    return jnp.argmax(objective_scores(quantiles, stock, spec, tie_break), axis=-1)


def utility_scores(utility: Callable[[jax.Array], jax.Array], quantiles: jax.Array, stock: jax.Array) -> jax.Array:
    """score[..., a] = mean_i f(stock + quantiles[..., a, i]) for an elementwise utility f of the final stock.

    quantiles [..., A, N] of the return-to-go; stock [...] the current c_t. Returns [..., A]."""
    return utility(stock[..., None, None] + quantiles).mean(-1)


def quantile_td_target(rewards: jax.Array, terminated: jax.Array, next_quantiles: jax.Array,
                       next_actions: jax.Array) -> jax.Array:
    """The stock-augmented quantile TD target T theta_j = r + (1 - terminated) theta_j(s', c + r, a*), gamma = 1.

    Equivalently c + T theta_j = (c + r) + theta_j(s', c + r, a*): the final-stock distribution at (s, c) is the one
    at the next augmented state, no shift or projection needed (Avila Pires et al. 2025, Section 4).
    rewards, terminated [B]; next_quantiles [B, A, N] (target network); next_actions [B] (argmax of the score).
    Returns [B, N], without gradient."""
    chosen = jnp.take_along_axis(next_quantiles, next_actions[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    keep = 1.0 - terminated.astype(chosen.dtype)
    return jax.lax.stop_gradient(rewards[:, None] + keep[:, None] * chosen)


# ---------------------------------------------------------------------------------------------------------------
# The agent.


@dataclasses.dataclass(frozen=True)
class DeepDDPConfig:
    num_envs: int = 32  # vmapped environments, each stepped once per iteration (epsilon-greedy)
    total_timesteps: int = 300_000  # environment steps per agent; iterations = this // num_envs
    buffer_size: int = 50_000  # replay capacity in transitions (the oldest are overwritten)
    batch_size: int = 128  # transitions per gradient step, drawn uniformly with replacement from the replay
    learning_rate: float = 1e-3  # Adam's initial step size
    learning_rate_end: float = 1e-3  # linear decay to this over the gradient steps
    epsilon_start: float = 1.0  # exploration probability at the first iteration
    epsilon_end: float = 0.05  # exploration probability after the linear decay, kept to the end
    exploration_fraction: float = 0.4  # share of the iterations over which epsilon decays linearly
    learning_starts: int = 2_000  # no gradient step until the replay holds this many transitions
    train_frequency: int = 1  # one gradient step every this many iterations
    target_update_interval: int = 100  # the target network copies the online one every this many iterations
    double_q: bool = True  # the online network picks the bootstrap action, the target network scores it
    num_quantiles: int = 32  # N, quantiles of the return-to-go per action (levels (2i - 1) / 2N; QR-DQN)
    kappa: float = 1.0  # quantile Huber threshold: quadratic below, linear above (Dabney et al. 2018, eq. 10)
    hidden_size: int = 128  # width of every hidden layer of the quantile network
    num_layers: int = 2  # hidden layers of the quantile network
    stock_scale: float = 10.0  # the network sees the stock c_t divided by this
    tie_break: float = 1e-3  # weight of the mean (cvar) or -|x| (band) term that breaks ties between actions
    max_grad_norm: float = 10.0  # gradients are clipped to this global norm before each Adam step

    def __post_init__(self):
        for name in ("num_envs", "buffer_size", "batch_size", "train_frequency", "target_update_interval",
                     "num_quantiles", "hidden_size", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"deep.{name} must be positive, got {getattr(self, name)!r}")
        if self.total_timesteps < self.num_envs:
            raise ValueError(f"deep.total_timesteps={self.total_timesteps} < deep.num_envs={self.num_envs}")
        if self.buffer_size < self.num_envs:
            raise ValueError(f"deep.buffer_size={self.buffer_size} must hold one step of deep.num_envs="
                             f"{self.num_envs} environments")
        if not self.stock_scale > 0:
            raise ValueError(f"deep.stock_scale must be positive, got {self.stock_scale!r}")

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.num_envs


@struct.dataclass
class DeepState:
    train_state: TrainState
    target_params: Any
    buffer: replay.ReplayBuffer
    env_state: Any
    obs: jax.Array
    key: jax.Array
    iteration: jax.Array
    spec: AgentSpec


class DeepAgent(NamedTuple):
    config: DeepDDPConfig
    network: DistributionalQNetwork
    env: Environment  # EpisodeStats(AutoReset(StockAugmented(...))) as trained
    quantiles: Callable  # (params, spec, obs [..., D]) -> [..., A, N]
    greedy_policy: Callable  # PolicyFn with policy_params (params, spec)
    init: Callable  # (key, spec) -> DeepState
    update: Callable  # DeepState -> (DeepState, metrics)
    run: Callable  # (DeepState, n) -> (DeepState, metrics [n])


def make_agent(config: DeepDDPConfig, env: StockAugmented, env_params: StockParams,
               utility: Callable[[jax.Array], jax.Array] | None = None) -> DeepAgent:
    """A stock-augmented quantile agent on `env` (a StockAugmented env: the last observation entry is c_t), greedy
    w.r.t. its spec's utility (`UTILITIES`) or, when given, w.r.t. E `utility`(c_H) (module docstring)."""
    if not isinstance(env, StockAugmented):
        raise ValueError(f"make_agent needs a StockAugmented environment; got {env.name}")
    action_space = env.action_space(env_params)
    if not isinstance(action_space, Discrete):
        raise ValueError(f"the deep DDP agent needs a Discrete action space; {env.name} has {action_space!r}")
    num_actions = action_space.n
    obs_dim = env.observation_space(env_params).shape[0]
    train_env = EpisodeStats(AutoReset(env))
    network = DistributionalQNetwork(num_actions, config.num_quantiles, (config.hidden_size,) * config.num_layers)
    learning_rate = optax.linear_schedule(config.learning_rate, config.learning_rate_end,
                                          max(1, config.num_iterations // config.train_frequency))
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(learning_rate))
    epsilon_schedule = optax.linear_schedule(config.epsilon_start, config.epsilon_end,
                                             max(1, int(config.exploration_fraction * config.num_iterations)))

    def quantiles(params, spec: AgentSpec, obs):
        features = jnp.concatenate([obs[..., :-1], spec.use_stock * obs[..., -1:] / config.stock_scale], axis=-1)
        return network.apply(params, features)

    def greedy(q, stock, spec):
        if utility is None:
            return greedy_actions(q, stock, spec, config.tie_break)
        return jnp.argmax(utility_scores(utility, q, stock), axis=-1)

    def act(params, spec, obs):
        return greedy(quantiles(params, spec, obs), obs[..., -1], spec)

    def greedy_policy(params_and_spec, obs, key):
        params, spec = params_and_spec
        return act(params, spec, obs), {}

    def epsilon_greedy(policy_params, obs, key):
        params, spec, epsilon = policy_params
        key_explore, key_random = jax.random.split(key)
        greedy = act(params, spec, obs)
        random = jax.random.randint(key_random, greedy.shape, 0, num_actions)
        return jnp.where(jax.random.uniform(key_explore, greedy.shape) < epsilon, random, greedy), {}

    def init(key, spec: AgentSpec) -> DeepState:
        key_net, key_env, key_run = jax.random.split(key, 3)
        params = network.init(key_net, jnp.zeros((1, obs_dim), jnp.float32))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        obs, env_state = reset_envs(train_env, env_params, key_env, config.num_envs)
        item = {"obs": obs[0], "action": jnp.zeros((), jnp.int32), "reward": jnp.zeros(()),
                "terminated": jnp.zeros((), bool), "next_obs": obs[0]}
        return DeepState(train_state, params, replay.init(item, config.buffer_size), env_state, obs, key_run,
                         jnp.zeros((), jnp.int32), spec)

    def loss_fn(params, target_params, spec, batch):
        next_target = quantiles(target_params, spec, batch["next_obs"])
        selector = quantiles(params, spec, batch["next_obs"]) if config.double_q else next_target
        next_actions = greedy(jax.lax.stop_gradient(selector), batch["next_obs"][:, -1], spec)
        targets = quantile_td_target(batch["reward"], batch["terminated"], next_target, next_actions)
        predicted = jnp.take_along_axis(quantiles(params, spec, batch["obs"]),
                                        batch["action"][:, None, None], axis=1)[:, 0]
        loss = quantile_huber_loss(predicted, targets, kappa=config.kappa).mean()
        return loss, {"loss": loss, "quantile_mean": predicted.mean()}

    def learn(train_state, target_params, spec, buffer, key):
        batch = replay.sample(buffer, key, config.batch_size)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(train_state.params, target_params, spec, batch)
        return train_state.apply_gradients(grads=grads), metrics

    def skip(train_state, target_params, spec, buffer, key):
        zero = jnp.zeros(())
        return train_state, {"loss": zero, "quantile_mean": zero}

    def update(state: DeepState):
        key, key_step, key_learn = jax.random.split(state.key, 3)
        epsilon = epsilon_schedule(state.iteration)
        (env_state, obs), tr = rollout(train_env, env_params, epsilon_greedy,
                                       (state.train_state.params, state.spec, epsilon), state.env_state, state.obs,
                                       key_step, 1)
        items = {"obs": tr.obs[0], "action": tr.action[0].astype(jnp.int32), "reward": tr.reward[0],
                 "terminated": tr.terminated[0], "next_obs": tr.next_obs[0]}
        buffer = replay.add(state.buffer, items)
        iteration = state.iteration + 1
        ready = (buffer.size >= config.learning_starts) & (iteration % config.train_frequency == 0)
        train_state, metrics = jax.lax.cond(ready, learn, skip, state.train_state, state.target_params, state.spec,
                                            buffer, key_learn)
        sync = iteration % config.target_update_interval == 0
        target_params = jax.tree_util.tree_map(lambda o, t: jnp.where(sync, o, t), train_state.params,
                                               state.target_params)
        metrics = dict(metrics, epsilon=epsilon, env_steps=iteration * config.num_envs, **completed_episode_stats(tr))
        return DeepState(train_state, target_params, buffer, env_state, obs, key, iteration, state.spec), metrics

    run = functools.partial(scan_updates, update)  # run(state, num_iterations)

    return DeepAgent(config, network, train_env, quantiles, greedy_policy, init, update, run)


def learned_cvar_sweep(agent: DeepAgent, params, spec: AgentSpec, start_obs: jax.Array, levels: jax.Array,
                       alpha: float) -> jax.Array:
    """The learned Bauerle-Ott objective b + E min(c_0 + G, 0) / alpha at the start, for each level b = -c_0.

    start_obs: the stock-augmented initial observation (its stock entry is replaced by -b); the expectation is
    the mean over quantiles of min(c_0 + theta_i(s_0, c_0, a*), 0), a* the agent's greedy action there.
    Returns [len(levels)]; b* = levels[argmax]."""
    levels = jnp.asarray(levels, jnp.float32)
    obs = jnp.broadcast_to(start_obs, levels.shape + start_obs.shape).at[:, -1].set(-levels)
    q = agent.quantiles(params, spec, obs)  # [L, A, N]
    a = greedy_actions(q, -levels, spec, agent.config.tie_break)
    chosen = jnp.take_along_axis(q, a[:, None, None], axis=1)[:, 0]
    return levels + jnp.minimum(chosen - levels[:, None], 0.0).mean(-1) / alpha
