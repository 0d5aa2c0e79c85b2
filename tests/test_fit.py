"""The hierarchical fit: M3 likelihood, saved fit folders, seeds, diagnostics, interrupted fits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

from carnk_pkpd.data import Cohort
from carnk_pkpd.diagnostics import diagnose
from carnk_pkpd.errors import FitError
from carnk_pkpd.fits import SUMMARY_COLUMNS, load_fit, save_fit
from carnk_pkpd.spec import load_model


def tiny_cohort(blq_car_day: float = 90.0) -> Cohort:
    """One DL4 subject: LD on days -5..-3 (EVID=2), 3 infusions, CAR-NK at days 1, 7 and a BLQ sample,
    B cells at 7, 28 (BLQ), 120."""
    rows = [
        ("1", -5, 2, 0, 0, np.nan, 1, 0, np.nan),
        ("1", -4, 2, 0, 0, np.nan, 1, 0, np.nan),
        ("1", -3, 2, 0, 0, np.nan, 1, 0, np.nan),
        ("1", 0, 1, 3, 0, np.nan, 1, 0, np.nan),
        ("1", 1, 0, 0, 1, 20.0, 0, 0, 0.1),
        ("1", 3, 1, 3, 0, np.nan, 1, 0, np.nan),
        ("1", 6, 1, 3, 0, np.nan, 1, 0, np.nan),
        ("1", 7, 0, 0, 1, 35.0, 0, 0, 0.1),
        ("1", 7, 0, 0, 2, 2.0, 0, 0, 1.0),
        ("1", 28, 0, 0, 2, 1.0, 0, 1, 1.0),
        ("1", blq_car_day, 0, 0, 1, 0.1, 0, 1, 0.1),
        ("1", 120, 0, 0, 2, 60.0, 0, 0, 1.0),
    ]
    df = pd.DataFrame(rows, columns=["ID", "TIME", "EVID", "AMT", "DVID", "DV", "MDV", "BLQ", "LLOQ"])
    df["DL"] = "4"
    return Cohort.from_dataframe(df, comments=["# SYNTHETIC: hand-made test cohort"])


def test_blq_records_contribute_the_probability_below_lloq_m3():
    """Each BLQ record adds log P(Y < LLOQ); observed records add the log density (Beal's M3)."""
    import carnk_pkpd as ck
    from carnk_pkpd.statistical import build_model, observation_data

    spec = load_model("reference")
    data = observation_data(tiny_cohort())
    model = build_model(spec, data)
    point = model.initial_point()  # all z = 0, eta = 0: every parameter at its typical value
    names = ["ll_car_flow_obs", "ll_car_flow_blq", "ll_bcell_flow_obs", "ll_bcell_flow_blq"]
    terms = model.replace_rvs_by_values([model[n] for n in names])
    car_obs, car_blq, b_obs, b_blq = model.compile_fn(terms, on_unused_input="ignore")(point)
    # independent prediction with the same typical values
    doses = [(0.0, 3.0), (3.0, 3.0), (6.0, 3.0)]
    sim = ck.simulate({}, doses, [1.0, 7.0, 28.0, 90.0, 120.0], accuracy="tight")
    car = dict(zip(sim.time.values, sim.car.values, strict=True))
    b = dict(zip(sim.time.values, sim.bcell.values, strict=True))
    s_car = spec.observations[1].sigma["log"]
    prop, add = spec.observations[2].sigma["prop"], spec.observations[2].sigma["add"]
    np.testing.assert_allclose(
        car_obs,
        [
            stats.lognorm.logpdf(20.0, s_car, scale=car[1.0]),
            stats.lognorm.logpdf(35.0, s_car, scale=car[7.0]),
        ],
        rtol=1e-4,
    )
    # BLQ: log P(Y < LLOQ), never dropped, never imputed
    np.testing.assert_allclose(
        car_blq, [stats.norm.logcdf((np.log(0.1) - np.log(car[90.0])) / s_car)], atol=1e-9
    )
    sd = lambda m: np.hypot(prop * m, add)  # noqa: E731
    np.testing.assert_allclose(
        b_obs,
        [stats.norm.logpdf(2.0, b[7.0], sd(b[7.0])), stats.norm.logpdf(60.0, b[120.0], sd(b[120.0]))],
        rtol=1e-4,
    )
    np.testing.assert_allclose(b_blq, [stats.norm.logcdf(1.0, b[28.0], sd(b[28.0]))], rtol=1e-4)


def test_normal_lcdf_is_accurate_in_both_tails_and_has_finite_gradients():
    import pytensor
    import pytensor.tensor as pt

    from carnk_pkpd.statistical import normal_lcdf

    z = pt.dvector("z")
    f = pytensor.function([z], [normal_lcdf(z), pytensor.grad(normal_lcdf(z).sum(), z)])
    grid = np.array([-40.0, -10.0, -1.5, -1.0, -0.2, 0.0, 1.0, 5.0, 12.0])
    val, grad = f(grid)
    np.testing.assert_allclose(val, stats.norm.logcdf(grid), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(grad, np.exp(stats.norm.logpdf(grid) - stats.norm.logcdf(grid)), rtol=1e-8)
    assert np.all(np.isfinite(grad))


def test_fit_folder_holds_posterior_model_data_summary_and_manifest(small_fit):
    folder = small_fit.path
    for name in ("posterior.nc", "model.toml", "data.csv", "summary.csv", "manifest.json"):
        assert (folder / name).is_file(), name
    summary = pd.read_csv(folder / "summary.csv", comment="#")
    assert list(summary.columns) == SUMMARY_COLUMNS
    names = set(summary["name"])
    assert {"f_bl", "k_rej", "B0", "MTT"} <= names  # typical values named as the parameter
    assert {"omega_f_bl", "omega_k_rej", "omega_B0", "omega_MTT"} <= names
    assert "sigma_car_flow" in names and "sigma_bcell_flow_prop" in names
    assert not any(n.startswith(("z_", "eta_")) for n in names)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 11 and manifest["sampler"]["chains"] == 2
    assert manifest["synthetic"] is True
    assert set(manifest["files"]) == {"posterior.nc", "model.toml", "data.csv", "summary.csv"}
    assert "nutpie" in manifest["versions"] and "compile_seconds" in manifest["timings"]
    assert manifest["sampler"]["target_accept"] == 0.9 and manifest["sampler"]["adaptation"] == "diag"
    # a reloaded fit carries the same posterior and the data it was fitted to
    post = small_fit.posterior
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 60
    assert list(post["subject"].values) == small_fit.cohort.ids
    ind = small_fit.individual_parameters()
    assert ind["B0"].dims == ("chain", "draw", "subject")
    # the population layer rebuilds each subject's value from the draw's typical value, omega and eta
    np.testing.assert_allclose(ind["B0"].values, post["B0_i"].values, rtol=1e-10)
    # OMEGA FIX (bsv.estimate = false, sd > 0): the fit keeps the subjects' eta, omega is not sampled
    assert "eta_rho" in post and "omega_rho" not in post and "rho_i" in post
    np.testing.assert_allclose(ind["rho"].values, post["rho_i"].values, rtol=1e-10)


def test_damaged_or_incomplete_fit_folders_name_the_file(small_fit, tmp_path):
    import shutil

    good = tmp_path / "fit"
    shutil.copytree(small_fit.path, good)
    bad = tmp_path / "damaged"
    shutil.copytree(good, bad)
    with open(bad / "posterior.nc", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    with pytest.raises(FitError, match=r"posterior\.nc.*damaged"):
        load_fit(bad)
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "manifest.json").unlink()
    with pytest.raises(FitError, match=r"manifest\.json.*missing"):
        load_fit(missing)
    old = tmp_path / "old"
    shutil.copytree(good, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FitError, match="format_version 99"):
        load_fit(old)
    with pytest.raises(FitError, match="not a fit folder"):
        load_fit(tmp_path / "nowhere")
    assert load_fit(good).posterior["f_bl"].shape == small_fit.posterior["f_bl"].shape


def test_existing_fit_is_kept_unless_overwrite(small_fit, tmp_path):
    import shutil

    dest = tmp_path / "fit"
    shutil.copytree(small_fit.path, dest)
    before = (dest / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError):
        save_fit(small_fit, dest)
    assert (dest / "manifest.json").read_bytes() == before
    save_fit(small_fit, dest, overwrite=True)
    assert load_fit(dest).posterior["B0"].shape == small_fit.posterior["B0"].shape
    assert [p.name for p in tmp_path.iterdir()] == ["fit"]  # no temporary folder left behind


def test_a_target_acceptance_outside_zero_one_is_refused_before_any_work():
    from carnk_pkpd.data import embedded_cohort_path
    from carnk_pkpd.inference import fit

    for bad in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match="target_accept must lie in"):
            fit(embedded_cohort_path("example"), target_accept=bad, progress=False)


def test_same_seed_gives_the_same_draws():
    from carnk_pkpd.inference import fit

    cohort = tiny_cohort()
    a = fit(cohort, draws=10, tune=10, chains=1, seed=5, progress=False)
    b = fit(cohort, draws=10, tune=10, chains=1, seed=5, progress=False)
    c = fit(cohort, draws=10, tune=10, chains=1, seed=6, progress=False)
    np.testing.assert_array_equal(a.posterior["B0"].values, b.posterior["B0"].values)
    assert not np.array_equal(a.posterior["B0"].values, c.posterior["B0"].values)


def _posterior(means: list[float], n_draws: int = 500, seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    x = np.stack([m + rng.standard_normal(n_draws) for m in means])
    return xr.Dataset(
        {"B0": (("chain", "draw"), x)}, coords={"chain": range(len(means)), "draw": range(n_draws)}
    )


def test_diagnostics_flag_chains_that_disagree_and_divergences():
    good = diagnose(_posterior([0, 0, 0, 0]), None)
    assert good.ok and good.max_r_hat < 1.01 and good.min_ess_bulk > 400
    split = diagnose(_posterior([0, 0, 0, 3]), None)
    assert not split.ok and any("R-hat" in p for p in split.problems)
    stats_ = xr.Dataset(
        {
            "diverging": (("chain", "draw"), np.zeros((4, 500), bool)),
            "energy": (("chain", "draw"), np.zeros((4, 500))),
        }
    )
    stats_["diverging"][0, :3] = True
    rng = np.random.default_rng(1)
    stats_["energy"][:] = np.cumsum(rng.standard_normal((4, 500)), axis=1)  # random walk: low E-BFMI
    d = diagnose(_posterior([0, 0, 0, 0]), stats_)
    assert d.divergences == 3 and any("divergent" in p for p in d.problems)
    assert any("E-BFMI" in p for p in d.problems)
    assert d.advice()


def test_killing_a_fit_part_way_leaves_fits_as_it_was(small_fit, tmp_path):
    import shutil

    fits = tmp_path / "fits"
    shutil.copytree(small_fit.path, fits / "run")
    before = sorted((p.relative_to(fits), p.stat().st_size) for p in fits.rglob("*"))
    data = small_fit.path / "data.csv"
    cmd = [
        sys.executable,
        "-m",
        "carnk_pkpd.cli",
        "fit",
        str(data),
        "--out",
        str(fits / "run"),
        "--overwrite",
        "--draws",
        "2000",
        "--tune",
        "2000",
        "--chains",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(12)  # imports, model building, compilation, sampling under way
    assert proc.poll() is None, "the fit ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    after = sorted((p.relative_to(fits), p.stat().st_size) for p in fits.rglob("*"))
    assert after == before
    assert load_fit(fits / "run").posterior["B0"].shape == small_fit.posterior["B0"].shape


SHIFT = dict(f_bl=1.5, k_rej=1 / 1.5, B0=1.6, MTT=1 / 1.2)  # truth away from the file's typical values


def test_predictions_by_dvid_with_fitted_subjects(small_fit):
    """IPRED (fitted eta) comes from the population layer and follows each record's DVID: B-cell
    records before the LD window sit at the subject's B0. (EPRED, new subjects: test_export.)"""
    from carnk_pkpd.predictive import record_predictions

    ipred = record_predictions(small_fit, 10, seed=2)
    ind = small_fit.individual_parameters().stack(sample=("chain", "draw")).transpose("sample", "subject")
    pre = (ipred["DVID"].values == 2) & (ipred["TIME"].values < -5.0)
    if pre.any():  # screening B cells: untouched by LD and CAR-NK, so IPRED = the subject's B0
        col = [list(ind["subject"].values).index(i) for i in ipred["ID"].values[pre]]
        b0 = ind["B0"].values[ipred["sample"].values][:, col]
        np.testing.assert_allclose(ipred.values[:, pre], b0, rtol=1e-6)


def _recovery_fit(bsv: str):
    from carnk_pkpd.cohortsim import simulate_cohort
    from carnk_pkpd.inference import fit

    spec = load_model("reference")
    truth = {k: spec.typical()[k] * f for k, f in SHIFT.items()}
    cohort, _ = simulate_cohort(spec, n_subjects=20, seed=2024, truth=truth, follow_up=365, bsv=bsv)
    result = fit(cohort, spec, draws=1000, tune=1000, chains=4, seed=3, progress=False)
    summary = result.summary().set_index("name")
    print(
        f"bsv={bsv}: truth {truth}\n{summary.loc[list(truth), ['q05', 'q50', 'q95', 'r_hat']]}"
    )  # -s shows it
    return truth, summary


@pytest.mark.slow
def test_parameter_recovery_when_the_cohort_comes_from_the_fitted_model():
    """Simulation-estimation: 20 subjects with BSV on the estimated parameters only (f_bl, k_rej, B0,
    MTT) at f_bl x1.5, k_rej /1.5, B0 x1.6, MTT /1.2: the 90% intervals cover the truth. (Since OMEGA FIX
    the fit also carries the file's fixed omegas, so this cohort has less spread than the fit assumes.)"""
    truth, s = _recovery_fit("estimated")
    for name, value in truth.items():
        assert s.loc[name, "q05"] <= value <= s.loc[name, "q95"], (name, value, s.loc[name].to_dict())
    assert s.loc[list(truth), "r_hat"].max() <= 1.01


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured before OMEGA FIX, when the fit held alpha and rho at one typical value: the fit put "
    "alpha low (0.119 vs 0.15) and k_rej high: k_rej q05 0.108 > truth 0.100 (seed 2024). The fit now keeps "
    "eta with fixed omega on every parameter the file gives BSV, so this case is the well-specified one; NOT "
    "re-measured yet (a 20-minute run): run pytest -m slow -k unmodelled and remove this xfail if it passes",
)
def test_parameter_recovery_with_unmodelled_bsv_on_alpha_and_rho():
    """The same truth, with the file's full BSV: every parameter with bsv.sd > 0 varies, as the fit
    (estimated omegas plus OMEGA FIX) assumes."""
    truth, s = _recovery_fit("file")
    for name, value in truth.items():
        assert s.loc[name, "q05"] <= value <= s.loc[name, "q95"], (name, value, s.loc[name].to_dict())
    assert s.loc[list(truth), "r_hat"].max() <= 1.01


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
