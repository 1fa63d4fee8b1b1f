"""Tests for jaxalign.sharding: the same loss and gradients on every mesh shape (the project's mesh-equivalence
test), parameters and batches sharded as the logical rules declare, state donation, and clear errors for meshes
and models that do not fit.

The multi-device part needs XLA_FLAGS before jax is imported, so `sharding_equivalence.py` (next to this file) runs
the real sharded train step in subprocesses with 8 simulated CPU devices and saves what it computed; the tests
below load those results and assert.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh

from jaxalign.sharding import MeshConfig, check_batch_fits_mesh, make_mesh

SCRIPT = Path(__file__).with_name("sharding_equivalence.py")
REPO = Path(__file__).resolve().parents[2]
REFERENCE = "1x1x1"  # one device, no sharding at all
# Subprocess jobs (config, meshes), run concurrently. mha (8 heads, 8 kv heads) fits every mesh including tensor=8;
# gqa (8 heads, 2 kv heads, scanned layers) fits tensor <= 2, and on (2,2,2) has data, fsdp and tensor all > 1
# (with tensor = 1 its kv heads are not sharded, so 8x1x1 / 1x8x1 would repeat what mha checks).
JOBS = (
    ("mha", (REFERENCE, "8x1x1", "1x8x1")),
    ("mha", ("1x1x8", "2x2x2", "2x1x4")),
    ("gqa", (REFERENCE, "2x2x2")),
)
RUNS = [(config, objective, mesh) for config, meshes in JOBS for mesh in meshes if mesh != REFERENCE
        for objective in ("sft", "dpo")]
RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every job (concurrently: compilation is mostly single-threaded) and load what they wrote; ~16
    compilations of a tiny model's train step in all."""
    root = tmp_path_factory.mktemp("sharding_equivalence")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    # O0 backend codegen halves compile time; every mesh, the reference included, is compiled the same way.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                        " --xla_backend_optimization_level=0").strip()
    procs = []
    for index, (config, meshes) in enumerate(JOBS):
        out = root / f"job{index}"
        out.mkdir()
        command = [sys.executable, str(SCRIPT), str(out), config, ",".join(meshes)]
        command += ["--errors"] if index == 0 else []
        procs.append((out, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)))
    outputs = []
    for out, proc in procs:  # wait for every job before asserting, so none is left running
        try:
            outputs.append(proc.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            proc.kill()
            outputs.append(proc.communicate())
    loaded = {"errors": None}
    for (out, proc), (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, f"{SCRIPT.name} failed (rc {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
        job = {}
        for path in out.glob("*.npz"):
            with np.load(path) as data:
                job[path.stem] = {"arrays": dict(data), "facts": json.loads(path.with_suffix(".json").read_text())}
        loaded[out.name] = job
        if (out / "errors.json").exists():
            loaded["errors"] = json.loads((out / "errors.json").read_text())
    return loaded


def run_result(results, config, objective, mesh):
    """(this run, the single-device run of the same config and objective)."""
    runs = {tag: run for name, job in results.items() if name != "errors" for tag, run in job.items()}
    tag, reference = f"{config}_{objective}_{mesh}", f"{config}_{objective}_{REFERENCE}"
    assert tag in runs and reference in runs, f"missing {tag} or {reference}; have {sorted(runs)}"
    return runs[tag], runs[reference]


# ---------------------------------------------------------------------------------------------------------------
# Mesh equivalence.


@pytest.mark.parametrize("config, objective, mesh", RUNS, ids=["-".join(r) for r in RUNS])
def test_loss_and_gradients_on_the_mesh_equal_the_single_device_ones(results, config, objective, mesh):
    """The jitted, sharded train step (SFT with 2 accumulation steps / DPO with an online reference) gives the same
    loss, gradient norm, every gradient entry and updated parameter on this mesh as on one device (fp32, rtol 1e-5;
    atol 1e-5 of each array's largest entry for entries that cancel to ~0)."""
    run, single = run_result(results, config, objective, mesh)
    assert run["facts"]["devices"] == 8 and single["facts"]["devices"] == 1
    got, expected = run["arrays"], single["arrays"]
    assert set(got) == set(expected)
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=RTOL)
    np.testing.assert_allclose(got["grad_norm"], expected["grad_norm"], rtol=RTOL)
    grads = [k for k in expected if k.startswith("grad[")]
    assert len(grads) >= 9
    for key in grads + [k for k in expected if k.startswith("param[")]:
        scale = float(np.max(np.abs(expected[key])))
        np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, atol=RTOL * scale, err_msg=key)
    assert float(expected["grad_norm"]) > 1e-3  # a real gradient, not zeros on both sides


# ---------------------------------------------------------------------------------------------------------------
# Declared sharding.

# Logical names (models/llama.py) mapped by LOGICAL_AXIS_RULES: embed->fsdp, heads/kv_heads/mlp/vocab->tensor.
EXPECTED_SPECS = {
    "q_kernel": ["fsdp", "tensor", None],  # (embed, heads, head_dim)
    "k_kernel": ["fsdp", "tensor", None],  # (embed, kv_heads, head_dim)
    "mlp_down": ["tensor", "fsdp"],  # (mlp, embed)
    "embedding": ["tensor", "fsdp"],  # (vocab, embed)
    "embedding_grad": ["tensor", "fsdp"],
}


def expected_shard_shape(shape, spec, mesh):
    dims = []
    for size, axis in zip(shape, list(spec) + [None] * (len(shape) - len(spec))):
        axes = [] if axis is None else ([axis] if isinstance(axis, str) else axis)
        dims.append(size // int(np.prod([mesh[a] for a in axes])))
    return dims


@pytest.mark.parametrize("config, objective, mesh", RUNS, ids=["-".join(r) for r in RUNS])
def test_parameters_and_batch_are_sharded_as_the_rules_declare(results, config, objective, mesh):
    """After the step, parameters, gradients and the batch carry the shardings derived from the logical rules, and
    each device holds only its slice (batch rows split over data x fsdp, replicated over tensor)."""
    facts = run_result(results, config, objective, mesh)[0]["facts"]
    for name, spec in EXPECTED_SPECS.items():
        if config == "gqa" and name in ("q_kernel", "k_kernel", "mlp_down"):
            spec = [None] + spec  # scanned layers: leading 'layers' axis, never sharded
        assert facts[name]["spec"] == spec, f"{name}: {facts[name]['spec']} != {spec}"
        assert facts[name]["shard_shape"] == expected_shard_shape(facts[name]["shape"], spec, facts["mesh"]), name
    shards = facts["mesh"]["data"] * facts["mesh"]["fsdp"]
    for key, batch in facts["batch"].items():
        assert batch["spec"] == [["data", "fsdp"]], key
        assert batch["shard_shape"] == [batch["shape"][0] // shards] + batch["shape"][1:], key
    assert facts["adam_moments_sharded_like_params"]


def test_the_models_activation_constraints_are_in_every_compiled_step(results):
    """The model's logical activation constraints (residual stream, logits; the microbatch split) reach the
    compiled step on every mesh, the same number as on one device: they were silently dropped while steps ran
    under the deprecated `with mesh:` (and the runner fails on that DeprecationWarning)."""
    for config, objective, mesh in RUNS:
        run, single = run_result(results, config, objective, mesh)
        assert run["facts"]["activation_constraints"] == single["facts"]["activation_constraints"] > 0


def test_concrete_shard_shapes_on_tensor_and_fsdp_meshes(results):
    """Spot checks in numbers: on (1,1,8) the q kernel's 8 heads and the 64-token vocabulary split over tensor; on
    (1,8,1) the 32-wide embedding dimension splits over fsdp; on (2,2,2) the GQA model's 2 kv heads split in two."""
    tensor8 = run_result(results, "mha", "sft", "1x1x8")[0]["facts"]
    assert tensor8["q_kernel"]["shape"] == [32, 8, 4] and tensor8["q_kernel"]["shard_shape"] == [32, 1, 4]
    assert tensor8["embedding"]["shard_shape"] == [8, 32]
    fsdp8 = run_result(results, "mha", "sft", "1x8x1")[0]["facts"]
    assert fsdp8["embedding"]["shard_shape"] == [64, 4]
    assert fsdp8["q_kernel"]["shard_shape"] == [4, 8, 4]
    assert fsdp8["batch"]["tokens"]["shard_shape"] == [2, 8]  # 16 rows over 8 fsdp shards
    gqa = run_result(results, "gqa", "dpo", "2x2x2")[0]["facts"]
    assert gqa["k_kernel"]["shape"] == [2, 32, 2, 4] and gqa["k_kernel"]["shard_shape"] == [2, 16, 1, 4]
    assert gqa["batch"]["chosen_tokens"]["shard_shape"] == [2, 8]  # 8 pairs over data x fsdp = 4 shards


@pytest.mark.parametrize("config, objective, mesh", RUNS + [("mha", "sft", REFERENCE)],
                         ids=["-".join(r) for r in RUNS + [("mha", "sft", REFERENCE)]])
def test_jitted_step_donates_the_input_state(results, config, objective, mesh):
    """jit_train_step donates the state: the buffers of the parameters, step counter and rng passed in are deleted
    after the call (updated in place). Leaves the step never reads (the old data position, which it replaces, and
    this test's pass-through optimizer state) are pruned by jit and so are not donated."""
    deleted = run_result(results, config, objective, mesh)[0]["facts"]["donated_state_deleted"]
    read = {path: gone for path, gone in deleted.items()
            if path.startswith(".params") or path in (".step", ".rng")}
    assert len(read) >= 11, sorted(deleted)
    kept = [path for path, gone in read.items() if not gone]
    assert not kept, f"{len(kept)} of {len(read)} donated state buffers survived the call: {kept}"


# ---------------------------------------------------------------------------------------------------------------
# Errors.


def test_mesh_that_does_not_match_the_device_count_names_sizes_and_devices():
    """A mesh whose axes do not multiply up to the device count fails with the sizes and the device count."""
    with pytest.raises(ValueError, match=r"data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are available"):
        MeshConfig(data=3).shape(8)
    with pytest.raises(ValueError, match=r"fsdp=3 x tensor=1 = 3 does not divide the 8 available devices"):
        MeshConfig(fsdp=3).shape(8)
    count = len(__import__("jax").devices())
    with pytest.raises(ValueError, match=rf"= {count + 1} devices, but {count} are available"):
        make_mesh(MeshConfig(data=count + 1))


@pytest.mark.parametrize("bad", [{"data": 0}, {"fsdp": -1}, {"tensor": 1.5}])
def test_mesh_config_rejects_non_positive_sizes(bad):
    """Mesh sizes must be positive integers (data may be -1 = all remaining devices); the error names the axis."""
    with pytest.raises(ValueError, match=rf"mesh\.{next(iter(bad))} must be"):
        MeshConfig(**bad)


def test_batch_that_does_not_fit_the_batch_axes_names_the_shard_count():
    """A batch not divisible by data x fsdp fails with the batch size and the number of batch shards."""
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by data x fsdp = 4"):
        check_batch_fits_mesh(6, AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")))


def test_errors_on_a_real_eight_device_mesh(results):
    """The same messages with 8 real (simulated) devices: make_mesh with data=3 or fsdp=3, and the GQA model's 2
    kv heads on a tensor axis of 8."""
    errors = results["errors"]
    assert "data=3" in errors["mesh_3_devices"] and "8 are available" in errors["mesh_3_devices"]
    assert "fsdp=3" in errors["mesh_fsdp_3"] and "8 available devices" in errors["mesh_fsdp_3"]
    error = errors["kv_heads_tensor_8"]
    assert error is not None and "model.n_kv_heads=2" in error and "size 8" in error
