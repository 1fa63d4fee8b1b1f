"""BRAIn on ARITH (jaxalign.experiments.brain_arith): at n = 2 with one-hot targets the training loss (through the
experiment's loss function, one forward pass) is sigmoid DPO with beta = 1 and the proposal as reference, loss and
gradients; the rewards and training rows; two iterations where the second samples the first's iterate and uses it as
the proposal; the claim and the config errors."""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxalign.distributed import host_local
from jaxalign.experiments import brain_arith
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.overrides import apply_overrides
from jaxalign.sharding import make_mesh
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.loop import MetricsLog
from jaxalign.train.step import dpo_loss_fn
from jaxalign.rundir import params_sha256
from jaxalign.experiments import arith_kit as kit
from jaxalign.experiments.arith_kit import comparison

TOK = CharTokenizer()
PL, C = kit.PROMPT_LEN, kit.COMPLETION_LEN
MODEL = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32,
                    max_len=PL + C)


def _params(seed: int, scale: float = 0.3):
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(MODEL, key)), jax.random.key(0))
    draw = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: (scale * draw.standard_normal(x.shape)).astype(np.float32), shapes)


def _samples(problems, texts_per_problem):
    """(prompt tokens [P, PL], completions [P, n, C], masks [P, n, C]) of the given completion texts."""
    tokens, masks = [], []
    for texts in texts_per_problem:
        for text in texts:
            ids = TOK.encode(text) + [TOK.EOS_ID]
            row = np.full(C, TOK.PAD_ID, np.int32)
            row[: len(ids)] = ids
            tokens.append(row)
            masks.append((np.arange(C) < len(ids)).astype(np.int32))
    p, n = len(texts_per_problem), len(texts_per_problem[0])
    prompts, _ = arith.encode_prompts(TOK, [arith.prompt_text(q) for q in problems], PL)
    return prompts, np.stack(tokens).reshape(p, n, C), np.stack(masks).reshape(p, n, C)


PROBLEMS = np.array([[7, 5, 3, 9], [1, 2, 3, 0], [8, 8, 8, 8], [2, 2, 2, 2]])
TEXTS = [
    ["7+5=12;12+3=15;15+9=24", "7+5=2;2+3=5;5+9=14"],  # graded 6 vs 0
    ["1+2=3;3+3=6;6+0=6"] * 2,  # tied: dropped
    ["8+8=6;6+8=4;4+8=2", "8+8=16;16+8=24;24+8=32"],  # 0 vs 6: the better sample second
    ["2+2=4;4+2=6", "2+2=4;4+2=6;6+2=8"],  # incomplete (4 - 1 for malformed) vs correct (6)
]


def test_rewards_are_the_graded_judge_over_six_or_binary():
    problems = np.repeat(PROBLEMS[:1], 3, axis=0)
    texts = ["7+5=12;12+3=15;15+9=24", "7+5=12;12+3=15;15+9=25", "7+5=12"]
    np.testing.assert_allclose(brain_arith.reward_fn("graded")(problems, texts), [1.0, 4 / 6, 1 / 6])
    np.testing.assert_allclose(brain_arith.reward_fn("binary")(problems, texts), [1.0, 0.0, 0.0])


def test_at_n2_with_one_hot_targets_the_training_loss_is_dpo_with_beta_one():
    """Rows of a later iteration (proposal = the sampling policy, not the SFT model); with beta tiny the posterior
    weights are exactly one-hot, and the experiment's loss function equals `dpo_loss_fn`'s sigmoid DPO at beta 1
    against the proposal, chosen = the better-rewarded sample: the same total, count and gradients."""
    sft, latest, policy = _params(0), _params(1), _params(2)
    cfg = brain_arith.BRAInConfig(base=kit.ArithDPOConfig(model=MODEL, eval_batch_size=4), beta=1e-3)
    prompts, completions, masks = _samples(PROBLEMS, TEXTS)
    data, stats = brain_arith.brain_method(cfg, sft).make_data(1, latest, PROBLEMS, prompts, completions, masks)
    assert stats["lists"] == 3 and stats["dropped_tied"] == 1
    a = data.arrays
    np.testing.assert_allclose(a[brain_arith.REWARDS_KEY], [[1, 0], [0, 1], [3 / 6, 1]], rtol=1e-6)
    sft_logps = comparison.frozen_list_logprobs(MODEL, sft, a, 4)
    np.testing.assert_allclose(a[brain_arith.SFT_KEY], sft_logps, atol=1e-6)
    np.testing.assert_allclose(a[brain_arith.PROPOSAL_KEY], comparison.frozen_list_logprobs(MODEL, latest, a, 4),
                               atol=1e-6)
    assert not np.allclose(a[brain_arith.PROPOSAL_KEY], sft_logps, atol=1e-2)  # q is not the SFT model here

    rows = np.arange(3)
    best = a[brain_arith.REWARDS_KEY].argmax(1)
    np.testing.assert_array_equal(best, [0, 1, 1])
    pairs = {}
    for side, pick in (("chosen", best), ("rejected", 1 - best)):
        for key in ("tokens", "attention_mask", "completion_mask"):
            pairs[f"{side}_{key}"] = a[f"list_{key}"][rows, pick]
        pairs[f"reference_{side}"] = a[brain_arith.PROPOSAL_KEY][rows, pick]

    brain_loss = jax.jit(jax.value_and_grad(brain_arith.brain_loss_fn(DecoderLM(MODEL), 1e-3), has_aux=True))
    dpo_loss = jax.jit(jax.value_and_grad(dpo_loss_fn(DecoderLM(MODEL), "sigmoid", beta=1.0), has_aux=True))
    (brain_total, (brain_count, metrics)), brain_grads = brain_loss(policy, None, a)
    (dpo_total, (dpo_count, _)), dpo_grads = dpo_loss(policy, None, pairs)
    assert float(metrics["brain/target_max"]) == 1.0  # one-hot
    assert float(brain_count) == float(dpo_count) == 3
    assert float(brain_total) > 0.1  # not a trivial zero
    np.testing.assert_allclose(float(brain_total), float(dpo_total), rtol=1e-5)
    for g_brain, g_dpo in zip(jax.tree_util.tree_leaves(brain_grads), jax.tree_util.tree_leaves(dpo_grads)):
        np.testing.assert_allclose(g_brain, g_dpo, rtol=1e-4, atol=1e-6)

    # the soft weights of a moderate beta are not one-hot, and the loss is then no longer DPO's
    (soft_total, (_, soft_metrics)), _ = jax.jit(jax.value_and_grad(
        brain_arith.brain_loss_fn(DecoderLM(MODEL), 1.0), has_aux=True))(policy, None, a)
    assert float(soft_metrics["brain/target_max"]) < 0.99
    assert abs(float(soft_total) - float(dpo_total)) > 1e-3


STEPS = 3
OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=64", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=128",
    "base.sft.steps=80", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=5",
    "base.pairs.samples_per_prompt=4",
    "base.dpo.batch_size=8", "base.dpo.list_batch_size=4", f"base.dpo.eval_every={STEPS}",
    "base.dpo.optim.learning_rate=1e-3", "base.dpo.optim.warmup_steps=1",
    "base.num_val_prompts=64", "base.eval_fraction=0.064", "base.eval_batch_size=64", "num_kl_prompts=64",
    f"base.checkpoint.every_steps={STEPS}", "base.show_progress=false",
    "iterations=2", "prompts_per_iteration=64", f"steps_per_iteration={STEPS}",
]


def test_the_second_iteration_samples_the_first_iterate_and_uses_it_as_the_proposal(tmp_path):
    cfg = apply_overrides(brain_arith.BRAInConfig(), OVERRIDES)
    base = cfg.base
    mesh, problems = make_mesh(base.mesh), kit.split(base)
    sft, _ = kit.train_sft(base, mesh, problems, str(tmp_path), MetricsLog(str(tmp_path / "m.jsonl")))
    sft = host_local(sft)
    records = comparison.train_method(cfg, brain_arith.brain_method(cfg, sft), mesh, sft, problems,
                                      str(tmp_path))
    first, second = records
    assert first["sampling_sha256"] == params_sha256(sft)
    assert second["sampling_sha256"] == first["params_sha256"] != second["params_sha256"]
    assert first["kl_to_old"] == first["kl_to_sft"] and second["kl_to_old"] != second["kl_to_sft"]
    assert (tmp_path / "samples_sft.npz").exists() and (tmp_path / "brain" / "iter_1" / "samples.npz").exists()
    data = [kit.load_dataset(str(tmp_path / "brain" / f"iter_{t}" / "data.npz"))[0].arrays for t in (0, 1)]
    np.testing.assert_array_equal(data[0][brain_arith.PROPOSAL_KEY], data[0][brain_arith.SFT_KEY])
    assert not np.allclose(data[1][brain_arith.PROPOSAL_KEY], data[1][brain_arith.SFT_KEY])
    for t, record in enumerate(records):
        assert record["lists"] == record["train_rows"] == len(data[t][brain_arith.REWARDS_KEY])
        assert record["lists"] + record["dropped_tied"] == 64
        logged = MetricsLog(os.path.join(tmp_path, "brain", f"iter_{t}", "metrics.jsonl")).records("dpo")
        assert any("brain/effective_samples" in r for r in logged)


def test_the_claim_is_computed_from_the_accuracies():
    def comparison(brain, dpo):
        return {"brain": {"accuracy": brain}, "dpo": {"accuracy": dpo}}

    sentence, holds = brain_arith.judge_brain_claim(comparison(0.6, 0.5))
    assert holds is True and "BRAIn" in sentence
    assert brain_arith.judge_brain_claim(comparison(0.5, 0.5))[1] is False
    assert brain_arith.judge_brain_claim(comparison(0.4, 0.5))[1] is False


@pytest.mark.parametrize("overrides, message", [
    (["judge=score"], "judge must be one of"),
    (["beta=0"], "brain_arith.beta must satisfy beta > 0"),
    (["steps_per_iteration=0"], "steps_per_iteration must be an integer >= 1"),
    (["base.dpo.reference=sync"], "base.dpo.reference=sync"),
])
def test_bad_configs_are_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(brain_arith.BRAInConfig(), OVERRIDES + overrides)
