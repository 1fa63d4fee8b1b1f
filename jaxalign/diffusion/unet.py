"""A small UNet noise predictor eps_theta(x_t, t) for 16x16 RGB images (`jaxalign.diffusion.shapes`).

The DDPM UNet (Ho et al. 2020, App. B; Ronneberger et al. 2015's encoder-decoder with skip connections), shrunk
so that it trains in minutes on two CPU cores:

- time: the sinusoidal embedding of 1000 t (Vaswani et al. 2017, Sec. 3.5; DDPM's integer-step scale, as
  `networks.VectorDenoiser(embed="time")`), then Dense + SiLU + Dense to `4 * channels`;
- `ResBlock`: GroupNorm, SiLU, 3x3 conv, GroupNorm scaled and shifted per channel by the time embedding
  (AdaGN: Dhariwal and Nichol 2021, Sec. 3), SiLU, 3x3 conv, added to the input (a 1x1 conv when the
  channel count changes) (DDPM App. B, the Wide ResNet block with GroupNorm of Wu and He 2018);
- resolutions 16 -> 8 -> 4 (`channel_mult` per level, `blocks` ResBlocks each, 3x3 stride-2 conv down, nearest
  upsampling + 3x3 conv up), each encoder activation concatenated into the decoder at its resolution;
- the middle at 4x4: ResBlock, optional single-head self-attention (`attention=True`, DDPM uses it at 16x16 of
  32x32 images), ResBlock;
- output: GroupNorm, SiLU, a 3x3 conv to 3 channels initialised to zero (the untrained model predicts eps = 0, as
  in DDPM's code), eps prediction.

`apply(params, x [n, 16, 16, 3], t [n] or scalar) -> eps [n, 16, 16, 3]`, batched; `networks.model_fn(apply,
params)` is the samplers' one-sample model_fn for it (a `jax.tree_util.Partial` whose params are traced inputs).
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.diffusion.networks import sinusoidal_embedding


class Conv(nn.Module):
    """A k x k convolution (SAME padding, optional stride 2) as one matmul over the k*k shifted copies of the input
    (im2col). The same function as `nn.Conv` with a [k, k, C_in, C_out] kernel and a bias; written as a matmul
    because XLA:CPU runs convolutions (their gradients especially) several times slower inside a while loop than
    outside it (measured here: ~0.4 s against ~0.05 s per Adam step), and training runs in `lax.scan` chunks."""

    features: int
    size: int = 3
    stride: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        n, hgt, wid, c = x.shape
        k, pad = self.size, self.size // 2
        kernel = self.param("kernel", self.kernel_init, (k, k, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        cols = jnp.concatenate([xp[:, i:i + hgt:self.stride, j:j + wid:self.stride] for i in range(k)
                                for j in range(k)], axis=-1)  # [n, H/stride, W/stride, k*k*C], (i, j, c) order
        return cols @ kernel.reshape(k * k * c, self.features) + bias


def _groups(channels: int, groups: int) -> int:
    """The largest group count <= `groups` that divides `channels` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class ResBlock(nn.Module):
    channels: int
    groups: int = 8

    @nn.compact
    def __call__(self, x, emb):
        h = nn.silu(nn.GroupNorm(_groups(x.shape[-1], self.groups))(x))
        h = Conv(self.channels)(h)
        # the time enters as a scale and shift AFTER the normalisation (AdaGN, Dhariwal and Nichol 2021, Sec. 3):
        # a shift added before GroupNorm is removed by it when a group holds one channel
        scale, shift = jnp.split(nn.Dense(2 * self.channels)(nn.silu(emb))[:, None, None, :], 2, axis=-1)
        h = nn.GroupNorm(_groups(self.channels, self.groups))(h) * (1.0 + scale) + shift
        h = nn.silu(h)
        h = Conv(self.channels)(h)
        skip = x if x.shape[-1] == self.channels else Conv(self.channels, size=1)(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the spatial positions, residual (DDPM App. B)."""

    groups: int = 8

    @nn.compact
    def __call__(self, x):
        n, hgt, wid, c = x.shape
        h = nn.GroupNorm(_groups(c, self.groups))(x).reshape(n, hgt * wid, c)
        h = nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=c, out_features=c)(h)  # self: q = k = v
        return x + h.reshape(n, hgt, wid, c)


class UNet(nn.Module):
    """eps_theta(x_t, t) for images x [n, H, W, C] with H, W divisible by 2^(levels - 1) (module docstring)."""

    channels: int = 16
    channel_mult: Sequence[int] = (1, 2, 2)
    blocks: int = 1
    attention: bool = False
    groups: int = 8
    embed_dim: int = 32

    @nn.compact
    def __call__(self, x, t):
        if jnp.ndim(x) != 4:
            raise ValueError(f"x must be [batch, height, width, channels], got shape {jnp.shape(x)}")
        if self.channels < 1 or not self.channel_mult or self.blocks < 1:
            raise ValueError(f"channels, channel_mult and blocks must be positive, got {self.channels!r}, "
                             f"{self.channel_mult!r}, {self.blocks!r}")
        if self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"embed_dim must be a positive even number, got {self.embed_dim!r}")
        scale = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % scale or x.shape[2] % scale:
            raise ValueError(f"height and width must be divisible by {scale} ({len(self.channel_mult)} levels), got "
                             f"shape {x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        emb = sinusoidal_embedding(1000.0 * t, self.embed_dim)
        emb = nn.Dense(4 * self.channels)(nn.silu(nn.Dense(4 * self.channels)(emb)))

        h = Conv(self.channels)(x)
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.blocks):
                h = ResBlock(self.channels * mult, self.groups)(h, emb)
                skips.append(h)
            if level < len(self.channel_mult) - 1:
                h = Conv(h.shape[-1], stride=2)(h)
                skips.append(h)
        h = ResBlock(h.shape[-1], self.groups)(h, emb)
        if self.attention:
            h = SelfAttention(self.groups)(h)
        h = ResBlock(h.shape[-1], self.groups)(h, emb)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for _ in range(self.blocks + 1):
                h = ResBlock(self.channels * mult, self.groups)(jnp.concatenate([h, skips.pop()], axis=-1), emb)
            if level > 0:
                n, hgt, wid, c = h.shape
                h = jax.image.resize(h, (n, 2 * hgt, 2 * wid, c), "nearest")
                h = Conv(c)(h)
        h = nn.silu(nn.GroupNorm(_groups(h.shape[-1], self.groups))(h))
        return Conv(x.shape[-1], kernel_init=nn.initializers.zeros)(h)


def num_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


__all__ = ["ResBlock", "SelfAttention", "UNet", "num_params"]
