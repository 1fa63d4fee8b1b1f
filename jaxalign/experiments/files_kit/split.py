"""The held-out split of a file's rows."""
from __future__ import annotations

import numpy as np


def split_rows(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of `n` rows: a permutation seeded by `seed`, the first round(eval_fraction * n)
    (at least 1, at most n - 1) held out; both sorted, so the split depends on nothing but (n, eval_fraction, seed)."""
    held = min(max(1, int(round(eval_fraction * n))), n - 1)
    order = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


__all__ = ["split_rows"]
