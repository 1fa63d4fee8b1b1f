"""The optimizer: AdamW (Loshchilov & Hutter, 2019) with linear warmup, cosine decay and global-norm clipping."""
from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"optim.learning_rate must be positive, got {self.learning_rate!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.end_learning_rate_fraction <= 1:
            raise ValueError(f"optim.end_learning_rate_fraction must be in [0, 1], got {self.end_learning_rate_fraction!r}")
        if not self.clip_norm > 0:
            raise ValueError(f"optim.clip_norm must be positive, got {self.clip_norm!r}")


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
