"""What the benchmarks share: a column spec, the fixed-width table they print, and the CSV + markdown they write.

A column is (title, width, row key, format spec). Cells format with the spec; booleans print as yes/NO, strings as
they are, and None or a non-finite number as "n/a" (e.g. a baseline that was not run).
"""
from __future__ import annotations

import csv
import importlib
import importlib.metadata
import importlib.util
import io
import math
import os
from typing import Sequence

from jaxalign import paths

Column = tuple[str, int, str, str]


def load_average() -> float:
    """The 1-minute load average (nan where the OS has none): benchmarks print it, since timings on a busy machine
    mean little."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one), what XLA sizes its pool to."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


HF_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


def import_offline(names, missing: str) -> list:
    """The modules `names` (a baseline's extra: torch, transformers, trl, ...), imported with Hugging Face's offline
    switches set first, so nothing is ever downloaded; a missing one is an ImportError starting with `missing`."""
    for var in HF_OFFLINE:
        os.environ[var] = "1"
    try:
        return [importlib.import_module(name) for name in names]
    except ImportError as exc:
        raise ImportError(f"{missing} ({exc})") from exc


def missing_packages(names) -> list[str]:
    """Those of `names` that cannot be imported (a baseline's extra that is not installed)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def package_version(name: str, missing: str = "?") -> str:
    """The installed distribution's version, or `missing`."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return missing


def cell(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def text_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Fixed-width text table, right-aligned, one line per row."""
    lines = ["  ".join(f"{title:>{width}}" for title, width, _, _ in columns),
             "  ".join("-" * width for _, width, _, _ in columns)]
    lines += ["  ".join(f"{cell(row, key, spec):>{width}}" for _, width, key, spec in columns) for row in rows]
    return "\n".join(lines)


def csv_text(rows: Sequence[dict]) -> str:
    """Every field of every row as CSV text, the first row's keys as the header (csv's own CRLF line ends)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def csv_stream(path: str) -> io.StringIO:
    """The CSV file `path` (any path `jaxalign.paths` takes) as a text stream with its line ends untranslated (as
    `open(path, newline="")`)."""
    return io.StringIO(paths.read_bytes(path).decode(), newline="")


def read_csv(path: str) -> list[dict]:
    """The rows of the CSV file `path` as dicts of strings; empty when there is no such file."""
    if not paths.exists(path):
        return []
    return list(csv.DictReader(csv_stream(path)))


def write_csv(rows: Sequence[dict], path: str) -> str:
    """Every field of every row (the first row's keys as the header) to `path` (any path `jaxalign.paths` takes)."""
    paths.makedirs(paths.dirname(path) or ".")
    paths.write_atomic(path, csv_text(rows))
    return path


def write_csv_and_markdown(rows: Sequence[dict], columns: Sequence[Column], title: str, header: Sequence[str],
                           out_dir: str, stem: str) -> tuple[str, str]:
    """OUT_DIR/STEM.csv (every field of every row) and OUT_DIR/STEM.md (title, header bullets, the table)."""
    csv_path = write_csv(rows, paths.join(out_dir, f"{stem}.csv"))
    md_path = paths.join(out_dir, f"{stem}.md")
    lines = [f"# {title}\n\n" + "".join(f"- {line}\n" for line in header) + "\n",
             "| " + " | ".join(t for t, *_ in columns) + " |\n",
             "|" + "|".join("---:" if i else "---" for i in range(len(columns))) + "|\n"]
    lines += ["| " + " | ".join(cell(row, key, spec) for _, _, key, spec in columns) + " |\n" for row in rows]
    paths.write_atomic(md_path, "".join(lines))
    return csv_path, md_path
