"""The iteration loop shared by online/iterative DPO, DNO-Prct and APO (docs/algorithms.md), and the reference
each iteration trains against.

All three repeat one proximal step: from the current iterate pihat_t, sample, judge, build pairs, and train a DPO
step whose reference is

- online / iterative DPO (Xiong et al. 2024) and DNO-Prct (Rosset et al. 2024, Algorithm 2): the previous iterate,
  log pi_ref = log pihat_t;
- APO (He et al. 2024, "Accelerated Preference Optimization", its Nesterov step): the
  extrapolated iterate, log pi_ref = (1 + a) log pihat_t - a log pihat_{t-1} - log Z. With per-token log-probs the
  extrapolation is linear (`jaxalign.losses.iterative.apo_reference_logratio`), log Z cancels in every
  chosen-minus-rejected difference, so two frozen checkpoints suffice. a = 0, and the first iteration (there is no
  pihat_{-1}), are iterative DPO exactly: the reference log-probs are pihat_t's, bit for bit.

`run_iterations` composes an iteration function; it never forks the trainer (docs/architecture.md). Which
iterate to keep is `best_iterate`'s choice: the best on validation (DNO-Prct), the earliest on ties.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from jaxalign.losses.iterative import apo_reference_logratio

REFERENCE_KEYS = ("reference_chosen", "reference_rejected")


def extrapolated_reference(latest: dict[str, np.ndarray], previous: dict[str, np.ndarray] | None,
                           alpha: float) -> dict[str, np.ndarray]:
    """APO's reference per-token log-probs from the two frozen checkpoints' (REFERENCE_KEYS arrays, [pairs, T]).

    Returns `latest`'s arrays themselves when there is no previous checkpoint (the first iteration), otherwise
    (1 + alpha) * latest - alpha * previous per token, which for alpha = 0 is `latest` bit for bit (1 * x - 0 * y = x
    in floating point for finite y), so APO at alpha 0 is iterative DPO exactly."""
    missing = [k for k in REFERENCE_KEYS if k not in latest or (previous is not None and k not in previous)]
    if missing:
        raise ValueError(f"extrapolated_reference: both checkpoints' log-probs need {REFERENCE_KEYS}; missing "
                         f"{missing}")
    if previous is None:
        apo_reference_logratio(np.zeros(1), np.zeros(1), alpha)  # validates alpha all the same
        return {k: latest[k] for k in REFERENCE_KEYS}
    return {k: np.asarray(apo_reference_logratio(np.asarray(latest[k]), np.asarray(previous[k]), alpha),
                          np.float32) for k in REFERENCE_KEYS}


def run_iterations(initial: Any, num_iterations: int,
                   iterate: Callable[[int, Any, Any | None], Any]) -> list[Any]:
    """For t = 0 .. num_iterations - 1: iterate_t+1 = iterate(t, latest, previous), where latest is pihat_t (the
    initial policy for t = 0) and previous is pihat_{t-1} (None for t = 0). Returns [pihat_1, ..., pihat_T]."""
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, (int, np.integer)) or num_iterations < 1:
        raise ValueError(f"run_iterations: num_iterations must be an integer >= 1, got {num_iterations!r}")
    latest, previous, history = initial, None, []
    for t in range(num_iterations):
        latest, previous = iterate(t, latest, previous), latest
        history.append(latest)
    return history


def best_iterate(records: Sequence[dict], key: str = "val_accuracy") -> int:
    """Index of the record with the highest `key` (the earliest on ties: fewer iterations, closer to SFT)."""
    if not records:
        raise ValueError("best_iterate: no iterations to choose from")
    values = [float(r[key]) for r in records]
    return int(np.argmax(values))
