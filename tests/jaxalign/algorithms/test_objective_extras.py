"""`build_extras`: the pairs plus what an objective's declared extras call for (`BUILDERS`), each product built
once per content hash of (SFT parameters, pair arrays, producing config) and read back from the cache after."""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxalign.algorithms import objective_extras
from jaxalign.algorithms.objective_extras import BUILDERS, build_extras, builders_for
from jaxalign.models.llama import ModelConfig, init_params
from jaxalign.testing import float64_sequence_logprobs, random_pairs
from jaxalign.train.reference import content_key

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, max_len=8)
PAIRS = 6
PROMPT = 2


@functools.lru_cache(maxsize=None)
def params(seed: int = 0):
    return nn.meta.unbox(init_params(CFG, jax.random.key(seed)))


@functools.lru_cache(maxsize=None)
def pairs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = random_pairs(rng, [1, 3, 5, 6, 2, 4], [4, 2, 6, 1, 3, 5], width=8, prompt_len=PROMPT, vocab_size=16)
    out["chosen_score"] = rng.uniform(1, 4, PAIRS).astype(np.float32)
    out["rejected_score"] = rng.uniform(-0.5, 2, PAIRS).astype(np.float32)
    return out


def _numpy_sequence_logprobs(p, tokens, attention, completion) -> np.ndarray:
    return float64_sequence_logprobs(CFG, p, tokens, attention, completion)


def _build(objective, cache_dir, **overrides):
    kwargs = dict(cache_dir=str(cache_dir), sft_params=params(0), model_cfg=CFG, batch_size=4, seed=0,
                  prompt_len=PROMPT, reference_mode="online", show_progress=False)
    return build_extras(objective, pairs(), **{**kwargs, **overrides})


def test_build_extras_builds_once_per_content_hash(tmp_path, monkeypatch):
    """Same SFT parameters, pairs and description: the cached arrays are read back and the builder is not called;
    other parameters: rebuilt under another key. The file is named by the content key of the pair arrays."""
    calls = []
    real = objective_extras.semantic_distance_extras
    monkeypatch.setattr(objective_extras, "semantic_distance_extras",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    first = _build("sem_dpo", tmp_path)
    again = _build("sem_dpo", tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["semantic_distance"], again["semantic_distance"])
    assert first["semantic_distance"].shape == (PAIRS,) and np.all((first["semantic_distance"] >= 0))
    key = content_key(params(0), pairs(), {"extras": "semantic_distance"})
    assert os.listdir(tmp_path) == [f"extras_semantic_distance-{key[:32]}.npz"]
    assert set(first) == set(pairs()) | {"semantic_distance"}  # the pairs are returned with the extra added
    _build("sem_dpo", tmp_path, sft_params=params(1))
    assert len(calls) == 2 and len(os.listdir(tmp_path)) == 2


def test_guidance_is_trained_only_on_a_cache_miss(tmp_path):
    trained = []

    def train_guidance():
        trained.append(1)
        return params(1)

    description = {"config": {"objective": "sigmoid", "steps": 3}}
    first = _build("tgdpo", tmp_path, train_guidance=train_guidance, guidance_description=description)
    again = _build("tgdpo", tmp_path, train_guidance=train_guidance, guidance_description=description)
    assert len(trained) == 1
    np.testing.assert_array_equal(first["guidance_chosen"], again["guidance_chosen"])
    key = content_key(params(0), pairs(), {"extras": "guidance", **description})  # the description is the key's
    assert os.listdir(tmp_path) == [f"extras_guidance-{key[:32]}.npz"]
    assert first["guidance_chosen"].shape == pairs()["chosen_tokens"].shape
    _build("tgdpo", tmp_path, train_guidance=train_guidance, guidance_description={"config": {"steps": 4}})
    assert len(trained) == 2  # another description is another key
    with pytest.raises(ValueError, match="pass train_guidance"):
        _build("tgdpo", tmp_path / "other")


def test_reward_model_key_covers_its_config_and_seed(tmp_path, monkeypatch):
    calls = []

    def fake(cfg, model_cfg, sft_params, arrays, seed, batch_size, show_progress):
        calls.append(seed)
        n = len(arrays["chosen_tokens"])
        return {"reward_margin": np.full(n, seed, np.float32), "preference_probability": np.zeros(n, np.float32),
                "reward_model_heldout_accuracy": np.ones(n, np.float32)}

    monkeypatch.setattr(objective_extras, "reward_model_extras", fake)
    for seed in (0, 0, 1):
        _build("madpo", tmp_path, seed=seed)
    assert calls == [0, 1]
    assert builders_for("madpo") == builders_for("smpo") == [BUILDERS["reward_margin"]]


def test_mismatched_sequences_and_the_cached_kl_reference(tmp_path):
    online = _build("kto", tmp_path)
    assert {"kl_tokens", "kl_attention_mask", "kl_completion_mask"} <= set(online) and "kl_reference" not in online
    b = pairs()
    np.testing.assert_array_equal(online["kl_tokens"][0, :PROMPT], b["chosen_tokens"][0, :PROMPT])
    np.testing.assert_array_equal(online["kl_tokens"][0, PROMPT:], b["chosen_tokens"][1, PROMPT:])
    cached = _build("kto", tmp_path, reference_mode="cached")
    expected = _numpy_sequence_logprobs(params(0), cached["kl_tokens"], cached["kl_attention_mask"],
                                        cached["kl_completion_mask"])
    np.testing.assert_allclose(cached["kl_reference"], expected, rtol=1e-4, atol=1e-5)
    assert not os.listdir(tmp_path)  # cheap: not cached on disk


def test_objectives_reading_only_log_probs_or_data_get_the_pairs_back(tmp_path):
    out = _build("sigmoid", tmp_path)
    assert set(out) == set(pairs()) and not os.listdir(tmp_path)
    assert [builder.kind for builder in builders_for("dro")] == ["reward"]
    _build("dro", tmp_path)  # the pairs carry chosen_score / rejected_score
    with pytest.raises(ValueError, match="lack chosen_score, rejected_score"):
        build_extras("dro", {k: v for k, v in pairs().items() if not k.endswith("_score")}, cache_dir=str(tmp_path),
                     sft_params=params(0), model_cfg=CFG, batch_size=4, seed=0)
