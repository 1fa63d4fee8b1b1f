"""`jaxalign run diffusion_preference` on a tiny budget. The vector task (task=vectors): every objective's
fine-tuning changes the parameters (from the base's and every other objective's) and runs end to end,
Diffusion-DPO raises the mean reward above the base's, a re-run skips the finished (seed, objective) units and redoes
a missing one identically, a bad config value is one error line before anything is written, and the experiment is
registered. The shapes task (the default): a tiny UNet and a handful of steps run every objective end to end from
one base, and a re-run skips every unit."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from jaxalign.diffusion import gmm, networks, samplers
from jaxalign.diffusion.schedules import get_schedule
from jaxalign.experiments import diffusion_preference as dp
from jaxalign.experiments.diffusion_kit import DiffusionGMMConfig, init_params, make_network
from jaxalign.registry import EXPERIMENTS, get_experiment
from launch.cli import main
from rl.testing import assert_refused_in_one_line

TINY = ["task=vectors", "seeds=0", "base.steps=600", "base.batch=256", "base.num_chunks=1", "pairs=512", "steps=60",
        "batch=64", "num_chunks=1", "eval_samples=400", "nfe=10", "show_progress=false"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("diffusion_preference") / "full"
    assert main(["run", "diffusion_preference", "--workdir", str(workdir), *TINY]) == 0
    return workdir, json.loads((workdir / "results.json").read_text())


def _unit(workdir, name, seed=0):
    with np.load(workdir / "units" / f"seed_{seed}" / f"{name}.npz") as f:
        return f["samples"], json.loads(str(f["stats"]))


def test_every_objective_runs_end_to_end_and_moves_the_samples(full_run):
    workdir, results = full_run
    assert set(results["objectives"]) == {"base", *dp.OBJECTIVES}
    assert results["units_run"] == 1 + len(dp.OBJECTIVES) and results["units_skipped"] == 0
    base, base_stats = _unit(workdir, "base")
    shas = {base_stats["params_sha256"]}
    for name in dp.OBJECTIVES:
        samples, stats = _unit(workdir, name)
        assert samples.shape == base.shape == (400, 2)
        assert stats["params_sha256"] not in shas, name  # moved from the base, and from every other objective
        shas.add(stats["params_sha256"])
        assert np.isfinite(samples).all() and not np.array_equal(samples, base), name  # same x_T
        assert stats["mmd2_to_base"] > 0 and np.isfinite(stats["final_loss"]), name
    pairs = results["pairs"]["0"]
    assert pairs["kept"] + pairs["ties"] == 512 and pairs["kept"] > 400
    assert results["not_done"] == {}
    d3po = _unit(workdir, "d3po")[1]["d3po_pairs"]
    assert d3po["kept"] + d3po["ties"] == 512 and d3po["kept"] > 400
    assert abs(results["objectives"]["base"]["mmd2_to_base"]["mean"]) < 0.02  # the estimator's floor
    assert (workdir / "samples.png").stat().st_size > 5000
    assert json.loads((workdir / "config.json").read_text()) == results["config"]


def test_diffusion_dpo_raises_the_mean_reward_above_the_base(full_run):
    _, results = full_run
    gain = results["objectives"]["diffusion_dpo"]["reward_gain"]["per_seed"][0]
    assert gain > 0.3, results["table"]


def test_pairs_are_labelled_by_reward_and_ties_dropped():
    a = np.array([[1.0, 1.0], [0.0, 0.0], [-1.0, 0.0]], np.float32)
    b = np.array([[0.0, 0.0], [1.0, 0.5], [0.0, -1.02]], np.float32)
    pairs = dp.label_pairs(a, b, tie_margin=0.05)
    np.testing.assert_array_equal(pairs["x_w"], [[1.0, 1.0], [1.0, 0.5], [-1.0, 0.0]])
    np.testing.assert_array_equal(pairs["x_l"], np.array([[0.0, 0.0], [0.0, 0.0], [0.0, -1.02]], np.float32))
    np.testing.assert_allclose(pairs["r_w"] - pairs["r_l"], [2.0, 1.5, 0.02], rtol=1e-5)
    np.testing.assert_array_equal(pairs["kept"], [True, True, False])  # |r_a - r_b| <= 0.05: a tie


def test_stochastic_ddim_trajectories_and_their_step_logprobs():
    """eta = 0 is DDIM (samplers.ddim at the same timesteps); each step's log-prob is the Gaussian log-density of the
    stored transition up to its constant (scipy)."""
    schedule, mix = get_schedule("linear"), gmm.mixture_2d()
    base = DiffusionGMMConfig(hidden=16, depth=1)
    apply_fn = make_network(base, schedule).apply
    params = init_params(base, schedule, jax.random.key(0))
    x_T = gmm.sample_marginal(mix, schedule, jax.random.key(1), 64, schedule.t_max)
    deterministic = dp.make_trajectory_sampler(apply_fn, dp.stochastic_ddim_plan(schedule, 10, 0.0))
    ddim = samplers.ddim(networks.model_fn(apply_fn, params), schedule, x_T,
                         samplers.make_timesteps(schedule, 10, "logsnr", t_end=1e-3))
    np.testing.assert_allclose(deterministic(params, x_T, jax.random.key(2))[:, -1], ddim, atol=3e-4)

    plan = dp.stochastic_ddim_plan(schedule, 10, 1.0)
    assert np.all(plan["c"] > 0) and np.all(np.diff(plan["c"]) < 0)
    traj = dp.make_trajectory_sampler(apply_fn, plan)(params, x_T, jax.random.key(2))
    assert traj.shape == (64, 11, 2) and np.array_equal(traj[:, 0], x_T)
    logp = dp.step_logprobs(apply_fn, params, plan, traj)
    for i, k in ((3, 4), (10, 0), (50, 9)):
        eps = apply_fn(params, traj[i, k][None], jnp.array([plan["s"][k]]))[0]
        mean = np.asarray(plan["ratio"][k] * traj[i, k] + plan["eps_coef"][k] * eps)
        exact = norm.logpdf(np.asarray(traj[i, k + 1]), mean, plan["c"][k]).sum()
        np.testing.assert_allclose(logp[i, k], exact + 2 * np.log(plan["c"][k] * np.sqrt(2 * np.pi)), rtol=1e-4,
                                   atol=1e-4)


def test_rerun_skips_finished_units_and_redoes_a_missing_one_identically(full_run, tmp_path):
    workdir, full = full_run
    assert main(["run", "diffusion_preference", "--workdir", str(workdir), *TINY]) == 0
    rerun = json.loads((workdir / "results.json").read_text())
    assert rerun["units_run"] == 0 and rerun["units_skipped"] == 1 + len(dp.OBJECTIVES)
    assert rerun["objectives"] == full["objectives"]

    samples, stats = _unit(workdir, "smpo")
    (workdir / "units" / "seed_0" / "smpo.npz").unlink()  # as if the run had been killed during smpo
    assert main(["run", "diffusion_preference", "--workdir", str(workdir), *TINY]) == 0
    resumed = json.loads((workdir / "results.json").read_text())
    assert resumed["units_run"] == 1 and resumed["units_skipped"] == len(dp.OBJECTIVES)
    redone, redone_stats = _unit(workdir, "smpo")
    np.testing.assert_array_equal(redone, samples)  # the restored base, the same keys: the same fine-tuning
    assert redone_stats["reward"] == stats["reward"]


@pytest.mark.parametrize("override, message", [
    ("objectives=diffusion_dpo,kto", "objectives must be distinct comma-separated names"),
    ("objectives=sft,sft", "objectives must be distinct comma-separated names"),
    ("clip_d3po=1", "clip_d3po must lie in (0, 1), got clip_d3po=1.0"),
    ("seeds=0,x", "seeds must be comma-separated integers, got seeds='0,x'"),
    ("beta_dpo=0", "beta_dpo must be positive, got beta_dpo=0.0"),
    ("num_chunks=0", "num_chunks must lie in [1, steps=400], got num_chunks=0"),
    ("base.steps=0", "steps must be a positive integer"),
    ("task=images", "task must be one of ('shapes', 'vectors')"),
    ("shapes.patch=3", "patch must be a positive divisor of 16"),
    ("shapes.objectives=dense_dpo", "objectives must be distinct comma-separated names"),
])
def test_bad_config_value_is_one_error_before_anything_is_written(tmp_path, capsys, override, message):
    workdir = tmp_path / "never"
    assert_refused_in_one_line(main, ["run", "diffusion_preference", "--workdir", str(workdir), override], workdir,
                               message, capsys)


def test_experiment_is_registered(capsys):
    assert "diffusion_preference" in EXPERIMENTS
    default = get_experiment("diffusion_preference").default_config()
    assert isinstance(default, dp.DiffusionPreferenceConfig) and default.task == "shapes"
    assert main(["list"]) == 0
    assert any(line.split()[0] == "diffusion_preference" for line in capsys.readouterr().out.splitlines()
               if line.split())


SHAPES_TINY = ["seeds=0", "shapes.base.steps=4", "shapes.base.batch=4", "shapes.base.channels=4",
               "shapes.base.channel_mult=1", "shapes.base.num_chunks=1", "shapes.pairs=16", "shapes.tie_margin=0",
               "shapes.steps=2", "shapes.batch=4", "shapes.num_chunks=1", "shapes.eval_samples=8", "shapes.nfe=2",
               "shapes.objectives=diffusion_dpo,patch_weighted_dpo,d3po", "show_progress=false"]
SHAPES_TINY_OBJECTIVES = ("diffusion_dpo", "patch_weighted_dpo", "d3po")  # both compiled programs, patch weights


@pytest.mark.slow
def test_shapes_task_runs_its_objectives_from_one_base_and_resumes(tmp_path):
    """Three objectives (each of the two compiled fine-tuning programs, the patch weights): compiling the UNet's
    programs dominates this test's time, and every objective of the switch program shares one compilation."""
    workdir = tmp_path / "shapes"
    assert main(["run", "diffusion_preference", "--workdir", str(workdir), *SHAPES_TINY]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert results["task"] == "shapes" and set(results["objectives"]) == {"base", *SHAPES_TINY_OBJECTIVES}
    assert results["units_run"] == 1 + len(SHAPES_TINY_OBJECTIVES) and set(results["not_done"]) == {"dense_dpo"}
    base, base_stats = _unit(workdir, "base")
    assert base.shape == (8, 16, 16, 3)
    shas = {base_stats["params_sha256"]}
    for name in SHAPES_TINY_OBJECTIVES:
        samples, stats = _unit(workdir, name)
        assert samples.shape == base.shape and np.isfinite(stats["first_loss"]), name
        assert stats["params_sha256"] not in shas, name  # moved from the base and from every other objective
        shas.add(stats["params_sha256"])
    pairs = results["pairs"]["0"]
    assert pairs["kept"] + pairs["ties"] == 16 and pairs["kept"] > 0
    assert (workdir / "samples.png").stat().st_size > 5000 and "| patch_weighted_dpo |" in results["table"]
    assert main(["run", "diffusion_preference", "--workdir", str(workdir), *SHAPES_TINY]) == 0
    rerun = json.loads((workdir / "results.json").read_text())
    assert rerun["units_run"] == 0 and rerun["objectives"] == results["objectives"]


def test_image_pairs_and_patch_weights():
    red = np.full((1, 16, 16, 3), -1.0, np.float32)
    red[0, :4, :4, 0] = 1.0  # a red 4x4 patch in the top-left corner: reward 16 / 256
    black = np.full((1, 16, 16, 3), -1.0, np.float32)
    pairs = dp.label_image_pairs(np.concatenate([black, red]), np.concatenate([red, red]), tie_margin=0.0)
    np.testing.assert_array_equal(pairs["x_w"], np.concatenate([red, red]))
    np.testing.assert_array_equal(pairs["kept"], [True, False])  # equal rewards: a tie
    weights = dp.patch_difference_weights(red, black, 4)
    assert weights.shape == (1, 16) and weights[0, 0] == 16.0 and weights[0, 1:].sum() == 0.0
    np.testing.assert_array_equal(dp.patch_difference_weights(red, red, 4), np.ones((1, 16)))  # no difference
    quality = dp.patch_quality(red, 4)
    assert quality[0, 0] == 1.0 and quality[0, 5] == 0.5  # red patch 1, black patch 1/2
