"""Dose search (carnk_pkpd.doses): grids, determinism on Dask, the ranking table, plots and the CLI.

Uses the session fixture ``small_fit`` (a short fit of the SYNTHETIC example cohort) and tiny numbers
of draws and patients; regimens, draws and patients are shared so JAX compiles few shapes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from carnk_pkpd.doses import (
    GridError,
    default_grid,
    load_grid,
    patient_metrics,
    quantile_mcse,
    rank_regimens,
    ranking_table,
    tie_statement,
    write_results,
)
from carnk_pkpd.regimen import Regimen
from carnk_pkpd.remission import assumed_link

REGIMENS = [Regimen(0.5, 7.0, 3), Regimen(1.0, 7.0, 3), Regimen(3.0, 3.0, 3), Regimen(3.0, 3.0, 3, 0.0)]
N_DRAWS, N_PATIENTS = 6, 4


@pytest.fixture(scope="module")
def ranked(small_fit):
    link = assumed_link(small_fit.spec)
    return rank_regimens(small_fit, REGIMENS, n_draws=N_DRAWS, n_patients=N_PATIENTS, seed=5, remission=link)


def test_default_grid_contains_trial_dose_levels(small_fit):
    grid = default_grid(small_fit.spec)
    assert len(grid) >= 12
    assert len(set(grid)) == len(grid)
    for dl in small_fit.spec.dose_levels.values():
        assert Regimen(dl.dose, dl.interval, dl.n_infusions) in grid
    assert any(r.ld_scale == 0.0 for r in grid)


def _cluster_run(fit, n_workers: int, seed: int):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=False, dashboard_address=None
    ) as c:
        with Client(c) as client:
            return rank_regimens(
                fit,
                REGIMENS,
                n_draws=N_DRAWS,
                n_patients=N_PATIENTS,
                seed=seed,
                client=client,
                remission=assumed_link(fit.spec),
            )


def test_same_seed_same_results_with_1_and_2_workers(small_fit, ranked):
    one = _cluster_run(small_fit, 1, 5)
    two = _cluster_run(small_fit, 2, 5)
    for name in ("p_doris_12m", "pta_da", "cmax_median", "recon_day_median", "utility", "b_traj"):
        np.testing.assert_array_equal(one[name].values, two[name].values)
        np.testing.assert_array_equal(one[name].values, ranked[name].values)  # and without Dask
    np.testing.assert_array_equal(one["p_best"].values, two["p_best"].values)


def test_different_seed_differs(small_fit, ranked):
    other = rank_regimens(
        small_fit,
        REGIMENS,
        n_draws=N_DRAWS,
        n_patients=N_PATIENTS,
        seed=6,
        remission=assumed_link(small_fit.spec),
    )
    assert not np.array_equal(other["cmax_median"].values, ranked["cmax_median"].values)


def test_dataset_shape_and_probabilities(ranked):
    assert ranked["p_doris_12m"].dims == ("regimen", "draw")
    assert ranked.sizes["regimen"] == len(REGIMENS) and ranked.sizes["draw"] == N_DRAWS
    assert ranked["p_best"].sum().item() == pytest.approx(1.0)
    for name in ("p_doris_6m", "p_doris_12m", "p_lldas_12m", "pta_da", "pta_depleted_d14", "p_cmax_high"):
        v = ranked[name].values
        assert np.all((v >= 0) & (v <= 1)), name
    assert "U = " in ranked.attrs["utility"] and "ASSUMED" in ranked.attrs["remission_source"]


def test_ranking_table_columns_and_ordered_quantiles(ranked):
    df = ranking_table(ranked)
    assert list(df["rank"]) == list(range(1, len(REGIMENS) + 1))
    for col in ("regimen", "dose", "interval", "n_infusions", "ld_scale", "total_cells", "p_best", "utility"):
        assert col in df.columns
    for name in (
        "p_doris_6m",
        "p_doris_12m",
        "p_lldas_6m",
        "p_lldas_12m",
        "pta_da",
        "pta_depleted_d14",
        "cmax_median",
        "recon_day_median",
    ):
        q05, med, q95 = df[f"{name}_q05"], df[f"{name}_median"], df[f"{name}_q95"]
        assert np.all(q05 <= med) and np.all(med <= q95), name
    assert df["utility"].is_monotonic_decreasing
    assert df["p_best"].sum() == pytest.approx(1.0)


def test_median_mcse_matches_the_spread_of_medians_over_repeated_samples():
    # the order-statistic MCSE of a median against the SD of medians of 2000 independent samples
    rng = np.random.default_rng(3)
    x = rng.beta(4, 6, size=(2000, 200))
    truth = np.median(x, axis=1).std(ddof=1)
    est = np.mean([quantile_mcse(row, 0.5) for row in x[:200]])
    assert est == pytest.approx(truth, rel=0.15)


def test_ranking_reports_monte_carlo_error_and_ties(ranked):
    df = ranking_table(ranked)
    n = ranked.sizes["draw"]
    np.testing.assert_allclose(df["p_best_mcse"], np.sqrt(df["p_best"] * (1 - df["p_best"]) / n))
    for _, row in df.iterrows():
        u = ranked["utility"].sel(regimen=ranked["label"] == row["regimen"]).values.ravel()
        assert row["utility_mcse"] == pytest.approx(np.std(u, ddof=1) / np.sqrt(n))
        assert row["p_doris_12m_median_mcse"] >= 0.0
    assert bool(df["tied_with_top"].iloc[0])  # the top regimen is tied with itself
    top = ranked["utility"].sel(regimen=ranked["label"] == df["regimen"].iloc[0]).values.ravel()
    for _, row in df.iloc[1:].iterrows():
        u = ranked["utility"].sel(regimen=ranked["label"] == row["regimen"]).values.ravel()
        assert bool(row["tied_with_top"]) == bool(np.quantile(top - u, 0.05) <= 0.0)
    statement = tie_statement(df)
    assert (statement != "") == (int(df["tied_with_top"].sum()) >= 2)


def test_tie_statement_names_the_indistinguishable_regimens():
    table = pd.DataFrame({"regimen": ["A", "B", "C"], "tied_with_top": [True, True, False]})
    text = tie_statement(table)
    assert "top 2 regimens cannot be told apart (A, B)" in text
    assert tie_statement(table.assign(tied_with_top=[True, False, False])) == ""


def test_more_cells_deplete_at_least_as_deeply(ranked):
    # same posterior draws and virtual patients for every regimen (common random numbers)
    nadir = ranked["b_nadir_median"].values
    cmax = ranked["cmax_median"].values
    assert np.median(nadir[1]) <= np.median(nadir[0])  # 3 x 1e9 vs 3 x 0.5e9, both q7d
    assert np.all(cmax[1] >= cmax[0])
    assert np.median(ranked["da_median"].values[2]) >= np.median(ranked["da_median"].values[0])


def test_write_results_writes_plots_and_csv(ranked, tmp_path):
    dest = write_results(ranked, tmp_path / "out")
    for name in ("ranking.csv", "remission_vs_dose.png", "trajectories.png", "about.txt", "doses.nc"):
        assert (dest / name).stat().st_size > 0, name
    assert (dest / "remission_vs_dose.png").read_bytes()[:4] == b"\x89PNG"
    assert "SYNTHETIC" in (dest / "about.txt").read_text(encoding="utf-8")
    df = pd.read_csv(dest / "ranking.csv", comment="#")
    assert len(df) == len(REGIMENS)


def test_grid_text_and_yaml(tmp_path):
    assert load_grid("1:7:3, 2:3:3:0.5") == [Regimen(1.0, 7.0, 3), Regimen(2.0, 3.0, 3, 0.5)]
    f = tmp_path / "g.yaml"
    f.write_text(
        "regimens:\n  - {dose: 1, interval: 7, n_infusions: 3}\n"
        "grid: {dose: [1, 2], interval: 3, n_infusions: [2, 3], ld_scale: [1, 0]}\n",
        encoding="utf-8",
    )
    regs = load_grid(f)
    assert len(regs) == 1 + 2 * 2 * 2
    assert Regimen(2.0, 3.0, 2, 0.0) in regs


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("regimens:\n  - {dose: 1, interval: 7}\n", "regimens[0].n_infusions"),
        ("regimens:\n  - {dose: 1, interval: 7, n_infusions: 3, dosis: 2}\n", "regimens[0].dosis"),
        ("regimens:\n  - {dose: one, interval: 7, n_infusions: 3}\n", "regimens[0].dose"),
        ("regimes: []\n", "regimes"),
    ],
)
def test_bad_grid_names_file_and_key(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(GridError) as e:
        load_grid(f)
    assert str(f) in str(e.value) and key in str(e.value)


def test_cli_writes_atomically(small_fit, tmp_path):
    from typer.testing import CliRunner

    from carnk_pkpd.cli import app

    out = tmp_path / "doses" / "small"
    args = [
        "doses",
        str(small_fit.path),
        "--out",
        str(out),
        "--grid",
        "0.5:7:3,1:7:3,3:3:3,3:3:3:0",
        "--draws",
        str(N_DRAWS),
        "--patients",
        str(N_PATIENTS),
        "--seed",
        "5",
        "--workers",
        "1",
    ]
    res = CliRunner().invoke(app, [*args, "--assumed-link"])
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" in res.output and "ASSUMED" in res.output
    df = pd.read_csv(out / "ranking.csv", comment="#")
    assert set(df["regimen"]) == {"3x0.5e9 q7d", "3x1e9 q7d", "3x3e9 q3d", "3x3e9 q3d noLD"}
    # a second run replaces the folder; no temporary folder is left behind
    res = CliRunner().invoke(app, [*args[:-2], "--workers", "0", "--assumed-link"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["small"]
    assert pd.read_csv(out / "ranking.csv", comment="#").equals(df)


def test_cli_bad_grid_exits_1(small_fit, tmp_path):
    from typer.testing import CliRunner

    from carnk_pkpd.cli import app

    bad = tmp_path / "grid.yaml"
    bad.write_text("regimens:\n  - {dose: 1, interval: -7, n_infusions: 3}\n", encoding="utf-8")
    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["doses", str(small_fit.path), "--grid", str(bad), "--out", str(out)])
    assert res.exit_code == 1
    assert str(bad) in res.output and "regimens[0].interval" in res.output
    assert not out.exists()


# --- per-patient metrics: the one implementation -------------------------------------------------------
def _bsv_params(spec, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` patients with the model file's log-normal BSV around its typical values."""
    rng = np.random.default_rng(seed)
    return {
        name: p.typical * np.exp(p.bsv_sd * rng.standard_normal(n))
        for name, p in spec.parameters.items()
        if name != "n_transit" and p.bsv_sd
    }


def _reference_metrics(spec, params, regimen):
    """``derived_metrics`` (default solver accuracy, B every 0.25 d, CAR-NK every 0.01 d)."""
    from carnk_pkpd.structural import derived_metrics

    ev = spec.events
    return derived_metrics(
        params,
        regimen.doses(),
        spec,
        reappearance_threshold=ev["reappearance_threshold"],
        reconstitution_threshold=ev["reconstitution_threshold"],
        aplasia_threshold=ev["aplasia_threshold"],
        aplasia_window=tuple(ev["aplasia_window"]),
        ld=regimen.ld_scale,
    )


@pytest.mark.parametrize("regimen", [Regimen(2.0, 3.0, 3), Regimen(0.5, 7.0, 3), Regimen(3.0, 3.0, 3, 0.0)])
def test_search_metrics_equal_derived_metrics(regimen):
    """The dose search's per-patient metrics are derived_metrics' for the same parameters (and LD
    intensity, 0 = no LD), within the output grid's resolution: days within 0.25 d (crossings; Tmax on a 0.25-d CAR-NK grid), Cmax and AUC
    within 0.5%, nadir within the solver tolerance; "never happens" is NaN in both."""
    from carnk_pkpd.spec import load_model
    from carnk_pkpd.structural.metrics import UNITS

    spec = load_model("reference")
    params = _bsv_params(spec, 60, seed=3)
    got = patient_metrics(params, regimen, spec)
    ref = _reference_metrics(spec, params, regimen)
    assert set(got) == set(UNITS) == set(ref.data_vars)
    for name in UNITS:
        a, b = np.asarray(got[name]), ref[name].values
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        a, b = a[~np.isnan(b)], b[~np.isnan(b)]
        if name in ("DA", "reappearance_day", "reconstitution_day", "car_tmax"):
            np.testing.assert_allclose(a, b, atol=0.25, rtol=0, err_msg=name)
        elif name in ("car_cmax", "car_auc_0_28"):
            np.testing.assert_allclose(a, b, rtol=5e-3, err_msg=name)
        elif name == "b_nadir":
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3, err_msg=name)
    # the nadir day is ill-conditioned (B flat near 1e-6 cells/µL): check B there is the nadir instead
    from carnk_pkpd.structural import simulate

    t = np.arange(0.0, 365.001, 0.25)
    b = simulate(params, regimen.doses(), t, spec, ld=regimen.ld_scale)["bcell"].values
    at = np.array([np.interp(d, t, np.log(row)) for d, row in zip(got["b_nadir_day"], b, strict=True)])
    np.testing.assert_allclose(np.exp(at), ref["b_nadir"].values, rtol=0.5, atol=1e-3)


def test_no_ld_regimen_has_no_ld_kill():
    # the search's own solve (patient_metrics is _simulate, as in rank_regimens)
    """ld_scale 0 and no cells: nothing kills B, which stays at B0; with LD (ld_scale 1) it falls."""
    from carnk_pkpd.spec import load_model

    spec = load_model("reference")
    params = _bsv_params(spec, 8, seed=1)
    b0 = params.get("B0", np.full(8, spec.parameters["B0"].typical))
    none = patient_metrics(params, Regimen(0.0, 7.0, 1, ld_scale=0.0), spec)
    np.testing.assert_allclose(none["b_nadir"], b0, rtol=1e-6)  # steady state, to round-off
    assert np.all(none["DA"] == 0.0) and np.all(np.isnan(none["reconstitution_day"]))
    with_ld = patient_metrics(params, Regimen(0.0, 7.0, 1, ld_scale=1.0), spec)
    assert np.all(with_ld["b_nadir"] < 0.9 * b0)


def test_unknown_link_metric_is_an_error(small_fit):
    link = assumed_link(small_fit.spec)
    link.attrs["metric"] = "car_auc_0_14"
    with pytest.raises(ValueError, match="car_auc_0_14"):
        rank_regimens(small_fit, REGIMENS[:1], n_draws=2, n_patients=2, seed=0, remission=link)


def test_return_day_matches_a_per_subject_loop():
    """return_day (vectorised) against a plain per-subject reading of its definition."""
    from carnk_pkpd.structural.metrics import return_day

    rng = np.random.default_rng(0)
    t = np.concatenate([[0.0], np.sort(rng.uniform(0.0, 100.0, 39))])
    b = np.exp(rng.normal(1.0, 2.0, (500, 40)))
    b[:5] = 50.0  # never below: NaN
    for thr in (0.1, 1.0, 10.0):
        got = return_day(t, b, thr)
        for s in range(b.shape[0]):
            below = np.flatnonzero(b[s] < thr)
            back = [j for j in range(below[0] + 1, t.size) if b[s, j] >= thr] if below.size else []
            if not back:
                assert np.isnan(got[s])
                continue
            j = back[0]
            lb0, lb1 = np.log(b[s, j - 1]), np.log(b[s, j])
            expect = t[j - 1] + (np.log(thr) - lb0) / (lb1 - lb0) * (t[j] - t[j - 1])
            assert got[s] == pytest.approx(expect, abs=1e-9)


def test_predict_and_doses_give_the_same_p_doris(small_fit):
    """Same fit, seed and regimen: ``predict_remission`` and ``rank_regimens`` use the same fitted link,
    the same posterior draws and link draws (chosen from the seed), and new patients from the same
    population layer, so their P(DORIS at 180 d) agree within Monte Carlo error: the mean over draws
    (predict's ``p_mean``) and the median across draws of the population probability, each within 4
    standard errors of the difference of two independent estimates (an upper bound here: only the
    virtual patients differ)."""
    from carnk_pkpd.remission import predict_remission

    reg, n_draws, n_patients = Regimen(2.0, 3.0, 3), 40, 10
    pred = predict_remission(small_fit, reg, visits=(180.0,), n_patients=n_patients, seed=0, n_draws=n_draws)
    ranked = rank_regimens(small_fit, [reg], n_draws=n_draws, n_patients=n_patients, seed=0)
    assert pred.attrs["source"] == ranked.attrs["remission_source"]
    assert "ASSUMED" not in ranked.attrs["remission_source"]
    p_doses = ranked["p_doris_6m"].values[0]
    sd = p_doses.std(ddof=1)
    se_mean = np.sqrt(2.0) * sd / np.sqrt(n_draws)
    se_median = 1.2533 * se_mean  # SE of a median ~ 1.2533 x SE of a mean (normal approximation)
    p_mean = float(pred["p_mean"].sel(endpoint="DORIS", day=180.0))
    p_median = float(pred["p_population"].sel(endpoint="DORIS", day=180.0, quantile=0.5))
    assert abs(p_doses.mean() - p_mean) < 4.0 * se_mean, (p_doses.mean(), p_mean, se_mean)
    assert abs(np.median(p_doses) - p_median) < 4.0 * se_median, (np.median(p_doses), p_median, se_median)


def _with_dose_effect(tmp_path, beta: float):
    """The reference model plus a power effect of DOSE on f_bl with β at ``beta`` (prior mean)."""
    from carnk_pkpd.spec import load_model

    base = load_model("reference")
    text = base.text + (
        '\n[[covariates]]\nparameter = "f_bl"\ncovariate = "DOSE"\nform = "power"\ncenter = 2.0\n'
        f'prior = {{ dist = "Normal", mu = {beta}, sigma = 0.5 }}\n'
    )
    path = tmp_path / f"dose_effect_{beta:g}.toml"
    path.write_text(text, encoding="utf-8")
    return load_model(path)


def test_dose_power_effect_scales_the_parameter_in_the_search(tmp_path):
    """f_bl_i = f_bl·(DOSE/2)^β·exp(η): Cmax is proportional to f_bl·dose, so with the same virtual
    patients (same seed) each patient's Cmax, and hence the per-draw median, is multiplied by
    (dose/2)^β against β = 0, and by (d2/d1)^(1+β) between two doses."""
    from carnk_pkpd.population import PopulationDraws

    beta = 0.6
    regs = [Regimen(1.0, 7.0, 3), Regimen(4.0, 7.0, 3)]
    out = {}
    for b in (0.0, beta):
        spec = _with_dose_effect(tmp_path, b)
        pop = PopulationDraws.from_model(spec, n_draws=3, seed=0)
        out[b] = rank_regimens(pop, regs, n_draws=3, n_patients=8, seed=4, remission=assumed_link(spec))
    c0, c1 = out[0.0]["cmax_median"].values, out[beta]["cmax_median"].values
    for i, r in enumerate(regs):
        np.testing.assert_allclose(c1[i] / c0[i], (r.dose / 2.0) ** beta, rtol=1e-9)
    np.testing.assert_allclose(c1[1] / c1[0], 4.0 ** (1.0 + beta), rtol=1e-9)
