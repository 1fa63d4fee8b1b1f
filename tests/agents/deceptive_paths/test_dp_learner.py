"""The learner's curriculum pieces against plain Python, and the jitted evaluation episodes against a step-by-step
Python loop over the environment and the network. (The curriculum inside a real training run is checked against
the run's metrics.jsonl in test_dp_experiment.py, which trains once for all these tests.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.deceptive_paths import evaluation, maps
from agents.deceptive_paths.env import DeceptivePathEnv
from agents.deceptive_paths.learner import CurriculumConfig, curriculum_coefficient, updated_reach_rate
from agents.deceptive_paths.network import GraphSAGEActorCritic

# The map, network shape and episode length of test_dp_experiment.py's `plan` test: one compilation serves both.
GRIDS = maps.load_map_set("test_8x8")[:1]
ENV = DeceptivePathEnv(ego_radius=2, bonus="exaggeration")


def test_reach_rate_is_a_moving_average_of_finished_episodes():
    reached = jnp.array([[True, False], [False, False], [True, True]])
    done = jnp.array([[True, True], [False, False], [True, True]])
    assert float(updated_reach_rate(jnp.float32(0.5), reached, done, 0.1)) == pytest.approx(0.9 * 0.5 + 0.1 * 3 / 4)
    none = jnp.zeros((3, 2), bool)
    assert float(updated_reach_rate(jnp.float32(0.5), none, none, 0.1)) == 0.5


def test_curriculum_coefficient():
    assert float(curriculum_coefficient(jnp.float32(0.25), CurriculumConfig())) == 0.25
    assert float(curriculum_coefficient(jnp.float32(0.25), CurriculumConfig(enabled=False))) == 1.0
    with pytest.raises(ValueError, match="curriculum.step"):
        CurriculumConfig(step=0.0)


def test_policy_paths_match_a_python_loop():
    network = GraphSAGEActorCritic(ego_radius=2, hidden=8)
    params = network.init(jax.random.key(0), jnp.zeros((1, ENV.num_slots, 9)))
    # Scaled up so that no two moves' logits are within rounding of each other (argmax must not flip between the
    # fused episode program and the step-by-step one); exact ties (symmetric neighbours) are fine.
    params = jax.tree_util.tree_map(lambda x: x * 8.0, params)
    env_params = evaluation.eval_params(GRIDS)  # (padded maps: the experiment's evaluation, at 32x32)
    got = evaluation.policy_paths(network, params, ENV, GRIDS, env_params, 0.5)
    apply, step = jax.jit(network.apply), jax.jit(ENV.step)
    run_params = env_params.replace(budget_fraction=jnp.float32(0.5))
    for i, grid in enumerate(GRIDS):
        obs, s = ENV.reset_to(jax.random.key(0), run_params, i)
        path = [grid.start]
        for _ in range(evaluation.budget(grid, 1.0)):
            logits = np.asarray(apply(params, obs)[0])
            top, second = np.sort(logits)[-2:][::-1]
            assert top == second or top - second > 1e-3  # exact ties resolve alike (the first move)
            obs, s, _, done, _ = step(jax.random.key(0), s, int(np.argmax(logits)), run_params)
            path.append(divmod(int(s.position), 8))
            if bool(done):
                break
        assert got[i] == path and len(path) > 2
        assert int(s.t_max) == evaluation.budget(grid, 0.5)
