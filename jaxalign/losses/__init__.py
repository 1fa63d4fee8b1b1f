"""Preference objectives as pure functions of per-token log-probs and masks, and their registry.

Design principle 2 (DESIGN.md): objectives never touch models. Each objective maps its inputs (`PairwiseInputs`,
`UnpairedInputs` or `ListwiseInputs`: per-token log-probs of policy and reference plus completion masks and any
declared extras) to (loss, metrics). A new objective is one function, one `@register` line and one test.
"""
from jaxalign.losses.registry import (
    FAMILIES,
    OBJECTIVES,
    SPECS,
    ListwiseInputs,
    ObjectiveSpec,
    PairwiseInputs,
    UnpairedInputs,
    compute_objective,
    get_objective,
    get_spec,
    register,
    unpair,
)
# Importing a family module registers its objectives.
from jaxalign.losses import dpo as _dpo  # noqa: F401
from jaxalign.losses import listwise as _listwise  # noqa: F401
from jaxalign.losses import pairwise as _pairwise  # noqa: F401
from jaxalign.losses import reference_free as _reference_free  # noqa: F401
from jaxalign.losses import unpaired as _unpaired  # noqa: F401
from jaxalign.losses import weighted as _weighted  # noqa: F401

__all__ = ["FAMILIES", "OBJECTIVES", "SPECS", "ListwiseInputs", "ObjectiveSpec", "PairwiseInputs", "UnpairedInputs",
           "compute_objective", "get_objective", "get_spec", "register", "unpair"]
