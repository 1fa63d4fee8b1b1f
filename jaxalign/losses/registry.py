"""The objective registry and the inputs objectives receive.

Every objective is a pure function `fn(inputs, **hyper_parameters) -> (loss, metrics)` that never sees a model.
What `inputs` is depends on the objective's family:

- "pairwise" and "reference_free": `PairwiseInputs` (one chosen and one rejected completion per prompt);
- "unpaired": `UnpairedInputs` (single completions with a desirable/undesirable label, KTO-style);
- "listwise": `ListwiseInputs` (K scored completions per prompt).

Objectives that read more than log-probs (rewards, embeddings, values, hidden states, a guidance policy's
log-probs) take them from `inputs.extras` under the names they declare in `register(..., extras=...)`, so a trainer
can ask the registry what to compute before calling the objective.

A registration is the only place an objective is described: besides its family and extras it may declare a state
carried across steps (`StateHooks`, e.g. BCO's running baseline) and the names under which the usual KL strength
beta reaches it (`beta_aliases`, e.g. ADPO's temperature tau = 1/beta). `objective_kwargs` turns (beta,
label_smoothing, "name=value,...") into the keyword arguments of any registered objective from those declarations.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from jaxalign.losses import modifiers as _modifiers

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
FAMILIES = ("pairwise", "reference_free", "unpaired", "listwise")
# Extras a loss modifier reads when it is switched on (WPO's per-token normaliser log sum_v p_v^2 of each side).
MODIFIER_EXTRAS: dict[str, tuple[str, ...]] = {"wpo": _modifiers.WPO_EXTRAS}
# The keyword arguments of TRL's loss modifiers, accepted by `objective_kwargs` for objectives declaring any modifier.
MODIFIER_ARGUMENTS = ("f_divergence", "f_alpha", "ld_alpha", "wpo")


@dataclasses.dataclass(frozen=True)
class StateHooks:
    """A state an objective carries from one training step to the next (in `TrainState.objective_state`).

    init: () -> the initial state, a pytree of arrays (e.g. `unpaired.RunningMoments.init`).
    update: (state, inputs, **hyper) -> (new state, extras). A trainer calls it once per step on the inputs the
        objective is about to see, then adds `extras` to `inputs.extras` and keeps the new state for the next step.
        It receives those of the objective's hyper-parameters its signature names (all of them with **kwargs).
        Pure and jit-able, like the objective.
    extras: the names of the extras `update` returns; each must also be declared in the objective's `extras`, and a
        trainer never looks for them in the batch.
    description: what the state is, for error messages (e.g. "a running baseline").
    """

    init: Callable[[], Any]
    update: Callable[..., tuple[Any, dict[str, jax.Array]]]
    extras: tuple[str, ...] = ()
    description: str = "a state across steps"


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
    state: the `StateHooks` of an objective that carries a state across steps, else None.
    beta_aliases: (hyper-parameter, function of beta) pairs: the names under which the usual KL strength beta reaches
        an objective whose own parameter is not called beta (`objective_kwargs`).
    """

    name: str
    fn: Objective
    family: str = "pairwise"
    needs_reference: bool = True
    extras: tuple[str, ...] = ()
    batch_coupled: bool = False
    modifiers: tuple[str, ...] = ()
    state: StateHooks | None = None
    beta_aliases: tuple[tuple[str, Callable[[float], Any]], ...] = ()

    @property
    def hyperparameters(self) -> frozenset[str]:
        """The keyword arguments of `fn` a caller may set (the inputs and WPO's per-pair weights excluded)."""
        return _keyword_parameters(self.fn) - {"inputs", "pair_weights"}


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
             batch_coupled: bool = False, modifiers: tuple[str, ...] = (), state: StateHooks | None = None,
             beta_aliases: Mapping[str, Callable[[float], Any]] | None = None) -> Callable[[Objective], Objective]:
    """Add an objective to the registry under `name` (a clear error on a duplicate name or unknown family).

    needs_reference defaults to False for the "reference_free" family and True otherwise. `modifiers` lists the
    loss modifiers (`modifiers.MODIFIERS`) the objective implements; `state` its `StateHooks` if it carries a state
    across steps; `beta_aliases` maps its own KL-strength parameters to functions of beta. See `ObjectiveSpec`."""
    if family not in FAMILIES:
        raise ValueError(f"objective {name!r}: family must be one of {FAMILIES}, got {family!r}")
    unknown = [m for m in modifiers if m not in _modifiers.MODIFIERS]
    if unknown:
        raise ValueError(
            f"objective {name!r}: unknown modifiers {unknown}; expected a subset of {_modifiers.MODIFIERS}"
        )
    if state is not None and not set(state.extras) <= set(extras):
        raise ValueError(f"objective {name!r}: its state provides extras {state.extras}, which must all be declared "
                         f"in extras={tuple(extras)}")
    if needs_reference is None:
        needs_reference = family != "reference_free"
    aliases = tuple((beta_aliases or {}).items())

    def add(fn: Objective) -> Objective:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered by {OBJECTIVES[name].__module__}")
        spec = ObjectiveSpec(name, fn, family, needs_reference, tuple(extras), batch_coupled, tuple(modifiers),
                             state, aliases)
        stray = [alias for alias, _ in aliases if alias not in spec.hyperparameters]
        if stray:
            raise ValueError(f"objective {name!r}: beta_aliases {stray} are not hyper-parameters of "
                             f"{fn.__name__} (it takes {', '.join(sorted(spec.hyperparameters)) or 'none'})")
        OBJECTIVES[name] = fn
        SPECS[name] = spec
        return fn

    return add


def unregister(name: str) -> None:
    """Remove `name` from the registry (a test or a notebook cleaning up an objective it registered)."""
    get_spec(name)  # the usual error for an unknown name
    del OBJECTIVES[name], SPECS[name]


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
    loss modifiers of TRL 1.16.0's DPOTrainer (the math is in `jaxalign.losses.modifiers`):

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


# ----------------------------------------------------------------------------------------------------------------
# what a trainer derives from a registration


def _keyword_parameters(fn: Callable) -> frozenset[str]:
    return frozenset(name for name, p in inspect.signature(fn).parameters.items()
                     if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def needed_extras(name: str, *, wpo: bool = False) -> tuple[str, ...]:
    """Every extra `name` reads in training: its declared extras, then those of the modifiers switched on (with
    wpo=True, WPO's normalisers `modifiers.WPO_EXTRAS`). A trainer computes the ones it knows how to compute and
    reads the rest from the batch."""
    spec = get_spec(name)
    return spec.extras + tuple(e for e in (MODIFIER_EXTRAS["wpo"] if wpo else ()) if e not in spec.extras)


def initial_state(name: str) -> Any:
    """The state objective `name` starts training with (`StateHooks.init`), or None when it keeps none."""
    spec = get_spec(name)
    return None if spec.state is None else spec.state.init()


def update_state(name: str, state: Any, inputs: Any, hyper: Mapping[str, Any]) -> tuple[Any, Any]:
    """One step of objective `name`'s state: (new state, `inputs` with the extras its `StateHooks.update` returns).

    `hyper` are the objective's hyper-parameters; the update receives those its signature names (all of them when
    it takes **kwargs). An update returning other extras than it declares is one ValueError."""
    spec = get_spec(name)
    if spec.state is None:
        raise ValueError(f"objective {name!r} keeps no state across steps")
    parameters = inspect.signature(spec.state.update).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in hyper.items() if takes_all or (k in parameters and k not in ("state", "inputs"))}
    new_state, extras = spec.state.update(state, inputs, **kwargs)
    if set(extras) != set(spec.state.extras):
        raise ValueError(f"objective {name!r}: its state update returned extras {sorted(extras)}, but declares "
                         f"{sorted(spec.state.extras)}")
    return new_state, inputs.replace(extras={**inputs.extras, **extras})


def _parse_scalar(text: str) -> Any:
    """int, then float, then true/false/none (any case), else the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_objective_args(text: str, setting: str = "dpo") -> dict[str, Any]:
    """"name=value,name=value" -> {name: value}, each value an int, a float, a bool, None or else a string.
    Empty items are skipped; an item without "=" is one ValueError naming `setting`.objective_args."""
    parsed: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(f"{setting}.objective_args: {item!r} is not of the form name=value")
        key, value = (part.strip() for part in item.split("=", 1))
        parsed[key] = _parse_scalar(value)
    return parsed


def hyperparameter_defaults(name: str) -> dict[str, Any]:
    """The defaults objective `name` declares in its own signature (what it trains with when nothing is set)."""
    spec = get_spec(name)
    parameters = inspect.signature(spec.fn).parameters
    return {k: parameters[k].default for k in sorted(spec.hyperparameters)
            if k in parameters and parameters[k].default is not inspect.Parameter.empty}


def objective_kwargs(name: str, beta: float | None, label_smoothing: float | None = None, objective_args: str = "",
                     *, setting: str = "dpo") -> dict[str, Any]:
    """The keyword arguments a trainer passes to objective `name`: beta when it is set (not None) and the objective
    takes one, each of its `beta_aliases` as a function of that beta (ADPO: tau = 1/beta; DRO: tau = beta; Flex-DPO:
    beta_chosen = beta_rejected = beta), label_smoothing when not None, and `objective_args` ("name=value,name=value",
    `parse_objective_args`), which win. Whatever is not set keeps the objective's own default
    (`hyperparameter_defaults`). TRL's loss modifiers (f_divergence, f_alpha, ld_alpha, wpo) are accepted
    by every objective that declares a modifier; `compute_objective` rejects the ones it does not support.

    Pure. Unknown names are one ValueError listing the accepted ones; `setting` names the config section the
    arguments come from in the messages (e.g. "dpo.objective='sigmoid' takes no gamma; it accepts: beta, ...").
    """
    spec = get_spec(name)
    accepted = set(spec.hyperparameters)
    if spec.modifiers:
        accepted |= set(MODIFIER_ARGUMENTS)
    kwargs: dict[str, Any] = {}
    if beta is not None:
        if "beta" in accepted:
            kwargs["beta"] = beta
        for alias, from_beta in spec.beta_aliases:
            kwargs[alias] = from_beta(beta)
    if label_smoothing is not None:
        kwargs["label_smoothing"] = label_smoothing
    kwargs.update(parse_objective_args(objective_args, setting))
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"{setting}.objective={name!r} takes no {', '.join(unknown)}; it accepts: "
                         f"{', '.join(sorted(accepted)) or 'nothing'}")
    return kwargs
