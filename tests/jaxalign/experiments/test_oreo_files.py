"""Tests for the oreo_files experiment (jaxalign.experiments.oreo_files): OREO end to end on a tiny random Llama
built with transformers, the sample tokenizer and tests/data/preferences/trajectories.jsonl.

One shared full run (module fixture) backs several checks: the held-out metrics at step 0 (policy = reference, V = 0:
both losses and the last-state MSE equal the mean of R^2), training lowers the value loss, results.json counts the
data, the plot exists and the export is the trained policy. Beside it: resuming after an interruption (same final
policy and critic as the uninterrupted run), LoRA on a `jaxalign convert` directory with skipped rows and an export
read back by transformers, the refusals before the work directory exists, and the step positions built from a file
row against a hand-computed case."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

# torch and transformers come from the bench extra, which `make test` installs: missing, these tests fail.
import torch
import transformers

from dpo_files_support import compilation_cache  # noqa: F401 (a fixture this module uses)
from dpo_files_support import DATA, TOKENIZER, VOCAB, read_jsonl, read_rows, tiny_hf_model, write_jsonl
from jaxalign.data.formats import DataFormatError
from jaxalign.data.tokenize import TokenizeConfig, load_hf_tokenizer, tokenize_records
from jaxalign.experiments import oreo_files
from jaxalign.models import hf
from jaxalign.overrides import ConfigError, apply_overrides
from jaxalign.rundir import params_sha256

STEPS = 4
SAMPLE = DATA / "preferences" / "trajectories.jsonl"
COMMON = [f"oreo.steps={STEPS}", "oreo.eval_every=2", "oreo.batch_size=4", "oreo.actor_optim.learning_rate=1e-3",
          "oreo.actor_optim.warmup_steps=0", "oreo.critic_optim.learning_rate=1e-2",
          "oreo.critic_optim.warmup_steps=0", "data.max_length=48", "data.eval_fraction=0.25",
          "log_every=1", "show_progress=false", "eval_batch_size=8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(Hugging Face model dir with the tokenizer files, jaxalign convert dir) in a temporary dir."""
    root = tmp_path_factory.mktemp("oreo_files")
    hf_dir = tiny_hf_model(root, layers=1)  # OREO's update holds three copies of the model: one layer compiles fast
    native_dir = root / "native_model"
    params, cfg = hf.from_pretrained(hf_dir)
    hf.save_native(params, cfg, native_dir, family="llama")
    return hf_dir, native_dir


pytestmark = pytest.mark.usefixtures("compilation_cache")


def config(*overrides: str) -> oreo_files.OreoFilesConfig:
    return apply_overrides(oreo_files.OreoFilesConfig(), [*COMMON, *overrides])


def heldout_rewards(n: int, fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    rewards = np.array([row["reward"] for row in read_rows("trajectories.jsonl")], np.float64)[:n]
    return rewards[oreo_files.split_rows(n, fraction, seed)[1]]


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):
    """(workdir, results) of an uninterrupted full-parameter run with an export."""
    workdir = tmp_path_factory.mktemp("full")
    results = oreo_files.run(config(f"model.path={files[0]}", f"data.path={SAMPLE}", "export.enabled=true"),
                             str(workdir))
    return workdir, results


def test_heldout_metrics_at_step_0_and_training(full_run):
    """At step 0 the policy is the reference (log-ratios 0, KL 0) and the critic's head is zero (V = 0), so the
    value loss, the policy loss and the last-state MSE all equal the held-out mean of R^2, and the value accuracy is
    the share of failed trajectories (V = 0 is below the midpoint 0.5). Training lowers the value loss."""
    workdir, results = full_run
    before, after = results["eval_before"], results["eval_after"]
    r2 = float(np.mean(heldout_rewards(20) ** 2))
    assert [r["step"] for r in results["eval_history"]] == [0, 2, STEPS] and before["step"] == 0
    for key in ("eval/value_loss", "eval/policy_loss", "eval/policy_bellman", "eval/value_last_mse"):
        assert before[key] == pytest.approx(r2, abs=1e-6), key
    assert before["eval/kl"] == pytest.approx(0.0, abs=1e-7) and before["eval/value_last_mean"] == 0.0
    assert before["eval/value_last_accuracy"] == pytest.approx(1 - np.mean(heldout_rewards(20) > 0.5))
    assert results["value_accuracy_midpoint"] == 0.5
    assert after["eval/value_last_mse"] != before["eval/value_last_mse"]
    records = [r for r in read_jsonl(workdir / "metrics.jsonl") if "oreo/value_loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert after["eval/value_loss"] < before["eval/value_loss"] - 0.05, (before, after)
    assert (workdir / "oreo_heldout.png").stat().st_size > 0


def test_results_count_the_data(full_run):
    _, results = full_run
    assert results["rows_read"] == 20 and results["rows_skipped"] == 0
    assert results["eval_trajectories"] == 5 and results["train_trajectories"] == 15
    assert {"value_loss_before", "value_loss_after", "policy_loss_after", "value_last_accuracy_after",
            "value_last_mse_after", "train_value_loss_last"} <= set(results)
    assert results["model_format"] == "hf" and results["family"] == "llama"
    assert results["num_trainable_params"] == results["num_params"]


def test_export_is_the_trained_policy(files, full_run):
    workdir, results = full_run
    params, _ = hf.from_pretrained(workdir / "export")
    assert params_sha256(params) == results["params_sha256"]
    assert params_sha256(params) != params_sha256(hf.from_pretrained(files[0])[0])


def test_resume_after_an_interruption_gives_the_same_policy_and_critic(files, full_run, tmp_path, monkeypatch):
    """A run stopped after step 3 (after its evaluation at step 2; its checkpoints at 3 written, then an exception,
    as a kill after a checkpoint would leave it) and re-run with the same command ends with bit-identical policy and
    critic to the uninterrupted run, and the same evaluation history."""
    cfg = config(f"model.path={files[0]}", f"data.path={SAMPLE}")  # the export does not change the policy
    real = oreo_files.train_oreo

    def interrupted(*args, cfg, **kwargs):
        if cfg.steps != STEPS:
            return real(*args, cfg=cfg, **kwargs)
        real(*args, cfg=dataclasses.replace(cfg, steps=3), **kwargs)
        raise KeyboardInterrupt("killed after step 3")

    monkeypatch.setattr(oreo_files, "train_oreo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        oreo_files.run(cfg, str(tmp_path))
    monkeypatch.setattr(oreo_files, "train_oreo", real)
    assert not (tmp_path / "results.json").exists()
    results = oreo_files.run(cfg, str(tmp_path))
    assert results["params_sha256"] == full_run[1]["params_sha256"]
    assert results["critic_sha256"] == full_run[1]["critic_sha256"]
    assert results["eval_history"] == full_run[1]["eval_history"]
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "oreo/value_loss" in r]
    assert steps == list(range(1, STEPS + 1))  # each step logged once across the two runs


def test_lora_on_a_converted_model_with_skipped_rows_and_an_export(files, tmp_path):
    """LoRA adapters on a `jaxalign convert` directory (tokenizer given separately), on the
    sample plus bad rows with data.on_error=skip: the bad rows are counted per reason, only the adapters train,
    and the export (adapters merged) loads in transformers with our logits."""
    from jaxalign.models import DecoderLM

    bad = [{"prompt": "Compute 1+1.\n", "steps": [], "reward": 1},
           {"prompt": "Compute 1+1.\n", "steps": ["1+1=2"], "reward": "yes"},
           {"prompt": "Compute 1+1.\n", "chosen": "2", "rejected": "3"}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", read_rows("trajectories.jsonl") + bad)
    results = oreo_files.run(config(f"model.path={files[1]}", f"model.tokenizer={TOKENIZER}", f"data.path={mixed}",
                                    "data.on_error=skip", "lora.rank=4", "lora.targets=attn/(q|v),mlp/up",
                                    "oreo.actor_optim.learning_rate=3e-2",
                                    "export.enabled=true"), str(tmp_path / "run"))
    assert results["model_format"] == "jaxalign"
    validation = results["data"]["validation"]
    assert validation["rows_read"] == 23 and results["rows_skipped"] == 3
    assert validation["skipped_by_reason"] == {"steps: empty": 1, "reward: wrong type": 1, "steps: missing": 1}, \
        validation["skipped_by_reason"]
    assert 0 < results["num_trainable_params"] < results["num_params"] / 5
    assert results["value_loss_before"] == pytest.approx(float(np.mean(heldout_rewards(20) ** 2)), abs=1e-6)

    export = tmp_path / "run" / "export"
    params, cfg = hf.from_pretrained(export)
    assert params_sha256(params) == results["params_sha256"]
    assert params_sha256(params) != params_sha256(hf.from_pretrained(files[0])[0])  # the adapters moved it
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 10))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(jax.jit(DecoderLM(cfg).apply)({"params": params}, tokens, np.ones_like(tokens))[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_refusals_before_the_work_directory_exists(files, tmp_path, capsys):
    """Missing paths, a file of another format (a pairwise file: the row error names file, line and field), a
    missing tokenizer and a data.max_length over the model's context are one error each, and no directory is
    created; from the command line, exit 2 and one error line."""
    from launch.cli import main

    workdir = tmp_path / "run"
    pairwise = DATA / "preferences" / "pairwise.jsonl"
    with pytest.raises(ValueError, match="model.path is required"):
        oreo_files.run(config(f"data.path={SAMPLE}"), str(workdir))
    with pytest.raises(ValueError, match="data.path is required"):
        oreo_files.run(config(f"model.path={files[0]}"), str(workdir))
    with pytest.raises(ValueError, match="does not exist"):
        oreo_files.run(config(f"model.path={files[0]}", "data.path=/no/such.jsonl"), str(workdir))
    with pytest.raises(DataFormatError, match=r"pairwise.jsonl line 1: field 'steps' is missing"):
        oreo_files.run(config(f"model.path={files[0]}", f"data.path={pairwise}"), str(workdir))
    with pytest.raises(DataFormatError, match=r"no row of .*pairwise.jsonl is a trajectory row.*'steps'"):
        oreo_files.run(config(f"model.path={files[0]}", f"data.path={pairwise}", "data.on_error=skip"), str(workdir))
    with pytest.raises(ValueError, match="set model.tokenizer"):
        oreo_files.run(config(f"model.path={files[1]}", f"data.path={SAMPLE}"), str(workdir))
    for model in (f"model.path={files[0]}", f"model.path={files[1]}"):  # read from config.json / jaxalign_config.json
        with pytest.raises(ValueError, match="data.max_length=65 exceeds the model's context of 64 positions"):
            oreo_files.run(config(model, f"model.tokenizer={TOKENIZER}", f"data.path={SAMPLE}", "data.max_length=65"),
                           str(workdir))
    assert not workdir.exists()
    with pytest.raises(ConfigError, match="oreo.level must be one of"):
        config("oreo.level=sentence")

    capsys.readouterr()
    code = main(["run", "oreo_files", "--workdir", str(workdir), f"model.path={files[0]}", f"data.path={pairwise}",
                 "show_progress=false"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("jaxalign: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "pairwise.jsonl line 1" in errors[0] and "'steps'" in errors[0], errors[0]
    assert not workdir.exists()


def test_step_positions_from_a_file_row_match_a_hand_computed_case():
    """A row's tokens are [BOS] + prompt, then each step tokenized on its own with the separator after all but the
    last and EOS after the last; the step starts are the first token of each step, the OREO states at step level."""
    tok = load_hf_tokenizer(str(TOKENIZER))
    row = {"prompt": "Compute 3+4+8.\n", "steps": ["3+4=7", "7+8=15", "So 15."], "reward": 1.0, "line": 1}
    data = tokenize_records("trajectory", [row], tok, TokenizeConfig(max_length=48))
    arrays = oreo_files.trajectory_arrays(data.arrays)

    prompt = [tok.bos_id] + tok.encode(row["prompt"])
    pieces = [tok.encode("3+4=7\n"), tok.encode("7+8=15\n"), tok.encode("So 15.") + [tok.eos_id]]
    p, lengths = len(prompt), [len(x) for x in pieces]
    total = p + sum(lengths)
    expected_starts = np.zeros(48, bool)
    expected_starts[[p, p + lengths[0], p + lengths[0] + lengths[1]]] = True
    np.testing.assert_array_equal(arrays["tokens"][0, :total], prompt + pieces[0] + pieces[1] + pieces[2])
    np.testing.assert_array_equal(arrays["step_starts"][0], expected_starts)
    np.testing.assert_array_equal(arrays["completion_mask"][0], (np.arange(48) >= p) & (np.arange(48) < total))
    np.testing.assert_array_equal(np.nonzero(data.arrays["step_end_mask"][0])[0],
                                  [p + lengths[0] - 1, p + lengths[0] + lengths[1] - 1, total - 1])
    assert arrays["reward"].tolist() == [1.0]


def test_step_starts_from_ends_by_hand():
    completion = np.array([[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0]])
    ends = np.array([[0, 0, 0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(oreo_files.step_starts_from_ends(completion, ends).astype(int),
                                  [[0, 0, 1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
    # A truncated row whose last step lost its end: its start is still the token after the previous end.
    np.testing.assert_array_equal(oreo_files.step_starts_from_ends([[1, 1, 1, 1]], [[0, 1, 0, 0]]).astype(int),
                                  [[1, 0, 1, 0]])


def test_value_accuracy_and_split():
    assert oreo_files.reward_midpoint(np.array([0.0, 1.0, 1.0])) == 0.5
    assert oreo_files.reward_midpoint(np.array([-1.0, 1.0])) == 0.0
    assert oreo_files.value_accuracy(np.array([0.7, 0.2, 0.6, 0.4]), np.array([1.0, 0.0, 0.0, 1.0]), 0.5) == 0.5
    train, held = oreo_files.split_rows(20, 0.25, seed=0)
    assert len(held) == 5 and sorted(np.concatenate([train, held]).tolist()) == list(range(20))
