"""The path layer (`jaxalign.paths`): local paths behave as the run directory always has (a temporary + rename, no
temporary left, errors naming the real file); a `gs://` path goes through etils.epath and never through `os`.

No network here: `gs://` is served by an in-memory fsspec file system registered in place of gcsfs (`fake_gcs`), and
every `os` / `open` call on a path starting with "gs:" fails the test, so nothing silently becomes a local
directory named "gs:". The last tests run a whole (host-only) experiment through `jaxalign.registry` with its work
directory there and read its files back through the layer.
"""
from __future__ import annotations

import builtins
import dataclasses
import errno
import importlib.util
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from etils.epath import backend as epath_backend  # noqa: E402
from etils.epath import gpath  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

from jaxalign import paths, registry, tracking  # noqa: E402
from jaxalign.rundir import RunDir, claim, load_arrays, load_json, save_arrays, write_json_atomic  # noqa: E402
from jaxalign.train.loop import MetricsLog, process_log_path  # noqa: E402


class FakeGCS(MemoryFileSystem):
    """Cloud Storage as epath's fsspec backend sees it, kept in memory: objects keyed "bucket/name"."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("gs://").strip("/")


def _no_local_io_on(prefix: str, monkeypatch) -> None:
    """Every os / open call on a path starting with `prefix` fails the test."""
    def guard(real):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(prefix):
                raise AssertionError(f"{real.__name__}({os.fspath(path)!r}) went to the local file system")
            return real(path, *args, **kwargs)
        return call

    for module, name in [(builtins, "open"), (os, "makedirs"), (os, "replace"), (os, "remove"), (os, "listdir"),
                         (os, "stat"), (os.path, "exists"), (os.path, "isdir"), (os.path, "isfile")]:
        monkeypatch.setattr(module, name, guard(getattr(module, name)))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    fs = FakeGCS()
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    monkeypatch.setattr(epath_backend.fsspec_backend, "_get_filesystem", lambda name: fs)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # gs:// through fsspec, as with gcsfs
    monkeypatch.setattr(paths, "_backend_error", lambda scheme: None)  # the fake stands in for gcsfs
    monkeypatch.chdir(tmp_path)
    _no_local_io_on("gs:", monkeypatch)
    yield fs
    assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local directory"


def _figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [1, 0, 1])
    return fig


# --- local paths ---------------------------------------------------------------------------------------------------


def test_local_atomic_write_append_and_listing(tmp_path):
    path = str(tmp_path / "a.txt")
    paths.write_atomic(path, "one\n")
    paths.append_text(path, "two\n")
    with paths.appending(path) as log:
        log.write("three\n")
    assert paths.read_text(path) == "one\ntwo\nthree\n" and os.listdir(tmp_path) == ["a.txt"]
    paths.write_atomic(str(tmp_path / "b.bin"), b"\x00\x01")
    assert paths.read_bytes(str(tmp_path / "b.bin")) == b"\x00\x01"
    assert paths.glob(str(tmp_path), "*.bin") == [str(tmp_path / "b.bin")]
    assert sorted(paths.listdir(str(tmp_path))) == ["a.txt", "b.bin"]
    paths.remove(str(tmp_path / "b.bin"))
    paths.remove(str(tmp_path / "b.bin"))  # missing: not an error
    paths.makedirs(str(tmp_path / "d" / "e"))
    assert paths.isdir(str(tmp_path / "d" / "e")) and paths.join("x", "y") == os.path.join("x", "y")
    paths.rmtree(str(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]
    assert str(paths.absolute_path("rel")) == os.path.abspath("rel")


def test_local_failed_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e:
        paths.write_atomic(str(tmp_path / "r.json"), "{}")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "r.json")
    assert os.listdir(tmp_path) == []


def test_save_figure_writes_the_same_png_as_savefig(tmp_path):
    fig = _figure()
    fig.savefig(tmp_path / "direct.png", dpi=50)
    paths.save_figure(fig, str(tmp_path / "layer.png"), dpi=50)
    plt.close(fig)
    assert (tmp_path / "layer.png").read_bytes() == (tmp_path / "direct.png").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["direct.png", "layer.png"]


# --- a gs:// path, through epath ------------------------------------------------------------------------------------


def test_object_store_operations_go_through_epath(fake_gcs):
    root = "gs://bucket/run"
    with pytest.raises(AssertionError, match="went to the local file system"):
        open(root + "/x", "w")  # the guard itself
    assert not paths.is_local(root) and paths.join(root, "logs", "a") == "gs://bucket/run/logs/a"
    assert str(paths.absolute_path(root)) == root and paths.dirname(root + "/x.json") == root
    paths.makedirs(paths.join(root, "logs"))
    paths.write_atomic(paths.join(root, "a.json"), '{"x": 1}')
    paths.append_text(paths.join(root, "m.jsonl"), "1\n")
    paths.append_text(paths.join(root, "m.jsonl"), "2\n")
    with paths.appending(paths.join(root, "m.jsonl")) as log:
        log.write("3\n")
        assert paths.read_text(paths.join(root, "m.jsonl")) == "1\n2\n", "staged until the block ends"
    assert paths.read_text(paths.join(root, "m.jsonl")) == "1\n2\n3\n"
    fig = _figure()
    paths.save_figure(fig, paths.join(root, "p.png"), dpi=50)
    plt.close(fig)
    assert paths.read_bytes(paths.join(root, "p.png")).startswith(b"\x89PNG")
    assert paths.glob(root, "*.png") == ["gs://bucket/run/p.png"]
    assert set(paths.listdir(root)) >= {"a.json", "m.jsonl", "p.png"}
    assert sorted(k for k in fake_gcs.store) == ["bucket/run/a.json", "bucket/run/m.jsonl", "bucket/run/p.png"]
    paths.remove(paths.join(root, "a.json"))
    assert not paths.exists(paths.join(root, "a.json"))
    paths.rmtree(root)
    assert not fake_gcs.store


def test_run_directory_on_an_object_store(fake_gcs):
    run = RunDir("gs://bucket/runs/a")
    assert run.config == "gs://bucket/runs/a/config.json" and run.sub("it_1").root == "gs://bucket/runs/a/it_1"
    claim({"seed": 0, "beta": 0.1}, run.root)
    claim({"seed": 0, "beta": 0.1}, run.root)  # a resume
    with pytest.raises(ValueError, match="beta=0.1"):
        claim({"seed": 0, "beta": 0.5}, run.root)
    write_json_atomic(run.results, {"acc": float("nan"), "n": 3})
    assert load_json(run.results) == {"acc": None, "n": 3, "nonfinite": ["acc"]}
    save_arrays(run.pairs, {"x": np.arange(4)}, {"kept": 4})
    arrays, stats = load_arrays(run.pairs)
    assert stats == {"kept": 4} and arrays["x"].tolist() == [0, 1, 2, 3]
    assert load_json(run.file("missing.json")) is None and load_arrays(run.file("missing.npz")) is None

    log = MetricsLog(run.metrics, process_index=0)
    for step in (1, 2, 3):
        log.write({"phase": "dpo", "step": step, "loss": 1.0 / step})
    log.truncate("dpo", 2)
    log.write({"phase": "dpo", "step": 3, "loss": 0.25})
    assert [r["step"] for r in log.records("dpo")] == [1, 2, 3] and log.records("dpo")[-1]["loss"] == 0.25
    assert process_log_path(run.metrics, 1) == "gs://bucket/runs/a/logs/metrics.process_1.jsonl"
    assert not [k for k in fake_gcs.store if ".tmp" in k], "object writes need no temporary"


def test_reference_cache_and_rl_metrics_on_an_object_store(fake_gcs):
    from jaxalign.train.reference import cached_arrays
    from rl.harness import append_metrics, write_metrics

    calls = []

    def compute():
        calls.append(1)
        return {"logps": np.arange(3.0)}

    for hit in (False, True):
        arrays, info = cached_arrays("gs://bucket/run/reference_cache", "ref", "k" * 64, compute, expected_rows=3)
        assert info["hit"] is hit and arrays["logps"].tolist() == [0.0, 1.0, 2.0]
    assert len(calls) == 1 and info["path"] == f"gs://bucket/run/reference_cache/ref-{'k' * 32}.npz"
    write_metrics("gs://bucket/run/metrics.jsonl", [{"update": 1}])
    append_metrics("gs://bucket/run/metrics.jsonl", [{"update": 2}, {"update": 3}])
    lines = paths.read_text("gs://bucket/run/metrics.jsonl").splitlines()
    assert [json.loads(line)["update"] for line in lines] == [1, 2, 3]


def test_a_gs_workdir_without_a_backend_is_one_line(tmp_path, monkeypatch, capsys, request):
    # As on a machine without gcsfs or TensorFlow, whatever this one has installed.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in paths.BACKENDS["gs"] else find_spec(name, *a))
    paths._backend_error.cache_clear()
    request.addfinalizer(paths._backend_error.cache_clear)  # answered under the patch: not for later tests
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"gs://b/r: gs:// paths need gcsfs or tensorflow installed"):
        paths.exists("gs://b/r")
    with pytest.raises(ValueError, match="unsupported scheme memory://"):
        paths.exists("memory://b/r")
    assert registry.run_command("ppo_cartpole", "gs://b/r", []) == 2
    assert capsys.readouterr().err.startswith("jaxalign: error: gs://b/r: gs:// paths need gcsfs")
    assert os.listdir(tmp_path) == []


def test_tracking_is_refused_for_an_object_store_workdir():
    tracking.check_workdir((), "gs://bucket/run")
    tracking.check_workdir(("tensorboard",), "/tmp/run")
    with pytest.raises(ValueError, match="needs a local work directory, but gs://bucket/run is on an object store"):
        tracking.check_workdir(("tensorboard",), "gs://bucket/run")


# --- a whole run through the registry, its work directory on gs:// -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    steps: int = 3
    fail_before_claim: bool = False


def _tiny_run(cfg: TinyConfig, workdir: str) -> dict:
    """A host-only experiment writing every kind of run file: config, metrics, arrays, a plot, results."""
    if cfg.fail_before_claim:
        raise ValueError("refused before the claim")
    run = RunDir(workdir)
    claim(cfg, workdir)
    log = MetricsLog(run.metrics, process_index=0)
    done = len(log.records("train"))
    for step in range(done + 1, cfg.steps + 1):
        log.write({"phase": "train", "step": step, "loss": 1.0 / step})
    save_arrays(run.samples, {"tokens": np.ones((2, 3), np.int32)}, {"n": 2})
    fig = _figure()
    paths.save_figure(fig, run.file("loss.png"), dpi=50)
    plt.close(fig)
    results = {"final_loss": log.records("train")[-1]["loss"], "steps": cfg.steps}
    write_json_atomic(run.results, results)
    print("tiny run done")
    return results


@pytest.fixture
def tiny_experiment():
    registry.register_experiment("tiny_paths", "host-only run files", TinyConfig, _tiny_run)
    yield "tiny_paths"
    registry.EXPERIMENTS.pop("tiny_paths")


def test_a_run_on_an_object_store_writes_and_resumes_through_the_layer(fake_gcs, tiny_experiment, capsys):
    workdir = "gs://bucket/runs/tiny"
    results = registry.run_experiment(tiny_experiment, workdir, ["steps=3"])
    assert results == {"final_loss": pytest.approx(1 / 3), "steps": 3}
    assert json.loads(paths.read_text(paths.join(workdir, "results.json")))["steps"] == 3
    assert json.loads(paths.read_text(paths.join(workdir, "config.json"))) == {"steps": 3, "fail_before_claim": False}
    assert paths.read_bytes(paths.join(workdir, "loss.png")).startswith(b"\x89PNG")
    assert load_arrays(paths.join(workdir, "samples.npz"))[1] == {"n": 2}

    again = registry.run_experiment(tiny_experiment, workdir, ["steps=3"])
    assert again == results
    metrics = paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3], "the resumed run repeats no step"
    run_log = paths.read_text(paths.join(workdir, "logs", "run.log"))
    assert run_log.count("=== ") == 2 and run_log.count("tiny run done") == 2, run_log
    assert "--workdir gs://bucket/runs/tiny" in run_log

    with pytest.raises(ValueError, match="steps=3, but this run has 5"):
        registry.run_experiment(tiny_experiment, workdir, ["steps=5"])
    with pytest.raises(ValueError, match="needs a local work directory"):
        registry.run_experiment(tiny_experiment, workdir, ["tracking=tensorboard"])
    capsys.readouterr()


def test_a_run_refused_before_its_claim_leaves_nothing_on_the_object_store(fake_gcs, tiny_experiment):
    with pytest.raises(ValueError, match="refused before the claim"):
        registry.run_experiment(tiny_experiment, "gs://bucket/runs/refused", ["fail_before_claim=true"])
    assert not [k for k in fake_gcs.store if k.startswith("bucket/runs/refused")]


# --- an ARITH experiment's own phases, its work directory on gs:// --------------------------------------------------

ARITH_TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
              "model.mlp_dim=64", "sft.batch_size=8", "sft.steps=2", "show_progress=false"]


def test_an_arith_experiment_claims_plots_and_writes_results_on_an_object_store(fake_gcs, monkeypatch):
    """The shared first and last phases of every ARITH experiment (`start_experiment`, `finish_experiment`) and the
    main job's plot go through the layer; the SFT phase between them (orbax checkpoints) is stubbed out."""
    from jaxalign.experiments import arith_dpo
    from jaxalign.experiments.arith_kit import phases
    from jaxalign.overrides import apply_overrides

    class Claimed(Exception):
        pass

    def stop_after_claim(*args, **kwargs):
        raise Claimed

    monkeypatch.setattr(phases, "train_sft", stop_after_claim)
    workdir = "gs://bucket/runs/arith"
    cfg = apply_overrides(arith_dpo.ArithDPOConfig(), ARITH_TINY)
    with pytest.raises(Claimed):
        phases.start_experiment(cfg, cfg, workdir)
    assert json.loads(paths.read_text(paths.join(workdir, "config.json")))["sft"]["steps"] == 2

    history = [{"step": 0, "val/accuracy": 0.25, "val/mean_length": 6.0},
               {"step": 2, "val/accuracy": 0.5, "val/mean_length": 5.0}]
    records = [{"step": 1, "rewards/margin": 0.1}, {"step": 2, "rewards/margin": 0.3}]
    results = phases.finish_experiment(workdir, {"accuracy": 0.5},
                                       lambda path: arith_dpo._plot(history, records, path), "dpo_validation.png")
    assert results == {"accuracy": 0.5} and load_json(paths.join(workdir, "results.json")) == results
    assert paths.read_bytes(paths.join(workdir, "dpo_validation.png")).startswith(b"\x89PNG")
    plt.close("all")


def test_an_export_and_a_shared_sft_checkpoint_are_copied_up_file_by_file(fake_gcs, tmp_path):
    """dpo_files' export (staged in a local directory, then uploaded) and the iterative bench's copy of a seed's SFT
    checkpoint (a tree): objects with the local files' bytes."""
    from jaxalign.bench.iterative import copy_tree
    from jaxalign.experiments.files_kit import upload_directory

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}\n")
    (export / "model.safetensors").write_bytes(b"\x00\x01\x02")
    upload_directory(str(export), "gs://bucket/run/export")
    assert paths.read_bytes("gs://bucket/run/export/model.safetensors") == b"\x00\x01\x02"
    assert sorted(paths.listdir("gs://bucket/run/export")) == ["config.json", "model.safetensors"]

    step = tmp_path / "sft" / "4" / "state"
    step.mkdir(parents=True)
    (step / "a.bin").write_bytes(b"ab")
    copy_tree(str(tmp_path / "sft"), "gs://bucket/run/seed0/checkpoints/sft")
    copy_tree("gs://bucket/run/seed0/checkpoints/sft", "gs://bucket/run/seed0/dpo/checkpoints/sft")
    assert paths.read_bytes("gs://bucket/run/seed0/dpo/checkpoints/sft/4/state/a.bin") == b"ab"
