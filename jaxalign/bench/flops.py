"""FLOP counts of a Llama-style decoder and DPO step, and the dense-matmul FLOP/s this machine reaches.

Counting convention (Kaplan et al., 2020, sec. 2.1; Chowdhery et al., 2022 "PaLM", appendix B): a multiply-add is
2 FLOPs, only matmuls are counted (norms, rotary embeddings, softmax, activations, the embedding gather and the
optimizer update are O(d_model) per token or per parameter and left out), and a training step costs 3x its forward
pass (the backward pass computes gradients with respect to both activations and weights, 2x the forward).

For a model with N matmul weights (excluding the input embedding) and context length T, the training FLOPs per
token are 6 N + 12 n_layers n_heads head_dim T, PaLM's formula with grouped-query projections and a SwiGLU MLP
plugged into N. Model FLOPs utilisation (MFU) is tokens/s times this, divided by a peak FLOP/s; here the peak is the
dense-matmul rate measured in the same process by `measure_matmul_flops`, the practical ceiling of the machine.
"""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["decoder_matmul_params", "decoder_flops_per_token", "dpo_step_flops", "measure_matmul_flops"]


def decoder_matmul_params(cfg: Any) -> int:
    """Weights that take part in a matmul per token: all projections plus the LM head, not the embedding gather.

    Per layer: q (d_model x n_heads*head_dim), k and v (d_model x n_kv_heads*head_dim each), o (n_heads*head_dim x
    d_model) and the SwiGLU MLP's gate, up and down (3 x d_model x mlp_dim). Plus the LM head d_model x vocab_size,
    counted whether or not it is tied to the input embedding (tying shares storage, not compute).
    """
    q_o = 2 * cfg.d_model * cfg.n_heads * cfg.head_dim
    k_v = 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
    mlp = 3 * cfg.d_model * cfg.mlp_dim
    return cfg.n_layers * (q_o + k_v + mlp) + cfg.d_model * cfg.vocab_size


def _forward_flops_per_token(cfg: Any, seq_len: int) -> float:
    # 2 FLOPs per weight per token, plus the attention scores q.k (2 * seq_len * n_heads * head_dim) and the
    # weighted sum of values (the same again), per layer. seq_len is the full context length; no causal halving.
    attention = 2 * 2 * seq_len * cfg.n_heads * cfg.head_dim
    return float(2 * decoder_matmul_params(cfg) + cfg.n_layers * attention)


def decoder_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token of a Llama-style decoder at context length seq_len.

        forward  = 2 * N + n_layers * 4 * seq_len * n_heads * head_dim
        N        = n_layers * (2 d h_q + 2 d h_kv + 3 d m) + d V
        training = 3 * forward                         (= 6 N + 12 n_layers n_heads head_dim seq_len)

    with d = d_model, h_q = n_heads * head_dim, h_kv = n_kv_heads * head_dim, m = mlp_dim, V = vocab_size.

    The attention term counts the full seq_len x seq_len score and value matmuls, without halving for the causal
    mask, as PaLM appendix B does (dense attention kernels compute the masked half anyway); at seq_len << 6 d_model
    it is a small correction either way. The LM head is counted at every position.

    `cfg` is any object with attributes vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, mlp_dim
    (e.g. `jaxalign.models.llama.ModelConfig`).
    """
    return 3.0 * _forward_flops_per_token(cfg, seq_len)


def dpo_step_flops(cfg: Any, batch_pairs: int, seq_len: int, with_reference: bool = True) -> float:
    """FLOPs of one DPO step on batch_pairs (chosen, rejected) pairs of seq_len tokens each (prompt + completion).

    The policy runs forward and backward (3x forward) on all 2 * batch_pairs sequences; the frozen reference model,
    if with_reference, runs one forward (1x) on the same sequences. Reference log-probs precomputed offline would
    be with_reference=False.
    """
    tokens = 2 * batch_pairs * seq_len
    forward = _forward_flops_per_token(cfg, seq_len)
    return tokens * (3.0 * forward + (forward if with_reference else 0.0))


def measure_matmul_flops(n: int = 1024, dtype: Any = jnp.float32, repeats: int = 5, min_seconds: float = 0.05) -> float:
    """Dense-matmul FLOP/s of a jitted `jnp.dot` of two n x n matrices on JAX's default device, in this process.

    2 n^3 FLOPs per product. After compiling and warming up, each of `repeats` timings launches the product
    back-to-back enough times to take at least `min_seconds` (so dispatch overhead does not dominate on fast
    accelerators), blocks until the last result is ready, and the best timing is returned: the practical ceiling,
    not a datasheet peak. Uses JAX's default matmul precision for `dtype`, as the model's own matmuls do.
    """
    if n <= 0 or repeats <= 0:
        raise ValueError(f"n and repeats must be positive, got n={n}, repeats={repeats}")
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (n, n), dtype)
    y = jax.random.normal(ky, (n, n), dtype)
    matmul = jax.jit(jnp.dot)

    def timed(number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            out = matmul(x, y)
        out.block_until_ready()
        return time.perf_counter() - start

    timed(2)  # compile and warm up
    number = 1
    while (elapsed := timed(number)) < min_seconds and number < 1 << 16:
        number *= 2
    best = min([elapsed / number] + [timed(number) / number for _ in range(repeats - 1)])
    flops = 2.0 * n**3 / best
    if not math.isfinite(flops) or flops <= 0:
        raise RuntimeError(f"matmul timing gave {best} s for n={n}; cannot derive a FLOP/s figure")
    return flops
