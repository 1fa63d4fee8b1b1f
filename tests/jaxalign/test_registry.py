"""Tests for jaxalign.registry: the registered experiments load, and running one (`python -m jaxalign.registry`,
the same code as `jaxalign run`) applies the overrides, keeps the run's log and reports errors in one line.

The run semantics are pinned with a fake experiment registered for the test (fast, no JAX), and compared with the
command line's `run`; one subprocess checks that the module entry point works without the `launch` package.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxalign import registry
from jaxalign.registry import EXPERIMENTS, Experiment, get_experiment

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    steps: int = 2
    rate: float = 0.5

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def fake_run(cfg: FakeConfig, workdir: str) -> dict:
    """Like a real experiment: its own checks (steps=7 is refused), then it claims the work directory (config.json);
    prints, fails on request (steps=13), and returns scalars and non-scalars (only scalars are printed)."""
    if cfg.steps == 7:
        raise ValueError("seven steps do not split over the mesh")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    print(f"training for {cfg.steps} steps in {os.path.basename(workdir)}")
    if cfg.steps == 13:
        raise ValueError("unlucky number of steps")
    return {"steps": cfg.steps, "rate": cfg.rate, "curve": [1.0, 0.5], "per_task": {"a": 1}}


@pytest.fixture
def fake(monkeypatch):
    """Register experiment 'fake' for the duration of a test."""
    experiment = Experiment(name="fake", description="a fake experiment", default_config=FakeConfig, run=fake_run)
    monkeypatch.setitem(EXPERIMENTS, "fake", ("a fake experiment", lambda: experiment))
    for name in [k for k in os.environ if k.startswith("JAXALIGN_")]:  # a single-process run, whatever the shell
        monkeypatch.delenv(name)
    return experiment


def log_without_timestamps(workdir: Path) -> str:
    return re.sub(r"=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "=== TIME ", (workdir / "logs" / "run.log").read_text())


# --- the registry -------------------------------------------------------------------------------------------------


def test_unknown_experiment_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown experiment 'nosuch'; available: apo, arith_dpo, "):
        get_experiment("nosuch")


def test_every_registered_experiment_loads_with_its_name_description_and_a_config_dataclass():
    """Each loader imports its module and returns the registered name and description, a config whose every
    default is a dataclass instance, and a run function (a stale module or class name fails here, not at run)."""
    for name, (description, _) in EXPERIMENTS.items():
        experiment = get_experiment(name)
        assert (experiment.name, experiment.description) == (name, description)
        assert dataclasses.is_dataclass(experiment.default_config()), name
        assert callable(experiment.run), name


def test_task_variants_are_the_main_job_with_another_task():
    """The ARITH task variants share the main job's run function and differ from its default config."""
    main_job = get_experiment("arith_dpo")
    for name in ("arith_dpo_length_bias", "arith_dpo_verbose", "arith_dpo_noisy_labels"):
        variant = get_experiment(name)
        assert variant.run is main_job.run
        assert variant.default_config() != main_job.default_config()
        assert type(variant.default_config()) is type(main_job.default_config())


# --- running one --------------------------------------------------------------------------------------------------


def test_run_applies_overrides_logs_and_prints_the_scalar_results(fake, tmp_path, capsys):
    """Exit 0; the run sees the overridden config; stdout has the run's output then its scalar results as JSON;
    logs/run.log has a header naming the equivalent `jaxalign run` command and the same output."""
    workdir = tmp_path / "w"
    assert registry.main(["fake", "--workdir", str(workdir), "steps=5"]) == 0
    out = capsys.readouterr().out
    printed, summary = out.split("\n", 1)
    assert printed == "training for 5 steps in w"
    assert json.loads(summary) == {"steps": 5, "rate": 0.5}
    assert log_without_timestamps(workdir) == f"=== TIME jaxalign run fake --workdir {workdir} steps=5\n{out}"


def test_resuming_appends_to_the_log(fake, tmp_path, capsys):
    """Each run of the same work directory appends its own header and output."""
    workdir = tmp_path / "w"
    assert registry.main(["fake", "--workdir", str(workdir)]) == 0
    assert registry.main(["fake", "--workdir", str(workdir), "rate=0.25"]) == 0
    log = log_without_timestamps(workdir)
    assert log.count("=== TIME jaxalign run fake") == 2 and '"rate": 0.25' in log.split("=== TIME")[2]


def test_a_failing_run_is_one_error_line_and_its_traceback_goes_to_the_log(fake, tmp_path, capsys):
    """A ValueError from the run: exit 2, stderr is exactly one 'jaxalign: error:' line, run.log keeps the
    traceback."""
    workdir = tmp_path / "w"
    assert registry.main(["fake", "--workdir", str(workdir), "steps=13"]) == 2
    err = capsys.readouterr().err
    assert err == "jaxalign: error: unlucky number of steps\n"
    log = (workdir / "logs" / "run.log").read_text()
    assert "Traceback" in log and "ValueError: unlucky number of steps" in log


def test_a_refusal_before_the_claim_leaves_no_work_directory(fake, tmp_path, capsys):
    """An experiment's own check that fails before it claims the directory: one error line, and the directory this
    run created for its log is gone, so the corrected command starts clean."""
    workdir = tmp_path / "w"
    assert registry.main(["fake", "--workdir", str(workdir), "steps=7"]) == 2
    assert capsys.readouterr().err == "jaxalign: error: seven steps do not split over the mesh\n"
    assert not workdir.exists()


def test_a_refusal_never_removes_a_directory_the_user_had(fake, tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    assert registry.main(["fake", "--workdir", str(workdir), "steps=7"]) == 2
    assert (workdir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("override, fragment", [
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("steps=abc", "expected an integer"),
    ("steps=-1", "steps must be >= 0"),
    ("steps", "is not of the form key=value"),
])
def test_bad_overrides_fail_before_the_work_directory_exists(fake, override, fragment, tmp_path, capsys):
    workdir = tmp_path / "w"
    assert registry.main(["fake", "--workdir", str(workdir), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxalign: error:") and fragment in err.splitlines()[0]
    assert not workdir.exists()


def test_the_command_line_run_is_the_same_run(fake, tmp_path, capsys):
    """`jaxalign run` and `python -m jaxalign.registry` print the same and log the same (header included)."""
    from launch.cli import main as cli_main

    by_registry, by_cli = tmp_path / "a" / "w", tmp_path / "b" / "w"
    assert registry.main(["fake", "--workdir", str(by_registry), "steps=3"]) == 0
    out_registry = capsys.readouterr()
    assert cli_main(["run", "fake", "--workdir", str(by_cli), "steps=3"]) == 0
    out_cli = capsys.readouterr()
    assert out_registry == out_cli
    assert (log_without_timestamps(by_registry).replace(str(by_registry), "W")
            == log_without_timestamps(by_cli).replace(str(by_cli), "W"))
    assert registry.main(["fake", "--workdir", str(by_registry), "steps=13"]) == 2
    assert cli_main(["run", "fake", "--workdir", str(by_cli), "steps=13"]) == 2
    assert capsys.readouterr().err == "jaxalign: error: unlucky number of steps\n" * 2


def test_other_processes_log_to_their_own_file(tmp_path, monkeypatch):
    """Process N > 0 of a multi-process run writes logs/run.process_N.log, never process 0's run.log."""
    monkeypatch.setenv("JAXALIGN_PROCESS_ID", "2")
    with registry.run_log(str(tmp_path), ["run", "fake", "--workdir", str(tmp_path)]):
        print("from process two")
    assert sorted(os.listdir(tmp_path / "logs")) == ["run.process_2.log"]
    assert (tmp_path / "logs" / "run.process_2.log").read_text().endswith("from process two\n")


def test_module_entry_point_runs_without_the_launch_package(tmp_path):
    """`python -m jaxalign.registry` in a fresh process: a clean error for an unknown experiment (exit 2, no
    traceback) and no module of `launch` imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['jaxalign.registry', 'nosuch', '--workdir', {str(tmp_path / 'w')!r}]\n"
            "try:\n    runpy.run_module('jaxalign.registry', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted(m for m in sys.modules if m.split('.')[0] == 'launch'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXALIGN_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.splitlines()[-1] == "2 []", proc.stdout + proc.stderr
    assert proc.stderr.startswith("jaxalign: error: unknown experiment 'nosuch'; available: ")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "jaxalign.registry", "nosuch", "--workdir", str(tmp_path / "w")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("jaxalign: error: unknown experiment 'nosuch'")
