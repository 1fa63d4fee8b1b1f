"""TRPA on ARITH (jaxalign.experiments.trpa_arith, jaxalign.tasks.levels): the rule-based levels, the loss function
against an independent computation from separate forward passes, the training rows of a later iteration (pi_old is
the sampling policy, the reference stays the SFT model), and a tiny end-to-end run against DPO on the same samples,
resumed without sampling again."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxalign.experiments import trpa_arith
from jaxalign.logprobs import masked_token_logprobs
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.overrides import apply_overrides
from jaxalign.tasks import arith, levels
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.loop import MetricsLog
from jaxalign.experiments import arith_kit as kit

TOK = CharTokenizer()
PL, C = kit.PROMPT_LEN, kit.COMPLETION_LEN
OPS = np.array([7, 5, 3, 9])  # 7+5=12;12+3=15;15+9=24


@pytest.mark.parametrize("text, level", [
    ("7+5=12;12+3=15;15+9=24", levels.CORRECT),
    ("7+5=12;12+3=15;15+9=24;24;24", levels.CORRECT),  # recaps are neutral
    ("7+5=2;2+3=5;5+9=14", levels.WRONG),  # dropped carries: complete, parseable, wrong
    ("7+5=12;12+3=15;15+9=25", levels.WRONG),
    ("7+5=12;12+3=15;15+9=24;25", levels.MALFORMED),  # a tail that is not a recap
    ("7+5=12;12+3=15", levels.INCOMPLETE),
    ("7+5=13", levels.INCOMPLETE),  # a well-formed prefix, even if wrong
    ("", levels.MALFORMED),
    ("7+5=12;12+3=", levels.MALFORMED),  # a step cut mid-way
    ("7+5=12;;15+9=24", levels.MALFORMED),
    ("7+5=12;12+3=15;15+9=24;24+1=25", levels.MALFORMED),
    ("7+5=1a;12+3=15;15+9=24", levels.MALFORMED),
])
def test_levels_follow_the_oracle_and_the_syntax(text, level):
    assert levels.trpa_level(OPS, text) == level
    grade = arith.grade(OPS, text)
    assert levels.trpa_level(OPS, text, grade) == level
    assert (level <= levels.WRONG) == grade.well_formed  # the well-formed chains are exactly levels 1 and 2


def test_level_helpers_vectorise_and_count():
    texts = ["7+5=12;12+3=15;15+9=24", "7+5=12", "x", "7+5=2;2+3=5;5+9=14", "7+5=12"]
    got = levels.trpa_levels(np.repeat(OPS[None], len(texts), axis=0), texts)
    np.testing.assert_array_equal(got, [1, 3, 4, 2, 3])
    assert got.dtype == np.int32
    assert levels.level_counts(got) == {"correct": 1, "wrong": 1, "incomplete": 2, "malformed": 1}
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        levels.trpa_levels(np.repeat(OPS[None], 2, axis=0), texts[:1])


# ---------------------------------------------------------------------------------------------------------------
# the loss function and the training rows

MODEL = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32,
                    max_len=PL + C)


def _params(seed: int, scale: float = 0.3):
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(MODEL, key)), jax.random.key(0))
    draw = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: (scale * draw.standard_normal(x.shape)).astype(np.float32), shapes)


def _encode(texts_per_problem):
    """(prompt tokens [P, PL], completions [P, K, C], masks [P, K, C]) of the given completion texts."""
    tokens, masks = [], []
    for texts in texts_per_problem:
        for text in texts:
            ids = TOK.encode(text) + [TOK.EOS_ID]
            row = np.full(C, TOK.PAD_ID, np.int32)
            row[: len(ids)] = ids
            tokens.append(row)
            masks.append((np.arange(C) < len(ids)).astype(np.int32))
    k = len(texts_per_problem[0])
    return (np.stack(tokens).reshape(len(texts_per_problem), k, C), np.stack(masks).reshape(len(texts_per_problem), k, C))


PROBLEMS = np.array([[7, 5, 3, 9], [1, 2, 3, 0], [8, 8, 8, 8]])
TEXTS = [
    ["7+5=12;12+3=15;15+9=24", "7+5=2;2+3=5;5+9=14", "7+5=12", "7+"],  # levels 1, 2, 3, 4
    ["1+2=3;3+3=6;6+0=6"] * 4,  # all correct: one level, no pair, dropped
    ["8+8=6;6+8=4;4+8=2", "8+8=16;16+8=24;24+8=32", "8+8=16;16+8=24;24+8=32", "8+8=16"],  # 2, 1, 1, 3
]


@jax.jit
def _one_sequence(params, tokens, attention, completion):
    logits = DecoderLM(MODEL).apply({"params": params}, tokens[None], attention[None])[0]
    return masked_token_logprobs(logits, tokens[None], completion[None])[0]


def _sequence_logprobs(params, tokens, attention, completion):
    """Per-token log-probs of ONE sequence from its own forward pass (an independent path from the loss's)."""
    return np.asarray(_one_sequence(params, tokens, attention, completion))


def test_trpa_rows_of_a_later_iteration_and_the_loss_against_separate_forward_passes():
    """At t > 0 the lists carry the frozen SFT model's log-probs as reference and the sampling policy's as pi_old;
    the loss function (one forward pass over the batch) equals TRPA computed by hand from per-sequence passes."""
    sft, latest, policy = _params(0), _params(1), _params(2)
    cfg = trpa_arith.TRPAConfig(base=kit.ArithDPOConfig(model=MODEL, eval_batch_size=4), beta=3.0, kappa=2.5,
                                kl_coef=0.5)
    completions, masks = _encode(TEXTS)
    prompts, _ = arith.encode_prompts(TOK, [arith.prompt_text(p) for p in PROBLEMS], PL)
    data, stats = trpa_arith.trpa_method(cfg, sft).make_data(1, latest, PROBLEMS, prompts, completions, masks)
    assert stats["lists"] == 2 and stats["dropped_single_level"] == 1 and stats["prompts"] == 3
    assert stats["level_correct"] == 7 and stats["level_malformed"] == 1
    a = data.arrays
    np.testing.assert_array_equal(a[trpa_arith.LEVELS_KEY], [[1, 2, 3, 4], [2, 1, 1, 3]])
    for r, p in enumerate([0, 2]):
        for k in range(4):
            assert TOK.decode(a["list_tokens"][r, k, PL:]) == TEXTS[p][k]
            row = [a[key][r, k] for key in ("list_tokens", "list_attention_mask", "list_completion_mask")]
            np.testing.assert_allclose(a[trpa_arith.REFERENCE_KEY][r, k], _sequence_logprobs(sft, *row), atol=1e-5)
            np.testing.assert_allclose(a[trpa_arith.OLD_KEY][r, k], _sequence_logprobs(latest, *row), atol=1e-5)
    # at t = 0 the sampling policy is the SFT model: one set of log-probs serves both
    first, _ = trpa_arith.trpa_method(cfg, sft).make_data(0, sft, PROBLEMS, prompts, completions, masks)
    np.testing.assert_array_equal(first.arrays[trpa_arith.OLD_KEY], first.arrays[trpa_arith.REFERENCE_KEY])

    loss_fn = trpa_arith.trpa_loss_fn(DecoderLM(MODEL), beta=3.0, kl_coef=0.5, kappa=2.5)
    (total, (count, metrics)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(policy, None, a)
    # by hand: l = mean token log-ratio vs the reference, kappa on pairs whose better side is correct, k3 to pi_old
    pol = np.array([[_sequence_logprobs(policy, *[a[key][r, k] for key in ("list_tokens", "list_attention_mask",
                                                                         "list_completion_mask")])
                     for k in range(4)] for r in range(2)])
    mask = a["list_completion_mask"] > 0
    ell = np.where(mask, pol - a[trpa_arith.REFERENCE_KEY], 0).sum(-1) / mask.sum(-1)
    lev = a[trpa_arith.LEVELS_KEY]
    terms = []
    for r in range(2):
        for i in range(4):
            for j in range(4):
                if lev[r, i] < lev[r, j]:
                    h = (2.5 if lev[r, i] == 1 else 1.0) * 3.0 * (ell[r, i] - ell[r, j])
                    terms.append(np.log1p(np.exp(-h)))
    q = np.clip(a[trpa_arith.OLD_KEY] - pol, -10, 10)
    k3 = (np.exp(q) - q - 1)[mask].mean()
    assert len(terms) == 6 + 5 and float(metrics["trpa/pairs"]) == 11
    assert float(count) == 2
    np.testing.assert_allclose(float(total), 2 * (np.mean(terms) + 0.5 * k3), rtol=1e-4)
    norms = [float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


# ---------------------------------------------------------------------------------------------------------------
# end to end

STEPS = 3
OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=32", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=64",
    "base.sft.steps=40", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=5",
    "base.pairs.samples_per_prompt=4",
    "base.dpo.batch_size=8", "base.dpo.list_batch_size=4", f"base.dpo.eval_every={STEPS}",
    "base.dpo.optim.learning_rate=1e-3", "base.dpo.optim.warmup_steps=1",
    # every sampled batch has 64 rows: one compiled sampler per decoding mode
    "base.num_val_prompts=64", "base.eval_fraction=0.064", "base.eval_batch_size=64", "num_kl_prompts=64",
    f"base.checkpoint.every_steps={STEPS}", "base.show_progress=false",
    "iterations=1", "prompts_per_iteration=64", f"steps_per_iteration={STEPS}",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trpa")
    return workdir, trpa_arith.run(apply_overrides(trpa_arith.TRPAConfig(), OVERRIDES), str(workdir))


def test_trpa_and_dpo_train_on_the_same_samples_and_the_claim_follows_the_numbers(finished):
    workdir, results = finished
    trpa, dpo = results["methods"]["trpa"]["iterations"][0], results["methods"]["dpo"]["iterations"][0]
    assert trpa["sampling_sha256"] == dpo["sampling_sha256"]  # both sampled the SFT policy ...
    assert (workdir / "samples_sft.npz").exists()  # ... once, into one shared file
    assert trpa["lists"] == trpa["train_rows"] == dpo["pairs"] == dpo["train_rows"]  # the same prompts
    assert trpa["lists"] + trpa["dropped_single_level"] == trpa["prompts"] == 64
    assert sum(trpa[f"level_{n}"] for n in levels.LEVEL_NAMES.values()) == 64 * 4
    assert trpa["params_sha256"] != dpo["params_sha256"] != trpa["sampling_sha256"]
    assert trpa["kept_step"] == dpo["kept_step"] == STEPS
    for record in (trpa, dpo):
        assert record["kl_to_old"] == record["kl_to_sft"]  # one iteration: pi_old is the SFT model
    comparison = results["comparison"]
    assert set(comparison) == {"trpa", "dpo"}
    for name, record in (("trpa", trpa), ("dpo", dpo)):
        assert comparison[name]["accuracy"] == record["test_accuracy"]
        assert comparison[name]["kl_to_old"] == record["kl_to_old"]
    expected = (comparison["trpa"]["accuracy"] >= comparison["dpo"]["accuracy"] - 0.02
                and comparison["trpa"]["kl_to_old"] < comparison["dpo"]["kl_to_old"])
    assert results["claim_holds"] is expected and "TRPA" in results["claim"]
    assert results["methods"]["trpa"]["accuracy_per_iteration"][0] == results["sft_accuracy"]
    assert (workdir / "trpa_arith.png").stat().st_size > 0
    losses = [r for r in MetricsLog(str(workdir / "trpa" / "iter_0" / "metrics.jsonl")).records("dpo")
              if "trpa/pairs" in r]
    assert losses and all(r["trpa/pairs"] > 0 for r in losses)


def test_a_rerun_trains_and_samples_nothing_again(finished, monkeypatch):
    workdir, expected = finished

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run sampled again")

    monkeypatch.setattr(kit.data, "sample_completions", refuse)
    results = trpa_arith.run(apply_overrides(trpa_arith.TRPAConfig(), OVERRIDES), str(workdir))
    assert results["comparison"] == expected["comparison"] and results["claim_holds"] == expected["claim_holds"]


@pytest.mark.parametrize("overrides, message", [
    (["iterations=0"], "iterations must be an integer >= 1"),
    (["beta=0"], "trpa_arith.beta must satisfy beta > 0"),
    (["kappa=-1"], "kappa must satisfy kappa > 0"),
    (["kl_coef=-0.1"], "kl_coef must satisfy kl_coef >= 0"),
    (["base.lora.rank=4"], "set base.lora.rank=0"),
    (["base.dpo.objective=plackett_luce"], "is listwise"),
])
def test_bad_configs_are_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(trpa_arith.TRPAConfig(), OVERRIDES + overrides)


def test_too_many_prompts_fail_before_sft(tmp_path):
    with pytest.raises(ValueError, match="fresh prompts, but ARITH has"):
        trpa_arith.run(apply_overrides(trpa_arith.TRPAConfig(), OVERRIDES + ["prompts_per_iteration=5000"]),
                       str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
