"""A killed `jaxalign run ppo_cartpole` resumes to the same result as an uninterrupted run; another config is refused.

Run A goes through uninterrupted. Run B is the same command in a fresh directory, SIGKILLed right after its second
chunk's checkpoint was saved and before that chunk's metrics line was written (the child wraps
`jaxalign.train.checkpoint.PytreeCheckpointer.save` to kill itself there: a real SIGKILL at a deterministic point, so
the test cannot race the run); then the same command is re-run to completion, and once more after it finished. Final
checkpoint arrays (params, optimizer state, env states, observations, key, counter), results.json (timings aside) and
metrics.jsonl must equal A's. The subprocesses share a persistent XLA compilation cache, so only run A compiles.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main
from rl.testing import checkpoint_arrays, run_registered, run_differences

TINY = ["ppo.num_envs=4", "ppo.num_steps=32", "ppo.total_timesteps=512", "ppo.num_minibatches=2",
        "ppo.update_epochs=1", "num_chunks=4", "eval_episodes=3", "show_progress=false", "seed=3"]
UPDATES, KILL_AT = 4, 2  # four chunks of one update; killed right after the checkpoint of update 2
TIMING = {"train_seconds", "wall_seconds", "env_steps_per_second", "env_steps_per_second_after_compile",
          "first_chunk_seconds_with_compile"}


def _run(workdir: Path, cache: Path, kill_after: int | None = None, overrides: list[str] = TINY):
    return run_registered("ppo_cartpole", workdir, overrides, cache, kill_after, fast_compile=True)


def _differences(a: Path, b: Path) -> list[str]:
    return run_differences(a, b, UPDATES, TIMING)


@pytest.mark.slow
def test_killed_run_resumes_bit_identically_and_other_config_is_refused(tmp_path, capsys):
    cache, a, b = tmp_path / "xla_cache", tmp_path / "A", tmp_path / "B"
    done, _ = _run(a, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    # Not vacuous: the last update (run by the resumed process in B) moved the parameters.
    before, after = checkpoint_arrays(a, UPDATES - 1), checkpoint_arrays(a, UPDATES)
    assert any(before[k].tobytes() != after[k].tobytes() for k in after if before[k].dtype.kind == "f")
    lines_a = (a / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["update"] for line in lines_a] == list(range(1, UPDATES + 1))

    killed, saved = _run(b, cache, kill_after=KILL_AT)
    assert killed.returncode == -9, f"expected SIGKILL, got rc {killed.returncode}: {killed.stderr[-3000:]}"
    assert saved[-1] == KILL_AT and not (b / "results.json").exists()
    # Killed between the checkpoint and its metrics line: the resume must restore that record from the checkpoint.
    assert len((b / "metrics.jsonl").read_text().splitlines()) == KILL_AT - 1

    resumed, saved = _run(b, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert saved == [3, 4], f"the re-run trained chunks ending at {saved}, not just the missing ones"
    failures = _differences(a, b)
    # Re-running a finished run restores the last chunk and changes nothing; show_progress only changes the
    # reporting, so it may differ on resume.
    rerun, saved = _run(b, cache, overrides=[o if o != "show_progress=false" else "show_progress=true" for o in TINY])
    assert rerun.returncode == 0 and saved == [], rerun.stderr[-3000:]
    failures += [f"after re-running the finished run: {f}" for f in _differences(a, b)]
    assert not failures, "the resumed run differs from the uninterrupted one:\n- " + "\n- ".join(failures)

    # The same directory with another config: one clear error naming config.json and the field, nothing touched.
    config_before = (b / "config.json").read_text()
    assert json.loads(config_before)["show_progress"] is True
    changed = [o if not o.startswith("ppo.update_epochs=") else "ppo.update_epochs=2" for o in TINY]
    capsys.readouterr()
    assert main(["run", "ppo_cartpole", "--workdir", str(b), *changed]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "ppo.update_epochs=1" in err and "Traceback" not in err, err
    assert (b / "config.json").read_text() == config_before
    # Without config.json the checkpoint itself still refuses to resume under another config.
    (b / "config.json").unlink()
    assert main(["run", "ppo_cartpole", "--workdir", str(b), *changed]) == 2
    err = capsys.readouterr().err
    assert "was written for a different run: metadata ppo/update_epochs is 1, expected 2" in err, err
