"""Tests for `jaxalign local`: N `jaxalign run` processes on localhost joined by jax.distributed (gloo).

The end-to-end cases run the real command line in subprocesses: a 2-process arith_dpo run with the same global
batch logs the same per-step SFT and DPO losses as a 1-process run with the same mesh, and a process killed in the
middle of training stops the whole run with a clear message well within 60 s instead of hanging.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launch import local
from launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 400

# A tiny arith_dpo: a few seconds of compute after compilation. Every step is logged (log_every=1); the pairs keep
# every prompt (no score gap, no correct sample needed), so DPO has data even from a barely trained SFT policy.
TINY = [
    "task.num_operands=3", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "model.head_dim=16", "model.mlp_dim=64", "sft.batch_size=16", "sft.optim.learning_rate=1e-2",
    "sft.optim.warmup_steps=2", "pairs.num_prompts=16", "pairs.samples_per_prompt=4",
    "pairs.require_correct_chosen=false", "pairs.min_score_gap=0.0", "dpo.batch_size=8", "dpo.eval_every=3",
    "dpo.optim.learning_rate=1e-3", "dpo.optim.warmup_steps=2", "num_val_prompts=64", "eval_fraction=0.064",
    "eval_batch_size=64", "checkpoint.every_steps=4", "log_every=1", "show_progress=false",
]


def _env(**extra: str) -> dict[str, str]:
    """CPU, no inherited JAXALIGN_* settings, and O0 backend codegen (halves compile time; every run compiles the
    same way, and the launcher adds its device count to these flags)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXALIGN_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS="--xla_backend_optimization_level=0", **extra)
    return env


def _cli() -> list[str]:
    return [sys.executable, "-m", "launch.cli"]


def _losses(path: Path) -> dict[tuple[str, int], float]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["phase"], r["step"]): r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one_process(tmp_path):
    """2 processes x 1 CPU device (each loading only its half of every batch) vs 1 process x 2 devices: the same
    mesh and global batch, so the same per-step SFT and DPO losses (to fp tolerance), the same pairs and the same
    results; only process 0 writes the shared outputs, process 1 keeps its metrics under logs/."""
    steps = ["sft.steps=8", "dpo.steps=6"]
    one, two = tmp_path / "one", tmp_path / "two"
    started = time.perf_counter()
    # Concurrently: compilation is mostly single-threaded.
    baseline = subprocess.Popen(_cli() + ["run", "arith_dpo", "--workdir", str(one), *TINY, *steps],
                                env=_env(JAXALIGN_LOCAL_DEVICE_COUNT="2"), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    launched = subprocess.run(_cli() + ["local", "--processes", "2", "run", "arith_dpo", "--workdir", str(two),
                                        *TINY, *steps], env=_env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    baseline_output = baseline.communicate(timeout=RUN_TIMEOUT_S)[0]
    print(f"both runs: {time.perf_counter() - started:.0f} s")
    assert baseline.returncode == 0, baseline_output[-3000:]
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]

    expected, got = _losses(one / "metrics.jsonl"), _losses(two / "metrics.jsonl")
    assert sorted(expected) == [("dpo", s) for s in range(1, 7)] + [("sft", s) for s in range(1, 9)]
    assert sorted(got) == sorted(expected)
    keys = sorted(expected)
    np.testing.assert_allclose([got[k] for k in keys], [expected[k] for k in keys], rtol=1e-5)
    assert _losses(two / "logs" / "metrics.process_1.jsonl") == got  # process 1 saw the very same numbers

    want, have = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for key in ("pairs", "pairs_dropped_tied", "sft_accuracy", "dpo_accuracy", "sft_mean_length"):
        assert have[key] == want[key], key
    assert have["guard"]["selected_step"] == want["guard"]["selected_step"]
    # Output: every child line prefixed, and kept per process.
    lines = launched.stdout.splitlines()
    assert any(line.startswith("[p0] {") for line in lines) and any(line.startswith("[p1] {") for line in lines)
    for i in range(2):
        assert '"pairs": 16' in (two / "logs" / f"process_{i}.log").read_text()
    assert "all 2 processes finished" in lines[-1]


@pytest.mark.slow
def test_a_killed_process_stops_the_run_with_a_clear_error_within_60_seconds(tmp_path):
    """SIGKILL process 1 in the middle of SFT (process 0 then waits on it in the step's collectives): the launcher
    and the surviving process exit non-zero within 60 s, naming the process that died."""
    workdir = tmp_path / "run"
    launcher = subprocess.Popen(_cli() + ["local", "--processes", "2", "run", "arith_dpo", "--workdir", str(workdir),
                                          *TINY, "sft.steps=100000", "checkpoint.every_steps=100000"],
                                env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = None
        for line in launcher.stdout:  # "jaxalign local: started process 1 (pid N)"
            if "started process 1 (pid" in line:
                pid = int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
                break
        assert pid is not None
        metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + RUN_TIMEOUT_S
        while not (metrics.exists() and metrics.read_text().count('"phase": "sft"') >= 3):  # training for real
            assert launcher.poll() is None and time.monotonic() < deadline, "the run never got to SFT step 3"
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    print(f"stopped {elapsed:.1f} s after the kill")
    assert elapsed < 60
    assert launcher.returncode == 1
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("jaxalign local: error: process 1 was killed by SIGKILL (exit code -9)"), error
    p0 = error.split("exit codes: p0=", 1)[1].split(",")[0]
    assert int(p0) != 0  # the survivor did not claim success


def test_launcher_stops_survivors_after_the_grace_period(tmp_path):
    """The watchdog without JAX: one child fails, the other would sleep for a minute; it is terminated after the
    grace period and the failure names the first process and its code."""
    procs = [subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(3)"]),
             subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    messages: list[str] = []
    started = time.monotonic()
    failure = local.supervise(procs, grace_seconds=0.5, terminate_seconds=2, say=messages.append)
    assert time.monotonic() - started < 10
    assert failure == local.Failure(0, 3)
    assert procs[1].returncode == -signal.SIGTERM
    assert len(messages) == 1
    assert messages[0].startswith("jaxalign local: process 0 exited with code 3; stopping the other processes")


def test_child_environment_follows_the_distributed_contract():
    env = local.child_env({"PATH": "/bin", "JAXALIGN_DISTRIBUTED": "auto"}, "127.0.0.1:5000", 4, 3, 2)
    assert {k: env[k] for k in env if k.startswith("JAXALIGN_")} == {
        "JAXALIGN_COORDINATOR_ADDRESS": "127.0.0.1:5000", "JAXALIGN_NUM_PROCESSES": "4",
        "JAXALIGN_PROCESS_ID": "3", "JAXALIGN_LOCAL_DEVICE_COUNT": "2"}
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"
    assert local.child_env({"JAX_PLATFORMS": "cuda"}, "h:1", 1, 0, 1)["JAX_PLATFORMS"] == "cuda"


@pytest.mark.parametrize("argv, expected", [
    (["local", "--processes", "0", "run", "arith_dpo", "--workdir", "W"], "--processes must be a positive integer"),
    (["local", "--processes", "2", "--devices-per-process", "0", "run", "arith_dpo", "--workdir", "W"],
     "--devices-per-process must be a positive integer"),
    (["local", "--processes", "2", "--port", "70000", "run", "arith_dpo", "--workdir", "W"], "--port must be in"),
    (["local", "--processes", "2", "arith_dpo"], "expects `run NAME --workdir DIR"),
    (["local", "--processes", "2", "run", "nope", "--workdir", "W"], "unknown experiment 'nope'"),
    (["local", "--processes", "2", "run", "arith_dpo", "--workdir", "W", "dpo.steps=abc"], "dpo.steps"),
])
def test_bad_local_arguments_are_one_error_before_any_process_starts(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxalign: error:") and expected in err[0], err
    assert not (tmp_path / "W").exists()
