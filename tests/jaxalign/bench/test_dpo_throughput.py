"""`jaxalign bench dpo-throughput` end to end on the smoke config: outputs exist and hold positive finite numbers.

No speed assertions: the figures depend on the machine and its load.
"""
import importlib
import contextlib
import csv
import io
import math

import numpy as np
import pytest

from jaxalign.bench import dpo_throughput, flops


def _positive_finite(value) -> bool:
    return math.isfinite(float(value)) and float(value) > 0


@pytest.fixture(scope="module")
def smoke_no_trl(tmp_path_factory):
    """One smoke run without TRL, shared by the tests below: (rows, printed text, output directory)."""
    out_dir = tmp_path_factory.mktemp("dpo_throughput")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = dpo_throughput.main(["--smoke", "--no-trl", "--out", str(out_dir)])
    return rows, printed.getvalue(), out_dir


def test_smoke_without_trl_writes_table_csv_markdown_and_plot(smoke_no_trl):
    rows, out, tmp_path = smoke_no_trl
    assert "jaxalign tok/s" in out and "matmul ceiling" in out and "machine:" in out
    assert [r["size"] for r in rows] == ["tiny"]
    with open(tmp_path / "dpo_throughput.csv") as f:
        (record,) = list(csv.DictReader(f))
    for key in ("params", "tokens_per_step", "jax_seconds_per_step", "jax_tokens_per_second", "step_flops",
                "achieved_gflops", "matmul_peak_gflops", "peak_fraction"):
        assert _positive_finite(record[key]), (key, record[key])
    assert record["trl_tokens_per_second"] == "" and record["speedup"] == ""  # not run
    assert int(record["tokens_per_step"]) == 2 * 8 * (32 + 32)
    assert "| tiny |" in (tmp_path / "dpo_throughput.md").read_text()
    assert (tmp_path / "dpo_throughput.png").stat().st_size > 0


def test_table_flops_are_dpo_step_flops(smoke_no_trl):
    (row,), _, _ = smoke_no_trl
    cfg = dpo_throughput.model_for("tiny", 64)
    expected = flops.dpo_step_flops(cfg, batch_pairs=8, seq_len=64, with_reference=True)
    assert row["step_flops"] == expected == dpo_throughput.step_flops(cfg, 8, 64)
    assert row["achieved_gflops"] * 1e9 == pytest.approx(expected / row["jax_seconds_per_step"])
    assert row["peak_fraction"] == pytest.approx(row["achieved_gflops"] / row["matmul_peak_gflops"])
    assert row["jax_tokens_per_second"] == pytest.approx(2 * 8 * 64 / row["jax_seconds_per_step"])
    # other shapes go through the same function
    assert dpo_throughput.step_flops(cfg, 2, 12) == flops.dpo_step_flops(cfg, 2, 12)


def test_random_batch_has_no_padding():
    cfg = dpo_throughput.model_for("tiny", 9)
    batch = dpo_throughput.random_batch(cfg, batch_pairs=3, prompt_len=4, completion_len=5)
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_tokens"].shape == (3, 9)
        assert batch[f"{side}_attention_mask"].all()
        assert batch[f"{side}_completion_mask"].sum() == 3 * 5
        assert (batch[f"{side}_tokens"] >= dpo_throughput.FIRST_TOKEN).all()
    np.testing.assert_array_equal(batch["chosen_tokens"][:, :4], batch["rejected_tokens"][:, :4])


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="unknown size"):
        dpo_throughput.main(["--sizes", "huge", "--no-trl"])


def test_smoke_with_trl_reports_a_finite_ratio(tmp_path):
    importlib.import_module("trl")  # the test extra includes the bench extra: never skipped
    importlib.import_module("torch")  # the test extra includes the bench extra: never skipped
    # one torch thread: on a loaded small CPU, more threads can be many times slower (see trl_baseline)
    (row,) = dpo_throughput.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    assert _positive_finite(row["trl_tokens_per_second"])
    assert _positive_finite(row["speedup"])
    assert row["speedup"] == pytest.approx(row["jax_tokens_per_second"] / row["trl_tokens_per_second"])
    assert row["torch_threads"] == 1
    with open(tmp_path / "dpo_throughput.csv") as f:
        (record,) = list(csv.DictReader(f))
    assert _positive_finite(record["speedup"])
