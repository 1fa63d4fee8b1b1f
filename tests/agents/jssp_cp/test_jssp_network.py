"""The policy network: job-permutation equivariance, padding invariance, masking, one parameter set for any size."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from agents.jssp_cp import env, rules
from agents.jssp_cp.instances import random_instance
from agents.jssp_cp.network import ILLEGAL, JobShopPolicy, NetworkConfig, init_params

NET = JobShopPolicy(NetworkConfig(dim=16, heads=2, window_layers=1, job_layers=2))
# LLVM at -O0 (as in tests/jaxalign/models/test_llama.py): these checks are compile-bound, and the JAX program is
# what they check, not the backend's code generation.
O0 = {"xla_backend_optimization_level": 0}
APPLY = jax.jit(NET.apply, compiler_options=O0)


def _params():
    params = init_params(jax.random.key(0), NET)
    # A non-zero competition bias, so that the mask's path is exercised too.
    params["params"]["competition_bias"] = jnp.array([0.7, -1.3])
    return params


def _mid_episode(shape_or_instance, steps: int, jobs: int | None = None, seed: int = 0):
    """The observation after `steps` MWKR decisions (No-Op when no job is legal), on the instance padded to `jobs`
    jobs and at least 6 machines (few shapes, few compilations)."""
    inst = shape_or_instance if not isinstance(shape_or_instance, tuple) else random_instance(seed, *shape_or_instance)
    return _observe_after(env.pad(inst, jobs, max(6, inst.num_machines)), steps)


@partial(jax.jit, compiler_options=O0)
def _observe_after(instance, steps):
    def body(_, state):
        legal = env.legal_actions(state)
        action = jnp.where(legal[:-1].any(), rules.choose(state, rules.mwkr), legal.shape[0] - 1)
        return env.transition(state, action)

    return env.observe(jax.lax.fori_loop(0, steps, body, env.reset(instance)))


def _permute(obs: env.Observation, perm: np.ndarray) -> env.Observation:
    legal = np.asarray(obs.legal)
    return env.Observation(window=obs.window[perm], competition=obs.competition[perm][:, perm],
                           legal=jnp.asarray(np.concatenate([legal[:-1][perm], legal[-1:]])),
                           job_mask=obs.job_mask[perm], job=obs.job[perm])


def test_permuting_jobs_permutes_the_logits():
    params = _params()
    obs = _mid_episode((6, 6), steps=9)
    legal = np.asarray(obs.legal)
    assert legal[:-1].sum() >= 2 and np.asarray(obs.competition).sum() > np.asarray(obs.job_mask).sum()
    logits, value = APPLY(params, obs)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(6)
        logits_p, value_p = APPLY(params, _permute(obs, perm))
        np.testing.assert_allclose(np.asarray(logits_p)[:-1], np.asarray(logits)[:-1][perm], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(logits_p[-1]), float(logits[-1]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(value_p), float(value), rtol=1e-5, atol=1e-5)
    # Not vacuous: the legal jobs' logits differ, so a wrong permutation would be caught.
    assert np.ptp(np.asarray(logits)[:-1][legal[:-1]]) > 1e-3


def test_dummy_jobs_change_no_real_logit():
    params = _params()
    inst = random_instance(1, 6, 4)  # padded to 6 machines: padded machines and operation slots as well
    for steps in (0, 7, 13):
        plain = APPLY(params, _mid_episode(inst, steps))
        padded = APPLY(params, _mid_episode(inst, steps, jobs=9))
        np.testing.assert_allclose(np.asarray(padded[0])[:6], np.asarray(plain[0])[:6], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(padded[0][-1]), float(plain[0][-1]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(padded[1]), float(plain[1]), rtol=1e-5, atol=1e-5)
        assert (np.asarray(padded[0])[6:9] == ILLEGAL).all()


def test_illegal_actions_get_zero_probability_and_finite_entropy():
    params = _params()
    obs = _mid_episode((6, 6), steps=9)
    logits, _ = APPLY(params, obs)
    legal = np.asarray(obs.legal)
    assert (~legal).any()
    probs = np.asarray(jax.nn.softmax(logits))
    assert (probs[~legal] == 0).all() and abs(probs[legal].sum() - 1) < 1e-6
    log_p = jax.nn.log_softmax(logits)
    entropy = -(jnp.exp(log_p) * log_p).sum()
    assert np.isfinite(float(entropy)) and float(entropy) <= np.log(legal.sum()) + 1e-5
    # The finished episode: nothing is legal, yet the outputs stay finite.
    done = _mid_episode((6, 6), steps=36)
    out = APPLY(params, done)
    assert not np.asarray(done.legal).any() and np.isfinite(np.asarray(out[0])).all()


def test_one_parameter_set_runs_on_6x6_and_15x15_and_batches():
    params = _params()
    for shape in ((6, 6), (15, 15)):
        obs = _mid_episode(shape, steps=4)
        logits, value = APPLY(params, obs)
        assert logits.shape == (shape[0] + 1,) and value.shape == () and np.isfinite(float(value))
    batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_mid_episode((6, 6), s, seed=s) for s in (0, 3)])
    logits, value = APPLY(params, batch)
    assert logits.shape == (2, 7) and value.shape == (2,)
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(APPLY(params, _mid_episode((6, 6), 3, seed=3))[0]),
                               rtol=1e-5, atol=1e-5)
