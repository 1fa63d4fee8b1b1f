"""Functional JAX environments (see `rl.env` for the protocol)."""
from rl.envs.cartpole import CartPole, CartPoleParams, CartPoleState
from rl.envs.gridworld import Gridworld, GridworldParams, GridworldState

__all__ = ["CartPole", "CartPoleParams", "CartPoleState", "Gridworld", "GridworldParams", "GridworldState"]
