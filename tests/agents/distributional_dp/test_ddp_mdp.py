"""FiniteMDP validation and the example MDPs."""
import numpy as np
import pytest

from agents.distributional_dp import FiniteMDP, cvar_recovery_mdp, lucky_start_mdp, mean_variance_trap_mdp, random_mdp


def _kernel():
    kernel = np.zeros((2, 2, 2, 3))
    kernel[:, :, 0, 1] = 0.5
    kernel[:, :, 1, 2] = 0.5
    return kernel


def test_from_transitions_builds_the_joint_kernel():
    transition = np.array([[[0.25, 0.75], [1.0, 0.0]], [[0.0, 1.0], [0.5, 0.5]]])
    reward = np.array([[[-1, 2], [0, 0]], [[3, 1], [2, -1]]])
    mdp = FiniteMDP.from_transitions(transition, reward, horizon=3, initial=[1.0, 0.0])
    assert (mdp.reward_min, mdp.reward_max) == (-1, 3)
    assert mdp.kernel.shape == (2, 2, 2, 5)
    np.testing.assert_allclose(mdp.kernel.sum(-1), transition)
    assert mdp.kernel[0, 0, 1, 2 - (-1)] == 0.75 and mdp.kernel[1, 1, 1, 0] == 0.5
    # Float rewards that are exact integers are accepted.
    FiniteMDP.from_transitions(transition, reward.astype(float), horizon=1, initial=[0.5, 0.5])


@pytest.mark.parametrize("change, message", [
    (lambda k: k[0], "shape \\[S, A, S', K\\]"),
    (lambda k: k[:, :, :1], "shape \\[S, A, S, K\\]"),
    (lambda k: k * np.where(np.arange(3) == 1, -1.0, 1.0), "non-negative"),
    (lambda k: k * np.array([1.0, 0.5])[:, None, None, None], "kernel\\[s=1, a=0\\] sums to 0.5"),
])
def test_kernel_errors_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        FiniteMDP(change(_kernel()), 0, 2, np.array([1.0, 0.0]))


def test_other_field_errors():
    k = _kernel()
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        FiniteMDP(k, 0, 0, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="reward_min must be an int"):
        FiniteMDP(k, 0.5, 2, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="initial must have shape"):
        FiniteMDP(k, 0, 2, np.array([1.0]))
    with pytest.raises(ValueError, match="initial must be a probability vector"):
        FiniteMDP(k, 0, 2, np.array([0.7, 0.7]))
    transition = np.full((2, 2, 2), 0.5)
    with pytest.raises(ValueError, match="integer-valued"):
        FiniteMDP.from_transitions(transition, np.full((2, 2, 2), 0.5), 2, [1.0, 0.0])
    with pytest.raises(ValueError, match="probability vectors"):
        FiniteMDP.from_transitions(transition * 0.9, np.zeros((2, 2, 2), int), 2, [1.0, 0.0])


def test_random_mdp_is_seeded_and_valid():
    a, b, c = random_mdp(3, 3, 2, 3), random_mdp(3, 3, 2, 3), random_mdp(4, 3, 2, 3)
    np.testing.assert_array_equal(a.kernel, b.kernel)
    assert not np.array_equal(a.kernel, c.kernel)
    assert np.all((a.kernel > 0).sum(axis=(2, 3)) == 2)  # two outcomes per (s, a)
    assert (a.reward_min, a.reward_max) == (-1, 2)


def test_constructed_mdps_are_valid():
    for mdp in (lucky_start_mdp(), mean_variance_trap_mdp(), cvar_recovery_mdp()):
        assert mdp.horizon == 2
        np.testing.assert_allclose(mdp.kernel.sum(axis=(2, 3)), 1.0)
