"""Where preference rows come from and how their columns map onto a format's fields.

A *source* is a local JSONL or Parquet file (`jaxalign.data.formats.read_rows`) or a directory written by Hugging
Face `datasets`' `save_to_disk`, read here without importing `datasets` (only pyarrow): a Dataset directory holds
state.json (its Arrow files, in order), dataset_info.json and data-*.arrow (Arrow IPC streams); a DatasetDict
directory holds dataset_dict.json (the split names) and one such directory per split. Rows of a directory are named
"row N", N the 1-based index within the split; the value of each column is the Arrow value as Python data (message
lists are lists of {role, content} dicts), which is what `datasets.load_from_disk` returns for its default features.

Options (`SourceOptions`; `jaxalign data prepare --split/--columns/--shape/...`, dpo_files' `data.*` keys):

===================  ===============================================================================================
split                which split of a DatasetDict directory to read (default "train"); a missing split is one
                     error listing the available ones. A single Dataset directory and a file have no splits.
columns              "field=column,field=column": each field the format (or shape) reads comes from that column
                     instead of the column of its own name, e.g. "prompt=question,chosen=good,rejected=bad".
                     Applied before validation; a column that is in no row is one error listing the columns.
shape                how rows hold the data: "native" (default: the format's own fields), "binarized" or "ratings".
min_score_gap        binarized, and ratings to pairwise: drop a pair whose score/rating gap is below this.
desirable_threshold  ratings to unpaired: label = rating >= this (required there).
===================  ===============================================================================================

Shapes:

- native: the rows already hold the format's fields (`jaxalign.data.formats`), including pairwise chosen/rejected
  as whole conversations without a prompt ("two-column" data).
- binarized (format pairwise): UltraFeedback-binarized-style rows: prompt (a string), chosen and rejected (whole
  conversations, or strings), score_chosen and score_rejected. When chosen and rejected are message lists, their
  shared leading messages become the prompt (the string prompt column repeats the user turn and is not used); when
  they share none, a string prompt becomes one user message. With min_score_gap, a row whose score_chosen -
  score_rejected is below it is dropped (both scores are then required).
- ratings (format pairwise or unpaired): one row per (prompt, completion, rating). For pairwise, the rows of each
  prompt give one pair, the best-rated completion (the first of equals) against the worst-rated; a prompt with one
  completion, all ratings tied, or a gap below min_score_gap gives none. For unpaired, each row is one example,
  desirable when rating >= desirable_threshold.

Everything left out is counted: malformed rows under `skipped` (or the run stops, on_error="fail"), valid rows a
shape leaves out under `dropped`, per reason and in source rows (`formats.ValidationReport`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Iterator

from jaxalign.data import formats
from jaxalign.data.formats import CONTENT, NUMBER, SCHEMAS, DataFormatError, RowError, ValidationReport

SHAPES = ("native", "binarized", "ratings")
DICT_FILE, STATE_FILE = "dataset_dict.json", "state.json"

# The fields each shape reads from a row (what `columns` may map), beyond a native format's own.
SHAPE_FIELDS = {"binarized": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
                "ratings": ("prompt", "completion", "rating")}
SHAPE_FORMATS = {"binarized": ("pairwise",), "ratings": ("pairwise", "unpaired")}

DROP_GAP = "score gap below min_score_gap"
DROP_ONE = "ratings: prompt with one completion"
DROP_TIED = "ratings: all tied"
DROP_MIDDLE = "ratings: neither best nor worst"


def parse_columns(spec: str) -> dict[str, str]:
    """{field: source column} from "field=column,field=column"; ValueError naming the bad item."""
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in str(spec).split(",")):
        if not item:
            continue
        field, sep, column = (x.strip() for x in item.partition("="))
        if not sep or not field or not column:
            raise ValueError(f"columns: {item!r} is not field=column (e.g. columns=prompt=question,chosen=good)")
        if field in mapping:
            raise ValueError(f"columns: field {field!r} is mapped twice")
        mapping[field] = column
    return mapping


def _finite(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How to read a source: the split, the column mapping and the shape (see the module docstring)."""

    split: str = "train"
    columns: str = ""
    shape: str = "native"
    min_score_gap: float | None = None
    desirable_threshold: float | None = None

    def fields(self, format: str) -> tuple[str, ...]:
        """The fields a row is read for: what `columns` may name."""
        return SHAPE_FIELDS.get(self.shape) or tuple(field for field, _, _ in SCHEMAS[format])

    def check(self, format: str) -> None:
        """ValueError (naming the option) for any option that is malformed or does not apply to `format`."""
        if format not in SCHEMAS:
            raise ValueError(f"unknown data format {format!r}; expected one of {formats.FORMATS}")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split must be a non-empty split name, got {self.split!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.shape in SHAPE_FORMATS and format not in SHAPE_FORMATS[self.shape]:
            raise ValueError(f"shape={self.shape} maps to the format(s) {SHAPE_FORMATS[self.shape]}, not {format}")
        unknown = sorted(set(parse_columns(self.columns)) - set(self.fields(format)))
        if unknown:
            raise ValueError(f"columns maps {unknown[0]!r}, which is not a field of {format} rows (shape "
                             f"{self.shape}); the fields are {', '.join(self.fields(format))}")
        _finite("min_score_gap", self.min_score_gap)
        _finite("desirable_threshold", self.desirable_threshold)
        pairs_by_score = self.shape == "binarized" or (self.shape == "ratings" and format == "pairwise")
        if self.min_score_gap is not None and not pairs_by_score:
            raise ValueError("min_score_gap applies to shape=binarized, or shape=ratings with format pairwise")
        if self.min_score_gap is not None and self.min_score_gap < 0:
            raise ValueError(f"min_score_gap must be >= 0, got {self.min_score_gap!r}")
        labels_by_rating = self.shape == "ratings" and format == "unpaired"
        if labels_by_rating != (self.desirable_threshold is not None):
            raise ValueError("desirable_threshold is required by, and applies only to, shape=ratings with format "
                             "unpaired (label = rating >= desirable_threshold)")

    def is_default(self) -> bool:
        return self == SourceOptions()

    def describe(self) -> dict:
        """The options as JSON, for the validation report and the build's identity."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# `datasets` save_to_disk directories


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def split_dir(path: str, split: str = "train") -> str:
    """The Dataset directory holding `split`: a DatasetDict's split subdirectory, or `path` itself for a Dataset
    (which has no splits: only the default "train" or its own recorded split name are accepted)."""
    if os.path.isfile(os.path.join(path, DICT_FILE)):
        splits = list(_read_json(os.path.join(path, DICT_FILE)).get("splits", []))
        if split not in splits:
            raise DataFormatError(f"{path}: no split {split!r} in this datasets DatasetDict directory; available "
                                  f"splits: {', '.join(splits) or 'none'}")
        return os.path.join(path, split)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        own = _read_json(os.path.join(path, STATE_FILE)).get("_split")
        if split not in ("train", own):
            raise DataFormatError(f"{path}: a single datasets Dataset directory (split {own!r}) has no split "
                                  f"{split!r}; leave split at its default")
        return path
    raise DataFormatError(f"{path}: a directory, but not one written by datasets' save_to_disk (no {DICT_FILE} or "
                          f"{STATE_FILE}); expected that, or a .jsonl or .parquet file")


def arrow_files(directory: str) -> list[str]:
    """The Dataset directory's Arrow files in row order, as its state.json lists them."""
    state = _read_json(os.path.join(directory, STATE_FILE))
    paths = [os.path.join(directory, entry["filename"]) for entry in state.get("_data_files", [])]
    for path in paths:
        if not os.path.isfile(path):
            raise DataFormatError(f"{directory}: {STATE_FILE} lists {os.path.basename(path)}, which is missing")
    return paths


def _ipc_reader(source):
    """A reader of one Arrow file: save_to_disk writes IPC streams; the IPC file format is read too."""
    import pyarrow as pa  # only directory users pay for the import

    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _arrow_table(path: str):
    """The file's rows as one Arrow table, memory-mapped (zero-copy) rather than read into memory."""
    import pyarrow as pa

    return _ipc_reader(pa.memory_map(path)).read_all()


def datasets_rows(path: str, split: str = "train") -> Iterator[tuple[str, dict]]:
    """("row N", row dict) of one split of a save_to_disk directory, N 1-based within the split.

    A dataset saved with `set_format(columns=...)` loads with those columns only, so only those are read."""
    directory = split_dir(path, split)
    state = _read_json(os.path.join(directory, STATE_FILE))
    keep = None if state.get("_output_all_columns") else state.get("_format_columns")
    number = 0
    for arrow in arrow_files(directory):
        for batch in _arrow_table(arrow).to_batches():
            if keep is not None:
                batch = batch.select(keep)
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row


def read_source(path: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """(where, row or RowError) of a file (`formats.read_rows`) or of one split of a save_to_disk directory."""
    if os.path.isdir(path):
        return datasets_rows(path, split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path} does not exist")
    if split != "train":
        raise ValueError(f"split={split!r} applies to a datasets directory; {path} is a file")
    return formats.read_rows(path)


def _digest_file(digest, path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def source_sha256(path: str, split: str = "train") -> str:
    """sha256 of the bytes a source's rows come from: the file, or the split's state.json and Arrow files (names
    and bytes, in order), so that changed data never reuses an old build."""
    digest = hashlib.sha256()
    if not os.path.isdir(path):
        _digest_file(digest, path)
        return digest.hexdigest()
    directory = split_dir(path, split)
    for file in [os.path.join(directory, STATE_FILE), *arrow_files(directory)]:
        digest.update(os.path.basename(file).encode() + b"\0")
        _digest_file(digest, file)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Column mapping


def check_columns(path: str, mapping: dict[str, str], rows: list[tuple[str, Any]]) -> None:
    """One error for a mapped column that is in no row, naming it and the columns there are."""
    if not mapping:
        return
    available: dict[str, None] = {}
    for _, row in rows:
        if isinstance(row, dict):
            available.update(dict.fromkeys(row))
    for field, column in mapping.items():
        if column not in available:
            raise DataFormatError(f"{path}: columns maps {field} to column {column!r}, which is not in the data; "
                                  f"available columns: {', '.join(available) or 'none'}")


def source_columns(path: str, split: str = "train") -> list[str]:
    """The column names of a source, read without building anything: a directory's Arrow schema (its format
    columns when it was saved with some), a Parquet schema, or every key of a JSONL file's object rows."""
    if os.path.isdir(path):
        directory = split_dir(path, split)
        state = _read_json(os.path.join(directory, STATE_FILE))
        if state.get("_format_columns") is not None and not state.get("_output_all_columns"):
            return list(state["_format_columns"])
        files = arrow_files(directory)
        return [] if not files else list(_arrow_table(files[0]).schema.names)
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return list(dict.fromkeys(key for _, row in formats.read_rows(path) if isinstance(row, dict) for key in row))


def check_source(path: str, options: SourceOptions) -> None:
    """The split exists and every mapped column is there: one error now, before a build writes anything."""
    mapping = parse_columns(options.columns)
    if os.path.isdir(path) or mapping:
        check_columns(path, mapping, [("", dict.fromkeys(source_columns(path, options.split)))])


def rename(row: Any, mapping: dict[str, str]) -> Any:
    """The row with each mapped field read from its source column (read from the original row, so that swapping
    two columns works); other columns as they were."""
    if not mapping or not isinstance(row, dict):
        return row
    out = dict(row)
    out.update({field: row.get(column) for field, column in mapping.items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class Dropped:
    """A valid row that a shape's policy leaves out, and why (counted, never an error)."""

    reason: str


def _line(where: str) -> int:
    return int(where.split()[1])


def _raise_if_error(row: Any) -> Any:
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(None, "not an object", f"a row must be a JSON object, got {formats.show(row)}")
    return row


def _required(row: dict, field: str, kind: str) -> Any:
    if row.get(field) is None:
        raise RowError(field, f"{field}: missing", f"field '{field}' is missing")
    return formats.check_value(field, kind, row[field])


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _turn(message: dict) -> tuple:
    return message.get("role"), message.get("content")


def shared_turns(chosen: list, rejected: list) -> int:
    """How many leading messages two conversations share, leaving each at least one message of its own."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and _turn(chosen[n]) == _turn(rejected[n]):
        n += 1
    return n


def binarized_record(row: Any, min_score_gap: float | None) -> dict | Dropped:
    """A pairwise record from an UltraFeedback-binarized-style row, or Dropped when its score gap is too small."""
    row = _raise_if_error(row)
    pair = {"prompt": row.get("prompt"), "chosen": row.get("chosen"), "rejected": row.get("rejected")}
    if _is_chat(pair["chosen"]) and _is_chat(pair["rejected"]):
        n = shared_turns(pair["chosen"], pair["rejected"])
        if n:
            pair = {"prompt": pair["chosen"][:n], "chosen": pair["chosen"][n:], "rejected": pair["rejected"][n:]}
        elif isinstance(pair["prompt"], str):
            pair["prompt"] = [{"role": "user", "content": pair["prompt"]}]
    record = formats.validate_row("pairwise", pair)
    if min_score_gap is not None:
        gap = _required(row, "score_chosen", NUMBER) - _required(row, "score_rejected", NUMBER)
        if gap < min_score_gap:
            return Dropped(DROP_GAP)
    return record


def rated_row(row: Any) -> dict:
    """A ratings-shape row checked: prompt and completion are contents, rating a finite number."""
    row = _raise_if_error(row)
    return {"prompt": _required(row, "prompt", CONTENT), "completion": _required(row, "completion", CONTENT),
            "rating": _required(row, "rating", NUMBER)}


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _row_by_row(rows, report, path, on_error, convert, *args) -> list[dict]:
    """`convert(row, *args)` on each row: a record is kept (with its line), a `Dropped` counted, a bad row skipped
    or fatal as `on_error` says."""
    records = []
    for where, row in rows:
        record = formats.keep_or_skip(report, path, where, on_error, convert, row, *args)
        if isinstance(record, Dropped):
            report.dropped[record.reason] += 1
        elif record is not None:
            record["line"] = _line(where)
            records.append(record)
    return records


def _native(rows, format, options, report, path, on_error) -> list[dict]:
    return _row_by_row(rows, report, path, on_error, lambda row: formats.validate_parsed(format, row))


def _binarized(rows, format, options, report, path, on_error) -> list[dict]:
    return _row_by_row(rows, report, path, on_error, binarized_record, options.min_score_gap)


def _ratings(rows, format, options, report, path, on_error) -> list[dict]:
    rated = []
    for where, row in rows:
        checked = formats.keep_or_skip(report, path, where, on_error, rated_row, row)
        if checked is not None:
            rated.append((where, checked))
    if format == "unpaired":
        return _ratings_unpaired(rated, options.desirable_threshold, report, path, on_error)
    groups: dict[str, list] = collections.defaultdict(list)
    for where, checked in rated:  # dicts keep insertion order: pairs come in order of each prompt's first row
        groups[_prompt_key(checked["prompt"])].append((where, checked))
    records = []
    for group in groups.values():
        record = _best_against_worst(group, options.min_score_gap, report, path, on_error)
        if record is not None:
            records.append(record)
    return records


def _ratings_unpaired(rated, threshold, report, path, on_error) -> list[dict]:
    records = []
    for where, checked in rated:
        row = {"prompt": checked["prompt"], "completion": checked["completion"],
               "label": checked["rating"] >= threshold}
        record = formats.keep_or_skip(report, path, where, on_error, formats.validate_row, "unpaired", row)
        if record is not None:
            record["line"] = _line(where)
            records.append(record)
    return records


def _best_against_worst(group, min_score_gap, report, path, on_error) -> dict | None:
    """The pair (best-rated, worst-rated) of one prompt's rows, or None with the rows counted as dropped."""
    ratings = [checked["rating"] for _, checked in group]
    best, worst = ratings.index(max(ratings)), ratings.index(min(ratings))
    reason = (DROP_ONE if len(group) == 1 else DROP_TIED if ratings[best] == ratings[worst]
              else DROP_GAP if min_score_gap is not None and ratings[best] - ratings[worst] < min_score_gap else None)
    if reason is not None:
        report.dropped[reason] += len(group)
        return None
    if len(group) > 2:
        report.dropped[DROP_MIDDLE] += len(group) - 2
    where, chosen = group[best]
    pair = {"prompt": chosen["prompt"], "chosen": chosen["completion"], "rejected": group[worst][1]["completion"]}
    record = formats.keep_or_skip(report, path, where, on_error, formats.validate_row, "pairwise", pair)
    if record is not None:
        record["line"] = _line(where)
    return record


_SHAPE_LOADERS = {"native": _native, "binarized": _binarized, "ratings": _ratings}


def load_records(path: str, format: str, on_error: str = "fail",
                 options: SourceOptions | None = None) -> tuple[list[dict], ValidationReport]:
    """Every valid record of the source (each with its `line`: line or 1-based row) and the report of what was
    skipped (malformed) or dropped (by the shape's policy). A plain file with default options reads exactly as
    `formats.load_records`."""
    options = SourceOptions() if options is None else options
    formats.check_on_error(on_error)
    options.check(format)
    if options.is_default() and not os.path.isdir(path):
        return formats.load_records(path, format, on_error)
    rows = list(read_source(path, options.split))
    mapping = parse_columns(options.columns)
    check_columns(path, mapping, rows)
    rows = [(where, rename(row, mapping)) for where, row in rows]
    report = ValidationReport(file=str(path), format=format, rows_read=len(rows), source=options.describe())
    records = _SHAPE_LOADERS[options.shape](rows, format, options, report, path, on_error)
    report.rows_kept = len(records)
    return records, report


__all__ = ["DROP_GAP", "DROP_MIDDLE", "DROP_ONE", "DROP_TIED", "SHAPES", "SHAPE_FIELDS", "Dropped", "SourceOptions",
           "arrow_files", "binarized_record", "check_columns", "check_source", "datasets_rows",
           "load_records", "parse_columns", "rated_row", "read_source", "rename", "shared_turns", "source_columns",
           "source_sha256", "split_dir"]
