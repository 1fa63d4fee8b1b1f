"""Wrappers: auto-reset and episode statistics for functional environments, and gymnasium adapters both ways.

- `AutoReset(env)`: a functional env that resets itself when an episode ends (same protocol, still pure).
- `EpisodeStats(env)`: adds the running episode return/length to the state and reports finished episodes' values.
- `GymnasiumEnv(env)`: a functional env as a `gymnasium.Env` (`register_gymnasium` registers one by id; it passes
  `gymnasium.utils.env_checker.check_env`).
- `GymnasiumDriver(envs)`: the other direction: gymnasium environments stepped on the host by a jitted JAX policy,
  producing the same time-major `rl.rollout.Transition` as `rl.rollout.rollout`. This is the host-side boundary for
  environments that cannot be written in JAX; the driver itself is stateful, as gymnasium environments are.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rl.env import Environment
from rl.rollout import PolicyFn, Transition


def _select(pred, on_true, on_false):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class Wrapper(Environment):
    """Delegates everything to the wrapped environment."""

    def __init__(self, env: Environment):
        self.env = env

    @property
    def default_params(self):
        return self.env.default_params

    def reset(self, key, params):
        return self.env.reset(key, params)

    def step(self, key, state, action, params):
        return self.env.step(key, state, action, params)

    def observation_space(self, params):
        return self.env.observation_space(params)

    def action_space(self, params):
        return self.env.action_space(params)

    @property
    def name(self) -> str:
        return self.env.name


class AutoReset(Wrapper):
    """Reset inside `step` when the episode ends, so a rollout never steps a finished episode.

    Where `done`, the returned observation and state are those of a fresh episode; the observation the step actually
    reached is kept in `info["final_observation"]` (value bootstraps at truncations need it, see `rl.returns`).
    Reward, done and the other info entries are those of the finishing step.
    """

    def step(self, key, state, action, params):
        key_step, key_reset = jax.random.split(key)
        obs, next_state, reward, done, info = self.env.step(key_step, state, action, params)
        reset_obs, reset_state = self.env.reset(key_reset, params)
        info = dict(info, final_observation=obs)
        return (jnp.where(done, reset_obs, obs), _select(done, reset_state, next_state), reward, done, info)


@struct.dataclass
class EpisodeStatsState:
    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array


class EpisodeStats(Wrapper):
    """Track the undiscounted return and length of the running episode.

    `info["episode_return"]` / `info["episode_length"]` hold the totals of the episode that just finished where
    `done` (including the finishing step's reward) and the running totals elsewhere. Place it outside `AutoReset`.
    """

    def reset(self, key, params):
        obs, state = self.env.reset(key, params)
        return obs, EpisodeStatsState(state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

    def step(self, key, state: EpisodeStatsState, action, params):
        obs, env_state, reward, done, info = self.env.step(key, state.env_state, action, params)
        ret = state.episode_return + reward
        length = state.episode_length + 1
        info = dict(info, episode_return=ret, episode_length=length)
        new = EpisodeStatsState(env_state, jnp.where(done, 0.0, ret), jnp.where(done, 0, length))
        return obs, new, reward, done, info


# ---------------------------------------------------------------------------------------------------------------
# JAX -> gymnasium.


class GymnasiumEnv(gymnasium.Env):
    """A functional environment behind gymnasium's `Env` API (jitted reset/step, NumPy in and out).

    Seeding follows gymnasium: `reset(seed=s)` reseeds `self.np_random`, and every reset draws a fresh JAX key
    from it, so equal seeds give equal episodes. Truncation is the wrapped environment's own (its `info`), so
    register it without gymnasium's TimeLimit.
    """

    metadata = {"render_modes": []}

    def __init__(self, env: Environment, params: Any = None, render_mode: str | None = None):
        if render_mode is not None:
            raise ValueError(f"GymnasiumEnv({env.name}) does not render; got render_mode={render_mode!r}")
        self.env = env
        self.params = env.default_params if params is None else params
        self.observation_space = env.observation_space(self.params).to_gymnasium()
        self.action_space = env.action_space(self.params).to_gymnasium()
        self.render_mode = None
        self._reset = jax.jit(env.reset)
        self._step = jax.jit(env.step)
        self._key = None
        self._state = None

    def _obs(self, obs):
        return np.asarray(obs, dtype=self.observation_space.dtype)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._key = jax.random.key(int(self.np_random.integers(0, 2**31 - 1)))
        self._key, key = jax.random.split(self._key)
        obs, self._state = self._reset(key, self.params)
        return self._obs(obs), {}

    def step(self, action):
        if self._state is None:
            raise RuntimeError(f"{self.env.name}: call reset() before step()")
        self._key, key = jax.random.split(self._key)
        obs, self._state, reward, _, info = self._step(key, self._state, jnp.asarray(action), self.params)
        return self._obs(obs), float(reward), bool(info["terminated"]), bool(info["truncated"]), {}


def register_gymnasium(env_id: str, env_factory: Callable[[], Environment], **kwargs) -> None:
    """Register a functional environment with gymnasium: `gymnasium.make(env_id)` then returns a `GymnasiumEnv`."""

    def entry_point(**make_kwargs):
        return GymnasiumEnv(env_factory(), **make_kwargs)

    gymnasium.register(id=env_id, entry_point=entry_point, max_episode_steps=None, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# gymnasium -> a host-side rollout loop.


class GymnasiumDriver:
    """Step N gymnasium environments on the host with a JAX policy; return the same `Transition` as `rollout`.

    Each environment is reset (with seed `seed + i`) on construction and again, by the driver, when its episode
    ends; `next_obs` is then the observation that ended the episode, as with `AutoReset`. `info` carries
    `episode_return` / `episode_length` exactly as `EpisodeStats` does. The policy is jitted once.
    """

    def __init__(self, envs: Sequence[gymnasium.Env], seed: int = 0):
        if not envs:
            raise ValueError("GymnasiumDriver needs at least one environment")
        self.envs = list(envs)
        self.obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)])
        self.episode_return = np.zeros(len(self.envs), np.float32)
        self.episode_length = np.zeros(len(self.envs), np.int32)
        self._policies: dict[Callable, Callable] = {}

    def rollout(self, policy_fn: PolicyFn, policy_params, key: jax.Array, num_steps: int) -> Transition:
        policy = self._policies.setdefault(policy_fn, jax.jit(policy_fn))
        steps = []
        for step_key in jax.random.split(key, num_steps):
            action, extras = policy(policy_params, jnp.asarray(self.obs), step_key)
            host_action = np.asarray(action)
            rows = [env.step(a.item() if a.ndim == 0 else a) for env, a in zip(self.envs, host_action)]
            next_obs = np.stack([r[0] for r in rows])
            reward = np.array([r[1] for r in rows], np.float32)
            terminated = np.array([r[2] for r in rows], bool)
            truncated = np.array([r[3] for r in rows], bool)
            self.episode_return += reward
            self.episode_length += 1
            info = {"episode_return": self.episode_return.copy(), "episode_length": self.episode_length.copy()}
            steps.append(Transition(obs=self.obs, action=host_action, reward=reward, terminated=terminated,
                                    truncated=truncated, next_obs=next_obs, extras=jax.device_get(extras),
                                    info=info))
            current = next_obs.copy()
            for i in np.nonzero(terminated | truncated)[0]:
                current[i] = self.envs[i].reset()[0]
                self.episode_return[i] = 0.0
                self.episode_length[i] = 0
            self.obs = current
        return jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack(xs)), *steps)
