"""Step-DPO end to end on a tiny budget: step pairs and response pairs from the same SFT samples, both methods trained
on the same number of pairs for the same steps from the same SFT policy, the comparison and its claim, a re-run that
samples, trains and evaluates nothing again, and the config errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxalign.algorithms import step_pairs
from jaxalign.algorithms.step_pairs import (
    correct_step_ids,
    locate_first_wrong_step,
    masked_ids,
)
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments import step_dpo
from jaxalign.overrides import apply_overrides
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.rundir import params_sha256
from jaxalign.train.preference import objective_kwargs
from jaxalign.experiments import arith_kit as kit
from jaxalign.train import preference

STEPS = 4
OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=64", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=128",
    "base.sft.steps=80", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=5",
    "base.pairs.num_prompts=96", "base.pairs.samples_per_prompt=4",
    "base.dpo.batch_size=16", f"base.dpo.steps={STEPS}", f"base.dpo.eval_every={STEPS}",
    "base.dpo.optim.learning_rate=1e-3", "base.dpo.optim.warmup_steps=1", "base.dpo.select_best=false",
    "base.num_val_prompts=32", "base.eval_fraction=0.064", "base.eval_batch_size=64",
    f"base.checkpoint.every_steps={STEPS}", "base.show_progress=false",
    "min_chosen_score=none",  # the tiny SFT policy is rarely right: pair by correct steps
]
TOK = CharTokenizer()


def config(*extra: str) -> step_dpo.StepDPOConfig:
    return apply_overrides(step_dpo.StepDPOConfig(), OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, results, the train_dpo calls) of one tiny run."""
    workdir = tmp_path_factory.mktemp("step_dpo")
    calls = []
    train_dpo = kit.train_dpo

    def recording_train_dpo(cfg, mesh, start, data, problems, method_dir, log):
        out = train_dpo(cfg, mesh, start, data, problems, method_dir, log)
        calls.append({"start": params_sha256(start), "data": data, "steps": cfg.dpo.steps,
                      "out": params_sha256(out[0]), "dir": method_dir})
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kit, "train_dpo", recording_train_dpo)
        results = step_dpo.run(config(), str(workdir))
    return workdir, results, calls


def test_default_dpo_phase_is_exactly_step_dpo():
    dpo = step_dpo.StepDPOConfig().base.dpo
    assert dpo.objective == "sigmoid" and dpo.sft_weight == 0.0 and dpo.reference == "cached"
    assert objective_kwargs(dpo) == {"beta": 0.4}


def test_both_methods_train_the_same_number_of_pairs_from_the_sft_policy(finished):
    _, results, calls = finished
    n = results["pairs_per_method"]
    step, response = results["step_pairs"], results["response_pairs"]
    assert n == min(step["pairs"], response["pairs"]) >= 16
    assert [c["dir"].rsplit("/", 1)[-1] for c in calls] == ["step_dpo", "response_dpo"]
    assert [len(c["data"]) for c in calls] == [n, n] and [c["steps"] for c in calls] == [STEPS, STEPS]
    assert calls[0]["start"] == calls[1]["start"]  # the same SFT policy ...
    assert calls[0]["out"] != calls[0]["start"] and calls[1]["out"] != calls[0]["out"]  # ... trained two ways
    # Every prompt is accounted for, on both sides.
    assert step["pairs"] + step["dropped_all_correct"] + step["dropped_only_cut_off"] + \
        step["dropped_no_correct_step"] == step["prompts"] == 96
    assert step["chosen_gold_fallback"] == 0 and sum(step["pairs_per_step_index"]) == step["pairs"]
    assert response["pairs"] + sum(v for k, v in response.items() if k.startswith("dropped_")) == 96


def test_step_pairs_hold_the_first_wrong_step_against_a_correct_one(finished):
    workdir, _, calls = finished
    a = calls[0]["data"].arrays
    samples = np.load(workdir / "samples.npz")
    problems, k = samples["problems"], samples["completions"].shape[1]
    for b in range(len(calls[0]["data"])):
        p, j = int(a["prompt_index"][b]), int(a["step_index"][b])
        chosen = a["chosen_tokens"][b][a["chosen_completion_mask"][b] > 0]
        rejected = a["rejected_tokens"][b][a["rejected_completion_mask"][b] > 0]
        assert tuple(chosen) == correct_step_ids(problems[p], j)
        located = (locate_first_wrong_step(problems[p], masked_ids(samples["completions"][p, i],
                                                                   samples["masks"][p, i])) for i in range(k))
        wrong = next(w for w in located if w is not None and w.kind != "cut_off")  # the first usable sample
        assert tuple(rejected) == wrong.rejected and wrong.index == j
        # Both sides share the prompt and correct prefix: identical tokens before the step.
        start = int(a["prefix_lengths"][b])
        np.testing.assert_array_equal(a["chosen_tokens"][b, :start], a["rejected_tokens"][b, :start])
        assert TOK.decode(a["chosen_tokens"][b, :start]).endswith("=" if j == 0 else ";")
    # The response pairs are whole completions after the prompt.
    r = calls[1]["data"].arrays
    assert np.all(r["chosen_completion_mask"][:, :kit.PROMPT_LEN] == 0)
    assert np.all(r["chosen_score"] > r["rejected_score"])


def test_results_compare_gain_per_pair(finished):
    workdir, results, _ = finished
    comparison, n = results["comparison"], results["pairs_per_method"]
    sft = comparison["sft"]["accuracy"]
    for name in ("step_dpo", "response_dpo"):
        entry = comparison[name]
        assert entry["pairs"] == n and entry["steps"] == STEPS and 0.0 <= entry["accuracy"] <= 1.0
        assert entry["gain_per_pair"] == pytest.approx((entry["accuracy"] - sft) / n)
        assert entry["accuracy"] == results["methods"][name]["test_accuracy"]
    assert results["claim_holds"] == (comparison["step_dpo"]["gain_per_pair"] >
                                      comparison["response_dpo"]["gain_per_pair"])
    assert results["claim"].startswith("Step-DPO")
    assert json.loads((workdir / "results.json").read_text())["comparison"] == comparison
    assert (workdir / "step_dpo.png").stat().st_size > 0


def test_a_rerun_samples_trains_and_evaluates_nothing_again(finished, monkeypatch):
    workdir, expected, _ = finished

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"a finished run {what} again")
        return fail

    monkeypatch.setattr(kit.data, "sample_completions", refuse("sampled"))
    monkeypatch.setattr(step_pairs, "sample_steps", refuse("sampled steps"))
    monkeypatch.setattr(kit.evaluation, "greedy_eval", refuse("evaluated"))
    monkeypatch.setattr(preference, "jit_train_step", lambda *a, **k: refuse("trained"))
    again = step_dpo.run(config(), str(workdir))
    assert again["comparison"] == expected["comparison"]
    assert again["step_pairs"] == expected["step_pairs"] and again["response_pairs"] == expected["response_pairs"]
    with pytest.raises(ValueError, match=r"samples_per_prefix=8, but this run has 3"):
        step_dpo.run(config("samples_per_prefix=3"), str(workdir))


@pytest.mark.parametrize("overrides, message", [
    (["base.dpo.objective=ipo"], "Step-DPO is sigmoid DPO on the step tokens"),
    (["base.dpo.label_smoothing=0.1"], "Step-DPO is sigmoid DPO on the step tokens"),
    (["base.dpo.reference=sync"], "base.dpo.reference must be 'cached' or 'online'"),
    (["base.task.max_recaps=2"], "base.task.max_recaps must be 0"),
    (["samples_per_prefix=0"], "samples_per_prefix must be an integer >= 1"),
    (["num_pairs=0"], "num_pairs must be an integer >= 1 or None"),
    (["judge=gpt4"], "judge must be one of"),
    (["min_margin=-1"], "min_margin must be >= 0"),
])
def test_bad_configs_fail_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(*overrides)


def test_equal_pairs_errors():
    def pairs(n):
        return ArrayDataset({"chosen_tokens": np.zeros((n, 3), np.int32)})

    cfg = config()
    assert step_dpo.equal_pairs(cfg, pairs(40), pairs(30)) == 30
    assert step_dpo.equal_pairs(config("num_pairs=20"), pairs(40), pairs(30)) == 20
    with pytest.raises(ValueError, match="num_pairs=35: response-level DPO has 30 pairs"):
        step_dpo.equal_pairs(config("num_pairs=35"), pairs(40), pairs(30))
    with pytest.raises(ValueError, match=r"only 10 pairs per method .* base.dpo.batch_size=16"):
        step_dpo.equal_pairs(cfg, pairs(10), pairs(30))
