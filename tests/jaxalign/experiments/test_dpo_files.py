"""Tests for the dpo_files experiment (jaxalign.experiments.dpo_files): DPO end to end on a tiny random Llama built
with transformers and the sample tokenizer and preference files of tests/data.

One shared full run (module fixture) backs several checks: the held-out loss at step 0 is log 2 (policy =
reference), training lowers the training loss, results.json counts the data, the held-out plot exists and the
export loads in transformers with the same logits. Beside it: LoRA on a `jaxalign convert` directory, resuming after
an interruption (same final parameters as the uninterrupted run), a bad row through the command line (exit 2, one
line naming file, line and field), and the small pure helpers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

# torch and transformers come from the bench extra, which `make test` installs: missing, these tests fail.
import torch
import transformers

from dpo_files_support import compilation_cache  # noqa: F401 (a fixture this module uses)
from dpo_files_support import DATA, read_jsonl, REPO, tiny_hf_model, TOKENIZER, VOCAB
from jaxalign.data.tokenize import load_hf_tokenizer  # noqa: E402
from jaxalign.experiments import dpo_files  # noqa: E402
from jaxalign.models import hf  # noqa: E402
from jaxalign.overrides import ConfigError, apply_overrides  # noqa: E402
from jaxalign.train import preference  # noqa: E402

STEPS = 6
# Shared by every run: a small batch and a learning rate that moves a random model visibly in a few steps.
COMMON = [f"dpo.steps={STEPS}", "dpo.batch_size=4", "dpo.beta=0.5", "dpo.optim.learning_rate=1e-2",
          "dpo.optim.warmup_steps=0", "dpo.eval_every=3", "data.max_length=48", "data.eval_fraction=0.25",
          "checkpoint.every_steps=1", "log_every=1", "show_progress=false", "eval_batch_size=16"]


def sample_pairs() -> list[dict]:
    """The sample file's pairs plus 24 generated ones in the same style (the sample alone is 4 rows)."""
    with open(DATA / "preferences" / "pairwise.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rng = np.random.default_rng(0)
    for _ in range(24):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        rows.append({"prompt": f"Question: what is {a}+{b}?\nAnswer:", "chosen": f" {a + b}",
                     "rejected": f" {a + b + int(rng.integers(1, 9))}, I think"})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(Hugging Face model dir with the tokenizer files, jaxalign convert dir, data file) in a temporary dir."""
    root = tmp_path_factory.mktemp("dpo_files")
    hf_dir = tiny_hf_model(root)
    native_dir = root / "native_model"
    params, cfg = hf.from_pretrained(hf_dir)
    hf.save_native(params, cfg, native_dir, family="llama")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in sample_pairs()))
    return hf_dir, native_dir, data


pytestmark = pytest.mark.usefixtures("compilation_cache")


def config(*overrides: str) -> dpo_files.DPOFilesConfig:
    return apply_overrides(dpo_files.DPOFilesConfig(), [*COMMON, *overrides])


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):
    """(workdir, results) of an uninterrupted full-parameter run with a cached reference and an export."""
    hf_dir, _, data = files
    workdir = tmp_path_factory.mktemp("full")
    results = dpo_files.run(config(f"model.path={hf_dir}", f"data.path={data}", "export.enabled=true"), str(workdir))
    return workdir, results


def test_heldout_loss_starts_at_log2_and_training_lowers_the_loss(full_run):
    workdir, results = full_run
    before, after = results["eval_before"], results["eval_after"]
    assert before["step"] == 0 and after["step"] == STEPS
    assert before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval/reward_margin"] == 0.0 and before["eval/reward_accuracy"] == 0.0
    assert [r["step"] for r in results["eval_history"]] == [0, 3, 6]
    losses = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the first batch is scored before any update
    assert losses[-1] < losses[0] - 0.05, losses
    assert after["eval/loss"] != before["eval/loss"]
    assert (workdir / "dpo_heldout.png").stat().st_size > 0


def test_results_count_the_data(full_run):
    _, results = full_run
    rows = len(sample_pairs())
    assert results["rows_read"] == rows and results["rows_skipped"] == 0
    assert results["eval_pairs"] == round(0.25 * rows) and results["train_pairs"] == rows - results["eval_pairs"]
    assert results["data"]["validation"]["rows_kept"] == rows
    assert results["data"]["tokenization"]["completions_truncated"] == 0
    assert results["model_format"] == "hf" and results["family"] == "llama"
    summary = {k for k, v in results.items() if not isinstance(v, (dict, list))}
    assert {"eval_loss_before", "eval_loss_after", "eval_reward_accuracy_after", "rows_skipped",
            "prompts_truncated", "completions_truncated", "train_loss_last"} <= summary
    assert results["train_loss_first_logged_step"] == 1


def test_export_loads_in_transformers_with_our_logits(files, full_run):
    """The exported policy is a transformers checkpoint of the source family whose logits are the trained policy's
    (checked against our model on the same export), with the tokenizer files beside it."""
    from jaxalign.models import DecoderLM

    workdir, results = full_run
    export = workdir / "export"
    assert results["export"]["family"] == "llama"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(export))
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 10))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens)).logits.numpy()
    params, cfg = hf.from_pretrained(export)
    ours = np.asarray(DecoderLM(cfg).apply({"params": params}, tokens, np.ones_like(tokens))[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    from jaxalign.rundir import params_sha256

    assert params_sha256(params) == results["params_sha256"]  # the export is the trained policy, bit for bit
    assert params_sha256(params) != params_sha256(hf.from_pretrained(files[0])[0])  # ... which has moved


def test_generate_from_the_export_stops_where_transformers_generate_stops(full_run, capsys):
    """The export carries the tokenizer's special-token ids (config.json and generation_config.json), so
    transformers' greedy `generate`, left to its own defaults, gives exactly the tokens `jaxalign generate --model`
    gives, EOS included; `--checkpoint WORKDIR` (the trained state) gives the same completions."""
    from jaxalign.generation import encode_prompts, load_hf_policy
    from launch.cli import main

    workdir, _ = full_run
    export = workdir / "export"
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 4, "pad_token_id": 0}
    prompts = ["Question: what is 2+2?\nAnswer:", "Hello"]
    policy = load_hf_policy(str(export))
    ids, mask = encode_prompts(policy.tokenizer, prompts)
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=24).numpy()[:, ids.shape[1]:]
    expected = []
    for row in theirs:
        row = [int(t) for t in row if t != 0]
        expected.append(policy.tokenizer.decode(row[:row.index(4)] if 4 in row else row))

    for source in (["--model", str(export)], ["--checkpoint", str(workdir)]):
        assert main(["generate", *source, "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens",
                     "24"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["completion"] for r in rows] == expected, source


def test_resume_after_an_interruption_gives_the_same_params(files, full_run, tmp_path, monkeypatch):
    """A run stopped after step 4 (its checkpoint written, then an exception, as a kill would leave it) and re-run
    with the same command ends with bit-identical parameters to the uninterrupted run."""
    hf_dir, _, data = files
    cfg = config(f"model.path={hf_dir}", f"data.path={data}", "export.enabled=true")
    real_loop = preference.train_loop

    def interrupted(**kwargs):
        real_loop(**dict(kwargs, num_steps=4))
        raise KeyboardInterrupt("killed after step 4")

    monkeypatch.setattr(preference, "train_loop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dpo_files.run(cfg, str(tmp_path))
    monkeypatch.setattr(preference, "train_loop", real_loop)
    assert not (tmp_path / "results.json").exists()
    results = dpo_files.run(cfg, str(tmp_path))
    assert results["params_sha256"] == full_run[1]["params_sha256"]
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # each step logged once across the two runs
    assert results["eval_history"] == full_run[1]["eval_history"]


def test_lora_on_a_converted_model_with_skipped_and_truncated_rows(files, tmp_path):
    """LoRA adapters on a `jaxalign convert` directory (tokenizer given separately), online reference, on the
    sample pairs plus every row of pairwise_bad.jsonl with data.on_error=skip and a short max_length: the bad rows
    are counted per reason, the truncations counted; the run starts at log 2, trains only the adapters and lowers
    the training loss."""
    _, native_dir, data = files
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(data.read_text() + (DATA / "preferences" / "pairwise_bad.jsonl").read_text())
    results = dpo_files.run(config(f"model.path={native_dir}", f"model.tokenizer={TOKENIZER}",
                                   f"data.path={mixed}", "data.on_error=skip", "data.max_length=20",
                                   "lora.rank=4", "lora.targets=attn/(q|v),mlp/up", "dpo.reference=online",
                                   "dpo.optim.learning_rate=3e-2"), str(tmp_path / "run"))
    assert results["model_format"] == "jaxalign"
    validation = results["data"]["validation"]
    assert validation["rows_read"] == len(sample_pairs()) + 9 and validation["rows_skipped"] == 7
    assert validation["skipped_by_reason"]["chosen: wrong type"] == 2
    assert results["rows_skipped"] == 7 and results["train_pairs"] + results["eval_pairs"] == len(sample_pairs()) + 2
    assert results["prompts_truncated"] + results["completions_truncated"] > 0
    assert results["completions_truncated"] == results["data"]["tokenization"]["completions_truncated"]
    assert results["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert 0 < results["num_trainable_params"] < results["num_params"] / 5
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] - 0.02, losses

    # `jaxalign generate` reads the LoRA checkpoint back: adapters merged into model.path, the run's tokenizer.
    from jaxalign.generation import load_policy
    from jaxalign.rundir import params_sha256

    policy = load_policy(str(tmp_path / "run"))
    assert params_sha256(policy.params) == results["params_sha256"]
    assert policy.tokenizer.fingerprint == load_hf_tokenizer(str(TOKENIZER)).fingerprint


def test_a_bad_row_is_one_error_line_from_the_command_line(files, tmp_path):
    hf_dir, _, _ = files
    bad = DATA / "preferences" / "pairwise_bad.jsonl"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "run", "dpo_files", "--workdir", str(tmp_path),
                           f"model.path={hf_dir}", f"data.path={bad}", "data.max_length=48", "show_progress=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxalign: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "pairwise_bad.jsonl line 2" in errors[0] and "'chosen'" in errors[0] and "42" in errors[0], errors[0]


def test_a_different_config_is_refused_in_the_same_workdir(files, full_run):
    hf_dir, _, data = files
    workdir, _ = full_run
    with pytest.raises(ValueError, match="dpo.beta=0.5, but this run has 0.25"):
        dpo_files.run(config(f"model.path={hf_dir}", f"data.path={data}", "export.enabled=true", "dpo.beta=0.25"),
                      str(workdir))


def test_config_errors_name_the_key(files, tmp_path):
    with pytest.raises(ConfigError, match="dpo.reference must be one of"):
        config("dpo.reference=frozen")
    with pytest.raises(ValueError, match="listwise"):  # refused before the work directory exists
        dpo_files.run(config(f"model.path={files[0]}", f"data.path={files[2]}", "loss=plackett_luce"),
                      str(tmp_path / "lists"))
    assert not (tmp_path / "lists").exists()
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        config("data.eval_fraction=0")
    with pytest.raises(ValueError, match="model.path is required"):
        dpo_files.run(config(f"data.path={files[2]}"), str(tmp_path))
    with pytest.raises(ValueError, match="exceeds the model's context of 64 positions"):
        dpo_files.run(config(f"model.path={files[0]}", f"data.path={files[2]}", "data.max_length=65"),
                      str(tmp_path / "long"))
    with pytest.raises(ValueError, match="neither config.json"):
        dpo_files.run(config(f"model.path={tmp_path}", f"data.path={files[2]}"), str(tmp_path / "w"))


def test_split_is_deterministic_disjoint_and_complete():
    train, held = dpo_files.split_rows(28, 0.25, seed=0)
    assert len(held) == 7 and len(train) == 21
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(28))
    np.testing.assert_array_equal(held, dpo_files.split_rows(28, 0.25, seed=0)[1])
    assert not np.array_equal(held, dpo_files.split_rows(28, 0.25, seed=1)[1])
    assert len(dpo_files.split_rows(2, 0.01, seed=0)[1]) == 1 and len(dpo_files.split_rows(2, 0.99, seed=0)[0]) == 1


def test_pair_metrics():
    m = dpo_files.pair_metrics([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0], beta=0.5)
    # rewards: chosen (0.5, 0), rejected (-0.5, 0.5); margins (1, -0.5)
    assert m["eval/reward_accuracy"] == 0.5 and m["eval/reward_margin"] == pytest.approx(0.25)
    assert m["eval/loss"] == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(0.5))) / 2)


def test_a_missing_tokenizer_is_refused_before_the_directory_is_claimed(files, tmp_path):
    """A converted model without its tokenizer fails before config.json is written, so the corrected command (the
    same overrides plus model.tokenizer) is not refused as another run."""
    _, native_dir, data = files
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="set model.tokenizer to the model's tokenizer.json"):
        dpo_files.run(config(f"model.path={native_dir}", f"data.path={data}"), str(workdir))
    assert not (workdir / "config.json").exists()
    with pytest.raises(ValueError, match=r"model.tokenizer='/no/such/tokenizer' does not exist"):
        dpo_files.run(config(f"model.path={native_dir}", f"data.path={data}", "model.tokenizer=/no/such/tokenizer"),
                      str(workdir))
    assert not (workdir / "config.json").exists()
