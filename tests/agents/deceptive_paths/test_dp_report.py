"""The multi-seed report: its statistics and verdicts on hand-made results, and one-line errors for runs that do not
belong together."""
import json

import numpy as np
import pytest

from agents.deceptive_paths import report


def _row(fraction, reach=1.0, length=0.5):
    return {"deceptive_fraction": fraction, "goal_reach_rate": reach, "length_over_budget": length,
            "truthful_from_fraction": 0.9}


def _results(seed, policy, curve, seen, blind):
    """A results.json of the shape `jaxalign run deceptive_paths` writes, with the given policy numbers."""
    tables = {name: {"policy": _row(policy), "honest": _row(0.2), "pi_d4": _row(0.5)} for name in report.MAP_SETS}
    tunability = [{"budget_fraction": f, "policy": _row(v, length=0.9), "honest": _row(0.3), "pi_d4": _row(0.6)}
                  for f, v in zip((0.0, 0.5, 1.0), curve)]
    methods = {"policy": {"deceptive_fraction_after_move": seen},
               "policy_without_move": {"deceptive_fraction_after_move": blind}}
    return {"config": {"seed": seed, "bonus": "exaggeration"}, "tables": tables, "tunability": tunability,
            "adaptation": {"methods": methods}}


def _write(root, runs):
    """One run directory per run under `root`; their paths."""
    dirs = []
    for k, run in enumerate(runs):
        (root / f"s{k}").mkdir(parents=True)
        (root / f"s{k}" / "results.json").write_text(json.dumps(run))
        dirs.append(str(root / f"s{k}"))
    return dirs


def test_claims_over_seeds_and_their_verdicts(tmp_path, capsys):
    runs = [_results(0, 0.70, (0.40, 0.60, 0.76), 0.58, 0.45), _results(1, 0.72, (0.42, 0.55, 0.74), 0.60, 0.44),
            _results(2, 0.74, (0.41, 0.58, 0.75), 0.55, 0.47)]
    out = report.claims(report.load_runs(_write(tmp_path, runs)))
    assert out["seeds"] == [0, 1, 2]
    assert out["zero_shot"]["unseen_32x32"]["policy"]["mean"] == pytest.approx(0.72)
    assert out["zero_shot"]["unseen_32x32"]["policy"]["std"] == pytest.approx(0.02)  # ddof 1
    assert out["test_metrics"]["test_16x16"]["policy"]["deceptive_fraction"]["mean"] == pytest.approx(0.72)
    assert out["test_metrics"]["test_8x8"]["pi_d4"]["truthful_from_fraction"]["std"] == 0.0
    rise = np.array([0.36, 0.32, 0.34])
    assert out["tunability"]["rise"]["values"] == pytest.approx(rise.tolist())
    assert out["tunability"]["holds"]  # 0.34 > 2 * 0.02
    difference = np.array([0.13, 0.16, 0.08])
    assert out["adaptation"]["difference"]["mean"] == pytest.approx(difference.mean())
    assert out["adaptation"]["difference"]["std"] == pytest.approx(difference.std(ddof=1))
    assert out["adaptation"]["holds"]  # 0.1233 > 2 * 0.0404
    flat = [_results(k, 0.7, (0.5, 0.5, 0.5 + d), 0.5 + d, 0.5) for k, d in enumerate((0.05, -0.04, 0.0))]
    out = report.claims(report.load_runs(_write(tmp_path / "flat", flat)))
    assert not out["tunability"]["holds"] and not out["adaptation"]["holds"]
    png = tmp_path / "tunability.png"
    assert report.main([*_write(tmp_path / "again", runs), "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "tunability: rise" in printed and "holds" in printed and png.stat().st_size > 0


@pytest.mark.parametrize("change, message", [
    (lambda runs: runs[1]["config"].update(bonus="ambiguity"), "config differs from"),
    (lambda runs: runs[1]["config"].update(seed=0), "the runs repeat a seed"),
])
def test_runs_that_do_not_belong_together_are_one_error(tmp_path, capsys, change, message):
    runs = [_results(k, 0.7, (0.4, 0.5, 0.6), 0.5, 0.4) for k in range(2)]
    change(runs)
    assert report.main(_write(tmp_path, runs)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_missing_run_is_one_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nothing"), str(tmp_path / "other")]) == 2
    assert "no results.json" in capsys.readouterr().err
