"""The samplers compile once per network (a new set of parameters is a traced input, not a new program) and, given
a mesh, split the samples over its data axis: the result equals the one-device result, stays sharded, and a batch
that does not divide over the devices is one clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.diffusion import networks, samplers
from jaxalign.diffusion.schedules import LinearVP

ROOT = Path(__file__).resolve().parents[3]


def _network(seed: int):
    net = networks.VectorDenoiser(hidden=16, depth=2)
    return net, net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 2)), jnp.ones((1,)))


def test_new_parameters_of_the_same_network_reuse_the_compiled_solver():
    sch, x_T = LinearVP(), jax.random.normal(jax.random.PRNGKey(9), (8, 2))
    net, params_a = _network(0)
    _, params_b = _network(1)
    ts = samplers.make_timesteps(sch, 4)
    out_a = samplers.dpm_solver_pp_2m(networks.model_fn(net.apply, params_a), sch, x_T, ts)
    compiled = samplers._batched._cache_size()
    out_b = samplers.dpm_solver_pp_2m(networks.model_fn(net.apply, params_b), sch, x_T, ts)
    assert samplers._batched._cache_size() == compiled  # the second network's params went in as inputs
    assert not np.allclose(out_a, out_b)  # ... and were used
    closed = lambda x, t: net.apply(params_b, x[None], jnp.reshape(t, (1,)))[0]  # params baked into a closure
    np.testing.assert_allclose(samplers.dpm_solver_pp_2m(closed, sch, x_T, ts), out_b, rtol=1e-5, atol=1e-6)


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxalign.diffusion import networks, samplers
    from jaxalign.diffusion.schedules import LinearVP
    from jaxalign.sharding import MeshConfig, batch_sharding, make_mesh

    sch, mesh = LinearVP(), make_mesh(MeshConfig(data=4))
    net = networks.VectorDenoiser(hidden=16, depth=2)
    model = networks.model_fn(net.apply, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,))))
    x_T = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    report = {"devices": jax.device_count(), "max_diff": {}, "scale": {}}
    for solver, nfe in [("ddim", 4), ("dpm_solver_3", 6), ("dpm_solver_pp_2m", 4)]:
        one = samplers.sample(solver, model, sch, x_T, nfe)
        many = samplers.sample(solver, model, sch, x_T, nfe, mesh=mesh)
        report["max_diff"][solver] = float(jnp.max(jnp.abs(one - many)))
        report["scale"][solver] = float(jnp.max(jnp.abs(one)))
        report["batch_sharded"] = many.sharding.is_equivalent_to(batch_sharding(mesh), 2)
        report["shard_rows"] = sorted({s.data.shape[0] for s in many.addressable_shards})
    ref_one = samplers.reference_ode(model, sch, x_T, steps=20)
    ref_many = samplers.reference_ode(model, sch, x_T, steps=20, mesh=mesh)
    report["max_diff"]["reference_ode"] = float(jnp.max(jnp.abs(ref_one - ref_many)))
    report["scale"]["reference_ode"] = float(jnp.max(jnp.abs(ref_one)))
    try:
        samplers.sample("ddim", model, sch, x_T[:6], 5, mesh=mesh)
    except ValueError as err:
        report["uneven_error"] = str(err)
    json.dump(report, open(sys.argv[1], "w"))
""")


def test_sharded_sampling_over_four_devices_equals_one_device(tmp_path):
    """Four host devices need XLA_FLAGS before jax is imported, hence a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 4
    assert report["batch_sharded"] and report["shard_rows"] == [2]  # 8 samples over 4 devices
    for solver, diff in report["max_diff"].items():
        # Each device integrates its own rows (no reduction across devices), but a 2-row program may vectorise
        # differently from an 8-row one: a few float32 ulps of the samples' magnitude (about 250 with this untrained
        # network, where one ulp is 3e-5), not an absolute 1e-5.
        assert diff <= 8 * np.finfo(np.float32).eps * report["scale"][solver], (solver, diff, report["scale"][solver])
    assert report["uneven_error"] == ("x_T's batch 6 is not divisible by data x fsdp = 4 batch shards of the mesh; "
                                      "expected a multiple of 4")


def test_a_batch_not_dividing_over_the_mesh_is_refused_before_any_work():
    from jaxalign.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=1))
    net, params = _network(0)
    out = samplers.sample("ddim", networks.model_fn(net.apply, params), LinearVP(), jnp.ones((3, 2)), 4, mesh=mesh)
    assert out.shape == (3, 2)  # one device divides every batch
    with pytest.raises(ValueError, match="x_T must be"):
        samplers.sample("ddim", networks.model_fn(net.apply, params), LinearVP(), jnp.ones((2,)), 4, mesh=mesh)
