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


# --- leave one subject out: each subject's η integrated out ----------------------------------------


def test_integrated_likelihood_equals_the_gaussian_closed_form():
    """y_i = A_i θ + G_i η_i + ε with η_i ~ N(0, I), ε ~ N(0, σ² I): given θ, the marginal of y_i is
    N(A_i θ, G_i G_iᵀ + σ² I) exactly (scipy). From joint draws (θ_s, η_i,s) the proposal must find
    the conditional posterior of η_i given θ_s, and the importance sampler must reproduce the
    closed form for every subject and draw within its Monte Carlo error."""
    from scipy.stats import multivariate_normal

    from carnk_pkpd.loglik import conditional_eta_proposal, integrate_eta

    rng = np.random.default_rng(1)
    n_subj, d, n_obs, p, sigma = 5, 3, 8, 4, 0.3
    G = rng.normal(size=(n_subj, n_obs, d))
    A = rng.normal(size=(n_subj, n_obs, p))
    y = rng.normal(size=(n_subj, n_obs)) + np.einsum("sij,sj->si", G, rng.normal(size=(n_subj, d)))
    # joint "posterior" draws: θ_s spread around a centre, η_i,s from its exact conditional posterior
    n_all = 2000
    theta = 0.3 * rng.normal(size=(n_all, p))
    cov_c = np.linalg.inv(np.einsum("sji,sjk->sik", G, G) / sigma**2 + np.eye(d))
    resid = y[None] - np.einsum("sij,nj->nsi", A, theta)
    mean_c = np.einsum("sij,nsj->nsi", cov_c, np.einsum("sji,nsj->nsi", G, resid) / sigma**2)
    eta = mean_c + np.einsum("sij,nsj->nsi", np.linalg.cholesky(cov_c), rng.normal(size=(n_all, n_subj, d)))
    loc, cov = conditional_eta_proposal(eta, theta)
    np.testing.assert_allclose(cov, cov_c, rtol=0.15, atol=0.01)  # 2000 draws: ~5% sampling error
    assert (
        np.max(np.abs(loc - mean_c))
        < 4 * np.sqrt(np.max(np.diagonal(cov_c, axis1=1, axis2=2)) * p / n_all) + 0.05
    )

    keep = np.arange(0, n_all, 400)

    def loglik(idx, e):  # (b, K, subject, d) -> (b, K, subject)
        mean = np.einsum("sij,bj->bsi", A, theta[keep[idx]])[:, None] + np.einsum("sij,bksj->bksi", G, e)
        r = (y[None, None] - mean) / sigma
        return (-0.5 * r**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)).sum(-1)

    log_m, ess = integrate_eta(loglik, loc[keep], cov, n_samples=4000, seed=3)
    exact = np.array(
        [
            [
                multivariate_normal(A[i] @ theta[s], G[i] @ G[i].T + sigma**2 * np.eye(n_obs)).logpdf(y[i])
                for i in range(n_subj)
            ]
            for s in keep
        ]
    )
    # MC error of log(mean w) ~ 1/sqrt(ESS); ESS is reported for exactly this judgement
    tol = 4.0 / np.sqrt(ess)
    assert np.all(np.abs(log_m - exact) < tol), np.max(np.abs(log_m - exact) / tol)
    assert np.all(ess > 400)
    # the same seed gives the same numbers
    again, _ = integrate_eta(loglik, loc[keep], cov, n_samples=4000, seed=3)
    assert np.array_equal(log_m, again)


def test_subject_likelihood_at_the_posterior_eta_adds_up_the_stored_records(small_fit):
    """At each draw's own η, the per-subject likelihood the integration uses is the sum of that
    subject's stored pointwise log-likelihood (records mapped to subjects correctly)."""
    from carnk_pkpd.loglik import _per_subject_loglik

    post = small_fit.posterior.isel(draw=slice(0, 5))
    loglik, eta, _, ids = _per_subject_loglik(small_fit, post)
    n = eta.shape[0]
    got = loglik(np.arange(n), eta[:, None])[:, 0]  # (draw, subject)
    joint = joint_log_likelihood(small_fit.idata).isel(draw=slice(0, 5))
    rec = small_fit.idata["constant_data"].to_dataset()
    owner = rec["ID"].sel(record=joint["record"].values).astype(str).values
    flat = joint.transpose("chain", "draw", "record").values.reshape(n, -1)
    want = np.stack([flat[:, owner == i].sum(axis=1) for i in ids], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_leave_one_subject_out_table(small_fit, stein_fit, tmp_path):
    df = compare_fits([small_fit, stein_fit], unit="subject", n_samples=32, max_draws=40, seed=1)
    n_subj = small_fit.posterior.sizes["subject"]
    assert set(df["unit"]) == {"subject"} and set(df["n_units"]) == {n_subj}
    assert set(df["n_records"]) == {72}
    assert np.all(np.isfinite(df["elpd_loo"])) and np.all(df["is_ess_min"] > 0)
    again = compare_fits([small_fit, stein_fit], unit="subject", n_samples=32, max_draws=40, seed=1)
    pd.testing.assert_frame_equal(df, again)  # seeded
    runner = CliRunner()
    out = tmp_path / "by_subject"
    res = runner.invoke(
        app,
        ["compare", str(small_fit.path), str(stein_fit.path), "--by", "subject", "--samples", "32",
         "--max-draws", "40", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "leave one subject" in res.output and "importance sampling ESS" in res.output
    assert "(leave one subject out)" in (out / "compare.csv").read_text(encoding="utf-8")
    res = runner.invoke(app, ["compare", str(small_fit.path), str(stein_fit.path), "--by", "patient"])
    assert res.exit_code == 2 and "--by must be" in res.output
    with pytest.raises(FitError, match="at least 25 posterior draws"):
        compare_fits([small_fit, stein_fit], unit="subject", n_samples=8, max_draws=10)
