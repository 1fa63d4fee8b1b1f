"""Bad input data through `jaxalign data prepare` (and the dpo_files loader): each case exits 2 with one short stderr
line naming the file, the line and the offending field or byte, or, with --on-error skip, is skipped and counted
under its own reason; the user's file is never changed.

The CLI runs in-process through `launch.cli.main` (what the console script calls) so that each case takes about a
second; one case runs the real console script to pin what a user sees.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fault_checks import ROOT, assert_one_error, tree_digest
from launch.cli import main


GOOD = {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}




def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def row(**fields) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


def prepare(capsys, data: Path, out: Path, *extra: str, format: str = "pairwise") -> tuple[int, str, str]:
    rc = main(["data", "prepare", format, "--input", str(data), "--output", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err




@pytest.fixture
def user(tmp_path) -> Path:
    return tmp_path / "user"


def test_non_utf8_byte_names_file_line_and_offset(capsys, user, tmp_path):
    lines = [row(), b'{"prompt": "q", "chosen": "caf\xe9", "rejected": "x"}', row(chosen=" 3")]
    data = write_lines(user / "pairs.jsonl", lines)
    before = tree_digest(user)
    rc, _, err = prepare(capsys, data, tmp_path / "tfds")
    offset = len(lines[0]) + 1 + lines[1].index(b"\xe9")
    assert rc == 2
    assert_one_error(err, "pairs.jsonl line 2", "invalid UTF-8 byte 0xe9", f"byte offset {offset}", str(data))
    assert tree_digest(user) == before


def test_non_utf8_byte_is_skipped_and_counted(capsys, user, tmp_path):
    data = write_lines(user / "pairs.jsonl", [row(), b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}',
                                              row(chosen=" 3")])
    before = tree_digest(user)
    rc, out, err = prepare(capsys, data, tmp_path / "tfds", "--on-error", "skip")
    report = json.loads(out)["validation"]
    assert rc == 0, err
    assert (report["rows_kept"], report["skipped_by_reason"]) == (2, {"invalid UTF-8": 1})
    assert tree_digest(user) == before


@pytest.mark.parametrize("format, bad, field, reason", [
    ("pairwise", row(chosen=""), "chosen", "chosen: empty"),
    ("pairwise", row(rejected="   "), "rejected", "rejected: empty"),
    ("pairwise", row(chosen=[{"role": "assistant", "content": ""}], rejected=[{"role": "assistant", "content": "x"}],
                     prompt=[{"role": "user", "content": "q"}]), "chosen", "chosen: empty"),
    ("stepwise", json.dumps({"prompt": "q", "prefix": [], "chosen": "", "rejected": "b"}).encode(), "chosen",
     "chosen: empty"),
    ("unpaired", json.dumps({"prompt": "q", "completion": "", "label": True}).encode(), "completion",
     "completion: empty"),
    ("ranked", json.dumps({"prompt": "q", "completions": ["a", ""], "scores": [1, 0]}).encode(), "completions",
     "completions: empty"),
])
def test_empty_completion_is_a_row_error(capsys, user, tmp_path, format, bad, field, reason):
    good = {"pairwise": row(), "stepwise": json.dumps({"prompt": "q", "prefix": [], "chosen": "a", "rejected": "b"}),
            "unpaired": json.dumps({"prompt": "q", "completion": "a", "label": True}),
            "ranked": json.dumps({"prompt": "q", "completions": ["a", "b"], "scores": [1, 0]})}[format]
    good = good if isinstance(good, bytes) else good.encode()
    data = write_lines(user / f"{format}.jsonl", [good, bad])
    before = tree_digest(user)
    rc, _, err = prepare(capsys, data, tmp_path / "tfds", format=format)
    assert rc == 2
    assert_one_error(err, f"{format}.jsonl line 2", f"field '{field}'", "empty")
    rc, out, err = prepare(capsys, data, tmp_path / "tfds", "--on-error", "skip", format=format)
    assert rc == 0, err
    assert json.loads(out)["validation"]["skipped_by_reason"] == {reason: 1}
    assert tree_digest(user) == before


@pytest.mark.parametrize("format, bad", [
    ("pairwise", row(chosen=" 4", rejected=" 4")),
    ("pairwise", json.dumps({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 4"}).encode()),  # two-column
    ("stepwise", json.dumps({"prompt": "q", "prefix": ["s1"], "chosen": "s2", "rejected": "s2"}).encode()),
])
def test_identical_pair_is_a_row_error(capsys, user, tmp_path, format, bad):
    good = row() if format == "pairwise" else json.dumps(
        {"prompt": "q", "prefix": [], "chosen": "a", "rejected": "b"}).encode()
    data = write_lines(user / f"{format}.jsonl", [good, bad])
    before = tree_digest(user)
    rc, _, err = prepare(capsys, data, tmp_path / "tfds", format=format)
    assert rc == 2
    assert_one_error(err, f"{format}.jsonl line 2", "field 'rejected' equals 'chosen'")
    rc, out, err = prepare(capsys, data, tmp_path / "tfds", "--on-error", "skip", format=format)
    assert rc == 0, err
    assert json.loads(out)["validation"]["skipped_by_reason"] == {"rejected: identical to chosen": 1}
    assert tree_digest(user) == before


def test_dpo_files_loader_goes_through_the_same_checks(user, tmp_path):
    """The dpo_files experiment reads its file with `builders.load_prepared`, which validates like `data prepare`."""
    from jaxalign.data import builders
    from jaxalign.data.formats import DataFormatError

    data = write_lines(user / "pairs.jsonl", [row(), b'{"prompt": "q", "chosen": "\xc3", "rejected": "b"}'])
    with pytest.raises(DataFormatError, match=r"pairs.jsonl line 2: invalid UTF-8 byte 0xc3"):
        builders.load_prepared("pairwise", str(data), str(tmp_path / "tfds"))
    records, report = builders.load_prepared("pairwise", str(data), str(tmp_path / "tfds"), on_error="skip")
    assert len(records) == 1 and report["skipped_by_reason"] == {"invalid UTF-8": 1}


def test_console_script_reports_a_bad_byte_in_one_line(user, tmp_path):
    data = write_lines(user / "pairs.jsonl", [row(), b'{"prompt": "q\x80", "chosen": "a", "rejected": "b"}'])
    before = tree_digest(user)
    script = Path(sys.executable).with_name("jaxalign")
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(entry + ["data", "prepare", "pairwise", "--input", str(data), "--output",
                                   str(tmp_path / "tfds")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2
    assert_one_error(proc.stderr, "pairs.jsonl line 2", "invalid UTF-8 byte 0x80")
    assert tree_digest(user) == before
