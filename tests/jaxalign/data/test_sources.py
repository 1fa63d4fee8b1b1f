"""Tests for jaxalign.data.sources: `datasets` save_to_disk directories read without `datasets` (checked against
`datasets.load_from_disk` on fixtures the real library writes), column mapping, and the binarized and ratings
shapes with everything they leave out counted."""
from __future__ import annotations

import os
import subprocess
import sys

import datasets  # the bench extra, which `make test` installs: missing, these tests fail
import pytest

from jaxalign.data import builders, formats, sources
from jaxalign.data.formats import DataFormatError
from jaxalign.data.sources import SourceOptions, load_records


DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "data", "preferences"))
CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
     "chosen": [{"role": "assistant", "content": str(2 * i)}],
     "rejected": [{"role": "assistant", "content": str(2 * i + 1)}], "score": float(i), "note": None}
    for i in range(5)
]
QA_ROWS = [{"question": f"{i}+1=", "answer_good": str(i + 1), "answer_bad": str(i + 2)} for i in range(4)]


def sample(name: str) -> str:
    return os.path.join(DATA, name)


def save(rows: list[dict], path, num_shards: int = 1) -> str:
    datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=num_shards)
    return str(path)


def save_dict(splits: dict[str, list[dict]], path) -> str:
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return str(path)


def rows_of(path: str, split: str = "train") -> list[dict]:
    return [row for _, row in sources.read_source(path, split)]


def test_a_dataset_directory_reads_as_datasets_loads_it(tmp_path):
    """Two Arrow shards, message-list and null columns: exactly `load_from_disk`'s rows, in order, as "row N"."""
    path = save(CHAT_ROWS, tmp_path / "chat", num_shards=2)
    assert len(sources.arrow_files(path)) == 2
    assert rows_of(path) == list(datasets.load_from_disk(path))
    assert [where for where, _ in sources.read_source(path)] == [f"row {i}" for i in range(1, 6)]
    records, report = load_records(path, "pairwise")
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5] and records[0]["prompt"] == CHAT_ROWS[0]["prompt"]
    assert report.to_json()["source"]["split"] == "train" and report.rows_kept == 5


def test_a_dataset_saved_with_format_columns_reads_those_columns(tmp_path):
    """`set_format(columns=...)` is saved in state.json and `load_from_disk` returns only those columns: so do we."""
    ds = datasets.Dataset.from_list(CHAT_ROWS)
    ds.set_format(columns=["prompt", "chosen", "rejected"])
    ds.save_to_disk(str(tmp_path / "formatted"))
    path = str(tmp_path / "formatted")
    assert rows_of(path) == list(datasets.load_from_disk(path)) and set(rows_of(path)[0]) == {"prompt", "chosen",
                                                                                              "rejected"}
    assert sources.source_columns(path) == ["prompt", "chosen", "rejected"]


def test_a_dataset_dict_directory_reads_the_chosen_split(tmp_path):
    """The split option picks a DatasetDict's split; a missing one is one error listing the available ones."""
    path = save_dict({"train": CHAT_ROWS[:3], "test": CHAT_ROWS[3:]}, tmp_path / "dd")
    loaded = datasets.load_from_disk(path)
    assert rows_of(path) == list(loaded["train"]) and rows_of(path, "test") == list(loaded["test"])
    with pytest.raises(DataFormatError, match="no split 'validation' .* available splits: train, test"):
        load_records(path, "pairwise", options=SourceOptions(split="validation"))
    with pytest.raises(DataFormatError, match="has no split 'test'"):
        load_records(save(CHAT_ROWS, tmp_path / "single"), "pairwise", options=SourceOptions(split="test"))
    os.makedirs(tmp_path / "plain")
    with pytest.raises(DataFormatError, match="not one written by datasets' save_to_disk"):
        load_records(str(tmp_path / "plain"), "pairwise")
    with pytest.raises(ValueError, match="applies to a datasets directory"):
        load_records(sample("pairwise.jsonl"), "pairwise", options=SourceOptions(split="test"))


def test_a_bad_row_names_the_directory_and_its_row(tmp_path):
    rows = [dict(r) for r in QA_ROWS]
    rows[2]["answer_bad"] = rows[2]["answer_good"]
    path = save(rows, tmp_path / "qa", num_shards=2)
    options = SourceOptions(columns="prompt=question,chosen=answer_good,rejected=answer_bad")
    with pytest.raises(DataFormatError, match=r"^qa row 3: field 'rejected' equals 'chosen' .*\(directory .*qa\)$"):
        load_records(path, "pairwise", options=options)
    records, report = load_records(path, "pairwise", "skip", options)
    assert [r["line"] for r in records] == [1, 2, 4]
    assert report.to_json()["skipped_by_reason"] == {"rejected: identical to chosen": 1}
    assert report.first_errors[0].startswith("qa row 3:")


def test_columns_map_fields_before_validation(tmp_path):
    """field=column on a JSONL file and on Parquet; a swap reads from the original row; a column in no row is
    one error naming it and the columns there are."""
    options = SourceOptions(columns="prompt=question, chosen=answer_good ,rejected=answer_bad")
    records, report = load_records(sample("pairwise_columns.jsonl"), "pairwise", options=options)
    assert records[1] == {"prompt": "Question: what is 3+5?\nAnswer:", "chosen": " 8", "rejected": " 9, I think",
                          "line": 2}
    assert report.rows_read == report.rows_kept == 3 and report.to_json()["rows_dropped"] == 0
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(QA_ROWS), tmp_path / "qa.parquet")
    swapped, _ = load_records(str(tmp_path / "qa.parquet"), "pairwise", options=SourceOptions(
        columns="prompt=question,chosen=answer_bad,rejected=answer_good"))
    assert (swapped[0]["chosen"], swapped[0]["rejected"]) == ("2", "1")
    with pytest.raises(DataFormatError, match="column 'answer_best', which is not in the data; available columns: "
                                              "id, question, answer_good, answer_bad"):
        load_records(sample("pairwise_columns.jsonl"), "pairwise",
                     options=SourceOptions(columns="prompt=question,chosen=answer_best,rejected=answer_bad"))


@pytest.mark.parametrize("options, format, fragment", [
    (SourceOptions(columns="prompt"), "pairwise", "'prompt' is not field=column"),
    (SourceOptions(columns="prompt=a,prompt=b"), "pairwise", "mapped twice"),
    (SourceOptions(columns="answer=a"), "pairwise", "'answer', which is not a field of pairwise rows"),
    (SourceOptions(shape="sorted"), "pairwise", "shape must be one of"),
    (SourceOptions(shape="binarized"), "unpaired", "shape=binarized maps to the format"),
    (SourceOptions(shape="ratings"), "ranked", "shape=ratings maps to the format"),
    (SourceOptions(shape="ratings"), "unpaired", "desirable_threshold is required"),
    (SourceOptions(desirable_threshold=3.0), "unpaired", "desirable_threshold is required by, and applies only"),
    (SourceOptions(shape="ratings", min_score_gap=1.0, desirable_threshold=3.0), "unpaired",
     "min_score_gap applies to"),
    (SourceOptions(shape="binarized", min_score_gap=-1.0), "pairwise", "min_score_gap must be >= 0"),
    (SourceOptions(shape="binarized", min_score_gap=float("nan")), "pairwise", "must be a finite number"),
    (SourceOptions(split=""), "pairwise", "split must be"),
])
def test_bad_options_are_one_error_naming_the_option(options, format, fragment):
    with pytest.raises(ValueError, match=fragment):
        options.check(format)


def test_binarized_rows_split_the_shared_turns_into_the_prompt():
    """UltraFeedback-binarized style: the shared user turn becomes the prompt (the string prompt column is not
    used); min_score_gap drops a close pair and counts it."""
    path = sample("binarized.jsonl")
    with pytest.raises(DataFormatError, match="a row must use one form"):  # why the shape is needed
        load_records(path, "pairwise")
    records, report = load_records(path, "pairwise", options=SourceOptions(shape="binarized"))
    assert records[0] == {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                          "chosen": [{"role": "assistant", "content": "4"}],
                          "rejected": [{"role": "assistant", "content": "5"}], "line": 1}
    assert report.rows_kept == 3
    records, report = load_records(path, "pairwise", options=SourceOptions(shape="binarized", min_score_gap=1.0))
    assert [r["line"] for r in records] == [1, 3]
    assert report.to_json()["dropped_by_reason"] == {sources.DROP_GAP: 1} and report.rows_read == 3
    # Completions alone with a string prompt: the prompt becomes the user turn.
    row = {"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello"}],
           "rejected": [{"role": "assistant", "content": "Go away"}]}
    assert sources.binarized_record(row, None)["prompt"] == [{"role": "user", "content": "Hi?"}]
    with pytest.raises(formats.RowError, match="'score_rejected' is missing"):
        sources.binarized_record({**row, "score_chosen": 1.0}, 0.5)


def test_ratings_become_best_against_worst_pairs():
    """One pair per prompt; the prompt with one completion, the tied prompt and the middle completion are dropped
    and counted in rows, so kept pairs, drops and skips account for every row read."""
    path = sample("ratings.jsonl")
    records, report = load_records(path, "pairwise", options=SourceOptions(shape="ratings"))
    assert [(r["prompt"], r["chosen"], r["rejected"], r["line"]) for r in records] == [
        ("What is 2+2?", " 4", " 5", 1), ("What is 3+5?", " 8", " 9", 7)]
    assert report.to_json()["dropped_by_reason"] == {sources.DROP_TIED: 2, sources.DROP_ONE: 1,
                                                     sources.DROP_MIDDLE: 1}
    assert report.rows_read == 2 * len(records) + sum(report.dropped.values())
    gapped, report = load_records(path, "pairwise", options=SourceOptions(shape="ratings", min_score_gap=3.0))
    assert [r["line"] for r in gapped] == [1] and report.dropped[sources.DROP_GAP] == 2


def test_ratings_become_unpaired_labels_and_bad_ratings_are_rows_errors(tmp_path):
    path = sample("ratings.jsonl")
    records, _ = load_records(path, "unpaired", options=SourceOptions(shape="ratings", desirable_threshold=4))
    assert [r["label"] for r in records] == [True, False, False, True, True, True, True, False]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "rating": "good"}\n{"prompt": "a", "completion": "c"}\n')
    with pytest.raises(DataFormatError, match="bad.jsonl line 1: field 'rating' must be a finite number"):
        load_records(str(bad), "pairwise", options=SourceOptions(shape="ratings"))
    _, report = load_records(str(bad), "pairwise", "skip", SourceOptions(shape="ratings"))
    assert report.to_json()["skipped_by_reason"] == {"rating: missing": 1, "rating: wrong type": 1}


def test_a_plain_file_reads_and_builds_as_before():
    """Default options on a file: formats.load_records' records and report, and the same TFDS config name."""
    path = sample("pairwise.jsonl")
    assert load_records(path, "pairwise")[0] == formats.load_records(path, "pairwise")[0]
    assert "source" not in load_records(path, "pairwise")[1].to_json()
    assert builders.config_name(path, "fail") == f"pairwise-{builders.file_sha256(path)[:16]}-fail"
    assert builders.config_name(path, "fail", SourceOptions(columns="prompt=prompt")) != \
        builders.config_name(path, "fail")


def test_a_changed_directory_builds_anew_and_an_unchanged_one_is_reused(tmp_path):
    """The build's identity hashes state.json and the Arrow files: new data (or another split or mapping) gets a
    new TFDS config; the same data reuses the build; load_prepared returns the records the reader gives."""
    options = SourceOptions(columns="prompt=question,chosen=answer_good,rejected=answer_bad")
    path = save(QA_ROWS, tmp_path / "qa")
    first = builders.config_name(path, "fail", options)
    assert builders.config_name(path, "fail", options) == first
    built, report = builders.prepare("pairwise", path, str(tmp_path / "tfds"), options=options)
    assert os.path.basename(os.path.dirname(built)).startswith("qa-")
    assert report["source"]["columns"] == options.columns
    records, _ = builders.load_prepared("pairwise", path, str(tmp_path / "tfds"), options=options)
    assert records == load_records(path, "pairwise", options=options)[0]
    save([{**QA_ROWS[0], "answer_bad": "wrong"}, *QA_ROWS[1:]], tmp_path / "qa2")
    os.replace(tmp_path / "qa", tmp_path / "old")
    os.replace(tmp_path / "qa2", tmp_path / "qa")
    assert builders.config_name(path, "fail", options) != first
    records, _ = builders.load_prepared("pairwise", path, str(tmp_path / "tfds"), options=options)
    assert records[0]["rejected"] == "wrong"
    dd = save_dict({"train": QA_ROWS, "test": QA_ROWS[:2]}, tmp_path / "dd")
    assert builders.config_name(dd, "fail", options) != builders.config_name(
        dd, "fail", SourceOptions(split="test", columns=options.columns))


def test_datasets_is_not_imported_to_read_a_directory(tmp_path):
    path = save(QA_ROWS, tmp_path / "qa")
    code = ("import sys; from jaxalign.data import sources; "
            f"rows = list(sources.read_source({path!r})); assert len(rows) == 4; "
            "assert 'datasets' not in sys.modules, 'datasets was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
