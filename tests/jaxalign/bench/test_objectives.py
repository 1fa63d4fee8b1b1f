"""`jaxalign bench objectives` on a tiny budget: one row per (objective, task, seed) with every required column,
the markdown table and the plot, objectives that need extras reported rather than skipped silently, and a rerun
that resumes instead of training again."""
from __future__ import annotations


import pytest

from jaxalign.bench import objectives

TINY = [
    "task.num_operands=3", "model.d_model=64", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "model.head_dim=16", "model.mlp_dim=128", "sft.steps=40", "sft.batch_size=32", "sft.optim.learning_rate=1e-2",
    "sft.optim.warmup_steps=5", "pairs.num_prompts=96", "pairs.samples_per_prompt=4",
    "pairs.require_correct_chosen=false", "dpo.steps=4", "dpo.batch_size=16", "dpo.list_batch_size=8",
    "dpo.eval_every=4",
    "num_val_prompts=32", "eval_fraction=0.064", "eval_batch_size=64", "show_progress=false",
]  # fmt: skip


def test_objectives_benchmark_writes_one_row_per_run_and_resumes(tmp_path, capsys):
    argv = ["--workdir", str(tmp_path), "--seeds", "0", "--tasks", "noisy_labels", "--objectives",
            "sigmoid;simpo[gamma_beta_ratio=0.25];plackett_luce", *TINY]
    summary = objectives.main(argv)
    rows = objectives.read_csv(str(tmp_path / "objectives.csv"))
    assert sorted((r["objective"], r["task"], r["seed"]) for r in rows) == [
        ("plackett_luce", "noisy_labels", "0"), ("sigmoid", "noisy_labels", "0"),
        ("simpo[gamma_beta_ratio=0.25]", "noisy_labels", "0")]
    for column in ("objective", "task", "seed", "accuracy", "kl_to_ref", "chosen_logp_change",
                   "rejected_logp_change", "mean_length"):
        assert all(r[column] != "" for r in rows), column
    assert {s["objective"] for s in summary} == {"sigmoid", "simpo[gamma_beta_ratio=0.25]", "plackett_luce"}
    assert (tmp_path / "objectives.png").stat().st_size > 0
    assert "## noisy_labels" in (tmp_path / "objectives.md").read_text()
    capsys.readouterr()

    objectives.main(argv)  # everything done: no run is repeated, no row duplicated
    assert "[objectives] seed 0" not in capsys.readouterr().err
    assert len(objectives.read_csv(str(tmp_path / "objectives.csv"))) == 3


def test_objectives_benchmark_rejects_unknown_tasks_and_objectives(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        objectives.main(["--workdir", str(tmp_path), "--tasks", "nope"])
    with pytest.raises(ValueError, match="cannot be benchmarked"):
        objectives.main(["--workdir", str(tmp_path), "--objectives", "not_an_objective"])
