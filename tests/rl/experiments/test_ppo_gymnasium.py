"""`jaxalign run ppo_gymnasium`: PPO on a gymnasium environment stepped on the host learns CartPole-v1, and a
killed run resumes to exactly the uninterrupted run's checkpoint, results and metrics (every chunk starts from
environments reset with seeds that depend only on the chunk, so the environments need no checkpoint)."""
from __future__ import annotations

import json

import pytest

from launch.cli import main
from rl.testing import run_differences, run_registered

# 24 updates of 8 envs x 128 steps in four chunks of 6; a high learning rate learns CartPole in that budget.
TINY = ["env=CartPole-v1", "ppo.total_timesteps=24576", "ppo.num_envs=8", "ppo.num_steps=128",
        "ppo.learning_rate=2.5e-3", "num_chunks=4", "eval_episodes=5", "show_progress=false", "seed=3"]
FINAL, KILL_AT = 24, 12
TIMING = {"train_seconds", "wall_seconds", "env_steps_per_second"}


@pytest.mark.slow
def test_learns_cartpole_and_a_killed_run_resumes_bit_identically(tmp_path):
    cache, a, b = tmp_path / "xla_cache", tmp_path / "A", tmp_path / "B"
    done, saved = run_registered("ppo_gymnasium", a, TINY, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert saved == [6, 12, 18, 24]
    results = json.loads((a / "results.json").read_text())
    # A random policy lasts about 22 steps; the greedy policy after 24,576 steps should balance far longer.
    assert results["mean_return"] > 150, results["mean_return"]
    assert results["env_steps"] == 24576 and (a / "learning_curve.png").stat().st_size > 1000
    lines = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in lines] == [1024 * (i + 1) for i in range(24)]

    killed, saved = run_registered("ppo_gymnasium", b, TINY, cache, kill_after=KILL_AT)
    assert killed.returncode == -9 and saved[-1] == KILL_AT, killed.stderr[-3000:]
    resumed, saved = run_registered("ppo_gymnasium", b, TINY, cache)
    assert resumed.returncode == 0 and saved == [18, 24], resumed.stderr[-3000:]
    failures = run_differences(a, b, FINAL, TIMING)
    assert not failures, "the resumed run differs from the uninterrupted one:\n- " + "\n- ".join(failures)


def test_an_unknown_or_unsupported_env_is_one_line_before_any_directory(tmp_path, capsys):
    for env, message in [("NoSuchEnv-v0", "env='NoSuchEnv-v0': "),
                         ("Pendulum-v1", "PPO here needs Discrete actions")]:
        assert main(["run", "ppo_gymnasium", "--workdir", str(tmp_path / "w"), f"env={env}"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "w").exists()
