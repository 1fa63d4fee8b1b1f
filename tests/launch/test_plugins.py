"""Plugins: a module outside the package tree registers an objective and an experiment, and both work through
`jaxalign run`, `sweep` and `local` exactly like built-in ones (each command in a child process, as a user runs it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxalign.plugins import split_plugin_arguments

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = textwrap.dedent('''
    """A user's module: one objective (DPO with an offset) and one experiment that evaluates an objective."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxalign.losses import PairwiseInputs, compute_objective, register
    from jaxalign.registry import register_experiment
    from jaxalign.rundir import RunDir, claim, write_json_atomic


    @register("plugin_offset_dpo")
    def plugin_offset_dpo(inputs: PairwiseInputs, beta: float = 0.1, offset: float = 1.0):
        z_w = inputs.sequence("policy_chosen") - inputs.sequence("reference_chosen")
        z_l = inputs.sequence("policy_rejected") - inputs.sequence("reference_rejected")
        return -jnp.mean(jax.nn.log_sigmoid(beta * (z_w - z_l) - offset)), {}


    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        objective: str = "plugin_offset_dpo"
        offset: float = 1.0
        seed: int = 0


    def run(cfg, workdir):
        keys = jax.random.split(jax.random.key(cfg.seed), 4)
        mask = jnp.ones((8, 5))
        toy = PairwiseInputs(*[-jax.random.uniform(k, (8, 5)) for k in keys], chosen_mask=mask, rejected_mask=mask)
        results = {"loss": float(compute_objective(cfg.objective, toy, beta=0.5, offset=cfg.offset)[0]),
                   "sigmoid": float(compute_objective("sigmoid", toy, beta=0.5)[0]),
                   "processes": jax.process_count()}
        if jax.process_index() == 0:
            claim(cfg, workdir)
            write_json_atomic(RunDir(workdir).results, results)
        return results


    register_experiment("plugin_toy", "a plugin's experiment: an objective on random log-probs", ToyConfig, run)
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user_code") / "my_plugin.py"
    path.write_text(PLUGIN)
    return path


def jaxalign(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "JAXALIGN_PLUGINS"}
    environment.update(JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def test_a_plugin_experiment_and_objective_run_like_built_in_ones(plugin, tmp_path):
    proc = jaxalign("--plugin", str(plugin), "run", "plugin_toy", "--workdir", str(tmp_path / "a"), "offset=0.0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = results(tmp_path / "a")
    assert out["loss"] == pytest.approx(out["sigmoid"], abs=1e-6)  # offset 0 is sigmoid DPO

    # By module name from the current directory (as `python -m` would find it), and through the environment.
    by_name = jaxalign("--plugin", "my_plugin", "run", "plugin_toy", "--workdir", str(tmp_path / "b"),
                       cwd=plugin.parent)
    by_env = jaxalign("run", "plugin_toy", "--workdir", str(tmp_path / "c"), env={"JAXALIGN_PLUGINS": str(plugin)})
    assert by_name.returncode == 0 and by_env.returncode == 0, (by_name.stderr[-2000:], by_env.stderr[-2000:])
    assert results(tmp_path / "b")["loss"] == results(tmp_path / "c")["loss"] > out["loss"]


def test_without_the_plugin_the_names_are_unknown_and_a_broken_plugin_is_one_line(plugin, tmp_path):
    proc = jaxalign("run", "plugin_toy", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2 and "unknown experiment 'plugin_toy'" in proc.stderr
    broken = jaxalign("--plugin", "no_such_module_anywhere", "list")
    lines = [line for line in broken.stderr.splitlines() if line.strip()]
    assert broken.returncode == 2 and len(lines) == 1, broken.stderr
    assert lines[0] == ("jaxalign: error: plugin 'no_such_module_anywhere' could not be loaded: "
                        "ModuleNotFoundError: No module named 'no_such_module_anywhere'")
    assert not (tmp_path / "w").exists()


def test_the_main_job_accepts_a_plugin_objective(plugin):
    check = ("from jaxalign.plugins import load_plugins; from jaxalign.registry import configure; "
             f"load_plugins([{str(plugin)!r}]); "
             "from jaxalign.train.preference import describe_objective; "
             "_, cfg = configure('arith_dpo', ['loss=plugin_offset_dpo', 'dpo.objective_args.offset=0.5']); "
             "print(describe_objective(cfg.dpo))")
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "JAXALIGN_PLUGINS"})
    # its own beta default (not the main job's 2.0) and no chosen-NLL term (the main job's sft_weight=1.0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "plugin_offset_dpo(beta=0.1, offset=0.5); reference: cached"


def test_sweep_points_and_local_processes_import_the_plugin(plugin, tmp_path):
    sweep = jaxalign("--plugin", str(plugin), "sweep", "plugin_toy", "--workdir", str(tmp_path / "sweep"),
                     "offset=0.0,1.0")
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    losses = sorted(results(p)["loss"] for p in (tmp_path / "sweep").iterdir() if (p / "results.json").exists())
    assert len(losses) == 2 and losses[0] < losses[1]

    local = jaxalign("--plugin", str(plugin), "local", "--processes", "2", "run", "plugin_toy", "--workdir",
                     str(tmp_path / "local"))
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    assert results(tmp_path / "local")["processes"] == 2


def test_plugin_options_are_taken_before_the_subcommand_only():
    assert split_plugin_arguments(["--plugin", "a", "--debug", "--plugin=b.py", "run", "x", "--plugin", "c"]) == \
        (["a", "b.py"], ["--debug", "run", "x", "--plugin", "c"])
    with pytest.raises(ValueError, match="--plugin needs"):
        split_plugin_arguments(["--plugin"])


def test_remote_workers_get_the_plugins_by_module_name(monkeypatch):
    """`jaxalign tpu run` / `ssh run` pass JAXALIGN_PLUGINS on to every host; a .py file exists only here."""
    from launch.remote import LaunchError, with_plugins

    monkeypatch.setenv("JAXALIGN_PLUGINS", "my_lab.objectives,my_lab.agents")
    assert with_plugins({"XLA_FLAGS": "x"}) == {"JAXALIGN_PLUGINS": "my_lab.objectives,my_lab.agents", "XLA_FLAGS": "x"}
    monkeypatch.setenv("JAXALIGN_PLUGINS", "/home/me/my_plugin.py")
    with pytest.raises(LaunchError, match="plugin /home/me/my_plugin.py is a file on this machine"):
        with_plugins({})
    monkeypatch.delenv("JAXALIGN_PLUGINS")
    assert with_plugins({}) == {}
