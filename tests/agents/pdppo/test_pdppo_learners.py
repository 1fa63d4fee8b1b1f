"""PPO and PDPPO learners: the shared objective against a NumPy reading of it, the critic estimate, a fair set-up
(same actor, critic, optimiser; every layer trained) and a short smoke run on the tiny instance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.pdppo import exact
from agents.pdppo import learners as L

TINY = exact.tiny_instance()  # horizon 8
SMALL = dict(num_envs=16, num_steps=8, update_epochs=4, actor_hidden=(32, 32), critic_hidden=(32, 32),
             actor_learning_rate=3e-3, critic_learning_rate=3e-3)


def _config(algorithm, updates=1, **changes):
    return L.LearnerConfig(algorithm=algorithm, total_timesteps=16 * 8 * updates, **{**SMALL, **changes})


@pytest.mark.parametrize("surrogate", L.SURROGATES)
def test_loss_matches_a_numpy_reading_of_the_objective(surrogate):
    rng = np.random.default_rng(0)
    b, m, c = 6, 2, 3
    logits = rng.normal(size=(b, m, c))
    actions = rng.integers(0, c, (b, m))
    returns, estimate = rng.normal(size=b), rng.normal(size=b)
    log_pi = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    log_prob = np.array([[log_pi[i, j, actions[i, j]] for j in range(m)] for i in range(b)])
    old_log_prob = log_prob + rng.normal(0.0, 0.15, (b, m))  # ratios near 1: some clipped, some not

    def loss_of(estimate, ent_coef=0.012):
        return L.learner_loss(jnp.asarray(logits, jnp.float32), estimate, jnp.asarray(actions),
                              jnp.asarray(old_log_prob, jnp.float32), jnp.asarray(returns, jnp.float32),
                              clip_eps=0.2, vf_coef=0.5, ent_coef=ent_coef, surrogate=surrogate)

    loss, metrics = loss_of(jnp.asarray(estimate, jnp.float32))
    entropy = -(np.exp(log_pi) * log_pi).sum(-1)  # [b, m]
    adv = returns - estimate
    if surrogate == "joint":  # one ratio of the whole action, the entropy of the whole action
        ratio = np.exp(log_prob.sum(1) - old_log_prob.sum(1))
        policy = -np.mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
        bonus = entropy.sum(1).mean()
    else:  # each machine's ratio against the shared advantage, entropy averaged over machines
        ratio = np.exp(log_prob - old_log_prob)
        policy = -np.mean(np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None]))
        bonus = entropy.mean()
    value = np.mean((estimate - returns) ** 2)
    assert float(metrics["policy_loss"]) == pytest.approx(policy, rel=1e-5)
    assert float(metrics["value_loss"]) == pytest.approx(value, rel=1e-5)
    assert float(loss) == pytest.approx(policy + 0.5 * value - 0.012 * bonus, rel=1e-5)
    assert float(metrics["clip_fraction"]) == pytest.approx(np.mean(np.abs(ratio - 1) > 0.2))
    assert 0 < float(metrics["clip_fraction"]) < 1  # the clip is exercised, not everywhere
    # No gradient flows into the estimate through the advantage: d loss / d E = vf_coef * 2 (E - R) / B.
    grad = jax.grad(lambda e: loss_of(e, ent_coef=0.0)[0])(jnp.asarray(estimate, jnp.float32))
    np.testing.assert_allclose(grad, 0.5 * 2 * (estimate - returns) / b, rtol=1e-5)


def test_normalised_advantages_are_z_scores_over_the_minibatch():
    rng = np.random.default_rng(2)
    logits, estimate, returns = rng.normal(size=(8, 3, 4)), rng.normal(size=8), rng.normal(size=8)
    actions = rng.integers(0, 4, (8, 3))
    log_pi = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    old_log_prob = np.take_along_axis(log_pi, actions[..., None], -1)[..., 0]  # ratios 1: the surrogate is mean(A)
    adv = returns - estimate
    z = (adv - adv.mean()) / adv.std()
    args = [jnp.asarray(x, jnp.float32) for x in (logits, estimate)]
    rest = [jnp.asarray(actions), jnp.asarray(old_log_prob, jnp.float32), jnp.asarray(returns, jnp.float32)]
    # d(policy loss) / d(log pi of each taken action) = -A / (B M): the advantage each sample is weighted by.
    for normalise, expected in ((False, adv), (True, z)):
        def policy_loss(lp):
            shifted = jnp.asarray(logits, jnp.float32) + lp[..., None] * jax.nn.one_hot(rest[0], 4)
            return L.learner_loss(shifted, *args[1:], *rest, clip_eps=0.2, vf_coef=0.0, ent_coef=0.0,
                                  normalize_advantages=normalise)[1]["policy_loss"]
        grad = jax.grad(policy_loss)(jnp.zeros((8, 3), jnp.float32))
        probs = np.exp(np.take_along_axis(log_pi, actions[..., None], -1)[..., 0])
        # shifting a logit by e moves log pi(a) by (1 - pi(a)) e
        np.testing.assert_allclose(grad, -expected[:, None] * (1 - probs) / 24, rtol=1e-4, atol=1e-6)


def test_one_machine_makes_the_two_surrogates_equal():
    rng = np.random.default_rng(1)
    args = [jnp.asarray(x, jnp.float32) for x in (rng.normal(size=(5, 1, 4)), rng.normal(size=5))]
    rest = [jnp.asarray(rng.integers(0, 4, (5, 1))), jnp.asarray(rng.normal(-1.4, 0.3, (5, 1)), jnp.float32),
            jnp.asarray(rng.normal(size=5), jnp.float32)]
    joint, per_machine = (L.learner_loss(*args, *rest, clip_eps=0.2, vf_coef=0.5, ent_coef=0.1, surrogate=s)[0]
                          for s in ("joint", "per_machine"))
    assert float(joint) == pytest.approx(float(per_machine), rel=1e-6)


@pytest.fixture(scope="module")
def arms():
    out = {}
    for algorithm in L.ALGORITHMS:
        learner = L.make_learner(_config(algorithm), TINY)
        start = learner.init(jax.random.key(0))
        # LLVM at -O0: compiling the update is most of this fixture's time (the same JAX program is checked).
        update = jax.jit(learner.update, compiler_options={"xla_backend_optimization_level": 0})
        after, metrics = update(start)
        out[algorithm] = (learner, start, after, metrics, update)
    return out


def test_pdppo_estimate_is_the_minimum_of_its_two_critics(arms):
    learner, start = arms["pdppo"][:2]
    params = start.train_state.params
    obs = jax.random.uniform(jax.random.key(1), (7, start.obs.shape[-1]))
    post = jax.random.uniform(jax.random.key(2), (7, start.obs.shape[-1]))
    v = learner.networks.critic.apply(params["critic"], obs)[..., 0]
    v_post = learner.networks.critic.apply(params["post_critic"], post)[..., 0]
    np.testing.assert_allclose(learner.networks.estimate(params, obs, post), jnp.minimum(v, v_post))
    assert bool(jnp.any(v < v_post)) and bool(jnp.any(v_post < v))
    ppo_params = {k: params[k] for k in ("actor", "critic")}
    np.testing.assert_allclose(learner.networks.estimate(ppo_params, obs, post), v)


def test_arms_share_actor_critic_optimiser_and_train_every_layer(arms):
    ppo, pdppo = arms["ppo"][1].train_state.params, arms["pdppo"][1].train_state.params
    assert set(ppo) == {"actor", "critic"} and set(pdppo) == {"actor", "critic", "post_critic"}
    for name in ("actor", "critic"):  # same key: same initial networks, so the arms are paired
        jax.tree_util.tree_map(np.testing.assert_array_equal, ppo[name], pdppo[name])
    np.testing.assert_array_equal(arms["ppo"][1].obs, arms["pdppo"][1].obs)
    for algorithm, (_, start, after, metrics, _) in arms.items():
        before, now = start.train_state.params, after.train_state.params
        changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), before, now)
        leaves = jax.tree_util.tree_leaves_with_path(changed)
        assert len(leaves) == 6 * len(before) and all(v for _, v in leaves), (algorithm, leaves)
        assert int(metrics["env_steps"]) == 16 * 8 and int(after.update_step) == 1


def test_smoke_run_lowers_loss_and_cost_on_the_tiny_instance(arms):
    for algorithm in L.ALGORITHMS:
        _, state, _, _, update = arms[algorithm]
        history = []
        for _ in range(25):
            state, m = update(state)
            history.append(jax.device_get(m))
        metrics = {k: np.array([h[k] for h in history]) for k in history[0]}
        assert np.all(np.isfinite(metrics["loss"]))
        # Within the first update, the epochs lower the loss on their batch.
        assert metrics["last_epoch_loss"][0] < metrics["first_epoch_loss"][0]
        # Across updates, episodes get cheaper (from about 15.7 under the initial near-uniform policy; the DP
        # optimum is 8.87).
        assert metrics["episode_cost"][-5:].mean() < metrics["episode_cost"][0] - 2.0, metrics["episode_cost"]


def test_trainer_and_config_errors():
    trainer = L.make_trainer(_config("pdppo", updates=3), TINY)
    assert trainer.num_updates == 3 and trainer.env_steps_per_update == 128
    with pytest.raises(ValueError, match="algorithm must be one of"):
        L.LearnerConfig(algorithm="trpo")
    with pytest.raises(ValueError, match="divisible by learner.num_minibatches=3"):
        _config("ppo", num_minibatches=3)
    with pytest.raises(ValueError, match=r"num_steps=12 must be a multiple of the instance's horizon \(8\)"):
        L.make_learner(_config("ppo", updates=2, num_steps=12), TINY)


def test_critic_loss_each_trains_every_critic_toward_the_return():
    """The paper's value loss reaches only the smaller critic; `critic_loss="each"` is the sum of each critic's own
    squared error, whichever is smaller (the advantage still uses the minimum)."""
    rng = np.random.default_rng(5)
    logits, actions = jnp.asarray(rng.normal(size=(5, 2, 3)), jnp.float32), jnp.asarray(rng.integers(0, 3, (5, 2)))
    old_log_prob, returns = jnp.zeros((5, 2)), jnp.asarray(rng.normal(size=5), jnp.float32)
    v, v_post = jnp.asarray(rng.normal(size=5), jnp.float32), jnp.asarray(rng.normal(size=5), jnp.float32)

    def value_loss(v, v_post, each):
        return L.learner_loss(logits, jnp.minimum(v, v_post), actions, old_log_prob, returns, clip_eps=0.2,
                              vf_coef=1.0, ent_coef=0.0, critic_values=(v, v_post) if each else None)[1]["value_loss"]

    r = np.asarray(returns)
    expected = np.mean((np.asarray(v) - r) ** 2) + np.mean((np.asarray(v_post) - r) ** 2)
    assert float(value_loss(v, v_post, True)) == pytest.approx(expected, rel=1e-6)
    g_v, g_post = jax.grad(value_loss, argnums=(0, 1))(v, v_post, True)
    np.testing.assert_allclose(g_v, 2 * (v - returns) / 5, rtol=1e-5)
    np.testing.assert_allclose(g_post, 2 * (v_post - returns) / 5, rtol=1e-5)
    g_v, g_post = jax.grad(value_loss, argnums=(0, 1))(v, v_post, False)
    assert np.all((np.asarray(g_v) == 0) | (np.asarray(g_post) == 0))  # the minimum: one critic per sample
    with pytest.raises(ValueError, match="learner.critic_loss must be one of"):
        L.LearnerConfig(critic_loss="max")
