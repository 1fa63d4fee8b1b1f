"""A killed `jaxalign run ddp_gridworld` resumes to the same result as an uninterrupted run; another config is refused.

Run A goes through uninterrupted. Run B is the same command in a fresh directory, SIGKILLed right after its second
chunk's checkpoint was saved and before that chunk's metrics line was written (the child wraps
`PytreeCheckpointer.save` to kill itself there: a real SIGKILL at a deterministic point, no race with the run); then
the same command is re-run to completion. The final checkpoint (the three agents'
params, optimizer states, target params, replay buffers, env states, observations, keys, counters), results.json
(timings aside) and metrics.jsonl must equal A's. The subprocesses share a persistent XLA compilation cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from launch.cli import main

# 100 iterations of 8 envs in four chunks of 25; learning starts after 8 iterations, so chunks 2-4 train for real.
# A short horizon, one homeostatic target and few evaluation episodes keep the (re-run) evaluation cheap.
TINY = ["deep.num_envs=8", "deep.total_timesteps=800", "deep.learning_starts=64", "deep.batch_size=32",
        "deep.hidden_size=32", "deep.buffer_size=1000", "deep.target_update_interval=10", "eval_episodes=50",
        "homeostatic_targets=-5", "horizon=8", "c0_low=3", "c0_high=6", "num_chunks=4", "show_progress=false",
        "seed=5"]
FINAL, KILL_AT = 100, 50  # checkpoint steps are iterations
TIMING = {"train_seconds", "wall_seconds"}
ROOT = Path(__file__).resolve().parents[3]

# The child: the real CLI, with the checkpoint save wrapped to note every saved step in SAVED_STEPS (so the test sees
# that a resumed run trains only the missing chunks, rather than restarting from scratch to the same result) and to
# SIGKILL the process right after step KILL_AFTER_STEP is on disk.
CHILD = """
import os, signal, sys
from rl import checkpoint
save = checkpoint.PytreeCheckpointer.save
def save_then_die(self, step, tree, record=None):
    save(self, step, tree, record)
    with open(os.environ["SAVED_STEPS"], "a") as f:
        f.write(f"{step}\\n")
    if step == int(os.environ["KILL_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.PytreeCheckpointer.save = save_then_die
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(workdir: Path, cache: Path, kill_after: int | None = None, overrides: list[str] = TINY
         ) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run the command in a child process; returns it and the checkpoint steps it saved."""
    saved = workdir.parent / f"{workdir.name}-saved-{time.monotonic_ns()}.txt"
    saved.touch()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               KILL_AFTER_STEP=str(kill_after or -1),
               SAVED_STEPS=str(saved))
    proc = subprocess.run([sys.executable, "-c", CHILD, "run", "ddp_gridworld", "--workdir", str(workdir), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return proc, [int(line) for line in saved.read_text().split()]


def _checkpoint(workdir: Path, step: int) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    return {k: np.asarray(v) for k, v in ocp.StandardCheckpointer().restore(
        workdir / "checkpoints" / str(step) / "state").items()}


def _results(workdir: Path) -> dict:
    """results.json without timings and without config.show_progress (a presentation field)."""
    results = {k: v for k, v in json.loads((workdir / "results.json").read_text()).items() if k not in TIMING}
    results["config"].pop("show_progress")
    return results


def _differences(a: Path, b: Path) -> list[str]:
    found = []
    final_a, final_b = _checkpoint(a, FINAL), _checkpoint(b, FINAL)
    if sorted(final_a) != sorted(final_b):
        found.append("the final checkpoints hold different leaves")
    found += [f"final checkpoint {k} is not bit-identical" for k in sorted(final_a)
              if k in final_b and final_a[k].tobytes() != final_b[k].tobytes()]
    results_a, results_b = _results(a), _results(b)
    found += [f"results.json {k}: {results_b.get(k)!r} != {results_a.get(k)!r}"
              for k in sorted(set(results_a) | set(results_b)) if results_a.get(k) != results_b.get(k)]
    if (b / "metrics.jsonl").read_text() != (a / "metrics.jsonl").read_text():
        found.append("metrics.jsonl differs")
    return found


def test_killed_run_resumes_bit_identically_and_other_config_is_refused(tmp_path, capsys):
    cache, a, b = tmp_path / "xla_cache", tmp_path / "A", tmp_path / "B"
    done, _ = _run(a, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    # Not vacuous: the last chunk (run by the resumed process in B) moved the parameters and filled the buffer.
    before, after = _checkpoint(a, 75), _checkpoint(a, FINAL)
    assert sum(before[k].tobytes() != after[k].tobytes() for k in after if before[k].dtype.kind == "f") > 4
    lines_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps_per_agent"] for r in lines_a] == [200, 400, 600, 800]

    killed, saved = _run(b, cache, kill_after=KILL_AT)
    assert killed.returncode == -9, f"expected SIGKILL, got rc {killed.returncode}: {killed.stderr[-3000:]}"
    assert saved[-1] == KILL_AT and not (b / "results.json").exists()
    # Killed between the checkpoint and its metrics line: the resume must restore that record from the checkpoint.
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 1

    resumed, saved = _run(b, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert saved == [75, 100], f"the re-run trained chunks ending at {saved}, not just the missing ones"
    # (Re-running a finished run, which trains nothing, is checked on ppo_cartpole, which resumes the same way.)
    failures = _differences(a, b)
    assert not failures, "the resumed run differs from the uninterrupted one:\n- " + "\n- ".join(failures)

    # The same directory with another config: one clear error naming config.json and the field, nothing touched.
    config_before = (b / "config.json").read_text()
    changed = [o if o != "deep.batch_size=32" else "deep.batch_size=16" for o in TINY]
    capsys.readouterr()
    assert main(["run", "ddp_gridworld", "--workdir", str(b), *changed]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "deep.batch_size=32" in err and "Traceback" not in err, err
    assert (b / "config.json").read_text() == config_before
