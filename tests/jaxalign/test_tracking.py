"""Tracking mirrors metrics.jsonl into TensorBoard and Weights & Biases (offline): a killed and resumed run's
TensorBoard curves hold every step once with the metrics file's values, a re-run never sends a W&B step twice, the
config and the PNGs arrive at the end, and a bad tracker name is one line. The event files are read back with
TensorBoard's own reader and W&B's offline run files with a reader of their record format written here."""
from __future__ import annotations

import glob
import json
import struct

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.cli import main
from rl.testing import run_registered

TINY = ["ppo.num_envs=4", "ppo.num_steps=32", "ppo.total_timesteps=1024", "ppo.num_minibatches=2",
        "ppo.update_epochs=1", "num_chunks=4", "eval_episodes=3", "show_progress=false", "seed=7"]


def tensorboard_scalars(workdir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)], events.Tags()


def wandb_history(workdir) -> list[dict]:
    """History rows of every offline W&B run file under WORKDIR/wandb: a LevelDB-style log (7-byte file header,
    32 KiB blocks of records with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) of
    wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "*.wandb"))):
        data, pos, buffer, records = open(path, "rb").read(), 7, b"", []
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            if room < 7:
                pos += room
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                pos += room
                continue
            buffer += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                records.append(buffer)
                buffer = b""
        for raw in records:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_a_killed_and_resumed_runs_tensorboard_curves_hold_every_step_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir, cache = tmp_path / "run", tmp_path / "xla_cache"
    killed, saved = run_registered("ppo_cartpole", workdir, [*TINY, "tracking=tensorboard"], cache, kill_after=2,
                                   fast_compile=True)
    assert killed.returncode == -9 and saved == [2], killed.stderr[-2000:]
    resumed, _ = run_registered("ppo_cartpole", workdir, [*TINY, "tracking=tensorboard"], cache, fast_compile=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scalars, tags = tensorboard_scalars(workdir, "train/loss")
    assert [step for step, _ in scalars] == [r["update"] for r in metrics] == list(range(1, 9))
    assert [value for _, value in scalars] == pytest.approx([r["loss"] for r in metrics], rel=1e-6)
    assert "learning_curve.png" in tags["images"] and "config/text_summary" in tags["tensors"]


def test_wandb_offline_gets_each_step_once_across_reruns_and_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    command = ["run", "ppo_cartpole", "--workdir", str(workdir), *TINY, "tracking=wandb"]
    assert main(command) == 0
    assert main(command) == 0  # the finished run re-run: nothing new to send
    rows = wandb_history(workdir)
    steps = [row["train/step"] for row in rows if "train/step" in row]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["update"] for r in metrics] == list(range(1, 9))
    assert [row["train/loss"] for row in rows if "train/loss" in row] == pytest.approx([r["loss"] for r in metrics])
    assert any(row.get("learning_curve.png/_type") == "image-file" for row in rows)


def test_tracking_is_not_part_of_the_config_and_bad_names_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    assert main(["run", "ppo_cartpole", "--workdir", str(tmp_path / "w"), "tracking=tensorbored"]) == 2
    assert "unknown tracker 'tensorbored'" in capsys.readouterr().err
    assert main(["run", "ppo_cartpole", "--workdir", str(tmp_path / "w"), "tracking=wandb"]) == 2
    assert "no W&B API key is configured" in capsys.readouterr().err and not (tmp_path / "w").exists()
    assert main(["run", "ppo_cartpole", "--workdir", str(tmp_path / "w"), *TINY, "tracking=tensorboard"]) == 0
    assert "tracking" not in json.loads((tmp_path / "w" / "config.json").read_text())
    assert main(["run", "ppo_cartpole", "--workdir", str(tmp_path / "w"), *TINY]) == 0  # resumes without it
