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
from carnk_pkpd.export import FORMATS, cv_percent, eta_shrinkage, parameter_table, sdtab, write_export

N_DRAWS = 20
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fit_copy(small_fit, tmp_path_factory):
    """The small fit in its own folder (export/report write inside it)."""
    from carnk_pkpd.fits import load_fit

    dest = tmp_path_factory.mktemp("export") / "small"
    shutil.copytree(small_fit.path, dest)
    return load_fit(dest)


@pytest.fixture(scope="module")
def report_html(fit_copy) -> Path:
    from carnk_pkpd.report import write_report

    return write_report(fit_copy, n_draws=N_DRAWS, seed=1)


def test_parameter_table_labels_and_cv(fit_copy):
    df = parameter_table(fit_copy)
    post = fit_copy.posterior
    theta = df[df["kind"] == "THETA"]
    assert list(theta["label"]) == [f"THETA({k})" for k in range(1, len(theta) + 1)]
    assert theta["name"].iloc[0] == next(iter(fit_copy.spec.parameters))
    omega = df[df["kind"] == "OMEGA"]
    assert len(omega) > 0
    assert list(omega["label"]) == [f"OMEGA({k},{k})" for k in range(1, len(omega) + 1)]
    sigma = df[df["kind"] == "SIGMA"]
    assert list(sigma["label"]) == [f"SIGMA({k},{k})" for k in range(1, len(sigma) + 1)]
    assert "sigma_car_flow" in set(sigma["name"])
    for _, row in omega.iterrows():
        x = post[row["name"]].values.ravel()
        med = np.median(x)
        assert row["median"] == pytest.approx(med)
        assert row["cv_pct"] == pytest.approx(100.0 * np.sqrt(np.exp(med**2) - 1.0))
        assert row["rse_pct"] == pytest.approx(100.0 * np.std(x, ddof=1) / np.mean(x))
    assert cv_percent(0.3) == pytest.approx(100 * np.sqrt(np.exp(0.09) - 1))
    free = theta[~theta["fixed"]]
    assert (free["q025"] <= free["q05"]).all() and (free["q05"] <= free["median"]).all()
    assert (free["median"] <= free["q95"]).all() and (free["q95"] <= free["q975"]).all()
    assert free["prior"].str.len().gt(0).all()
    assert theta[theta["fixed"]]["prior"].eq("FIX").all()


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
    sd = sdtab(fit_copy, N_DRAWS, seed=2)
    assert list(sd.columns) == ["ID", "TIME", "DVID", "DV", "BLQ", "LLOQ", "PRED", "IPRED", "NPDE"]
    records = fit_copy.idata["constant_data"].to_dataset()
    assert len(sd) == records.sizes["record"]
    np.testing.assert_allclose(sd["TIME"], records["TIME"].values)
    np.testing.assert_array_equal(sd["DVID"], records["DVID"].values)
    assert np.isfinite(sd[["PRED", "IPRED", "NPDE"]].to_numpy()).all()
    assert (sd["IPRED"] > 0).all()


def test_posterior_predictive_shapes(fit_copy):
    from carnk_pkpd.predictive import posterior_predictive, record_predictions

    ipred = record_predictions(fit_copy, N_DRAWS, seed=3)
    ppc = posterior_predictive(fit_copy, N_DRAWS, seed=3)
    assert ipred.dims == ("sample", "record") and ipred.shape == ppc["y_rep"].shape
    np.testing.assert_allclose(ipred.values, ppc["IPRED"].values)
    np.testing.assert_array_equal(ppc["blq_rep"].values, ppc["y_rep"].values < ppc["LLOQ"].values)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_readable(fit_copy, tmp_path, fmt):
    paths = write_export(fit_copy, fmt, tmp_path / fmt, n_draws=N_DRAWS, seed=4)
    assert paths and all(p.exists() for p in paths)
    leftovers = [p.name for p in (tmp_path / fmt).iterdir() if p.name.startswith(".") and p.name != MARKER]
    assert not leftovers  # no temporary files left; only the marker of the folder's owner
    names = {p.name for p in paths}
    if fmt == "csv":
        assert names == {"parameters.csv", "subjects.csv", "sdtab.csv"}
        par = pd.read_csv(tmp_path / fmt / "parameters.csv", comment="#")
        assert par["label"].str.match(r"^(THETA|OMEGA|SIGMA)\(").any()
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
    for sid in ("parameters", "shrinkage", "gof", "vpc", "individual", "diagnostics", "manifest"):
        assert f'<section id="{sid}">' in text, sid
    assert 'id="synthetic-banner"' in text
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert len(srcs) >= 6
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "OMEGA(1,1)" in text and "SIGMA(1,1)" in text and "THETA(1)" in text
    assert not re.search(r'(src|href)="(https?:|file:)', text)  # self-contained


def test_report_in_headless_chromium(report_html, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (CI: apt-get install -y chromium)")
    args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    url = report_html.resolve().as_uri()
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    for heading in ("Parameters (THETA / OMEGA / SIGMA)", "η-shrinkage", "Goodness of fit",
                    "Visual predictive checks", "Individual fits", "Sampler diagnostics", "Manifest",
                    "SYNTHETIC DATA"):  # fmt: skip
        assert heading in dom.stdout, heading
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1200,2000", url],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes().startswith(PNG_MAGIC)


def test_cli_export_and_errors(fit_copy, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["export", str(fit_copy.path), "--format", "csv", "--out", str(out),
                              "--draws", str(N_DRAWS)])  # fmt: skip
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
