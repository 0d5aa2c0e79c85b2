"""PSIS-LOO comparison of fits of the same data (compare.py and ``carnk-pkpd compare``).

Uses the session's short reference fit of the SYNTHETIC example cohort and one short Stein-structure fit
of the same cohort (1 chain x 40 + 40 draws): far too short for conclusions, enough for the mechanics.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from carnk_pkpd.atomic import MARKER
from carnk_pkpd.cli import app
from carnk_pkpd.compare import compare_fits
from carnk_pkpd.errors import FitError
from carnk_pkpd.loglik import joint_log_likelihood


@pytest.fixture(scope="module")
def stein_fit(tmp_path_factory):
    from carnk_pkpd.data import embedded_cohort_path
    from carnk_pkpd.fits import load_fit, save_fit
    from carnk_pkpd.inference import fit

    f = fit(embedded_cohort_path("example"), "stein", draws=40, tune=40, chains=1, seed=3, progress=False)
    path = tmp_path_factory.mktemp("fits") / "stein"
    save_fit(f, path)
    return load_fit(path)


def _loo(fit):
    import arviz as az

    tree = xr.DataTree.from_dict(
        {"/posterior": fit.posterior, "/log_likelihood": joint_log_likelihood(fit.idata).to_dataset(name="y")}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.loo(tree, pointwise=True)


def test_table_matches_psis_loo_of_each_fit(small_fit, stein_fit):
    df = compare_fits([small_fit, stein_fit])
    assert list(df["model"]) == sorted(
        ["small", "stein"], key=lambda m: -df.set_index("model").loc[m, "elpd_loo"]
    )
    assert list(df["rank"]) == [0, 1]
    ref = {"small": _loo(small_fit), "stein": _loo(stein_fit)}
    best, other = df["model"]
    for _, row in df.iterrows():
        r = ref[row["model"]]
        assert row["elpd_loo"] == pytest.approx(r.elpd, rel=1e-10)
        assert row["se"] == pytest.approx(r.se, rel=1e-10)
        assert row["n_records"] == 72
        assert row["k_good"] + row["k_bad"] + row["k_very_bad"] == 72
        k = np.nan_to_num(r.pareto_k.values, nan=-np.inf)  # NaN: log-lik constant over draws
        assert row["k_very_bad"] == int(np.sum(k > 1.0))
        assert (row["warning"] != "") == bool(np.any(k > row["good_k"]))
        # the per-observation-type parts add up to the total
        assert row["elpd_car_flow"] + row["elpd_bcell_flow"] == pytest.approx(row["elpd_loo"], rel=1e-10)
    d = ref[other].elpd_i.values - ref[best].elpd_i.values  # paired pointwise differences
    low = df.set_index("model").loc[other]
    assert low["elpd_diff"] == pytest.approx(d.sum(), rel=1e-10) and low["elpd_diff"] <= 0
    assert low["dse"] == pytest.approx(np.sqrt(d.size * np.var(d)), rel=1e-10)
    assert df.attrs["synthetic"] is True


def test_fits_of_different_data_are_refused(small_fit, stein_fit):
    files = dict(stein_fit.manifest["files"], **{"data.csv": "0" * 64})
    other = dataclasses.replace(stein_fit, manifest=dict(stein_fit.manifest, files=files))
    with pytest.raises(FitError, match="different data"):
        compare_fits([small_fit, other])
    # without hashes, the records themselves are compared
    tree = stein_fit.idata.copy()
    rec = tree["constant_data"].to_dataset()
    rec["DV"] = rec["DV"] * 1.01
    tree["constant_data"] = xr.DataTree(rec)
    unhashed = dataclasses.replace(stein_fit, idata=tree, manifest={}, path=None)
    with pytest.raises(FitError, match="records differ"):
        compare_fits([small_fit, unhashed])


def test_fit_without_log_likelihood_and_single_fit_are_refused(small_fit, stein_fit):
    tree = stein_fit.idata.copy()
    del tree["log_likelihood"]
    old = dataclasses.replace(stein_fit, idata=tree)
    with pytest.raises(FitError, match="stein: the fit has no log_likelihood group"):
        compare_fits([small_fit, old])
    with pytest.raises(FitError, match="at least two fits"):
        compare_fits([small_fit])


def test_cli_writes_csv_into_a_new_folder_only(small_fit, stein_fit, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", str(small_fit.path), str(stein_fit.path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" in res.output and "PSIS-LOO" in res.output
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["compare.csv"]
    text = (out / "compare.csv").read_text(encoding="utf-8")
    assert text.startswith("# SYNTHETIC")
    csv = pd.read_csv(out / "compare.csv", comment="#")
    assert set(csv["model"]) == {"small", "stein"} and {"elpd_loo", "dse", "k_bad"} <= set(csv.columns)
    before = (out / "compare.csv").read_bytes()
    res = runner.invoke(app, ["compare", str(small_fit.path), str(stein_fit.path), "--out", str(out)])
    assert res.exit_code == 1 and "exists" in res.output
    assert (out / "compare.csv").read_bytes() == before  # nothing overwritten
    res = runner.invoke(app, ["compare", str(small_fit.path)])
    assert res.exit_code == 1 and "at least two fits" in res.output
    res = runner.invoke(app, ["compare", str(small_fit.path), str(tmp_path / "missing")])
    assert res.exit_code == 1 and "not a fit folder" in res.output


def test_a_record_with_the_same_log_likelihood_in_every_draw_counts_exactly():
    """A BLQ record with P(Y < LLOQ) = 1 in every draw has log-lik 0 in every draw: ArviZ's Pareto fit
    cannot take it ("All tail values are the same"). Leaving it out changes no weight, so its elpd is
    exactly 0 and the other records' PSIS-LOO values are ArviZ's own."""
    import arviz as az

    from carnk_pkpd.compare import psis_loo

    rng = np.random.default_rng(0)
    chains, draws, n = 2, 200, 12
    mu = rng.normal(size=(chains, draws))
    y = rng.normal(size=n)
    ll = -0.5 * (y[None, None, :] - mu[..., None]) ** 2 - 0.5 * np.log(2 * np.pi)
    ll[..., 4] = 0.0  # the BLQ record
    ll[..., 9] = -1.25  # any constant
    dims = ("chain", "draw", "record")
    coords = {"chain": np.arange(chains), "draw": np.arange(draws), "record": np.arange(n)}
    post = xr.Dataset(
        {"mu": (("chain", "draw"), mu)}, coords={"chain": coords["chain"], "draw": coords["draw"]}
    )
    tree = xr.DataTree.from_dict(
        {"/posterior": post, "/log_likelihood": xr.Dataset({"DV": (dims, ll)}, coords=coords)}
    )
    res = psis_loo(tree)
    elpd_i = np.asarray(res.elpd_i.values)
    assert elpd_i[4] == pytest.approx(0.0, abs=1e-12) and elpd_i[9] == pytest.approx(-1.25, abs=1e-12)
    keep = [j for j in range(n) if j not in (4, 9)]
    alone = xr.DataTree.from_dict(
        {
            "/posterior": post,
            "/log_likelihood": xr.Dataset({"DV": (dims, ll[..., keep])}, coords={**coords, "record": keep}),
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = az.loo(alone, pointwise=True)
    np.testing.assert_allclose(elpd_i[keep], np.asarray(ref.elpd_i.values), rtol=1e-10)
    np.testing.assert_allclose(
        np.asarray(res.pareto_k.values)[keep], np.asarray(ref.pareto_k.values), rtol=1e-10
    )
    assert np.isnan(np.asarray(res.pareto_k.values)[[4, 9]]).all()
    assert res.elpd == pytest.approx(float(ref.elpd) - 1.25, rel=1e-10)
