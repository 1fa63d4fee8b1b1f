"""A killed `jaxalign run ddp_gridworld` resumes to the same result as an uninterrupted run; another config is refused.

Run A goes through uninterrupted. Run B is the same command in a fresh directory, SIGKILLed right after its second
chunk's checkpoint was saved and before that chunk's metrics line was written (the child wraps
`jaxalign.train.checkpoint.PytreeCheckpointer.save` to kill itself there: a real SIGKILL at a deterministic point, no
race with the run); then the same command is re-run to completion. The final checkpoint (the three agents' params,
optimizer states, target params, replay buffers, env states, observations, keys, counters), results.json (timings
aside) and metrics.jsonl must equal A's. The subprocesses share a persistent XLA compilation cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main
from rl.testing import checkpoint_arrays, run_registered, run_differences

# 100 iterations of 8 envs in four chunks of 25; learning starts after 8 iterations, so chunks 2-4 train for real.
# A short horizon, one homeostatic target and few evaluation episodes keep the (re-run) evaluation cheap.
TINY = ["deep.num_envs=8", "deep.total_timesteps=800", "deep.learning_starts=64", "deep.batch_size=32",
        "deep.hidden_size=32", "deep.buffer_size=1000", "deep.target_update_interval=10", "eval_episodes=50",
        "homeostatic_targets=-5", "horizon=8", "c0_low=3", "c0_high=6", "num_chunks=4", "show_progress=false",
        "seed=5"]
FINAL, KILL_AT = 100, 50  # checkpoint steps are iterations
TIMING = {"train_seconds", "wall_seconds"}


def _run(workdir: Path, cache: Path, kill_after: int | None = None, overrides: list[str] = TINY):
    return run_registered("ddp_gridworld", workdir, overrides, cache, kill_after, fast_compile=True)


def _differences(a: Path, b: Path) -> list[str]:
    return run_differences(a, b, FINAL, TIMING)


@pytest.mark.slow
def test_killed_run_resumes_bit_identically_and_other_config_is_refused(tmp_path, capsys):
    cache, a, b = tmp_path / "xla_cache", tmp_path / "A", tmp_path / "B"
    done, _ = _run(a, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    # Not vacuous: the last chunk (run by the resumed process in B) moved the parameters and filled the buffer.
    before, after = checkpoint_arrays(a, 75), checkpoint_arrays(a, FINAL)
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
