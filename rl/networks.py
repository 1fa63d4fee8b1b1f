"""Small Flax networks for the RL core: MLP torsos, a discrete actor-critic, and value / distributional Q heads.

Initialisation follows the PPO implementation details of Engstrom et al. 2020 ("Implementation Matters in Deep
Policy Gradients") and Huang et al. 2022 ("The 37 Implementation Details of PPO"): orthogonal weights with gain
sqrt(2) in hidden layers, 0.01 for the policy logits (a near-uniform initial policy) and 1 for value outputs, zero
biases.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


def _dense(features: int, gain: float) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(gain), bias_init=nn.initializers.zeros)


class MLP(nn.Module):
    """Hidden layers of `hidden` units, then a linear output of `out` units (initialised with `out_gain`)."""

    hidden: Sequence[int]
    out: int
    activation: str = "tanh"
    out_gain: float = 1.0

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for width in self.hidden:
            x = act(_dense(width, np.sqrt(2))(x))
        return _dense(self.out, self.out_gain)(x)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs for a discrete action space: returns (logits [..., A], value [...])."""

    num_actions: int
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs):
        logits = MLP(self.hidden, self.num_actions, self.activation, out_gain=0.01, name="actor")(obs)
        value = MLP(self.hidden, 1, self.activation, out_gain=1.0, name="critic")(obs)
        return logits, value[..., 0]


class QNetwork(nn.Module):
    """Q(s, .) for discrete actions: [..., A]."""

    num_actions: int
    hidden: Sequence[int] = (64, 64)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs):
        return MLP(self.hidden, self.num_actions, self.activation)(obs)


class DistributionalQNetwork(nn.Module):
    """A return-distribution head per action: [..., A, num_outputs].

    The outputs are logits over fixed atoms for C51 (`jax.nn.softmax` over the last axis) or quantile values for
    QR-DQN; see `rl.distributional`.
    """

    num_actions: int
    num_outputs: int
    hidden: Sequence[int] = (64, 64)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden, self.num_actions * self.num_outputs, self.activation)(obs)
        return out.reshape(out.shape[:-1] + (self.num_actions, self.num_outputs))


def categorical_sample_and_log_prob(logits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sample a ~ softmax(logits) and return (a, log pi(a))."""
    action = jax.random.categorical(key, logits)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], axis=-1)[..., 0]
    return action, log_prob
