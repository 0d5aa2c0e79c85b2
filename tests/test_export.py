"""Export tables, formats, HTML report and the export/report commands, on the short ``small_fit``."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from carnk_pkpd.atomic import MARKER
from carnk_pkpd.cli import app
from carnk_pkpd.export import (
    FORMATS,
    cv_percent,
    epsilon_shrinkage,
    eta_shrinkage,
    ext_table,
    parameter_table,
    sdtab,
    write_export,
)

N_DRAWS = 20
CHROMIUM = Path(
    shutil.which("chromium")
    or shutil.which("chromium-browser")
    or shutil.which("google-chrome")
    or "/nonexistent"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _max_significant_digits(text: str) -> int:
    """Most significant digits of any non-integer number in ``text`` (leading/trailing zeros not counted).

    Comment lines (``#``: the SYNTHETIC banner, the manifest's SHA-256) are not data, and a number must
    stand alone: digits inside a hex hash or a word such as ``b1e23`` are not numbers.
    """
    most = 0
    data = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for tok in re.findall(r"(?<![\w.])\d+\.?\d*(?:[eE][+-]?\d+)?(?![\w.])", data):
        if "." not in tok and "e" not in tok.lower():
            continue  # integers (IDs, ITERATION) are exact
        mantissa = re.split(r"[eE]", tok)[0].replace(".", "").strip("0")
        most = max(most, len(mantissa))
    return most


@pytest.fixture(scope="module")
def fit_copy(small_fit, tmp_path_factory):
    """The small fit in its own folder (export/report write inside it)."""
    from carnk_pkpd.fits import load_fit

    dest = tmp_path_factory.mktemp("export") / "small"
    shutil.copytree(small_fit.path, dest)
    return load_fit(dest)


#: Files other commands leave in a fit folder, which the report shows when present (hand-made rows with
#: the real column names; the ranking has more columns than the report shows).
OTHER_OUTPUTS = {
    "compare/compare.csv": "model,rank,elpd_loo,se,elpd_diff,dse,p_loo,weight,n_records,good_k,k_good,k_bad,"
    "k_very_bad,warning\nreference,0,-512.3,20.1,0,0,30.2,0.9,700,0.7,700,0,0,False\n"
    "stein,1,-530.8,21.0,-18.5,6.1,28.4,0.1,700,0.7,699,1,0,True\n",
    "predict/remission.csv": "# SYNTHETIC\nendpoint,day,median,q05,q95,dose,interval,n_infusions,ld_scale,mean\n"
    "DORIS,180,0.41,0.22,0.63,2.0,7,3,1.0,0.42\nLLDAS,365,0.61,0.40,0.80,2.0,7,3,1.0,0.60\n",
    "doses/ranking.csv": "regimen,dose,interval,n_infusions,ld_scale,total_cells,"
    + ",".join(f"m{k}_q05,m{k}_median,m{k}_q95,m{k}_median_mcse" for k in range(8))
    + ",p_best,utility,rank\n"
    + "2x3 q7d,2,7,3,1,6,"
    + ",".join("0.1,0.2,0.3,0.01" for _ in range(8))
    + ",0.6,0.5,1\n",
}


@pytest.fixture(scope="module")
def report_html(fit_copy) -> Path:
    from carnk_pkpd.report import write_report

    for rel, text in OTHER_OUTPUTS.items():
        (fit_copy.path / rel).parent.mkdir(exist_ok=True)
        (fit_copy.path / rel).write_text(text, encoding="utf-8")
    return write_report(fit_copy, n_draws=N_DRAWS, seed=1, n_replicates=100, cwres=False)


def test_parameter_table_labels_and_cv(fit_copy):
    df = parameter_table(fit_copy)
    post = fit_copy.posterior
    theta = df[df["kind"] == "THETA"]
    assert list(theta["label"]) == [f"THETA({k})" for k in range(1, len(theta) + 1)]
    assert theta["name"].iloc[0] == next(iter(fit_copy.spec.parameters))
    assert "copies_per_cell" not in set(theta["name"])  # no qPCR records in the example cohort
    omega = df[df["kind"] == "OMEGA"]
    assert len(omega) > 0
    assert list(omega["label"]) == [f"OMEGA({k},{k})" for k in range(1, len(omega) + 1)]
    sigma = df[df["kind"] == "SIGMA"]
    assert list(sigma["label"]) == [f"SIGMA({k},{k})" for k in range(1, len(sigma) + 1)]
    assert list(sigma["name"]) == ["sigma_car_flow", "sigma_bcell_flow_prop", "sigma_bcell_flow_add"]
    for _, row in pd.concat([omega[~omega["fixed"]], sigma[~sigma["fixed"]]]).iterrows():
        x = post[row["name"]].values.ravel()
        med = np.median(x)
        # NONMEM convention: OMEGA(k,k) and SIGMA(k,k) are variances; the SD has its own column
        assert row["median"] == pytest.approx(med**2, rel=1e-12)
        assert row["stdev"] == pytest.approx(med, rel=1e-12)
        assert row["q05"] == pytest.approx(np.quantile(x, 0.05) ** 2, rel=1e-12)
        assert row["mean"] == pytest.approx(np.mean(x**2))
        assert row["rse_pct"] == pytest.approx(100.0 * np.std(x**2, ddof=1) / np.mean(x**2))
        if row["kind"] == "OMEGA" or row["name"] == "sigma_car_flow":
            assert row["cv_pct"] == pytest.approx(100.0 * np.sqrt(np.exp(med**2) - 1.0))
    first = omega.iloc[0]
    assert first["label"] == "OMEGA(1,1)" and first["name"] == "omega_f_bl"
    # OMEGA FIX (bsv.estimate = false, sd > 0): a FIX row holding the file's variance, in file order
    spec = fit_copy.spec
    with_bsv = [n for n, p in spec.parameters.items() if p.bsv_sd > 0]
    assert list(omega["name"][: len(with_bsv)]) == [f"omega_{n}" for n in with_bsv]
    for n in with_bsv:
        row = omega.set_index("name").loc[f"omega_{n}"]
        assert bool(row["fixed"]) == (not spec.parameters[n].bsv_estimate)
        if row["fixed"]:
            assert row["prior"] == "FIX" and row["median"] == pytest.approx(spec.parameters[n].bsv_sd ** 2)
            assert row["stdev"] == pytest.approx(spec.parameters[n].bsv_sd)
    assert first["median"] == pytest.approx(np.median(post["omega_f_bl"].values) ** 2, rel=1e-12)
    prop = sigma.set_index("name").loc["sigma_bcell_flow_prop"]
    assert prop["cv_pct"] == pytest.approx(100.0 * prop["stdev"])
    add = sigma.set_index("name").loc["sigma_bcell_flow_add"]  # fixed in the model file: FIX, variance 0.5²
    assert add["fixed"] and add["prior"] == "FIX"
    assert add["median"] == pytest.approx(0.25) and add["stdev"] == pytest.approx(0.5)
    assert cv_percent(0.3) == pytest.approx(100 * np.sqrt(np.exp(0.09) - 1))
    free = theta[~theta["fixed"]]
    assert (free["q025"] <= free["q05"]).all() and (free["q05"] <= free["median"]).all()
    assert (free["median"] <= free["q95"]).all() and (free["q95"] <= free["q975"]).all()
    assert free["prior"].str.len().gt(0).all()
    assert theta[theta["fixed"]]["prior"].eq("FIX").all()


def test_iwres_and_epsilon_shrinkage(fit_copy):
    sd = sdtab(fit_copy, N_DRAWS, seed=2, cwres=False)
    post = fit_copy.posterior
    obs = sd[(sd["EVID"] == 0) & (sd["BLQ"] == 0)]
    car, b = obs[obs["DVID"] == 1], obs[obs["DVID"] == 2]
    s_car = np.median(post["sigma_car_flow"].values)
    prop = np.median(post["sigma_bcell_flow_prop"].values)
    np.testing.assert_allclose(car["IWRES"], np.log(car["DV"] / car["IPRED"]) / s_car, rtol=1e-12)
    np.testing.assert_allclose(
        b["IWRES"], (b["DV"] - b["IPRED"]) / np.hypot(prop * b["IPRED"], 0.5), rtol=1e-12
    )
    assert sd.loc[sd["BLQ"] == 1, "IWRES"].isna().all()
    eps = epsilon_shrinkage(sd, fit_copy.spec)
    assert eps["car_flow"] == pytest.approx(1.0 - np.std(car["IWRES"], ddof=1))
    assert eps["bcell_flow"] == pytest.approx(1.0 - np.std(b["IWRES"], ddof=1))
    par = parameter_table(fit_copy, sdtab_df=sd).set_index("name")
    assert par.loc["sigma_car_flow", "shrinkage_pct"] == pytest.approx(100.0 * eps["car_flow"])
    # hand-built: IWRES with SD 0.25 -> 75% shrinkage
    hand = pd.DataFrame({"EVID": 0, "DVID": 1, "BLQ": [0, 0, 0, 1], "IWRES": [-0.25, 0.0, 0.25, np.nan]})
    assert epsilon_shrinkage(hand, fit_copy.spec)["car_flow"] == pytest.approx(0.75)


def test_ext_table_holds_draws_of_theta_sigma_omega(fit_copy):
    ext = ext_table(fit_copy)
    post = fit_copy.posterior
    n = post.sizes["chain"] * post.sizes["draw"]
    draws, summary = ext.iloc[:n], ext.iloc[n:].set_index("ITERATION")
    assert list(summary.index) == [-1000000000, -1000000001, -1000000006]
    assert list(ext.columns[:3]) == ["ITERATION", "CHAIN", "THETA1"] and ext.columns[-1] == "OBJ"
    sig = [c for c in ext.columns if c.startswith("SIGMA")]
    om = [c for c in ext.columns if c.startswith("OMEGA")]
    assert ext.columns.get_loc(sig[0]) < ext.columns.get_loc(om[0])  # NONMEM order: THETA, SIGMA, OMEGA
    np.testing.assert_allclose(draws["OMEGA(1,1)"], post["omega_f_bl"].values.ravel() ** 2)
    np.testing.assert_allclose(draws["THETA1"], post["f_bl"].values.ravel())
    np.testing.assert_array_equal(draws["CHAIN"], np.repeat([1, 2], post.sizes["draw"]))
    ll = fit_copy.idata["log_likelihood"].to_dataset()
    obj = -2.0 * sum(ll[v].values.reshape(n, -1).sum(axis=1) for v in ll.data_vars)
    np.testing.assert_allclose(draws["OBJ"], obj)
    fixed = summary.loc[-1000000006]
    assert fixed["THETA10"] == 1 and fixed["SIGMA(3,3)"] == 1 and fixed["THETA1"] == 0  # n_transit, add. SD
    assert (draws["THETA10"] == 6).all()
    assert summary.loc[-1000000000, "OMEGA(1,1)"] == pytest.approx(np.median(post["omega_f_bl"].values) ** 2)


def test_shrinkage_on_hand_built_posterior():
    # omega = 0.5 in every draw; eta_i posterior means 2*[-1, 0, 1]*z so that omega*E[eta] has SD 0.25
    rng = np.random.default_rng(0)
    means = np.array([-0.5, 0.0, 0.5])  # SD (ddof=1) = 0.5 -> deviations omega*eta have SD 0.25
    noise = rng.standard_normal((2, 500, 3))
    noise -= noise.mean(axis=(0, 1), keepdims=True)  # exact posterior means
    post = xr.Dataset(
        {
            "omega_k": (("chain", "draw"), np.full((2, 500), 0.5)),
            "eta_k": (("chain", "draw", "subject"), means + noise),
            "eta_none": (("chain", "draw", "subject"), noise),  # no omega: ignored
        }
    )
    s = eta_shrinkage(post)
    assert list(s.index) == ["k"]
    assert s["k"] == pytest.approx(1.0 - 0.25 / 0.5)


def test_sdtab_columns_and_rows(fit_copy):
    from carnk_pkpd.evaluation import ewres, npde, simulate_replicates

    reps = simulate_replicates(fit_copy, 60, seed=2)
    sd = sdtab(fit_copy, N_DRAWS, seed=2, replicates=reps)
    base = [
        "ID",
        "TIME",
        "EVID",
        "MDV",
        "AMT",
        "DVID",
        "DV",
        "BLQ",
        "LLOQ",
        "PRED",
        "IPRED",
        "EPRED",
        "CWRES",
        "IWRES",
        "EWRES",
        "NPDE",
    ]
    assert list(sd.columns) == base + ["ETA1", "ETA2", "ETA3", "ETA4"]
    assert sd.attrs["eta_names"] == {"ETA1": "f_bl", "ETA2": "k_rej", "ETA3": "B0", "ETA4": "MTT"}
    assert any("ETA1=f_bl" in c for c in sd.attrs["comments"])
    records = fit_copy.idata["constant_data"].to_dataset()
    obs = sd[sd["EVID"] == 0]
    assert len(obs) == records.sizes["record"] and (obs["MDV"] == 0).all() and (obs["AMT"] == 0).all()
    key = ["ID", "TIME", "DVID"]
    rec = pd.DataFrame({k: records[k].values for k in ("ID", "TIME", "DVID", "DV")})
    both = obs.merge(rec, on=key, suffixes=("", "_rec"))
    assert len(both) == len(obs)
    np.testing.assert_allclose(both["DV"], both["DV_rec"])
    assert np.isfinite(obs[["PRED", "IPRED", "EPRED", "NPDE"]].to_numpy()).all()
    # EPRED = the replicates' mean per record, EWRES/NPDE from the same replicates, in record order
    np.testing.assert_allclose(obs["EPRED"], reps["y"].values.mean(axis=0))
    np.testing.assert_allclose(obs["EWRES"], ewres(reps), equal_nan=True)
    np.testing.assert_allclose(obs["NPDE"], npde(reps, 2)["npde"], equal_nan=True)
    assert obs.loc[obs["BLQ"] == 1, "EWRES"].isna().all()
    assert np.isfinite(obs.loc[obs["BLQ"] == 0, "EWRES"]).all()
    assert "PDE_FITTED" not in sd.columns
    # CWRES (FOCE linearisation, tested against an independent one in test_cwres.py): a number for
    # every quantified record, none for BLQ records
    assert obs.loc[obs["BLQ"] == 1, "CWRES"].isna().all()
    assert np.isfinite(obs.loc[obs["BLQ"] == 0, "CWRES"]).all()
    assert (obs["IPRED"] > 0).all()
    # dosing and lymphodepletion rows, in the cohort's order
    df = fit_copy.cohort.to_dataframe()
    doses = sd[sd["EVID"] != 0]
    expected = df[df["EVID"].isin([1, 2])]
    assert len(doses) == len(expected) and (doses["MDV"] == 1).all()
    np.testing.assert_allclose(doses["AMT"], expected["AMT"].fillna(0.0))
    assert doses[["DV", "PRED", "IPRED", "EPRED", "CWRES", "IWRES", "EWRES", "NPDE"]].isna().all().all()
    for sid, g in sd.groupby("ID", sort=False):
        assert g["TIME"].is_monotonic_increasing, sid
    # ETAj: posterior mean of omega_p * eta_p,i, constant within a subject
    post = fit_copy.posterior
    eta1 = (post["omega_f_bl"] * post["eta_f_bl"]).mean(("chain", "draw")).values
    first = sd.groupby("ID", sort=False)["ETA1"].agg(["first", "nunique"])
    np.testing.assert_allclose(first["first"], eta1)
    assert (first["nunique"] == 1).all()


def test_patab_and_cotab(fit_copy):
    """patab: posterior median of each subject's natural-scale parameters and the sdtab's ETAs;
    cotab: dose and dose level read back from the cohort's EVID=1 rows."""
    from carnk_pkpd.export import cotab, patab

    pa = patab(fit_copy)
    ind = fit_copy.individual_parameters().stack(sample=("chain", "draw"))
    assert {"f_bl", "k_rej", "B0", "MTT", "ETA1", "ETA4"} <= set(pa.columns)
    np.testing.assert_allclose(pa["k_rej"], ind["k_rej"].median("sample").values)
    post = fit_copy.posterior
    np.testing.assert_allclose(pa["ETA2"], (post["omega_k_rej"] * post["eta_k_rej"]).mean(("chain", "draw")))
    # exp(ETA) is the subject's deviation from its typical value: log(f_bl_i / median f_bl_i) tracks ETA1
    assert np.corrcoef(np.log(pa["f_bl"]), pa["ETA1"])[0, 1] > 0.9
    assert "n_transit" not in pa  # fixed, identical for every subject
    assert any("ETA1=f_bl" in c for c in pa.attrs["comments"])
    co = cotab(fit_copy)
    df = fit_copy.cohort.to_dataframe()
    first = df[df["EVID"] == 1].groupby("ID", sort=False).agg(AMT=("AMT", "first"), N=("AMT", "size"),
                                                                TOT=("AMT", "sum"), DL=("DL", "first"))  # fmt: skip
    first.index = first.index.astype(str)
    co = co.set_index("ID").loc[first.index]
    np.testing.assert_allclose(co["DOSE"], first["AMT"])
    np.testing.assert_allclose(co["TOTDOSE"], first["TOT"])
    assert (co["NINF"] == first["N"]).all() and (co["DL"] == first["DL"].astype(str)).all()
    assert set(fit_copy.cohort.covariate_names) <= set(co.columns)


def test_posterior_predictive_shapes(fit_copy):
    from carnk_pkpd.predictive import posterior_predictive, record_predictions

    ipred = record_predictions(fit_copy, N_DRAWS, seed=3)
    ppc = posterior_predictive(fit_copy, N_DRAWS, seed=3)
    assert ipred.dims == ("sample", "record") and ipred.shape == ppc["y_rep"].shape
    np.testing.assert_allclose(ipred.values, ppc["IPRED"].values)
    np.testing.assert_array_equal(ppc["blq_rep"].values, ppc["y_rep"].values < ppc["LLOQ"].values)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_readable(fit_copy, tmp_path, fmt):
    paths = write_export(fit_copy, fmt, tmp_path / fmt, n_draws=N_DRAWS, seed=4, cwres=False)
    assert paths and all(p.exists() for p in paths)
    leftovers = [p.name for p in (tmp_path / fmt).iterdir() if p.name.startswith(".") and p.name != MARKER]
    assert not leftovers  # no temporary files left; only the marker of the folder's owner
    names = {p.name for p in paths}
    if fmt == "csv":
        assert names == {"parameters.csv", "subjects.csv", "sdtab.csv", "ext.csv", "patab.csv", "cotab.csv"}
        from carnk_pkpd.atomic import read_marker

        assert {"patab.csv", "cotab.csv"} <= set(read_marker(tmp_path / fmt)["files"])
        pa = pd.read_csv(tmp_path / fmt / "patab.csv", comment="#", dtype={"ID": str})
        co = pd.read_csv(tmp_path / fmt / "cotab.csv", comment="#", dtype={"ID": str})
        assert list(pa["ID"]) == list(co["ID"]) == [str(i) for i in fit_copy.cohort.ids]
        par = pd.read_csv(tmp_path / fmt / "parameters.csv", comment="#")
        assert par["label"].str.match(r"^(THETA|OMEGA|SIGMA)\(").any()
        text = (tmp_path / fmt / "sdtab.csv").read_text(encoding="utf-8")
        assert re.search(r"^# ETA columns .*ETA1=f_bl", text, re.M)
        sdt = pd.read_csv(tmp_path / fmt / "sdtab.csv", comment="#")
        assert {"EVID", "MDV", "AMT", "EPRED", "IWRES", "EWRES", "NPDE", "ETA1"} <= set(sdt.columns)
        for f in ("parameters.csv", "sdtab.csv", "ext.csv"):  # 6 significant digits, not 17
            body = (tmp_path / fmt / f).read_text(encoding="utf-8")
            assert _max_significant_digits(body) <= 6, f
        ext = pd.read_csv(tmp_path / fmt / "ext.csv", comment="#")
        assert "OMEGA(1,1)" in ext.columns and (ext["ITERATION"] == -1000000006).sum() == 1
        subj = pd.read_csv(tmp_path / fmt / "subjects.csv", comment="#")
        assert {"DA", "b_nadir", "reconstitution_day", "car_cmax", "car_auc_0_28"} <= set(subj["quantity"])
    elif fmt == "json":
        doc = json.loads((tmp_path / fmt / "export.json").read_text())
        assert doc["synthetic"] is True
        assert {"parameters", "subjects", "sdtab", "diagnostics", "manifest"} <= set(doc)
    elif fmt == "md":
        text = (tmp_path / fmt / "export.md").read_text()
        assert "SYNTHETIC" in text and "| THETA(1) |" in text
    elif fmt == "tex":
        assert r"\begin{tabular}" in (tmp_path / fmt / "parameters.tex").read_text()
    else:
        tree = xr.open_datatree(tmp_path / fmt / "posterior.nc")
        assert "posterior" in tree.children
        pp = xr.open_dataset(tmp_path / fmt / "posterior_predictive.nc")
        assert pp["y_rep"].sizes["sample"] == N_DRAWS
        pp.close()
        tree.close()


def test_report_structure(report_html, fit_copy):
    assert report_html == fit_copy.path / "report.html"
    text = report_html.read_text(encoding="utf-8")
    from carnk_pkpd.report import SECTIONS

    found = re.findall(r'<section id="([a-z]+)">', text)
    assert found == list(SECTIONS)  # every section, in order (loo/remission/doses: their files are present)
    # diagnostics say ok/FAIL plainly: this short fit fails R-hat/ESS
    diag = text.split('<section id="diagnostics">')[1].split("</section>")[0]
    assert "FAIL: the fit fails its sampler diagnostics" in diag
    assert re.search(r">max R-hat<.*?>FAIL<", diag, re.S) and re.search(r">divergent transitions<", diag)
    # GOF per analyte, every subject's fit with its page, the LOO / remission / ranking tables
    assert text.count("<figcaption>Page 1 of 1: subjects") == 1
    for sid in fit_copy.cohort.ids:
        assert re.search(rf"<figcaption>Page 1 of 1: subjects [^<]*\b{re.escape(str(sid))}\b", text), sid
    loo = text.split('<section id="loo">')[1].split("</section>")[0]
    assert "elpd_diff" in loo and "-18.5" in loo and "compare/compare.csv" in loo
    assert "DORIS" in text.split('<section id="remission">')[1].split("</section>")[0]
    ranking = text.split('<section id="doses">')[1].split("</section>")[0]
    assert "2x3 q7d" in ranking and "more columns in the file" in ranking and "m0_q05" not in ranking
    assert 'id="synthetic-banner"' in text
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert len(srcs) >= 9
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "OMEGA(1,1)" in text and "SIGMA(1,1)" in text and "THETA(1)" in text
    assert not re.search(r'(src|href)="(https?:|file:)', text)  # self-contained


def test_individual_fits_are_paged_and_show_every_subject(fit_copy):
    """Three subjects at two per page: pages "1 of 2" (two IDs) and "2 of 2" (the third)."""
    from carnk_pkpd.predictive import individual_curves
    from carnk_pkpd.report import individual_pages

    curves = individual_curves(fit_copy, 5, seed=0, n_times=20)
    rec = fit_copy.idata["constant_data"].to_dataset()
    records = pd.DataFrame({k: rec[k].values for k in ("ID", "TIME", "DVID", "DV", "BLQ", "LLOQ")})
    pages = individual_pages(curves, records, True, per_page=2)
    ids = [str(s) for s in fit_copy.cohort.ids]
    assert [cap for cap, _ in pages] == [
        f"Page 1 of 2: subjects {ids[0]}, {ids[1]}",
        f"Page 2 of 2: subjects {ids[2]}",
    ]
    assert all(base64.b64decode(png).startswith(PNG_MAGIC) for _, png in pages)


def test_diagnostics_table_says_ok_or_fail_per_check():
    from carnk_pkpd.diagnostics import Diagnostics
    from carnk_pkpd.report import diagnostics_table

    good = Diagnostics(4, 1000, 1.004, 900.0, 700.0, 0, 0.9, 7, 0.0)
    bad = Diagnostics(4, 1000, 1.02, 350.0, 700.0, 3, 0.9, 10, 0.05)
    assert (diagnostics_table(good)["status"] == "ok").all()
    status = diagnostics_table(bad).set_index("check")["status"]
    assert list(status[status == "FAIL"].index) == [
        "max R-hat", "min bulk ESS", "divergent transitions", "draws at max tree depth (%)"]  # fmt: skip


def test_report_in_headless_chromium(report_html, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(
            "no chromium, chromium-browser or google-chrome on PATH (CI: apt-get install -y chromium)"
        )
    args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    url = report_html.resolve().as_uri()
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    for heading in ("Parameters (THETA / OMEGA / SIGMA)", "η-shrinkage", "Goodness of fit (per analyte)",
                    "NPDE", "ETA panels", "Visual predictive checks", "Individual fits", "Sampler diagnostics",
                    "Model comparison (PSIS-LOO)", "Remission predictions", "Dose ranking", "Manifest",
                    "SYNTHETIC DATA"):  # fmt: skip
        assert heading in dom.stdout, heading
    # readable at 1280 px: nothing wider than the window (a copy of the page reports its scroll width)
    probe = tmp_path / "probe.html"
    probe.write_text(report_html.read_text(encoding="utf-8").replace(
        "</body>", "<script>document.body.dataset.scrollWidth = document.documentElement.scrollWidth"
        "</script></body>"), encoding="utf-8")  # fmt: skip
    dom = subprocess.run([*args, "--window-size=1280,1000", "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    width = int(re.search(r'data-scroll-width="(\d+)"', dom.stdout).group(1))
    assert 0 < width <= 1280, width
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1280,2400", url],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes().startswith(PNG_MAGIC)


def test_cli_export_and_errors(fit_copy, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["export", str(fit_copy.path), "--format", "csv", "--out", str(out),
                              "--draws", str(N_DRAWS), "--no-cwres"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (out / "sdtab.csv").exists() and "SYNTHETIC" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "missing")])
    assert res.exit_code == 1
    assert "not a fit folder" in res.output
    damaged = tmp_path / "damaged"
    shutil.copytree(fit_copy.path, damaged)
    with open(damaged / "data.csv", "a", encoding="utf-8") as f:
        f.write("\n")
    for cmd in ("export", "report"):
        res = runner.invoke(app, [cmd, str(damaged)])
        assert res.exit_code == 1
        assert "damaged" in res.output and "data.csv" in res.output
    res = runner.invoke(app, ["export", str(fit_copy.path), "--format", "xlsx"])
    assert res.exit_code == 2 and "--format" in res.output
