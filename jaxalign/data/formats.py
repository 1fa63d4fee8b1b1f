"""Preference-data formats: their schemas, row validation, and reading rows from local JSONL or Parquet files.

Errors are part of the interface (docs/architecture.md, "Principles"): bad data gets one clear message naming the
file, the line (or Parquet row), the field and the offending value. A malformed row either stops the run
(`on_error="fail"`, the default) or is skipped and counted per reason (`on_error="skip"`); the counts
(`ValidationReport`) go into the run's results so that nothing is dropped silently.

Formats (field names as in the files; fields not listed are ignored):

=============  =====================================================================================================
pairwise       prompt (optional), chosen, rejected. Each is a string or a chat message list [{role, content}, ...].
               Without a prompt ("two-column" data), chosen and rejected are whole conversations/texts and the
               prompt is their shared token prefix (jaxalign.data.tokenize).
ranked         prompt, completions (>= 2 strings or message lists), scores (numbers, one per completion).
stepwise       prompt, prefix (list of earlier reasoning steps, may be empty), chosen (step), rejected (step).
unpaired       prompt, completion, label (true = desirable, false = undesirable; booleans only).
trajectory     prompt, steps (>= 1 step strings: the step boundaries), reward (the terminal reward; OREO).
=============  =====================================================================================================

A *content* is a string or a non-empty list of messages; within a row, prompt and completions are either all
strings or all message lists, because a chat template cannot render a mix. Step fields are always plain strings:
they continue the text (or the rendered chat prompt) directly. Messages keep only `role` and `content`.
Completions (chosen, rejected, completion, each of completions) must not be blank, and a pair's chosen and rejected
must differ. A line of a JSONL file that is not UTF-8 is a bad row too (reason "invalid UTF-8", with the byte
offset), so that `on_error="skip"` can skip it like any other.

Validated rows are plain dicts ("records") with the same field names plus `line` (1-based line or row number), the
canonical form that the TFDS builders store and the tokenizer reads.

Sources and column options (`jaxalign.data.sources`, which documents each in full): besides these files, rows can
come from a Hugging Face `datasets` save_to_disk directory (`split`: which split of a DatasetDict, default
"train"); `columns` ("field=column,...") reads a field from a column of another name; `shape` reads common public
layouts: "native" (the fields above), "binarized" (pairwise from chosen/rejected conversations with
score_chosen/score_rejected; `min_score_gap` drops close pairs) and "ratings" (rows of prompt, completion, rating:
best against worst per prompt for pairwise, with `min_score_gap`; rating >= `desirable_threshold` for unpaired).
Rows a shape leaves out are counted per reason in the report's `dropped`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Iterator

FORMATS = ("pairwise", "ranked", "stepwise", "unpaired", "trajectory")
ON_ERROR = ("fail", "skip")

# Field kinds: CONTENT (string or message list), CONTENTS (list of those), TEXT (string), TEXTS (list of strings),
# NUMBER (finite int/float), NUMBERS (list of those), BOOL.
CONTENT, CONTENTS, TEXT, TEXTS, NUMBER, NUMBERS, BOOL = "content", "contents", "text", "texts", "number", \
    "numbers", "bool"

# (field, kind, required) per format, in the order they are checked (and hence reported).
SCHEMAS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "pairwise": (("prompt", CONTENT, False), ("chosen", CONTENT, True), ("rejected", CONTENT, True)),
    "ranked": (("prompt", CONTENT, True), ("completions", CONTENTS, True), ("scores", NUMBERS, True)),
    "stepwise": (("prompt", CONTENT, True), ("prefix", TEXTS, True), ("chosen", TEXT, True),
                 ("rejected", TEXT, True)),
    "unpaired": (("prompt", CONTENT, True), ("completion", CONTENT, True), ("label", BOOL, True)),
    "trajectory": (("prompt", CONTENT, True), ("steps", TEXTS, True), ("reward", NUMBER, True)),
}

_EXPECTED = {
    CONTENT: "a string or a list of {role, content} messages",
    CONTENTS: "a list of strings or of {role, content} message lists",
    TEXT: "a string",
    TEXTS: "a list of strings",
    NUMBER: "a finite number",
    NUMBERS: "a list of finite numbers",
    BOOL: "a boolean (true or false)",
}


class DataFormatError(ValueError):
    """A row of a data file does not match its format; the message names file, line, field and value."""


@dataclasses.dataclass(frozen=True)
class RowError(Exception):
    """One problem with one row: `reason` is the short key it is counted under when rows are skipped."""

    field: str | None
    reason: str
    message: str


def _show(value: Any, limit: int = 80) -> str:
    """The offending value as it appears in the file (JSON), cut short so that one huge row stays readable."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wrong(field: str, kind: str, value: Any, why: str = "wrong type") -> RowError:
    return RowError(field, f"{field}: {why}", f"field '{field}' must be {_EXPECTED[kind]}, got {_show(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _messages(field: str, value: list) -> list[dict[str, str]]:
    """A validated message list; its first bad message is reported by index so it can be found in a long chat."""
    if not value:
        raise RowError(field, f"{field}: empty", f"field '{field}' must not be an empty message list")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(field, f"{field}: wrong type",
                           f"field '{field}' message {i} must be a {{role, content}} object, got {_show(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RowError(field, f"{field}: bad message",
                           f"field '{field}' message {i} needs a non-empty string 'role', got {_show(role)}")
        if not isinstance(content, str):
            raise RowError(field, f"{field}: bad message",
                           f"field '{field}' message {i} needs a string 'content', got {_show(content)}")
        out.append({"role": role, "content": content})
    return out


def _content(field: str, value: Any) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and (not value or isinstance(value[0], dict)):
        return _messages(field, value)
    raise _wrong(field, CONTENT, value)


def _check(field: str, kind: str, value: Any) -> Any:
    """The canonical value of one field of kind `kind`, or RowError."""
    if kind == CONTENT:
        return _content(field, value)
    if kind == CONTENTS:
        if not isinstance(value, list):
            raise _wrong(field, kind, value)
        return [_content(f"{field}[{i}]", v) for i, v in enumerate(value)]
    if kind == TEXT:
        if not isinstance(value, str):
            raise _wrong(field, kind, value)
        return value
    if kind == TEXTS:
        if not isinstance(value, list):
            raise _wrong(field, kind, value)
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise RowError(field, f"{field}: wrong type", f"field '{field}' item {i} must be a string, "
                                                              f"got {_show(v)}")
        return list(value)
    if kind == NUMBER:
        if not _is_number(value):
            raise _wrong(field, kind, value)
        return float(value)
    if kind == NUMBERS:
        if not isinstance(value, list):
            raise _wrong(field, kind, value)
        for i, v in enumerate(value):
            if not _is_number(v):
                raise RowError(field, f"{field}: wrong type", f"field '{field}' item {i} must be a finite number, "
                                                              f"got {_show(v)}")
        return [float(v) for v in value]
    if kind == BOOL:
        if not isinstance(value, bool):
            raise _wrong(field, kind, value)
        return value
    raise AssertionError(f"unknown field kind {kind!r}")


def show(value: Any) -> str:
    """A value as messages quote it (`_show`)."""
    return _show(value)


def check_value(field: str, kind: str, value: Any) -> Any:
    """The canonical value of one field of kind `kind` (CONTENT, TEXT, NUMBER, ...), or RowError naming `field`."""
    return _check(field, kind, value)


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _check_consistent(format: str, record: dict) -> None:
    """Cross-field rules: list lengths agree, lists are long enough, and a row does not mix strings and chats."""
    if format == "ranked":
        n, m = len(record["completions"]), len(record["scores"])
        if n < 2:
            raise RowError("completions", "completions: fewer than 2",
                           f"field 'completions' must hold at least 2 completions, got {n}")
        if n != m:
            raise RowError("scores", "scores: length mismatch",
                           f"field 'scores' must have one score per completion ({n}), got {m}")
    if format == "trajectory" and not record["steps"]:
        raise RowError("steps", "steps: empty", "field 'steps' must hold at least one step, got []")
    contents = [(name, record[name]) for name, kind, _ in SCHEMAS[format] if kind == CONTENT and name in record]
    if format == "ranked":
        contents += [(f"completions[{i}]", c) for i, c in enumerate(record["completions"])]
    kinds = {name: _is_chat(value) for name, value in contents}
    if len(set(kinds.values())) > 1:
        chats = [n for n, c in kinds.items() if c]
        texts = [n for n, c in kinds.items() if not c]
        raise RowError(texts[0], "mixed chat and text",
                       f"field '{texts[0]}' is a string but '{chats[0]}' is a message list; a row must use one form")


def _is_empty(content: Any) -> bool:
    """A completion with no text: a blank string, or messages whose contents are all blank."""
    if isinstance(content, str):
        return not content.strip()
    return all(not message["content"].strip() for message in content)


# The completion fields that must hold text, per format; a blank one would be trained on as an empty response.
_COMPLETIONS = {"pairwise": ("chosen", "rejected"), "stepwise": ("chosen", "rejected"), "unpaired": ("completion",)}


def _check_completions(format: str, record: dict) -> None:
    """No completion is blank, and a pair's two sides differ: an identical pair has a zero preference margin, so
    it carries no preference and only dilutes the batch."""
    for name in _COMPLETIONS.get(format, ()):
        if _is_empty(record[name]):
            raise RowError(name, f"{name}: empty", f"field '{name}' is empty, got {_show(record[name])}")
    if format == "ranked":
        for i, completion in enumerate(record["completions"]):
            if _is_empty(completion):
                raise RowError("completions", "completions: empty",
                               f"field 'completions' item {i} is empty, got {_show(completion)}")
    if format in ("pairwise", "stepwise") and record["chosen"] == record["rejected"]:
        raise RowError("rejected", "rejected: identical to chosen",
                       f"field 'rejected' equals 'chosen' ({_show(record['chosen'])}); the pair carries no preference")


def validate_row(format: str, row: Any) -> dict:
    """The canonical record of one parsed row (a dict), or RowError naming the first bad field."""
    if format not in SCHEMAS:
        raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
    if not isinstance(row, dict):
        raise RowError(None, "not an object", f"a row must be a JSON object, got {_show(row)}")
    record = {}
    for field, kind, required in SCHEMAS[format]:
        if field not in row or row[field] is None:
            if required:
                raise RowError(field, f"{field}: missing", f"field '{field}' is missing")
            continue
        record[field] = _check(field, kind, row[field])
    _check_consistent(format, record)
    _check_completions(format, record)
    return record


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def _bad_utf8(line: str, line_offset: int) -> RowError | None:
    """RowError for the first byte of `line` (read with errors="surrogateescape") that is not UTF-8, else None.

    surrogateescape maps each undecodable byte b to the lone surrogate U+DC00+b, which valid UTF-8 can never
    produce, so the first such character is the first bad byte; its file offset lets a hex editor find it."""
    try:
        line.encode("utf-8")  # the common case, in C: no surrogate, nothing to find
        return None
    except UnicodeEncodeError:
        pass
    for i, char in enumerate(line):
        if "\udc80" <= char <= "\udcff":
            column = len(line[:i].encode("utf-8", "surrogateescape"))
            return RowError(None, "invalid UTF-8",
                            f"invalid UTF-8 byte 0x{ord(char) - 0xDC00:02x} at byte offset {line_offset + column} of "
                            f"the file (byte {column + 1} of the line); the file must be UTF-8 text")
    return None


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or RowError) for every non-blank line; a bad line does not stop the others.

    Lines are split as text mode always split them (newline="" only keeps their endings, so that byte offsets
    stay exact); an undecodable byte is the RowError of its own line instead of a UnicodeDecodeError that
    names no line and ends the file."""
    offset = 0
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for number, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line.encode("utf-8", "surrogateescape"))
            if not line.strip():
                continue
            bad = _bad_utf8(line, start)
            if bad is not None:
                yield number, bad
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, RowError(None, "invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(row number, row dict), 1-based; list and struct columns read back as Python lists and dicts."""
    import pyarrow.parquet as pq  # Only Parquet users pay for the import.

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _is_json_array_file(path: str) -> bool:
    """Whether the file looks like one JSON array of rows: its first line opens an array that does not close on
    that line, or is a whole array of objects (a JSON Lines row is never a list of objects)."""
    with open(path, encoding="utf-8", errors="replace") as f:  # a bad byte is reported with its line later
        first = next((line.strip() for line in f if line.strip()), "")
    if not first.startswith("["):
        return False
    try:
        value = json.loads(first)
    except json.JSONDecodeError:
        return True
    return bool(value) and all(isinstance(v, dict) for v in value)


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """("line N" or "row N", parsed row or RowError) for each row of a .jsonl/.json (JSON Lines) or .parquet file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".jsonl", ".json"):
        if _is_json_array_file(path):  # every "line" would be reported as invalid: say what is wrong once
            raise DataFormatError(f"{path}: a JSON array; expected JSON Lines (one JSON object per line)")
        return ((f"line {n}", row) for n, row in _jsonl_rows(path))
    if suffix == ".parquet":
        return ((f"row {n}", row) for n, row in _parquet_rows(path))
    raise DataFormatError(f"{path}: unsupported file type {suffix!r}; expected .jsonl (JSON Lines) or .parquet")


@dataclasses.dataclass
class ValidationReport:
    """What happened to the rows of one source: kept, skipped per reason (malformed), dropped per reason (valid rows
    a shape's policy leaves out, `jaxalign.data.sources`), and the first few skip messages."""

    file: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_errors: list[str] = dataclasses.field(default_factory=list)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    source: dict = dataclasses.field(default_factory=dict)  # split, columns, shape options; empty for a plain file

    def skip(self, error: "RowError", where: str, keep_messages: int = 5) -> None:
        self.skipped[error.reason] += 1
        if len(self.first_errors) < keep_messages:
            self.first_errors.append(f"{os.path.basename(os.path.normpath(self.file))} {where}: {error.message}")

    def to_json(self) -> dict:
        """The JSON form written into a run's results (`rows_skipped` is the total over reasons). The source
        options and dropped rows appear only when a source option is in use, so a plain file's report is as
        before."""
        out = {"file": self.file, "format": self.format, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
               "rows_skipped": int(sum(self.skipped.values())), "skipped_by_reason": dict(sorted(
                   self.skipped.items())), "first_errors": list(self.first_errors)}
        if self.source:
            out.update(source=dict(self.source), rows_dropped=int(sum(self.dropped.values())),
                       dropped_by_reason=dict(sorted(self.dropped.items())))
        return out


def location(path: str, line: int) -> str:
    """How a row is named in messages: "line N" in a JSONL file, "row N" (1-based) in a Parquet file or a
    `datasets` directory (the row's index within its split, plus one)."""
    path = str(path)
    return f"{'row' if path.lower().endswith('.parquet') or os.path.isdir(path) else 'line'} {line}"


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def row_failure(path: str, where: str, error: RowError) -> DataFormatError:
    """The one error raised for a bad row under on_error='fail'."""
    kind = "directory" if os.path.isdir(path) else "file"
    return DataFormatError(f"{os.path.basename(os.path.normpath(path))} {where}: {error.message} ({kind} {path})")


def keep_or_skip(report: ValidationReport, path: str, where: str, on_error: str, check, *args) -> Any:
    """check(*args), or None after counting its RowError in `report` (on_error="skip"); under "fail" the RowError
    becomes the run's one DataFormatError naming the source and the row."""
    try:
        return check(*args)
    except RowError as e:
        if on_error == "fail":
            raise row_failure(path, where, e) from None
        report.skip(e, where)
        return None


def validate_parsed(format: str, row: Any) -> dict:
    """validate_row for a row as read: a RowError read in its place (bad JSON, bad UTF-8) is raised."""
    if isinstance(row, RowError):
        raise row
    return validate_row(format, row)


def load_records(path: str, format: str, on_error: str = "fail") -> tuple[list[dict], ValidationReport]:
    """Every valid record of the file `path` (with its `line`) and the report of what was skipped.

    on_error="fail" raises DataFormatError at the first bad row; "skip" drops it and counts it by reason. For a
    `datasets` directory, other column names and the rating shapes, see `jaxalign.data.sources.load_records`.
    """
    check_on_error(on_error)
    if format not in SCHEMAS:
        raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
    report = ValidationReport(file=str(path), format=format)
    records = []
    for where, row in read_rows(path):
        report.rows_read += 1
        record = keep_or_skip(report, path, where, on_error, validate_parsed, format, row)
        if record is not None:
            record["line"] = int(where.split()[1])  # "line N" / "row N": `location` turns it back into text
            records.append(record)
    report.rows_kept = len(records)
    return records, report


__all__ = ["CONTENT", "CONTENTS", "FORMATS", "NUMBER", "NUMBERS", "ON_ERROR", "SCHEMAS", "TEXT", "TEXTS", "BOOL",
           "DataFormatError", "RowError", "ValidationReport", "load_records", "read_rows", "row_failure",
           "validate_row", "check_on_error", "check_value", "keep_or_skip", "location", "show",
           "validate_parsed"]
