"""DR-PO vs PPO on ARITH end to end on a tiny budget: both runs from the same SFT policy with the same rollouts and
updates, only DR-PO resets into the gold responses; results.json's comparison and claim; a re-run that trains nothing
again; a run killed after an earlier checkpoint resumes to the same parameters bit for bit; the rewards; config
errors."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxalign.algorithms import lm_ppo
from jaxalign.experiments import drpo_arith
from jaxalign.overrides import apply_overrides
from jaxalign.tasks import arith, judges
from jaxalign.tasks.tokenizer import CharTokenizer

UPDATES = 4
OVERRIDES = [
    "base.task.num_operands=3",
    "base.model.d_model=64", "base.model.n_layers=1", "base.model.n_heads=2", "base.model.n_kv_heads=1",
    "base.model.head_dim=16", "base.model.mlp_dim=128",
    "base.sft.steps=80", "base.sft.batch_size=32", "base.sft.optim.learning_rate=1e-2", "base.sft.optim.warmup_steps=5",
    "base.num_val_prompts=32", "base.eval_fraction=0.064", "base.eval_batch_size=64",
    "base.checkpoint.every_steps=40", "base.show_progress=false",
    f"ppo.num_updates={UPDATES}", "ppo.rollouts_per_update=16", "ppo.policy_optim.warmup_steps=1",
    "ppo.critic_optim.warmup_steps=1", "ppo.beta_reset=0.7",
    "rl_seeds=1", "eval_every=2", "checkpoint_every=1", "judge=graded",
]


def config(*extra: str) -> drpo_arith.DRPOArithConfig:
    return apply_overrides(drpo_arith.DRPOArithConfig(), OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("drpo")
    return workdir, drpo_arith.run(config(), str(workdir))


def _records(workdir, method):
    with open(workdir / method / "seed_0" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_drpo_and_ppo_train_on_the_same_budget_and_only_drpo_resets(finished):
    workdir, results = finished
    comparison = results["comparison"]
    assert set(comparison) == {"sft", "drpo", "ppo"}
    for name in ("drpo", "ppo"):
        assert 0.0 <= comparison[name]["accuracy"] <= 1.0
        assert comparison[name]["rollouts"] == UPDATES * 16
        assert comparison[name]["optimizer_steps"] == UPDATES * 4
    assert results["claim_holds"] == (comparison["drpo"]["accuracy"] > comparison["ppo"]["accuracy"])
    assert results["claim"]
    drpo, ppo = _records(workdir, "drpo"), _records(workdir, "ppo")
    assert [r["step"] for r in drpo] == [r["step"] for r in ppo] == list(range(1, UPDATES + 1))
    assert all(r["reset_rate"] == 0.0 for r in ppo)
    assert np.mean([r["reset_rate"] for r in drpo]) > 0.4  # beta_reset = 0.7 over 64 rollouts
    assert all(r["mean_prefix_length"] >= 1 for r in drpo if r["reset_rate"] > 0)
    # Validation after updates 2 and 4, after the SFT policy at 0 rollouts.
    for run in (results["runs"]["drpo"][0], results["runs"]["ppo"][0]):
        assert [h["rollouts"] for h in run["validation_history"]] == [0, 32, 64]
    shas = {results["runs"][m][0]["params_sha256"] for m in ("drpo", "ppo")}
    assert len(shas) == 2
    assert (workdir / "drpo_arith.png").stat().st_size > 0
    assert json.loads((workdir / "results.json").read_text())["comparison"] == comparison


def test_a_rerun_trains_and_samples_nothing_again(finished, monkeypatch):
    workdir, expected = finished

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run collected rollouts again")

    monkeypatch.setattr(lm_ppo, "collect_rollouts", refuse)
    results = drpo_arith.run(config(), str(workdir))
    assert results["comparison"] == expected["comparison"]
    assert results["params_sha256"] == expected["params_sha256"]


def test_a_killed_run_resumes_to_the_same_parameters(finished, tmp_path):
    workdir, expected = finished
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    run_dir = resumed / "drpo" / "seed_0"
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [(UPDATES - 1) * 4, UPDATES * 4]
    shutil.rmtree(run_dir / "checkpoints" / str(steps[-1]))  # as if killed during the last update
    os.remove(run_dir / "eval.json")
    results = drpo_arith.run(config(), str(resumed))
    assert results["runs"]["drpo"][0]["params_sha256"] == expected["runs"]["drpo"][0]["params_sha256"]
    assert results["comparison"] == expected["comparison"]
    assert [r["step"] for r in _records(resumed, "drpo")] == list(range(1, UPDATES + 1))  # no update logged twice


def test_prompt_dataset_holds_the_gold_responses():
    problems = np.array([[1, 2, 3], [9, 9, 9]])
    data = drpo_arith.prompt_dataset(problems, 16).arrays
    tok = CharTokenizer()
    for i, p in enumerate(problems):
        n = int(data["reference_mask"][i].sum())
        assert tok.decode(data["reference_tokens"][i, :n]) == arith.solution_text(p)
        assert data["reference_tokens"][i, n - 1] == tok.EOS_ID
        assert tok.decode(data["prompt_tokens"][i]) == arith.prompt_text(p)
        assert data["prompt_mask"][i, -1] == 1  # left-padded


def test_oracle_rewards():
    tok = CharTokenizer()
    problems = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    texts = [arith.solution_text(problems[0]), "1+2=3;3+3=7;7+4=11", "1+2=4"]
    completions = np.zeros((3, 24), np.int32)
    for i, text in enumerate(texts):
        ids = tok.encode(text) + [tok.EOS_ID]
        completions[i, :len(ids)] = ids
    np.testing.assert_array_equal(drpo_arith.oracle_rewards("binary", problems, completions), [1.0, 0.0, 0.0])
    graded = drpo_arith.oracle_rewards("graded", problems, completions)
    expected = [judges.graded_score(arith.grade(p, t)) / 6 for p, t in zip(problems, texts)]
    np.testing.assert_allclose(graded, expected)
    assert graded[0] == 1.0 and 0 < graded[1] < 1


@pytest.mark.parametrize("overrides, message", [
    (["ppo.beta_reset=0"], "ppo.beta_reset must be > 0 for DR-PO"),
    (["judge=score"], "judge must be one of"),
    (["rl_seeds=0"], "rl_seeds must be an integer >= 1"),
    (["ppo.rollouts_per_update=30", "ppo.num_minibatches=4"], "must be divisible by ppo.num_minibatches"),
])
def test_bad_configs(overrides, message):
    with pytest.raises(Exception, match=message):
        config(*overrides)


def test_too_many_rollouts_per_update_fails_before_sft(tmp_path):
    with pytest.raises(ValueError, match="ppo.rollouts_per_update=2048 is more than the"):
        drpo_arith.run(config("ppo.rollouts_per_update=2048", "ppo.num_minibatches=2"), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
