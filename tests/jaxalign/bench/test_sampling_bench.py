"""`jaxalign bench sampling` end to end on --quick: it runs, every side emits the same greedy tokens (transformers'
`generate` on the exported weights included), and the table, CSV, markdown and plot hold what they claim; the rows
carry the keys `jaxalign bench all` reads, also when a baseline is skipped. No speed assertions: the figures depend
on the machine's load. The test set-up installs the bench extra (Makefile), so the transformers side always runs."""
from __future__ import annotations

import contextlib
import csv
import io
import math

import numpy as np
import pytest

from jaxalign.bench import sampling as bench

ROW_KEYS = ("transformers_tokens_per_second", "ratio_to_transformers", "same_tokens_transformers", "size", "batch",
            "prompt_len", "new_tokens", "kv_tokens_per_second")


def run_main(argv):
    """(rows, printed text) of one bench.main call."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = bench.main(argv)
    return rows, printed.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run shared by the tests below: (rows, printed text, output directory)."""
    out_dir = tmp_path_factory.mktemp("sampling_bench")
    rows, printed = run_main(["--quick", "--out", str(out_dir)])
    return rows, printed, out_dir


def test_quick_run_reports_equal_outputs_and_consistent_ratios(quick):
    """One tiny case; the row's tokens/s are batch x new / seconds, the speed-up is the ratio of the two times, and
    the KV-cache sampler's greedy tokens equalled the recompute loop's (main raises otherwise)."""
    (row,), printed, _ = quick
    assert set(ROW_KEYS) <= set(row)
    assert (row["size"], row["batch"], row["prompt_len"], row["new_tokens"]) == ("tiny", 4, 8, 16)
    assert row["outputs_equal"] is True
    for key in ("kv_seconds", "recompute_seconds", "kv_tokens_per_second", "recompute_tokens_per_second", "speedup"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["kv_tokens_per_second"] == pytest.approx(4 * 16 / row["kv_seconds"])
    assert row["recompute_tokens_per_second"] == pytest.approx(4 * 16 / row["recompute_seconds"])
    assert row["speedup"] == pytest.approx(row["recompute_seconds"] / row["kv_seconds"])
    assert row["pad_waste"] == pytest.approx(bench.pad_waste(8, 16, 16))
    assert "KV-cache tok/s" in printed and "recompute tok/s" in printed and "speed-up" in printed
    assert "recompute: per new token" in printed and "machine:" in printed


def test_quick_run_matches_transformers_generate_on_the_exported_weights(quick):
    """transformers' greedy generate on the same weights (exported with save_pretrained) emitted our tokens (main
    raises otherwise), and its tokens/s and ratio are consistent with its time."""
    (row,), printed, _ = quick
    assert row["same_tokens_transformers"] is True
    assert row["transformers_tokens_per_second"] == pytest.approx(4 * 16 / row["transformers_seconds"])
    assert row["ratio_to_transformers"] == pytest.approx(row["transformers_seconds"] / row["kv_seconds"])
    assert row["torch_threads"] in {1, bench.available_cores()}
    assert row["transformers_attention"] in printed
    assert "HF tok/s" in printed and "vs HF" in printed and "transformers 5" in printed


def test_quick_run_writes_csv_markdown_and_plot(quick):
    (row,), _, out_dir = quick
    with open(out_dir / "sampling.csv") as f:
        (record,) = list(csv.DictReader(f))
    assert float(record["speedup"]) == pytest.approx(row["speedup"]) and record["outputs_equal"] == "True"
    assert record["same_tokens_transformers"] == str(row["same_tokens_transformers"])
    assert "| tiny |" in (out_dir / "sampling.md").read_text()
    assert (out_dir / "sampling.png").stat().st_size > 0


def test_skipped_baselines_leave_their_fields_none():
    """--no-transformers --no-recompute times our sampler alone: the baselines' keys are still there, None, and
    print as n/a."""
    (row,), printed = run_main(["--quick", "--no-transformers", "--no-recompute"])
    assert set(ROW_KEYS) <= set(row)
    for key in ("transformers_tokens_per_second", "ratio_to_transformers", "same_tokens_transformers",
                "recompute_tokens_per_second", "speedup", "outputs_equal", "torch_threads"):
        assert row[key] is None, key
    assert row["kv_tokens_per_second"] > 0
    assert "n/a" in printed and "transformers: not run" in printed and "recompute: per new token" not in printed


def test_missing_bench_extra_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(bench, "transformers_missing", lambda: ["transformers"])
    (row,), printed = run_main(["--quick", "--no-recompute"])
    assert "NOTE: the transformers baseline needs the benchmark extra: pip install -e '.[bench]' (missing: " \
           "transformers)" in printed
    assert row["same_tokens_transformers"] is None and row["ratio_to_transformers"] is None


def test_a_transformers_token_mismatch_stops_the_run(monkeypatch):
    """The same-token check really reads transformers' output: one changed token fails the case, naming it."""
    real = bench.transformers_generate

    def off_by_one(*args):
        tokens = real(*args).copy()
        tokens[1, 2] += 1
        return tokens

    monkeypatch.setattr(bench, "transformers_generate", off_by_one)
    with pytest.raises(RuntimeError, match=r"tiny, 2 x \(4 \+ 4\): greedy tokens differ between the KV-cache sampler "
                                           r"and transformers' generate \(1 positions; first at row 1, step 2"):
        bench.run_case("tiny", 2, 4, 4, repeats=1, recompute=False, threads=1)


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


def test_defaults_include_the_issue_case_and_bad_arguments_fail_before_anything_runs():
    args = bench.parse_args([])
    assert "medium" in args.sizes and 96 in args.new_tokens and (args.batch, args.prompt_len) == (8, 32)
    assert args.threads is None and bench.parse_args(["--threads", "1"]).threads == 1
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        bench.parse_args(["--sizes", "tiny,huge"])
    for bad in (["--new-tokens", "8,x"], ["--new-tokens", "0"], ["--bucket", "0"], ["--batch", "0"],
                ["--threads", "0"], ["--threads", "many"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
