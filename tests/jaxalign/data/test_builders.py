"""Tests for jaxalign.data.builders: TFDS array_record datasets from local files, built without TensorFlow."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from jaxalign.data import builders, formats
from jaxalign.data.formats import DataFormatError

DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "data", "preferences"))
SAMPLES = ["pairwise", "pairwise_chat", "pairwise_two_column", "ranked", "stepwise", "unpaired", "trajectory"]


def sample(name: str) -> str:
    return os.path.join(DATA, f"{name}.jsonl")


@pytest.mark.parametrize("name", SAMPLES)
def test_records_round_trip_through_array_record(name, tmp_path):
    """What the builder stores and the data source reads back is exactly the validated records, in file order."""
    format = "pairwise" if name.startswith("pairwise") else name
    expected, report = formats.load_records(sample(name), format)
    records, stored_report = builders.load_prepared(format, sample(name), str(tmp_path))
    assert records == expected
    assert stored_report == report.to_json()
    # The fast protobuf decoder load_prepared uses agrees with TFDS's own decoding, row by row.
    source = builders.builder(format, sample(name), str(tmp_path)).as_data_source(split="train")
    assert source.data_source is not None  # so load_prepared took the fast path above
    assert [builders.decode_example(format, source[i]) for i in range(len(source))] == expected
    files = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert any(".array_record-" in f for f in files), files


def test_tensorflow_is_not_needed():
    """The builds above run in an environment without TensorFlow (tensorflow-datasets is installed without it)."""
    assert importlib.util.find_spec("tensorflow") is None


def test_skip_report_is_stored_and_a_built_dataset_is_reused(tmp_path):
    """Skipped rows are counted in the dataset's metadata; a second builder on the same file reads that build back
    instead of rebuilding it (the array_record file is untouched)."""
    path, report = builders.prepare("pairwise", sample("pairwise_bad"), str(tmp_path), on_error="skip")
    assert report["rows_kept"] == 2 and report["rows_skipped"] == 7
    assert report["skipped_by_reason"]["chosen: wrong type"] == 2
    shard = next(os.path.join(path, f) for f in os.listdir(path) if ".array_record-" in f)
    mtime = os.stat(shard).st_mtime_ns
    records, again = builders.load_prepared("pairwise", sample("pairwise_bad"), str(tmp_path), on_error="skip")
    assert again == report and [r["line"] for r in records] == [1, 9]
    assert os.stat(shard).st_mtime_ns == mtime


def test_fail_policy_stops_the_build_with_the_line(tmp_path):
    with pytest.raises(DataFormatError, match="pairwise_bad.jsonl line 2: field 'chosen'"):
        builders.prepare("pairwise", sample("pairwise_bad"), str(tmp_path))


def test_an_edited_file_is_never_served_from_the_old_build(tmp_path):
    """The builder's config name carries the file's hash and the policy: an edit means a new dataset."""
    path = str(tmp_path / "pairs.jsonl")
    shutil.copy(sample("pairwise"), path)
    first, _ = builders.load_prepared("pairwise", path, str(tmp_path / "built"))
    with open(path, "a") as f:
        f.write('{"prompt": "Question: 1+1?\\nAnswer:", "chosen": " 2", "rejected": " 3"}\n')
    second, _ = builders.load_prepared("pairwise", path, str(tmp_path / "built"))
    assert len(first) == 4 and len(second) == 5 and second[4]["chosen"] == " 2"
    assert builders.config_name(path, "fail") != builders.config_name(path, "skip")


def test_a_file_without_valid_rows_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"prompt": "p"}\n')
    with pytest.raises(DataFormatError, match="no valid pairwise rows"):
        builders.prepare("pairwise", str(path), str(tmp_path / "built"), on_error="skip")


def test_cli_prepare_prints_the_report(tmp_path, capsys):
    """`jaxalign data prepare` builds the dataset and prints only the JSON report on stdout; bad data under the
    default policy is one error line and exit status 2."""
    import json

    from launch.cli import main

    tokenizer = os.path.normpath(os.path.join(DATA, "..", "tokenizer"))
    argv = ["data", "prepare", "pairwise", "--input", sample("pairwise_bad"), "--output", str(tmp_path),
            "--on-error", "skip", "--tokenizer", tokenizer, "--max-length", "32", "--batch-size", "2"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["validation"]["rows_skipped"] == 7 and report["examples"] == 2
    assert report["batching"]["batches_per_epoch"] == 1
    assert main(argv[:7]) == 2
    assert "pairwise_bad.jsonl line 2: field 'chosen'" in capsys.readouterr().err
