"""DDO on ARITH end to end on a tiny budget: the loss wrapper against the pure `ddo` (and its closed form at
theta = ref), the (gold, reference sample) rows, the round chain ref <- theta, the continued-SFT baseline on the
same gold rows, the claim computed from the numbers, a re-run that samples and trains nothing again, config errors."""
from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from jaxalign.experiments import ddo_arith
from jaxalign.losses.iterative import ddo
from jaxalign.models.llama import DecoderLM, init_params
from jaxalign.overrides import apply_overrides
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.reference import compute_reference_logprobs
from jaxalign.train.step import logits_fn
from jaxalign.experiments import arith_kit as kit

STEPS = 4
OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=64", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=128",
    "base.sft.steps=30", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=5",
    "base.dpo.batch_size=16", f"base.dpo.eval_every={STEPS}", "base.dpo.optim.learning_rate=1e-3",
    "base.dpo.optim.warmup_steps=1",
    "base.num_val_prompts=64", "base.eval_fraction=0.064", "base.eval_batch_size=64",
    f"base.checkpoint.every_steps={STEPS}", "base.show_progress=false",
    "rounds=2", f"steps_per_round={STEPS}", "num_prompts=64",  # 64 everywhere: one compiled sampler per mode
]


def config(*extra: str) -> ddo_arith.DDOArithConfig:
    return apply_overrides(ddo_arith.DDOArithConfig(), OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddo")
    return workdir, ddo_arith.run(config(), str(workdir))


def _rows(cfg, num=6, seed=0):
    """(problems, (gold, random sample) rows of `num` training problems, their statistics)."""
    problems = kit.split(cfg.base).train[:num]
    width = kit.completion_budget(cfg.base.model)
    prompts, _ = arith.encode_prompts(CharTokenizer(), [arith.prompt_text(p) for p in problems],
                                      pad_to=kit.PROMPT_LEN)
    rng = np.random.default_rng(seed)
    samples = np.zeros((num, width), np.int32)
    masks = np.zeros((num, width), np.int32)
    for i in range(num):  # random digit strings of random length, then EOS
        n = int(rng.integers(1, width))
        samples[i, :n - 1] = rng.integers(2, 12, size=n - 1)
        samples[i, n - 1], masks[i, :n] = CharTokenizer.EOS_ID, 1
    arrays, stats = ddo_arith.ddo_rows(problems, prompts, samples, masks)
    return problems, arrays, stats


def test_ddo_rows_put_the_gold_answer_against_the_reference_sample():
    cfg = config()
    problems, arrays, stats = _rows(cfg)
    tok = CharTokenizer()
    for i, p in enumerate(problems):
        chosen = arrays["chosen_tokens"][i][arrays["chosen_completion_mask"][i] > 0]
        assert tok.decode(chosen) == arith.solution_text(p) and chosen[-1] == tok.EOS_ID
        prompt = arrays["rejected_tokens"][i][(arrays["rejected_attention_mask"][i] > 0)
                                              & (arrays["rejected_completion_mask"][i] == 0)]
        assert tok.decode(prompt) == arith.prompt_text(p)
    assert np.all(arrays["chosen_score"] == 1.0) and np.all(arrays["rejected_score"] == 0.0)
    assert stats["samples_correct_rate"] == 0.0


def test_the_loss_is_the_pure_ddo_and_two_log_2_at_theta_equal_ref():
    cfg = config()
    model = DecoderLM(cfg.base.model)
    ref = init_params(cfg.base.model, jax.random.key(0))
    theta = init_params(cfg.base.model, jax.random.key(1))
    _, arrays, _ = _rows(cfg)
    apply = logits_fn(model)
    batch = {**arrays, **compute_reference_logprobs(apply, ref, arrays, 6)}
    loss_fn = jax.jit(ddo_arith.ddo_loss_fn(model, beta=0.7, alpha=1.5))
    # theta = ref: Delta = 0 on every row, so the loss is log 2 + alpha log 2.
    total, (rows, _) = loss_fn(ref, None, batch)
    assert float(rows) == 6 and float(total / rows) == pytest.approx(2.5 * math.log(2), abs=1e-5)
    # Any theta: exactly the pure function on the policy's log-probs.
    total, (rows, metrics) = loss_fn(theta, None, batch)
    theta_logps = compute_reference_logprobs(apply, theta, arrays, 6)
    expected, expected_metrics = ddo(theta_logps["reference_chosen"], batch["reference_chosen"],
                                     batch["chosen_completion_mask"], theta_logps["reference_rejected"],
                                     batch["reference_rejected"], batch["rejected_completion_mask"], beta=0.7, alpha=1.5)
    assert float(total / rows) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["ddo/data_logratio"]) == pytest.approx(float(expected_metrics["ddo/data_logratio"]), abs=1e-4)


def test_each_round_trains_against_the_previous_rounds_model(tiny):
    workdir, results = tiny
    first, second = results["rounds"]
    sft_sha = json.loads((workdir / "sft_eval.json").read_text())["params_sha256"]
    assert first["reference_sha256"] == sft_sha
    assert second["reference_sha256"] == first["params_sha256"] != sft_sha
    assert results["params_sha256"] == second["params_sha256"]
    assert first["rows"] == second["rows"] == 64
    # The discriminator learned: after a round, gold answers gained likelihood over the reference, its samples lost.
    log = [json.loads(line) for line in (workdir / "rounds" / "round_0" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in log if "ddo/data_logratio" in r][-1]
    assert last["step"] == STEPS and last["ddo/data_logratio"] > 0 > last["ddo/sample_logratio"]


def test_the_baseline_is_maximum_likelihood_on_the_same_gold_rows_for_all_steps(tiny):
    _, results = tiny
    baseline = results["continued_sft"]
    assert baseline["steps"] == 2 * STEPS and baseline["rows"] == 64
    assert [r["step"] for r in baseline["validation_history"]] == [0, STEPS, 2 * STEPS]
    comparison = results["comparison"]
    assert set(comparison) == {"sft", "ddo", "continued_sft"}
    assert comparison["ddo"]["accuracy_per_round"] == [r["test_accuracy"] for r in results["rounds"]]
    assert comparison["continued_sft"]["accuracy"] == baseline["test_accuracy"]
    expected = ddo_arith.claim_check(comparison["ddo"]["accuracy_per_round"], baseline["test_accuracy"], 0.01)
    assert results["claim_holds"] == expected["claim_holds"] and isinstance(results["claim"], str)


@pytest.mark.parametrize("rounds, baseline, expected", [
    ([0.5, 0.6], 0.55, (True, True, True)),
    ([0.5, 0.6], 0.6, (False, True, False)),  # a tie is not "beyond"
    ([0.7, 0.695], 0.6, (True, True, True)),  # within the tolerance
    ([0.7, 0.68], 0.6, (True, False, False)),
    ([0.7], 0.6, (True, True, True)),
])
def test_claim_check(rounds, baseline, expected):
    check = ddo_arith.claim_check(rounds, baseline, 0.01)
    assert (check["ddo_beats_continued_sft"], check["later_rounds_hold"], check["claim_holds"]) == expected
    assert check["multi_round_checked"] == (len(rounds) > 1)


def test_a_rerun_samples_and_trains_nothing_again(tiny, monkeypatch):
    workdir, expected = tiny
    def refuse(*args, **kwargs):
        raise AssertionError("a finished round sampled again")
    monkeypatch.setattr(kit.data, "sample_completions", refuse)
    results = ddo_arith.run(config(), str(workdir))
    assert results["params_sha256"] == expected["params_sha256"]
    assert results["comparison"] == expected["comparison"]
    assert (workdir / "ddo_arith.png").stat().st_size > 0


@pytest.mark.parametrize("overrides, message", [
    (["rounds=0"], "rounds must be an integer >= 1"),
    (["alpha=-1"], "alpha must satisfy alpha >= 0"),
    (["beta=0"], "beta must satisfy beta > 0"),
    (["sample_temperature=0"], "sample_temperature must be a number > 0"),
    (["num_prompts=8"], "smaller than base.dpo.batch_size"),
    (["num_prompts=5000"], "but ARITH has"),
    (["base.lora.rank=4"], "set base.lora.rank=0"),
])
def test_bad_configs_fail_before_training(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ddo_arith.run(config(*overrides), str(tmp_path))
