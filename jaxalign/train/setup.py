"""Creating a `TrainState` directly in its shardings (never materialised whole on one device)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from jaxalign.models.llama import ModelConfig, init_params
from jaxalign.models.lora import LoraConfig, init_lora
from jaxalign.sharding import LOGICAL_AXIS_RULES, logical_shardings
from jaxalign.train.state import TrainState


def sharded_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rng: jax.Array,
                        params: Any = None, track_reference: bool = False,
                        objective_state: Any = None, extra_params: dict | None = None) -> tuple[TrainState, Any]:
    """(state, state shardings) for `cfg` on `mesh`, shardings derived from the parameters' logical axis names.

    Without `params` the parameters are freshly initialised from `rng`; with `params` (e.g. an SFT policy that
    becomes the DPO reference) the state starts from a copy of them in fresh buffers, so donating the state to
    the train step never invalidates the caller's arrays. `track_reference` also keeps a copy of the initial
    parameters in `state.reference` (sharded like the parameters), for a reference that is updated in training;
    `objective_state` (replicated) is a stateful objective's initial state (`step.initial_objective_state`).
    `extra_params` (boxed, e.g. a value head) are added to the parameters beside the model's own.
    """
    extra_params = extra_params or {}
    init_rng, state_rng = jax.random.split(rng)

    def create(p, state_key):
        return TrainState.create(p, tx, state_key, reference=p if track_reference else None,
                                 objective_state=objective_state)

    def boxed_state(init_key, state_key):
        return create({**init_params(cfg, init_key), **extra_params}, state_key)

    shardings = logical_shardings(jax.eval_shape(boxed_state, init_rng, state_rng), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        if params is None:
            state = jax.jit(lambda a, b: nn.meta.unbox(boxed_state(a, b)), out_shardings=shardings)(init_rng,
                                                                                                      state_rng)
        else:
            extras = nn.meta.unbox(extra_params)
            state = jax.jit(lambda p, b: create({**p, **extras}, b), out_shardings=shardings)(params, state_rng)
    return state, shardings


def sharded_lora_train_state(cfg: ModelConfig, lora: LoraConfig, tx: optax.GradientTransformation, mesh: Mesh,
                             rng: jax.Array, objective_state: Any = None) -> tuple[TrainState, Any, Any]:
    """(state, state shardings, base shardings) for training LoRA adapters (Hu et al. 2021) on a frozen `cfg` model.

    The state's params are the adapters only (`init_lora`: A random, B zero, so training starts at the base model),
    created directly in their shardings, which follow the base kernels' logical axes with the rank axis
    replicated; the optimizer state therefore covers the adapters only. The base parameters are not part of the
    state: pass them (placed with the returned base shardings) as `frozen` to a step built from
    `jaxalign.train.step.lora_loss_fn`, where they are both the policy's base and the DPO reference.
    """
    init_rng, state_rng = jax.random.split(rng)
    abstract_base = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))

    def boxed_state(init_key, state_key):
        return TrainState.create(init_lora(abstract_base, lora, init_key), tx, state_key,
                                 objective_state=objective_state)

    shardings = logical_shardings(jax.eval_shape(boxed_state, init_rng, state_rng), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        state = jax.jit(lambda a, b: nn.meta.unbox(boxed_state(a, b)), out_shardings=shardings)(init_rng, state_rng)
    return state, shardings, logical_shardings(abstract_base, mesh)
