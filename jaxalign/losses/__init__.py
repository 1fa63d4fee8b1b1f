"""Preference objectives as pure functions of per-token log-probs and masks, and their registry.

Objectives never touch models. Each objective maps its inputs (`PairwiseInputs`, `UnpairedInputs` or
`ListwiseInputs`: per-token log-probs of policy and reference plus completion masks and any declared extras) to
(loss, metrics). A new objective is one function, one `@register` line and one test: the
registration declares everything a trainer needs (extras, a state across steps, aliases of beta).
"""
from jaxalign.losses.registry import (
    FAMILIES,
    OBJECTIVES,
    SPECS,
    ListwiseInputs,
    ObjectiveSpec,
    PairwiseInputs,
    StateHooks,
    UnpairedInputs,
    compute_objective,
    get_objective,
    get_spec,
    hyperparameter_defaults,
    initial_state,
    needed_extras,
    objective_kwargs,
    parse_objective_args,
    register,
    unpair,
    unregister,
    update_state,
)
# Importing a family module registers its objectives.
from jaxalign.losses import dpo as _dpo  # noqa: F401
from jaxalign.losses import listwise as _listwise  # noqa: F401
from jaxalign.losses import pairwise as _pairwise  # noqa: F401
from jaxalign.losses import reference_free as _reference_free  # noqa: F401
from jaxalign.losses import unpaired as _unpaired  # noqa: F401
from jaxalign.losses import weighted as _weighted  # noqa: F401

__all__ = ["FAMILIES", "OBJECTIVES", "SPECS", "ListwiseInputs", "ObjectiveSpec", "PairwiseInputs", "StateHooks",
           "UnpairedInputs", "compute_objective", "get_objective", "get_spec",
           "hyperparameter_defaults", "initial_state", "needed_extras",
           "objective_kwargs", "parse_objective_args", "register", "unpair", "unregister", "update_state"]
