"""Creating a `TrainState` directly in its shardings (never materialised whole on one device)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from jaxalign.models.llama import ModelConfig, init_params
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
    with mesh, nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        if params is None:
            state = jax.jit(lambda a, b: nn.meta.unbox(boxed_state(a, b)), out_shardings=shardings)(init_rng,
                                                                                                      state_rng)
        else:
            extras = nn.meta.unbox(extra_params)
            state = jax.jit(lambda p, b: create({**p, **extras}, b), out_shardings=shardings)(params, state_rng)
    return state, shardings
