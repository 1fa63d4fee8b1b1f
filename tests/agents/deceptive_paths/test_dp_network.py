"""The GraphSAGE actor-critic against plain NumPy: mean aggregation, invariances, masking.

Observations come from the real environment (a walk on shipped 8x8 maps, radius 2, so many slots are walls or
outside the map), plus hand-made ones for the masking check. One init and one jit per shape keep it fast.
"""
import jax
import jax.numpy as jnp
import numpy as np

from agents.deceptive_paths import maps
from agents.deceptive_paths.env import DeceptivePathEnv, make_params, split_observation
from agents.deceptive_paths.network import (MASKED_LOGIT, GraphSAGEActorCritic, mean_neighbours,
                                            normalise_features)

ENV = DeceptivePathEnv(ego_radius=2)
NET = GraphSAGEActorCritic(ego_radius=2, hidden=16, num_layers=2)


def walk_observations(num: int = 24) -> np.ndarray:
    """Observations along random masked walks on two shipped maps (some at walls, corners, the goal region)."""
    params = make_params(maps.load_map_set("test_8x8")[:2])
    reset, step = jax.jit(ENV.reset_to), jax.jit(ENV.step)
    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        obs, state = reset(jax.random.key(i), params, i)
        for t in range(num // 2):
            out.append(np.asarray(obs))
            legal = np.flatnonzero(np.asarray(split_observation(obs).action_mask))
            obs, state, *_ = step(jax.random.key(t), state, int(rng.choice(legal)), params)
    return np.stack(out)


OBS = walk_observations()
PARAMS = NET.init(jax.random.key(0), jnp.asarray(OBS[:1]))
APPLY = jax.jit(NET.apply)


def test_mean_aggregation_matches_a_numpy_loop():
    parts = split_observation(jnp.asarray(OBS))
    h = np.random.default_rng(1).normal(size=(len(OBS), OBS.shape[1], 5)).astype(np.float32)
    got = np.asarray(mean_neighbours(jnp.asarray(h), parts.adjacency))
    adjacency = np.asarray(parts.adjacency)
    expected = np.zeros_like(h)
    for b in range(len(OBS)):
        for m in range(OBS.shape[1]):
            linked = [int(j) for j in adjacency[b, m] if j >= 0]
            if linked:
                expected[b, m] = sum(h[b, j] for j in linked) / len(linked)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # Not vacuous: some slots have 1, 2, 3 and 4 linked neighbours, and some none.
    counts = set((adjacency >= 0).sum(axis=-1).ravel().tolist())
    assert {0, 1, 2, 3, 4} <= counts


def test_features_are_normalised_relative_to_the_agent():
    parts = split_observation(jnp.asarray(OBS))
    got = np.asarray(normalise_features(parts.features, parts.valid, 2))
    f, valid = np.asarray(parts.features), np.asarray(parts.valid)
    b, m = np.argwhere(valid[:, 1:])[0] + np.array([0, 1])
    visited, dg, dd, left = f[b, m]
    slack = left - dg
    expected = [visited, (dg - f[b, 0, 1]) / 2, (dd - f[b, 0, 2]) / 2, np.clip(slack / max(left, 1), -1, 1),
                np.tanh(slack / 8), (dg - dd) / (dg + dd + 1)]
    np.testing.assert_allclose(got[b, m], expected, rtol=1e-6)
    assert np.all(got[~valid] == 0)


def test_invalid_slots_never_influence_valid_ones():
    obs = OBS.copy()
    invalid = obs[..., 4] < 0.5
    assert invalid.any()
    rng = np.random.default_rng(2)
    obs[..., :4] = np.where(invalid[..., None], rng.normal(size=obs[..., :4].shape) * 100, obs[..., :4])
    # Edges out of an invalid slot too (a corrupt row); the valid slots never point at it.
    obs[..., 5:] = np.where(invalid[..., None], rng.integers(0, obs.shape[1], size=obs[..., 5:].shape), obs[..., 5:])
    base_logits, base_value = APPLY(PARAMS, jnp.asarray(OBS))
    logits, value = APPLY(PARAMS, jnp.asarray(obs))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(base_logits))
    np.testing.assert_array_equal(np.asarray(value), np.asarray(base_value))


def permute_slots(obs: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Move slot i to slot perm[i] (features, validity and the adjacency's slot numbers)."""
    out = np.empty_like(obs)
    out[:, perm] = obs
    adjacency = out[..., 5:]
    out[..., 5:] = np.where(adjacency >= 0, perm[np.maximum(adjacency, 0).astype(int)], -1)
    return out


def test_permuting_the_other_ego_slots_leaves_the_outputs_unchanged():
    m = OBS.shape[1]
    perm = np.arange(m)
    perm[5:] = 5 + np.random.default_rng(3).permutation(m - 5)
    assert (perm[5:] != np.arange(5, m)).any()
    logits, value = APPLY(PARAMS, jnp.asarray(OBS))
    p_logits, p_value = APPLY(PARAMS, jnp.asarray(permute_slots(OBS, perm)))
    np.testing.assert_allclose(np.asarray(p_logits), np.asarray(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p_value), np.asarray(value), rtol=1e-5, atol=1e-6)
    # Not vacuous: moving a neighbour of the agent (slot 1) elsewhere changes the outputs.
    swap = np.arange(m)
    swap[[1, 5]] = [5, 1]
    s_logits, _ = APPLY(PARAMS, jnp.asarray(permute_slots(OBS, swap)))
    assert not np.allclose(np.asarray(s_logits), np.asarray(logits))


def test_masked_moves_get_zero_probability_and_finite_entropy():
    logits, value = APPLY(PARAMS, jnp.asarray(OBS))
    mask = np.asarray(split_observation(jnp.asarray(OBS)).action_mask)
    assert (~mask).any() and mask.any(axis=1).all()
    logits = np.asarray(logits)
    assert np.all(logits[~mask] == MASKED_LOGIT) and np.all(np.abs(logits[mask]) < 1e3)
    probs = np.asarray(jax.nn.softmax(logits))
    assert np.all(probs[~mask] < 1e-30)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    log_pi = np.asarray(jax.nn.log_softmax(logits))
    assert np.isfinite(-(probs * log_pi).sum(axis=1)).all() and np.isfinite(np.asarray(value)).all()
    assert logits.shape == (len(OBS), 4) and np.asarray(value).shape == (len(OBS),)


def test_batch_shapes_are_kept():
    logits, value = APPLY(PARAMS, jnp.asarray(OBS.reshape((4, 6) + OBS.shape[1:])))
    flat_logits, flat_value = APPLY(PARAMS, jnp.asarray(OBS))
    assert logits.shape == (4, 6, 4) and value.shape == (4, 6)
    np.testing.assert_allclose(np.asarray(logits).reshape(-1, 4), np.asarray(flat_logits), rtol=1e-6)
