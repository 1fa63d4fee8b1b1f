"""Tests for jaxalign.train.checkpoint: round trip, pruning, cadence, mismatch errors, crash leftovers, sharding;
for `TrainState`s (`Checkpointer`) and for any pytree with a JSON record (`PytreeCheckpointer`, RL runner states)."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.data.position import DataPosition
from jaxalign.train.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointMismatchError,
    PytreeCheckpointer,
    UnreadableCheckpointError,
)
from jaxalign.train.state import TrainState

TX = optax.adamw(1e-2)  # one shared instance, so the jitted step below compiles once per shape
META = {"model": {"d_model": 16, "n_heads": 4, "layers": [1, 2]}, "seed": 0}


def make_params(d_model: int = 16, seed: int = 0, heads: int = 4) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "layers": {"attn": {"q": {"kernel": jax.random.normal(k1, (d_model, heads, 8), jnp.float32)}}},
        "embed": jax.random.normal(k2, (8, d_model), jnp.bfloat16),
    }


def make_state(d_model: int = 16, seed: int = 0, heads: int = 4) -> TrainState:
    return TrainState.create(make_params(d_model, seed, heads), TX, jax.random.key(seed))


@jax.jit
def _one_step(state: TrainState) -> TrainState:
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.1, state.params)
    rng, _ = jax.random.split(state.rng)
    data = DataPosition(epoch=state.data.epoch, offset=state.data.offset + 4)
    return state.apply_gradients(grads, data=data).replace(rng=rng)


def advance(state: TrainState, n: int) -> TrainState:
    """n optimizer steps with a fake gradient, so opt_state, step, rng and data position all move."""
    for _ in range(n):
        state = _one_step(state)
    return state


def assert_states_identical(a: TrainState, b: TrainState) -> None:
    # tx is static and rebuilt per run (different function objects), so it is left out of the comparison.
    la, ta = jax.tree_util.tree_flatten(a.replace(rng=jax.random.key_data(a.rng), tx=None))
    lb, tb = jax.tree_util.tree_flatten(b.replace(rng=jax.random.key_data(b.rng), tx=None))
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert jax.random.key_impl(a.rng) == jax.random.key_impl(b.rng)


def test_config_validation():
    with pytest.raises(ValueError, match="every_steps.*0"):
        CheckpointConfig(every_steps=0, keep_last=1)
    with pytest.raises(ValueError, match="keep_last.*-2"):
        CheckpointConfig(every_steps=1, keep_last=-2)
    with pytest.raises(ValueError, match="every_steps"):
        CheckpointConfig(every_steps=1.5, keep_last=1)  # type: ignore[arg-type]


def test_round_trip_bit_identical(tmp_path):
    state = advance(make_state(), 3)
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep_last=2), META) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore_latest(make_state()) is None
        assert ckpt.save(state)
        assert ckpt.latest_step() == 3
    # A fresh Checkpointer (as after a restart) must read what the first one wrote.
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep_last=2), META) as ckpt:
        restored = ckpt.restore_latest(make_state(seed=1))  # different values, same structure
    assert restored is not None
    assert restored.tx is not None
    assert int(restored.step) == 3 and int(restored.data.offset) == 12
    assert_states_identical(state, restored)
    # The restored state keeps training exactly like the original.
    assert_states_identical(advance(state, 1), advance(restored, 1))


def test_restore_into_abstract_template(tmp_path):
    state = advance(make_state(), 2)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        ckpt.save(state)
        abstract = jax.eval_shape(make_state)
        restored = ckpt.restore_latest(abstract)
    assert isinstance(restored.params["embed"], jax.Array)
    assert_states_identical(state, restored)


def test_keep_last_prunes_and_latest_step(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=2), META) as ckpt:
        saved = {}
        for _ in range(4):
            state = advance(state, 1)
            assert ckpt.save(state)
            saved[int(state.step)] = state
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
        restored = ckpt.restore_latest(make_state())
    assert_states_identical(saved[4], restored)


def test_every_steps_and_force(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=3, keep_last=10), META) as ckpt:
        results = {}
        for _ in range(7):
            state = advance(state, 1)
            results[int(state.step)] = ckpt.save(state)
        assert results == {1: False, 2: False, 3: True, 4: False, 5: False, 6: True, 7: False}
        assert ckpt.all_steps() == [3, 6]
        assert ckpt.save(state, force=True)
        assert ckpt.all_steps() == [3, 6, 7]
        # Saving a step that already exists is a no-op, not an error.
        assert not ckpt.save(state, force=True)
        assert ckpt.latest_step() == 7


def test_param_shape_mismatch_message(tmp_path):
    directory = tmp_path / "ckpt"
    with Checkpointer(directory, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        ckpt.save(advance(make_state(heads=4), 2))
    with Checkpointer(directory, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore_latest(make_state(heads=8))
    msg = str(info.value)
    assert str(directory) in msg and "step 2" in msg
    assert "params/layers/attn/q/kernel has shape (16, 4, 8), expected (16, 8, 8)" in msg
    assert info.value.__cause__ is None  # one clear error, no chained orbax traceback


def test_dtype_and_structure_mismatch(tmp_path):
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        ckpt.save(advance(make_state(), 1))
        state = make_state()
        wrong_dtype = state.replace(params={**state.params, "embed": state.params["embed"].astype(jnp.float32)})
        with pytest.raises(CheckpointMismatchError, match="params/embed has dtype bfloat16, expected float32"):
            ckpt.restore_latest(wrong_dtype)
        extra = TrainState.create({**state.params, "head": jnp.zeros((3,))}, TX, jax.random.key(0))
        with pytest.raises(CheckpointMismatchError, match="params/head is absent"):
            ckpt.restore_latest(extra)


def test_metadata_mismatch_message(tmp_path):
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        ckpt.save(advance(make_state(), 5))
    other = {"model": {"d_model": 16, "n_heads": 8, "layers": [1, 2]}, "seed": 0}
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), other) as ckpt:
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore_latest(make_state())
    msg = str(info.value)
    assert f"checkpoint {tmp_path} step 5" in msg
    assert "metadata model/n_heads is 4, expected 8" in msg
    # Tuples vs lists (the JSON round trip) are not a mismatch.
    same = {"model": {"d_model": 16, "n_heads": 4, "layers": (1, 2)}, "seed": 0}
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), same) as ckpt:
        assert ckpt.restore_latest(make_state()) is not None
    # A new key is a mismatch too.
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), {**META, "lr": 1e-3}) as ckpt:
        with pytest.raises(CheckpointMismatchError, match="metadata lr is absent, expected 0.001"):
            ckpt.restore_latest(make_state())


def test_rng_impl_mismatch(tmp_path):
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        ckpt.save(advance(make_state(), 1))
        template = make_state().replace(rng=jax.random.key(0, impl="rbg"))
        with pytest.raises(CheckpointMismatchError, match="rng key implementation is 'threefry2x32', expected 'rbg'"):
            ckpt.restore_latest(template)


def test_leftover_temp_dir_is_ignored(tmp_path):
    """A save killed half-way leaves `<step>.orbax-checkpoint-tmp` (orbax's atomicity._get_tmp_directory naming);
    it must be neither the latest step nor restored from."""
    config = CheckpointConfig(every_steps=1, keep_last=5)
    states = {}
    state = make_state()
    with Checkpointer(tmp_path, config, META) as ckpt:
        for _ in range(3):
            state = advance(state, 1)
            ckpt.save(state)
            states[int(state.step)] = state
    # Turn step 3 into what a save killed before its final rename leaves behind: the data under the temporary name.
    leftover = tmp_path / "3.orbax-checkpoint-tmp"
    (tmp_path / "3").rename(leftover)
    (leftover / "commit_success.txt").unlink(missing_ok=True)
    with Checkpointer(tmp_path, config, META) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.all_steps() == [1, 2]
        restored = ckpt.restore_latest(make_state())
        assert int(restored.step) == 2
        assert_states_identical(states[2], restored)
        # Resuming re-saves step 3 over the leftover; no temporary directory survives.
        assert ckpt.save(advance(restored, 1))
        assert ckpt.all_steps() == [1, 2, 3]
    assert not [p.name for p in tmp_path.iterdir() if "orbax-checkpoint-tmp" in p.name]


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "junk.txt").write_text("not a checkpoint")
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        assert ckpt.latest_step() == 7
        with pytest.raises(UnreadableCheckpointError, match=f"checkpoint {tmp_path} step 7 is not a readable"):
            ckpt.restore_latest(make_state())
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UnreadableCheckpointError, match="not a directory"):
        Checkpointer(a_file, CheckpointConfig(every_steps=1, keep_last=1), META)


# When a tensorstore read fails, orbax closes its event loop while sibling reads are still completing; their
# callbacks then raise "Event loop is closed" in a background thread (harmless, orbax-internal).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_array_data(tmp_path):
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        ckpt.save(advance(make_state(), 1))
    # Destroy the array store but keep the metadata: the read itself must fail with a clear error.
    for p in (tmp_path / "1" / "state").rglob("*"):
        if p.is_file() and "ocdbt" in str(p.relative_to(tmp_path)) and p.name != "_METADATA":
            p.write_bytes(b"garbage")
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        with pytest.raises(UnreadableCheckpointError, match=f"checkpoint {tmp_path} step 1"):
            ckpt.restore_latest(make_state())
    time.sleep(0.5)  # let those background callbacks fire inside this test, where the warning is filtered
    gc.collect()


def _sharded_state(mesh: Mesh, spec: P, seed: int = 0) -> TrainState:
    n = mesh.devices.size
    params = {"w": jnp.arange(8 * n * 4, dtype=jnp.float32).reshape(8 * n, 4) + seed, "b": jnp.zeros((4,))}
    params = {
        "w": jax.device_put(params["w"], NamedSharding(mesh, spec)),
        "b": jax.device_put(params["b"], NamedSharding(mesh, P())),
    }
    rng = jax.device_put(jax.random.key(seed), NamedSharding(mesh, P()))
    return TrainState.create(params, TX, rng)


def test_restore_with_mesh_sharding(tmp_path):
    mesh = Mesh(np.array(jax.devices()), ("x",))
    state = advance(_sharded_state(mesh, P("x", None)), 2)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        ckpt.save(state)
        template = _sharded_state(mesh, P(None, None), seed=3)
        restored = ckpt.restore_latest(template)
    assert restored.params["w"].sharding == NamedSharding(mesh, P(None, None))
    assert restored.opt_state[0].mu["w"].sharding == template.opt_state[0].mu["w"].sharding
    assert restored.rng.sharding == template.rng.sharding
    assert_states_identical(state, restored)
    # Ready for a jitted step with explicit in_shardings.
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, template.params)
    out = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 2, p), in_shardings=(shardings,))(restored.params)
    assert np.array_equal(np.asarray(out["w"]), np.asarray(state.params["w"]) * 2)


_EIGHT_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[2])
    import test_checkpoint as t
    from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    state = t.advance(t._sharded_state(mesh, P("x", None)), 2)
    assert len(state.params["w"].sharding.device_set) == 8
    with Checkpointer(sys.argv[1], CheckpointConfig(every_steps=1, keep_last=1), t.META) as ckpt:
        ckpt.save(state)
        # Restore onto a different mesh layout: 2 x 4, sharded over both axes.
        mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
        template = t._sharded_state(mesh2, P("a", "b"), seed=5)
        restored = ckpt.restore_latest(template)
    assert restored.params["w"].sharding == NamedSharding(mesh2, P("a", "b")), restored.params["w"].sharding
    assert restored.opt_state[0].nu["w"].sharding == template.opt_state[0].nu["w"].sharding
    assert restored.rng.sharding == template.rng.sharding, restored.rng.sharding
    t.assert_states_identical(state, restored)
    print("OK")
    """
)


def test_restore_with_eight_cpu_devices(tmp_path):
    """Multi-device sharding needs XLA_FLAGS before jax is imported, hence a subprocess."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICE_SCRIPT, str(tmp_path), os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Any pytree: typed PRNG keys anywhere, NamedTuples, struct dataclasses, and a JSON record (an RL runner state).


class Inner(NamedTuple):
    obs: jax.Array
    done: jax.Array


@struct.dataclass
class RunnerState:
    params: dict
    inner: Inner
    key: jax.Array
    step: jax.Array


def _runner_state(seed: int, width: int = 3) -> RunnerState:
    key = jax.random.key(seed)
    return RunnerState({"w": jax.random.normal(key, (width, 2)), "b": jnp.arange(2, dtype=jnp.int32)},
                       Inner(jax.random.uniform(jax.random.fold_in(key, 1), (4,)), jnp.array([True, False])),
                       jax.random.split(jax.random.fold_in(key, 2), 3), jnp.asarray(seed, jnp.int32))


def _same(x: RunnerState, y: RunnerState) -> bool:
    lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)

    def raw(v):
        return np.asarray(jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v)

    return len(lx) == len(ly) and all(raw(a).dtype == raw(b).dtype and raw(a).tobytes() == raw(b).tobytes()
                                      for a, b in zip(lx, ly))


def test_pytree_round_trip_keeps_every_leaf_the_keys_and_the_record(tmp_path):
    saved = _runner_state(7)
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1}, keep_last=2) as ckpt:
        assert ckpt.restore_latest(_runner_state(0)) is None
        assert ckpt.save(1, _runner_state(1), [{"loss": 1.0}])
        assert ckpt.save(2, saved, [{"loss": 1.0}, {"loss": float("nan")}])
        assert ckpt.save(3, saved, [])
        assert not ckpt.save(3, _runner_state(1), [])  # an existing step is never overwritten
        assert ckpt.latest_step() == 3
    (tmp_path / "4.orbax-checkpoint-tmp").mkdir()  # what a save killed half-way leaves behind
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1}, keep_last=2) as ckpt:
        step, restored, record = ckpt.restore_latest(_runner_state(0))
        # A non-finite record value reads back as null: the record is strict JSON.
        assert ckpt.restore(2, _runner_state(0))[1] == [{"loss": 1.0}, {"loss": None}]
    assert step == 3 and record == [] and sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
    assert isinstance(restored, RunnerState) and isinstance(restored.inner, Inner)
    assert _same(restored, saved) and not _same(restored, _runner_state(0))
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(saved.key)
    # The restored key draws what the saved one draws.
    assert np.array_equal(jax.random.uniform(restored.key[1], (3,)), jax.random.uniform(saved.key[1], (3,)))


def test_pytree_of_another_run_or_another_state_is_refused_naming_the_difference(tmp_path):
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1, "net": {"width": 3}}) as ckpt:
        ckpt.save(5, _runner_state(5), None)
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1, "net": {"width": 4}}) as ckpt:
        with pytest.raises(CheckpointMismatchError, match=r"step 5 was written for a different run: "
                                                          r"metadata net/width is 3, expected 4"):
            ckpt.restore_latest(_runner_state(0))
    with PytreeCheckpointer(str(tmp_path), {"lr": 0.1, "net": {"width": 3}}) as ckpt:
        with pytest.raises(CheckpointMismatchError, match=r"params/w has shape \(3, 2\), expected \(4, 2\)"):
            ckpt.restore_latest(_runner_state(0, width=4))
        unkeyed = _runner_state(0).replace(key=jax.random.key_data(_runner_state(0).key))
        with pytest.raises(CheckpointMismatchError, match="key key implementation is 'threefry2x32', expected None"):
            ckpt.restore_latest(unkeyed)
        with pytest.raises(ValueError, match="keep_last must be a positive int"):
            PytreeCheckpointer(str(tmp_path), {}, keep_last=0)


def test_an_unnameable_pytree_node_is_a_clear_error(tmp_path):
    @jax.tree_util.register_pytree_node_class
    class Opaque:
        def __init__(self, x):
            self.x = x

        def tree_flatten(self):
            return (self.x,), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    with PytreeCheckpointer(str(tmp_path), {}) as ckpt:
        with pytest.raises(TypeError, match=r"cannot checkpoint a \(Opaque\): every node must be"):
            ckpt.save(1, {"a": Opaque(jnp.zeros(2))})
        assert ckpt.latest_step() is None


def test_reads_the_earlier_trainstate_meta_layout(tmp_path):
    """TrainState checkpoints written before the two checkpointers were merged name their one key implementation
    "rng_impl" (and hold no "key_impls"); they still restore, and still refuse another implementation."""
    state = advance(make_state(), 2)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        ckpt.save(state)
    meta_file = tmp_path / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta == {"run": META, "key_impls": {"rng": "threefry2x32"}}
    meta_file.write_text(json.dumps({"run": META, "rng_impl": "threefry2x32"}))
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep_last=1), META) as ckpt:
        assert_states_identical(state, ckpt.restore_latest(make_state()))
        with pytest.raises(CheckpointMismatchError, match="rng key implementation is 'threefry2x32', expected 'rbg'"):
            ckpt.restore_latest(make_state().replace(rng=jax.random.key(0, impl="rbg")))


def test_orphaned_read_reports_are_dropped_during_a_restore_and_for_good_after_it_fails(monkeypatch):
    """tensorstore's reader threads report a callback onto orbax's closed event loop through sys.excepthook or
    sys.unraisablehook; such reports are dropped while a restore runs and, once it has failed, for good (and stderr is
    closed at exit, after flushing, for the reads still reporting while the interpreter shuts down); every other error
    still prints."""
    from types import SimpleNamespace

    from jaxalign.train import checkpoint

    seen, at_exit = [], []
    monkeypatch.setattr(sys, "excepthook", lambda t, e, tb: seen.append(str(e)))
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(f"unraisable {u.exc_value}"))
    monkeypatch.setattr(checkpoint.atexit, "register", at_exit.append)
    monkeypatch.setattr(checkpoint.atexit, "unregister", lambda f: at_exit.remove(f) if f in at_exit else None)
    closed, other = RuntimeError("Event loop is closed"), ValueError("a real error")

    def report_both():
        for error in (closed, other):
            sys.excepthook(type(error), error, None)
            sys.unraisablehook(SimpleNamespace(exc_value=error, object=None))

    with checkpoint._orphaned_read_noise_dropped():
        report_both()
    assert seen == ["a real error", "unraisable a real error"]
    report_both()  # the restore succeeded: the filters are gone
    assert seen[2:] == ["Event loop is closed", "unraisable Event loop is closed", "a real error",
                        "unraisable a real error"] and at_exit == []

    seen.clear()
    with pytest.raises(OSError):
        with checkpoint._orphaned_read_noise_dropped():
            raise OSError("truncated chunk")
    report_both()  # the failed restore's orphaned reads stay quiet
    assert seen == ["a real error", "unraisable a real error"]
    assert at_exit == [checkpoint._close_stderr_after_flushing]
    with pytest.raises(OSError):
        with checkpoint._orphaned_read_noise_dropped():
            raise OSError("another truncated chunk")
    assert at_exit == [checkpoint._close_stderr_after_flushing]  # registered once
