"""The experiment registry: a name, a one-line description, a config dataclass and a run function."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    default_config: Callable[[], Any]
    run: Callable[[Any, str], dict]


def _arith_dpo() -> Experiment:
    from jaxalign.experiments import arith_dpo

    return Experiment(
        name="arith_dpo",
        description=EXPERIMENTS["arith_dpo"][0],
        default_config=arith_dpo.ArithDPOConfig,
        run=arith_dpo.run,
    )


# (description, loader): importing the CLI stays cheap and `jaxalign list` does not import JAX models.
EXPERIMENTS: dict[str, tuple[str, Callable[[], Experiment]]] = {
    "arith_dpo": (
        "SFT on noisy ARITH demonstrations, then DPO on on-policy oracle-labelled pairs (the main job)",
        _arith_dpo,
    ),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name][1]()
