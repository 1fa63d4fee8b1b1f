"""The image base model of the shapes task: a small UNet (`jaxalign.diffusion.unet`) trained on fresh procedural
16x16 shapes (`jaxalign.diffusion.shapes`) on the RL harness, its sampler, and the squared MMD between image sets.

- `ShapesBaseConfig`: the UNet's size and its training (Adam, cosine or constant lr, the VP schedule).
- `shapes_trainer`: the harness `Trainer` (state {params, opt_state, key, step}; one Adam step per update on `batch`
  fresh images; metrics loss and grad_norm), so training is chunked, checkpointed and resumes bit-identically
  (`rl.harness.train`), with metrics.jsonl and a progress bar with rate and ETA.
- The loss is `networks.denoising_loss` itself (Ho et al. 2020, eq. 14 in continuous VP time) on a FLATTENED view of
  the images: x0 [n, 768] with an apply function that reshapes to [n, 16, 16, 3] around the UNet, so the loss is
  ||eps_theta - eps||^2 summed over the image's 768 elements, the vector loss unchanged.
- `make_image_sampler`: a jitted (params, x_T) -> images with the parameters as a traced argument
  (`networks.model_fn`), so every fine-tuned model reuses one compilation.
- `mmd2_images`: the unbiased squared MMD (Gretton et al. 2012, eq. 3) with a Gaussian kernel on the flattened
  pixels; `MMD_BANDWIDTH` = 14 is the median heuristic on rendered shapes (the median squared distance between two
  of 512 rendered images is 376, and sqrt(376 / 2) = 13.7, rounded), so the kernel separates whole-shape changes
  (a shape of area 40 moved or recoloured changes ~100-300 of the squared distance) without saturating.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxalign.diffusion import networks, samplers, shapes
from jaxalign.diffusion.unet import UNet
from jaxalign.experiments.diffusion_kit import LR_SCHEDULES, T_END, check_training_fields, denoiser_trainer
from rl import harness

IMAGE_SHAPE = (shapes.SIZE, shapes.SIZE, 3)
MMD_BANDWIDTH = 14.0


@dataclasses.dataclass(frozen=True)
class ShapesBaseConfig:
    steps: int = 1000  # Adam steps, each on `batch` fresh procedural images
    batch: int = 32  # fresh images per Adam step
    lr: float = 2e-3  # Adam's (peak) learning rate
    lr_schedule: str = "cosine"  # "cosine" (decay to 0 over the steps) or "constant"
    channels: int = 8  # the UNet's channels at 16x16 (times channel_mult per level)
    channel_mult: str = "1,2,2"  # comma-separated channel multipliers of the levels 16, 8, 4
    blocks: int = 1  # ResBlocks per level in the encoder (one more in the decoder)
    attention: bool = False  # single-head self-attention in the 4x4 middle
    groups: int = 4  # GroupNorm groups (the largest divisor of the channels up to this)
    schedule: str = "linear"  # "linear" (Song et al. 2021 VP) or "cosine" (Nichol and Dhariwal 2021)
    t_min: float = 1e-3  # training times t ~ U(t_min, t_max)
    num_chunks: int = 4  # jitted scans the steps are split into; checkpoint, log and ETA after each (<= steps)

    def __post_init__(self):
        for key in ("steps", "batch", "channels", "blocks", "groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {key}={getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got lr={self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got lr_schedule={self.lr_schedule!r}")
        try:
            mult = self.mult
        except ValueError:
            mult = ()
        if not 1 <= len(mult) <= 3 or any(m < 1 for m in mult):
            raise ValueError(f"channel_mult must be 1 to 3 comma-separated positive integers (16x16 halves at most "
                             f"twice), got channel_mult={self.channel_mult!r}")
        check_training_fields(self)

    @property
    def mult(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.channel_mult.split(","))


def make_unet(cfg: ShapesBaseConfig) -> UNet:
    return UNet(channels=cfg.channels, channel_mult=cfg.mult, blocks=cfg.blocks, attention=cfg.attention,
                groups=cfg.groups)


def init_unet_params(cfg: ShapesBaseConfig, key):
    return make_unet(cfg).init(key, jnp.zeros((1, *IMAGE_SHAPE)), jnp.ones((1,)))


def flat_apply(apply_fn):
    """`apply_fn` on images as an apply function on flattened images [n, 768] (for `networks.denoising_loss`)."""
    return lambda params, x, t: apply_fn(params, x.reshape(-1, *IMAGE_SHAPE), t).reshape(x.shape)


def shapes_trainer(cfg: ShapesBaseConfig, schedule) -> harness.Trainer:
    """The UNet's training for the harness: state {params, opt_state, key, step}, all replicated; one Adam step per
    update on `batch` fresh shapes; metrics loss (summed over the 768 elements, batch mean) and grad_norm."""
    return denoiser_trainer(flat_apply(make_unet(cfg).apply), lambda key: init_unet_params(cfg, key),
                            lambda key: shapes.sample(key, cfg.batch)[0].reshape(cfg.batch, -1), schedule,
                            steps=cfg.steps, lr=cfg.lr, lr_schedule=cfg.lr_schedule, t_min=cfg.t_min,
                            loss_format=".2f")


def clipped_apply(apply_fn, schedule):
    """The noise prediction whose implied data prediction is clipped to the pixel range: x0_hat = (x - sigma_t eps) /
    alpha_t clipped to [-1, 1], returned as eps' = (x - alpha_t clip(x0_hat)) / sigma_t (the x0 clipping of DDPM's
    sampler, Ho et al. 2020's released code, clip_denoised; Saharia et al. 2022 call it static thresholding). It
    only changes sampling: an undertrained model's overshooting x0 predictions no longer push pixels far outside
    [-1, 1]. Build it once per network: the samplers compile once per function object."""

    def apply(params, x, t):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        alpha = schedule.alpha(t).reshape(-1, *([1] * (x.ndim - 1)))
        sigma = schedule.sigma(t).reshape(-1, *([1] * (x.ndim - 1)))
        x0 = jnp.clip((x - sigma * apply_fn(params, x, t)) / alpha, -1.0, 1.0)
        return (x - alpha * x0) / sigma

    return apply


def make_image_sampler(cfg: ShapesBaseConfig, schedule, solver: str, nfe: int, clip_x0: bool = True):
    """A jitted (params, x_T [n, 16, 16, 3]) -> images: `solver` at `nfe` evaluations from schedule.t_max to T_END,
    the parameters a traced argument (one compilation for every fine-tuned model); `clip_x0`: through
    `clipped_apply`."""
    apply_fn = make_unet(cfg).apply
    apply_fn = clipped_apply(apply_fn, schedule) if clip_x0 else apply_fn
    ts, kwargs = samplers.plan(solver, schedule, nfe, t_end=T_END)

    @jax.jit
    def draw(params, x_T):
        return samplers.SOLVERS[solver](networks.model_fn(apply_fn, params), schedule, x_T, ts, **kwargs)

    return draw


def mmd2_images(x, y, bandwidth: float = MMD_BANDWIDTH):
    """Unbiased squared MMD (Gretton et al. 2012, eq. 3, the U-statistic) between image sets x [n, ...] and y
    [m, ...] (flattened), Gaussian kernel exp(-|a - b|^2 / (2 bandwidth^2)); squared distances from inner products
    (no [n, m, 768] intermediate). Independent draws: its expectation is 0 for one law, so it can be negative."""
    x = jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)
    y = jnp.reshape(y, (y.shape[0], -1)).astype(jnp.float32)

    def gram(a, b):
        d2 = jnp.sum(a**2, -1)[:, None] + jnp.sum(b**2, -1)[None, :] - 2.0 * a @ b.T
        return jnp.exp(-jnp.maximum(d2, 0.0) / (2.0 * bandwidth**2))

    n, m = x.shape[0], y.shape[0]
    kxx = (jnp.sum(gram(x, x)) - jnp.trace(gram(x, x))) / (n * (n - 1))
    kyy = (jnp.sum(gram(y, y)) - jnp.trace(gram(y, y))) / (m * (m - 1))
    return kxx + kyy - 2.0 * jnp.mean(gram(x, y))


__all__ = ["IMAGE_SHAPE", "MMD_BANDWIDTH", "ShapesBaseConfig", "T_END", "clipped_apply", "flat_apply",
           "init_unet_params", "make_image_sampler", "make_unet", "mmd2_images", "shapes_trainer"]
