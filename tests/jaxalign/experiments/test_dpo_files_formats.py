"""dpo_files on the stepwise and ranked formats (jaxalign.experiments.dpo_files): Step-DPO and the listwise
objectives end to end on a tiny random Llama built with transformers, the sample tokenizer and the sample files of
tests/data/preferences (plus generated rows in the same style, the samples alone being 3 rows each).

Each test backs one walkthrough of the README: stepwise rows train like pairs (held-out loss log 2 at step 0, then
lower); ranked lists train with plackett_luce (full parameters, export) and rankdpo (LoRA, online reference), their
held-out listwise loss at step 0 matching a NumPy computation of the objective at policy = reference and going
down; a resumed ranked run ends where the uninterrupted one does; a data.format / loss mismatch is one line before
any directory exists."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from dpo_files_support import REPO, read_rows, tiny_hf_model, write_jsonl
from jaxalign.experiments import dpo_files  # noqa: E402
from jaxalign.overrides import apply_overrides  # noqa: E402
from jaxalign.train import preference  # noqa: E402

STEPS = 6
COMMON = [f"dpo.steps={STEPS}", "dpo.batch_size=4", "dpo.list_batch_size=4", "dpo.beta=0.5",
          "dpo.optim.learning_rate=1e-2", "dpo.optim.warmup_steps=0", "dpo.eval_every=3", "data.max_length=40",
          "data.eval_fraction=0.25", "checkpoint.every_steps=1", "log_every=1", "show_progress=false",
          "eval_batch_size=16"]


def stepwise_rows() -> list[dict]:
    """The sample steps plus 25 generated ones: the next step of a running sum, correct against wrong and hedged
    (a pattern a tiny model picks up in a few steps, so the held-out loss can go down)."""
    rows = read_rows("stepwise.jsonl")
    rng = np.random.default_rng(0)
    for i in range(25):
        a, b, c = (int(x) for x in rng.integers(1, 20, 3))
        first = f"{a}+{b}={a + b}"
        prefix, (x, y) = ([], (a, b)) if i % 2 else ([first], (a + b, c))
        rows.append({"prompt": f"Compute {a}+{b}+{c}.\n", "prefix": prefix, "chosen": f"{x}+{y}={x + y}",
                     "rejected": f"{x}+{y}={x + y + int(rng.integers(1, 9))}, I guess"})
    return rows


def ranked_rows() -> list[dict]:
    """The sample lists plus 21 generated ones of 3 or 4 graded answers (the sample file has ties and a chat row)."""
    rows = read_rows("ranked.jsonl")
    rng = np.random.default_rng(1)
    for i in range(21):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        answers = [f" {a + b}", f" {a + b + 1}, I think", f" {a * b + 7} maybe", " no idea"][: 3 + i % 2]
        rows.append({"prompt": f"Question: what is {a}+{b}?\nAnswer:", "completions": answers,
                     "scores": [1.0, 0.5, 0.0, 0.0][: len(answers)]})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(Hugging Face model dir with the tokenizer files, stepwise file, ranked file)."""
    root = tmp_path_factory.mktemp("dpo_files_formats")
    hf_dir = tiny_hf_model(root)
    return hf_dir, write_jsonl(root / "steps.jsonl", stepwise_rows()), write_jsonl(root / "lists.jsonl",
                                                                                   ranked_rows())


def config(*overrides: str) -> dpo_files.DPOFilesConfig:
    return apply_overrides(dpo_files.DPOFilesConfig(), [*COMMON, *overrides])


def heldout_losses(results: dict) -> list[float]:
    return [r["eval/loss"] for r in results["eval_history"]]


def numpy_plackett_luce_at_reference(scores: list[float]) -> float:
    """Rafailov et al. 2023 eq. 18 with every implicit reward 0 (policy = reference) and ties giving no preference:
    each candidate with n strictly worse ones contributes -log(1 / (1 + n))."""
    s = np.asarray(scores, np.float64)
    return float(sum(math.log(1 + int(np.sum(s < v))) for v in s))


def test_stepwise_trains_like_pairs(files, tmp_path):
    """Step-DPO walkthrough: the question plus the earlier steps is the prompt, the next step the completion."""
    hf_dir, steps, _ = files
    results = dpo_files.run(config(f"model.path={hf_dir}", f"data.path={steps}", "data.format=stepwise"),
                            str(tmp_path))
    assert results["data"]["format"] == "stepwise" and results["rows_skipped"] == 0
    assert results["train_pairs"] + results["eval_pairs"] == len(stepwise_rows())
    losses = heldout_losses(results)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert results["eval_before"]["eval/reward_accuracy"] == 0.0
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.fixture(scope="module")
def plackett_luce_run(files, tmp_path_factory):
    hf_dir, _, lists = files
    workdir = tmp_path_factory.mktemp("pl")
    cfg = config(f"model.path={hf_dir}", f"data.path={lists}", "data.format=ranked", "loss=plackett_luce",
                 "export.enabled=true")
    return cfg, workdir, dpo_files.run(cfg, str(workdir))


def test_ranked_plackett_luce_trains_from_the_numpy_loss_at_the_reference(plackett_luce_run):
    """Ranked walkthrough: the held-out loss at step 0 is eq. 18 at policy = reference on the held-out lists (by
    NumPy, from the file's scores), and training lowers it; top-1 accuracy starts at 0 (all rewards tie)."""
    _, workdir, results = plackett_luce_run
    rows = ranked_rows()
    _, held = dpo_files.split_rows(len(rows), 0.25, seed=0)
    expected = np.mean([numpy_plackett_luce_at_reference(rows[i]["scores"]) for i in held])
    losses = heldout_losses(results)
    assert losses[0] == pytest.approx(expected, rel=1e-6)
    assert losses[-1] < losses[0] - 0.01, losses
    assert results["eval_top1_accuracy_before"] == 0.0 and results["eval_reward_margin_before"] == 0.0
    assert results["train_lists"] + results["eval_lists"] == len(rows) and results["eval_lists"] == len(held)
    assert [r["step"] for r in results["eval_history"]] == [0, 3, 6]
    assert (workdir / "dpo_heldout.png").stat().st_size > 0
    assert (workdir / "export" / "config.json").is_file() and results["export"]["family"] == "llama"


def test_ranked_resume_gives_the_same_params(files, plackett_luce_run, tmp_path, monkeypatch):
    """A ranked run interrupted after step 4 and re-run ends bit-identical to the uninterrupted run."""
    cfg, _, full = plackett_luce_run
    real_loop = preference.train_loop

    def interrupted(**kwargs):
        real_loop(**dict(kwargs, num_steps=4))
        raise KeyboardInterrupt("killed after step 4")

    monkeypatch.setattr(preference, "train_loop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dpo_files.run(cfg, str(tmp_path))
    monkeypatch.setattr(preference, "train_loop", real_loop)
    results = dpo_files.run(cfg, str(tmp_path))
    assert results["params_sha256"] == full["params_sha256"]
    assert results["eval_history"] == full["eval_history"]


def test_ranked_rankdpo_with_lora_trains(files, tmp_path):
    """rankdpo on LoRA adapters with an online reference: every contributing list starts at log 2 (the DCG weights
    are normalised, every pair term is log 2), and the held-out loss goes down."""
    hf_dir, _, lists = files
    results = dpo_files.run(config(f"model.path={hf_dir}", f"data.path={lists}", "data.format=ranked",
                                   "loss=rankdpo", "lora.rank=4", "dpo.reference=online",
                                   "dpo.optim.learning_rate=3e-2", "dpo.select_best=true"), str(tmp_path))
    losses = heldout_losses(results)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.01, losses
    assert 0 < results["num_trainable_params"] < results["num_params"] / 5


@pytest.mark.parametrize("fmt, loss, needle", [
    ("ranked", "sigmoid", "loss=sigmoid (dpo.objective) is pairwise and trains on pairs, but data.format=ranked"),
    ("ranked", "tpo", "loss=tpo (dpo.objective) needs step_ids, hidden"),
    ("stepwise", "plackett_luce", "loss=plackett_luce (dpo.objective) is listwise and trains on ranked lists, "
                                  "but data.format=stepwise"),
])
def test_a_format_objective_mismatch_is_one_line_before_any_directory(files, tmp_path, fmt, loss, needle):
    hf_dir, steps, lists = files
    data = lists if fmt == "ranked" else steps
    with pytest.raises(ValueError) as error:
        dpo_files.run(config(f"model.path={hf_dir}", f"data.path={data}", f"data.format={fmt}", f"loss={loss}"),
                      str(tmp_path / "run"))
    assert needle in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_mismatch_from_the_command_line_is_one_error_line(files, tmp_path):
    hf_dir, _, lists = files
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "run", "dpo_files", "--workdir", str(tmp_path / "w"),
                           f"model.path={hf_dir}", f"data.path={lists}", "data.format=ranked", "loss=sigmoid"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxalign: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "data.format=ranked" in errors[0] and "loss=sigmoid" in errors[0], errors[0]
    assert not (tmp_path / "w").exists()


def test_unsupported_formats_are_refused_by_the_config():
    from jaxalign.overrides import ConfigError

    with pytest.raises(ConfigError, match="data.format must be one of"):
        config("data.format=trajectory")


def test_list_metrics_against_numpy():
    """Two lists (one with a tie, one with a padding slot), rewards beta * (policy - reference) set by hand."""
    policy = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]])
    reference = np.zeros_like(policy)
    scores = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    valid = np.array([[1, 1, 1], [1, 1, 0]])
    m = dpo_files.list_metrics(policy, reference, scores, valid, "plackett_luce", {"beta": 0.5}, beta=0.5)
    r = 0.5 * policy
    # list 0: candidates 0 and 2 (tied best) each beat 1; list 1: 0 beats 1, slot 2 is padding.
    pl0 = -(r[0, 0] - np.logaddexp(r[0, 0], r[0, 1])) - (r[0, 2] - np.logaddexp(r[0, 2], r[0, 1]))
    pl1 = -(r[1, 0] - np.logaddexp(r[1, 0], r[1, 1]))
    assert m["eval/loss"] == pytest.approx((pl0 + pl1) / 2, rel=1e-6)
    assert m["eval/top1_accuracy"] == 0.5  # list 0: a best one has the top reward; list 1: the worse one has
    assert m["eval/pair_accuracy"] == pytest.approx(2 / 3)
    assert m["eval/reward_margin"] == pytest.approx(((r[0, 0] - r[0, 1]) + (r[1, 0] - r[1, 1])) / 2)
