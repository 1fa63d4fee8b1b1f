"""rl.harness: chunked training resumes bit-identically from the newest chunk, writes strict-JSON metrics and a
learning curve, and computes the same parameters on one device and on eight (the environment batch split over the
mesh's data axis, the gradient averaged by XLA)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from rl import harness

SCRIPT = Path(__file__).with_name("harness_equivalence.py")
ROOT = Path(__file__).resolve().parents[2]
NUM_ENVS, NUM_UPDATES = 4, 6
CONFIG = {"lr": 0.1, "show_progress": False}


def toy_trainer(interrupt_after: int | None = None) -> harness.Trainer:
    """Linear regression on environments whose observations drift randomly: a runner state with parameters, an
    environment batch, a typed key and a counter, and a loss that is a mean over the batch. `records` raises
    (like a crash) when asked for the records of the chunk that starts after `interrupt_after` updates."""

    def init(key):
        k_w, k_obs = jax.random.split(key)
        return {"w": jax.random.normal(k_w, (3,)), "obs": jax.random.normal(k_obs, (NUM_ENVS, 3)), "key": key,
                "t": jnp.zeros((), jnp.int32)}

    def update(state):
        key, k_noise = jax.random.split(state["key"])
        obs = 0.9 * state["obs"] + jax.random.normal(k_noise, state["obs"].shape)
        loss, grad = jax.value_and_grad(lambda w: jnp.mean((obs @ w - 1.0) ** 2))(state["w"])
        new = {"w": state["w"] - CONFIG["lr"] * grad, "obs": obs, "key": key, "t": state["t"] + 1}
        return new, {"loss": loss, "never_finite": jnp.where(loss > -1.0, jnp.nan, 0.0)}

    def records(metrics, done):
        if done == interrupt_after:
            raise KeyboardInterrupt("killed")
        return harness.per_update_records(metrics, done)

    return harness.Trainer(init=init, update=update, num_updates=NUM_UPDATES, env_steps_per_update=NUM_ENVS,
                           env_axes=lambda s: {"w": harness.REPLICATED, "obs": harness.env_batch(),
                                               "key": harness.REPLICATED, "t": harness.REPLICATED},
                           records=records, postfix=lambda r: {"loss": f"{r[-1]['loss']:.3f}"})


def _train(workdir: Path, trainer: harness.Trainer, config: dict = CONFIG) -> harness.Trained:
    return harness.train(trainer, config, str(workdir), jax.random.key(0), num_chunks=3, show_progress=True)


def _bits(state) -> list[bytes]:
    state = dict(state, key=jax.random.key_data(state["key"]))
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(state)]


def test_chunk_sizes_cover_every_update_with_at_most_two_sizes():
    assert harness.chunk_sizes(6, 3) == [2, 2, 2] and harness.chunk_sizes(10, 3) == [4, 4, 2]
    assert sum(harness.chunk_sizes(97, 7)) == 97 and len(set(harness.chunk_sizes(97, 7))) <= 2
    with pytest.raises(ValueError, match=r"num_chunks must lie in \[1, num_updates=5\], got 6"):
        harness.chunk_sizes(5, 6)
    assert harness.env_batch(1) == P(None, "data") and harness.env_batch() == P("data")


def test_interrupted_run_resumes_bit_identically_from_the_newest_chunk(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    full = _train(a, toy_trainer())
    assert full.updates_trained == NUM_UPDATES and [r["update"] for r in full.history] == list(range(1, 7))
    assert all(r["never_finite"] is None for r in full.history)  # NaN becomes null: strict JSON
    lines = (a / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == full.history and "NaN" not in lines[0]
    assert sorted(os.listdir(a / "checkpoints")) == ["4", "6"]  # keep_last=2, step = updates done

    with pytest.raises(KeyboardInterrupt):
        _train(b, toy_trainer(interrupt_after=4))  # dies in its third chunk, after two checkpointed chunks
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 4
    resumed = _train(b, toy_trainer())
    assert resumed.updates_trained == 2 and resumed.first_chunk_updates == 2
    assert _bits(resumed.state) == _bits(full.state) and resumed.history == full.history
    assert (b / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()
    # Not vacuous: the resumed chunk moved the parameters.
    assert not np.array_equal(np.asarray(resumed.state["w"]), np.asarray(_restore(b, 4)["w"]))

    again = _train(b, toy_trainer())  # a finished run trains nothing and changes nothing
    assert again.updates_trained == 0 and _bits(again.state) == _bits(full.state)

    with pytest.raises(ValueError, match=r"config.json records a run with lr=0.1, but this run has 0.2"):
        _train(b, toy_trainer(), {**CONFIG, "lr": 0.2})

    harness.plot_learning_curve(str(a), full.history, "update", {"loss": "loss", "skipped": "never_finite"},
                                title="toy", ylabel="loss")
    assert (a / "learning_curve.png").stat().st_size > 1000


@dataclasses.dataclass(frozen=True)
class _Before:
    lr: float = 0.1
    show_progress: bool = False


@dataclasses.dataclass(frozen=True)
class _After(_Before):
    momentum: float = 0.0  # a field added after the run started; its default reproduces the old behaviour


def test_a_run_resumes_after_its_config_gained_a_field_left_at_its_default(tmp_path):
    """config.json and the checkpoints were written without `momentum`; resuming with it at its default continues
    the run, and setting it otherwise is refused as a different run."""
    with pytest.raises(KeyboardInterrupt):
        harness.train(toy_trainer(interrupt_after=4), _Before(), str(tmp_path), jax.random.key(0), num_chunks=3,
                      show_progress=False)
    with pytest.raises(ValueError, match=r"records a run with momentum=absent, but this run has 0.9"):
        harness.train(toy_trainer(), _After(momentum=0.9), str(tmp_path), jax.random.key(0), num_chunks=3,
                      show_progress=False)
    resumed = harness.train(toy_trainer(), _After(), str(tmp_path), jax.random.key(0), num_chunks=3,
                            show_progress=False)
    assert resumed.updates_trained == 2
    full = _train(tmp_path / "full", toy_trainer())
    assert _bits(resumed.state) == _bits(full.state)


def _restore(workdir: Path, step: int):
    from jaxalign.train.checkpoint import PytreeCheckpointer
    from jaxalign.rundir import without_presentation_fields

    with PytreeCheckpointer(workdir / "checkpoints", without_presentation_fields(CONFIG)) as ckpt:
        return ckpt.restore(step, toy_trainer().init(jax.random.key(1)))[0]


def test_ppo_parameters_after_a_few_updates_match_on_one_and_eight_devices(tmp_path):
    """Multi-device sharding needs XLA_FLAGS before jax is imported, hence a subprocess for the eight devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = tmp_path / "eight"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    layout = json.loads((out / "layout.json").read_text())
    # The environment batch really was split: 16 environments, 2 per device; the parameters replicated.
    assert layout["devices"] == 8 and layout["obs_spec"] == "P('data',)" and layout["obs_shard_shape"][0] == 2
    assert layout["params_replicated"]
    assert "cannot split its environment batch (axis 0) over the 8 devices" in layout["uneven_error"]
    assert not layout["uneven_wrote"]  # refused before the work directory was claimed

    sys.path.insert(0, str(SCRIPT.parent))
    import harness_equivalence as eq

    one = eq.train_tiny(str(tmp_path / "one"), mesh=Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                                                         ("data", "fsdp", "tensor")))
    eight = dict(np.load(out / "params.npz"))
    ones = eq.flat_params(one)
    assert sorted(ones) == sorted(eight)
    for name in ones:
        np.testing.assert_allclose(ones[name], eight[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Not vacuous: three updates moved every parameter matrix away from its initial value.
    initial = eq.make_ppo(eq.TINY.ppo, eq.CartPole()).init(jax.random.key(eq.TINY.seed)).train_state.params
    moved = jax.tree_util.tree_map(lambda x, y: float(np.abs(np.asarray(x) - y).max()), initial,
                                   one.state.train_state.params)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-5, moved
    assert [r["update"] for r in layout["history"]] == [r["update"] for r in one.history] == [1, 2, 3]
