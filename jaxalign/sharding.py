"""Declared sharding: one mesh, one table of logical-axis rules, shardings derived from them.

Parameters carry logical axis names; `LOGICAL_AXIS_RULES` maps each name to mesh axes; train-state and batch
shardings are derived from it, and the step is `jax.jit` with those in/out shardings. Nothing here knows a model:
which config field sizes which logical axis is the model's business (`jaxalign.models.llama.check_model_fits_mesh`).
The same code runs on one CPU, 8 simulated CPU devices, a GPU or a TPU pod. The mesh has three named axes:

- ``data``: pure data parallelism (parameters replicated);
- ``fsdp``: data parallelism with parameters and optimizer state sharded along their ``embed`` dimension
  (ZeRO-3 style; XLA inserts the all-gathers);
- ``tensor``: Megatron-style tensor parallelism over heads, MLP hidden units and the vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.validation import FieldError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one table. Activations' embedding dimension ("embed_act") stays replicated: tensor parallelism splits heads
# and MLP units, and FSDP only shards the stored parameters.
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("embed_act", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three mesh axes. `data=-1` takes every device not used by fsdp and tensor."""

    data: int = -1  # data-parallel axis: the batch is split over it (-1: every device fsdp and tensor leave)
    fsdp: int = 1  # fully sharded data-parallel axis: parameters and optimizer state sharded, batch split too
    tensor: int = 1  # tensor-parallel axis: attention heads and MLP width split over it

    def __post_init__(self):
        for name in MESH_AXES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (
                    value <= 0 and not (name == "data" and value == -1)):
                expected = ("a positive integer or -1 (all remaining devices)" if name == "data"
                            else "a positive integer")
                raise FieldError("mesh", name, value, expected)

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The (data, fsdp, tensor) sizes on `num_devices` devices; a clear error when they do not multiply up."""
        rest = self.fsdp * self.tensor
        data = self.data
        if data == -1:
            if num_devices % rest:
                raise ValueError(
                    f"mesh fsdp={self.fsdp} x tensor={self.tensor} = {rest} does not divide the {num_devices} "
                    f"available devices; choose sizes whose product divides {num_devices}"
                )
            data = num_devices // rest
        if data * rest != num_devices:
            raise ValueError(
                f"mesh data={self.data} x fsdp={self.fsdp} x tensor={self.tensor} = {data * rest} devices, but "
                f"{num_devices} are available; the product of the mesh axes must equal the device count"
            )
        return data, self.fsdp, self.tensor


def make_mesh(mesh_cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_cfg.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_batch_fits_mesh(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(
            f"{what} {batch_size} is not divisible by data x fsdp = {shards} batch shards of the mesh; "
            f"expected a multiple of {shards}"
        )


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree whose leaves may be logically annotated (`nn.LogicallyPartitioned`)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def init_sharded(boxed_init: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh):
    """Run `boxed_init(rng)` under jit so every leaf is created directly in its sharding (never whole on one device).

    Returns (unboxed tree, its shardings).
    """
    abstract = jax.eval_shape(boxed_init, rng)
    shardings = logical_shardings(abstract, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        tree = jax.jit(lambda r: nn.meta.unbox(boxed_init(r)), out_shardings=shardings)(rng)
    return tree, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their leading dimension over data and fsdp, replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a host batch (this process's rows) on the mesh as global arrays.

    Each process passes only its own block of the global batch (`jax.make_array_from_process_local_data`;
    `process_batch_block` says which), so the same call serves one process and many.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def process_batch_block(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """(i, n): this process's devices hold block i of the n equal contiguous blocks of a global batch.

    What each process must load (`data.iterator.batch_at(..., process_index=i, process_count=n)`) follows from the
    mesh, not from the process count: with the batch split over data x fsdp spanning the processes, n is the
    process count; when a tensor axis spans processes instead, the processes sharing a batch block each load it
    (n < process count). One process: (0, 1).
    """
    if jax.process_count() == 1:
        return 0, 1
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    spans = sorted({idx[0].indices(batch_size)[:2] for idx in indices.values()})
    start, stop = spans[0][0], max(end for _, end in spans)
    covered = sum(end - begin for begin, end in spans)
    block = stop - start
    if covered != block or batch_size % block or start % block:
        raise ValueError(f"this process holds rows {spans} of the batch of {batch_size}, not one contiguous block; "
                         f"order the mesh's devices process by process along the batch axes")
    return start // block, batch_size // block


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
