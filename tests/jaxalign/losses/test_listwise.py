"""Listwise objectives (jaxalign.losses.listwise; docs/objectives.md, "Listwise and ranked objectives").

1. values and metrics against float64 NumPy loop implementations written here from the docstrings' formulas, on
   inputs with invalid candidates (NaN log-probs, scores and hidden states), unequal lengths, padding garbage, ties,
   an all-tied prompt, a single-candidate prompt and negative scores;
2. reductions: Plackett-Luce, RankDPO at K=2 = sigmoid DPO; ADPO at K=2 = cDPO (beta = 1/tau); ADPO's PL target at
   eps=0 = plackett_luce; PL without ties = eq. 18 over the sorted list;
3. gradients: finite, zero on invalid candidates and padding, intended signs; all-tied batches give 0;
4. validation of hyper-parameters and extras.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import listwise, pairwise
from jaxalign.losses.dpo import sigmoid
from jaxalign.losses.registry import OBJECTIVES, SPECS, ListwiseInputs, PairwiseInputs
from reference_numpy import assert_names_parameter, logsig, logsumexp as lse

P, K, T, D = 7, 4, 8, 5
NAMES = ["plackett_luce", "rankdpo", "tpo", "adpo"]

# scores per prompt; nan = invalid candidate
SCORES = np.array([
    [1.0, 3.0, 0.0, 2.0],          # 0: all valid, distinct
    [2.0, np.nan, 2.0, 0.5],       # 1: an invalid candidate, a tie at the top
    [1.0, 1.0, 1.0, np.nan],       # 2: all valid candidates tie -> skipped
    [np.nan, 4.0, np.nan, np.nan],  # 3: a single candidate -> skipped
    [-0.5, 0.0, 3.0, 1.0],         # 4: negative scores, distinct
    [0.0, 1.0, 1.0, 0.0],          # 5: two tie groups
    [2.5, 0.5, np.nan, 1.5],       # 6: invalid in the middle
])  # fmt: skip
LENGTHS = np.array([[5, 1, 7, 3], [4, 6, 2, 8], [3, 3, 5, 1], [2, 4, 6, 8], [1, 8, 4, 2], [6, 2, 3, 5], [7, 3, 1, 4]])
STARTS = np.array([[0, 2, 1, 0], [1, 0, 3, 0], [0, 0, 2, 4], [0, 1, 2, 0], [3, 0, 0, 2], [0, 4, 1, 0], [1, 0, 0, 3]])


def make_arrays(seed: int, scale: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    valid = ~np.isnan(SCORES)
    mask = np.zeros((P, K, T))
    for p, k in itertools.product(range(P), range(K)):
        mask[p, k, STARTS[p, k] : STARTS[p, k] + LENGTHS[p, k]] = 1.0
    reference = -rng.uniform(0.05, 3.0, (P, K, T))
    policy = reference + rng.normal(0.0, scale, (P, K, T))
    policy = np.where(mask > 0, policy, 50.0)  # garbage outside the completion must not matter
    reference = np.where(mask > 0, reference, -50.0)
    step_ids = np.full((P, K, T), -1, np.int32)
    for p, k in itertools.product(range(P), range(K)):
        n = LENGTHS[p, k]
        steps = np.sort(rng.integers(0, 3, n))  # 1..3 contiguous steps, ids may skip a value
        step_ids[p, k, STARTS[p, k] : STARTS[p, k] + n] = steps
        if n >= 4 and rng.uniform() < 0.5:
            step_ids[p, k, STARTS[p, k] + 1] = -1  # a completion token outside every step
    hidden = rng.normal(0.0, 1.0, (P, K, T, D))
    policy[~valid], reference[~valid], hidden[~valid] = np.nan, np.nan, np.nan
    return {"policy": policy, "reference": reference, "mask": mask, "scores": SCORES.copy(),
            "valid": valid.astype(np.float64), "step_ids": step_ids, "hidden": hidden}  # fmt: skip


def to_inputs(a: dict[str, np.ndarray], extras=("step_ids", "hidden")) -> ListwiseInputs:
    ex = {}
    if "step_ids" in extras:
        ex["step_ids"] = jnp.asarray(a["step_ids"], jnp.int32)
    if "hidden" in extras:
        ex["hidden"] = jnp.asarray(a["hidden"], jnp.float32)
    return ListwiseInputs(**{k: jnp.asarray(a[k], jnp.float32) for k in ("policy", "reference", "mask", "scores",
                                                                          "valid")}, extras=ex)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# float64 NumPy references (loops over prompts, candidates, pairs)


def prompt_view(a, p):
    """(valid indices, z over them, scores over them) for prompt p."""
    idx = [k for k in range(K) if a["valid"][p, k] > 0]
    m = a["mask"][p]
    z = np.array([np.sum((a["policy"][p, k] - a["reference"][p, k]) * m[k]) for k in idx])
    return idx, z, np.array([a["scores"][p, k] for k in idx])


def strict_pairs(s):
    return [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]


def used_prompts(a):
    """(p, valid indices, z, scores, strict pairs) of every prompt with at least one strict pair: the prompts an
    objective learns from (the others count as "prompts/tied")."""
    for p in range(P):
        idx, z, s = prompt_view(a, p)
        pairs = strict_pairs(s)
        if pairs:
            yield p, idx, z, s, pairs


def gains(s):
    return 2.0 ** (s - s.min()) - 1.0


def inv_disc_by(values):
    """1/log2(1 + rank), rank 1-based by values descending, ties to the lower index."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    rank = np.empty(len(values))
    rank[order] = np.arange(1, len(values) + 1)
    return 1.0 / np.log2(1.0 + rank)


def np_metrics(a, reward_fn):
    best, worst, correct, strict, means, used = [], [], 0, 0, [], 0
    for p, idx, z, s, pairs in used_prompts(a):
        used += 1
        r = reward_fn(p, idx, z)
        b = max(range(len(s)), key=lambda i: (s[i], -i))
        w = min(range(len(s)), key=lambda i: (s[i], i))
        best.append(r[b])
        worst.append(r[w])
        correct += sum(r[i] > r[j] for i, j in pairs)
        strict += len(pairs)
        means.extend(r)
    return {"rewards/best": np.mean(best), "rewards/worst": np.mean(worst),
            "rewards/margin": np.mean(best) - np.mean(worst), "rewards/accuracy": correct / strict,
            "rewards/mean": np.mean(means), "prompts/used": used, "prompts/tied": P - used}  # fmt: skip


def np_plackett_luce(a, beta=0.1, top_k=None):
    losses = []
    for _, _, z, s, _ in used_prompts(a):
        r, total = beta * z, 0.0
        for k in range(len(s)):
            worse = [j for j in range(len(s)) if s[j] < s[k]]
            position = sum(s[j] > s[k] for j in range(len(s)))
            if worse and (top_k is None or position < top_k):
                total += lse(r[[k, *worse]]) - r[k]
        losses.append(total)
    return np.mean(losses), np_metrics(a, lambda p, idx, z: beta * z)


def np_rankdpo(a, beta=0.1, rank_by="policy"):
    losses = []
    for _, _, z, s, pairs in used_prompts(a):
        r, g = beta * z, gains(s)
        inv = inv_disc_by(r if rank_by == "policy" else s)
        w = {(i, j): abs(g[i] - g[j]) * abs(inv[i] - inv[j]) for i, j in pairs}
        losses.append(sum(w[i, j] * -logsig(r[i] - r[j]) for i, j in pairs) / sum(w.values()))
    return np.mean(losses), np_metrics(a, lambda p, idx, z: beta * z)


def np_tpo_rewards(a, p, idx, adaptive=True, released=False):
    """R(y) for the valid candidates of prompt p."""
    s = np.array([a["scores"][p, k] for k in idx])
    top = idx[max(range(len(idx)), key=lambda i: (s[i], -i))]
    out = []
    for k in idx:
        tok = (a["mask"][p, k] > 0)
        ratio = a["policy"][p, k] - a["reference"][p, k]
        num = den = 0.0
        for step in sorted(set(a["step_ids"][p, k][tok]) - {-1}):
            sel = tok & (a["step_ids"][p, k] == step)
            r_step = ratio[sel].mean()
            w = 1.0
            if adaptive:
                sel0 = (a["mask"][p, top] > 0) & (a["step_ids"][p, top] == step)
                if sel0.any():
                    h, h0 = a["hidden"][p, k][sel].mean(0), a["hidden"][p, top][sel0].mean(0)
                    w = 1.0 + h @ h0 / (np.linalg.norm(h) * np.linalg.norm(h0))
                elif released:
                    w = 0.0
            num += w * r_step
            den += w
        out.append(num / den if den != 0 else 0.0)
    return np.array(out)


def np_tpo(a, beta=0.5, adaptive_weights=True, released_code_form=False):
    per = []
    for p, idx, _, s, pairs in used_prompts(a):
        R = np_tpo_rewards(a, p, idx, adaptive_weights, released_code_form)
        if released_code_form:
            n = len(s)
            total = sum(-logsig((R[i] - R[j]) * np.sign(s[i] - s[j])) for i in range(n) for j in range(n))
            per.append(total / (n * (n - 1)))
        else:
            g, inv = gains(s), inv_disc_by(s)
            idcg = np.sum(g * inv)
            per.append(sum(abs(g[i] - g[j]) * abs(inv[i] - inv[j]) / idcg * -logsig(beta * (R[i] - R[j]))
                           for i, j in pairs))  # fmt: skip
    loss = -logsig(beta * np.mean(per)) if released_code_form else np.mean(per)
    rewards = lambda p, idx, z: beta * np_tpo_rewards(a, p, idx, adaptive_weights, released_code_form)  # noqa: E731
    return loss, np_metrics(a, rewards)


def np_smooth(q0, eps):
    n = len(q0)
    return (1 - eps) * q0 + eps * (1 - q0) / (n - 1)


def np_kl(q, logits):
    logp = logits - lse(logits)
    ce = -np.sum(q * logp)
    return ce + np.sum(q[q > 0] * np.log(q[q > 0])), ce


def np_adpo(a, tau=10.0, target="smoothed", label_smoothing=0.0, target_temperature=1.0):
    eps, kls, ces = label_smoothing, [], []
    for _, _, z, s, pairs in used_prompts(a):
        x = z / tau
        if target == "top1":
            q0 = (s == s.max()) / np.sum(s == s.max())
            kl, ce = np_kl(np_smooth(q0, eps), x)
        elif target == "smoothed":
            q0 = np.exp(s / target_temperature - lse(s / target_temperature))
            kl, ce = np_kl(np_smooth(q0, eps), x)
        elif target == "pairwise":
            terms = [np_kl(np.array([1 - eps, eps]), x[[i, j]]) for i, j in pairs]
            kl, ce = np.mean([t[0] for t in terms]), np.mean([t[1] for t in terms])
        else:
            kl = ce = 0.0
            for k in range(len(s)):
                worse = [j for j in range(len(s)) if s[j] < s[k]]
                if worse:
                    q0 = np.array([1.0] + [0.0] * len(worse))
                    t = np_kl(np_smooth(q0, eps), x[[k, *worse]])
                    kl, ce = kl + t[0], ce + t[1]
        kls.append(kl)
        ces.append(ce)
    metrics = np_metrics(a, lambda p, idx, z: z / tau)
    metrics["adpo/cross_entropy"] = np.mean(ces)
    return np.mean(kls), metrics


NUMPY = {"plackett_luce": np_plackett_luce, "rankdpo": np_rankdpo, "tpo": np_tpo, "adpo": np_adpo}

CASES = [
    ("plackett_luce", {}), ("plackett_luce", {"beta": 1.0}), ("plackett_luce", {"beta": 0.7, "top_k": 1}),
    ("plackett_luce", {"beta": 0.7, "top_k": 2}),
    ("rankdpo", {}), ("rankdpo", {"beta": 1.0}), ("rankdpo", {"beta": 1.0, "rank_by": "scores"}),
    ("tpo", {}), ("tpo", {"beta": 2.0}), ("tpo", {"adaptive_weights": False}),
    ("tpo", {"released_code_form": True}), ("tpo", {"beta": 2.0, "released_code_form": True}),
    *[("adpo", {"target": t, "tau": tau, "label_smoothing": e})
      for t in listwise.ADPO_TARGETS for tau, e in ((10.0, 0.0), (0.5, 0.2))],
    ("adpo", {"target": "smoothed", "tau": 1.0, "label_smoothing": 0.1, "target_temperature": 0.3}),
]  # fmt: skip


def case_id(case):
    name, kw = case
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


_COMPILED = {}


def compiled(name, kwargs, grad=False):
    """One jitted function per objective and hyper-parameters (hyper-parameters are static), to keep the file fast."""
    key = (name, tuple(sorted(kwargs.items())), grad)
    if key not in _COMPILED:
        fn = lambda x: OBJECTIVES[name](x, **kwargs)  # noqa: E731
        if grad:
            fn = jax.grad(lambda policy, x: OBJECTIVES[name](x.replace(policy=policy), **kwargs)[0])
        _COMPILED[key] = jax.jit(fn)
    return _COMPILED[key]


def run(name, inputs, **kwargs):
    return compiled(name, kwargs)(inputs)


# ------------------------------------------------------------------------------------------------------------------
# 0. registry and inputs


def test_registered_with_family_and_declared_extras():
    for name in NAMES:
        assert OBJECTIVES[name] is getattr(listwise, name)
        assert SPECS[name].family == "listwise" and SPECS[name].needs_reference
    assert SPECS["tpo"].extras == ("step_ids", "hidden")
    assert all(SPECS[n].extras == () for n in ("plackett_luce", "rankdpo", "adpo"))


def test_inputs_contain_the_edge_cases():
    a = make_arrays(0)
    assert np.isnan(a["policy"][a["valid"] == 0]).all() and np.isnan(SCORES).any()
    lengths = a["mask"].sum(-1)
    assert 1 in lengths and len(set(lengths.ravel())) > 3
    assert any(len(set(s[~np.isnan(s)])) < (~np.isnan(s)).sum() for s in SCORES)  # ties
    assert (SCORES < 0).any()
    # the top candidate lacks a step index that another candidate has (TPO's "weight 1" rule is exercised)
    assert any(
        set(a["step_ids"][p, k][a["mask"][p, k] > 0]) - set(a["step_ids"][p, np.nanargmax(SCORES[p])]) - {-1}
        for p in range(P) for k in range(K) if a["valid"][p, k]
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# 1. against the NumPy references


@pytest.mark.parametrize("name,kwargs", CASES, ids=[case_id(c) for c in CASES])
def test_value_and_metrics_match_numpy_reference(name, kwargs):
    for seed in (0, 1):
        a = make_arrays(seed)
        loss, metrics = run(name, to_inputs(a), **kwargs)
        expected, expected_metrics = NUMPY[name](a, **kwargs)
        np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=1e-6, err_msg=name)
        for key, value in expected_metrics.items():
            np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, atol=1e-6, err_msg=f"{name} {key}")
        assert metrics["prompts/used"] == 5 and metrics["prompts/tied"] == 2


def test_reference_distinguishes_the_variants():
    """Guards against vacuous comparisons: the cases give different numbers (ADPO's PL target at tau=10, eps=0 is
    plackett_luce at beta=0.1 by design, see the reduction tests)."""
    a = make_arrays(0)
    cases = [c for c in CASES if c != ("adpo", {"target": "plackett_luce", "tau": 10.0, "label_smoothing": 0.0})]
    values = [round(float(run(n, to_inputs(a), **kw)[0]), 6) for n, kw in cases]
    assert len(set(values)) == len(values), values


def test_tpo_adaptive_weights_differ_from_one():
    a = make_arrays(0)
    _, metrics = run("tpo", to_inputs(a))
    assert abs(float(metrics["tpo/mean_step_weight"]) - 1.0) > 1e-3


# Score-induced rank positions (RankDPO rank_by="scores", TPO's lambda and y_0) follow the index tie-break among
# tied scores, so those cases are not permutation-invariant on inputs with ties.
PERMUTATION_CASES = [c for c in CASES[::3] if c[0] != "tpo" and c[1].get("rank_by") != "scores"]


@pytest.mark.parametrize("name,kwargs", PERMUTATION_CASES, ids=[case_id(c) for c in PERMUTATION_CASES])
def test_invariant_to_the_order_of_candidates(name, kwargs):
    a = make_arrays(2)
    perm = np.array([2, 0, 3, 1])
    b = {k: v[:, perm] for k, v in a.items()}
    np.testing.assert_allclose(float(run(name, to_inputs(b), **kwargs)[0]), float(run(name, to_inputs(a), **kwargs)[0]),
                               rtol=1e-5)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# 2. reductions


def two_candidates(seed=4):
    """K = 2, no ties, the better candidate sometimes in slot 1; plus the equivalent PairwiseInputs."""
    rng = np.random.default_rng(seed)
    n, t = 6, 7
    mask = np.zeros((n, 2, t))
    for i in range(n):
        for k in range(2):
            length = rng.integers(1, t + 1)
            mask[i, k, :length] = 1.0
    reference = -rng.uniform(0.1, 2.0, (n, 2, t)) * mask
    policy = (reference + rng.normal(0, 0.8, (n, 2, t))) * mask
    scores = rng.permutation(np.array([[1.0, 0.0]] * 3 + [[0.0, 2.0]] * 3))
    w = np.argmax(scores, 1)
    l = 1 - w
    rows = np.arange(n)
    lw = ListwiseInputs(policy=jnp.asarray(policy, jnp.float32), reference=jnp.asarray(reference, jnp.float32),
                        mask=jnp.asarray(mask, jnp.float32), scores=jnp.asarray(scores, jnp.float32),
                        valid=jnp.ones((n, 2), jnp.float32))  # fmt: skip
    pw = PairwiseInputs(policy_chosen=lw.policy[rows, w], policy_rejected=lw.policy[rows, l],
                        reference_chosen=lw.reference[rows, w], reference_rejected=lw.reference[rows, l],
                        chosen_mask=lw.mask[rows, w], rejected_mask=lw.mask[rows, l])  # fmt: skip
    return lw, pw, w


def _pairwise_grads(fn, pw):
    return jax.jit(jax.grad(lambda c, r: fn(pw.replace(policy_chosen=c, policy_rejected=r))[0], (0, 1)))(
        pw.policy_chosen, pw.policy_rejected)


def _listwise_grad_as_pairs(fn, lw, w):
    g = jax.jit(jax.grad(lambda x: fn(lw.replace(policy=x))[0]))(lw.policy)
    rows = np.arange(len(w))
    return g[rows, w], g[rows, 1 - w]


@pytest.mark.parametrize("name", ["plackett_luce", "rankdpo"])
@pytest.mark.parametrize("beta", [0.1, 1.3])
def test_k2_equals_sigmoid_dpo(name, beta):
    lw, pw, w = two_candidates()
    fn = lambda x: OBJECTIVES[name](x, beta=beta)  # noqa: E731
    np.testing.assert_allclose(float(jax.jit(fn)(lw)[0]), float(sigmoid(pw, beta=beta)[0]), rtol=1e-6)
    for got, want in zip(_listwise_grad_as_pairs(fn, lw, w), _pairwise_grads(lambda x: sigmoid(x, beta=beta), pw)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("target", ["top1", "pairwise", "plackett_luce"])
@pytest.mark.parametrize("tau,eps", [(10.0, 0.1), (0.5, 0.3)])
def test_adpo_k2_one_hot_plus_eps_is_cdpo_with_beta_one_over_tau(target, tau, eps):
    lw, pw, w = two_candidates()
    fn = lambda x: listwise.adpo(x, tau=tau, target=target, label_smoothing=eps)  # noqa: E731
    loss, metrics = jax.jit(fn)(lw)
    cdpo_loss = float(pairwise.cdpo(pw, beta=1.0 / tau, label_smoothing=eps)[0])
    entropy = -sum(q * np.log(q) for q in (1 - eps, eps) if q > 0)
    np.testing.assert_allclose(float(metrics["adpo/cross_entropy"]), cdpo_loss, rtol=1e-6)
    np.testing.assert_allclose(float(loss), cdpo_loss - entropy, rtol=1e-5, atol=1e-6)
    want = _pairwise_grads(lambda x: pairwise.cdpo(x, beta=1.0 / tau, label_smoothing=eps), pw)
    for got, exp in zip(_listwise_grad_as_pairs(fn, lw, w), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5, atol=1e-8)


def test_adpo_plackett_luce_target_without_smoothing_is_plackett_luce():
    inputs = to_inputs(make_arrays(3))
    np.testing.assert_allclose(float(run("adpo", inputs, tau=0.4, target="plackett_luce")[0]),
                               float(run("plackett_luce", inputs, beta=2.5)[0]), rtol=1e-5)  # fmt: skip


def test_plackett_luce_without_ties_is_eq18_over_the_sorted_list():
    a = make_arrays(5)
    expected = []
    for p in range(P):
        idx, z, s = prompt_view(a, p)
        if len(set(s)) != len(s) or len(s) < 2:
            continue
        r = 0.8 * z[np.argsort(-s)]
        expected.append(-sum(r[k] - lse(r[k:]) for k in range(len(r))))
    assert len(expected) == 3  # prompts 0, 4 and 6
    # the batch also holds tied prompts 1 and 5; check those separately against the strict-order rule
    a_no_ties = {k: v[[0, 4, 6]] for k, v in a.items()}
    got = run("plackett_luce", to_inputs(a_no_ties), beta=0.8)[0]
    np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-5)


def test_plackett_luce_top_k_truncates_to_the_leading_factors():
    a = make_arrays(6)
    full = float(run("plackett_luce", to_inputs(a), beta=1.0)[0])
    top_big = float(run("plackett_luce", to_inputs(a), beta=1.0, top_k=K)[0])
    top1 = float(run("plackett_luce", to_inputs(a), beta=1.0, top_k=1)[0])
    assert full == pytest.approx(top_big) and 0 < top1 < full


def test_rankdpo_weights_are_invariant_to_shifting_scores():
    a = make_arrays(7)
    b = dict(a, scores=a["scores"] + 3.7)
    for rank_by in listwise.RANKDPO_RANK_BY:
        np.testing.assert_allclose(float(run("rankdpo", to_inputs(b), rank_by=rank_by)[0]),
                                   float(run("rankdpo", to_inputs(a), rank_by=rank_by)[0]), rtol=1e-5)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# 3. gradients


def near_reference(seed=8):
    """policy == reference on every valid completion (z = 0 everywhere, TPO's R = 0): the gradient sign is fixed."""
    a = make_arrays(seed)
    a["policy"] = np.where(a["valid"][..., None] > 0, np.where(a["mask"] > 0, a["reference"], 50.0), np.nan)
    return a


GRAD_CASES = [c for c in CASES if not c[1].get("released_code_form")]


def policy_grad(name, a, **kwargs):
    inputs = to_inputs(a)
    g = np.asarray(compiled(name, kwargs, grad=True)(inputs.policy, inputs))
    assert np.all(np.isfinite(g)), name
    assert np.all(g[(a["mask"] == 0) | (a["valid"][..., None] == 0)] == 0), "padding or invalid got gradient"
    return g.sum(-1)


@pytest.mark.parametrize("name,kwargs", GRAD_CASES, ids=[case_id(c) for c in GRAD_CASES])
def test_gradient_raises_the_top_candidate_and_lowers_the_bottom_one(name, kwargs):
    a = near_reference()
    g = policy_grad(name, a, **kwargs)
    for p in range(P):
        idx, _, s = prompt_view(a, p)
        if not strict_pairs(s):
            assert np.all(g[p] == 0), (name, p)
            continue
        best = [idx[i] for i in range(len(s)) if s[i] == s.max()]
        worst = [idx[i] for i in range(len(s)) if s[i] == s.min()]
        assert np.all(g[p, best] < 0), (name, p, g[p])
        assert np.all(g[p, worst] > 0), (name, p, g[p])


LEARN = [("plackett_luce", {"beta": 1.0}), ("rankdpo", {"beta": 1.0}), ("tpo", {"beta": 2.0}),
         *[("adpo", {"tau": 1.0, "target": t}) for t in listwise.ADPO_TARGETS]]  # fmt: skip


@pytest.mark.parametrize("name,kwargs", LEARN, ids=[case_id(c) for c in LEARN])
def test_gradient_descent_puts_the_best_candidate_first(name, kwargs):
    """Learning: from policy == reference, 300 gradient steps on one log-ratio offset per candidate (spread over its
    tokens; per token for TPO, whose R is a mean over tokens) rank every used prompt's best candidate first, and
    every strictly preferred pair correctly for the objectives whose targets order the whole list (ADPO's top-1
    target and TPO's small lambda for low-ranked pairs do not, within 300 steps)."""
    a = near_reference(12)
    inputs = to_inputs(a)
    spread = inputs.mask if name == "tpo" else inputs.mask / jnp.maximum(inputs.mask.sum(-1), 1.0)[..., None]

    def objective(theta):
        return OBJECTIVES[name](inputs.replace(policy=inputs.reference + spread * theta[..., None]), **kwargs)

    @jax.jit
    def train(theta):
        return jax.lax.fori_loop(0, 300, lambda _, th: th - 2.0 * jax.grad(lambda t: objective(t)[0])(th), theta)

    theta = train(jnp.zeros((P, K)))
    start, end, metrics = float(objective(jnp.zeros((P, K)))[0]), *objective(theta)
    assert float(end) < start
    theta = np.asarray(theta)
    for p, idx, _, s, _ in used_prompts(a):
        best = [idx[i] for i in range(len(s)) if s[i] == s.max()]
        rest = [idx[i] for i in range(len(s)) if s[i] < s.max()]
        assert theta[p, best].min() > theta[p, rest].max(), (name, p, theta[p])
    if not (name == "tpo" or kwargs.get("target") == "top1"):
        assert float(metrics["rewards/accuracy"]) == 1.0, (name, metrics)


def test_tpo_released_code_form_trains_the_ranking_backwards():
    """The released code's outer -logsig is decreasing, so its gradient has the opposite sign (a likely bug)."""
    a = near_reference()
    paper = policy_grad("tpo", a)
    released = policy_grad("tpo", a, released_code_form=True)
    for p in (0, 4, 6):
        best, worst = np.nanargmax(SCORES[p]), np.nanargmin(SCORES[p])
        assert paper[p, best] < 0 < released[p, best]
        assert paper[p, worst] > 0 > released[p, worst]


def all_tied(a):
    b = dict(a)
    b["scores"] = np.where(np.isnan(SCORES), np.nan, 1.5)
    return b


@pytest.mark.parametrize("name,kwargs", CASES, ids=[case_id(c) for c in CASES])
def test_all_tied_batch_gives_zero_loss_and_zero_finite_gradients(name, kwargs):
    a = all_tied(make_arrays(9))
    loss, metrics = run(name, to_inputs(a), **kwargs)
    assert float(loss) == 0.0 and metrics["prompts/used"] == 0 and metrics["prompts/tied"] == P
    assert all(np.isfinite(float(v)) for v in metrics.values())
    g = policy_grad(name, a, **kwargs)
    assert np.all(g == 0)


def test_tpo_gradient_reaches_hidden_states_unless_stopped():
    a = make_arrays(10)
    inputs = to_inputs(a)

    def loss(h):
        return listwise.tpo(inputs.replace(extras=dict(inputs.extras, hidden=h)))[0]

    g = np.asarray(jax.jit(jax.grad(loss))(inputs.extras["hidden"]))
    assert np.all(np.isfinite(g)) and np.any(g != 0)
    assert np.all(g[a["valid"] == 0] == 0) and np.all(g[a["mask"] == 0] == 0)


def test_tpo_without_hidden_runs_with_unit_weights():
    a = make_arrays(11)
    loss, metrics = run("tpo", to_inputs(a, extras=("step_ids",)), adaptive_weights=False)
    np.testing.assert_allclose(float(loss), np_tpo(a, adaptive_weights=False)[0], rtol=2e-5)
    assert float(metrics["tpo/mean_step_weight"]) == 1.0


def test_step_ids_from_separators():
    sep = 9
    tokens = np.array([[5, 1, 9, 2, 3, 9, 4, 0, 0], [1, 9, 9, 2, 0, 0, 0, 0, 0]])
    mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0]])
    ids = np.asarray(listwise.step_ids_from_separators(tokens, mask, sep))
    np.testing.assert_array_equal(ids, [[-1, 0, 0, 1, 1, 1, 2, 2, -1], [0, 0, 1, 2, -1, -1, -1, -1, -1]])


def test_step_ids_on_an_encoded_arith_completion():
    from jaxalign.tasks import arith  # noqa: PLC0415
    from jaxalign.tasks.tokenizer import CharTokenizer  # noqa: PLC0415

    tokenizer = CharTokenizer()
    prompt, completion = arith.prompt_text([3, 9, 4]), arith.solution_text([3, 9, 4])
    tokens, _, completion_mask = arith.encode_example(tokenizer, prompt, completion, 32)
    ids = np.asarray(listwise.step_ids_from_separators(tokens, completion_mask, tokenizer.encode(";")[0]))
    steps = completion.split(";")
    expected = [k for k, step in enumerate(steps) for _ in range(len(step) + 1)]  # each step + its ';' or the EOS
    np.testing.assert_array_equal(ids[completion_mask > 0], expected)
    assert np.all(ids[completion_mask == 0] == -1)


# ------------------------------------------------------------------------------------------------------------------
# 4. validation

BAD = [
    *[(n, {"beta": b}, "beta", repr(b)) for n in ("plackett_luce", "rankdpo", "tpo") for b in (0.0, -1.0)],
    ("plackett_luce", {"top_k": 0}, "top_k", "0"),
    ("plackett_luce", {"top_k": True}, "top_k", "True"),
    ("plackett_luce", {"top_k": 1.5}, "top_k", "1.5"),
    ("rankdpo", {"rank_by": "model"}, "rank_by", "'model'"),
    ("tpo", {"released_code_form": "yes"}, "released_code_form", "'yes'"),
    ("tpo", {"adaptive_weights": 1}, "adaptive_weights", "1"),
    ("tpo", {"max_steps": 0}, "max_steps", "0"),
    ("adpo", {"tau": 0.0}, "tau", "0.0"),
    ("adpo", {"tau": "1"}, "tau", "'1'"),
    ("adpo", {"target": "listwise"}, "target", "'listwise'"),
    ("adpo", {"label_smoothing": 0.6}, "label_smoothing", "0.6"),
    ("adpo", {"target_temperature": -1.0}, "target_temperature", "-1.0"),
]


@pytest.mark.parametrize("name,kwargs,param,value", BAD, ids=[f"{b[0]}-{b[2]}={b[3]}" for b in BAD])
def test_bad_hyper_parameters_raise_a_clear_error(name, kwargs, param, value):
    assert_names_parameter(lambda: OBJECTIVES[name](to_inputs(make_arrays(0)), **kwargs), name, param, value)


@pytest.mark.parametrize(
    "extras,kwargs,field",
    [((), {}, "step_ids"), (("step_ids",), {}, "hidden"), (("hidden",), {"adaptive_weights": False}, "step_ids")],
)
def test_tpo_missing_extras_name_the_field(extras, kwargs, field):
    with pytest.raises(ValueError, match=rf"tpo.*'{field}'"):
        listwise.tpo(to_inputs(make_arrays(0), extras=extras), **kwargs)


def test_tpo_bad_extras_shapes_and_step_ids():
    inputs = to_inputs(make_arrays(0))
    with pytest.raises(ValueError, match=r"tpo.*'hidden'.*shape"):
        listwise.tpo(inputs.replace(extras=dict(inputs.extras, hidden=inputs.extras["hidden"][..., 0])))
    with pytest.raises(ValueError, match=r"tpo.*'step_ids'.*shape"):
        listwise.tpo(inputs.replace(extras=dict(inputs.extras, step_ids=inputs.extras["step_ids"][:, :, :-1])))
    with pytest.raises(ValueError, match=r"tpo.*'step_ids'.*\[-1, 2\)"):
        listwise.tpo(inputs, max_steps=2)
    with pytest.raises(ValueError, match=r"tpo.*'step_ids'.*integers"):
        listwise.tpo(inputs.replace(extras=dict(inputs.extras, step_ids=inputs.extras["step_ids"] * 1.0)))


def test_traced_hyper_parameters_pass_validation_under_jit():
    a = make_arrays(0)
    got = jax.jit(lambda b: listwise.plackett_luce(to_inputs(a), beta=b)[0])(0.7)
    np.testing.assert_allclose(float(got), np_plackett_luce(a, 0.7)[0], rtol=2e-5)
    got = jax.jit(lambda t, e: listwise.adpo(to_inputs(a), tau=t, label_smoothing=e, target="top1")[0])(0.5, 0.2)
    np.testing.assert_allclose(float(got), np_adpo(a, 0.5, "top1", 0.2)[0], rtol=2e-5)
