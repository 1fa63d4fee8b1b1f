"""`jaxalign run pdppo_lot_sizing` end to end on the tiny instance, killed and resumed bit for bit; its statistics
against hand computations; bad overrides refused before any directory exists; the bench table."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agents.pdppo import bench
from agents.pdppo import experiment as X
from launch.cli import main
from rl.testing import assert_refused_in_one_line, checkpoint_arrays, run_differences, run_registered

# 3 updates of 2 envs x 100 periods per (arm, seed), one per chunk; one epoch; 4 evaluation episodes.
TINY = ["instance=tiny", "seeds=0,1", "learner.num_envs=2", "learner.total_timesteps=600", "learner.update_epochs=1",
        "num_chunks=3", "eval_episodes=4", "show_progress=false"]
FINAL, KILL_AT = 3, 2
TIMING = {"train_seconds", "wall_seconds", "env_steps_per_second"}


@pytest.mark.slow
def test_tiny_run_end_to_end_killed_and_resumed_bit_identically(tmp_path):
    cache, a, b = tmp_path / "xla_cache", tmp_path / "A", tmp_path / "B"
    done, saved = run_registered("pdppo_lot_sizing", a, TINY, cache, fast_compile=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert saved == [1, 2, 3]
    results = json.loads((a / "results.json").read_text())
    for arm in ("ppo", "pdppo"):
        per_seed = results[arm]["per_seed"]
        assert len(per_seed) == 2 and results[arm]["mean_cost"] == pytest.approx(np.mean(per_seed))
        half = 12.7062 * np.std(per_seed, ddof=1) / math.sqrt(2)  # t_{0.975, 1 df}
        assert results[arm]["ci95_high"] - results[arm]["mean_cost"] == pytest.approx(half, rel=1e-6)
        gaps = results["gap_to_optimum"][arm]["per_seed"]
        optimum = results["optimum"]["expected_cost"]
        assert gaps == pytest.approx([(c - optimum) / optimum for c in per_seed])
    # The optimum is a lower bound on every policy's expected cost; 4 episodes are noisy, so only loosely.
    assert results["optimum"]["expected_cost"] < results["heuristic"]["mean_cost"] + 10
    assert results["verdict"] in ("holds", "does not hold")
    assert results["ratio_ppo_over_pdppo"] == pytest.approx(results["ppo"]["mean_cost"] / results["pdppo"]["mean_cost"])
    assert results["env_steps"] == 600 * 2 * 2 and results["env_steps_per_run"] == 600
    assert "algorithm" not in results["learner"] and results["learner"]["update_epochs"] == 1
    assert (a / "learning_curves.png").stat().st_size > 0
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps_per_run"] for r in records] == [200, 400, 600]
    assert all(len(r["ppo_episode_cost"]) == 2 and len(r["pdppo_episode_cost"]) == 2 for r in records)
    # Not vacuous: the last chunk (run by the resumed process in B) moved the parameters.
    before, after = checkpoint_arrays(a, 2), checkpoint_arrays(a, FINAL)
    assert sum(before[k].tobytes() != after[k].tobytes() for k in after if before[k].dtype.kind == "f") > 4

    killed, saved = run_registered("pdppo_lot_sizing", b, TINY, cache, kill_after=KILL_AT, fast_compile=True)
    assert killed.returncode == -9, f"expected SIGKILL, got rc {killed.returncode}: {killed.stderr[-3000:]}"
    assert saved[-1] == KILL_AT and not (b / "results.json").exists()
    resumed, saved = run_registered("pdppo_lot_sizing", b, TINY, cache, fast_compile=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert saved == [3], f"the re-run trained chunks ending at {saved}, not just the missing one"
    failures = run_differences(a, b, FINAL, TIMING)
    assert not failures, "the resumed run differs from the uninterrupted one:\n- " + "\n- ".join(failures)


@pytest.mark.parametrize("override, message", [
    ("instance=30i99m", "instance='30i99m': expected one of 15i5m"),
    ("instance=missing.json", "missing.json: no such instance file"),
    ("seeds=0,x", "seeds='0,x': expected comma-separated non-negative integers"),
    ("seeds=3", "seeds='3': expected at least two distinct"),
    ("seeds=1,1", "seeds='1,1': expected at least two distinct"),
    ("learner.algorithm=ppo", "both arms (ppo, pdppo) run"),
    ("learner.num_steps=150", "must be a multiple of the instance's horizon (100)"),
    ("learner.surrogate=product", "learner.surrogate must be one of ('per_machine', 'joint'), got 'product'"),
])
def test_bad_overrides_are_one_error_line_before_any_directory(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    assert_refused_in_one_line(main, ["run", "pdppo_lot_sizing", "--workdir", str(workdir), override], workdir,
                               message, capsys)


def test_statistics_against_hand_computations():
    # Student-t 0.975 quantiles from standard tables (df 1, 4, 40, 120): the table and the expansion beyond it.
    for df, t in ((1, 12.7062), (4, 2.7764), (40, 2.0211), (120, 1.9799)):
        assert X.t975(df) == pytest.approx(t, abs=2e-4)
    out = X.over_seeds(np.array([10.0, 12.0, 14.0, 16.0, 18.0]))
    assert out["mean_cost"] == 14.0
    assert out["ci95_high"] - 14.0 == pytest.approx(2.7764 * math.sqrt(10.0) / math.sqrt(5))
    separate = {"ci95_low": 5.0, "ci95_high": 6.0}
    assert X.verdict({"ci95_low": 6.5, "ci95_high": 7.0}, separate) == "holds"
    assert X.verdict({"ci95_low": 5.9, "ci95_high": 7.0}, separate) == "does not hold"  # overlap
    assert X.verdict({"ci95_low": 1.0, "ci95_high": 2.0}, separate) == "does not hold"  # PPO cheaper


def _results(ppo, pdppo, gaps=None):
    def arm(values):
        return X.over_seeds(np.array(values))

    out = {"env_steps_per_run": 4000, "seeds": [0, 1, 2], "ppo": arm(ppo), "pdppo": arm(pdppo),
           "heuristic": {"mean_cost": 50.0, "ci95_low": 49.0, "ci95_high": 51.0}, "wall_seconds": 3.0,
           "paired_difference_ppo_minus_pdppo": {"mean": 1.0, "ci95_low": 0.5, "ci95_high": 1.5}}
    out["ratio_ppo_over_pdppo"] = out["ppo"]["mean_cost"] / out["pdppo"]["mean_cost"]
    out["verdict"] = X.verdict(out["ppo"], out["pdppo"])
    if gaps:
        out["gap_to_optimum"] = {"ppo": {"mean": gaps[0]}, "pdppo": {"mean": gaps[1]}}
    return out


def test_bench_table_rows_markdown_and_csv():
    rows = [bench.row_from_results("20i10m", _results([130, 131, 132], [100, 101, 102])),
            bench.row_from_results("tiny", _results([10, 11, 12], [10.5, 11, 11.5], gaps=(0.1, 0.05)))]
    assert rows[0]["verdict"] == "holds" and rows[1]["verdict"] == "does not hold"
    assert rows[0]["ratio_ppo_over_pdppo"] == pytest.approx(131 / 101)
    table = bench.markdown_table(rows).splitlines()
    assert len(table) == 4 and "| 20i10m | 4,000 | 3 | 131.0 [" in table[2] and "| holds |" in table[2]
    assert "+10.0% / +5.0%" in table[3] and "24 %" in table[2]
    lines = bench.csv_text(rows).splitlines()
    assert lines[0].split(",")[:4] == ["configuration", "budget", "seeds", "ppo_cost"] and len(lines) == 3


def test_bench_bad_arguments_are_one_error_line(tmp_path, capsys):
    for args in (["--instances", "15i6m"], ["--budget", "0"]):
        assert main(["bench", "pdppo", "--workdir", str(tmp_path / "b"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxalign: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "b").exists()
