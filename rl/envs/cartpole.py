"""CartPole (Barto, Sutton & Anderson 1983) as a functional JAX environment, step-for-step gymnasium's CartPole-v1.

Dynamics (explicit Euler with tau = 0.02 s, as gymnasium's default `kinematics_integrator="euler"`), following
Florian (2007), "Correct equations for the dynamics of the cart-pole system", without friction:

    temp      = (F + m_p l theta_dot^2 sin theta) / (m_c + m_p)
    theta_acc = (g sin theta - cos theta * temp) / (l (4/3 - m_p cos^2 theta / (m_c + m_p)))
    x_acc     = temp - m_p l theta_acc cos theta / (m_c + m_p)

with F = +-10 N for action 1 / 0 and l the half pole length. The episode terminates when |x| > 2.4 or
|theta| > 12 degrees (checked on the new state) and is truncated after `max_steps` (500 for v1) steps. The reward is
1 on every step, the terminal one included. Reset draws the four state variables uniformly from [-0.05, 0.05].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from rl.env import Box, Discrete, Environment


@struct.dataclass
class CartPoleParams:
    gravity: float = 9.8
    masscart: float = 1.0
    masspole: float = 0.1
    length: float = 0.5  # half the pole's length
    force_mag: float = 10.0
    tau: float = 0.02
    theta_threshold_radians: float = 12 * 2 * math.pi / 360
    x_threshold: float = 2.4
    max_steps: int = 500


@struct.dataclass
class CartPoleState:
    x: jax.Array
    x_dot: jax.Array
    theta: jax.Array
    theta_dot: jax.Array
    time: jax.Array  # steps taken in this episode


class CartPole(Environment[CartPoleState, CartPoleParams]):
    """CartPole-v1: observation [x, x_dot, theta, theta_dot] (float32), actions {0: push left, 1: push right}."""

    @property
    def default_params(self) -> CartPoleParams:
        return CartPoleParams()

    @property
    def name(self) -> str:
        return "CartPole-v1"

    def reset(self, key, params: CartPoleParams):
        x, x_dot, theta, theta_dot = jax.random.uniform(key, (4,), minval=-0.05, maxval=0.05)
        state = CartPoleState(x, x_dot, theta, theta_dot, jnp.zeros((), jnp.int32))
        return self.observation(state), state

    def step(self, key, state: CartPoleState, action, params: CartPoleParams):
        del key  # deterministic dynamics
        total_mass = params.masspole + params.masscart
        polemass_length = params.masspole * params.length
        force = jnp.where(action == 1, params.force_mag, -params.force_mag)
        cos, sin = jnp.cos(state.theta), jnp.sin(state.theta)
        temp = (force + polemass_length * state.theta_dot**2 * sin) / total_mass
        theta_acc = (params.gravity * sin - cos * temp) / (
            params.length * (4.0 / 3.0 - params.masspole * cos**2 / total_mass))
        x_acc = temp - polemass_length * theta_acc * cos / total_mass
        new = CartPoleState(
            x=state.x + params.tau * state.x_dot,
            x_dot=state.x_dot + params.tau * x_acc,
            theta=state.theta + params.tau * state.theta_dot,
            theta_dot=state.theta_dot + params.tau * theta_acc,
            time=state.time + 1,
        )
        terminated = (jnp.abs(new.x) > params.x_threshold) | (jnp.abs(new.theta) > params.theta_threshold_radians)
        truncated = new.time >= params.max_steps
        reward = jnp.ones((), jnp.float32)
        return (self.observation(new), new, reward, terminated | truncated,
                {"terminated": terminated, "truncated": truncated})

    @staticmethod
    def observation(state: CartPoleState) -> jax.Array:
        return jnp.stack([state.x, state.x_dot, state.theta, state.theta_dot]).astype(jnp.float32)

    def observation_space(self, params: CartPoleParams) -> Box:
        high = [params.x_threshold * 2, math.inf, params.theta_threshold_radians * 2, math.inf]
        return Box(low=[-h for h in high], high=high, shape=(4,), dtype=jnp.float32)

    def action_space(self, params: CartPoleParams) -> Discrete:
        return Discrete(2)
