"""`jaxalign bench sampling` end to end on --quick: it runs, both decoders emit the same greedy tokens, and the
table, CSV, markdown and plot hold what they claim. No speed assertions: the figures depend on the machine's load."""
from __future__ import annotations

import contextlib
import csv
import io
import math

import numpy as np
import pytest

from jaxalign.bench import sampling as bench


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run shared by the tests below: (rows, printed text, output directory)."""
    out_dir = tmp_path_factory.mktemp("sampling_bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = bench.main(["--quick", "--out", str(out_dir)])
    return rows, printed.getvalue(), out_dir


def test_quick_run_reports_equal_outputs_and_consistent_ratios(quick):
    """One tiny case; the row's tokens/s are batch x new / seconds, the speed-up is the ratio of the two times, and
    the KV-cache sampler's greedy tokens equalled the recompute loop's (main raises otherwise)."""
    (row,), printed, _ = quick
    assert (row["size"], row["batch"], row["prompt_len"], row["new_tokens"]) == ("tiny", 4, 8, 16)
    assert row["outputs_equal"] is True
    for key in ("kv_seconds", "recompute_seconds", "kv_tokens_per_second", "recompute_tokens_per_second", "speedup"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["kv_tokens_per_second"] == pytest.approx(4 * 16 / row["kv_seconds"])
    assert row["recompute_tokens_per_second"] == pytest.approx(4 * 16 / row["recompute_seconds"])
    assert row["speedup"] == pytest.approx(row["recompute_seconds"] / row["kv_seconds"])
    assert row["pad_waste"] == pytest.approx(bench.pad_waste(8, 16, 16))
    assert "KV-cache tok/s" in printed and "recompute tok/s" in printed and "speed-up" in printed
    assert "baseline (recompute)" in printed and "machine:" in printed


def test_quick_run_writes_csv_markdown_and_plot(quick):
    (row,), _, out_dir = quick
    with open(out_dir / "sampling.csv") as f:
        (record,) = list(csv.DictReader(f))
    assert float(record["speedup"]) == pytest.approx(row["speedup"]) and record["outputs_equal"] == "True"
    assert "| tiny |" in (out_dir / "sampling.md").read_text()
    assert (out_dir / "sampling.png").stat().st_size > 0


def test_check_equal_names_the_first_difference():
    """The equality check the table relies on fails loudly, at the first differing (row, step)."""
    kv = np.array([[5, 6, 7], [1, 2, 3]])
    bench.check_equal(kv, kv.copy(), "case")
    other = kv.copy()
    other[1, 2], other[0, 2] = 9, 8
    with pytest.raises(RuntimeError, match=r"first at row 0, step 2: 7 vs 8"):
        bench.check_equal(kv, other, "case")
    with pytest.raises(RuntimeError, match="shape"):
        bench.check_equal(kv, kv[:, :2], "case")


def test_bucketed_widths_and_pad_waste():
    """The baseline's forward width is the prefix length rounded up to the bucket (capped at the buffer), and its
    waste is the extra columns over the true prefixes: none for bucket 1."""
    assert [bench.bucket_width(n, 16, 40) for n in (1, 16, 17, 32, 33, 39)] == [16, 16, 32, 32, 40, 40]
    assert bench.pad_waste(8, 16, 1) == 0
    lengths = range(8, 24)  # prefixes 8..23: widths 8 (8), 16 (9..16) and 24 (17..23)
    assert bench.pad_waste(8, 16, 8) == pytest.approx(
        sum(8 if n == 8 else 16 if n <= 16 else 24 for n in lengths) / sum(lengths) - 1)


def test_bad_arguments_fail_before_anything_runs():
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        bench.parse_args(["--sizes", "tiny,huge"])
    for bad in (["--new-tokens", "8,x"], ["--new-tokens", "0"], ["--bucket", "0"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
