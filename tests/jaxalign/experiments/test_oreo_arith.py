"""OREO on ARITH end to end on a tiny budget: results.json and its keys, the plot, and a re-run that resumes
(no SFT or OREO step runs again, the same policy comes back)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxalign.algorithms import oreo
from jaxalign.experiments import oreo_arith
from jaxalign.overrides import apply_overrides

OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=32", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=64",
    "base.sft.steps=20", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=2",
    "base.pairs.num_prompts=16", "base.pairs.samples_per_prompt=4",
    "base.num_val_prompts=16", "base.eval_fraction=0.032", "base.eval_batch_size=64",
    "base.checkpoint.every_steps=4", "base.show_progress=false", "base.log_every=2",
    "oreo.steps=4", "oreo.batch_size=16",
    "beam.beams=2", "beam.max_steps=4", "beam.max_step_tokens=8",
    "num_beam_prompts=8", "num_value_prompts=8", "value_samples_per_prompt=4",
    "compare_baselines=false",  # the tiny SFT policy is never right: rejection sampling has nothing (test below)
]

KEYS = {"sft_accuracy", "oreo_accuracy", "beam_accuracy", "beam_greedy_accuracy", "num_beam_prompts",
        "value_s0_success_correlation", "value_s0_mean_abs_error", "value_change_at_first_wrong_step",
        "value_change_at_correct_steps", "first_wrong_steps", "trajectories", "trajectory_success_rate",
        "oreo_last_metrics", "params_sha256", "critic_sha256", "config"}


def test_tiny_run_writes_results_and_a_rerun_resumes_without_training(tmp_path, monkeypatch):
    cfg = apply_overrides(oreo_arith.OreoArithConfig(), OVERRIDES)
    first = oreo_arith.run(cfg, str(tmp_path))
    assert KEYS <= set(first)
    assert first["trajectories"] == 64 and first["num_beam_prompts"] == 8
    for key in ("sft_accuracy", "oreo_accuracy", "beam_accuracy", "beam_greedy_accuracy"):
        assert 0.0 <= first[key] <= 1.0
    assert first["oreo_last_metrics"]["step"] == 4
    assert json.loads((tmp_path / "results.json").read_text())["params_sha256"] == first["params_sha256"]
    assert (tmp_path / "oreo_arith.png").stat().st_size > 0
    log = (tmp_path / "metrics.jsonl").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished OREO phase must not take a step on re-run")

    monkeypatch.setattr(oreo, "make_oreo_steps", lambda cfg, model_cfg: oreo.OreoSteps(no_training, no_training,
                                                                                       no_training))
    second = oreo_arith.run(cfg, str(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == log  # no SFT or OREO record was added
    for key in KEYS - {"config"}:
        assert second[key] == pytest.approx(first[key]) if isinstance(first[key], float) else second[key] == first[key]


def test_baselines_train_on_the_same_trajectories(tmp_path):
    """RS-SFT trains on exactly the correct trajectories, DPO on pairs of the same cached samples; both appear in
    the comparison, and claim_holds is computed from it."""
    overrides = [o for o in OVERRIDES if not o.startswith(("base.sft.steps", "base.model.d_model", "base.model.mlp_dim",
                                                           "base.pairs.num_prompts", "compare_baselines"))]
    overrides += ["base.sft.steps=150", "base.model.d_model=64", "base.model.mlp_dim=128", "base.pairs.num_prompts=32",
                  "rs_sft.steps=4", "rs_sft.batch_size=2", "base.dpo.steps=4", "base.dpo.batch_size=16",
                  "base.dpo.eval_every=4", "base.pairs.require_correct_chosen=false"]
    cfg = apply_overrides(oreo_arith.OreoArithConfig(), overrides)
    results = oreo_arith.run(cfg, str(tmp_path))
    comparison = results["comparison"]
    assert {"sft", "oreo", "rs_sft", "dpo", "oreo_beam", "oreo_greedy_same_prompts"} <= set(comparison)
    correct = round(results["trajectory_success_rate"] * results["trajectories"])
    assert correct >= 2
    assert json.loads((tmp_path / "rs_sft_eval.json").read_text())["sequences"] == correct
    assert json.loads((tmp_path / "dpo_eval.json").read_text())["pairs"] > 0
    assert (tmp_path / "pairs.npz").exists() and (tmp_path / "dpo" / "checkpoints" / "dpo").exists()
    expected = (comparison["oreo"]["accuracy"] > max(comparison["rs_sft"]["accuracy"], comparison["dpo"]["accuracy"])
                and comparison["oreo_beam"]["accuracy"] > comparison["oreo_greedy_same_prompts"]["accuracy"])
    assert results["claim_holds"] == expected


def test_rejection_sampling_keeps_only_correct_trajectories():
    import numpy as np

    from jaxalign.data.iterator import ArrayDataset

    data = ArrayDataset({"tokens": np.arange(12).reshape(4, 3), "attention_mask": np.ones((4, 3)),
                         "completion_mask": np.ones((4, 3)), "reward": np.array([0.0, 1.0, 0.0, 1.0])})
    kept = oreo_arith.rejection_sampling_dataset(data)
    np.testing.assert_array_equal(kept.arrays["tokens"], [[3, 4, 5], [9, 10, 11]])
    assert set(kept.arrays) == {"tokens", "attention_mask", "completion_mask"}
    with pytest.raises(ValueError, match="none of the trajectories is correct"):
        oreo_arith.rejection_sampling_dataset(ArrayDataset({**data.arrays, "reward": np.zeros(4)}))


def test_iterative_oreo_recollects_with_the_trained_policy_and_resumes(tmp_path, monkeypatch):
    """oreo_arith with iterations=2: iteration 1 samples the policy iteration 0 trained (not the SFT policy), trains
    on from it, and a re-run trains and samples nothing again."""
    cfg = apply_overrides(oreo_arith.OreoArithConfig(), OVERRIDES + ["iterations=2"])
    first = oreo_arith.run(cfg, str(tmp_path))
    it_dir = tmp_path / "iterations" / "iter_1"
    assert (it_dir / "samples.npz").exists() and (it_dir / "checkpoints" / "oreo_actor").exists()
    assert len(first["trajectory_success_rate_per_iteration"]) == 2
    with np.load(tmp_path / "samples.npz") as a, np.load(it_dir / "samples.npz") as b:
        np.testing.assert_array_equal(a["problems"], b["problems"])  # the same prompts ...
        assert not np.array_equal(a["completions"], b["completions"])  # ... answered by another policy

    def refuse(*args, **kwargs):
        raise AssertionError("a finished iteration took a training step again")

    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "samples.npz", it_dir / "samples.npz")}
    monkeypatch.setattr(oreo, "make_oreo_steps", lambda cfg, model_cfg: oreo.OreoSteps(refuse, refuse, refuse))
    again = oreo_arith.run(cfg, str(tmp_path))
    assert again["params_sha256"] == first["params_sha256"]
    assert {p: p.stat().st_mtime_ns for p in written} == written  # the trajectories were read back, not re-sampled
