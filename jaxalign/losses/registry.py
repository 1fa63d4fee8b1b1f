"""The objective registry and the inputs objectives receive.

Every objective is a pure function `fn(inputs, **hyper_parameters) -> (loss, metrics)` (DESIGN.md principle 2).
What `inputs` is depends on the objective's family:

- "pairwise" and "reference_free": `PairwiseInputs` (one chosen and one rejected completion per prompt);
- "unpaired": `UnpairedInputs` (single completions with a desirable/undesirable label, KTO-style);
- "listwise": `ListwiseInputs` (K scored completions per prompt).

Objectives that read more than log-probs (rewards, embeddings, values, hidden states, a guidance policy's
log-probs) take them from `inputs.extras` under the names they declare in `register(..., extras=...)`, so a trainer
can ask the registry what to compute before calling the objective.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
FAMILIES = ("pairwise", "reference_free", "unpaired", "listwise")


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """What a trainer needs to know about a registered objective.

    needs_reference: reads the reference log-probs (reference-free objectives do not, so no reference pass is run).
    extras: names of the arrays it reads from `inputs.extras` (beyond log-probs and masks).
    batch_coupled: the per-example losses depend on other examples of the batch (a sort over the batch, a batch
        token mean, a batch KL estimate); gradient accumulation then equals the large batch only approximately.
    """

    name: str
    fn: Objective
    family: str = "pairwise"
    needs_reference: bool = True
    extras: tuple[str, ...] = ()
    batch_coupled: bool = False


OBJECTIVES: dict[str, Objective] = {}
SPECS: dict[str, ObjectiveSpec] = {}


@flax.struct.dataclass
class PairwiseInputs:
    """Per-token log-probs [pairs, time] (zero outside the masks) and completion masks for a batch of pairs.

    `reference_*` are the frozen reference model's log-probs (precomputed or from an online forward pass).
    `extras` holds any further per-pair arrays an objective declares (e.g. "reward_margin" [pairs]).
    """

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    reference_chosen: jax.Array
    reference_rejected: jax.Array
    chosen_mask: jax.Array
    rejected_mask: jax.Array
    extras: dict[str, jax.Array] = flax.struct.field(default_factory=dict)

    def sequence(self, which: str) -> jax.Array:
        """Summed completion log-prob L(y) of one of the four log-prob arrays, e.g. 'policy_chosen'."""
        mask = self.chosen_mask if which.endswith("chosen") else self.rejected_mask
        return jnp.sum(getattr(self, which) * mask, axis=-1)


@flax.struct.dataclass
class UnpairedInputs:
    """Single completions with a binary label (KTO, BCO, DRO): per-token log-probs [n, time], completion mask
    [n, time], `desirable` [n] (1.0 desirable / chosen, 0.0 undesirable / rejected)."""

    policy: jax.Array
    reference: jax.Array
    mask: jax.Array
    desirable: jax.Array
    extras: dict[str, jax.Array] = flax.struct.field(default_factory=dict)

    def sequence(self, which: str) -> jax.Array:
        """L(y) of 'policy' or 'reference', shape [n]."""
        return jnp.sum(getattr(self, which) * self.mask, axis=-1)


@flax.struct.dataclass
class ListwiseInputs:
    """K candidate completions per prompt: per-token log-probs [prompts, K, time], completion masks [prompts, K,
    time], scores [prompts, K] (higher is better; e.g. the oracle's graded score) and `valid` [prompts, K] (1 where
    a candidate exists, so lists of unequal length share one array)."""

    policy: jax.Array
    reference: jax.Array
    mask: jax.Array
    scores: jax.Array
    valid: jax.Array
    extras: dict[str, jax.Array] = flax.struct.field(default_factory=dict)

    def sequence(self, which: str) -> jax.Array:
        """L(y) of 'policy' or 'reference', shape [prompts, K]."""
        return jnp.sum(getattr(self, which) * self.mask, axis=-1)


def unpair(inputs: PairwiseInputs) -> UnpairedInputs:
    """View a batch of pairs as 2*pairs labelled completions (chosen desirable, rejected undesirable), as TRL does
    to train KTO/BCO on paired data. Completions are padded to the longer of the two time axes."""
    width = max(inputs.chosen_mask.shape[-1], inputs.rejected_mask.shape[-1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[-1])))  # noqa: E731
    cat = lambda a, b: jnp.concatenate([pad(a), pad(b)], axis=0)  # noqa: E731
    pairs = inputs.chosen_mask.shape[0]
    return UnpairedInputs(
        policy=cat(inputs.policy_chosen, inputs.policy_rejected),
        reference=cat(inputs.reference_chosen, inputs.reference_rejected),
        mask=cat(inputs.chosen_mask, inputs.rejected_mask),
        desirable=jnp.concatenate([jnp.ones((pairs,), jnp.float32), jnp.zeros((pairs,), jnp.float32)]),
        extras=dict(inputs.extras),
    )


def register(name: str, family: str = "pairwise", needs_reference: bool | None = None, extras: tuple[str, ...] = (),
             batch_coupled: bool = False) -> Callable[[Objective], Objective]:
    """Add an objective to the registry under `name` (a clear error on a duplicate name or unknown family).

    needs_reference defaults to False for the "reference_free" family and True otherwise."""
    if family not in FAMILIES:
        raise ValueError(f"objective {name!r}: family must be one of {FAMILIES}, got {family!r}")
    if needs_reference is None:
        needs_reference = family != "reference_free"

    def add(fn: Objective) -> Objective:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered by {OBJECTIVES[name].__module__}")
        OBJECTIVES[name] = fn
        SPECS[name] = ObjectiveSpec(name, fn, family, needs_reference, tuple(extras), batch_coupled)
        return fn

    return add


def get_objective(name: str) -> Objective:
    return get_spec(name).fn


def get_spec(name: str) -> ObjectiveSpec:
    if name not in SPECS:
        raise ValueError(f"unknown objective {name!r}; registered objectives: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def compute_objective(name: str, inputs: Any, **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Evaluate the registered objective `name` on `inputs`; keyword arguments are its hyper-parameters."""
    return get_objective(name)(inputs, **kwargs)
