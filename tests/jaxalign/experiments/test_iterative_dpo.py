"""Online DPO, APO and DNO-Prct end to end on a tiny budget: APO at alpha 0 is online DPO bit for bit, APO with
momentum trains against the extrapolated reference from its second iteration, DNO's teacher pairs and replay, a
re-run that trains nothing again, and the config errors."""
from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest

from jaxalign.experiments import iterative_dpo
from jaxalign.models.llama import DecoderLM
from jaxalign.overrides import apply_overrides
from jaxalign.train.reference import compute_reference_logprobs
from jaxalign.train.step import logits_fn
from jaxalign.rundir import params_sha256
from jaxalign.experiments import arith_kit as kit

STEPS = 4
OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=64", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=128",
    "base.sft.steps=80", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=5",
    "base.pairs.samples_per_prompt=4",
    "base.dpo.batch_size=16", f"base.dpo.eval_every={STEPS}", "base.dpo.optim.learning_rate=1e-3",
    "base.dpo.optim.warmup_steps=1", "base.dpo.select_best=false",
    "base.num_val_prompts=32", "base.eval_fraction=0.064", "base.eval_batch_size=64",
    f"base.checkpoint.every_steps={STEPS}", "base.show_progress=false",
    "iterations=2", "prompts_per_iteration=64", f"steps_per_iteration={STEPS}", "min_chosen_score=none",
    "judge=score", "min_margin=0.5",  # the tiny SFT policy is rarely right: rank by correct steps
    "select_iterate=false",
]


def config(preset: str, *extra: str) -> iterative_dpo.IterativeConfig:
    return apply_overrides(iterative_dpo.preset(preset), OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """(workdir, results) of online DPO; its SFT checkpoint seeds the other runs (the same SFT policy)."""
    workdir = tmp_path_factory.mktemp("online")
    return workdir, iterative_dpo.run(config("online_dpo"), str(workdir))


def run_from_same_sft(online_dir, workdir, cfg):
    shutil.copytree(os.path.join(online_dir, "checkpoints", "sft"), os.path.join(workdir, "checkpoints", "sft"))
    return iterative_dpo.run(cfg, str(workdir))


def test_online_dpo_hands_each_iterate_to_the_next_as_reference(online):
    _, results = online
    first, second = results["iterations"]
    assert first["reference"] == second["reference"] == "previous iterate"
    assert second["reference_sha256"] == first["params_sha256"] != first["reference_sha256"]
    assert len(results["accuracy_per_iteration"]) == 3 and results["selected_iteration"] == 2
    for r in results["iterations"]:
        counted = sum(v for k, v in r.items() if k.startswith("dropped_"))
        assert r["pairs"] + counted == r["prompts"] == 64
        assert r["train_pairs"] == r["pairs"]


def test_apo_at_alpha_zero_is_online_dpo_bit_for_bit(online, tmp_path):
    online_dir, expected = online
    for sampling in ("logits", "weights"):
        results = run_from_same_sft(online_dir, tmp_path / sampling, config("apo", "alpha=0", f"apo_sampling={sampling}"))
        assert results["iterations"][1]["reference"] == "extrapolated"
        assert [r["params_sha256"] for r in results["iterations"]] == \
            [r["params_sha256"] for r in expected["iterations"]]


def test_apo_with_momentum_trains_against_the_extrapolated_reference(online, tmp_path, monkeypatch):
    online_dir, expected = online
    cfg = config("apo", "alpha=0.5")
    calls = []
    train_dpo = kit.train_dpo

    def recording_train_dpo(it_cfg, mesh, start_params, pairs, problems, workdir, log):
        out = train_dpo(it_cfg, mesh, start_params, pairs, problems, workdir, log)
        calls.append({"start": start_params, "pairs": pairs, "out": out[0]})
        return out

    monkeypatch.setattr(kit, "train_dpo", recording_train_dpo)
    results = run_from_same_sft(online_dir, tmp_path, cfg)
    first, second = results["iterations"]
    # Iteration 1 has no older checkpoint: it is online DPO's first iteration exactly.
    assert first["params_sha256"] == expected["iterations"][0]["params_sha256"]
    assert second["params_sha256"] != expected["iterations"][1]["params_sha256"]
    # Iteration 2 starts from pihat_1 and trains against (1 + a) log pihat_1 - a log pihat_0 (pihat_0 = SFT).
    sft, iterate_1 = calls[0]["start"], calls[0]["out"]
    assert params_sha256(calls[1]["start"]) == params_sha256(iterate_1)
    data = calls[1]["pairs"].arrays
    apply = logits_fn(DecoderLM(cfg.base.model))
    pair_keys = [k for k in data if k.startswith(("chosen_", "rejected_"))]
    pairs = {k: data[k] for k in pair_keys}
    latest = compute_reference_logprobs(apply, iterate_1, pairs, 64)
    previous = compute_reference_logprobs(apply, sft, pairs, 64)
    for key in ("reference_chosen", "reference_rejected"):
        np.testing.assert_allclose(data[key], 1.5 * latest[key] - 0.5 * previous[key], rtol=1e-5, atol=1e-5)
        assert not np.allclose(data[key], latest[key], atol=1e-3)  # the momentum really moved the reference


def test_dno_adds_teacher_pairs_and_replays_earlier_ones(online, tmp_path):
    online_dir, _ = online
    results = run_from_same_sft(online_dir, tmp_path, config("dno", "select_iterate=true"))
    first, second = results["iterations"]
    assert first["pairs_chosen_teacher"] > 0  # the SFT policy rarely gets a 3-operand sum right: gold is chosen
    assert first["replayed"] == 0
    assert second["replayed"] == min(round(0.3 * second["pairs"]), first["pairs"])
    assert second["train_pairs"] == second["pairs"] + second["replayed"]
    best = int(np.argmax([r["val_accuracy"] for r in results["iterations"]]))
    assert results["selected_iteration"] == best + 1
    assert results["final_accuracy"] == results["iterations"][best]["test_accuracy"]


def test_a_rerun_trains_and_samples_nothing_again(online, monkeypatch):
    workdir, expected = online
    def refuse(*args, **kwargs):
        raise AssertionError("a finished iteration sampled again")
    monkeypatch.setattr(kit.data, "sample_completions", refuse)
    results = iterative_dpo.run(config("online_dpo"), str(workdir))
    assert results["params_sha256"] == expected["params_sha256"]
    assert results["accuracy_per_iteration"] == expected["accuracy_per_iteration"]
    assert (workdir / "iterative.png").stat().st_size > 0


@pytest.mark.parametrize("overrides, message", [
    (["prompts_per_iteration=600"], "fresh prompts, but ARITH has"),
    (["replay=0.3,x"], "replay must be comma-separated numbers"),
    (["replay=0.3,1.5"], "fraction 1 .* must be a number in"),
    (["apo=true", "base.dpo.reference=sync"], "cannot train with base.dpo.reference=sync"),
    (["alpha=1.0"], "alpha must be a number in"),
    (["judge=gpt4"], "judge must be one of"),
])
def test_bad_configs_fail_before_training(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        iterative_dpo.run(config("online_dpo", *overrides), str(tmp_path))
    assert not (tmp_path / "config.json").exists()  # the corrected re-run is not refused as "another config"


def test_offline_variant_has_the_same_budget():
    cfg = config("dno")
    offline = cfg.offline()
    assert offline.iterations == 1 and not offline.teacher and not offline.replay and not offline.apo
    assert offline.prompts_per_iteration == 2 * 64 and offline.steps_per_iteration == 2 * STEPS
    assert dataclasses.replace(offline, iterations=2) != cfg
