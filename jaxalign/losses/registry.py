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

from jaxalign.losses import modifiers as _modifiers

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
FAMILIES = ("pairwise", "reference_free", "unpaired", "listwise")


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """What a trainer needs to know about a registered objective.

    needs_reference: reads the reference log-probs (reference-free objectives do not, so no reference pass is run).
    extras: names of the arrays it reads from `inputs.extras` (beyond log-probs and masks).
    batch_coupled: the per-example losses depend on other examples of the batch (a sort over the batch, a batch
        token mean, a batch KL estimate); gradient accumulation then equals the large batch only approximately.
    modifiers: the TRL-style loss modifiers the objective accepts through `compute_objective` (a subset of
        `modifiers.MODIFIERS`): "f_divergence" (fn takes keyword arguments f_divergence, f_alpha), "ld_alpha" (fn
        takes ld_alpha), "wpo" (fn takes pair_weights, multiplying each pair's loss before the batch mean).
    """

    name: str
    fn: Objective
    family: str = "pairwise"
    needs_reference: bool = True
    extras: tuple[str, ...] = ()
    batch_coupled: bool = False
    modifiers: tuple[str, ...] = ()


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
             batch_coupled: bool = False, modifiers: tuple[str, ...] = ()) -> Callable[[Objective], Objective]:
    """Add an objective to the registry under `name` (a clear error on a duplicate name or unknown family).

    needs_reference defaults to False for the "reference_free" family and True otherwise. `modifiers` lists the
    loss modifiers (`modifiers.MODIFIERS`) the objective implements; see `ObjectiveSpec`."""
    if family not in FAMILIES:
        raise ValueError(f"objective {name!r}: family must be one of {FAMILIES}, got {family!r}")
    unknown = [m for m in modifiers if m not in _modifiers.MODIFIERS]
    if unknown:
        raise ValueError(
            f"objective {name!r}: unknown modifiers {unknown}; expected a subset of {_modifiers.MODIFIERS}"
        )
    if needs_reference is None:
        needs_reference = family != "reference_free"

    def add(fn: Objective) -> Objective:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered by {OBJECTIVES[name].__module__}")
        OBJECTIVES[name] = fn
        SPECS[name] = ObjectiveSpec(name, fn, family, needs_reference, tuple(extras), batch_coupled, tuple(modifiers))
        return fn

    return add


def get_objective(name: str) -> Objective:
    return get_spec(name).fn


def get_spec(name: str) -> ObjectiveSpec:
    if name not in SPECS:
        raise ValueError(f"unknown objective {name!r}; registered objectives: {', '.join(sorted(SPECS))}")
    return SPECS[name]


_MODIFIER_REASONS = {
    "f_divergence": "the f-DPO reparameterisation leaves a beta*log Z(x) term that cancels only in a chosen-minus-"
    "rejected reward difference (TRL 1.16.0 allows it only for such losses)",
    "ld_alpha": "it reweights the summed sequence log-probs of the reference-based pairwise losses (TRL's "
    "DPOTrainer loss types), which declare it",
    "wpo": "it multiplies per-pair losses by per-pair weights, so the objective must declare it and take "
    "pair_weights; losses that sort the batch (aot, aot_unpaired) cannot, as in TRL 1.16.0",
}


def _require_modifier(spec: ObjectiveSpec, modifier: str, setting: str) -> None:
    if modifier in spec.modifiers:
        return
    supported = sorted(n for n, s in SPECS.items() if modifier in s.modifiers)
    raise ValueError(
        f"objective {spec.name!r} does not support the {modifier} modifier ({setting}): {_MODIFIER_REASONS[modifier]}. "
        f"Objectives that support it: {', '.join(supported) or 'none'}"
    )


def compute_objective(
    name: str,
    inputs: Any,
    *,
    f_divergence: str | None = None,
    f_alpha: Any = 0.5,
    ld_alpha: Any = None,
    wpo: bool = False,
    **hyper: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Evaluate the registered objective `name` on `inputs` with hyper-parameters `**hyper` and, optionally, the
    loss modifiers of TRL 1.16.0's DPOTrainer (METHODS.md section 1; math in `jaxalign.losses.modifiers`):

    f_divergence: None or "reverse_kl" (standard DPO), "forward_kl", "js_divergence" or "alpha_divergence" (TRL's
        f_divergence_type): each side's summed log-ratio z is replaced by the f-DPO score s(z).
    f_alpha: the alpha_divergence coefficient (TRL's f_alpha_divergence_coef), in [0, 1]; default 0.5.
    ld_alpha: None or a weight in [0, 1] (LD-DPO): completion tokens past the shorter completion of each pair weigh
        ld_alpha in the policy and reference sequence log-probs.
    wpo: multiply each pair's loss by the WPO weight w(y_w) w(y_l) (no gradient), read from inputs.extras
        "wpo_log_norm_chosen" / "wpo_log_norm_rejected" (`modifiers.wpo_token_log_norm`).

    A modifier other than its default must be declared by the objective's registry entry (`ObjectiveSpec.modifiers`),
    otherwise one ValueError names the objective and the modifier; bad values raise one ValueError too.
    f_divergence="reverse_kl" is the identity and is accepted by every objective, as in TRL.
    """
    spec = get_spec(name)
    kwargs = dict(hyper)
    _modifiers.check_f_divergence(name, "reverse_kl" if f_divergence is None else f_divergence, f_alpha)
    if f_divergence not in (None, "reverse_kl"):
        _require_modifier(spec, "f_divergence", f"f_divergence={f_divergence!r}")
        kwargs.update(f_divergence=f_divergence, f_alpha=f_alpha)
    _modifiers.check_ld_alpha(name, ld_alpha)
    if ld_alpha is not None:
        _require_modifier(spec, "ld_alpha", f"ld_alpha={ld_alpha!r}")
        kwargs["ld_alpha"] = ld_alpha
    if not isinstance(wpo, bool):
        raise ValueError(f"{name}: wpo must be True or False, got {wpo!r}")
    if wpo:
        _require_modifier(spec, "wpo", "wpo=True")
        if kwargs.get("pair_weights") is not None:
            raise ValueError(f"{name}: pass either wpo=True or pair_weights, not both")
        kwargs["pair_weights"] = _modifiers.wpo_pair_weights(
            inputs.policy_chosen, inputs.policy_rejected, inputs.chosen_mask, inputs.rejected_mask, inputs.extras, name
        )
    return spec.fn(inputs, **kwargs)
