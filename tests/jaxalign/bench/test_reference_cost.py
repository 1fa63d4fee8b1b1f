"""`jaxalign bench reference-cost` runs end to end on a tiny workload and reports every variant and the ratio."""
from __future__ import annotations

import csv

from jaxalign.bench import reference_cost


def test_reference_cost_benchmark_times_every_variant_and_writes_its_table(tmp_path, capsys):
    rows = reference_cost.main(["--sizes", "tiny", "--batch-pairs", "2", "--prompt-len", "4", "--completion-len", "4",
                                "--steps", "1", "--warmup", "1", "--sync-every", "1", "--out", str(tmp_path)])
    (row,) = rows
    for variant in reference_cost.VARIANTS:
        assert row[f"{variant}_seconds_per_step"] > 0
    assert row["online_over_cached"] == row["online_seconds_per_step"] / row["cached_seconds_per_step"]
    assert "online/cached" in capsys.readouterr().out
    with open(tmp_path / "reference_cost.csv") as f:
        assert next(csv.DictReader(f))["size"] == "tiny"
    assert (tmp_path / "reference_cost.md").read_text().startswith("# DPO step cost by reference strategy")
