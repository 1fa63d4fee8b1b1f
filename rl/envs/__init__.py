"""Functional JAX environments (see `rl.env` for the protocol)."""
from rl.envs.cartpole import CartPole, CartPoleParams, CartPoleState

__all__ = ["CartPole", "CartPoleParams", "CartPoleState"]
