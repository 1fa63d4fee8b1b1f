"""The optimizer: AdamW (Loshchilov & Hutter, 2019) with linear warmup, cosine decay and global-norm clipping."""
from __future__ import annotations

import dataclasses

import optax

from jaxalign.validation import (
    check_int,
    check_non_negative,
    check_number,
    check_positive,
    check_probability,
)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm gradient clipping on a warmup + cosine learning-rate schedule (`make_optimizer`)."""

    learning_rate: float = 1e-3  # peak learning rate, reached after the warmup
    warmup_steps: int = 50  # linear warmup from 0 over this many steps
    end_learning_rate_fraction: float = 0.1  # the cosine decay ends at this fraction of the peak
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.95  # Adam's second-moment decay
    clip_norm: float = 1.0  # gradients are clipped to this global norm before the update

    def __post_init__(self):
        check_positive("optim", "learning_rate", self.learning_rate)
        check_int("optim", "warmup_steps", self.warmup_steps, minimum=0)
        check_probability("optim", "end_learning_rate_fraction", self.end_learning_rate_fraction)
        check_non_negative("optim", "weight_decay", self.weight_decay)
        for name in ("b1", "b2"):  # Adam's moment decays: 1 would never forget, >1 diverges
            check_number("optim", name, getattr(self, name), low=0, high=1, high_open=True)
        check_positive("optim", "clip_norm", self.clip_norm)


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate` over `warmup_steps`, then cosine decay to `end_learning_rate_fraction` of it."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_learning_rate_fraction,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule). Clipping first so the update uses the clipped gradient."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )
