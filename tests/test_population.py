"""The population layer: virtual subjects drawn the way the fitted model says (issue 12).

Every random step is seeded; Monte Carlo tolerances are 4 standard errors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from carnk_pkpd.population import (
    PopulationDraws,
    SubjectDesign,
    concat_designs,
    individual_parameters,
    simulate_population,
    solver_rate_bounds,
)
from carnk_pkpd.regimen import Regimen
from carnk_pkpd.spec import load_model

DOSE_EFFECT = """
[[covariates]]
parameter = "f_bl"
covariate = "DOSE"
form = "power"
center = 2.0
prior = { dist = "Normal", mu = 0.5, sigma = 0.2 }
"""


@pytest.fixture(scope="module")
def spec():
    return load_model("reference")


@pytest.fixture(scope="module")
def dose_spec(tmp_path_factory):
    """The reference model with a power effect of DOSE on f_bl (β = 0.5 at its prior mean, centre 2)."""
    path = tmp_path_factory.mktemp("models") / "dose_effect.toml"
    path.write_text(load_model("reference").text + DOSE_EFFECT, encoding="utf-8")
    return load_model(path)


def _check_log_moments(x: np.ndarray, mean: float, sd: float) -> None:
    """log x (one draw, many subjects) has the given mean and SD within 4 standard errors."""
    lx = np.log(x)
    n = lx.size
    assert abs(lx.mean() - mean) < 4 * sd / np.sqrt(n) + 1e-12
    if sd > 0:
        assert abs(lx.std(ddof=1) - sd) < 4 * sd / np.sqrt(2 * (n - 1))
    else:
        assert np.ptp(lx) < 1e-12


def test_log_parameters_have_mean_log_typical_and_sd_omega_for_estimated_and_fixed_omega(spec):
    pop = PopulationDraws.from_model(spec, n_draws=2)
    # draw 1: other population values, as a posterior would give
    typ = {k: v * np.array([1.0, 1.7]) for k, v in pop.typical.items()}
    omega = {k: v * np.array([1.0, 0.6]) for k, v in pop.omega.items()}
    pop = dataclasses.replace(pop, typical=typ, omega=omega)
    design = SubjectDesign.from_regimen(spec, Regimen(3.0, 3.0, 3), 20000)
    theta = individual_parameters(pop, design, np.random.default_rng(5))
    assert spec.parameters["f_bl"].bsv_estimate and not spec.parameters["rho"].bsv_estimate
    for name in ("f_bl", "B0", "rho", "EC50", "k_kmax"):  # estimated, estimated, fixed, fixed, none
        for d in range(2):
            sd = float(omega[name][d]) if name in omega else 0.0
            _check_log_moments(theta[name][d], np.log(typ[name][d]), sd)


def test_dose_level_tier_and_a_new_dose_level(spec):
    pop = PopulationDraws.from_model(spec, n_draws=400)
    dl_values = np.array([0.01, 0.04])
    pop = dataclasses.replace(
        pop,
        typical_dl={"f_bl": np.tile(dl_values, (400, 1))},
        omega_dl={"f_bl": np.full(400, 0.3)},
        dose_levels=("DL1", "DL4"),
    )
    parts = [
        SubjectDesign.from_regimen(spec, Regimen(0.75, 7.0, 3), 50, dose_level="DL1"),
        SubjectDesign.from_regimen(spec, Regimen(3.0, 3.0, 3), 50, dose_level="DL4"),
        SubjectDesign.from_regimen(spec, Regimen(5.0, 3.0, 3), 50, dose_level="new"),
    ]
    theta = individual_parameters(pop, concat_designs(parts), np.random.default_rng(1))
    lf = np.log(theta["f_bl"])
    om = spec.parameters["f_bl"].bsv_sd
    for k, value in enumerate(dl_values):
        _check_log_moments(theta["f_bl"][0, 50 * k : 50 * (k + 1)], np.log(value), om)
    # a new dose level: one tier deviation per draw, shared by that draw's subjects
    per_draw = lf[:, 100:].mean(axis=1) - np.log(pop.typical["f_bl"])
    se = om / np.sqrt(50)
    assert abs(per_draw.std(ddof=1) - np.hypot(0.3, se)) < 4 * 0.3 / np.sqrt(2 * 399)


def test_dose_power_effect_scales_the_parameter_by_dose_ratio_to_the_power_beta(dose_spec):
    # same seed, two regimens: the same virtual patients (common random numbers)
    a = simulate_population(dose_spec, Regimen(1.0, 3.0, 3), n_subjects=4, n_draws=2, seed=3, metrics=False)
    b = simulate_population(dose_spec, Regimen(4.0, 3.0, 3), n_subjects=4, n_draws=2, seed=3, metrics=False)
    np.testing.assert_allclose(b["f_bl"].values / a["f_bl"].values, 4.0**0.5, rtol=1e-12)
    np.testing.assert_array_equal(a["B0"].values, b["B0"].values)
    # and against the centre: f_bl_i / exp(eta) = typical·(dose/2)^β
    theta = individual_parameters(
        PopulationDraws.from_model(dose_spec, 1),
        SubjectDesign.from_regimen(dose_spec, Regimen(1.0, 3.0, 3), 1),
        None,
        z={"f_bl": np.zeros((1, 1))},
    )
    np.testing.assert_allclose(theta["f_bl"][0, 0], 0.02 * (1.0 / 2.0) ** 0.5, rtol=1e-12)


def test_simulated_metrics_equal_derived_metrics_for_the_same_parameters(spec):
    from carnk_pkpd.structural import derived_metrics

    ds = simulate_population(spec, Regimen(2.0, 3.0, 3, 0.5), n_subjects=3, n_draws=2, seed=9)
    names = [p for p in spec.parameters if p != "n_transit"]
    params = {p: ds[p].values.reshape(-1) for p in names}
    params["n_transit"] = np.full(6, 6)
    design = SubjectDesign.from_regimen(spec, Regimen(2.0, 3.0, 3, 0.5), 6)
    ref = derived_metrics(params, list(design.doses), spec, ld=design.ld(spec))
    for k in ref.data_vars:
        np.testing.assert_allclose(ds[k].values.reshape(-1), ref[k].values, rtol=1e-12, equal_nan=True)
    assert {"typical_f_bl", "omega_f_bl", "omega_rho", "sigma_car_flow"} <= set(ds.data_vars)
    assert ds["car"].dims == ("draw", "subject", "time")


def test_a_regimen_without_lymphodepletion_has_no_ld_kill_surge_or_delayed_rejection(spec):
    from carnk_pkpd.structural import simulate
    from carnk_pkpd.structural.carnk import ld_rate

    design = SubjectDesign.from_regimen(spec, Regimen(3.0, 3.0, 1, 0.0), 1)
    ld = design.ld(spec)
    th = {k: np.array([v]) for k, v in spec.typical().items()}
    t = np.linspace(-10, 30, 81)
    assert np.all(np.asarray(ld_rate(th, t[None, :], ld)) == 0.0)
    times = np.array([-5.0, -3.0, -0.5, 1.0, 5.0, 10.0])
    no_ld = simulate(None, [(0.0, 3.0)], times, spec, ld=0.0)
    with_ld = simulate(None, [(0.0, 3.0)], times, spec)
    b0 = spec.parameters["B0"].typical
    np.testing.assert_allclose(no_ld["bcell"].values[:3], b0, rtol=1e-9)  # untouched before the infusion
    assert with_ld["bcell"].values[2] < 0.5 * b0  # lymphodepleted
    # no surge and rejection in full from the infusion: N = n0·exp(−(α + k_rej)·t)
    p = spec.typical()
    n0 = p["f_bl"] * 3e9 / p["V_bl"]
    expected = n0 * np.exp(-(p["alpha"] + p["k_rej"]) * times[3:])
    np.testing.assert_allclose(no_ld["car"].values[3:], expected, rtol=1e-10)
    assert np.all(with_ld["car"].values[3:] > no_ld["car"].values[3:])


def test_observed_ld_window_comes_from_evid2_rows(spec):
    from carnk_pkpd.data import Cohort

    rows = []
    for sid, ld_days in (("1", [-6.0, -5.0, -4.0]), ("2", [])):
        for t in ld_days:
            rows.append(dict(ID=sid, TIME=t, EVID=2, AMT=0, DVID=0, DV=np.nan, DL="4"))
        rows.append(dict(ID=sid, TIME=0.0, EVID=1, AMT=3.0, DVID=1, DV=np.nan, DL="4"))
        rows.append(dict(ID=sid, TIME=7.0, EVID=0, AMT=0, DVID=2, DV=5.0, DL="4"))
    cohort = Cohort.from_dataframe(pd.DataFrame(rows), comments=("SYNTHETIC test cohort",))
    design = SubjectDesign.from_cohort(cohort, spec)
    np.testing.assert_array_equal(design.ld_start, [-6.0, -5.0])
    np.testing.assert_array_equal(design.ld_end, [-4.0, -3.0])
    np.testing.assert_array_equal(design.ld_scale, [1.0, 0.0])
    ld = design.ld(spec)
    assert ld["surge_origin"][0] == -1.0 and ld["kill"][1] == 0.0


def test_one_rate_bound_rule_covers_fixed_and_estimated_bsv(spec):
    k_tr, k_kill = solver_rate_bounds(spec)
    mtt, kk = spec.parameters["MTT"], spec.parameters["k_kmax"]
    assert k_tr == pytest.approx(6 / mtt.typical * np.exp(2.5 * (mtt.prior["sigma"] + mtt.bsv_sd)))
    assert k_kill == pytest.approx(kk.typical * np.exp(2.5 * (kk.prior["sigma"] + kk.bsv_sd)))
    fast = {"MTT": np.array([100.0, 5.0]), "k_kmax": np.array([1.0, 80.0])}
    per_tr, per_kill = solver_rate_bounds(spec, fast)
    np.testing.assert_allclose(per_tr, [k_tr, 6 / 5.0])
    np.testing.assert_allclose(per_kill, [k_kill, 80.0])


def test_model_with_fixed_omega_keeps_eta_in_the_fit_and_lognormal_b_cells_fit_b_cells(tmp_path):
    """OMEGA FIX: eta_rho is a free variable, omega_rho is not. A log-normal B-cell error model is
    evaluated on B cells: the potential equals a hand computation at the initial point."""
    from scipy.stats import norm

    from carnk_pkpd.data import Cohort
    from carnk_pkpd.statistical import build_model, observation_data
    from carnk_pkpd.structural import simulate

    text = load_model("reference").text.replace(
        """error = "combined"
lloq = 1.0""",
        """error = "lognormal"
lloq = 1.0""",
    )
    text = text.replace(
        """[observations.2.sigma.prop]
typical = 0.2
prior = { dist = "LogNormal", mu = -1.609438, sigma = 0.3 }
estimate = true""",
        """[observations.2.sigma.log]
typical = 0.3
estimate = false""",
    )
    start = text.index("[observations.2.sigma.add]")
    end = text.index("[observations.3]")
    text = text[:start] + text[end:]
    path = tmp_path / "lognormal_b.toml"
    path.write_text(text, encoding="utf-8")
    spec = load_model(path)
    assert spec.observations[2].error == "lognormal"
    rows = [dict(ID="1", TIME=t, EVID=2, AMT=0, DVID=0, DV=np.nan, DL="4") for t in (-5.0, -4.0, -3.0)]
    rows.append(dict(ID="1", TIME=0.0, EVID=1, AMT=3.0, DVID=1, DV=np.nan, DL="4"))
    b_obs = {14.0: 0.8, 60.0: 3.0, 120.0: 40.0}
    for t, y in b_obs.items():
        rows.append(dict(ID="1", TIME=t, EVID=0, AMT=0, DVID=2, DV=y, DL="4"))
    cohort = Cohort.from_dataframe(pd.DataFrame(rows), comments=("SYNTHETIC test cohort",))
    data = observation_data(cohort)
    model = build_model(spec, data)
    free = {v.name for v in model.free_RVs}
    assert "eta_rho" in free and "omega_rho" not in model.named_vars  # OMEGA FIX: a constant
    assert "z_omega_f_bl" in free and "omega_f_bl" in model.named_vars  # estimated: exp(mu + sigma·z)
    (term,) = model.replace_rvs_by_values([model["ll_bcell_flow_obs"]])
    ll = model.compile_fn(term, on_unused_input="ignore")(model.initial_point())
    # initial point: every z and eta 0, so each parameter is exp(prior mu) = its typical value
    b = simulate(None, [(0.0, 3.0)], list(b_obs), spec)["bcell"].values
    y = np.array(list(b_obs.values()))
    expected = norm.logpdf(np.log(y), np.log(b + 1e-9), 0.3) - np.log(y)
    np.testing.assert_allclose(np.asarray(ll), expected, rtol=2e-3)


def _qpcr_fit(spec, conv_sd: float):
    """A hand-built posterior (2 chains x 500 draws) of f_bl and copies_per_cell."""
    import xarray as xr

    from carnk_pkpd.fits import Fit

    rng = np.random.default_rng(4)
    lf = rng.normal(np.log(0.02), 0.9, (2, 500))
    if conv_sd > 0.5:  # the factor moves against f_bl: only the product is pinned down
        lc = np.log(1000.0) + (np.log(0.02) - lf) + rng.normal(0.0, 0.05, lf.shape)
    else:  # the factor is informed on its own
        lc = rng.normal(np.log(1000.0), conv_sd, lf.shape)
    post = xr.Dataset(
        {"f_bl": (("chain", "draw"), np.exp(lf)), "copies_per_cell": (("chain", "draw"), np.exp(lc))},
        coords={"chain": [0, 1], "draw": np.arange(500)},
    )
    tree = xr.DataTree.from_dict({"posterior": post})
    return lambda: Fit(spec=spec, cohort=None, idata=tree)


def test_fit_warns_when_qpcr_identifies_only_the_product_f_bl_times_copies_per_cell(spec):
    with pytest.warns(UserWarning, match="copies_per_cell.*product is identified"):
        _qpcr_fit(spec, 0.9)()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = _qpcr_fit(spec, 0.2)()
    assert fit.conversion_warnings() == []
