"""`jaxalign run ppo_cartpole` on a tiny budget writes its files, and the experiment and benchmark are registered."""
import importlib
import json
import os


from jaxalign.registry import EXPERIMENTS, get_experiment
from launch.cli import BENCHMARKS, main
from rl.experiments.ppo_cartpole import PPOCartPoleConfig
from rl.harness import chunk_sizes

TINY = ["ppo.num_envs=4", "ppo.num_steps=32", "ppo.total_timesteps=512", "ppo.num_minibatches=2",
        "ppo.update_epochs=1", "num_chunks=2", "eval_episodes=3", "show_progress=false", "seed=7"]


def test_tiny_run_writes_config_results_metrics_and_plot(tmp_path, capsys):
    workdir = tmp_path / "ppo"
    assert main(["run", "ppo_cartpole", "--workdir", str(workdir), *TINY]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((workdir / "results.json").read_text())
    for field in ("mean_return", "env_steps", "env_steps_per_second", "wall_seconds", "seed", "config",
                  "eval_policy", "eval_episodes", "solved"):
        assert field in results, field
    assert results["env_steps"] == 4 * 4 * 32 and results["updates"] == 4 and results["seed"] == 7
    assert results["eval_policy"] == "greedy" and results["eval_episodes"] == 3
    assert 8 <= results["mean_return"] <= 500 and results["env_steps_per_second"] > 0
    assert printed["mean_return"] == results["mean_return"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["ppo"]["total_timesteps"] == 512 and config["num_chunks"] == 2 and config == results["config"]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["env_steps"] for line in lines] == [128, 256, 384, 512]
    assert os.path.getsize(workdir / "learning_curve.png") > 1000


def test_chunks_cover_every_update_with_at_most_two_sizes():
    assert chunk_sizes(128, 16) == [8] * 16
    assert chunk_sizes(5, 2) == [3, 2]
    assert chunk_sizes(10, 3) == [4, 4, 2]
    assert sum(chunk_sizes(97, 7)) == 97 and len(set(chunk_sizes(97, 7))) <= 2


def test_bad_budget_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["run", "ppo_cartpole", "--workdir", str(tmp_path), "ppo.num_minibatches=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxalign: error:") and "ppo.num_minibatches=3" in err and "Traceback" not in err
    assert main(["run", "ppo_cartpole", "--workdir", str(tmp_path), "num_chunks=1000"]) == 2
    assert "num_chunks must lie in [1, ppo.num_updates=128]" in capsys.readouterr().err


def test_experiment_and_benchmark_are_registered(capsys):
    assert "ppo_cartpole" in EXPERIMENTS
    experiment = get_experiment("ppo_cartpole")
    assert isinstance(experiment.default_config(), PPOCartPoleConfig)
    assert main(["list"]) == 0
    assert any(line.split()[0] == "ppo_cartpole" for line in capsys.readouterr().out.splitlines())
    assert BENCHMARKS["ppo-throughput"] == "rl.bench.ppo_throughput"


def test_ppo_throughput_benchmark_runs_both_sides_on_a_tiny_budget(tmp_path, capsys):
    # `make test` installs the bench extra, so SB3 is always there: a missing baseline fails here, never skips.
    importlib.import_module("stable_baselines3")
    out = tmp_path / "bench"
    assert main(["bench", "ppo-throughput", "--timesteps", "256", "--sb3-timesteps", "256", "--num-envs", "4",
                 "--num-steps", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio (ours / SB3)" in printed and "Stable-Baselines3" in printed
    summary = json.loads((out / "ppo_throughput.json").read_text())
    assert [row["env_steps"] for row in summary["rows"]] == [256, 256] and summary["ratio"] > 0
    assert (out / "ppo_throughput.csv").exists() and (out / "ppo_throughput.png").exists()
