"""FLOP counting against a hand count, and the matmul ceiling measurement (no speed assertions)."""
import math
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from jaxalign.bench import flops

# vocab 10, d_model 4, 2 layers, 2 query heads and 1 key/value head of dim 3, mlp 5
TINY = SimpleNamespace(vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=3, mlp_dim=5)


def test_matmul_params_hand_count():
    # per layer: q 4*6=24, k 4*3=12, v 12, o 6*4=24, MLP 3*4*5=60 -> 132; two layers 264; LM head 4*10=40
    assert flops.decoder_matmul_params(TINY) == 304


def test_decoder_flops_per_token_hand_count():
    # forward: 2*304 = 608 for the weights, plus attention 2 layers * (2*7*2*3 scores + 2*7*2*3 values) = 336 at
    # seq_len 7 -> 944; training = 3x
    assert flops.decoder_flops_per_token(TINY, seq_len=7) == 3 * 944
    # the attention term grows linearly with the context length: 2 layers * 4 * 2 heads * 3 dims * 3 = 144 fwd FLOPs
    assert flops.decoder_flops_per_token(TINY, seq_len=10) - flops.decoder_flops_per_token(TINY, seq_len=7) == 3 * 144


def test_decoder_flops_matches_palm_formula():
    cfg = SimpleNamespace(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                          mlp_dim=14336)
    n = flops.decoder_matmul_params(cfg)
    t = 2048
    assert flops.decoder_flops_per_token(cfg, t) == pytest.approx(6 * n + 12 * 32 * 32 * 128 * t)


def test_dpo_step_flops():
    per_token_fwd = flops.decoder_flops_per_token(TINY, 7) / 3
    tokens = 2 * 3 * 7  # 3 pairs, chosen and rejected
    assert flops.dpo_step_flops(TINY, batch_pairs=3, seq_len=7) == pytest.approx(tokens * 4 * per_token_fwd)
    assert flops.dpo_step_flops(TINY, 3, 7, with_reference=False) == pytest.approx(tokens * 3 * per_token_fwd)


def test_measure_matmul_flops_positive_finite():
    value = flops.measure_matmul_flops(n=64, dtype=jnp.float32, repeats=2, min_seconds=0.001)
    assert math.isfinite(value) and value > 0


def test_measure_matmul_flops_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        flops.measure_matmul_flops(n=0)
