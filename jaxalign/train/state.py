"""The training state: one explicit pytree holding everything a resumed run needs.

State is an explicit pytree (params, optimizer state, step, rng, data position); nothing mutates itself. A
checkpoint of a `TrainState` is therefore a complete description of a run in progress. The data position is the
data layer's (`jaxalign.data.position`): the iterators produce it, the state only stores it.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxalign.data.position import DataPosition


@flax.struct.dataclass
class TrainState:
    """Params, optimizer state, step counter, PRNG key and data position of one training run.

    `reference` is None for a fixed (or no) reference model; it holds the reference parameters when the reference
    changes during training (TR-DPO's periodic sync), so that it is checkpointed with everything else.
    `objective_state` is None or the state a stateful objective carries across steps (BCO's running baseline).
    `tx` (the optax transformation) is static: it is rebuilt from the config on resume and is never checkpointed.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    data: DataPosition
    tx: Any = flax.struct.field(pytree_node=False)
    reference: Any = None
    objective_state: Any = None

    @classmethod
    def create(cls, params: Any, tx: Any, rng: jax.Array, reference: Any = None,
               objective_state: Any = None) -> "TrainState":
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            data=DataPosition.start(),
            tx=tx,
            reference=reference,
            objective_state=objective_state,
        )

    def apply_gradients(self, grads: Any, data: DataPosition | None = None) -> "TrainState":
        """One optimizer update; `data` is the iterator position after the batch these gradients came from."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(
            step=self.step + 1,
            params=params,
            opt_state=opt_state,
            data=self.data if data is None else data,
        )
