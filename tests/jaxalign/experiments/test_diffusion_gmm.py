"""`jaxalign run diffusion_gmm` on a tiny budget: the loss falls towards the mixture's irreducible error, the trained
network's samples beat the untrained one's at the same NFE, a run killed after its first chunk resumes to
bit-identical parameters and results, a bad config value is one error line before anything is written, and the
experiment is registered."""
from __future__ import annotations

import json

import pytest

import rl.harness
from jaxalign.experiments import diffusion_gmm
from jaxalign.registry import EXPERIMENTS, configure, get_experiment
from launch.cli import main
from rl.testing import assert_refused_in_one_line

TINY = ["steps=1000", "batch=256", "num_chunks=2", "samples=400", "nfes=10",
        "solvers=ddim,dpm_solver_pp_2m", "show_progress=false", "seed=3"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("diffusion_gmm") / "full"
    assert main(["run", "diffusion_gmm", "--workdir", str(workdir), *TINY]) == 0
    return workdir, json.loads((workdir / "results.json").read_text())


def test_tiny_run_learns_and_writes_its_files(full_run):
    workdir, results = full_run
    assert results["first_loss"] > 1.5 and results["final_loss"] < 0.6
    assert results["final_loss"] > results["irreducible_loss"] - 0.05  # no network beats E||eps - E[eps|x_t]||^2
    assert 0.4 < results["irreducible_loss"] < 0.55
    assert results["irreducible_loss_stderr"] < 0.005
    mmd = results["mmd2"]
    assert set(mmd) == {"ddim (trained network)", "ddim (exact score)", "dpm_solver_pp_2m (trained network)",
                        "dpm_solver_pp_2m (exact score)", "ddim (untrained network)", "exact samples (floor)"}
    assert mmd["ddim (trained network)"]["10"] < 0.3 * mmd["ddim (untrained network)"]["10"]
    assert mmd["dpm_solver_pp_2m (exact score)"]["10"] < 0.02 and abs(mmd["exact samples (floor)"]["10"]) < 0.01
    assert len(results["params_sha256"]) == 64 and results["wall_seconds"] > 0
    assert results["steps"] == 1000 == results["steps_trained_here"]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["update"] for line in lines] == list(range(1, 1001))
    assert json.loads((workdir / "config.json").read_text()) == results["config"]
    assert (workdir / "learning_curve.png").stat().st_size > 1000 and (workdir / "samples.png").stat().st_size > 1000


def test_run_killed_after_its_first_chunk_resumes_bit_identically(full_run, tmp_path, monkeypatch):
    workdir, full = full_run
    killed = tmp_path / "killed"
    _, cfg = configure("diffusion_gmm", TINY)

    def die(path, records):  # the process dies after the first chunk's checkpoint, before its metrics line
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(rl.harness, "append_metrics", die)
        with pytest.raises(KeyboardInterrupt):
            diffusion_gmm.run(cfg, str(killed))
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == ["500"]
    assert not (killed / "results.json").exists()

    assert main(["run", "diffusion_gmm", "--workdir", str(killed), *TINY]) == 0
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["steps_trained_here"] == 500  # restored the first chunk, trained only the second
    assert resumed["params_sha256"] == full["params_sha256"]
    assert resumed["mmd2"] == full["mmd2"] and resumed["final_loss"] == full["final_loss"]
    assert (killed / "metrics.jsonl").read_text() == (workdir / "metrics.jsonl").read_text()


@pytest.mark.parametrize("override, message", [
    ("schedule=quadratic", "schedule must be one of ('linear', 'cosine'), got schedule='quadratic'"),
    ("nfes=5,x", "nfes must be comma-separated positive integers, got nfes='5,x'"),
    ("solvers=ddim,rk45", "got solvers='ddim,rk45'"),
    ("num_chunks=0", "num_chunks must lie in [1, steps=10000], got num_chunks=0"),
    ("lr=-1", "lr must be positive, got lr=-1.0"),
])
def test_bad_config_value_is_one_error_before_anything_is_written(tmp_path, capsys, override, message):
    workdir = tmp_path / "never"
    assert_refused_in_one_line(main, ["run", "diffusion_gmm", "--workdir", str(workdir), override], workdir, message,
                               capsys)


def test_experiment_is_registered(capsys):
    assert "diffusion_gmm" in EXPERIMENTS
    assert isinstance(get_experiment("diffusion_gmm").default_config(), diffusion_gmm.DiffusionGMMConfig)
    assert main(["list"]) == 0
    assert any(line.split()[0] == "diffusion_gmm" for line in capsys.readouterr().out.splitlines() if line.split())
