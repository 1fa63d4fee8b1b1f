"""`jaxalign sweep`: value lists and their quoting, the grid and its directory names, validation before anything
runs, --print, failure reporting, and a real tiny sweep of ppo_cartpole that writes the CSV and resumes."""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex

import pytest

from jaxalign.overrides import ConfigError
from launch import sweep
from launch.cli import main

# ppo_cartpole on a budget that trains in a few seconds (plus compilation): one update of 4 x 16 steps.
TINY_PPO = ["ppo.num_envs=4", "ppo.num_steps=16", "ppo.total_timesteps=64", "ppo.num_minibatches=1",
            "ppo.update_epochs=1", "num_chunks=1", "eval_episodes=2", "show_progress=false"]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- value lists ----------------------------------------------------------------------------------------------------


def test_values_split_on_commas_and_brackets_keep_a_value_whole():
    assert sweep.split_values("k", "0.1,0.5,1") == ("0.1", "0.5", "1")
    assert sweep.split_values("k", "7") == ("7",)
    # one [...] group is taken verbatim without its brackets; [] is the empty string
    assert sweep.split_values("dpo.objective_args", "[ld_alpha=0.5,wpo=true],[wpo=true],[]") == (
        "ld_alpha=0.5,wpo=true", "wpo=true", "")
    # brackets inside a value never split it and stay (the bench's NAME[args] spelling)
    assert sweep.split_values("k", "sigmoid[a=1,b=2],ipo") == ("sigmoid[a=1,b=2]", "ipo")
    assert sweep.split_values("k", "[a]x[b],[[c]]") == ("[a]x[b]", "[c]")
    # a backslash escapes one character: a literal comma, bracket or backslash
    assert sweep.split_values("k", r"a\,b,c") == ("a,b", "c")
    assert sweep.split_values("k", r"\[x,y\]") == ("[x", "y]")
    assert sweep.split_values("k", r"a\\,b") == ("a\\", "b")


@pytest.mark.parametrize("text, message", [
    ("0.1,,2", "value 2 is empty; write [] for an empty string"),
    ("0.1,", "value 2 is empty"),
    ("", "value 1 is empty"),
    ("[a,b", "a '[' is never closed"),
    ("a],b", "a ']' closes no '['"),
    ("a\\", "ends with a lone backslash"),
    ("1,2,1", "repeats the value '1'"),
])
def test_bad_value_lists_are_one_clear_error_naming_the_axis(text, message):
    with pytest.raises(ConfigError, match="sweep axis dpo.beta=") as info:
        sweep.split_values("dpo.beta", text)
    assert message in str(info.value)


def test_axes_need_key_value_form_and_each_field_once_aliases_included():
    with pytest.raises(ConfigError, match="'seed' is not of the form key=v1,v2"):
        sweep.parse_axes(["seed"])
    with pytest.raises(ConfigError, match="'loss' and 'dpo.objective' both set dpo.objective"):
        sweep.parse_axes(["loss=ipo,sigmoid", "dpo.objective=cdpo"], {"loss": "dpo.objective"})
    with pytest.raises(ConfigError, match="'seed' and 'seed' both set seed"):
        sweep.parse_axes(["seed=1", "seed=2"])


# --- the grid ---------------------------------------------------------------------------------------------------------


def test_grid_is_the_product_in_axis_order_named_by_the_varying_axes():
    axes = sweep.parse_axes(["dpo.beta=0.1,1", "show_progress=false", "dpo.objective_args=[ld_alpha=0.5,wpo=true],[]"])
    points = sweep.expand(axes)
    assert [p.overrides for p in points] == [
        ["dpo.beta=0.1", "show_progress=false", "dpo.objective_args=ld_alpha=0.5,wpo=true"],
        ["dpo.beta=0.1", "show_progress=false", "dpo.objective_args="],
        ["dpo.beta=1", "show_progress=false", "dpo.objective_args=ld_alpha=0.5,wpo=true"],
        ["dpo.beta=1", "show_progress=false", "dpo.objective_args="],
    ]
    assert [p.name for p in points] == [
        "dpo.beta-0.1__dpo.objective_args-ld_alpha-0.5+wpo-true", "dpo.beta-0.1__dpo.objective_args-empty",
        "dpo.beta-1__dpo.objective_args-ld_alpha-0.5+wpo-true", "dpo.beta-1__dpo.objective_args-empty"]
    assert sweep.expand(sweep.parse_axes(["seed=3"]))[0].name == "run"


def test_names_are_filesystem_safe_unique_and_bounded():
    points = sweep.expand(sweep.parse_axes(["dpo.reference_cache_dir=a/b c,a_b_c,x=y,x-y"]))
    names = [p.name for p in points]
    assert len(set(names)) == 4
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-") for n in names)
    # 'a/b c' and 'a_b_c' (and 'x=y' and 'x-y') would share a directory: both get a hash suffix
    assert names[0].startswith("dpo.reference_cache_dir-a_b_c-") and names[1].startswith("dpo.reference_cache_dir-a_b_c-")
    long = sweep.expand(sweep.parse_axes([f"dpo.objective_args={'x' * 300},y"]))
    assert len(long[0].name) == sweep.MAX_NAME_LEN and long[1].name == "dpo.objective_args-y"


# --- validation before anything runs ---------------------------------------------------------------------------------


def test_an_invalid_point_fails_the_sweep_before_any_point_runs(tmp_path):
    calls = []

    def runner(*args):  # never reached
        calls.append(args)
        return ""

    workdir = tmp_path / "sweep"
    with pytest.raises(ConfigError) as info:
        sweep.sweep("arith_dpo", ["dpo.beta=0.1,-1", "seed=0,x"], str(workdir), runner, show_progress=False)
    message = str(info.value)
    assert message.startswith("grid point 2/4 dpo.beta-0.1__seed-x (dpo.beta=0.1 seed=x): seed='x': expected an integer")
    assert "(2 more of the 4 points are invalid)" in message
    assert calls == [] and not workdir.exists()
    with pytest.raises(ConfigError, match=r"dpo.objective='sigmoid' takes no gamma"):
        sweep.sweep("arith_dpo", ["dpo.objective_args=[wpo=true],[gamma=1]"], str(workdir), runner)
    with pytest.raises(ConfigError, match="resolve to the same arith_dpo config"):
        sweep.sweep("arith_dpo", ["dpo.beta=0.1,1e-1"], str(workdir), runner)
    assert calls == [] and not workdir.exists()


def test_cli_validation_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    assert main(["sweep", "arith_dpo", "--workdir", str(workdir), "dpo.beta=0.1,1", "dpo.betta=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxalign: error: grid point 1/2") and "unknown config key 'dpo.betta'" in err
    assert main(["sweep", "no_such_experiment", "--workdir", str(workdir), "seed=1,2"]) == 2
    assert "unknown experiment 'no_such_experiment'" in capsys.readouterr().err
    assert main(["sweep", "ppo_cartpole", "--workdir", str(workdir), "--launcher", "tpu", "seed=1,2"]) == 2
    assert "--launcher tpu only prints" in capsys.readouterr().err
    assert not workdir.exists()


# --- --print ------------------------------------------------------------------------------------------------------------


def test_print_gives_exact_shell_quoted_run_commands_and_runs_nothing(tmp_path, capsys):
    workdir = tmp_path / "my sweep"
    argv = ["sweep", "arith_dpo", "--workdir", str(workdir), "--print", "loss=sigmoid,ipo",
            "dpo.objective_args=[],[ld_alpha=0.5]", "show_progress=false"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and not workdir.exists()
    assert lines[1] == (f"jaxalign run arith_dpo --workdir '{workdir}/loss-sigmoid__dpo.objective_args-ld_alpha-0.5' "
                        "loss=sigmoid dpo.objective_args=ld_alpha=0.5 show_progress=false")
    # every line splits back into exactly the run command, and that command's overrides are valid
    parsed = [shlex.split(line) for line in lines]
    assert parsed[0] == ["jaxalign", "run", "arith_dpo", "--workdir",
                         str(workdir / "loss-sigmoid__dpo.objective_args-empty"), "loss=sigmoid",
                         "dpo.objective_args=", "show_progress=false"]
    assert [p[6] for p in parsed] == ["dpo.objective_args=", "dpo.objective_args=ld_alpha=0.5"] * 2
    # The remote launchers get the same run, with their own arguments where their `run` sub-commands take them.
    assert main(argv + ["--launcher", "tpu", "--launcher-args", "my-tpu --zone us-central2-b --retries 2"]) == 0
    tpu = capsys.readouterr().out.splitlines()
    assert [shlex.split(line) for line in tpu] == [
        ["jaxalign", "tpu", "run", "my-tpu", "--zone", "us-central2-b", "--retries", "2", *p[2:]] for p in parsed]
    assert main(argv + ["--launcher", "ssh", "--launcher-args", "--hosts 'my hosts.txt'"]) == 0
    ssh = capsys.readouterr().out.splitlines()
    assert [shlex.split(line) for line in ssh] == [["jaxalign", "ssh", "--hosts", "my hosts.txt", *p[1:]] for p in parsed]
    assert main(argv + ["--launcher", "ssh"]) == 2
    assert "--launcher ssh needs --launcher-args '--hosts HOSTS_FILE'" in capsys.readouterr().err
    assert main(argv[:4] + ["--launcher-args", "x", "seed=1"]) == 2
    assert "is for --launcher tpu or ssh" in capsys.readouterr().err
    assert not workdir.exists()


# --- running, failures, aggregation ---------------------------------------------------------------------------------


def fake_runner(fail_on: str):
    """Writes a results.json like an experiment would, except for the point named `fail_on`."""
    calls = []

    def run(experiment, point, workdir):
        calls.append(point.name)
        if point.name == fail_on:
            raise RuntimeError("diverged at step 3")
        values = dict(point.assignment)
        with open(os.path.join(workdir, point.name, "results.json"), "w") as f:
            json.dump({"accuracy": float(values["dpo.beta"]) / 10, "steps": {"sft": 4, "dpo": 2}, "curve": [1, 2],
                       "config": {"dpo": {"beta": values["dpo.beta"]}}, "note": "a|b"}, f)
        return ""

    return run, calls


def test_a_failed_point_is_reported_the_sweep_goes_on_and_exits_1(tmp_path, capsys):
    runner, calls = fake_runner(fail_on="dpo.beta-0.5")
    args = argparse.Namespace(name="arith_dpo", workdir=str(tmp_path), print_only=False, launcher="local",
                              launcher_args="", show_progress=True, overrides=["dpo.beta=0.1,0.5,2", "show_progress=false"])
    assert sweep.command(args, runner) == 1
    out, err = capsys.readouterr()
    assert calls == ["dpo.beta-0.1", "dpo.beta-0.5", "dpo.beta-2"]
    assert "[sweep] dpo.beta-0.5 failed: RuntimeError: diverged at step 3" in err
    assert "failed: dpo.beta-0.5: RuntimeError: diverged at step 3" in err
    assert "3 points, 2 ran, 0 skipped (results.json existed), 1 failed" in out
    rows = read_csv(tmp_path / "sweep.csv")
    assert list(rows[0]) == ["point", "dpo.beta", "show_progress", "status", "error", "accuracy", "steps.sft",
                             "steps.dpo", "note"]  # scalars only: lists and the resolved config are left out
    assert [(r["dpo.beta"], r["status"], r["accuracy"]) for r in rows] == [
        ("0.1", "ran", "0.01"), ("0.5", "failed", ""), ("2", "ran", "0.2")]
    assert rows[1]["error"] == "RuntimeError: diverged at step 3"
    md = (tmp_path / "sweep.md").read_text()
    assert "fixed overrides: `show_progress=false`" in md
    assert "| dpo.beta | status | error | accuracy | steps.sft | steps.dpo | note |" in md
    assert "| 0.5 | failed | RuntimeError: diverged at step 3 |  |  |  |  |" in md and "a\\|b" in md
    record = json.loads((tmp_path / "dpo.beta-0.5" / sweep.POINT_FILE).read_text())
    assert record == {"experiment": "arith_dpo", "overrides": ["dpo.beta=0.5", "show_progress=false"]}

    # Re-running retries only the failed point; the others are skipped on their results.json.
    runner, calls = fake_runner(fail_on="none")
    assert sweep.command(args, runner) == 0
    assert calls == ["dpo.beta-0.5"]
    assert [r["status"] for r in read_csv(tmp_path / "sweep.csv")] == ["skipped", "ran", "skipped"]


def test_a_point_directory_from_another_sweep_is_refused_before_running(tmp_path):
    runner, calls = fake_runner(fail_on="none")
    sweep.sweep("arith_dpo", ["dpo.beta=0.1,2", "seed=0"], str(tmp_path), runner, show_progress=False)
    runner, calls = fake_runner(fail_on="none")
    with pytest.raises(ConfigError, match=r"records arith_dpo with dpo.beta=0.1 seed=0, but this sweep's point "
                                          r"dpo.beta-0.1 is arith_dpo with dpo.beta=0.1 seed=1; use a new --workdir"):
        sweep.sweep("arith_dpo", ["dpo.beta=0.1,2", "seed=1"], str(tmp_path), runner, show_progress=False)
    assert calls == []


def test_error_line_prefers_the_cli_error_then_the_last_line():
    assert sweep._error_line("x\njaxalign: error: dpo.beta must be positive\n", 2) == "dpo.beta must be positive"
    assert sweep._error_line("Traceback ...\n  File x\nMemoryError: boom\n\n", 1) == "MemoryError: boom"
    assert sweep._error_line("", -9) == "exit code -9"


def test_real_tiny_ppo_sweep_writes_one_row_per_point_and_resumes(tmp_path, capsys, monkeypatch):
    """Two real `jaxalign run ppo_cartpole` processes (a persistent compilation cache makes the second cheap),
    then a second sweep that skips both."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    workdir = tmp_path / "sweep"
    argv = ["sweep", "ppo_cartpole", "--workdir", str(workdir), "seed=1,2", *TINY_PPO]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 points, 2 ran, 0 skipped" in out
    rows = read_csv(workdir / "sweep.csv")
    assert [(r["point"], r["seed"], r["status"]) for r in rows] == [("seed-1", "1", "ran"), ("seed-2", "2", "ran")]
    for row in rows:
        results = json.loads((workdir / row["point"] / "results.json").read_text())
        assert results["seed"] == int(row["seed"]) and results["env_steps"] == 64
        assert float(row["mean_return"]) == pytest.approx(results["mean_return"])
        assert row["env_steps"] == "64" and row["ppo.num_envs"] == "4"
        assert "jaxalign run ppo_cartpole" in (workdir / row["point"] / sweep.LOG_FILE).read_text()
    md = (workdir / "sweep.md").read_text()
    header = md.splitlines()[4]
    assert header.startswith("| seed | status | ") and "| mean_return |" in header and md.count("| ran |") == 2
    assert "fixed overrides: `ppo.num_envs=4 ppo.num_steps=16" in md
    assert json.loads((workdir / "sweep.json").read_text())["axes"]["seed"] == ["1", "2"]

    logs = {r["point"]: (workdir / r["point"] / sweep.LOG_FILE).read_text() for r in rows}
    assert main(argv) == 0  # everything done: nothing runs again
    assert "2 points, 0 ran, 2 skipped" in capsys.readouterr().out
    assert {r["point"]: (workdir / r["point"] / sweep.LOG_FILE).read_text() for r in rows} == logs
    assert [r["status"] for r in read_csv(workdir / "sweep.csv")] == ["skipped", "skipped"]


def test_one_objective_argument_is_an_axis_of_its_own(tmp_path):
    """`dpo.objective_args.gamma_beta_ratio=0,1` varies one argument (the whole string would need g=0,g=1)."""
    axes, points = sweep.plan("arith_dpo", ["loss=simpo", "dpo.objective_args.gamma_beta_ratio=0,1"],
                              str(tmp_path / "sweep"))
    assert [p.name for p in points] == [f"dpo.objective_args.gamma_beta_ratio-{v}" for v in (0, 1)]
    configs = sweep.validate("arith_dpo", points)
    assert [(c.dpo.objective, c.dpo.objective_args, c.dpo.beta) for c in configs] == [
        ("simpo", "gamma_beta_ratio=0", None), ("simpo", "gamma_beta_ratio=1", None)]
