"""A trained policy saved beside its run, loaded back, and used to plan on any map (`jaxalign deceptive-paths plan`).

A finished `jaxalign run deceptive_paths` writes WORKDIR/policy/: policy.json (the network's hyper-parameters and
the bonus it was trained with) and params.msgpack (the final parameters, `flax.serialization`). The GraphSAGE
network reads only the local ego-graph, so the same parameters plan on a map of any size.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from flax import serialization

from agents.deceptive_paths import baselines, evaluation, metrics
from agents.deceptive_paths.env import DeceptivePathEnv
from agents.deceptive_paths.maps import GridMap
from agents.deceptive_paths.network import GraphSAGEActorCritic
from jaxalign import paths

POLICY_DIR = "policy"
SPEC_KEYS = ("ego_radius", "hidden", "num_layers", "activation")


def save_policy(workdir, network: GraphSAGEActorCritic, params, bonus: str) -> None:
    folder = paths.join(workdir, POLICY_DIR)
    paths.makedirs(folder)
    spec = {k: getattr(network, k) for k in SPEC_KEYS} | {"bonus": bonus}
    paths.write_atomic(paths.join(folder, "params.msgpack"), serialization.to_bytes(jax.device_get(params)))
    paths.write_atomic(paths.join(folder, "policy.json"), json.dumps(spec, indent=1) + "\n")


def load_policy(workdir) -> tuple[GraphSAGEActorCritic, dict, dict]:
    """(network, params, spec) from WORKDIR/policy/; a ValueError naming what is missing."""
    folder = paths.join(workdir, POLICY_DIR)
    spec_file, params_file = paths.join(folder, "policy.json"), paths.join(folder, "params.msgpack")
    if not paths.exists(spec_file) or not paths.exists(params_file):
        raise ValueError(f"{folder}: no trained policy (policy.json and params.msgpack); pass the work directory of "
                         f"a finished `jaxalign run deceptive_paths` as --checkpoint")
    spec = json.loads(paths.read_text(spec_file))
    network = GraphSAGEActorCritic(**{k: spec[k] for k in SPEC_KEYS})
    env = DeceptivePathEnv(spec["ego_radius"])
    template = network.init(jax.random.key(0), jnp.zeros((1, env.num_slots, 9), jnp.float32))
    return network, serialization.from_bytes(template, paths.read_bytes(params_file)), spec


def plan(grid: GridMap, network, params, ego_radius: int, budget_fraction: float = 1.0,
         observer_name: str = "cost_difference", greedy: bool = True) -> dict:
    """The policy's path on `grid` next to the honest path and pi_d4: {"budget", "paths", "metrics"}."""
    env = DeceptivePathEnv(ego_radius)
    params_env = evaluation.eval_params([grid])
    policy_path = evaluation.policy_paths(network, params, env, [grid], params_env, budget_fraction,
                                          greedy=greedy)[0]
    budget = evaluation.budget(grid, budget_fraction)
    paths = {"policy": policy_path, "honest": baselines.honest_path(grid), "pi_d4": baselines.pi_d4(grid)}
    return {"budget": budget, "paths": paths,
            "metrics": {name: metrics.path_metrics(grid, path, budget, observer_name).as_dict()
                        for name, path in paths.items()}}
