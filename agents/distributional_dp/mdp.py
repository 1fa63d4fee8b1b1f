"""Finite-horizon MDPs with integer rewards, the substrate of exact stock-augmented distributional DP.

Avila Pires et al. 2025, "Optimizing Return Distributions with Distributional Dynamic Programming" (JMLR; arXiv
2501.13028), Section 3, augment the state with a stock C_t and define C_{t+1} = (C_t + R_{t+1}) / gamma, so that
C_0 + G (G the discounted return) is determined by the trajectory. This package takes gamma = 1 and a finite
horizon H, so the stock is simply the running sum

    c_{t+1} = c_t + r_t,        c_H = c_0 + G,        G = r_0 + ... + r_{H-1},

and with integer rewards every stock is an integer: categorical distributions on the integers represent every
return distribution exactly (no projection, no clipping). gamma < 1 breaks the integer grid ((c + r) / gamma is not
an integer) and is out of scope here.

The MDP is the joint kernel p(s', r | s, a) over a contiguous integer reward range, which covers both deterministic
rewards r(s, a, s') (see `FiniteMDP.from_transitions`) and random rewards.
"""
from __future__ import annotations

import dataclasses

import numpy as np

_ATOL = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class FiniteMDP:
    """A finite-horizon MDP with integer rewards.

    Fields:
      kernel: float [S, A, S', K]; kernel[s, a, s', k] = P(next state s', reward reward_min + k | state s, action a).
        For each (s, a) it sums to 1 over (s', k).
      reward_min: the integer reward of column k = 0; rewards are reward_min .. reward_min + K - 1.
      horizon: H >= 1 decisions, at t = 0 .. H-1; the final stock is c_H = c_0 + r_0 + ... + r_{H-1}.
      initial: float [S], the distribution of s_0.

    The kernel is time-homogeneous; time-dependence can be folded into the state.
    """

    kernel: np.ndarray
    reward_min: int
    horizon: int
    initial: np.ndarray

    def __post_init__(self):
        kernel = np.asarray(self.kernel, dtype=np.float64)
        initial = np.asarray(self.initial, dtype=np.float64)
        if kernel.ndim != 4:
            raise ValueError(f"FiniteMDP.kernel must have shape [S, A, S', K] (4 axes); got shape {kernel.shape}")
        s, a, s2, k = kernel.shape
        if s != s2 or min(s, a, k) < 1:
            raise ValueError(f"FiniteMDP.kernel must have shape [S, A, S, K] with S, A, K >= 1; got {kernel.shape}")
        if not np.all(np.isfinite(kernel)) or np.any(kernel < 0):
            raise ValueError("FiniteMDP.kernel must hold finite, non-negative probabilities")
        sums = kernel.sum(axis=(2, 3))
        bad = np.argwhere(np.abs(sums - 1.0) > _ATOL)
        if bad.size:
            si, ai = bad[0]
            raise ValueError(f"FiniteMDP.kernel[s={si}, a={ai}] sums to {float(sums[si, ai])} over (next state, "
                             f"reward); expected 1")
        if isinstance(self.reward_min, (bool, np.bool_)) or not isinstance(self.reward_min, (int, np.integer)):
            raise ValueError(f"FiniteMDP.reward_min must be an int; got {self.reward_min!r}")
        if isinstance(self.horizon, (bool, np.bool_)) or not isinstance(self.horizon, (int, np.integer)) \
                or self.horizon < 1:
            raise ValueError(f"FiniteMDP.horizon must be an int >= 1; got {self.horizon!r}")
        if initial.shape != (s,):
            raise ValueError(f"FiniteMDP.initial must have shape [S] = [{s}]; got {initial.shape}")
        if np.any(initial < 0) or abs(initial.sum() - 1.0) > _ATOL:
            raise ValueError(f"FiniteMDP.initial must be a probability vector; got {initial.tolist()}")
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "initial", initial)
        object.__setattr__(self, "reward_min", int(self.reward_min))
        object.__setattr__(self, "horizon", int(self.horizon))

    @property
    def num_states(self) -> int:
        return self.kernel.shape[0]

    @property
    def num_actions(self) -> int:
        return self.kernel.shape[1]

    @property
    def reward_max(self) -> int:
        return self.reward_min + self.kernel.shape[3] - 1

    @property
    def reward_values(self) -> np.ndarray:
        return np.arange(self.reward_min, self.reward_max + 1)

    @classmethod
    def from_transitions(cls, transition, reward, horizon: int, initial) -> "FiniteMDP":
        """Build the kernel from transition probabilities P[s, a, s'] and deterministic integer rewards r(s, a, s').

        `reward` [S, A, S'] must be integer-valued (an integer dtype, or floats that are exact integers).
        """
        transition = np.asarray(transition, dtype=np.float64)
        reward = np.asarray(reward)
        if transition.ndim != 3 or transition.shape[0] != transition.shape[2]:
            raise ValueError(f"transition must have shape [S, A, S]; got {transition.shape}")
        if reward.shape != transition.shape:
            raise ValueError(f"reward must have the transition's shape {transition.shape}; got {reward.shape}")
        if not np.issubdtype(reward.dtype, np.integer):
            as_float = reward.astype(np.float64)
            if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
                raise ValueError("reward must be integer-valued: stock-augmented exact DP needs integer rewards "
                                 f"(got e.g. {as_float[as_float != np.round(as_float)][:3]!r})")
        reward = np.round(reward.astype(np.float64)).astype(np.int64)
        if np.any(transition < 0) or np.any(np.abs(transition.sum(-1) - 1.0) > _ATOL):
            raise ValueError("transition[s, a, :] must be probability vectors (non-negative, summing to 1)")
        r_min, r_max = int(reward.min()), int(reward.max())
        kernel = np.zeros(transition.shape + (r_max - r_min + 1,))
        s_idx, a_idx, s2_idx = np.indices(transition.shape)
        kernel[s_idx, a_idx, s2_idx, reward - r_min] = transition
        return cls(kernel=kernel, reward_min=r_min, horizon=horizon, initial=initial)


def random_mdp(seed: int, num_states: int = 2, num_actions: int = 2, horizon: int = 3,
               reward_values=(-1, 0, 1, 2), outcomes_per_action: int = 2,
               num_initial_states: int = 1) -> FiniteMDP:
    """A random small MDP for brute-force checks: each (s, a) has `outcomes_per_action` distinct (s', r) outcomes
    with Dirichlet(1) probabilities, rewards drawn from `reward_values`; s_0 is uniform over the first
    `num_initial_states` states (keep these small: brute force enumerates every history-dependent policy)."""
    rng = np.random.default_rng(seed)
    reward_values = np.asarray(reward_values, dtype=np.int64)
    r_min = int(reward_values.min())
    k = int(reward_values.max()) - r_min + 1
    pairs = [(s2, int(r) - r_min) for s2 in range(num_states) for r in reward_values]
    if outcomes_per_action > len(pairs):
        raise ValueError(f"outcomes_per_action={outcomes_per_action} exceeds the {len(pairs)} distinct (s', r)")
    kernel = np.zeros((num_states, num_actions, num_states, k))
    for s in range(num_states):
        for a in range(num_actions):
            chosen = rng.choice(len(pairs), size=outcomes_per_action, replace=False)
            probs = rng.dirichlet(np.ones(outcomes_per_action))
            for j, p in zip(chosen, probs):
                kernel[s, a, pairs[j][0], pairs[j][1]] += p
    initial = np.zeros(num_states)
    initial[:num_initial_states] = 1.0 / num_initial_states
    return FiniteMDP(kernel=kernel, reward_min=r_min, horizon=horizon, initial=initial)


def lucky_start_mdp() -> FiniteMDP:
    """The constructed MDP where stock augmentation strictly beats every Markov policy of the original states.

    States: 0 (start), 1 (after the coin). t = 0: in state 0 either action flips a fair coin: reward 0 or 2, next
    state 1 (the state does not record the outcome; only the stock does). t = 1: in state 1, action 0 ("safe")
    gives reward 1; action 1 ("risky") gives 3 or 0 with probability 1/2 each. Horizon 2.

    Objective P(G >= 3). Stock-augmented optimum 0.75: with c_1 = 2 play safe (G = 3 surely), with c_1 = 0 play
    risky (G = 3 w.p. 1/2). Any Markov policy pi(s, t) plays the same action after both coin outcomes:
    always-safe gives G in {1, 3} (P = 0.5), always-risky G in {0, 3, 2, 5} (P = 0.5); randomising between them
    gives 0.5 as well (the value is linear in the action probabilities). Gap: 0.75 vs 0.5.
    """
    kernel = np.zeros((2, 2, 2, 4))  # rewards 0..3
    kernel[0, :, 1, 0] = 0.5
    kernel[0, :, 1, 2] = 0.5
    kernel[1, 0, 1, 1] = 1.0
    kernel[1, 1, 1, 0] = 0.5
    kernel[1, 1, 1, 3] = 0.5
    return FiniteMDP(kernel=kernel, reward_min=0, horizon=2, initial=np.array([1.0, 0.0]))


def mean_variance_trap_mdp() -> FiniteMDP:
    """The constructed MDP where greedy distributional DP cannot optimise mean - lambda * variance.

    t = 0: a fair coin gives reward 0 or 2 (state 0 -> state 1, either action). t = 1: in state 1, action 0
    ("keep") gives reward 0, action 1 ("pay") gives reward -1; both deterministic. Horizon 2.

    With lambda = 1, from any (state 1, stock c) both actions give a point mass, so the greedy choice at every
    (s, c) is "keep" (mean c vs c - 1, variance 0 for both): the greedy policy's final stock is {0, 2}, mean 1,
    variance 1, objective 0. Paying only in the lucky branch (c = 2) gives {0, 1}: mean 0.5, variance 0.25,
    objective 0.25, the brute-force optimum. Trading mean in one branch for a lower spread of the mixture is
    invisible to a per-(s, c) choice: mean - lambda * variance of a mixture is not a function of its components'
    values (it is not "indifferent to mixtures").
    """
    kernel = np.zeros((2, 2, 2, 4))  # rewards -1..2
    kernel[0, :, 1, 1] = 0.5
    kernel[0, :, 1, 3] = 0.5
    kernel[1, 0, 1, 1] = 1.0
    kernel[1, 1, 1, 0] = 1.0
    return FiniteMDP(kernel=kernel, reward_min=-1, horizon=2, initial=np.array([1.0, 0.0]))


def cvar_recovery_mdp() -> FiniteMDP:
    """A two-step MDP where the CVaR-optimal policy needs the stock and beats the risk-neutral policy.

    One state, horizon 2; action 0 ("bond") pays 1, action 1 ("gamble") pays 0 or 3 with probability 1/2 each
    (mean 1.5). For CVaR_0.75 of G:
      risk-neutral (gamble twice): G in {0, 3, 6} w.p. 1/4, 1/2, 1/4, mean 3, CVaR_0.75 = 2;
      best Markov policy pi(s, t) (bond twice, or gamble then bond, ...): CVaR_0.75 = 2 (randomised Markov
      policies do no better on a 21 x 21 grid of action probabilities);
      stock-augmented optimum (Bauerle-Ott sweep, b* = 4): gamble first; after the win (c = 3) take the bond
      (G = 4), after the loss (c = 0) gamble again (G in {0, 3}): G in {0, 3, 4} w.p. 1/4, 1/4, 1/2, mean 2.75,
      CVaR_0.75 = (0.25 * 0 + 0.25 * 3 + 0.25 * 4) / 0.75 = 7/3 ~ 2.333.
    """
    kernel = np.zeros((1, 2, 1, 4))  # rewards 0..3
    kernel[0, 0, 0, 1] = 1.0
    kernel[0, 1, 0, 0] = 0.5
    kernel[0, 1, 0, 3] = 0.5
    return FiniteMDP(kernel=kernel, reward_min=0, horizon=2, initial=np.array([1.0]))


def gridworld_mdp(layout, slip_prob: float, pit_cost: int, horizon: int) -> FiniteMDP:
    """The stochastic gridworld of `rl.envs.gridworld` as an exact FiniteMDP (states: its non-wall cells in
    row-major order; actions up, right, down, left; horizon H), built from the layout strings with plain loops,
    independently of the JAX step (their equality is tested).

    Rules: '#' walls and the grid's border block moves (the agent stays); on a slippery cell '~' the intended move
    is replaced by "down" with probability slip_prob; the goal 'G' and pit 'X' are absorbing. The reward depends on
    the cell a step starts from: 0 at the goal, -pit_cost in the pit, -1 elsewhere. s_0 is the start 'S'. The JAX
    environment ends an episode on reaching the goal; here the goal loops with reward 0, which gives the same
    return.
    """
    if not 0.0 <= slip_prob <= 1.0:
        raise ValueError(f"gridworld slip_prob must lie in [0, 1]; got {slip_prob!r}")
    if isinstance(pit_cost, bool) or int(pit_cost) != pit_cost or pit_cost < 0:
        raise ValueError(f"gridworld pit_cost must be a non-negative integer; got {pit_cost!r}")
    cells = [(i, j) for i, row in enumerate(layout) for j, ch in enumerate(row) if ch != "#"]
    index = {c: k for k, c in enumerate(cells)}
    moves = [(-1, 0), (0, 1), (1, 0), (0, -1)]
    n = len(cells)
    transition = np.zeros((n, 4, n))
    reward = np.zeros((n, 4, n), np.int64)
    for k, (i, j) in enumerate(cells):
        ch = layout[i][j]
        for a in range(4):
            if ch in "GX":
                transition[k, a, k] = 1.0
                reward[k, a, :] = 0 if ch == "G" else -int(pit_cost)
                continue
            reward[k, a, :] = -1
            outcomes = [(moves[a], 1.0)] if ch != "~" else [(moves[a], 1.0 - slip_prob), (moves[2], slip_prob)]
            for (di, dj), prob in outcomes:
                transition[k, a, index.get((i + di, j + dj), k)] += prob
    starts = [index[(i, j)] for i, row in enumerate(layout) for j, ch in enumerate(row) if ch == "S"]
    if len(starts) != 1:
        raise ValueError(f"a gridworld layout needs exactly one start 'S'; found {len(starts)}")
    initial = np.zeros(n)
    initial[starts[0]] = 1.0
    return FiniteMDP.from_transitions(transition, reward, horizon=int(horizon), initial=initial)
