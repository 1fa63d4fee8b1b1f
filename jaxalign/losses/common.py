"""Helpers shared by the objective families: hyper-parameter checks, log-ratios, the smoothed logistic loss."""
from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import numpy as np

from jaxalign.losses.registry import PairwiseInputs


def check_hyperparameter(objective: str, name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    """Raise one clear ValueError when a Python-number hyper-parameter is out of range (tracers pass through)."""
    if isinstance(value, jax.core.Tracer):
        return  # traced (e.g. swept under jit): cannot be checked eagerly
    if isinstance(value, (bool, str)) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)) or np.ndim(value):
        raise ValueError(f"{objective}.{name} must be a real number ({expected}), got {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{objective}.{name} must satisfy {expected}, got {value!r}")


def check_objective_beta(objective: str, beta: Any) -> None:
    check_hyperparameter(objective, "beta", beta, lambda b: b > 0, "beta > 0 (the KL-penalty strength)")


def log_ratios(inputs: PairwiseInputs) -> tuple[jax.Array, jax.Array]:
    """(z_w, z_l): summed policy-minus-reference completion log-probs of chosen and rejected, shape [pairs]."""
    z_chosen = inputs.sequence("policy_chosen") - inputs.sequence("reference_chosen")
    z_rejected = inputs.sequence("policy_rejected") - inputs.sequence("reference_rejected")
    return z_chosen, z_rejected


def smoothed_logistic(logits: jax.Array, eps: Any) -> jax.Array:
    """-(1-eps) logsig(x) - eps logsig(-x): the label-smoothed (conservative) logistic loss."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
