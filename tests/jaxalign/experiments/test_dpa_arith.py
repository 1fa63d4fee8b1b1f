"""DPA on ARITH: directions and their prompt prefix, the direction-conditioned SFT data, rejection sampling's argmax
of v.r against hand-computed cases and against the recorded samples of a tiny end-to-end run, the steering table and
the claim computed from it, a re-run that samples nothing again, and config errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxalign.experiments import dpa_arith
from jaxalign.overrides import apply_overrides
from jaxalign.tasks import arith, judges
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.experiments import arith_kit as kit

OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=64", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=128",
    "base.sft.steps=30", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=5",
    "base.num_val_prompts=32", "base.eval_fraction=0.064", "base.eval_batch_size=64",
    "base.checkpoint.every_steps=10", "base.show_progress=false",
    "num_directions=3", "eval_directions=2,0,1", "iterations=2", "prompts_per_iteration=16", "samples_per_prompt=4",
    "rsf.steps=6", "rsf.batch_size=16", "rsf.optim.learning_rate=3e-3", "rsf.optim.warmup_steps=2",
    "num_eval_prompts=64",
]


def config(*extra: str) -> dpa_arith.DPAArithConfig:
    return apply_overrides(dpa_arith.DPAArithConfig(), OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(workdir, results, the sampler's calls) of a tiny run."""
    workdir = tmp_path_factory.mktemp("dpa")
    calls = []
    sample = dpa_arith.sample_directed

    def recording(params, model_cfg, problems, buckets, temperature, rng, batch_size):
        out = sample(params, model_cfg, problems, buckets, temperature, rng, batch_size)
        calls.append({"problems": problems, "buckets": buckets, "temperature": temperature, "out": out})
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dpa_arith, "sample_directed", recording)
        results = dpa_arith.run(config(), str(workdir))
    return workdir, results, calls


def test_directions_run_from_correctness_to_conciseness():
    vectors = dpa_arith.direction_vectors(10)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(vectors[0], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(vectors[-1], [0.0, 1.0], atol=1e-12)
    assert np.all(np.diff(vectors[:, 1]) > 0)  # the conciseness weight grows with the bucket
    np.testing.assert_allclose(dpa_arith.direction_angles(4), [0, 30, 60, 90])
    assert dpa_arith.directed_prompt(3, [7, 5, 3, 9]) == "3;7+5+3+9="
    assert len(dpa_arith.directed_prompt(9, [9, 9, 9, 9])) == dpa_arith.DPA_PROMPT_LEN
    with pytest.raises(ValueError, match="one digit"):
        dpa_arith.directed_prompt(10, [1, 2])


def test_select_best_maximises_the_directional_reward():
    # Three samples: (correctness, conciseness) = right but long, wrong but short, right and shorter.
    rewards = np.array([[[1.0, 0.2], [0.0, 0.9], [1.0, 0.3]]] * 3)
    directions = dpa_arith.direction_vectors(3)  # 0, 45, 90 degrees
    np.testing.assert_array_equal(dpa_arith.select_best(rewards, directions), [0, 2, 1])  # 0 deg: first on ties
    with pytest.raises(ValueError, match="select_best"):
        dpa_arith.select_best(rewards[0], directions)


def test_conditioned_sft_data_prefixes_every_demonstration_with_a_direction():
    cfg = config()
    problems = kit.split(cfg.base).train[:200]
    data = dpa_arith.conditioned_sft_dataset(cfg.base, problems, 3).arrays
    tok = CharTokenizer()
    demos = arith.make_sft_examples(problems, np.random.default_rng([cfg.base.seed, 2]), cfg.base.task.carry_drop_prob,
                                    cfg.base.task.max_recaps, cfg.base.task.recap_prob)
    buckets = []
    for i, (p, (_, demo)) in enumerate(zip(problems, demos)):
        prompt = tok.decode(data["tokens"][i][(data["attention_mask"][i] > 0) & (data["completion_mask"][i] == 0)])
        bucket, rest = prompt.split(";", 1)
        assert rest == arith.prompt_text(p) and bucket in "012"
        assert tok.decode(data["tokens"][i][data["completion_mask"][i] > 0]) == demo  # the main job's demonstration
        buckets.append(int(bucket))
    assert set(buckets) == {0, 1, 2}
    assert any(arith.grade(p, d).recaps for p, (_, d) in zip(problems, demos))  # the verbose task


def test_rejection_sampling_keeps_the_argmax_of_the_recorded_samples(tiny):
    workdir, results, calls = tiny
    cfg = config()
    budget = dpa_arith.completion_budget(cfg.base.model)
    training = [c for c in calls if c["temperature"] == cfg.temperature]
    assert len(training) == 2  # one batch of samples per iteration, then greedy evaluation only
    tok = CharTokenizer()
    for t, call in enumerate(training):
        problems, buckets, k = call["problems"], call["buckets"], cfg.samples_per_prompt
        _, completions, masks = call["out"]
        prompts, expected_buckets = dpa_arith.iteration_problems(cfg, kit.split(cfg.base).train, t)
        np.testing.assert_array_equal(problems, np.repeat(prompts, k, axis=0))
        np.testing.assert_array_equal(buckets, np.repeat(expected_buckets, k))
        scores = []
        for i, p in enumerate(problems):
            grade = arith.grade(p, tok.decode(completions[i]))
            r = judges.reward_vector(grade, int(masks[i].sum()), budget)
            scores.append(r @ dpa_arith.direction_vectors(3)[buckets[i]])
        best = np.argmax(np.reshape(scores, (-1, k)), axis=1)
        kept = kit.load_dataset(str(workdir / "iterations" / f"iter_{t}" / "selected.npz"))[0].arrays
        for j, b in enumerate(best):
            row = j * k + b
            text = tok.decode(kept["tokens"][j][kept["completion_mask"][j] > 0])
            assert text == tok.decode(completions[row])
            prompt = tok.decode(kept["tokens"][j][(kept["attention_mask"][j] > 0) & (kept["completion_mask"][j] == 0)])
            assert prompt == dpa_arith.directed_prompt(buckets[row], problems[row])
    first, second = results["iterations"]
    assert first["prompts"] == second["prompts"] == 16


def test_the_steering_table_and_the_claim_come_from_the_numbers(tiny):
    workdir, results, _ = tiny
    for table in (results["steering"], results["sft_steering"]):
        assert [r["bucket"] for r in table] == [0, 1, 2]  # by increasing angle, whatever order was asked for
        assert [r["angle_deg"] for r in table] == [0.0, 45.0, 90.0]
        for r in table:
            assert 0.0 <= r["accuracy"] <= 1.0 and r["mean_length"] >= 1.0
            expected = r["correctness_weight"] * r["mean_correctness_reward"] \
                + r["conciseness_weight"] * r["mean_conciseness_reward"]
            assert r["mean_directional_reward"] == pytest.approx(expected, abs=1e-5)
    check = dpa_arith.claim_check(results["steering"], results["sft_steering"])
    assert {k: results[k] for k in check} == check
    comparison = results["comparison"]
    assert comparison["dpa"]["accuracy"] == results["steering"][0]["accuracy"]
    assert comparison["sft"]["accuracy"] == results["sft_steering"][0]["accuracy"]
    assert {"dpa_theta0", "dpa_theta45", "dpa_theta90"} <= set(comparison)
    assert (workdir / "checkpoints" / "dpa_sft").is_dir() and not (workdir / "checkpoints" / "sft").exists()
    assert (workdir / "dpa_arith.png").stat().st_size > 0


@pytest.mark.parametrize("lengths, accuracy, sft_accuracy, expected", [
    ([20.0, 20.0, 18.0], 0.5, 0.1, (True, True, True)),  # equal lengths are non-increasing
    ([20.0, 20.1, 18.0], 0.5, 0.1, (False, True, False)),
    ([20.0, 19.0, 18.0], 0.1, 0.1, (True, False, False)),  # a tie with SFT is not a win
])
def test_claim_check(lengths, accuracy, sft_accuracy, expected):
    dpa = [{"mean_length": n, "accuracy": accuracy} for n in lengths]
    sft = [{"mean_length": 18.0, "accuracy": sft_accuracy}] * 3
    check = dpa_arith.claim_check(dpa, sft)
    assert (check["length_non_increasing"], check["correctness_direction_beats_sft"], check["claim_holds"]) == expected


def test_a_rerun_samples_nothing_again(tiny, monkeypatch):
    workdir, expected, _ = tiny

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run sampled again")

    monkeypatch.setattr(dpa_arith, "sample_directed", refuse)
    results = dpa_arith.run(config(), str(workdir))
    assert results["params_sha256"] == expected["params_sha256"]
    assert results["steering"] == expected["steering"]
    assert json.loads((workdir / "results.json").read_text())["claim_holds"] == expected["claim_holds"]


@pytest.mark.parametrize("overrides, message", [
    (["num_directions=11"], "num_directions must be an integer in"),
    (["eval_directions=0,1"], "at least 3 distinct buckets"),
    (["eval_directions=0,1,3"], "at least 3 distinct buckets"),
    (["eval_directions=0,a,2"], "comma-separated bucket numbers"),
    (["samples_per_prompt=1"], "samples_per_prompt must be an integer >= 2"),
    (["temperature=0"], "temperature must be a number > 0"),
    (["prompts_per_iteration=8"], "smaller than rsf.batch_size"),
    (["prompts_per_iteration=600"], "fresh prompts, but ARITH has"),
    (["base.model.max_len=30"], "base.model.max_len=30 is too short"),
])
def test_bad_configs_fail_before_training(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        dpa_arith.run(config(*overrides), str(tmp_path))
