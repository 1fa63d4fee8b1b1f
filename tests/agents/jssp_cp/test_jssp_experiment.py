"""`jaxalign run jssp_cp` end to end with kill-and-resume equality; `jaxalign jssp solve` and `bench jssp`.

Run A goes through uninterrupted; run B is the same command in a fresh directory, SIGKILLed right after its first
PPO chunk's checkpoint (rl.testing wraps the checkpoint save, so the kill is at a deterministic point), then re-run:
its final checkpoint, results.json (timings aside) and metrics.jsonl must equal A's. The subprocesses share a
persistent compilation cache, so only A compiles.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from agents.jssp_cp import env, rules
from agents.jssp_cp.brute_force import optimum_by_orders
from agents.jssp_cp.bench import main as bench_main
from agents.jssp_cp.inference import NonDelay, load_policy, restore_params
from agents.jssp_cp.instances import benchmark, format_orlib, read_instance
from agents.jssp_cp.schedule import validate
from launch.cli import main
from rl.testing import assert_refused_in_one_line, checkpoint_arrays, run_differences, run_registered

TINY = ["train_sizes=4x3,5x4", "imitation_instances=2", "cpsat_time_limit=5", "imitation.steps=10",
        "improvement_rounds=1", "round_instances=1",
        "imitation.batch_size=16", "network.dim=8", "network.heads=1", "network.job_layers=1", "ppo.num_envs=2",
        "ppo.num_steps=8", "ppo.num_updates=4", "ppo.update_epochs=1", "ppo.num_minibatches=1", "num_chunks=2",
        "validation_sizes=5x4", "validation_instances=2", "eval_sizes=5x4", "eval_instances=2", "taillard=",
        "num_samples=2", "eval_cpsat=false", "show_progress=false", "seed=3"]
# Validation and evaluation share one size, so their rollouts share compilations (the test's largest cost).
FINAL, KILL_AT = 4, 2  # checkpoint steps are PPO updates
TINY_FILE = "3 3\n0 3 1 2 2 2\n0 2 2 1 1 4\n1 4 2 3 0 3\n"


def _solve(capsys, path, out, *options):
    capsys.readouterr()
    code = main(["jssp", "solve", str(path), "--out", str(out), *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_run_resumes_bit_identically_then_solve_and_bench_use_its_policy(tmp_path, capsys):
    cache, a, b = tmp_path / "xla_cache", tmp_path / "A", tmp_path / "B"
    done, saved = run_registered("jssp_cp", a, TINY, cache, fast_compile=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert saved == [KILL_AT, FINAL]
    results = json.loads((a / "results.json").read_text())
    assert results["validator_violations"] == 0 and results["imitation"]["cpsat_optimal"] == 4
    assert results["imitation"]["replayed_mean_makespan"] == results["imitation"]["cpsat_mean_makespan"]
    (improvement,) = results["imitation"]["improvement_rounds"]
    assert improvement["round"] == 1 and improvement["instances"] == 2  # one fresh instance per training size
    assert improvement["target_makespan"] <= improvement["agent_makespan"]
    heldout = results["heldout"]["5x4"]
    candidates = {"imitation", "ppo", "imitation_nondelay", "ppo_nondelay"}
    assert set(heldout) == {"spt", "lpt", "mwkr", "mor", "fifo", "agent_greedy", "agent_sampled"} | {
        f"{c}_{mode}" for c in candidates for mode in ("greedy", "sampled")}
    # The final policy is the candidate with the best validation score; the agent's rows are its rows.
    selection = results["selection"]
    scores = selection["validation_makespan_over_lb"]
    assert set(scores) == candidates and scores[selection["policy"]] == min(scores.values())
    assert all(heldout[f"agent_{mode}"] == heldout[f"{selection['policy']}_{mode}"] for mode in ("greedy", "sampled"))
    # ... and policy.msgpack holds exactly the selected parameters.
    apply, saved_policy = load_policy(a)
    assert isinstance(apply, NonDelay) == selection["policy"].endswith("_nondelay")
    parameters_of = selection["policy"].removesuffix("_nondelay")
    saved = {jax.tree_util.keystr(path): np.asarray(leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(saved_policy)}
    if parameters_of == "ppo":
        final = checkpoint_arrays(a, FINAL)
        chosen = {key: next(v for k, v in final.items() if k.endswith(key) and "opt_state" not in k) for key in saved}
    else:
        cloned = restore_params(saved_policy, (a / "imitation" / "params.msgpack").read_bytes(), "cloned")
        chosen = {jax.tree_util.keystr(path): np.asarray(leaf)
                  for path, leaf in jax.tree_util.tree_leaves_with_path(cloned)}
    assert all(np.array_equal(v, chosen[k]) for k, v in saved.items())
    assert all(v >= 1.0 for v in results["heldout"]["5x4"].values())  # makespan / a lower bound
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite([r["loss"], r["grad_norm"], r["entropy"]]).all() for r in records)
    assert all(r["makespan_over_lb"] is None or r["makespan_over_lb"] >= 1 for r in records)
    assert (a / "learning_curve.png").stat().st_size > 0 and (a / "policy.msgpack").is_file()
    # Not vacuous: the resumed process's chunk moves the parameters.
    before, after = checkpoint_arrays(a, KILL_AT), checkpoint_arrays(a, FINAL)
    assert sum(before[k].tobytes() != after[k].tobytes() for k in after if before[k].dtype.kind == "f") > 4

    killed, saved = run_registered("jssp_cp", b, TINY, cache, kill_after=KILL_AT, fast_compile=True)
    assert killed.returncode == -9 and saved == [KILL_AT] and not (b / "results.json").exists()
    resumed, saved = run_registered("jssp_cp", b, TINY, cache, fast_compile=True)
    assert resumed.returncode == 0 and saved == [FINAL], resumed.stderr[-3000:]
    failures = run_differences(a, b, FINAL, {"timings"})
    assert not failures, "the resumed run differs from the uninterrupted one:\n- " + "\n- ".join(failures)

    # The trained policy schedules a file and the bench runs it beside the rules and CP-SAT.
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_FILE)
    code, out, err = _solve(capsys, path, tmp_path / "agent", "--method", "agent", "--checkpoint", str(a),
                            "--samples", "4")
    assert code == 0 and "agent makespan" in out, err
    record = json.loads((tmp_path / "agent" / "schedule.json").read_text())
    assert validate(read_instance(path), np.array(record["start"]), makespan=record["makespan"]) == []
    assert record["rollouts"] == 4
    # --time-limit gives the agent its greedy rollout, then rounds of --samples rollouts while they fit in it
    # (the greedy call before it compiled the greedy rollout, so its time is the first round's estimate).
    code, _, err = _solve(capsys, path, tmp_path / "greedy", "--method", "agent", "--checkpoint", str(a),
                          "--samples", "0")
    greedy = json.loads((tmp_path / "greedy" / "schedule.json").read_text())
    assert code == 0 and greedy["rollouts"] == 1, err
    code, _, err = _solve(capsys, path, tmp_path / "timed", "--method", "agent", "--checkpoint", str(a),
                          "--samples", "4", "--time-limit", "2")
    timed = json.loads((tmp_path / "timed" / "schedule.json").read_text())
    assert code == 0 and (timed["rollouts"] - 1) % 4 == 0 and timed["rollouts"] > 5, err  # greedy + rounds of 4
    assert timed["makespan"] <= greedy["makespan"]
    capsys.readouterr()
    rows = bench_main(
        ["--workdir", str(tmp_path / "bench"), "--checkpoint", str(a), "--groups", "15x15", "--per-group", "1",
         "--time-limit", "0.5", "--samples", "2"])
    methods = {r["method"] for r in rows}
    assert methods == {"spt", "lpt", "mwkr", "mor", "fifo", "agent_greedy", "agent_sampled", "cpsat_agent_time",
                       "cpsat_0.5s"} and all(r["violations"] == 0 for r in rows)
    assert (tmp_path / "bench" / "bench_jssp.md").read_text().count("| 15x15 |") == 9


def test_solve_a_file_with_a_rule_and_cpsat_and_refuse_a_malformed_file(tmp_path, capsys):
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_FILE)
    instance = read_instance(path)
    for method, expected in (("mwkr", int(rules.dispatch(env.pad(instance), "mwkr")[1])),
                             ("cp-sat", optimum_by_orders(instance)[0])):
        out_dir = tmp_path / method
        code, out, err = _solve(capsys, path, out_dir, "--method", method, "--time-limit", "5")
        assert code == 0 and out.strip() == f"tiny.txt: {method} makespan {expected}", err
        record = json.loads((out_dir / "schedule.json").read_text())
        assert record["makespan"] == expected and "benchmark" not in record
        assert validate(instance, np.array(record["start"]), makespan=expected) == []
        assert (out_dir / "gantt.png").stat().st_size > 1000
    ta = tmp_path / "renamed.txt"
    ta.write_text(format_orlib(benchmark("ta01")[0]))  # another format and name: matched by content
    code, out, _ = _solve(capsys, ta, tmp_path / "ta", "--method", "spt")
    assert code == 0 and "Taillard ta01: best-known upper bound 1231, gap" in out

    bad = tmp_path / "bad.txt"
    bad.write_text("3 3\n0 3 1 2 2 2\n0 2 5 1 1 4\n1 4 2 3 0 3\n")
    code, out, err = _solve(capsys, bad, tmp_path / "bad", "--method", "mwkr")
    assert code == 2 and out == "" and not (tmp_path / "bad").exists()
    assert err.strip().splitlines() == [f"jaxalign: error: {bad}, line 3: machine 5 is out of range 0..2"]
    negative = tmp_path / "negative.txt"
    negative.write_text("2 2\n0 3 1 -2\n1 1 0 1\n")
    code, _, err = _solve(capsys, negative, tmp_path / "neg", "--method", "cp-sat")
    assert code == 2 and err.strip() == f"jaxalign: error: {negative}, line 2: durations must be >= 0; got -2"
    # A time limit for the greedy agent alone (one rollout) is refused, not silently ignored, before any work.
    code, out, err = _solve(capsys, path, tmp_path / "greedy", "--method", "agent", "--samples", "0", "--time-limit",
                            "5")
    assert code == 2 and out == "" and not (tmp_path / "greedy").exists()
    assert err.strip() == ("jaxalign: error: --time-limit needs --samples >= 1 for the agent: --samples 0 is the "
                           "greedy rollout alone, which has nothing to spend a time limit on")


@pytest.mark.parametrize("override, message", [
    ("improvement_rounds=-1", "improvement_rounds must be >= 0 and round_instances >= 1; got -1, 8"),
    ("train_sizes=4by3", "train_sizes must be comma-separated JOBSxMACHINES sizes"),
    ("taillard=ta99", "taillard must name instances ta01..ta80"),
])
def test_bad_config_is_one_error_before_any_directory(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    assert_refused_in_one_line(main, ["run", "jssp_cp", "--workdir", str(workdir), override], workdir, message, capsys)
