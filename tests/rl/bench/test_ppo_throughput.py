"""`jaxalign bench ppo-throughput`'s n_envs sweep on tiny budgets: the summary's stable keys, one sweep row per
n_envs, the files it writes, and bad flags refused before any work or directory.

No speed assertions: the figures depend on the machine and its load.
"""
import csv
import json
import math

import pytest

from rl.bench import ppo_throughput

# 2 envs x 8 steps = 16 per update, 4 minibatches of 4: compiles in seconds, runs in milliseconds.
TINY = ["--num-envs", "2,4", "--num-steps", "8", "--timesteps", "32"]
SUMMARY_KEYS = {"sweep", "ours_best", "sb3_best", "ratio", "target_ratio", "rows", "config", "threads", "cores",
                "jax"}


def _positive_finite(value) -> bool:
    return value is not None and math.isfinite(float(value)) and float(value) > 0


@pytest.fixture(scope="module")
def no_sb3(tmp_path_factory):
    """One ours-only sweep shared by the tests below: (summary, output directory)."""
    out = tmp_path_factory.mktemp("ppo_throughput") / "out"
    return ppo_throughput.main([*TINY, "--no-sb3", "--out", str(out)]), out


def test_summary_has_one_sweep_row_per_n_envs_and_no_ratio_without_sb3(no_sb3):
    summary, _ = no_sb3
    assert SUMMARY_KEYS <= set(summary)
    assert [row["n_envs"] for row in summary["sweep"]] == [2, 4]
    assert summary["ratio"] is None and summary["sb3_best"] is None and summary["target_ratio"] == 50
    for row in summary["sweep"]:
        assert set(row) == set(ppo_throughput.SWEEP_FIELDS)
        assert _positive_finite(row["ours_env_steps_per_second"]) and _positive_finite(row["ours_compile_seconds"])
        assert row["ours_env_steps_per_second"] == pytest.approx(row["ours_env_steps"] / row["ours_seconds"])
        assert row["sb3_env_steps_per_second"] is None and row["ratio_to_sb3_best"] is None
    # --timesteps 32: 2 updates of 2 x 8 steps, 1 update of 4 x 8
    assert [row["ours_env_steps"] for row in summary["sweep"]] == [32, 32]
    assert [row["updates"] for row in summary["rows"]] == [2, 1]
    fastest = max(summary["sweep"], key=lambda row: row["ours_env_steps_per_second"])
    assert summary["ours_best"] == {"n_envs": fastest["n_envs"],
                                    "env_steps_per_second": fastest["ours_env_steps_per_second"]}


def test_files_hold_the_summary_and_the_sweep_table(no_sb3):
    summary, out = no_sb3
    assert json.loads((out / "ppo_throughput.json").read_text()) == json.loads(json.dumps(summary))
    with open(out / "ppo_throughput.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [int(r["n_envs"]) for r in records] == [2, 4]
    assert all(r["sb3_env_steps_per_second"] == "" and float(r["ours_env_steps_per_second"]) > 0 for r in records)
    assert (out / "ppo_throughput.png").stat().st_size > 1000


def test_with_sb3_the_ratio_is_ours_best_over_sb3_best(tmp_path, capsys):
    out = tmp_path / "out"
    summary = ppo_throughput.main([*TINY, "--sb3-num-envs", "1,4", "--sb3-timesteps", "16", "--out", str(out)])
    assert [row["n_envs"] for row in summary["sweep"]] == [1, 2, 4]  # the union of both sweeps
    by_n = {row["n_envs"]: row for row in summary["sweep"]}
    assert by_n[1]["ours_env_steps_per_second"] is None and by_n[2]["sb3_env_steps_per_second"] is None
    assert [by_n[n]["sb3_env_steps"] for n in (1, 4)] == [16, 32]  # 2 updates of 1 x 8, at least 1 of 4 x 8
    sb3_rates = {n: by_n[n]["sb3_env_steps_per_second"] for n in (1, 4)}
    best_n = max(sb3_rates, key=sb3_rates.get)
    assert summary["sb3_best"] == {"n_envs": best_n, "env_steps_per_second": sb3_rates[best_n]}
    assert summary["ratio"] == pytest.approx(summary["ours_best"]["env_steps_per_second"] / sb3_rates[best_n])
    assert by_n[4]["ratio_to_sb3_best"] == pytest.approx(by_n[4]["ours_env_steps_per_second"] / sb3_rates[best_n])
    assert isinstance(summary["stable_baselines3"], str)
    assert "ratio (ours / SB3)" in capsys.readouterr().out
    assert json.loads((out / "ppo_throughput.json").read_text())["ratio"] == pytest.approx(summary["ratio"])


def test_sb3_without_a_step_budget_times_whole_updates_at_the_warmup_pace():
    cfg = ppo_throughput.point_config(1, 8, 1)
    row = ppo_throughput.sb3_steps_per_second(cfg, None, threads=1, target_seconds=1e-9)
    assert row["updates"] == 1 and row["env_steps"] == 8 and _positive_finite(row["warmup_seconds"])
    row = ppo_throughput.sb3_steps_per_second(cfg, None, threads=1, target_seconds=0.2)
    # as many updates as the warmup's pace fits in 0.2 s (how many depends on the machine's load, the rule does not)
    assert row["updates"] == max(1, round(0.2 / row["warmup_seconds"])) and row["env_steps"] == 8 * row["updates"]
    assert row["env_steps_per_second"] == pytest.approx(row["env_steps"] / row["seconds"])


def test_one_num_envs_value_keeps_the_same_setting_side_by_side():
    args = ppo_throughput.parse_args(["--num-envs", "8", "--no-sb3"])
    assert args.num_envs == [8] and args.sb3_num_envs == [8]
    args = ppo_throughput.parse_args(["--no-sb3"])
    assert args.num_envs == [16, 64, 256, 1024, 4096] and args.sb3_num_envs == [1, 4, 16, 64, 256, 1024]
    assert ppo_throughput.parse_args(["--num-envs", "64,16,64", "--no-sb3"]).num_envs == [16, 64]


def test_default_budgets_time_a_few_updates_even_for_big_batches():
    assert ppo_throughput.updates_for(16 * 128, None, 262_144, 2) == 128
    assert ppo_throughput.updates_for(4096 * 128, None, 262_144, 2) == 2
    assert ppo_throughput.updates_for(4096 * 128, 1000, 262_144, 2) == 1  # an explicit budget: at least 1


@pytest.mark.parametrize("flags, message", [
    (["--num-envs", "16,x"], "--num-envs must be a comma list of positive integers such as 16,64,256, got '16,x'"),
    (["--num-envs", "16,0"], "--num-envs must be a comma list"),
    (["--num-envs", ""], "--num-envs must be a comma list"),
    (["--sb3-num-envs", "-4"], "--sb3-num-envs must be a comma list"),
    (["--timesteps", "0"], "--timesteps must be positive, got 0"),
    (["--sb3-timesteps", "-1"], "--sb3-timesteps must be positive, got -1"),
    (["--threads", "0"], "--threads must be positive, got 0"),
    (["--num-steps", "0"], "--num-steps must be positive, got 0"),
    (["--num-envs", "16,3", "--num-steps", "5"], "--num-envs 3 with --num-steps 5: ppo.num_envs * ppo.num_steps"),
    (["--num-envs", "16", "--sb3-num-envs", "1", "--num-steps", "6"], "--sb3-num-envs 1 with --num-steps 6"),
])
def test_bad_flags_are_one_clear_error_before_the_out_dir_exists(tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        ppo_throughput.main([*flags, "--out", str(out)])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()
