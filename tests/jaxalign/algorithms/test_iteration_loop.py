"""The iteration loop and APO's extrapolated reference: the reference the loop hands to plain sigmoid DPO gives
exactly the APO loss of `jaxalign.losses.iterative.apo_dpo` (and SPPO's squared loss of `apo_sppo`)."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.algorithms.iterative import best_iterate, extrapolated_reference, run_iterations
from jaxalign.losses import PairwiseInputs, compute_objective
from jaxalign.losses.iterative import apo_dpo, apo_sppo


def _logps(rng, shape, mask):
    return np.where(mask > 0, -rng.random(shape) * 3, 0.0).astype(np.float32)


def _batch(seed=0, pairs=6, width=9):
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(2):  # unequal lengths, one-token completions, right padding
        lengths = rng.integers(1, width + 1, size=pairs)
        masks.append((np.arange(width)[None] < lengths[:, None]).astype(np.float32))
    mw, ml = masks
    arrays = {name: _logps(rng, (pairs, width), mw if name.endswith("chosen") else ml)
              for name in ("policy_chosen", "policy_rejected", "latest_chosen", "latest_rejected",
                           "previous_chosen", "previous_rejected")}
    return arrays, mw, ml


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5])
@pytest.mark.parametrize("objective, apo_fn", [("sigmoid", apo_dpo), ("sppo_hard", apo_sppo)])
def test_extrapolated_reference_with_the_plain_objective_is_the_apo_loss(alpha, objective, apo_fn):
    a, mw, ml = _batch()
    latest = {"reference_chosen": a["latest_chosen"], "reference_rejected": a["latest_rejected"]}
    previous = {"reference_chosen": a["previous_chosen"], "reference_rejected": a["previous_rejected"]}
    ref = extrapolated_reference(latest, previous, alpha)
    via_loop = PairwiseInputs(policy_chosen=jnp.asarray(a["policy_chosen"]),
                              policy_rejected=jnp.asarray(a["policy_rejected"]),
                              reference_chosen=jnp.asarray(ref["reference_chosen"]),
                              reference_rejected=jnp.asarray(ref["reference_rejected"]),
                              chosen_mask=jnp.asarray(mw), rejected_mask=jnp.asarray(ml))
    loop_loss, _ = compute_objective(objective, via_loop, beta=0.5)
    direct = via_loop.replace(reference_chosen=jnp.asarray(a["latest_chosen"]),
                              reference_rejected=jnp.asarray(a["latest_rejected"]))
    apo_loss, _ = apo_fn(direct, jnp.asarray(a["previous_chosen"]), jnp.asarray(a["previous_rejected"]), beta=0.5,
                         alpha=alpha)
    np.testing.assert_allclose(loop_loss, apo_loss, rtol=2e-6)


def test_alpha_zero_reference_is_the_latest_checkpoint_bit_for_bit():
    a, _, _ = _batch(1)
    latest = {"reference_chosen": a["latest_chosen"], "reference_rejected": a["latest_rejected"]}
    previous = {"reference_chosen": a["previous_chosen"], "reference_rejected": a["previous_rejected"]}
    for ref in (extrapolated_reference(latest, previous, 0.0), extrapolated_reference(latest, None, 0.4)):
        for key in latest:
            assert ref[key].tobytes() == latest[key].tobytes()
    moved = extrapolated_reference(latest, previous, 0.4)
    np.testing.assert_allclose(moved["reference_chosen"], 1.4 * a["latest_chosen"] - 0.4 * a["previous_chosen"],
                               rtol=1e-6, atol=1e-7)


def test_extrapolated_reference_errors():
    latest = {"reference_chosen": np.zeros((2, 3)), "reference_rejected": np.zeros((2, 3))}
    with pytest.raises(ValueError, match="0 <= alpha < 1"):
        extrapolated_reference(latest, None, 1.0)
    with pytest.raises(ValueError, match="missing"):
        extrapolated_reference(latest, {"reference_chosen": np.zeros((2, 3))}, 0.3)
    with pytest.raises(ValueError, match="same shape"):
        extrapolated_reference(latest, {k: np.zeros((2, 4)) for k in latest}, 0.3)


def test_run_iterations_hands_each_step_the_two_latest_iterates():
    seen = []

    def step(t, latest, previous):
        seen.append((t, latest, previous))
        return latest + 10

    assert run_iterations(0, 3, step) == [10, 20, 30]
    assert seen == [(0, 0, None), (1, 10, 0), (2, 20, 10)]
    with pytest.raises(ValueError, match="num_iterations must be an integer >= 1"):
        run_iterations(0, 0, step)


def test_best_iterate_prefers_the_earliest_on_ties():
    assert best_iterate([{"val_accuracy": 0.5}, {"val_accuracy": 0.7}, {"val_accuracy": 0.7}]) == 1
    with pytest.raises(ValueError, match="no iterations"):
        best_iterate([])
