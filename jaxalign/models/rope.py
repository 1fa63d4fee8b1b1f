"""Scaled rotary position embeddings: the inverse frequencies of each `rope_type` transformers 5.24 defines
(modeling_rope_utils) besides the default, and the rotation with given frequencies and YaRN's attention factor.

`jaxalign.models.llama.rope_inverse_frequencies` picks one for a `ModelConfig`. The static types (linear, llama3,
yarn) are computed once in float64 with NumPy and used as float32 constants; dynamic NTK depends on the positions of
the batch and is computed in the traced program.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def scaled_rotary_embedding(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                            attention_factor: float = 1.0) -> jax.Array:
    """`rotary_embedding` with given inverse frequencies [head_dim/2], cos and sin multiplied by
    `attention_factor` (YaRN's sqrt(1/t), Peng et al. 2023, section 3.4: on queries and keys alike, so the
    attention logits are scaled by 1/t)."""
    half = x.shape[-1] // 2
    angles = positions[..., None].astype(jnp.float32) * inv_freq.astype(jnp.float32)
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def base_frequencies(theta: float, dim: int) -> np.ndarray:
    """theta^(-2i/d), i < d/2: RoFormer's frequencies (Su et al. 2021, section 3.2), float64."""
    return 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def llama3_frequencies(theta: float, dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_len: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent rotary scaling (The Llama 3 Herd of Models, Grattafiori et al. 2024, long-context
    pre-training; the formula of the released Llama 3.1 models, which transformers 5.24 implements as "llama3"): a
    frequency whose wavelength 2 pi / f exceeds L / low_freq_factor is divided by the factor s; one whose
    wavelength is below L / high_freq_factor is kept; in between, f' = (1 - a) f / s + a f with the smoothing
    a = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    inv = base_frequencies(theta, dim)
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def yarn_frequencies(theta: float, dim: int, factor: float, original_max_len: int, beta_fast: float,
                     beta_slow: float, truncate: bool = True) -> np.ndarray:
    """YaRN's "NTK-by-parts" frequencies (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large
    Language Models", section 3.2): dimension d rotates
    r(d) = L / lambda_d times over the pre-training length L; dimensions with r < beta_slow are interpolated
    (f / s), those with r > beta_fast kept (extrapolated), and a linear ramp gamma over the dimension index blends
    the two: f' = (1 - gamma) f / s + gamma f. The ramp's bounds are the (fractional) dimensions where
    r = beta_fast and r = beta_slow, rounded outward when `truncate`."""
    inv = base_frequencies(theta, dim)

    def dimension_for(rotations):  # d at which r(d) = rotations, solving L / (2 pi theta^(2d/D)) = rotations
        return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_for(beta_fast), dimension_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a degenerate ramp would divide by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    return inv / factor * (1 - keep) + inv * keep


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's attention temperature as a multiplier of cos/sin: sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023,
    section 3.4); with DeepSeek-V2's mscale/mscale_all_dim the ratio of two such terms (as transformers resolves
    an absent `attention_factor`)."""
    def term(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(term(factor, mscale) / term(factor, mscale_all_dim))
    return term(factor)


def dynamic_ntk_frequencies(theta: float, dim: int, factor: float, original_max_len: int,
                            positions: jax.Array) -> jax.Array:
    """Dynamic NTK-aware scaling ("Dynamic NTK" interpolation, Peng et al. 2023, section 3.3): for a sequence of
    length l = max(positions) + 1 > L the base becomes
    theta (s l / L - (s - 1))^(d / (d - 2)); up to L it is unchanged. Computed per call from the positions of the
    whole batch, and with a key/value cache from the positions of the chunk being decoded (transformers does the
    same per call, but keeps the largest length seen on its module until a shorter-than-L call; a fresh module
    matches this)."""
    seq_len = jnp.maximum(jnp.max(positions) + 1, original_max_len).astype(jnp.float32)
    base = theta * (factor * seq_len / original_max_len - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
