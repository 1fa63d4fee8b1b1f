"""Curry-DPO end to end on a tiny budget: two stages, the reference handover between them, the baseline, the
outputs, and a re-run that trains and evaluates nothing again."""
from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest

from jaxalign.algorithms.curriculum import CurriculumPairs
from jaxalign.experiments import curry_dpo
from jaxalign.models.llama import DecoderLM
from jaxalign.overrides import apply_overrides
from jaxalign.train.reference import compute_reference_logprobs
from jaxalign.train.step import logits_fn
from jaxalign.experiments import arith_kit as kit

STEPS = 6
OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=64", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=128",
    "base.sft.steps=80", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=5",
    "base.pairs.num_prompts=96", "base.pairs.samples_per_prompt=4", "base.pairs.require_correct_chosen=false",
    "base.dpo.batch_size=16", f"base.dpo.eval_every={STEPS}", "base.dpo.optim.learning_rate=1e-3",
    "base.dpo.optim.warmup_steps=2", "base.dpo.select_best=false",
    "base.num_val_prompts=64", "base.eval_fraction=0.064", "base.eval_batch_size=64",
    f"base.checkpoint.every_steps={STEPS}", "base.show_progress=false",
    "curriculum.num_iterations=2", f"steps_per_stage={STEPS}",
    "compare_baseline=false",  # its orchestration is checked without training below (a third compile costs ~10 s)
]


def _flat(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(params))]


def test_two_stages_hand_over_the_reference_and_a_rerun_changes_nothing(tmp_path, monkeypatch):
    cfg = apply_overrides(curry_dpo.CurryDPOConfig(), OVERRIDES)
    calls = []
    train_dpo = kit.train_dpo

    def recording_train_dpo(stage_cfg, mesh, start_params, pairs, problems, workdir, log):
        out = train_dpo(stage_cfg, mesh, start_params, pairs, problems, workdir, log)
        calls.append({"start": start_params, "pairs": pairs, "workdir": workdir, "out": out[0],
                      "steps": stage_cfg.dpo.steps})
        return out

    monkeypatch.setattr(kit, "train_dpo", recording_train_dpo)
    results = curry_dpo.run(cfg, str(tmp_path))

    assert [c["steps"] for c in calls] == [STEPS, STEPS]
    stage0, stage1 = calls
    # Stage 0 trains away from SFT; stage 1 starts from, and is referenced to, exactly what stage 0 produced.
    assert any(not np.array_equal(a, b) for a, b in zip(_flat(stage0["out"]), _flat(stage0["start"])))
    for a, b in zip(_flat(stage1["start"]), _flat(stage0["out"])):
        np.testing.assert_array_equal(a, b)
    # The reference log-probs stage 1 trained against are stage 0's policy's (dpo.reference=cached).
    [cache] = glob.glob(os.path.join(stage1["workdir"], "reference_cache", "*.npz"))
    expected = compute_reference_logprobs(logits_fn(DecoderLM(cfg.base.model)), stage0["out"],
                                          stage1["pairs"].arrays, 64)
    with np.load(cache) as f:
        for key, value in expected.items():
            np.testing.assert_allclose(f[key], value, rtol=1e-5, atol=1e-5)
    stages = results["stages"]
    assert stages[1]["reference_sha256"] == stages[0]["params_sha256"] != stages[0]["reference_sha256"]

    # Pairs: the curriculum's stages, easy (large gap) first, covering all pairs the baseline trains on.
    assert [s["pairs"] for s in stages] == results["pairs_per_stage"] == [len(stage0["pairs"]), len(stage1["pairs"])]
    assert sum(results["pairs_per_stage"]) == results["curriculum"]["pairs"]
    assert stages[0]["gap_min"] >= stages[1]["gap_max"]
    assert results["lists"] == results["curriculum"]["prompts"]
    for key in ("lists_dropped_tied", "lists_dropped_no_correct_sample", "tied_pairs_skipped"):
        assert key in results or key in results["curriculum"]
    assert len(results["accuracy_per_stage"]) == 3 and results["baseline"] is None
    assert results["final_accuracy"] == stages[1]["test_accuracy"]
    assert (tmp_path / "curry_dpo_accuracy.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["params_sha256"] == results["params_sha256"]

    # Re-running the finished run trains and evaluates nothing and returns the same results.
    calls.clear()
    evaluations = []
    monkeypatch.setattr(kit.evaluation, "greedy_eval", lambda *a, **k: evaluations.append(a) or pytest.fail("evaluated"))
    again = curry_dpo.run(cfg, str(tmp_path))
    assert evaluations == [] and len(calls) == 2
    for a, b in zip(_flat(calls[1]["start"]), _flat(stage0["out"])):
        np.testing.assert_array_equal(a, b)
    assert again["params_sha256"] == results["params_sha256"]
    assert again["accuracy_per_stage"] == results["accuracy_per_stage"]


def test_config_and_stage_size_errors():
    with pytest.raises(ValueError, match="steps_per_stage"):
        curry_dpo.CurryDPOConfig(steps_per_stage=0)
    empty = _pairs(0)
    stats = {"pairs_per_stage": [20, 0], "prompts": 9, "tied_pairs_skipped": 3}
    with pytest.raises(ValueError, match=r"stages 1 \(0 pairs\).*batch_size=16"):
        curry_dpo._check_stages([_pairs(20), empty], 16, stats)


def _pairs(n):
    z = np.zeros((n,), np.int64)
    return CurriculumPairs(z, z, z + 1, np.ones((n,)), z)


def test_orchestration_stages_baseline_and_resume_without_training(tmp_path, monkeypatch):
    """With SFT, sampling, DPO and evaluation replaced by bookkeeping fakes: three stages chain their policies, the
    baseline trains all pairs from the SFT policy for the total number of steps, pair arrays are the lists' rows,
    and a re-run evaluates nothing again."""
    n, k, t = 8, 3, 5
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 14, size=(n, k, t)).astype(np.int32)
    lists = curry_dpo.ArrayDataset({
        "list_tokens": tokens, "list_attention_mask": np.ones((n, k, t), np.int32),
        "list_completion_mask": np.ones((n, k, t), np.int32),
        "list_scores": np.tile(np.array([[1.0, 4.0, 0.0]], np.float32), (n, 1)) + np.arange(n)[:, None],
        "list_valid": np.ones((n, k), np.int32)})
    monkeypatch.setattr(kit.phases, "train_sft", lambda *a: ({"w": np.zeros(3, np.float32)}, None))
    monkeypatch.setattr(curry_dpo, "on_policy_lists", lambda *a: (lists, {"lists": n, "lists_dropped_tied": 2}))
    calls, evaluations = [], []

    def fake_train_dpo(stage_cfg, mesh, start, pairs, problems, workdir, log):
        calls.append({"start": start["w"].copy(), "pairs": pairs, "steps": stage_cfg.dpo.steps, "workdir": workdir})
        out = {"w": start["w"] + np.float32(len(pairs))}
        guard = {"selected_step": stage_cfg.dpo.steps, "selected_val_accuracy": 0.5, "last_val_accuracy": 0.5,
                 "validation_history": []}
        return out, out, guard

    def fake_eval(params, model_cfg, problems, batch_size):
        evaluations.append(params["w"].copy())
        return {"accuracy": float(params["w"][0]) / 100, "mean_length": 3.0}, None

    monkeypatch.setattr(kit, "train_dpo", fake_train_dpo)
    monkeypatch.setattr(kit.evaluation, "greedy_eval", fake_eval)
    cfg = apply_overrides(curry_dpo.CurryDPOConfig(), ["base.dpo.batch_size=4", "steps_per_stage=5",
                                                       "curriculum.num_iterations=3", "base.show_progress=false"])
    results = curry_dpo.run(cfg, str(tmp_path))

    assert results["pairs_per_stage"] == [6, 5, 5] and [c["steps"] for c in calls] == [5, 5, 5, 15]
    assert [float(c["start"][0]) for c in calls] == [0.0, 6.0, 11.0, 0.0]  # chained stages; baseline from SFT
    assert len(calls[3]["pairs"]) == 16 and results["baseline_accuracy"] == pytest.approx(0.16)
    assert results["accuracy_per_stage"] == pytest.approx([0.0, 0.06, 0.11, 0.16])
    first = calls[0]["pairs"].arrays  # stage 0: the largest gaps, best (index 1) against the worst (index 2)
    np.testing.assert_array_equal(first["chosen_tokens"], tokens[np.arange(6), 1])
    np.testing.assert_array_equal(first["rejected_tokens"], tokens[np.arange(6), 2])
    assert results["lists_dropped_tied"] == 2 and results["curriculum"]["tied_pairs_skipped"] == 0
    assert (tmp_path / "curry_dpo_accuracy.png").exists()
    assert len(evaluations) == 5  # SFT, three stages, baseline

    again = curry_dpo.run(cfg, str(tmp_path))
    assert len(evaluations) == 5 and again["accuracy_per_stage"] == results["accuracy_per_stage"]
    with pytest.raises(ValueError, match=r"curriculum\.num_iterations=3, but this run has 4"):
        curry_dpo.run(apply_overrides(cfg, ["stages=4"]), str(tmp_path))
