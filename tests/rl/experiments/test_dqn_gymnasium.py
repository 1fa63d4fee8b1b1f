"""`jaxalign run dqn_gymnasium`: double DQN on a gymnasium environment stepped on the host learns CartPole-v1, and a
killed run resumes to exactly the uninterrupted run's checkpoint (replay buffer included), results and metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from launch.cli import main
from rl.experiments.dqn_gymnasium import window_record
from rl.testing import run_differences, run_registered

# 2,500 iterations of 8 envs in four chunks of 625, a record every 125 iterations.
TINY = ["env=CartPole-v1", "dqn.total_timesteps=20000", "dqn.num_envs=8", "num_chunks=4", "record_every=125",
        "eval_episodes=5", "show_progress=false", "seed=0"]
FINAL, KILL_AT = 2500, 1250
TIMING = {"train_seconds", "wall_seconds", "env_steps_per_second"}


@pytest.mark.slow
def test_learns_cartpole_and_a_killed_run_resumes_bit_identically(tmp_path):
    cache, a, b = tmp_path / "xla_cache", tmp_path / "A", tmp_path / "B"
    done, saved = run_registered("dqn_gymnasium", a, TINY, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert saved == [625, 1250, 1875, 2500]
    results = json.loads((a / "results.json").read_text())
    # A random policy lasts about 22 steps. Measured at this budget on the development machine: 130 to 364 over
    # seeds 0-5 (10 greedy episodes each), 364 for seed 0.
    assert results["mean_return"] > 100, results["mean_return"]
    assert results["env_steps"] == 20000 and (a / "learning_curve.png").stat().st_size > 1000
    lines = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in lines] == [1000 * (i + 1) for i in range(20)]
    # learning starts once dqn.learning_starts=1000 transitions are stored: from iteration 125 on (8 per iteration)
    assert lines[0]["learning_steps"] == 1 and lines[0]["loss"] is not None
    assert all(r["learning_steps"] == 125 for r in lines[1:])
    assert lines[-1]["epsilon"] == pytest.approx(0.05)

    killed, saved = run_registered("dqn_gymnasium", b, TINY, cache, kill_after=KILL_AT)
    assert killed.returncode == -9 and saved[-1] == KILL_AT, killed.stderr[-3000:]
    resumed, saved = run_registered("dqn_gymnasium", b, TINY, cache)
    assert resumed.returncode == 0 and saved == [1875, 2500], resumed.stderr[-3000:]
    failures = run_differences(a, b, FINAL, TIMING)
    assert not failures, "the resumed run differs from the uninterrupted one:\n- " + "\n- ".join(failures)


def test_a_record_averages_losses_over_learning_iterations_and_returns_over_finished_episodes():
    nan = float("nan")
    window = [  # iteration 1: nothing learned or finished; 2: one episode of 10; 3: learned, two episodes of 20 and 40
        {"loss": 0.0, "q_mean": 0.0, "td_abs": 0.0, "learned": 0.0, "episode_return": nan, "episode_length": nan,
         "episodes": 0.0, "epsilon": 0.9, "env_steps": 4},
        {"loss": 0.0, "q_mean": 0.0, "td_abs": 0.0, "learned": 0.0, "episode_return": 10.0, "episode_length": 10.0,
         "episodes": 1.0, "epsilon": 0.8, "env_steps": 8},
        {"loss": 2.0, "q_mean": 3.0, "td_abs": 1.0, "learned": 1.0, "episode_return": 30.0, "episode_length": 30.0,
         "episodes": 2.0, "epsilon": 0.7, "env_steps": 12},
    ]
    record = window_record([{k: np.float32(v) for k, v in m.items()} for m in window])
    assert record == pytest.approx({"loss": 2.0, "q_mean": 3.0, "td_abs": 1.0, "episode_return": 70 / 3,
                                    "episode_length": 70 / 3, "episodes": 3, "learning_steps": 1, "epsilon": 0.7,
                                    "env_steps": 12})
    assert window_record(window[:1])["loss"] is None and window_record(window[:1])["episode_return"] is None


def test_an_unknown_or_unsupported_env_is_one_line_before_any_directory(tmp_path, capsys):
    for env, message in [("NoSuchEnv-v0", "env='NoSuchEnv-v0': "),
                         ("Pendulum-v1", "DQN here needs Discrete actions")]:
        assert main(["run", "dqn_gymnasium", "--workdir", str(tmp_path / "w"), f"env={env}"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "w").exists()
