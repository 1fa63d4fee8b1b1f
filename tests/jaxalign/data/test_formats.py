"""Tests for jaxalign.data.formats: row validation, the fail/skip policies, JSONL and Parquet reading."""
from __future__ import annotations

import json
import os

import pytest

from jaxalign.data import formats
from jaxalign.data.formats import DataFormatError, RowError, load_records, validate_row

DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "data", "preferences"))
SAMPLES = {"pairwise": 4, "pairwise_chat": 2, "pairwise_two_column": 2, "ranked": 3, "stepwise": 3, "unpaired": 3,
           "trajectory": 3}


def sample(name: str) -> str:
    return os.path.join(DATA, f"{name}.jsonl")


def format_of(name: str) -> str:
    return "pairwise" if name.startswith("pairwise") else name


@pytest.mark.parametrize("name, rows", sorted(SAMPLES.items()))
def test_every_sample_file_validates_completely(name, rows):
    """Each hand-written sample file is valid: every row kept, with its 1-based line number."""
    records, report = load_records(sample(name), format_of(name))
    assert report.rows_read == report.rows_kept == rows == len(records)
    assert [r["line"] for r in records] == list(range(1, rows + 1))


def test_records_are_canonical():
    """Extra fields are dropped, numbers become floats, messages keep role and content only."""
    records, _ = load_records(sample("pairwise"), "pairwise")
    assert "source" not in records[3] and set(records[3]) == {"prompt", "chosen", "rejected", "line"}
    ranked, _ = load_records(sample("ranked"), "ranked")
    assert ranked[1]["scores"] == [1.0, 0.0] and all(isinstance(s, float) for s in ranked[1]["scores"])
    row = {"prompt": [{"role": "user", "content": "hi", "name": "x"}], "completion": "yo", "label": False}
    with pytest.raises(RowError):  # A chat prompt with a string completion is a mix.
        validate_row("unpaired", row)
    row["completion"] = [{"role": "assistant", "content": "yo"}]
    assert validate_row("unpaired", row)["prompt"] == [{"role": "user", "content": "hi"}]


def test_fail_policy_names_file_line_field_and_value():
    """The default policy stops at the first bad row with one message: file, line, field, offending value."""
    with pytest.raises(DataFormatError) as e:
        load_records(sample("pairwise_bad"), "pairwise")
    assert str(e.value).startswith("pairwise_bad.jsonl line 2: field 'chosen' must be a string or a list of "
                                   "{role, content} messages, got 42")


def test_skip_policy_counts_every_reason():
    """Under skip, each bad row is dropped and counted under its reason; blank lines are not rows."""
    records, report = load_records(sample("pairwise_bad"), "pairwise", on_error="skip")
    assert [r["line"] for r in records] == [1, 9]
    assert report.rows_read == 9 and report.rows_kept == 2
    assert report.to_json()["skipped_by_reason"] == {
        "chosen: bad message": 1, "chosen: wrong type": 2, "invalid JSON": 1, "mixed chat and text": 1,
        "not an object": 1, "rejected: missing": 1}
    assert report.to_json()["rows_skipped"] == 7
    assert report.first_errors[0].startswith("pairwise_bad.jsonl line 2: field 'chosen'")
    assert "line 5: invalid JSON" in report.first_errors[2]


@pytest.mark.parametrize("format, row, field, fragment", [
    ("ranked", {"prompt": "p", "completions": ["a", "b"], "scores": [1.0]}, "scores",
     "one score per completion (2), got 1"),
    ("ranked", {"prompt": "p", "completions": ["a"], "scores": [1.0]}, "completions", "at least 2"),
    ("ranked", {"prompt": "p", "completions": ["a", "b"], "scores": [1.0, float("nan")]}, "scores",
     "item 1 must be a finite number, got NaN"),
    ("ranked", {"prompt": "p", "completions": ["a", 3], "scores": [1.0, 0.0]}, "completions[1]", "got 3"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": 1}, "label", "a boolean (true or false), got 1"),
    ("trajectory", {"prompt": "p", "steps": [], "reward": 1.0}, "steps", "at least one step"),
    ("trajectory", {"prompt": "p", "steps": ["a"], "reward": "high"}, "reward", "a finite number, got \"high\""),
    ("trajectory", {"prompt": "p", "steps": ["a"], "reward": True}, "reward", "a finite number, got true"),
    ("stepwise", {"prompt": "p", "prefix": ["a", 2], "chosen": "b", "rejected": "c"}, "prefix",
     "item 1 must be a string, got 2"),
    ("stepwise", {"prompt": "p", "prefix": [], "chosen": ["b"], "rejected": "c"}, "chosen", "must be a string"),
    ("pairwise", {"prompt": "p", "chosen": [], "rejected": "c"}, "chosen", "empty message list"),
    ("pairwise", {"prompt": [{"content": "x"}], "chosen": "c", "rejected": "r"}, "prompt",
     "message 0 needs a non-empty string 'role', got null"),
])
def test_invalid_rows_name_their_field(format, row, field, fragment):
    """Every schema rule has a message naming the field and, where there is one, the offending value."""
    with pytest.raises(RowError) as e:
        validate_row(format, row)
    assert e.value.field == field
    assert fragment in e.value.message, e.value.message


def test_parquet_rows_read_like_jsonl_and_errors_name_the_row(tmp_path):
    """A Parquet file with the same rows gives the same records (struct lists read back as messages); a bad row
    is reported by its 1-based row number."""
    import pyarrow as pa  # a runtime dependency (Parquet input)
    import pyarrow.parquet as pq
    jsonl, _ = load_records(sample("pairwise_chat"), "pairwise")
    with open(sample("pairwise_chat")) as f:
        rows = [json.loads(line) for line in f]
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = load_records(path, "pairwise")
    assert records == jsonl and report.rows_kept == 2

    rows.append({"prompt": rows[0]["prompt"], "chosen": rows[0]["chosen"], "rejected": None})
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataFormatError, match=r"chat.parquet row 3: field 'rejected' is missing"):
        load_records(path, "pairwise")


def test_file_level_errors(tmp_path):
    """Unknown suffix, missing file, unknown format and unknown policy each fail with one clear message."""
    (tmp_path / "rows.csv").write_text("prompt,chosen\n")
    with pytest.raises(DataFormatError, match="unsupported file type '.csv'"):
        load_records(str(tmp_path / "rows.csv"), "pairwise")
    (tmp_path / "rows.json").write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}]')
    with pytest.raises(DataFormatError, match="a JSON array; expected JSON Lines"):
        load_records(str(tmp_path / "rows.json"), "pairwise")
    (tmp_path / "rows.json").write_text('[\n {"prompt": "p", "chosen": "a", "rejected": "b"}\n]\n')
    with pytest.raises(DataFormatError, match="a JSON array; expected JSON Lines"):
        load_records(str(tmp_path / "rows.json"), "pairwise")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "absent.jsonl"), "pairwise")
    with pytest.raises(ValueError, match="unknown data format 'pairs'"):
        load_records(sample("pairwise"), "pairs")
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_records(sample("pairwise"), "pairwise", on_error="ignore")
    assert formats.location("x.parquet", 3) == "row 3" and formats.location("x.jsonl", 3) == "line 3"
