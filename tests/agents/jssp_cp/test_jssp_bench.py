"""`jaxalign bench jssp` resumes: each instance's rows are saved as it finishes, a rerun of the same settings skips
them per family of methods (rules, agent, CP-SAT at the limit), and rows of other settings stay in the file but out
of the table. (The bench with a trained policy runs in test_jssp_experiment.py.)"""
from __future__ import annotations

import csv

import jax
import pytest

from agents.jssp_cp.bench import main as bench_main
from agents.jssp_cp.inference import save_policy
from agents.jssp_cp.network import JobShopPolicy, NetworkConfig, init_params

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
    assert {r["instance"] for r in first} == {"ta01"} and len({r["settings"] for r in first}) == 2  # rules, CP-SAT
    assert "ETA" in capsys.readouterr().out

    # Same settings, one more instance: ta01's rows come back unchanged (its measured seconds too), ta02 is run.
    rows = bench_main([*common, "--per-group", "2", "--time-limit", "0.2"])
    assert all(r["instances"] == 2 for r in rows)
    again = _instance_rows(out)
    assert again[:len(first)] == first and {r["instance"] for r in again[len(first):]} == {"ta02"}
    assert "resuming: 2 (instance, method family) results" in capsys.readouterr().err

    # Another time limit is other settings for CP-SAT only: ta01's CP-SAT runs again, its rules are reused, the
    # earlier rows stay, the table holds the new CP-SAT rows.
    rows = bench_main([*common, "--per-group", "1", "--time-limit", "0.3"])
    assert {r["method"] for r in rows} == RULES | {"cpsat_0.3s"} and all(r["instances"] == 1 for r in rows)
    kept = _instance_rows(out)
    assert kept[:len(again)] == again and [r["method"] for r in kept[len(again):]] == ["cpsat_0.3s"]
    assert "cpsat_0.2s" not in (out / "bench_jssp.md").read_text()


def test_a_new_policy_reruns_only_the_agents_family(tmp_path):
    out = tmp_path / "bench"
    for seed in (0, 1):
        network = NetworkConfig(dim=8, heads=1, job_layers=1)
        (tmp_path / f"policy{seed}").mkdir()
        save_policy(tmp_path / f"policy{seed}", init_params(jax.random.key(seed), JobShopPolicy(network)), network)
    common = ["--workdir", str(out), "--groups", "15x15", "--per-group", "1", "--time-limit", "0.2", "--samples", "2"]
    rows = bench_main([*common, "--checkpoint", str(tmp_path / "policy0")])
    agent = {"agent_greedy", "agent_sampled", "cpsat_agent_time"}
    assert {r["method"] for r in rows} == RULES | agent | {"cpsat_0.2s"}
    first = _instance_rows(out)
    rows = bench_main([*common, "--checkpoint", str(tmp_path / "policy1")])
    assert {r["method"] for r in rows} == RULES | agent | {"cpsat_0.2s"}
    kept = _instance_rows(out)
    assert kept[:len(first)] == first and {r["method"] for r in kept[len(first):]} == agent
    # A time budget for the agent's rounds is another agent setting: again only the agent's family runs.
    rows = bench_main([*common, "--checkpoint", str(tmp_path / "policy1"), "--agent-time", "0.05"])
    assert {r["method"] for r in rows} == RULES | agent | {"cpsat_0.2s"}
    assert {r["method"] for r in _instance_rows(out)[len(kept):]} == agent


@pytest.mark.parametrize("argv, message", [
    (["--groups", " , "], "--groups to name at least one size group"),
    (["--groups", "15x16"], "unknown Taillard size group '15x16'"),
    (["--time-limit", "0"], "--time-limit > 0"),
    (["--agent-time", "-1"], "--agent-time > 0"),
])
def test_bad_options_are_refused_before_the_work_directory_is_made(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        bench_main(["--workdir", str(tmp_path / "bench"), *argv])
    assert not (tmp_path / "bench").exists()
