"""`python -m agents.pdppo.diagnose RUN` on a finished run: per arm and seed, the same diagnosis the run recorded in
results.json, without changing the run; bad arguments refused."""
from __future__ import annotations

import json

import pytest

from agents.pdppo import diagnose as D
from agents.pdppo import experiment as X
from jaxalign.overrides import apply_overrides


def test_a_finished_run_is_diagnosed_per_arm_and_seed_without_changing_it(tmp_path, capsys):
    cfg = apply_overrides(X.PDPPOLotSizingConfig(), [
        "instance=tiny", "seeds=0,1", "learner.num_envs=2", "learner.total_timesteps=400", "learner.update_epochs=1",
        "num_chunks=1", "eval_episodes=2", "show_progress=false"])
    run = tmp_path / "run"
    X.run(cfg, str(run))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.parent.name != "logs"}

    assert D.main([str(run), "--episodes", "3", "--json", str(tmp_path / "d.json")]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    results = json.loads((run / "results.json").read_text())
    for arm in ("ppo", "pdppo"):  # the run itself recorded the same diagnosis on its 16 episodes
        assert set(results[arm]["diagnosis"]) == set(report[arm])
        assert len(results[arm]["diagnosis"]["post_is_min" if arm == "pdppo" else "idle"]) == 2
    assert report["seeds"] == [0, 1] and report["episodes"] == 3
    assert set(report["ppo"]) == {"idle", "greedy_idle", "rmse_v", "mean_episode_cost"}
    pd = report["pdppo"]
    for key in ("idle", "greedy_idle", "post_is_min"):
        assert all(0.0 <= x <= 1.0 for x in pd[key]), (key, pd[key])
    for i in range(2):  # where one critic is the minimum on every sample, the minimum's error is that critic's
        if pd["post_is_min"][i] == 1.0:
            assert pd["rmse_min"][i] == pytest.approx(pd["rmse_post"][i])
        if pd["post_is_min"][i] == 0.0:
            assert pd["rmse_min"][i] == pytest.approx(pd["rmse_v"][i])
    assert all(c > 0 for c in pd["mean_episode_cost"] + report["ppo"]["mean_episode_cost"])
    table = capsys.readouterr().out
    assert "| pdppo seed | " in table and "prefers_low_baseline" in table
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.parent.name != "logs"}
    assert after == before

    assert D.main([str(run), "--json", str(tmp_path / "d.json")]) == 2  # never overwrites
    assert "d.json exists" in capsys.readouterr().err
    (run / "results.json").unlink()
    assert D.main([str(run)]) == 2
    assert "no results.json (is the run finished?)" in capsys.readouterr().err
