"""What the benchmarks share: a column spec, the fixed-width table they print, and the CSV + markdown they write.

A column is (title, width, row key, format spec). Cells format with the spec; booleans print as yes/NO, strings as
they are, and None or a non-finite number as "n/a" (e.g. a baseline that was not run).
"""
from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import math
from typing import Sequence

from jaxalign import paths

Column = tuple[str, int, str, str]


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
