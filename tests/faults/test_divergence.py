"""A diverging run stops with one clear error and never saves a non-finite state (README, "Reliability").

Three levels: the thin loop with a scripted loss that turns NaN at a given step (stop, and skip-batch), the RL
harness with an update that makes the parameters NaN, and the real command line with a learning rate of 1e6.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from fault_checks import TINY_ARITH, run_arith, tree_digest
from jaxalign.data.iterator import ArrayDataset
from jaxalign.sharding import MeshConfig, make_mesh
from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
from jaxalign.train.loop import DivergenceError, MetricsLog, train_loop
from jaxalign.train.state import TrainState
from rl import harness

NAN_STEP = 5  # the first step whose loss and gradient are NaN


def _state() -> TrainState:
    return TrainState.create({"w": jnp.ones(3)}, optax.sgd(0.1), jax.random.key(0))


def _scripted_step(nan_steps):
    """A step whose gradient is ones, or NaN (and its loss NaN) when the step it makes is in `nan_steps`; jitted
    with the state donated, as `jaxalign.train.step.jit_train_step` does."""

    def step(state, frozen, batch, position):
        bad = jnp.isin(state.step + 1, jnp.asarray(nan_steps))
        grad = jnp.where(bad, jnp.nan, 1.0) * jnp.ones(3)
        return state.apply_gradients({"w": grad}, data=position), {"loss": jnp.sum(grad), "grad_norm": jnp.sum(grad)}

    return jax.jit(step, donate_argnums=(0,))


def _run(tmp_path, nan_steps, **kwargs):
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    dataset = ArrayDataset({"attention_mask": np.ones((16, 4), np.int32)})
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=2, keep_last=10), {"run": "toy"}) as ckpt:
        state = train_loop(state=_state(), step_fn=_scripted_step(nan_steps), frozen=None, dataset=dataset,
                           batch_size=4, num_steps=10, seed=0, mesh=mesh, checkpointer=ckpt,
                           metrics_log=MetricsLog(str(tmp_path / "metrics.jsonl"), 0), log_every=3, desc="toy",
                           show_progress=False, **kwargs)
        return state, ckpt.all_steps()


@pytest.mark.parametrize("nan_steps, what", [
    (list(range(NAN_STEP, 11)), "loss = nan"),
    # Only step 5's batch is NaN: step 6's loss is finite again, but the parameters step 5 made NaN are caught.
    ([NAN_STEP], "the parameters are non-finite"),
])
def test_loop_stops_at_the_first_save_after_a_nan_and_keeps_the_good_checkpoints(tmp_path, nan_steps, what):
    with pytest.raises(DivergenceError) as raised:
        _run(tmp_path, nan_steps)
    message = str(raised.value)
    assert "\n" not in message and isinstance(raised.value, ValueError)
    # Step 5 is neither a log step (3, 6, 9) nor a save step (2, 4, ...): step 6 is both, and the first to see it.
    assert f"phase 'toy' diverged: {what} at step 6" in message, message
    assert f"last good checkpoint is step 4 in {tmp_path / 'ckpt'}" in message, message
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=2, keep_last=10), {"run": "toy"}) as ckpt:
        assert ckpt.all_steps() == [2, 4]
        restored = ckpt.restore_latest(_state())
    np.testing.assert_allclose(np.asarray(restored.params["w"]), 1.0 - 0.4, rtol=1e-6)


def test_skip_batch_keeps_the_state_from_before_a_nonfinite_batch(tmp_path):
    state, steps = _run(tmp_path, [NAN_STEP, 8], on_nonfinite="skip-batch")
    assert int(state.step) == 10 and steps == [2, 4, 6, 8, 10]
    np.testing.assert_allclose(np.asarray(state.params["w"]), 1.0 - 0.1 * 8, rtol=1e-5)  # 10 steps, 2 skipped
    records = MetricsLog(str(tmp_path / "metrics.jsonl"), 0).records("toy")
    assert [r["skipped_batches"] for r in records] == [0, 1, 1, 0]  # logged at steps 3, 6, 9, 10


def test_on_nonfinite_is_checked():
    with pytest.raises(ValueError, match="on_nonfinite must be one of stop, skip-batch"):
        train_loop(state=None, step_fn=None, frozen=None, dataset=None, batch_size=1, num_steps=1, seed=0,
                   mesh=None, on_nonfinite="ignore")


def _nan_trainer(nan_after: int) -> harness.Trainer:
    """One parameter vector; the update after `nan_after` updates makes it NaN (as a learning rate of 1e6 would)."""

    def update(state):
        w = jnp.where(state["t"] >= nan_after, jnp.nan, state["w"] - 0.1)
        return {"w": w, "t": state["t"] + 1}, {"mean_return": jnp.nan}  # a NaN return alone is no divergence

    return harness.Trainer(init=lambda key: {"w": jnp.ones(2), "t": jnp.zeros((), jnp.int32)}, update=update,
                           num_updates=6, env_steps_per_update=1)


def test_rl_harness_stops_before_saving_a_nan_runner_state(tmp_path):
    config = {"toy": 1, "show_progress": False}
    with pytest.raises(DivergenceError) as raised:
        harness.train(_nan_trainer(3), config, str(tmp_path), jax.random.key(0), num_chunks=3, show_progress=False)
    message = str(raised.value)
    assert "the runner state is non-finite at update 4" in message, message
    assert f"last good checkpoint is step 2 in {tmp_path / 'checkpoints'}" in message, message
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # the bad chunk is not logged either


# ---------------------------------------------------------------------------------------------------------------
# The command line.

DIVERGING = [*TINY_ARITH, "sft.steps=30", "checkpoint.every_steps=2", "log_every=5", "sft.optim.learning_rate=1e6"]






def test_a_diverging_run_exits_with_one_line_and_only_finite_checkpoints(tmp_path):
    proc = run_arith(tmp_path, *DIVERGING)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("objective of dpo: sigmoid(beta=2.0"), proc.stderr[-4000:]  # the run's header
    lines = lines[1:]
    assert proc.returncode == 2 and len(lines) == 1, f"rc {proc.returncode}\n{proc.stderr[-4000:]}"
    sft_dir = tmp_path / "checkpoints" / "sft"
    assert lines[0].startswith("jaxalign: error: phase 'sft' diverged: "), lines[0]
    assert " at step " in lines[0] and f"in {sft_dir}, which a re-run resumes from" in lines[0], lines[0]
    steps = sorted(int(p.name) for p in sft_dir.iterdir() if p.name.isdigit())
    assert steps and f"last good checkpoint is step {steps[-1]} in" in lines[0], (steps, lines[0])
    for step in steps:
        tree = ocp.StandardCheckpointer().restore(sft_dir / str(step) / "state")
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree["params"])]
        assert all(np.isfinite(x).all() for x in leaves), f"step {step} holds non-finite parameters"

    before = tree_digest(tmp_path / "checkpoints")
    again = run_arith(tmp_path, *DIVERGING)  # resumes from the last good step and diverges again
    assert again.returncode == 2 and "diverged" in again.stderr, again.stderr[-4000:]
    assert tree_digest(tmp_path / "checkpoints") == before


def test_on_nonfinite_skip_batch_is_an_explicit_recorded_and_counted_opt_in(tmp_path):
    """`--on-nonfinite=skip-batch` sets every LM phase's on_nonfinite (recorded in config.json, so a resume without
    the flag is refused as another run); the diverging SFT phase then skips its non-finite batches, counts them in
    metrics.jsonl and says how many on stderr, and saves only finite checkpoints."""
    proc = run_arith(tmp_path, "--on-nonfinite=skip-batch", *DIVERGING, "dpo.steps=2")
    assert "diverged" not in proc.stderr, proc.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sft"]["on_nonfinite"] == config["dpo"]["on_nonfinite"] == "skip-batch"
    sft = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "sft"]
    skipped = sum(r["skipped_batches"] for r in sft)
    assert skipped > 0 and f"phase 'sft' skipped {skipped} of its 30 batches" in proc.stderr, proc.stderr[-3000:]
    for step_dir in (tmp_path / "checkpoints" / "sft").iterdir():
        tree = ocp.StandardCheckpointer().restore(step_dir / "state")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree["params"]))

    again = run_arith(tmp_path, *DIVERGING, "dpo.steps=2")  # without the flag: another run
    assert again.returncode == 2 and "on_nonfinite='skip-batch', but this run has 'stop'" in again.stderr, \
        again.stderr[-2000:]
