"""`jaxalign run deceptive_paths` end to end on a tiny config, a killed run resuming bit for bit, and `jaxalign
deceptive-paths plan` on the tiny run's policy (a good map: exit 0 and a PNG; a malformed one: one error line, 2).

Run A goes through uninterrupted. Run B is the same command in a fresh directory, SIGKILLed right after its first
chunk's checkpoint (`rl.testing.run_registered` wraps the checkpoint save: a real kill at a deterministic point),
then re-run to completion: its final checkpoint, results.json (timings aside) and metrics.jsonl must equal A's. The
subprocesses share a persistent XLA compilation cache, so only A compiles.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from agents.deceptive_paths import baselines, evaluation, maps
from launch.cli import main
from rl.testing import assert_refused_in_one_line, checkpoint_arrays, run_differences, run_registered

# 3 updates of 32 envs x 16 steps in three chunks; one map per evaluation set; one throughput size.
TINY = ["ppo.num_envs=32", "ppo.num_steps=16", "ppo.total_timesteps=1536", "ppo.num_minibatches=2",
        "ppo.update_epochs=1", "ppo.hidden_size=8", "ppo.learning_rate=0.003", "num_chunks=3", "eval_maps=1",
        "throughput_sizes=8", "throughput_envs=4", "throughput_steps=4", "budget_fractions=0,0.5,0.75,1",
        "curriculum.step=0.5", "show_progress=false", "seed=3"]
FINAL, KILL_AT = 3, 1
TIMING = {"train_seconds", "wall_seconds", "throughput"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    done, _ = run_registered("deceptive_paths", root / "A", TINY, root / "xla_cache", fast_compile=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_run_writes_results_and_figures(finished_run):
    a = finished_run / "A"
    results = json.loads((a / "results.json").read_text())
    assert {p.name for p in a.iterdir()} >= {"results.json", "paths.png", "learning_curve.png", "metrics.jsonl",
                                             "config.json", "checkpoints", "policy"}
    assert set(results["tables"]) == {"train_8x8", "train_16x16", "test_8x8", "test_16x16", "unseen_24x24",
                                      "unseen_32x32"}
    for table in results["tables"].values():
        assert set(table) == {"policy", "honest", "pi_d4"} and table["honest"]["paths"] == 1
    # The baselines' rows are the first increment's functions on the same map and budget, recomputed here.
    grid = maps.load_map_set("unseen_32x32")[0]
    expected = evaluation.metrics.path_metrics(grid, baselines.pi_d4(grid), evaluation.budget(grid, 1.0))
    assert results["tables"]["unseen_32x32"]["pi_d4"]["deceptive_fraction"] == pytest.approx(
        expected.deceptive_fraction)
    assert [row["budget_fraction"] for row in results["tunability"]] == [0.0, 0.5, 0.75, 1.0]
    # At budget fraction 0 nothing but a shortest path fits: the honest path uses the whole budget.
    assert results["tunability"][0]["honest"]["length_over_budget"] == pytest.approx(1.0)
    assert set(results["adaptation"]["methods"]) == {"policy", "policy_without_move", "honest", "pi_d4"}
    assert results["throughput"]["8x8"]["steps_per_second"] > 0
    assert len((a / "metrics.jsonl").read_text().splitlines()) == FINAL


def test_curriculum_coefficient_is_the_running_goal_reach_rate(finished_run):
    """The bonus scale of each update (metrics.jsonl) against a plain-Python moving average of the goal-reach
    rates the run reported, and the final one against the checkpointed runner state."""
    a = finished_run / "A"
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    running, expected = 0.0, []
    for record in records:
        expected.append(running)
        if record["goal_reach_rate"] is not None:  # null when no episode finished in the rollout
            running = 0.5 * running + 0.5 * record["goal_reach_rate"]
    np.testing.assert_allclose([r["deceptiveness"] for r in records], expected, rtol=1e-5, atol=1e-7)
    assert float(checkpoint_arrays(a, FINAL)["['reach_rate']"]) == pytest.approx(running, rel=1e-5)
    assert running > 0


def test_killed_run_resumes_bit_identically(finished_run):
    a, b, cache = finished_run / "A", finished_run / "B", finished_run / "xla_cache"
    before, after = checkpoint_arrays(a, 2), checkpoint_arrays(a, FINAL)
    assert sum(before[k].tobytes() != after[k].tobytes() for k in after if before[k].dtype.kind == "f") > 4
    killed, saved = run_registered("deceptive_paths", b, TINY, cache, kill_after=KILL_AT, fast_compile=True)
    assert killed.returncode == -9, f"expected SIGKILL, got rc {killed.returncode}: {killed.stderr[-3000:]}"
    assert saved == [KILL_AT] and not (b / "results.json").exists()
    resumed, saved = run_registered("deceptive_paths", b, TINY, cache, fast_compile=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert saved == [2, 3]
    failures = run_differences(a, b, FINAL, TIMING)
    assert not failures, "the resumed run differs from the uninterrupted one:\n- " + "\n- ".join(failures)


def test_plan_on_a_map_file(finished_run, tmp_path, capsys):
    grid = maps.load_map_set("test_8x8")[0]
    map_file = tmp_path / "map.txt"
    maps.save_map(grid, map_file)
    out = tmp_path / "out"
    assert main(["deceptive-paths", "plan", str(map_file), "--checkpoint", str(finished_run / "A"),
                 "--out", str(out), "--budget-fraction", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert (out / "plan.png").stat().st_size > 0
    honest = baselines.honest_path(grid)
    assert f"honest  path ({len(honest) - 1} moves): " + " ".join(f"{r},{c}" for r, c in honest) in printed
    policy_line = next(line for line in printed.splitlines() if line.startswith("policy  path"))
    cells = [tuple(int(x) for x in cell.split(",")) for cell in policy_line.split(": ")[1].split()]
    evaluation.metrics.check_path(grid, cells)  # a real walk from S over free cells
    assert len(cells) - 1 <= evaluation.budget(grid, 0.5)


@pytest.mark.parametrize("text, where", [("S.G\n.#\n", "line 2, column 3"), ("S.G\n.X.\n", "line 2, column 2"),
                                         ("S#G\n##D\n", "line 1, column 3")])
def test_plan_refuses_a_bad_map_in_one_line(finished_run, tmp_path, capsys, text, where):
    map_file = tmp_path / "bad.txt"
    map_file.write_text(text)
    assert main(["deceptive-paths", "plan", str(map_file), "--checkpoint", str(finished_run / "A"),
                 "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxalign: error: ") and where in lines[0], captured.err
    assert str(map_file) in lines[0] and not (tmp_path / "out").exists()


def test_plan_without_a_trained_policy_is_one_error(tmp_path, capsys):
    map_file = tmp_path / "map.txt"
    maps.save_map(maps.load_map_set("test_8x8")[0], map_file)
    assert main(["deceptive-paths", "plan", str(map_file), "--checkpoint", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trained policy" in err[0]


def test_other_config_in_the_same_workdir_is_refused(finished_run, capsys):
    a = finished_run / "A"
    config_before = (a / "config.json").read_text()
    changed = [o if o != "ppo.hidden_size=8" else "ppo.hidden_size=16" for o in TINY]
    assert main(["run", "deceptive_paths", "--workdir", str(a), *changed]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err, err
    assert (a / "config.json").read_text() == config_before
    assert np.isfinite(json.loads((a / "results.json").read_text())["train_seconds"])


@pytest.mark.parametrize("override, message", [("bonus=sparkly", "bonus must be one of"),
                                               ("value_step_cost=-0.1", "value_step_cost must be >= 0, got -0.1")])
def test_bad_config_is_one_error_before_any_directory(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    assert_refused_in_one_line(main, ["run", "deceptive_paths", "--workdir", str(workdir), override], workdir, message,
                               capsys)
