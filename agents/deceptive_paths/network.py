"""GraphSAGE actor-critic over the environment's dense, padded ego-graph (Fatemi, Suttle and Sadler, AAMAS 2024).

Input: the observation of `env.DeceptivePathEnv`, float [..., M, 9] per ego slot (slot 0 the agent, slots 1..4 its
neighbours up, right, down, left; `env.split_observation`). The network

1. normalises the raw features per slot n, relative to the agent's own slot 0 and the ego radius k, so that the
   same weights read a 8x8 and a 32x32 map alike (the raw distances and remaining time grow with the map):
       visited(n),
       (d_g(n) - d_g(0)) / k,  (d_d(n) - d_d(0)) / k          how a move changes the distances, in [-1, 1];
       clip((T_left - d_g(n)) / max(T_left, 1), -1, 1)         the slack left after heading straight for G from n;
       tanh((T_left - d_g(n)) / 8)                             the same slack in moves, squashed;
       (d_g(n) - d_d(n)) / (d_g(n) + d_d(n) + 1)               where n lies between the goal and the decoy;
   and zeroes every invalid slot;
2. applies `num_layers` GraphSAGE layers with the mean aggregator (Hamilton, Ying and Leskovec, NeurIPS 2017,
   Algorithm 1 with AGGREGATE = mean): h'_n = act(W_self h_n + W_neigh mean_{m in N(n)} h_m), where N(n) are the
   slots the adjacency array links to n (at most 4; invalid slots are never linked) and the mean over an empty
   neighbourhood is 0; invalid slots are zeroed again after every layer, so they never reach a valid one;
3. scores move a by an MLP of [h_0 || h_a] (slot a = 1..4 is the cell the move leads to) and masks illegal moves
   with the large finite MASKED_LOGIT (never -inf, so entropies and log-ratios stay finite); the value is an MLP
   of h_0.

Initialisation follows rl/networks.py (orthogonal, gain 0.01 on the logits: a near-uniform first policy).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agents.deceptive_paths.env import split_observation
from rl.networks import ACTIVATIONS, MLP

MASKED_LOGIT = -1e9
NUM_INPUT_FEATURES = 6


def normalise_features(features: jax.Array, valid: jax.Array, ego_radius: int) -> jax.Array:
    """float [..., M, 4] raw [visited, d_g, d_d, T_left] -> float [..., M, 6] (module docstring), 0 where invalid."""
    visited, d_goal, d_decoy, left = (features[..., i] for i in range(4))
    k = jnp.float32(ego_radius)
    slack = left - d_goal
    normalised = jnp.stack([
        visited,
        (d_goal - d_goal[..., :1]) / k,
        (d_decoy - d_decoy[..., :1]) / k,
        jnp.clip(slack / jnp.maximum(left, 1.0), -1.0, 1.0),
        jnp.tanh(slack / 8.0),
        (d_goal - d_decoy) / (d_goal + d_decoy + 1.0),
    ], axis=-1)
    return jnp.where(valid[..., None], normalised, 0.0)


def gather_slots(h: jax.Array, index: jax.Array) -> jax.Array:
    """h [B, M, H], index int [B, M, K] (>= 0) -> [B, M, K, H]: h[b, index[b, m, k]]."""
    return jax.vmap(lambda hb, ib: hb[ib])(h, index)


def mean_neighbours(h: jax.Array, adjacency: jax.Array) -> jax.Array:
    """The mean of h over each slot's linked slots (adjacency >= 0), 0 where a slot has none: [B, M, H]."""
    linked = (adjacency >= 0).astype(h.dtype)  # [B, M, 4]
    gathered = gather_slots(h, jnp.maximum(adjacency, 0)) * linked[..., None]
    return gathered.sum(axis=-2) / jnp.maximum(linked.sum(axis=-1), 1.0)[..., None]


class SAGELayer(nn.Module):
    """One GraphSAGE layer with the mean aggregator; invalid slots come out as 0."""

    features: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, h, adjacency, valid):
        init = nn.initializers.orthogonal(np.sqrt(2))
        own = nn.Dense(self.features, kernel_init=init, name="self")(h)
        neighbours = nn.Dense(self.features, kernel_init=init, use_bias=False, name="neighbours")(
            mean_neighbours(h, adjacency))
        return jnp.where(valid[..., None], ACTIVATIONS[self.activation](own + neighbours), 0.0)


class GraphSAGEActorCritic(nn.Module):
    """obs [..., M, 9] -> (masked logits [..., 4], value [...]) (module docstring)."""

    ego_radius: int = 2
    hidden: int = 64
    num_layers: int = 2
    activation: str = "relu"

    def embed(self, obs):
        """(h [B, M, H] after the GraphSAGE layers, action mask [B, 4], batch shape) for obs [..., M, 9]."""
        batch_shape = obs.shape[:-2]
        parts = split_observation(obs.reshape((-1,) + obs.shape[-2:]))
        h = normalise_features(parts.features, parts.valid, self.ego_radius)
        for i in range(self.num_layers):
            h = SAGELayer(self.hidden, self.activation, name=f"sage_{i}")(h, parts.adjacency, parts.valid)
        return h, parts.action_mask, batch_shape

    @nn.compact
    def __call__(self, obs):
        h, mask, batch_shape = self.embed(obs)
        own = jnp.broadcast_to(h[:, :1, :], h[:, 1:5, :].shape)
        pairs = jnp.concatenate([own, h[:, 1:5, :]], axis=-1)  # [B, 4, 2H]: [h_self || h_neighbour(a)]
        logits = MLP((self.hidden,), 1, self.activation, out_gain=0.01, name="actor")(pairs)[..., 0]
        logits = jnp.where(mask, logits, MASKED_LOGIT)
        value = MLP((self.hidden,), 1, self.activation, out_gain=1.0, name="critic")(h[:, 0, :])[..., 0]
        return logits.reshape(batch_shape + (4,)), value.reshape(batch_shape)
