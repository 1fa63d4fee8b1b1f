"""`jaxalign bench iterative`: the bandit section end to end, and the summaries' arithmetic on hand-made rows."""
from __future__ import annotations

import csv

import pytest

from jaxalign.bench import iterative


def test_bandit_section_writes_tables_and_plot(tmp_path):
    iterative.main(["--workdir", str(tmp_path), "--seeds", "0,1", "--no-arith"])
    with open(tmp_path / "apo_bandit.csv") as f:
        rows = list(csv.DictReader(f))
    reach = {(r["method"], float(r["alpha"])): r["reach"] for r in rows}
    # Exact proximal steps: iterative DPO needs all 10 iterations, APO fewer, numerically as in closed form.
    assert reach[("closed_form", 0.0)] == "10/10"
    assert reach[("closed_form", 0.5)] == reach[("numerical", 0.5)] == "6/6"
    assert (tmp_path / "apo_bandit.png").stat().st_size > 0 and (tmp_path / "apo_bandit.md").exists()


def test_iterations_to_reach_skips_the_sft_entry():
    assert iterative.iterations_to_reach([0.9, 0.5, 0.8, 0.95], 0.8) == 2
    assert iterative.iterations_to_reach([0.9, 0.5], 0.8) is None


def _rows(name, seed, accuracies, reach):
    return [{"algorithm": name, "seed": seed, "iteration": i, "accuracy": a, "final_accuracy": max(accuracies[1:]),
             "iterations_to_online_final": reach, "dpo_steps_total": 8} for i, a in enumerate(accuracies)]


def test_arith_summary_means_and_reach_per_seed():
    rows = (_rows("online_dpo", 0, [0.1, 0.5, 0.9], 2) + _rows("online_dpo", 1, [0.1, 0.7, 0.7], 1)
            + _rows("offline_dpo", 0, [0.1, 0.6], "n/a") + _rows("offline_dpo", 1, [0.1, 0.8], "n/a"))
    summary = {s["algorithm"]: s for s in iterative.arith_summary(rows, ["offline_dpo", "online_dpo"])}
    assert summary["online_dpo"]["acc_1"] == "0.600 ± 0.100"
    assert summary["online_dpo"]["reach"] == "2/1"
    assert summary["offline_dpo"]["reach"] == "n/a" and summary["offline_dpo"]["acc_2"] == ""


def test_claim_summary_counts_seeds_where_the_claim_held():
    rows = [{"experiment": "x", "seed": s, "method": m, "accuracy": a, "claim": "c", "claim_holds": held}
            for s, held in ((0, True), (1, False)) for m, a in (("x", 0.5 + s / 10), ("base", 0.4))]
    summary = iterative.claim_summary(rows)
    assert [(r["method"], r["accuracy"], r["claim_held"]) for r in summary] == [
        ("x", "0.550 ± 0.050", "1/2"), ("base", "0.400 ± 0.000", "1/2")]


def test_unknown_names_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown algorithm 'sppo'"):
        iterative.main(["--workdir", str(tmp_path), "--algorithms", "online_dpo,sppo"])
    with pytest.raises(ValueError, match="unknown claim experiment"):
        iterative.claim_rows(str(tmp_path), ["nope"], [0])
    with pytest.raises(ValueError, match="unknown claim experiment"):
        iterative.main(["--workdir", str(tmp_path), "--claims", "oreo_arith,nope"])
