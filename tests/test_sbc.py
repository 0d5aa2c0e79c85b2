"""Simulation-based calibration (carnk_pkpd.sbc): ranks, uniformity test and report on tiny SYNTHETIC
cohorts, in-process (scheduler "sync"), deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from carnk_pkpd.atomic import MARKER


def test_rank_counts_thinned_draws_below_truth():
    from carnk_pkpd.sbc import rank_of

    draws = np.random.default_rng(0).normal(size=(2, 500))
    flat = draws.ravel()
    idx = np.linspace(0, flat.size - 1, 19).round().astype(int)
    for truth in (-5.0, 0.1, 5.0):
        assert rank_of(truth, draws, 19) == int(np.sum(flat[idx] < truth))
    assert rank_of(-5.0, draws, 19) == 0 and rank_of(5.0, draws, 19) == 19


def test_uniformity_matches_scipy_chisquare_on_binned_ranks():
    from carnk_pkpd.sbc import uniformity

    rng = np.random.default_rng(1)
    ranks = pd.DataFrame({"parameter": ["a"] * 40 + ["b"] * 40, "rank": rng.integers(0, 20, 80)})
    ranks.loc[ranks.parameter == "b", "rank"] = 0  # all in the first bin: far from uniform
    out = uniformity(ranks, n_ranks=19, bins=4).set_index("parameter")
    counts_a = np.histogram(ranks[ranks.parameter == "a"]["rank"], bins=[0, 5, 10, 15, 20])[0]
    assert out.loc["a", "p_value"] == pytest.approx(stats.chisquare(counts_a).pvalue)
    assert out.loc["b", "p_value"] < 1e-6 and out.loc["b", "bin0"] == 40
    with pytest.raises(ValueError, match="must divide"):
        uniformity(ranks, n_ranks=19, bins=3)


def test_sbc_writes_ranks_and_report_deterministically(tmp_path):
    from carnk_pkpd.sbc import SBCSettings, population_names, run_cohort, run_sbc
    from carnk_pkpd.spec import load_model

    spec = load_model("reference")
    settings = SBCSettings(
        n_cohorts=2, seed=7, design="4:3", follow_up=45.0, draws=20, tune=20, chains=1, n_ranks=19, bins=4
    )
    result = run_sbc(spec, settings, tmp_path / "sbc", scheduler="sync")
    out = tmp_path / "sbc"
    assert {p.name for p in out.iterdir()} == {"ranks.csv", "uniformity.csv", "rank_histograms.png", MARKER}
    ranks = pd.read_csv(out / "ranks.csv")
    names = population_names(spec)
    assert sorted(ranks.parameter.unique()) == sorted(names)
    assert len(ranks) == 2 * len(names) and ranks["rank"].between(0, 19).all()
    assert sorted(ranks.cohort.unique()) == [0, 1]
    # the two cohorts come from different prior draws
    a, b = (ranks[ranks.cohort == k].set_index("parameter").truth for k in (0, 1))
    assert not np.allclose(a, b)
    uni = pd.read_csv(out / "uniformity.csv")
    assert set(uni.parameter) == set(names) and (uni.n == 2).all()
    # the same seed gives the same prior draw, cohort, sampler draws and ranks
    again = pd.DataFrame(run_cohort(spec, settings, 1))
    first = result["ranks"][result["ranks"].cohort == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        again[["parameter", "truth", "rank"]], first[["parameter", "truth", "rank"]]
    )
    with pytest.raises(FileExistsError):
        run_sbc(spec, settings, out, scheduler="sync")
