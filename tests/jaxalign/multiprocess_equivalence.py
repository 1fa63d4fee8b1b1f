"""Runner for tests/jaxalign/test_distributed.py: the real sharded train step on meshes spanning 2 processes.

    JAXALIGN_COORDINATOR_ADDRESS=127.0.0.1:PORT JAXALIGN_NUM_PROCESSES=2 JAXALIGN_PROCESS_ID=I \
    JAXALIGN_LOCAL_DEVICE_COUNT=2 JAX_PLATFORMS=cpu python multiprocess_equivalence.py OUT MESH[,MESH...]

Every process joins through `jaxalign.distributed.initialize_from_env`, then for the fixed parameters and batches
of `sharding_equivalence.py` (the single-process runner) runs `jit_train_step(make_train_step(...))` (SFT with 2
accumulation steps, DPO with an online frozen reference) once on ONE local device and once on each global MESH
(DATAxFSDPxTENSOR over all processes' devices; each process puts only its own rows of the batch). Process 0 writes
`<objective>_<mesh>.npz` (loss, grad_norm, every gradient and updated parameter, gathered) and `1x1x1` for the
single-device run; the test compares them. This script asserts nothing itself.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxalign.data.position import DataPosition  # noqa: E402
from jaxalign.distributed import host_local, initialize_from_env  # noqa: E402

initialize_from_env()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import sharding_equivalence as se  # noqa: E402
from jaxalign.models.llama import DecoderLM, init_params  # noqa: E402
from jaxalign.sharding import MeshConfig, logical_shardings, make_mesh, process_batch_block, put_batch  # noqa: E402
from jaxalign.train.state import TrainState  # noqa: E402
from jaxalign.train.step import dpo_loss_fn, jit_train_step, make_train_step, sft_loss_fn  # noqa: E402


def global_put(tree, shardings):
    """Host values (identical in every process) as global arrays: each process fills only its own shards."""

    def put(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their raw data, replicated
            data = np.asarray(jax.random.key_data(x))
            replicated = NamedSharding(sharding.mesh, P())
            return jax.random.wrap_key_data(jax.make_array_from_callback(data.shape, replicated, lambda i: data[i]))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def process_rows(batch: dict, mesh) -> dict:
    """This process's block of the global batch (what `data.iterator.batch_at` hands it in the train loop)."""
    i, n = process_batch_block(mesh, len(next(iter(batch.values()))))
    return {k: v[i * len(v) // n : (i + 1) * len(v) // n] for k, v in batch.items()}


def step_once(mesh, objective: str, local: bool) -> dict:
    cfg = se.MHA
    model = DecoderLM(cfg)
    loss_fn, accum = {"sft": (sft_loss_fn(model), se.SFT_ACCUM), "dpo": (dpo_loss_fn(model, beta=0.5), 1)}[objective]
    abstract = jax.eval_shape(lambda r: TrainState.create(init_params(cfg, r), se.TX, r), jax.random.key(0))
    shardings = logical_shardings(abstract, mesh)
    host_state = TrainState.create(se.fixed_params(cfg, 0), se.TX, jax.random.key(0))
    state = global_put(host_state, shardings)
    frozen = global_put(se.fixed_params(cfg, 1), shardings.params) if objective == "dpo" else None
    data = se.batches()[objective]
    batch = put_batch(data if local else process_rows(data, mesh), mesh)
    step = jit_train_step(make_train_step(loss_fn, accum), mesh, shardings,
                          shardings.params if objective == "dpo" else None)
    new_state, metrics = step(state, frozen, batch, DataPosition.start())
    grads, params = host_local(new_state.opt_state[0]), host_local(new_state.params)
    return {"loss": np.asarray(jax.device_get(metrics["loss"])),
            "grad_norm": np.asarray(jax.device_get(metrics["grad_norm"])),
            "devices": np.asarray(mesh.devices.size), "block": np.asarray(process_batch_block(mesh, 16)),
            **se.flat(grads, "grad"), **se.flat(params, "param")}


def main(out_dir: str, meshes: list[tuple[int, int, int]]) -> None:
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    for objective in ("sft", "dpo"):
        runs = {"1x1x1": step_once(make_mesh(MeshConfig(1, 1, 1), jax.local_devices()[:1]), objective, True)}
        for shape in meshes:
            runs["x".join(map(str, shape))] = step_once(make_mesh(MeshConfig(*shape)), objective, False)
        if jax.process_index() == 0:
            for tag, arrays in runs.items():
                np.savez(os.path.join(out_dir, f"{objective}_{tag}.npz"), **arrays)
        print(f"process {jax.process_index()}: {objective} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [tuple(int(n) for n in mesh.split("x")) for mesh in sys.argv[2].split(",")])
