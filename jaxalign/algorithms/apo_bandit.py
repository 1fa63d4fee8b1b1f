"""APO on a tabular K-armed bandit with EXACT proximal steps: a closed-form demonstration of Nesterov acceleration.

He et al. (2024), "Accelerated Preference Optimization" (APO; docs/algorithms.md, "APO": the form implemented is
the one below, not checked equation by equation against the paper). The paper views iterative DPO as a proximal
point method and accelerates it with Nesterov extrapolation. On a bandit (one prompt, K responses, known reward
vector r, a Bradley-Terry oracle P(y > y') = sig(r(y) - r(y'))) each proximal step has a closed form, so the
acceleration can be seen without sampling or optimisation noise.

The recursion (iteration t = 0, 1, ...; pihat_{-1} = pihat_0 = pi_0, the initial policy):

    proximal step   pihat_{t+1} = argmin_pi E_{y, y' ~ pi_t, label ~ BT} [DPO loss of pi against reference pi_t]
                                = pi_t * exp(r / beta) / Z                                         (closed form)
    extrapolation   log pi_{t+1} = (1 + a) log pihat_{t+1} - a log pihat_t - log Z                 (Nesterov step)

a = 0 is iterative DPO. Why the closed form: for an unordered pair {y, y'} (both in the support of pi_t) the
population loss holds pi_t(y) pi_t(y') [P(y > y') (-logsig(beta u)) + P(y' > y) (-logsig(-beta u))] with
u = log pi(y)/pi_t(y) - log pi(y')/pi_t(y'); it is convex in u and minimised where sig(beta u) = P(y > y') =
sig(r(y) - r(y')), i.e. beta u = r(y) - r(y'). Every pair has weight > 0 when pi_t has full support, so
log pi - log pi_t = r / beta + const is the unique minimiser (log pi is identified only on the support of pi_t:
hence pi_0 must have full support; every later pi_t then has it too). The pair weights (the sampling policy) do
not move the minimiser, only its conditioning: APO acts through the extrapolated reference, not through which
pairs are sampled.

In log space both steps are affine, so log pi_t = log pi_0 + c_t r / beta + const with c_0 = 0, c_1 = 1 + a, and
c_{t+1} - c_t = 1 + a + ... + a^(t+1) -> 1 / (1 - a): iterative DPO moves the inverse temperature by 1 per
iteration, APO by up to 1 / (1 - a) (2 for a = 0.5). E_{pi_t}[r] is increasing in c_t (its derivative is
Var_{pi_t}(r) / beta), so APO reaches iterative DPO's final expected reward in fewer iterations (`bandit_demo`).
A consequence worth knowing when reading the demo: with the target = iterative DPO's reward after T steps on the same
bandit, the iterations APO needs are the first t with c_t >= T, the same for every bandit whose rewards are not all
equal (a = 0.3: 8, a = 0.5: 6 for T = 10); the bandit changes how much reward the speed-up buys, not the iteration
count.

The closed form is checked independently by `numerical_proximal_step`: it minimises the population loss built from
the library's own `jaxalign.losses.iterative.apo_dpo` over tabular logits with L-BFGS (optax) in float64. In that loss
the reference of iteration t is given, as in training, by two frozen checkpoints, pihat_t (`reference_*`) and
pihat_{t-1} (`previous_*`), and APO's extrapolated reference log-ratio (1 + a) Deltahat_t - a Deltahat_{t-1} needs no
log Z.

Contents: `make_bandit`, `bt_preferences`, `expected_reward`, `proximal_step`, `extrapolate`,
`population_dpo_loss`, `numerical_proximal_step`, `run_apo_bandit` (-> `BanditTrajectory`), `iterations_to_reach`,
`bandit_demo`, `summarize`, `plot_bandit`. Pure NumPy (float64) except the numerical minimiser (JAX, float64 inside
`jax.enable_x64`). Errors: one ValueError naming the function, the parameter and the value.

    python -m jaxalign.algorithms.apo_bandit [--plot PATH] [--method closed_form|numerical]
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxalign import paths

BANDIT_METHODS = ("closed_form", "numerical")
# A policy given as probabilities must sum to 1 within this (float32 round-off of K probabilities fits easily).
DISTRIBUTION_ATOL = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_beta(fn: str, beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{fn}: beta must be a finite number > 0 (the KL-penalty strength), got {beta!r}")
    return float(beta)


def _check_alpha(fn: str, alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"{fn}: alpha must be a number with 0 <= alpha < 1 (Nesterov momentum), got {alpha!r}")
    return float(alpha)


def _check_int(fn: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_rewards(fn: str, rewards: Any) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.shape[0] < 2:
        raise ValueError(f"{fn}: rewards must be a 1-D array of K >= 2 arm rewards, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        bad = int(np.flatnonzero(~np.isfinite(r))[0])
        raise ValueError(f"{fn}: rewards must be finite; arm {bad} has {r[bad]!r}")
    return r


def _check_log_policy(fn: str, name: str, log_policy: Any, num_arms: int) -> np.ndarray:
    """A log-policy [K] with full support (every entry finite) whose exp sums to 1."""
    lp = np.asarray(log_policy, dtype=np.float64)
    if lp.shape != (num_arms,):
        raise ValueError(f"{fn}: {name} must have shape ({num_arms},) (one log-probability per arm), got {lp.shape}")
    if not np.all(np.isfinite(lp)):
        bad = int(np.flatnonzero(~np.isfinite(lp))[0])
        raise ValueError(f"{fn}: {name} must be finite (full support: the proximal minimiser is identified only on "
                         f"the reference's support); arm {bad} has {lp[bad]!r}")
    total = float(np.sum(np.exp(lp)))
    if abs(total - 1.0) > DISTRIBUTION_ATOL:
        raise ValueError(f"{fn}: {name} must be normalised log-probabilities (exp sums to 1), sums to {total!r}")
    return lp


def _check_policy(fn: str, name: str, policy: Any, num_arms: int) -> np.ndarray:
    """Probabilities [K] -> log-probabilities; full support required (see the module docstring)."""
    p = np.asarray(policy, dtype=np.float64)
    if p.shape != (num_arms,):
        raise ValueError(f"{fn}: {name} must have shape ({num_arms},) (one probability per arm), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"{fn}: {name} must hold finite probabilities >= 0, got {p.tolist()}")
    if abs(float(p.sum()) - 1.0) > DISTRIBUTION_ATOL:
        raise ValueError(f"{fn}: {name} must be a distribution (sum 1), sums to {float(p.sum())!r}")
    if np.any(p == 0):
        raise ValueError(f"{fn}: {name} must have full support (every arm > 0): the population DPO minimiser is "
                         f"identified only on the reference's support; arms {np.flatnonzero(p == 0).tolist()} are 0")
    return _log_normalize(np.log(p))


def _check_method(fn: str, method: Any) -> str:
    if method not in BANDIT_METHODS:
        raise ValueError(f"{fn}: method must be one of {BANDIT_METHODS}, got {method!r}")
    return method


def _log_normalize(x: np.ndarray) -> np.ndarray:
    """x - logsumexp(x): shifting by the max first keeps exp from overflowing when r / beta is large."""
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


# ----------------------------------------------------------------------------------------------------------------
# the bandit


def make_bandit(seed: int, num_arms: int = 8, reward_scale: float = 1.0,
                initial: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """(rewards [K], initial policy pi_0 [K] as probabilities) of a seeded K-armed bandit.

    rewards ~ reward_scale * N(0, 1) i.i.d. from `np.random.default_rng(seed)`; pi_0 = softmax of N(0, 1) logits from
    the same generator (initial="random") or uniform (initial="uniform"). Both have full support.
    """
    fn = "make_bandit"
    seed = _check_int(fn, "seed", seed, 0)
    num_arms = _check_int(fn, "num_arms", num_arms, 2)
    if isinstance(reward_scale, bool) or not isinstance(reward_scale, numbers.Real) or not (
        math.isfinite(reward_scale) and reward_scale > 0
    ):
        raise ValueError(f"{fn}: reward_scale must be a finite number > 0, got {reward_scale!r}")
    if initial not in ("random", "uniform"):
        raise ValueError(f"{fn}: initial must be 'random' or 'uniform', got {initial!r}")
    rng = np.random.default_rng(seed)
    rewards = reward_scale * rng.standard_normal(num_arms)
    logits = rng.standard_normal(num_arms) if initial == "random" else np.zeros(num_arms)
    return rewards, np.exp(_log_normalize(logits))


def bt_preferences(rewards: Any) -> np.ndarray:
    """[K, K] Bradley-Terry oracle: P[y, y'] = P(y preferred to y') = sig(r(y) - r(y')); P + P.T = 1, diag 1/2."""
    r = _check_rewards("bt_preferences", rewards)
    gap = r[:, None] - r[None, :]
    # 1 / (1 + e^-x) overflows e^-x for very negative x; the tanh form is exact and never overflows.
    return 0.5 * (1.0 + np.tanh(0.5 * gap))


def expected_reward(log_policy: Any, rewards: Any) -> float:
    """E_{y ~ pi}[r(y)] for a log-policy [K]."""
    r = _check_rewards("expected_reward", rewards)
    lp = _check_log_policy("expected_reward", "log_policy", log_policy, r.shape[0])
    return float(np.sum(np.exp(lp) * r))


# ----------------------------------------------------------------------------------------------------------------
# the two steps of APO


def proximal_step(log_reference: Any, rewards: Any, beta: float) -> np.ndarray:
    """The exact proximal (population iterative-DPO) step: log pihat = log_softmax(log pi_ref + r / beta).

    He et al. (2024), the proximal point view of iterative DPO, with a Bradley-Terry oracle on a bandit: the population
    DPO loss with pairs from pi_ref x pi_ref is minimised where beta * (log-ratio of y - log-ratio of y') =
    r(y) - r(y') for every pair in the support (module docstring), i.e. pihat proportional to pi_ref * exp(r / beta).
    `log_reference` [K] normalised log-probabilities with full support; returns normalised log-probabilities.
    """
    fn = "proximal_step"
    beta = _check_beta(fn, beta)
    r = _check_rewards(fn, rewards)
    lp = _check_log_policy(fn, "log_reference", log_reference, r.shape[0])
    return _log_normalize(lp + r / beta)


def extrapolate(log_hat_next: Any, log_hat_prev: Any, alpha: float) -> np.ndarray:
    """APO's Nesterov step on log-policies: log pi = (1 + a) log pihat_next - a log pihat_prev - log Z.

    He et al. (2024); docs/algorithms.md, "APO". a = 0 returns log pihat_next (renormalised, which leaves a normalised
    input unchanged up to round-off). Both [K], normalised, full support.
    """
    fn = "extrapolate"
    alpha = _check_alpha(fn, alpha)
    nxt = np.asarray(log_hat_next, dtype=np.float64)
    if nxt.ndim != 1:
        raise ValueError(f"{fn}: log_hat_next must be a 1-D log-policy [K], got shape {nxt.shape}")
    nxt = _check_log_policy(fn, "log_hat_next", nxt, nxt.shape[0])
    prev = _check_log_policy(fn, "log_hat_prev", log_hat_prev, nxt.shape[0])
    return _log_normalize((1.0 + alpha) * nxt - alpha * prev)


# ----------------------------------------------------------------------------------------------------------------
# the independent check: minimise the library's apo_dpo loss numerically


def population_dpo_loss(logits: Any, log_hat: Any, log_hat_prev: Any, rewards: Any, beta: Any, alpha: Any) -> Any:
    """The population APO-DPO loss over tabular logits (a jax scalar; differentiable in `logits`).

    sum_{y, y'} pi_t(y) pi_t(y') P(y > y') * apo_dpo(chosen y, rejected y'), over ALL K^2 ordered pairs (y = y'
    adds the constant log 2 weighted by P = 1/2), where pi_t = extrapolate(pihat_t, pihat_{t-1}, a) is the sampling
    policy, P the Bradley-Terry oracle and apo_dpo is `jaxalign.losses.iterative.apo_dpo` on one pair with one
    "token" per response: the policy log-probs are log_softmax(logits), `reference_*` are log pihat_t (`log_hat`),
    `previous_*` log pihat_{t-1} (`log_hat_prev`), masks of ones. apo_dpo averages over its batch, so it is vmapped
    over single pairs to weight each pair by its population probability. Not validated (jit-able): see
    `numerical_proximal_step`.
    """
    import jax
    import jax.numpy as jnp

    from jaxalign.losses.iterative import apo_dpo, apo_reference_logratio
    from jaxalign.losses.registry import PairwiseInputs

    log_hat, log_hat_prev, rewards = jnp.asarray(log_hat), jnp.asarray(log_hat_prev), jnp.asarray(rewards)
    k = log_hat.shape[0]
    log_policy = jax.nn.log_softmax(logits)
    log_sampling = jax.nn.log_softmax(apo_reference_logratio(log_hat, log_hat_prev, alpha))
    chosen, rejected = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="ij"))
    weight = jnp.exp(log_sampling[chosen] + log_sampling[rejected]) * jax.nn.sigmoid(
        rewards[chosen] - rewards[rejected])

    def pair_loss(c, w):
        one = jnp.ones((1, 1), log_policy.dtype)
        inputs = PairwiseInputs(
            policy_chosen=log_policy[c].reshape(1, 1), policy_rejected=log_policy[w].reshape(1, 1),
            reference_chosen=log_hat[c].reshape(1, 1), reference_rejected=log_hat[w].reshape(1, 1),
            chosen_mask=one, rejected_mask=one)
        loss, _ = apo_dpo(inputs, log_hat_prev[c].reshape(1, 1), log_hat_prev[w].reshape(1, 1), beta=beta,
                          alpha=alpha)
        return loss

    return jnp.sum(weight * jax.vmap(pair_loss)(chosen, rejected))


_NUMERICAL_STEP = None  # the jitted minimiser, built on first use (keeps `import` of this module free of JAX work)


def _numerical_step_fn():
    global _NUMERICAL_STEP
    if _NUMERICAL_STEP is None:
        import jax
        import jax.numpy as jnp
        import optax

        @jax.jit
        def minimise(start, log_hat, log_hat_prev, rewards, beta, alpha, max_steps, tolerance):
            def f(theta):
                return population_dpo_loss(theta, log_hat, log_hat_prev, rewards, beta, alpha)

            opt = optax.lbfgs()
            value_and_grad = optax.value_and_grad_from_state(f)

            def body(carry):
                theta, state, _, step = carry
                value, grad = value_and_grad(theta, state=state)
                updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=f)
                return optax.apply_updates(theta, updates), state, jnp.max(jnp.abs(grad)), step + 1

            def keep_going(carry):
                _, _, grad_norm, step = carry
                return (step < max_steps) & (grad_norm > tolerance)

            init = (start, opt.init(start), jnp.asarray(jnp.inf, start.dtype), jnp.asarray(0))
            theta, _, _, steps = jax.lax.while_loop(keep_going, body, init)
            final_grad = jax.grad(f)(theta)
            return jax.nn.log_softmax(theta), steps, jnp.max(jnp.abs(final_grad))

        _NUMERICAL_STEP = minimise
    return _NUMERICAL_STEP


def numerical_proximal_step(log_hat: Any, log_hat_prev: Any, rewards: Any, beta: float, alpha: float = 0.0,
                            max_steps: int = 500, tolerance: float = 1e-12,
                            return_info: bool = False) -> Any:
    """The proximal step found by minimising `population_dpo_loss` (the library's apo_dpo) with L-BFGS, in float64.

    Independent of the closed form `proximal_step`: nothing here knows that the minimiser is pi_t * exp(r / beta).
    log pihat_t (`log_hat`) and log pihat_{t-1} (`log_hat_prev`) are the two frozen checkpoints [K] (normalised,
    full support); pairs come from pi_t = extrapolate(pihat_t, pihat_{t-1}, alpha). The logits start at log pihat_t
    (a trainer initialises the policy at the latest iterate) and L-BFGS (optax.lbfgs, zoom line search) runs until
    the largest gradient entry is <= `tolerance` or `max_steps`. Returns the normalised log-probabilities of the
    minimiser [K] (NumPy float64); with return_info=True also {"steps", "grad_max"}.

    Precision: an arm's gradient is weighted by its sampling probability, so arms with tiny pi_t(y) converge slowly in
    log space; their probabilities are tiny too, so compare probabilities (or log-probs of arms with real mass).
    """
    fn = "numerical_proximal_step"
    beta = _check_beta(fn, beta)
    alpha = _check_alpha(fn, alpha)
    r = _check_rewards(fn, rewards)
    lh = _check_log_policy(fn, "log_hat", log_hat, r.shape[0])
    lp = _check_log_policy(fn, "log_hat_prev", log_hat_prev, r.shape[0])
    max_steps = _check_int(fn, "max_steps", max_steps, 1)
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
        raise ValueError(f"{fn}: tolerance must be a number >= 0, got {tolerance!r}")
    import jax
    import jax.numpy as jnp

    # float64 only inside this context: flipping the global flag would change every other computation in the process.
    with jax.enable_x64(True):
        f64 = jnp.float64
        # beta and alpha go in as arrays (traced): one compilation serves every value; they were validated above.
        result, steps, grad_max = _numerical_step_fn()(
            jnp.asarray(lh, f64), jnp.asarray(lh, f64), jnp.asarray(lp, f64), jnp.asarray(r, f64),
            jnp.asarray(beta, f64), jnp.asarray(alpha, f64), jnp.asarray(max_steps), jnp.asarray(tolerance, f64))
        out = np.asarray(result, dtype=np.float64)
        info = {"steps": int(steps), "grad_max": float(grad_max)}
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{fn}: the minimiser diverged (non-finite log-probabilities {out.tolist()}) with "
                         f"beta={beta!r}, alpha={alpha!r}")
    return (out, info) if return_info else out


# ----------------------------------------------------------------------------------------------------------------
# the recursion


class BanditTrajectory(NamedTuple):
    """One APO run on a bandit, iterations t = 0..T (row t = before the (t+1)-th step; row 0 is pi_0).

    log_policies [T+1, K]: log pi_t, the extrapolated (sampling) policy (= pihat_t for a = 0).
    log_proximal [T+1, K]: log pihat_t, the proximal iterates (pihat_0 = pi_0).
    expected_reward [T+1]: E_{pi_t}[r]; proximal_expected_reward [T+1]: E_{pihat_t}[r];
    regret [T+1]: max(r) - E_{pi_t}[r].
    """

    log_policies: np.ndarray
    log_proximal: np.ndarray
    expected_reward: np.ndarray
    proximal_expected_reward: np.ndarray
    regret: np.ndarray


def run_apo_bandit(rewards: Any, initial_policy: Any, beta: float = 1.0, alpha: float = 0.0, iterations: int = 10,
                   method: str = "closed_form") -> BanditTrajectory:
    """APO (He et al. 2024; docs/algorithms.md) for `iterations` steps on a bandit with a Bradley-Terry oracle.

    Per step: pihat_{t+1} = the proximal step from pi_t (method="closed_form": `proximal_step`, pi_t * exp(r/beta);
    method="numerical": `numerical_proximal_step`, the minimiser of the population apo_dpo loss with the checkpoints
    pihat_t and pihat_{t-1}), then log pi_{t+1} = (1 + a) log pihat_{t+1} - a log pihat_t - log Z. pihat_{-1} =
    pihat_0 = pi_0, so the first step is iterative DPO's for every a. rewards [K] finite; initial_policy [K]
    probabilities with full support; beta > 0; 0 <= alpha < 1 (0: iterative DPO); iterations >= 1.
    """
    fn = "run_apo_bandit"
    r = _check_rewards(fn, rewards)
    log_pi = _check_policy(fn, "initial_policy", initial_policy, r.shape[0])
    beta = _check_beta(fn, beta)
    alpha = _check_alpha(fn, alpha)
    iterations = _check_int(fn, "iterations", iterations, 1)
    method = _check_method(fn, method)

    hat_prev, hat = log_pi, log_pi
    policies, proximal = [log_pi], [log_pi]
    for _ in range(iterations):
        if method == "closed_form":
            hat_next = proximal_step(log_pi, r, beta)
        else:
            hat_next = numerical_proximal_step(hat, hat_prev, r, beta, alpha)
        # a = 0 skips the extrapolation so that iterative DPO is the plain repeated proximal step, bit for bit.
        log_pi = hat_next if alpha == 0.0 else extrapolate(hat_next, hat, alpha)
        hat_prev, hat = hat, hat_next
        policies.append(log_pi)
        proximal.append(hat)
    log_policies, log_proximal = np.stack(policies), np.stack(proximal)
    reward = np.exp(log_policies) @ r
    return BanditTrajectory(log_policies, log_proximal, reward, np.exp(log_proximal) @ r, float(np.max(r)) - reward)


def iterations_to_reach(expected_rewards: Any, target: float, tolerance: float = 1e-9) -> int | None:
    """The first iteration t with expected_rewards[t] >= target - tolerance, or None when it is never reached.

    The tolerance absorbs round-off (and the minimiser's error with method="numerical") when the target is another
    run's value; iterative DPO reaches its own final value at t = T exactly.
    """
    fn = "iterations_to_reach"
    values = np.asarray(expected_rewards, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"{fn}: expected_rewards must be a non-empty 1-D array of finite values, got "
                         f"{values.tolist() if values.size < 20 else values.shape}")
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not math.isfinite(target):
        raise ValueError(f"{fn}: target must be a finite number, got {target!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
        raise ValueError(f"{fn}: tolerance must be a number >= 0, got {tolerance!r}")
    hit = np.flatnonzero(values >= target - tolerance)
    return int(hit[0]) if hit.size else None


# ----------------------------------------------------------------------------------------------------------------
# the demonstration


def bandit_demo(seeds: Sequence[int] = (0, 1, 2), alphas: Sequence[float] = (0.0, 0.3, 0.5), num_arms: int = 8,
                beta: float = 1.0, iterations: int = 10, target: float | None = None,
                method: str = "closed_form", initial: str = "random", tolerance: float = 1e-9) -> list[dict]:
    """Expected reward per iteration of APO for each seed and alpha on `make_bandit(seed, num_arms, initial=...)`.

    The claim shown (He et al. 2024): APO with a in {0.3, 0.5} reaches iterative DPO's (a = 0) FINAL expected reward
    in fewer iterations. target=None: per seed, the expected reward of the a = 0 run after `iterations` steps (run
    with the same method; computed even when 0.0 is not in `alphas`); a number: that target for every seed.

    Returns one row per (seed, alpha, iteration t = 0..iterations): seed, alpha, method, iteration,
    expected_reward (E_{pi_t}[r]), proximal_expected_reward (E_{pihat_t}[r]), regret (max r - E_{pi_t}[r]),
    target, iterations_to_target (first t with expected_reward >= target - tolerance; None if never; the same on
    every row of a run).
    """
    fn = "bandit_demo"
    seeds = list(seeds)
    if not seeds:
        raise ValueError(f"{fn}: seeds must be a non-empty sequence of integers >= 0, got {seeds!r}")
    for s in seeds:
        _check_int(fn, "each seed", s, 0)
    alphas = [_check_alpha(fn, a) for a in alphas]
    if not alphas:
        raise ValueError(f"{fn}: alphas must be a non-empty sequence of momentum values in [0, 1), got []")
    beta = _check_beta(fn, beta)
    iterations = _check_int(fn, "iterations", iterations, 1)
    method = _check_method(fn, method)
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
        raise ValueError(f"{fn}: tolerance must be a number >= 0, got {tolerance!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, numbers.Real)
                               or not math.isfinite(target)):
        raise ValueError(f"{fn}: target must be None (iterative DPO's final expected reward) or a finite number, "
                         f"got {target!r}")

    rows = []
    for seed in seeds:
        rewards, pi0 = make_bandit(seed, num_arms, initial=initial)
        runs = {a: run_apo_bandit(rewards, pi0, beta, a, iterations, method) for a in alphas}
        if target is None:
            baseline = runs[0.0] if 0.0 in runs else run_apo_bandit(rewards, pi0, beta, 0.0, iterations, method)
            seed_target = float(baseline.expected_reward[-1])
        else:
            seed_target = float(target)
        for a, run in runs.items():
            reached = iterations_to_reach(run.expected_reward, seed_target, tolerance)
            for t in range(iterations + 1):
                rows.append({"seed": seed, "alpha": a, "method": method, "iteration": t,
                             "expected_reward": float(run.expected_reward[t]),
                             "proximal_expected_reward": float(run.proximal_expected_reward[t]),
                             "regret": float(run.regret[t]), "target": seed_target,
                             "iterations_to_target": reached})
    return rows


def _check_rows(fn: str, rows: Any, keys: Sequence[str]) -> list[dict]:
    rows = list(rows)
    if not rows:
        raise ValueError(f"{fn}: rows must be the non-empty list of dicts returned by bandit_demo, got []")
    for i, row in enumerate(rows):
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{fn}: rows[{i}] lacks {missing} (rows come from bandit_demo)")
    return rows


def summarize(rows: Any) -> str:
    """A text table: per method and alpha, iterations_to_target for each seed and the final expected reward (mean)."""
    rows = _check_rows("summarize", rows, ("seed", "alpha", "method", "iteration", "expected_reward",
                                           "iterations_to_target"))
    seeds = sorted({row["seed"] for row in rows})
    last = max(row["iteration"] for row in rows)
    lines = [f"{'method':<12} {'alpha':>5}  " + " ".join(f"seed{s:<3}" for s in seeds) + "  mean final E[r]"]
    for method in sorted({row["method"] for row in rows}):
        for alpha in sorted({row["alpha"] for row in rows if row["method"] == method}):
            mine = [row for row in rows if row["method"] == method and row["alpha"] == alpha]
            reached = {row["seed"]: row["iterations_to_target"] for row in mine}
            cells = " ".join(f"{('never' if reached.get(s) is None else reached[s]):<7}" for s in seeds)
            final = np.mean([row["expected_reward"] for row in mine if row["iteration"] == last])
            lines.append(f"{method:<12} {alpha:>5.2f}  {cells}  {final:.6f}")
    return "\n".join(lines)


def plot_bandit(rows: Any, path: str) -> str:
    """Save a PNG: mean (over seeds) expected reward and regret (log scale) vs iteration, one line per alpha (and
    line style per method, for a closed-form vs numerical side-by-side). Returns `path`."""
    rows = _check_rows("plot_bandit", rows, ("seed", "alpha", "method", "iteration", "expected_reward", "regret"))
    import matplotlib

    matplotlib.use("Agg")  # headless: tests and CI have no display
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_g) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"closed_form": "-", "numerical": "--"}
    # one colour per alpha across methods, so a numerical run drawn over its closed form reads as the same curve
    colours = {a: f"C{i}" for i, a in enumerate(sorted({row["alpha"] for row in rows}))}
    for method in sorted({row["method"] for row in rows}):
        for alpha in sorted({row["alpha"] for row in rows if row["method"] == method}):
            mine = [row for row in rows if row["method"] == method and row["alpha"] == alpha]
            ts = sorted({row["iteration"] for row in mine})
            reward = [np.mean([row["expected_reward"] for row in mine if row["iteration"] == t]) for t in ts]
            regret = [np.mean([row["regret"] for row in mine if row["iteration"] == t]) for t in ts]
            label = f"a={alpha:g}" + (" (iterative DPO)" if alpha == 0 else "") + f" [{method}]"
            style = {"linestyle": styles.get(method, ":"), "color": colours[alpha], "marker": "o", "ms": 3,
                     "label": label}
            ax_r.plot(ts, reward, **style)
            # regret can round to exactly 0 at convergence; a floor keeps the log axis drawable
            ax_g.semilogy(ts, np.maximum(regret, 1e-16), **style)
    n_seeds = len({row["seed"] for row in rows})
    ax_r.set(xlabel="iteration t", ylabel="E_{pi_t}[r]", title=f"expected reward (mean of {n_seeds} seeds)")
    ax_g.set(xlabel="iteration t", ylabel="max r - E_{pi_t}[r]", title="regret")
    ax_r.legend(fontsize=8)
    fig.suptitle("APO (He et al. 2024) on a K-armed bandit, exact proximal steps")
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict]:
    import argparse

    parser = argparse.ArgumentParser(description="APO vs iterative DPO on a tabular bandit (exact proximal steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    parser.add_argument("--num-arms", type=int, default=8)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--method", choices=BANDIT_METHODS, nargs="+", default=["closed_form"])
    parser.add_argument("--plot", default=None, help="PNG path for plot_bandit")
    args = parser.parse_args(argv)
    rows = []
    for method in args.method:
        rows += bandit_demo(args.seeds, args.alphas, args.num_arms, args.beta, args.iterations, method=method)
    print("iterations to reach iterative DPO's final expected reward "
          f"(K={args.num_arms}, beta={args.beta}, T={args.iterations}):")
    print(summarize(rows))
    if args.plot:
        print("plot:", plot_bandit(rows, args.plot))
    return rows


if __name__ == "__main__":
    main()
