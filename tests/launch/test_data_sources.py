"""`jaxalign data prepare` and `jaxalign run dpo_files` on a Hugging Face `datasets` save_to_disk directory with
other column names (jaxalign.data.sources): the report, one-line errors for a bad option or a missing split before
anything is written, and a short DPO run end to end on the tiny random Llama of the dpo_files tests."""
from __future__ import annotations

import json
import math
import os
import sys

import datasets  # the bench extra, which `make test` installs: missing, these tests fail
import pytest

from launch.cli import main


REPO = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOKENIZER = os.path.join(REPO, "tests", "data", "tokenizer")
QA_ROWS = [{"question": f"Question: what is {a}+{b}?\nAnswer:", "answer_good": f" {a + b}",
            "answer_bad": f" {a + b + 1 + (a % 3)}, I think"} for a, b in zip(range(1, 17), range(5, 37, 2))]
COLUMNS = "prompt=question,chosen=answer_good,rejected=answer_bad"


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    """A DatasetDict directory (train: 16 rows, test: 4) with question/answer_good/answer_bad columns."""
    path = tmp_path_factory.mktemp("hub") / "qa"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(QA_ROWS),
                          "test": datasets.Dataset.from_list(QA_ROWS[:4])}).save_to_disk(str(path))
    return str(path)


def test_prepare_reads_a_datasets_directory_with_a_column_mapping(qa_dir, tmp_path, capsys):
    argv = ["data", "prepare", "pairwise", qa_dir, "--split", "test", "--columns", COLUMNS, "--output",
            str(tmp_path / "out"), "--tokenizer", TOKENIZER, "--max-length", "32", "--batch-size", "2"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["validation"]["rows_kept"] == 4 and report["examples"] == 4
    assert report["validation"]["source"]["split"] == "test"
    assert report["batching"]["batches_per_epoch"] == 2


@pytest.mark.parametrize("extra, fragment", [
    (["--split", "validation"], "no split 'validation' in this datasets DatasetDict directory; available splits: "
                                "train, test"),
    (["--columns", "prompt=query"], "columns maps prompt to column 'query', which is not in the data"),
    (["--min-score-gap", "1"], "--min-score-gap applies to shape=binarized"),
    (["--shape", "ratings"], "--desirable-threshold is required"),
])
def test_a_bad_option_is_one_line_before_anything_is_written(qa_dir, tmp_path, capsys, extra, fragment):
    fmt = "unpaired" if "ratings" in extra else "pairwise"
    out = tmp_path / "out"
    assert main(["data", "prepare", fmt, qa_dir, "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_dpo_files_trains_from_a_datasets_directory_with_a_column_mapping(qa_dir, tmp_path):
    """Two steps of DPO from the DatasetDict's train split through data.columns: the held-out loss starts at
    log 2 and results.json records the source options; a missing split or a bad data option is one error before
    the workdir exists."""
    sys.path.insert(0, os.path.join(REPO, "tests", "jaxalign", "experiments"))
    from dpo_files_support import tiny_hf_model

    from jaxalign.experiments import dpo_files
    from jaxalign.overrides import apply_overrides

    hf_dir = tiny_hf_model(tmp_path)
    overrides = [f"model.path={hf_dir}", f"data.path={qa_dir}", f"data.columns={COLUMNS}", "data.split=train",
                 "dpo.steps=2", "dpo.batch_size=4", "dpo.eval_every=2", "data.max_length=32", "dpo.beta=0.5",
                 "data.eval_fraction=0.25", "checkpoint.every_steps=2", "show_progress=false", "eval_batch_size=8"]
    results = dpo_files.run(apply_overrides(dpo_files.DPOFilesConfig(), overrides), str(tmp_path / "run"))
    assert results["eval_before"]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert results["rows_read"] == 16 and results["data"]["validation"]["source"]["columns"] == COLUMNS
    with pytest.raises(ValueError, match="no split 'validation'"):
        dpo_files.run(apply_overrides(dpo_files.DPOFilesConfig(), [*overrides, "data.split=validation"]),
                      str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="data.shape=binarized maps to the format"):
        apply_overrides(dpo_files.DPOFilesConfig(), [*overrides, "data.format=ranked", "data.shape=binarized"])
