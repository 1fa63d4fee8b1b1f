"""The iteration loop's bookkeeping every iterative ARITH experiment shares: iteration t's preference-phase config
and its fresh prompts. `cfg` is any config with `base` (an ArithDPOConfig), `iterations`,
`prompts_per_iteration` and `steps_per_iteration`."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from jaxalign.experiments.arith_kit.config import ArithDPOConfig
from jaxalign.losses import get_spec


def iteration_config(cfg: Any) -> ArithDPOConfig:
    """The main job's config for one DPO step of the loop."""
    return dataclasses.replace(cfg.base, dpo=dataclasses.replace(cfg.base.dpo, steps=cfg.steps_per_iteration))


def iteration_prompts(cfg: Any, train: np.ndarray, t: int) -> np.ndarray:
    """The prompts of iteration t: slice t of a seeded permutation of the training problems (fresh every time)."""
    needed = cfg.iterations * cfg.prompts_per_iteration
    if needed > len(train):
        raise ValueError(f"iterations x prompts_per_iteration = {cfg.iterations} x {cfg.prompts_per_iteration} = "
                         f"{needed} fresh prompts, but ARITH has {len(train)} training problems")
    order = np.random.default_rng([cfg.base.seed, 5]).permutation(len(train))
    return train[order[t * cfg.prompts_per_iteration : (t + 1) * cfg.prompts_per_iteration]]


def _is_int(value: Any, lowest: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= lowest


def check_loop_fields(cfg: Any) -> None:
    """One clear error for a bad loop size (the fields every comparison config shares)."""
    for name in ("iterations", "prompts_per_iteration", "steps_per_iteration", "num_kl_prompts"):
        if not _is_int(getattr(cfg, name), 1):
            raise ValueError(f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    if cfg.base.lora.rank:
        raise ValueError("these comparisons train full parameters (a custom loss refuses LoRA): set base.lora.rank=0")
    if cfg.base.dpo.reference == "sync":
        raise ValueError("base.dpo.reference=sync: the custom losses read precomputed frozen log-probs; use cached "
                         "or online")
    if get_spec(cfg.base.dpo.objective).family == "listwise":
        raise ValueError(f"base.dpo.objective={cfg.base.dpo.objective!r} is listwise; the baseline trains on "
                         f"best-vs-worst pairs: use a pairwise objective (default sigmoid)")
