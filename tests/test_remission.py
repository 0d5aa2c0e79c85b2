"""Remission model: known-coefficient recovery, ordering, calibration, predictions on a fit, CLI.

The link tests bypass the kinetic fit: DA of 150 virtual patients comes from the structural model
(reference file, log-normal BSV), its "posterior" is the true DA plus noise, and DORIS/LLDAS visits are
drawn from the ordinal logistic link with known coefficients.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from carnk_pkpd import remission as R
from carnk_pkpd.regimen import Regimen

# the DORIS/LLDAS gap falls with time as in SLE (DORIS follows LLDAS by the steroid taper): 4.2 log-odds
# at day 90, 1.5 at day 180, 0.52 at day 365
TRUTH = {"theta0_lldas": 1.0, "delta": 1.5, "gamma_delta": -1.5, "theta1": 1.2, "sigma_u": 0.5}
CENTER, SCALE = 55.0, 15.0


def _true_gap(day: float) -> float:
    """The truth's DORIS/LLDAS log-odds gap at ``day``: delta * (day / 180) ** gamma_delta."""
    return TRUTH["delta"] * (day / 180.0) ** TRUTH["gamma_delta"]


def _true_da(n: int, seed: int) -> np.ndarray:
    """DA (days) of ``n`` virtual patients at random trial dose levels, from the structural model."""
    from carnk_pkpd.spec import load_model
    from carnk_pkpd.structural import derived_metrics

    spec = load_model("reference")
    rng = np.random.default_rng(seed)
    params = {}
    for name, p in spec.parameters.items():
        if name != "n_transit" and p.bsv_sd:
            params[name] = p.typical * np.exp(p.bsv_sd * rng.standard_normal(n))
    levels = list(spec.dose_levels.values())
    doses = [levels[i].doses() for i in rng.integers(0, len(levels), n)]
    m = derived_metrics(params, doses, spec, horizon=180.0, resolution=0.5)
    return m["DA"].values


def _outcomes(da: np.ndarray, days: list[float], rng: np.random.Generator) -> pd.DataFrame:
    """Ordinal visits (none < LLDAS only < DORIS) from the true link; visit effect 0, the gap
    :func:`_true_gap` of the visit's day."""
    u = TRUTH["sigma_u"] * rng.standard_normal(da.size)
    rows = []
    for i, x in enumerate(da):
        eta = TRUTH["theta1"] * (x - CENTER) / SCALE + u[i]
        p_l = 1 / (1 + np.exp(-(TRUTH["theta0_lldas"] + eta)))
        for d in days:
            p_d = 1 / (1 + np.exp(-(TRUTH["theta0_lldas"] - _true_gap(d) + eta)))
            r = rng.uniform()
            rows.append({"ID": str(i), "day": d, "DORIS": float(r < p_d), "LLDAS": float(r < p_l)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def link_fit():
    """Stage 2 fitted to 150 simulated patients (3 visits each) by multiple imputation over M = 3
    noisy metric columns (each column one "stage-1 draw" for every patient)."""
    rng = np.random.default_rng(5)
    da = _true_da(150, seed=4)
    draws = np.clip(da[:, None] + 4.0 * rng.standard_normal((da.size, 3)), 0.0, 180.0)
    oc = _outcomes(da, [90.0, 180.0, 365.0], rng)
    post = R.sample_remission(
        draws, oc, [str(i) for i in range(da.size)], center=CENTER, scale=SCALE, draws=250, tune=300, seed=3
    )
    return da, post, draws


def test_imputations_are_pooled_with_their_diagnostics(link_fit):
    """The pooled posterior is the M imputations' chains side by side, each labelled with its
    imputation, and the diagnostics table has one row per imputation and parameter plus pooled rows
    whose ESS is the imputations' sum."""
    _, post, draws = link_fit
    m = draws.shape[1]
    assert post.sizes["chain"] == 2 * m
    assert post["imputation"].values.tolist() == [i for i in range(m) for _ in range(2)]
    tab = R.remission_diagnostics(post)
    per = tab[tab["imputation"] != "pooled"]
    pooled = tab[tab["imputation"] == "pooled"].set_index("parameter")
    assert len(per) == m * len(pooled)
    for name in pooled.index:
        assert pooled.loc[name, "ess_bulk"] == pytest.approx(
            per.loc[per["parameter"] == name, "ess_bulk"].sum()
        )
        assert pooled.loc[name, "r_hat"] == per.loc[per["parameter"] == name, "r_hat"].max()
    line = R.diagnostics_line(post)
    assert line.startswith("remission stage 2: ") and ("ok" in line or "FAIL" in line)


def test_imputations_use_one_draw_for_every_subject():
    """Multiple imputation keeps stage-1 draws aligned: a shift that moves EVERY subject's metric in
    one stage-1 draw (shared uncertainty, e.g. a typical value) must widen the link's posterior. Two
    imputations whose columns differ by a common shift of 30 days give a pooled slope posterior whose
    imputation means differ (between-imputation share > 0.3) and whose pooled intercept interval is
    wider than either imputation's alone."""
    rng = np.random.default_rng(8)
    da = _true_da(80, seed=6)
    oc = _outcomes(da, [180.0, 365.0], rng)
    draws = np.stack([da - 15.0, da + 15.0], axis=1)
    post = R.sample_remission(
        draws, oc, [str(i) for i in range(da.size)], center=CENTER, scale=SCALE, draws=150, tune=200, seed=2
    )
    tab = R.remission_diagnostics(post).set_index(["imputation", "parameter"])
    assert tab.loc[("pooled", "theta0_lldas"), "between_share"] > 0.3
    th = post["theta0_lldas"]
    width = lambda a: float(np.diff(np.quantile(a, [0.05, 0.95]))[0])  # noqa: E731
    pooled = width(th.values)
    for m in (0, 1):
        assert pooled > width(th.where(post["imputation"] == m, drop=True).values)
    # a higher metric for everyone needs a lower intercept for the same outcomes
    means = [float(th.where(post["imputation"] == m, drop=True).mean()) for m in (0, 1)]
    assert means[1] < means[0]


def test_intervals_cover_known_coefficients(link_fit):
    _, post, _ = link_fit
    truth = {**TRUTH, "theta0_doris": TRUTH["theta0_lldas"] - TRUTH["delta"]}
    # 95% intervals: five checks at 90% would fail by chance about two runs in five
    for name in ("theta0_lldas", "theta0_doris", "theta1", "delta", "gamma_delta"):
        lo, hi = np.quantile(post[name].values, [0.025, 0.975])
        assert lo <= truth[name] <= hi, (name, lo, hi, truth[name])
    assert float(post["theta1"].quantile(0.05)) > 0  # the effect is detected


def test_probability_rises_with_da_and_doris_below_lldas(link_fit):
    _, post, _ = link_fit
    grid = np.linspace(10.0, 150.0, 15)
    p = R.link_probabilities(post, grid[None, :], 180.0)
    med = {ep: np.median(v, axis=0) for ep, v in p.items()}
    assert np.all(np.diff(med["DORIS"]) > 0) and np.all(np.diff(med["LLDAS"]) > 0)
    for d in (28.0, 180.0, 300.0, 365.0):
        q = R.link_probabilities(post, grid[None, :], d, u=np.linspace(-3, 3, 15)[None, :])
        assert np.all(q["DORIS"] <= q["LLDAS"])


def test_link_gap_follows_the_power_of_day_and_is_clamped_to_the_visit_grid():
    """P(DORIS) = σ(theta0_lldas − delta·(t/180)^gamma_delta + η) at any day, computed by hand; days
    outside the visit grid (28..365) take the gap and visit effect of the nearest grid end."""
    grid = np.array([28.0, 90.0, 180.0, 365.0])
    v = np.array([-3.0, -1.0, 0.0, 0.4])
    post = xr.Dataset(
        {
            "theta0_lldas": (("chain", "draw"), [[0.7, 0.2]]),
            "delta": (("chain", "draw"), [[1.4, 0.9]]),
            "gamma_delta": (("chain", "draw"), [[-2.0, 0.5]]),
            "theta0_doris": (("chain", "draw"), [[0.7 - 1.4, 0.2 - 0.9]]),
            "theta1": (("chain", "draw"), [[0.8, 1.1]]),
            "sigma_u": (("chain", "draw"), [[1.0, 1.0]]),
            "v": (("chain", "draw", "visit_day"), np.tile(v, (1, 2, 1))),
        },
        coords={"chain": [0], "draw": [0, 1], "visit_day": grid},
        attrs={"metric": "DA", "center": 55.0, "scale": 15.0},
    )
    expit = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    for day, d_eff, v_eff in (
        (90.0, 90.0, -1.0),
        (365.0, 365.0, 0.4),
        (14.0, 28.0, -3.0),
        (730.0, 365.0, 0.4),
    ):
        p = R.link_probabilities(post, np.array([[70.0], [70.0]]), day)
        for k, (a, dl, g, b) in enumerate(((0.7, 1.4, -2.0, 0.8), (0.2, 0.9, 0.5, 1.1))):
            eta = a + b * (70.0 - 55.0) / 15.0 + v_eff
            assert p["LLDAS"][k, 0] == pytest.approx(expit(eta), rel=1e-12)
            assert p["DORIS"][k, 0] == pytest.approx(expit(eta - dl * (d_eff / 180.0) ** g), rel=1e-12)


def test_calibration_on_large_cohort(link_fit):
    """Reliability table: 3000 new patients, 5 bins of predicted P at day 180; each bin's observed
    frequency lies within the bin's posterior 90% band (fit from 150 patients) widened by 2 binomial SE,
    and within 0.1 of the mean prediction."""
    da, post, _ = link_fit
    rng = np.random.default_rng(11)
    new_da = rng.choice(da, 3000)
    oc = _outcomes(new_da, [180.0], rng)
    sig = R._flat(post, "sigma_u")[:, None]
    u = sig * rng.standard_normal((sig.size, new_da.size))
    probs = R.link_probabilities(post, new_da[None, :], 180.0, u=u)
    for ep in R.ENDPOINTS:
        p = probs[ep].mean(axis=0)
        bins = np.quantile(p, np.linspace(0, 1, 6))
        idx = np.clip(np.searchsorted(bins, p, side="right") - 1, 0, 4)
        obs = oc[ep].to_numpy()
        for b in range(5):
            sel = idx == b
            per_draw = probs[ep][:, sel].mean(axis=1)
            lo, hi = np.quantile(per_draw, [0.05, 0.95])
            o = obs[sel].mean()
            se = np.sqrt(o * (1 - o) / sel.sum())
            assert lo - 2 * se <= o <= hi + 2 * se, (ep, b, lo, hi, o)
            assert abs(p[sel].mean() - o) < 0.1, (ep, b, p[sel].mean(), o)


def test_category_bounds_handle_partial_visits():
    lo, hi = R._category_bounds(np.array([1, 0, np.nan, 0, np.nan]), np.array([1, 1, 0, np.nan, 1]))
    assert lo.tolist() == [2, 1, 0, 0, 1]
    assert hi.tolist() == [2, 1, 0, 1, 2]


PUBLISHED = Path(__file__).parents[1] / "models" / "published_counts.toml"


def test_published_counts_file_reads():
    """One multinomial per report over none / LLDAS only / DORIS; by default only the later report
    (the earlier one's patients are among its patients); the dose-level mix follows enrolment order."""
    used = R.load_published(PUBLISHED)
    assert [c.name for c in used] == ["Gao2025_12m"]
    every = {c.name: c for c in R.load_published(PUBLISHED, include_unused=True)}
    assert every["Gao2025_12m"].counts == (3, 0, 6) and every["Gao2025_12m"].n == 9
    assert every["ACR2024_6m"].counts == (2, 2, 4) and not every["ACR2024_6m"].use
    assert every["ACR2024_6m"].window == (180.0, 365.0) and every["Gao2025_12m"].window[0] == 365.0
    assert every["Gao2025_12m"].mix["DL4"] == pytest.approx(2 / 9)
    assert all(abs(sum(c.mix.values()) - 1) < 1e-12 for c in every.values())


def test_published_counts_bad_file(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[[count]]\nendpoint = "DORIS"\nday = 180.0\nresponders = 4\nn = 8\n')
    with pytest.raises(ValueError, match="no longer read"):
        R.load_published(bad)
    bad.write_text(
        "[[source]]\nnone = 1\nlldas_only = 0\ndoris = 2\nwindow = [365.0, 180.0]\nmix = {DL1 = 1}\n"
    )
    with pytest.raises(ValueError, match=r"source\[0\]\.window"):
        R.load_published(bad)


def test_published_counts_narrow_theta0():
    """Switching a published multinomial on, on a small synthetic cohort (30 patients, 2 visits):
    400 extra patients counted over none / LLDAS only / DORIS at days 180..365, the counts being
    the truth's expected counts for their virtual patients, narrow the 90% interval of theta0_doris
    and of theta0_lldas, which still cover the truth (one imputation; 1,000 draws: the width ratio is
    ~0.83, and with 300 draws its Monte Carlo error reached the 0.9 bound)."""
    rng = np.random.default_rng(21)
    da = _true_da(30, seed=9)
    oc = _outcomes(da, [180.0, 365.0], rng)
    pub_da = _true_da(20, seed=10)
    gh_x, gh_w = np.polynomial.hermite_e.hermegauss(21)
    eta = TRUTH["theta1"] * (pub_da[:, None] - CENTER) / SCALE + TRUTH["sigma_u"] * gh_x[None, :]
    w = gh_w / gh_w.sum() / pub_da.size
    p_l = float(np.sum(w / (1 + np.exp(-(TRUTH["theta0_lldas"] + eta)))))
    window = R.PublishedSource("synthetic", (0, 0, 1), (180.0, 365.0), {"A": 1.0}).days()
    # status at a day uniform over the window: the gap of each of the window's days, averaged
    p_d = float(
        np.mean([np.sum(w / (1 + np.exp(-(TRUTH["theta0_lldas"] - _true_gap(d) + eta)))) for d in window])
    )
    counts = np.round(400 * np.array([1 - p_l, p_l - p_d, p_d])).astype(int)
    src = R.PublishedSource("synthetic", tuple(int(c) for c in counts), (180.0, 365.0), {"A": 1.0})
    kw = dict(center=CENTER, scale=SCALE, draws=1000, tune=300, seed=4)
    ids = [str(i) for i in range(da.size)]
    off = R.sample_remission(da[:, None], oc, ids, **kw)
    on = R.sample_remission(
        da[:, None], oc, ids, published=[src], published_metrics={"A": pub_da[None, :]}, **kw
    )
    truth = {"theta0_lldas": TRUTH["theta0_lldas"], "theta0_doris": TRUTH["theta0_lldas"] - TRUTH["delta"]}
    for name, value in truth.items():
        q_off = np.quantile(off[name].values, [0.05, 0.95])
        q_on = np.quantile(on[name].values, [0.05, 0.95])
        assert q_on[1] - q_on[0] < 0.9 * (q_off[1] - q_off[0]), (name, q_off, q_on)
        assert q_on[0] <= value <= q_on[1], (name, q_on, value)


def test_regimen_doses():
    assert Regimen(2.0, 3.0, 3).doses() == [(0.0, 2.0), (3.0, 2.0), (6.0, 2.0)]
    assert Regimen(2.0, 3.0, 3).as_dict()["n_infusions"] == 3


def test_predict_remission_on_small_fit(small_fit):
    ds = R.predict_remission(small_fit, Regimen(2.0, 3.0, 3), visits=(180, 365), seed=0)
    assert ds["p_subject"].dims == ("subject", "endpoint", "day", "quantile")
    assert ds.sizes["subject"] == len(small_fit.cohort.subjects)
    assert ds["p_population"].dims == ("endpoint", "day", "quantile")
    for name in ("p_subject", "p_population", "p_individual"):
        q = ds[name].transpose(..., "quantile").values
        assert np.all(np.diff(q, axis=-1) >= 0) and np.all((q >= 0) & (q <= 1))
    assert np.all(ds["p_mean"].sel(endpoint="DORIS") <= ds["p_mean"].sel(endpoint="LLDAS"))
    stored = Path(small_fit.path) / "remission.nc"
    assert stored.exists()
    before = stored.stat().st_mtime_ns
    R.predict_remission(small_fit, Regimen(1.0, 7.0, 3), visits=(180,), seed=0)
    assert stored.stat().st_mtime_ns == before  # reused, not refitted


def test_cli_predict_writes_csv(small_fit, tmp_path):
    from carnk_pkpd.cli import app

    res = CliRunner().invoke(
        app, ["predict", str(small_fit.path), "--dose", "2.0", "--interval", "3", "--infusions", "3",
              "--visits", "180,365", "--out", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" in res.output
    df = pd.read_csv(tmp_path / "remission.csv", comment="#")
    assert list(df.columns[:8]) == [
        "endpoint",
        "day",
        "median",
        "q05",
        "q95",
        "dose",
        "interval",
        "n_infusions",
    ]
    assert len(df) == 4 and set(df["endpoint"]) == {"DORIS", "LLDAS"}
    assert np.all(df["q05"] <= df["median"]) and np.all(df["median"] <= df["q95"])


def test_cli_predict_bad_fit_folder(tmp_path):
    from carnk_pkpd.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(tmp_path / "missing"), "--dose", "2"])
    assert res.exit_code == 1 and "not a fit folder" in res.output  # a bad input, not a usage error
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format_version": 999}))
    res = runner.invoke(app, ["predict", str(bad), "--dose", "2", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "format_version" in res.output
    res = runner.invoke(app, ["predict", str(bad), "--visits", "abc"])
    assert res.exit_code == 2 and "--visits" in res.output


def test_concordance_check_counts_constant_and_reversing_patients():
    """Observed: patient a goes none → DORIS, patient b DORIS → DORIS → LLDAS only (a fall), patient c
    has one visit (not counted): never-changing share 0, falling share 0.5. A link that puts everyone
    in DORIS at every visit replicates shares 1 and 0, so both p-values are 0 and the line says FAIL."""
    import xarray as xr

    ids = ["a", "b", "c"]
    cd = ("chain", "draw")
    post = xr.Dataset(
        {
            "theta0_lldas": (cd, np.full((1, 4), 30.0)),
            "theta0_doris": (cd, np.full((1, 4), 30.0)),
            "theta1": (cd, np.zeros((1, 4))),
            "sigma_u": (cd, np.ones((1, 4))),
            "u": ((*cd, "subject"), np.zeros((1, 4, 3))),
            "v": ((*cd, "visit_day"), np.zeros((1, 4, 1))),
            "metric_draws": (("subject", "imp"), np.full((3, 1), 55.0)),
        },
        coords={
            "chain": [0],
            "draw": np.arange(4),
            "subject": ids,
            "visit_day": [180.0],
            "imputation": ("chain", [0]),
        },
        attrs={"metric": "DA", "center": 55.0, "scale": 15.0},
    )
    oc = pd.DataFrame(
        {
            "ID": ["a", "a", "b", "b", "b", "c"],
            "day": [90.0, 180.0, 90.0, 180.0, 365.0, 180.0],
            "DORIS": [0.0, 1.0, 1.0, 1.0, 0.0, 1.0],
            "LLDAS": [0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        }
    )
    tab = R.concordance_table(post.merge(R.concordance_check(post, oc, n_rep=4))).set_index("statistic")
    assert tab.loc["never_changes", "observed"] == 0.0 and tab.loc["reverses", "observed"] == 0.5
    assert (
        tab.loc["never_changes", "replicated_median"] == 1.0
        and tab.loc["reverses", "replicated_median"] == 0.0
    )
    assert (tab["p_value"] == 0.0).all()
    assert "FAIL" in R.concordance_line(post.merge(R.concordance_check(post, oc, n_rep=4)))


# --- the patient effect integrated out (stage 2 samples no u; u is drawn afterwards) -------------------


def _one_patient(seq: list[int]) -> dict[str, np.ndarray]:
    """Visit-category indicators for one patient's sequence (0 none, 1 LLDAS only, 2 DORIS)."""
    c = np.asarray(seq)
    return {
        "none": (c == 0).astype(float),
        "lldas_only": (c == 1).astype(float),
        "doris": (c == 2).astype(float),
        "lldas": np.zeros(c.size),
        "not_doris": np.zeros(c.size),
    }


@pytest.mark.parametrize("sigma_u", [0.5, 3.0, 9.0])
def test_marginal_likelihood_of_a_patient_equals_numerical_integration(sigma_u):
    """log ∫ N(u; 0, σ_u) Π_v p(y_v | u) du on the grid equals scipy's adaptive quadrature, also for a
    near-deterministic patient (five DORIS visits) with a wide patient-effect SD; the DORIS/LLDAS gap
    differs from visit to visit."""
    from scipy.integrate import quad

    a_l, eta = 0.4, np.array([-0.2, 0.1, 0.3, 0.0, 0.5])
    gap = np.array([3.0, 2.1, 1.3, 0.7, 0.2])
    for seq in ([2, 2, 2, 2, 2], [0, 1, 2, 1, 0], [0, 0, 0, 0, 0]):
        case = _one_patient(seq)

        def lik(u, seq=seq):
            ll = sum(
                R._case_loglik(
                    ("none", "lldas_only", "doris")[cat], a_l + e + u, a_l - g + e + u, g,
                    R._np_log1pexp, R._np_log1mexp,
                )
                for cat, e, g in zip(seq, eta, gap, strict=True)
            )  # fmt: skip
            return np.exp(ll) * np.exp(-0.5 * (u / sigma_u) ** 2) / (sigma_u * np.sqrt(2 * np.pi))

        exact = quad(lik, -60 * sigma_u, 60 * sigma_u, points=[0.0], limit=400, epsabs=0, epsrel=1e-12)[0]
        x, w = R.normal_quadrature()
        ll = R._subject_node_loglik(
            (a_l + eta)[:, None] + sigma_u * x[None, :],
            (a_l - gap + eta)[:, None] + sigma_u * x[None, :],
            gap[:, None],
            np.zeros(len(seq), int),
            case,
            1,
            tensor=False,
        )[0]
        assert np.log(np.sum(w * np.exp(ll))) == pytest.approx(np.log(exact), abs=1e-5)


def test_patient_effects_are_drawn_from_their_conditional_posterior():
    """With θ fixed in every draw, the drawn u of a patient has the mean and SD of p(u | θ, y), computed
    by scipy's quadrature (Monte Carlo tolerance: 4 standard errors of 4,000 draws)."""
    from scipy.integrate import quad

    nd = 4000
    theta = dict(theta0_lldas=0.4, delta=1.3, gamma_delta=-1.2, theta1=0.8, sigma_u=2.5)
    grid = np.array([90.0, 180.0, 365.0])
    xr_post = xr.Dataset(
        {
            **{k: (("chain", "draw"), np.full((1, nd), v)) for k, v in theta.items()},
            "theta0_doris": (("chain", "draw"), np.full((1, nd), theta["theta0_lldas"] - theta["delta"])),
            "v": (("chain", "draw", "visit_day"), np.tile([-0.5, 0.0, 0.3], (1, nd, 1))),
        },
        coords={"chain": [0], "draw": np.arange(nd), "visit_day": grid},
    )
    z = np.array([0.5, -1.0])
    seqs = [[2, 2, 2], [0, 1, 0]]
    sidx = np.repeat([0, 1], 3)
    didx = np.tile([0, 1, 2], 2)
    case = {k: np.concatenate([_one_patient(s)[k] for s in seqs]) for k in _one_patient([0])}
    u = R._conditional_patient_effects(xr_post, z, sidx, didx, case, 2, np.random.default_rng(1))
    assert u.shape == (1, nd, 2)
    v = np.array([-0.5, 0.0, 0.3])
    gap = theta["delta"] * (grid / 180.0) ** theta["gamma_delta"]  # 2.99, 1.3, 0.55
    for i, seq in enumerate(seqs):
        eta = theta["theta1"] * z[i] + v

        def dens(uu, seq=seq, eta=eta):
            ll = sum(
                R._case_loglik(
                    ("none", "lldas_only", "doris")[cat],
                    theta["theta0_lldas"] + e + uu,
                    theta["theta0_lldas"] - g + e + uu,
                    g,
                    R._np_log1pexp,
                    R._np_log1mexp,
                )
                for cat, e, g in zip(seq, eta, gap, strict=True)
            )
            return np.exp(ll - 0.5 * (uu / theta["sigma_u"]) ** 2)

        lim = 20 * theta["sigma_u"]
        z0 = quad(dens, -lim, lim, limit=200)[0]
        m1 = quad(lambda t: t * dens(t), -lim, lim, limit=200)[0] / z0
        m2 = quad(lambda t: t * t * dens(t), -lim, lim, limit=200)[0] / z0
        sd = np.sqrt(m2 - m1**2)
        got = u[0, :, i]
        assert abs(got.mean() - m1) < 4 * sd / np.sqrt(nd)
        assert abs(got.std() - sd) < 4 * sd / np.sqrt(2 * nd)


def test_sampled_model_and_u_draws_use_the_same_patient_sums():
    """The PyTensor scatter-add (in the sampled model) equals the numpy one (in the draws of u), with
    several visits per patient and every visit category."""
    import pytensor
    import pytensor.tensor as pt

    rng = np.random.default_rng(0)
    nv, nq, ns = 30, 161, 7
    sidx = rng.integers(0, ns, nv)
    cats = rng.integers(0, 5, nv)
    case = {
        k: (cats == i).astype(float)
        for i, k in enumerate(["none", "lldas_only", "doris", "lldas", "not_doris"])
    }
    xl = rng.normal(size=(nv, nq))
    gap = rng.uniform(0.1, 3.0, size=(nv, 1))  # each visit its own DORIS/LLDAS gap
    a, b, g = pt.matrix("a"), pt.matrix("b"), pt.col("g")
    f = pytensor.function([a, b, g], R._subject_node_loglik(a, b, g, sidx, case, ns, tensor=True))
    np.testing.assert_allclose(
        f(xl, xl - gap, gap),
        R._subject_node_loglik(xl, xl - gap, gap, sidx, case, ns, tensor=False),
        atol=1e-12,
    )
