"""A read-only work directory and a disk that fills up mid-run: one line naming the file, the reason and what to
do; nothing the user had is touched, and after a full disk the same command resumes from the saved checkpoints."""
from __future__ import annotations

import errno
import json

from fault_checks import TINY_ARITH, assert_one_error, run_with_failing_writes, tree_digest

TINY = [*TINY_ARITH, "sft.steps=4", "dpo.steps=2", "checkpoint.every_steps=2"]
# A complete run in seconds: PPO on CartPole, two chunks, each checkpointed.
TINY_PPO = ["ppo.num_envs=4", "ppo.num_steps=32", "ppo.total_timesteps=512", "ppo.num_minibatches=2",
            "ppo.update_epochs=1", "num_chunks=2", "eval_episodes=3", "show_progress=false", "seed=7"]


def test_read_only_work_directory_is_one_line_and_untouched(tmp_path):
    workdir = tmp_path / "runs"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the user's own file\n")
    before = tree_digest(workdir)
    proc = run_with_failing_writes(workdir, errno.EROFS, "", "run", "arith_dpo", "--workdir", str(workdir), *TINY)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_error(proc.stderr, f"cannot write {workdir / 'logs'}", "Read-only file system (EROFS)",
                     "choose a writable --workdir")
    assert tree_digest(workdir) == before and sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def test_full_disk_at_the_results_keeps_the_checkpoints_and_the_rerun_resumes(tmp_path):
    command = ["run", "ppo_cartpole", "--workdir", str(tmp_path), *TINY_PPO]
    proc = run_with_failing_writes(tmp_path, errno.ENOSPC, "results.json", *command)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_error(proc.stderr, f"cannot write {tmp_path / 'results.json'}", "No space left on device (ENOSPC)",
                     "free some space, then re-run the same command")
    assert not (tmp_path / "results.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "no half-written temporary file is left"
    checkpoints = tree_digest(tmp_path / "checkpoints")
    assert checkpoints

    again = run_with_failing_writes(tmp_path, errno.ENOSPC, "no file has this name", *command)  # space again
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "results.json").exists()
    assert tree_digest(tmp_path / "checkpoints") == checkpoints, "the finished run is resumed, not retrained"


def test_full_disk_during_a_checkpoint_keeps_the_older_one_and_the_rerun_completes(tmp_path):
    """The second chunk's checkpoint cannot be written (orbax's own temporary directory): the first chunk's
    checkpoint is untouched, and the re-run resumes from it to exactly the metrics of an uninterrupted run."""
    command = ["run", "ppo_cartpole", "--workdir", str(tmp_path), *TINY_PPO]
    proc = run_with_failing_writes(tmp_path, errno.ENOSPC, "checkpoints/4", *command)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_error(proc.stderr, f"cannot write {tmp_path / 'checkpoints'}", "(ENOSPC)", "re-run the same command")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    first = tree_digest(tmp_path / "checkpoints" / "2")

    again = run_with_failing_writes(tmp_path, errno.ENOSPC, "no file has this name", *command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert tree_digest(tmp_path / "checkpoints" / "2") == first
    steps = [json.loads(line)["env_steps"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [128, 256, 384, 512], "each update's metrics once: none lost, none repeated"
