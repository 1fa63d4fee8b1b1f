"""Nothing the user had is silently overwritten: `jaxalign convert` into an existing directory (or onto its source),
a second `jaxalign sweep` in the same directory, a rerun of `jaxalign bench objectives` with other overrides; and a
truncated or corrupt safetensors file is one clear error naming it. Each case pins the exit code, a short stderr
naming the file and what is wrong, and the checksums of the user's files before and after.

Models are tiny jaxalign models built here (one layer, width 16) and written with `hf.save_native`, so each case
takes a second or two; the CLI runs in-process through `launch.cli.main`, as the console script does.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxalign.models import hf
from jaxalign.models.llama import ModelConfig, init_params
from jaxalign.overrides import ConfigError
from launch import sweep
from fault_checks import assert_one_error, tree_digest
from launch.cli import main

TINY = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, max_len=16,
                   tie_embeddings=False)




def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err




@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    """A jaxalign model directory (jaxalign_config.json + params.safetensors) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("native") / "model"
    hf.save_native(init_params(TINY, jax.random.key(0)), TINY, path, family="llama")
    return path


@pytest.fixture
def exported(native, tmp_path, capsys) -> Path:
    """A Hugging Face export of `native`, as a user's directory: the tool's files plus one of the user's own."""
    path = tmp_path / "hf"
    assert cli(capsys, "convert", "jaxalign-to-hf", str(native), str(path))[0] == 0
    (path / "tokenizer.json").write_text("{}")
    return path


def test_convert_onto_its_source_is_refused(exported, capsys):
    before = tree_digest(exported)
    rc, _, err = cli(capsys, "convert", "hf-to-jaxalign", str(exported), str(exported), "--overwrite")
    assert rc == 2
    assert_one_error(err, f"destination {exported} is the source directory")
    assert tree_digest(exported) == before


@pytest.mark.parametrize("direction", ["jaxalign-to-hf", "hf-to-jaxalign"])
def test_convert_into_a_non_empty_directory_is_refused(native, exported, tmp_path, capsys, direction):
    src, dst = (native, exported) if direction == "jaxalign-to-hf" else (exported, tmp_path / "ours")
    if direction == "hf-to-jaxalign":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    before = tree_digest(dst)
    rc, _, err = cli(capsys, "convert", direction, str(src), str(dst))
    assert rc == 2
    assert_one_error(err, f"destination {dst} is not empty", "--overwrite")
    assert tree_digest(dst) == before


def test_convert_overwrite_drops_stale_shards_and_keeps_config_fields(native, exported, capsys):
    """An earlier sharded export (index + two shards) and a config.json with token ids: --overwrite leaves the new
    single file, no stale shard or index, the token ids, and the user's tokenizer.json untouched."""
    tensors = load_file(exported / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, group in shards.items():
        save_file({n: np.zeros_like(tensors[n]) for n in group}, exported / file)  # stale values: zeros
    (exported / "model.safetensors").unlink()
    (exported / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, group in shards.items() for n in group}}))
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2}))
    tokenizer = tree_digest(exported)["tokenizer.json"]

    rc, out, err = cli(capsys, "convert", "jaxalign-to-hf", str(native), str(exported), "--overwrite")
    assert rc == 0, err
    assert {p.name for p in exported.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    merged = json.loads((exported / "config.json").read_text())
    assert (merged["bos_token_id"], merged["eos_token_id"]) == (1, 2) and merged["model_type"] == "llama"
    assert tree_digest(exported)["tokenizer.json"] == tokenizer
    params, _ = hf.from_pretrained(exported)  # the importer reads the new weights, not the stale zero shards
    expected, _, _ = hf.load_native(native)
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]),
                                  np.asarray(expected["embed"]["embedding"]))


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64] if keep is None else data[:keep])


@pytest.mark.parametrize("keep, what", [(None, "incomplete metadata"), (6, "header too small")])
def test_truncated_hf_safetensors_is_one_error_naming_the_file(exported, tmp_path, capsys, keep, what):
    _truncate(exported / "model.safetensors", keep)
    before = tree_digest(exported)
    rc, _, err = cli(capsys, "convert", "hf-to-jaxalign", str(exported), str(tmp_path / "ours"))
    assert rc == 2
    assert_one_error(err, f"{exported / 'model.safetensors'}: not a valid safetensors file", what, "truncated")
    assert tree_digest(exported) == before and not (tmp_path / "ours").exists()


def test_corrupt_native_params_is_one_error_naming_the_file(native, tmp_path, capsys):
    copy = tmp_path / "native"
    copy.mkdir()
    for file in native.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    data = bytearray((copy / hf.NATIVE_PARAMS).read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"  # the JSON header's first bytes
    (copy / hf.NATIVE_PARAMS).write_bytes(bytes(data))
    before = tree_digest(copy)
    rc, _, err = cli(capsys, "convert", "jaxalign-to-hf", str(copy), str(tmp_path / "hf"))
    assert rc == 2
    assert_one_error(err, f"{copy / hf.NATIVE_PARAMS}: not a valid safetensors file")
    assert tree_digest(copy) == before


# ---------------------------------------------------------------------------------------------------- sweep


def fake_runner():
    """Writes a results.json whose accuracy is a function of the point's overrides, as `jaxalign run` would."""
    def run(experiment, point, directory):
        with open(Path(directory) / point.name / "results.json", "w") as f:
            json.dump({"accuracy": 0.5 + 0.01 * len(point.name)}, f)
        return ""
    return run


def sweep_args(workdir: Path, *overrides: str) -> argparse.Namespace:
    return argparse.Namespace(name="arith_dpo", workdir=str(workdir), print_only=False, launcher="local",
                              launcher_args="", show_progress=False, overrides=list(overrides))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_second_sweep_in_the_same_directory_merges_its_rows(tmp_path, capsys):
    assert sweep.command(sweep_args(tmp_path, "dpo.beta=0.1,0.5", "show_progress=false"), fake_runner()) == 0
    first = {r["point"]: r for r in read_csv(tmp_path / "sweep.csv")}
    point_files = {k: v for k, v in tree_digest(tmp_path).items() if "/" in k}
    assert sweep.command(sweep_args(tmp_path, "dpo.beta=2,0.5", "show_progress=false"), fake_runner()) == 0
    rows = read_csv(tmp_path / "sweep.csv")
    assert [(r["point"], r["status"]) for r in rows] == [("dpo.beta-0.1", "ran"), ("dpo.beta-0.5", "skipped"),
                                                         ("dpo.beta-2", "ran")]
    assert rows[0]["accuracy"] == first["dpo.beta-0.1"]["accuracy"]
    assert {k: v for k, v in tree_digest(tmp_path).items() if k in point_files} == point_files
    recorded = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [p["name"] for p in recorded] == ["dpo.beta-0.1", "dpo.beta-0.5", "dpo.beta-2"]
    md = (tmp_path / "sweep.md").read_text()
    assert md.count("| ran |") == 2 and "1 of the 3 rows are from earlier sweeps" in md
    capsys.readouterr()


def test_sweep_point_named_like_an_earlier_one_with_other_overrides_is_refused(tmp_path, capsys):
    assert sweep.command(sweep_args(tmp_path, "dpo.beta=0.1,0.5", "seed=0"), fake_runner()) == 0
    for point in ("dpo.beta-0.1", "dpo.beta-0.5"):  # the point directories are gone, the sweep's record is not
        for file in (tmp_path / point).iterdir():
            file.unlink()
        (tmp_path / point).rmdir()
    before = tree_digest(tmp_path)
    rc = main(["sweep", "arith_dpo", "--workdir", str(tmp_path), "--no-progress", "dpo.beta=0.1,0.5", "seed=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert_one_error(err, "has point dpo.beta-0.1 with dpo.beta=0.1 seed=0", "is dpo.beta=0.1 seed=1")
    assert tree_digest(tmp_path) == before
    with pytest.raises(ConfigError, match="records a sweep of arith_dpo, not ppo_cartpole"):
        sweep.plan("ppo_cartpole", ["seed=1,2"], str(tmp_path))


# ---------------------------------------------------------------------------------------------------- bench


def test_objectives_rows_are_keyed_by_the_resolved_config(tmp_path):
    """A row is done only for its own config; a CSV written before the config column is read as before and
    gains the column (empty) when a row is appended, its rows otherwise unchanged."""
    from jaxalign.bench import objectives
    from jaxalign.experiments import arith_kit as kit
    from jaxalign.overrides import apply_overrides

    task = kit.task_config(apply_overrides(kit.ArithDPOConfig(), ["seed=0"]), "noisy_labels")
    key = objectives.config_key(objectives.objective_config(task, "sigmoid"))
    other = objectives.config_key(objectives.objective_config(apply_overrides(task, ["dpo.beta=0.5"]), "sigmoid"))
    assert key != other and key == objectives.config_key(
        objectives.objective_config(apply_overrides(task, ["show_progress=false"]), "sigmoid"))
    done = {("sigmoid", "noisy_labels", 0, key)}
    assert objectives.is_done(done, "sigmoid", "noisy_labels", 0, key)
    assert not objectives.is_done(done, "sigmoid", "noisy_labels", 0, other)

    legacy = tmp_path / "objectives.csv"
    old_columns = [c for c in objectives.COLUMNS if c != "config"]
    with open(legacy, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({c: "1" if c not in ("objective", "task") else {"objective": "ipo", "task": "noisy_labels"}[c]
                         for c in old_columns})
    old_row = objectives.read_csv(str(legacy))[0]
    assert objectives.row_key(old_row) == ("ipo", "noisy_labels", 1, "")
    assert objectives.is_done({objectives.row_key(old_row)}, "ipo", "noisy_labels", 1, other)
    objectives.append_row(str(legacy), {**{c: "2" for c in objectives.COLUMNS}, "objective": "sigmoid",
                                        "task": "noisy_labels", "config": key})
    rows = objectives.read_csv(str(legacy))
    assert rows[0] == {**old_row, "config": ""} and rows[1]["config"] == key
    assert objectives.of_command(objectives.row_key(rows[1]), {("sigmoid", "noisy_labels", 2, key)})
    assert not objectives.of_command(objectives.row_key(rows[1]), {("sigmoid", "noisy_labels", 2, other)})
