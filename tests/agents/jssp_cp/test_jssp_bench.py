"""`jaxalign bench jssp` resumes: each instance's rows are saved as it finishes, a rerun of the same settings skips
them, and rows of other settings stay in the file but out of the table. (The bench with a trained policy runs in
test_jssp_experiment.py.)"""
from __future__ import annotations

import csv

import pytest

from agents.jssp_cp.bench import main as bench_main

RULES = {"spt", "lpt", "mwkr", "mor", "fifo"}


def _instance_rows(workdir):
    with open(workdir / "bench_jssp_instances.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_rerun_skips_the_instances_it_holds_and_other_settings_stay_out_of_the_table(tmp_path, capsys):
    out = tmp_path / "bench"
    common = ["--workdir", str(out), "--groups", "15x15"]
    rows = bench_main([*common, "--per-group", "1", "--time-limit", "0.2"])
    assert {r["method"] for r in rows} == RULES | {"cpsat_0.2s"} and all(r["instances"] == 1 for r in rows)
    first = _instance_rows(out)
    assert {r["instance"] for r in first} == {"ta01"} and len({r["settings"] for r in first}) == 1
    assert "ETA" in capsys.readouterr().out

    # Same settings, one more instance: ta01's rows come back unchanged (its measured seconds too), ta02 is run.
    rows = bench_main([*common, "--per-group", "2", "--time-limit", "0.2"])
    assert all(r["instances"] == 2 for r in rows)
    again = _instance_rows(out)
    assert again[:len(first)] == first and {r["instance"] for r in again[len(first):]} == {"ta02"}
    assert "resuming: 1 instances" in capsys.readouterr().err

    # Another time limit is other settings: ta01 runs again, the earlier rows stay, the table holds only the new ones.
    rows = bench_main([*common, "--per-group", "1", "--time-limit", "0.3"])
    assert {r["method"] for r in rows} == RULES | {"cpsat_0.3s"} and all(r["instances"] == 1 for r in rows)
    kept = _instance_rows(out)
    assert kept[:len(again)] == again and len({r["settings"] for r in kept}) == 2
    assert "cpsat_0.2s" not in (out / "bench_jssp.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--groups", " , "], "--groups to name at least one size group"),
    (["--groups", "15x16"], "unknown Taillard size group '15x16'"),
    (["--time-limit", "0"], "--time-limit > 0"),
])
def test_bad_options_are_refused_before_the_work_directory_is_made(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        bench_main(["--workdir", str(tmp_path / "bench"), *argv])
    assert not (tmp_path / "bench").exists()
