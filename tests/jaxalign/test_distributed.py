"""Tests for `jaxalign.distributed`: the JAXALIGN_* environment contract (parsing and its errors), and the real
sharded train step on meshes that span two processes (jax.distributed on localhost, gloo collectives) giving the
single-device loss, gradients and updated parameters.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxalign import distributed as d
from launch.local import free_port

SCRIPT = Path(__file__).with_name("multiprocess_equivalence.py")
REPO = Path(__file__).resolve().parents[2]
# Process 0's block of the batch on each mesh (2 processes x 2 devices): data x fsdp, both across processes
# (parameters sharded across processes); tensor across processes (both processes feed the whole batch).
MESHES = {"2x2x1": (0, 2), "1x1x4": (0, 1)}
RTOL = 1e-5
TIMEOUT_S = 300

GOOD = {d.COORDINATOR_ADDRESS: "127.0.0.1:1234", d.NUM_PROCESSES: "2", d.PROCESS_ID: "1"}


def test_nothing_set_is_a_single_process_and_initialize_does_nothing():
    env = d.parse_env({})
    assert not env.multi_process and env.local_device_count is None
    assert d.initialize_from_env({}) == env  # returns before importing anything that touches devices


def test_explicit_coordinates_are_parsed():
    env = d.parse_env({**GOOD, d.LOCAL_DEVICE_COUNT: "4", d.INITIALIZATION_TIMEOUT: "30"})
    assert env == d.DistributedEnv("127.0.0.1:1234", 2, 1, 4, 30, False) and env.multi_process
    assert d.parse_env({**GOOD, d.COORDINATOR_ADDRESS: "[::1]:80"}).coordinator_address == "[::1]:80"


def test_auto_and_device_count_alone():
    assert d.parse_env({d.DISTRIBUTED: "auto"}) == d.DistributedEnv(auto=True)
    alone = d.parse_env({d.LOCAL_DEVICE_COUNT: "2"})
    assert alone.local_device_count == 2 and not alone.multi_process


@pytest.mark.parametrize("environ, expected", [
    ({**GOOD, d.NUM_PROCESSES: "two"}, ["JAXALIGN_NUM_PROCESSES='two'", "not an integer"]),
    ({**GOOD, d.NUM_PROCESSES: "0"}, ["JAXALIGN_NUM_PROCESSES='0'", ">= 1"]),
    ({**GOOD, d.PROCESS_ID: "-1"}, ["JAXALIGN_PROCESS_ID='-1'", ">= 0"]),
    ({**GOOD, d.PROCESS_ID: "2"}, ["JAXALIGN_PROCESS_ID='2'", "below JAXALIGN_NUM_PROCESSES='2'"]),
    ({**GOOD, d.COORDINATOR_ADDRESS: "localhost"}, ["JAXALIGN_COORDINATOR_ADDRESS='localhost'", "host:port"]),
    ({**GOOD, d.COORDINATOR_ADDRESS: "host:99999"}, ["JAXALIGN_COORDINATOR_ADDRESS='host:99999'", "1-65535"]),
    ({**GOOD, d.COORDINATOR_ADDRESS: ":80"}, ["JAXALIGN_COORDINATOR_ADDRESS=':80'"]),
    ({d.NUM_PROCESSES: "2"}, ["JAXALIGN_NUM_PROCESSES='2' set", "JAXALIGN_COORDINATOR_ADDRESS, JAXALIGN_PROCESS_ID",
                              "missing"]),
    ({**GOOD, d.LOCAL_DEVICE_COUNT: "0"}, ["JAXALIGN_LOCAL_DEVICE_COUNT='0'", ">= 1"]),
    ({**GOOD, d.INITIALIZATION_TIMEOUT: "1.5"}, ["JAXALIGN_INITIALIZATION_TIMEOUT='1.5'", "not an integer"]),
    ({d.DISTRIBUTED: "yes"}, ["JAXALIGN_DISTRIBUTED='yes'", "'auto'"]),
    ({**GOOD, d.DISTRIBUTED: "auto"}, ["JAXALIGN_DISTRIBUTED=auto", "unset JAXALIGN_COORDINATOR_ADDRESS"]),
])
def test_bad_values_are_one_error_naming_the_variable_and_value(environ, expected):
    with pytest.raises(d.DistributedConfigError) as error:
        d.parse_env(environ)
    for part in expected:
        assert part in str(error.value)


def test_device_count_flag_replaces_an_existing_one():
    assert d.with_device_count("", 2) == "--xla_force_host_platform_device_count=2"
    flags = d.with_device_count("--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8", 3)
    assert flags == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=3"


def test_initialize_after_jax_started_is_a_clear_error():
    import jax

    jax.devices()  # this pytest process's backend exists now
    with pytest.raises(RuntimeError, match="before JAX creates its devices"):
        d.initialize_from_env({d.LOCAL_DEVICE_COUNT: "2"})


def test_bad_environment_is_one_line_from_jaxalign_run():
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{**GOOD, d.PROCESS_ID: "5"})
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "run", "arith_dpo", "--workdir", "unused"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "jaxalign: error: JAXALIGN_PROCESS_ID='5' must be below JAXALIGN_NUM_PROCESSES='2'"]


# ---------------------------------------------------------------------------------------------------------------
# Sharded = unsharded across processes.


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the two processes of `multiprocess_equivalence.py` (2 CPU devices each) and load what process 0 wrote."""
    out = tmp_path_factory.mktemp("multiprocess_equivalence")
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
            "PYTHONPATH", "")]), XLA_FLAGS="--xla_backend_optimization_level=0",
            **{d.COORDINATOR_ADDRESS: address, d.NUM_PROCESSES: "2", d.PROCESS_ID: str(i),
               d.LOCAL_DEVICE_COUNT: "2"})
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(out), ",".join(MESHES)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:  # wait for both before asserting, so neither is left running
        try:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"multiprocess_equivalence.py did not finish in {TIMEOUT_S} s")
    for i, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} failed:\n{output[-3000:]}"
    return {f.stem: dict(np.load(f)) for f in out.glob("*.npz")}


@pytest.mark.parametrize("objective", ["sft", "dpo"])
@pytest.mark.parametrize("mesh", MESHES)
def test_two_process_mesh_gives_the_single_device_loss_and_gradients(results, objective, mesh):
    """The jitted train step (SFT with 2 accumulation steps / DPO with an online reference) on a mesh of 2
    processes x 2 devices, each process feeding only its block of the batch (`process_batch_block`), gives the
    single-device loss, gradient norm, every gradient entry and updated parameter (fp32, rtol 1e-5; atol 1e-5 of
    each array's largest entry)."""
    got, expected = results[f"{objective}_{mesh}"], results[f"{objective}_1x1x1"]
    assert int(got["devices"]) == 4 and int(expected["devices"]) == 1
    assert tuple(got["block"]) == MESHES[mesh] and tuple(expected["block"]) == (0, 1)
    assert set(got) == set(expected)
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=RTOL)
    np.testing.assert_allclose(got["grad_norm"], expected["grad_norm"], rtol=RTOL)
    keys = [k for k in expected if k.startswith(("grad[", "param["))]
    assert len(keys) >= 18
    for key in keys:
        scale = float(np.max(np.abs(expected[key])))
        np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, atol=RTOL * scale, err_msg=key)
    assert float(expected["grad_norm"]) > 1e-3  # a real gradient, not zeros on both sides


def test_process_zero_writes_the_shared_metrics_log_and_others_keep_their_own():
    from jaxalign.train.loop import process_log_path

    assert process_log_path("/w/metrics.jsonl", 0) == "/w/metrics.jsonl"
    assert process_log_path("/w/metrics.jsonl", 3) == "/w/logs/metrics.process_3.jsonl"

