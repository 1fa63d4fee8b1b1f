"""The objective registry and the inputs every pairwise objective receives."""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
OBJECTIVES: dict[str, Objective] = {}


@flax.struct.dataclass
class PairwiseInputs:
    """Per-token log-probs [pairs, time] (zero outside the masks) and completion masks for a batch of pairs.

    `reference_*` are the frozen reference model's log-probs (precomputed or from an online forward pass).
    """

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    reference_chosen: jax.Array
    reference_rejected: jax.Array
    chosen_mask: jax.Array
    rejected_mask: jax.Array

    def sequence(self, which: str) -> jax.Array:
        """Summed completion log-prob L(y) of one of the four log-prob arrays, e.g. 'policy_chosen'."""
        mask = self.chosen_mask if which.endswith("chosen") else self.rejected_mask
        return jnp.sum(getattr(self, which) * mask, axis=-1)


def register(name: str) -> Callable[[Objective], Objective]:
    """Add an objective to the registry under `name` (a clear error on a duplicate name)."""

    def add(fn: Objective) -> Objective:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered by {OBJECTIVES[name].__module__}")
        OBJECTIVES[name] = fn
        return fn

    return add


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered objectives: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def compute_objective(name: str, inputs: PairwiseInputs, **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Evaluate the registered objective `name` on `inputs`; keyword arguments are its hyper-parameters."""
    return get_objective(name)(inputs, **kwargs)
