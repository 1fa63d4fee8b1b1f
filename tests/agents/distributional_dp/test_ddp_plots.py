"""The plot helper writes a PNG of exact optimal return distributions."""
import pytest

from agents.distributional_dp import cvar_recovery_mdp, mean, mean_variance, threshold_probability
from agents.distributional_dp.plots import main, optimal_return_distributions, plot_return_distributions


def test_optimal_return_distributions_and_png(tmp_path):
    mdp = cvar_recovery_mdp()
    results = optimal_return_distributions(mdp, {"mean": mean(), "P(G>=4)": threshold_probability(4)},
                                           cvar_alphas=(0.75,), var_alphas=(0.5,))
    assert results["mean"][2] == pytest.approx(3.0)
    assert results["CVaR_0.75"][2] == pytest.approx(7 / 3)
    for support, pmf, _ in results.values():
        assert len(support) == len(pmf) and abs(pmf.sum() - 1) < 1e-12
    path = plot_return_distributions(results, str(tmp_path / "d.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not an expected utility"):
        optimal_return_distributions(mdp, {"mv": mean_variance(1.0)})


def test_main_writes_the_demo_plot(tmp_path, capsys):
    out = tmp_path / "demo.png"
    main(["--out", str(out), "--horizon", "4"])
    assert out.stat().st_size > 1000
    assert str(out) in capsys.readouterr().out
