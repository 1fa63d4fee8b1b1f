"""The observer: P(goal | path) as pure functions of BFS distances (NumPy or JAX arrays alike).

Every function takes distances with the candidate goals on the last axis, the TRUE goal first:
`dist_node[..., j]` = d(n, g_j) from the path's current node n, `dist_start[..., j]` = d(s, g_j) from the start s.

Cost-difference goal recognition (Ramirez and Geffner, AAAI 2010, P(O | G) = exp(-beta Delta) / (1 + exp(-beta
Delta)) with a uniform prior), in the path-planning form of Masters and Sardina (IJCAI 2017, Section 2): for a path
from s whose last node is n,

    costdif(s, g, n) = optc(n, g) - optc(s, g),        P(g | path) = alpha / (1 + exp(beta costdif(s, g, n))),

alpha normalising over the goals. Masters and Sardina drop the cost of the observed prefix (it is the same for every
goal); passing `path_cost` adds it back (the original Ramirez-Geffner difference): that changes the numbers but not
which goal is most probable, so the truthful / deceptive reading of a step is the same either way. A node is
*truthful* when the true goal's cost difference is strictly the smallest (ties are deceptive, as in Masters and
Sardina's definition of a deceptive step).

The value-difference observer of the exaggeration bonus (Fatemi, Suttle and Sadler, AAMAS 2024):

    V_g(n) = gamma^d(n, g) (gamma = 0.99),        P(g | path) proportional to exp(V_g(s_t) - V_g(s_0)),

a softmax over the goals of how much closer (in discounted value) the path has brought the agent to each goal.
With a cost c per move (`step_cost`), V_g is the optimal value of reaching g under reward -c per move and +1 on
arrival, V_g(n) = gamma^d - c (1 - gamma^d) / (1 - gamma) (d = d(n, g)), by Bellman's equation on the grid graph
(the authors' code computes a soft version of it with c = 0.05). The paper's V_g = gamma^d is c = 0: it changes by
at most 1 - gamma = 0.01 per move, so over the paths of these maps the posterior stays near uniform and the
exaggeration bonus is a few hundredths per step; a step cost c adds c to the change per move.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cost_difference(dist_node, dist_start, path_cost=None):
    """costdif(s, g, n) = optc(n, g) - optc(s, g) (+ the prefix cost when given), per goal on the last axis."""
    diff = jnp.asarray(dist_node, jnp.float32) - jnp.asarray(dist_start, jnp.float32)
    if path_cost is not None:
        diff = diff + jnp.asarray(path_cost, jnp.float32)[..., None]
    return diff


def cost_difference_posterior(dist_node, dist_start, beta: float = 1.0, path_cost=None):
    """P(g | path) over the goals (last axis) of the Ramirez-Geffner / Masters-Sardina observer (module docstring).

    1 / (1 + exp(beta c)) = sigmoid(-beta c); normalised in log space so large cost differences stay finite.
    """
    log_likelihood = jax.nn.log_sigmoid(-beta * cost_difference(dist_node, dist_start, path_cost))
    return jax.nn.softmax(log_likelihood, axis=-1)


def goal_value(distance, gamma: float = 0.99, step_cost: float = 0.0):
    """V_g = gamma^d - c (1 - gamma^d) / (1 - gamma): the value of reaching the goal d moves away under reward -c
    per move and +1 on arrival (module docstring); c d when gamma = 1."""
    gamma = jnp.asarray(gamma, jnp.float32)
    discounted = gamma ** jnp.asarray(distance, jnp.float32)
    moves = jnp.where(gamma < 1.0, (1.0 - discounted) / jnp.where(gamma < 1.0, 1.0 - gamma, 1.0),
                      jnp.asarray(distance, jnp.float32))
    return discounted - jnp.asarray(step_cost, jnp.float32) * moves


def value_posterior(dist_node, dist_start, gamma: float = 0.99, step_cost: float = 0.0):
    """P(g | path) proportional to exp(V_g(s_t) - V_g(s_0)) with V_g = `goal_value` (Fatemi et al. 2024; the
    paper's V_g = gamma^d is step_cost 0)."""
    return jax.nn.softmax(goal_value(dist_node, gamma, step_cost) - goal_value(dist_start, gamma, step_cost), axis=-1)


def is_truthful(dist_node, dist_start):
    """True where the true goal (index 0) has strictly the smallest cost difference (Masters and Sardina 2017)."""
    diff = cost_difference(dist_node, dist_start)
    return jnp.all(diff[..., :1] < diff[..., 1:], axis=-1)


def favours_true_goal(posterior):
    """True where the true goal (index 0) is strictly the most probable."""
    posterior = jnp.asarray(posterior)
    return jnp.all(posterior[..., :1] > posterior[..., 1:], axis=-1)


def exaggeration_score(posterior):
    """-(P(g_true | path) - max_{g != g_true} P(g | path)): positive while another goal looks more likely."""
    posterior = jnp.asarray(posterior)
    return -(posterior[..., 0] - jnp.max(posterior[..., 1:], axis=-1))


def ambiguity_score(dist_goal, dist_decoy, dist_goal_decoy):
    """(d_gd - |d(n, g) - d(n, decoy)|) / d_gd: 1 where the node is equally far from both goals, 0 on a goal side
    extreme; in [0, 1] on a connected graph by the triangle inequality (Fatemi et al. 2024's ambiguity bonus)."""
    dist_goal = jnp.asarray(dist_goal, jnp.float32)
    dist_decoy = jnp.asarray(dist_decoy, jnp.float32)
    d_gd = jnp.maximum(jnp.asarray(dist_goal_decoy, jnp.float32), 1.0)
    return (d_gd - jnp.abs(dist_goal - dist_decoy)) / d_gd
