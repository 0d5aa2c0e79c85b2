"""VPC / pcVPC and NPDE on data simulated from known parameters (no fit).

The design is six subjects of the embedded SYNTHETIC reference cohort (their own infusions, LD
windows, sampling times and LLOQs). Population = the reference model's typical values, so every
population draw is an independent set of new subjects: K draws are the replicates and M further draws
serve as M independent "observed" cohorts (censored at the LLOQ like the assay), which gives enough
observations for the N(0, 1) tolerances at a fraction of the cost of K × M simulations.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import xarray as xr

K = 300  # replicates: variance inflation of the estimated decorrelation ≈ K/(K − n_i) ≈ 1.05 here
M = 40  # observed cohorts of 6 subjects: ≈ 3200 records per DVID; the variance of one cohort's
# NPDE varies 0.5–1.5 (6 correlated subjects), so the pooled variance has an SE of ≈ 0.05
SUBJECTS = 6


@pytest.fixture(scope="module")
def world():
    from carnk_pkpd.data import Cohort, embedded_cohort_path, read_cohort
    from carnk_pkpd.evaluation import population_prediction
    from carnk_pkpd.population import PopulationDraws, simulate_population
    from carnk_pkpd.spec import load_model

    full = read_cohort(embedded_cohort_path("reference"))
    keep = [full.ids[i] for i in np.linspace(0, len(full.ids) - 1, SUBJECTS).astype(int)]
    df = full.to_dataframe()
    cohort = Cohort.from_dataframe(df[df["ID"].astype(str).isin(keep)].reset_index(drop=True))
    spec = load_model("reference")
    pop = PopulationDraws.from_model(spec, K + M, seed=0)
    sim = simulate_population(pop, cohort, seed=5, times=[0.0], metrics=False)
    wrong = pop.take(np.arange(M))
    wrong = replace(wrong, typical={**wrong.typical, "k_rej": wrong.typical["k_rej"] * 3.0})
    sim_wrong = simulate_population(wrong, cohort, seed=6, times=[0.0], metrics=False)
    pred = population_prediction(spec, cohort)
    return dict(cohort=cohort, spec=spec, sim=sim, sim_wrong=sim_wrong, pred=pred)


def _observed(world, source: xr.Dataset, m: int):
    """Replicates (draws M..) with draw m of ``source`` as the observed data, censored at the LLOQ."""
    from carnk_pkpd.evaluation import replicates_dataset

    lloq = world["sim"]["LLOQ"].values
    y = source["y"].values[m]
    blq = y < lloq
    return replicates_dataset(
        world["sim"].isel(draw=slice(M, None)),
        world["pred"],
        log_dvids=[1],
        dv=np.where(blq, lloq, y),
        blq=blq,
    )


def _pooled_npde(world, source: xr.Dataset) -> pd.DataFrame:
    from carnk_pkpd.evaluation import npde, npde_tests

    df = pd.concat([npde(_observed(world, source, m), seed=m) for m in range(M)])
    return npde_tests(df).set_index("DVID")


def test_npde_of_the_model_itself_is_standard_normal(world):
    tests = _pooled_npde(world, world["sim"])
    print(tests.to_string())
    for dvid in (1, 2):
        assert abs(tests.loc[dvid, "mean"]) <= 0.15, tests
        assert 0.8 <= tests.loc[dvid, "variance"] <= 1.25, tests


def test_npde_flags_a_threefold_rejection_rate(world):
    """Observations from k_rej × 3 (CAR-NK cleared faster) against replicates of the reference model:
    the CAR-NK NPDE leave N(0, 1) (negative mean: observed below the predictions)."""
    tests = _pooled_npde(world, world["sim_wrong"])
    print(tests.to_string())
    t = tests.loc[1]
    assert t["mean"] < -0.15 or not (0.8 <= t["variance"] <= 1.25), tests
    assert t["global_p"] < 1e-3, tests


def _correlated_records(
    rng: np.random.Generator, k: int, n_sub: int, chol: np.ndarray, mean: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` replicates ``(k, n_sub * n_rec)`` and one observed set ``(n_sub * n_rec,)`` of Gaussian
    records with within-subject covariance ``chol @ chol.T`` and mean ``mean`` (replicates drawn first)."""
    n_rec = chol.shape[0]
    sims = (rng.standard_normal((k, n_sub, n_rec)) @ chol.T + mean).reshape(k, -1)
    obs = (rng.standard_normal((n_sub, n_rec)) @ chol.T + mean).reshape(-1)
    return sims, obs


def test_decorrelation_removes_within_subject_correlation():
    """Gaussian records with within-subject correlation 0.9: pd (undecorrelated) of consecutive records
    are strongly correlated, NPDE are not, and both are uniform / standard normal."""
    from carnk_pkpd.evaluation import npde

    rng = np.random.default_rng(3)
    n_sub, n_rec, k = 150, 5, 400
    cov = 0.9 + 0.1 * np.eye(n_rec)
    chol = np.linalg.cholesky(cov)
    sims, obs = _correlated_records(rng, k, n_sub, chol, 50.0)
    reps = xr.Dataset(
        {"y": (("replicate", "record"), sims), "blq": (("replicate", "record"), np.zeros_like(sims, bool))},
        coords={
            "ID": ("record", np.repeat(np.arange(n_sub), n_rec).astype(str)),
            "TIME": ("record", np.tile(np.arange(n_rec, dtype=float), n_sub)),
            "DVID": ("record", np.full(n_sub * n_rec, 2)),
            "DV": ("record", obs),
            "BLQ": ("record", np.zeros(n_sub * n_rec, int)),
            "LLOQ": ("record", np.zeros(n_sub * n_rec)),
            "PRED": ("record", np.full(n_sub * n_rec, 50.0)),
        },
        attrs={"log_dvids": []},
    )
    df = npde(reps)
    pd_ = df["pd"].to_numpy().reshape(n_sub, n_rec)
    z = df["npde"].to_numpy().reshape(n_sub, n_rec)
    assert np.corrcoef(pd_[:, 0], pd_[:, 1])[0, 1] > 0.7
    assert abs(np.corrcoef(z[:, 2], z[:, 3])[0, 1]) < 0.2
    assert abs(z.mean()) < 0.15 and 0.8 < z.var() < 1.25


def _coverage(tab: pd.DataFrame, tag: str) -> np.ndarray:
    """Observed percentile inside the replicates' 90% interval; NaN = below the LLOQ (lowest rank)."""
    obs, lo, hi = (tab[c].to_numpy() for c in (f"obs_{tag}", f"sim_{tag}_lo", f"sim_{tag}_hi"))
    low = -np.inf
    obs, lo, hi = (np.where(np.isnan(v), low, v) for v in (obs, lo, hi))
    return (obs >= lo) & (obs <= hi)


def test_vpc_bands_cover_the_observed_percentiles(world):
    """Well-specified model: the 90% bands hold the observed 5/50/95th percentiles and BLQ fraction in
    most bins (each should be inside ~90% of the time; bins with ≥ 5 records)."""
    from carnk_pkpd.evaluation import vpc_table

    def coverage(source: xr.Dataset, dvid: int) -> tuple[float, float]:
        inside, blq_inside = [], []
        for m in range(4):
            tab = vpc_table(_observed(world, source, m))
            tab = tab[(tab["n"] >= 5) & (tab["DVID"] == dvid)]
            inside += [_coverage(tab, t) for t in ("p05", "p50", "p95")]
            blq_inside.append((tab["blq_obs"] >= tab["blq_sim_lo"]) & (tab["blq_obs"] <= tab["blq_sim_hi"]))
        return float(np.concatenate(inside).mean()), float(np.concatenate(blq_inside).mean())

    for dvid in (1, 2):
        cover, blq_cover = coverage(world["sim"], dvid)
        print(f"DVID {dvid}: percentile coverage {cover:.2f}, BLQ-fraction coverage {blq_cover:.2f}")
        assert cover >= 0.8
        assert blq_cover >= 0.8
    # k_rej x 3: CAR-NK falls faster than the bands say, so the observed median lies below the
    # replicates' median in (nearly) every bin after the expansion (NaN = below the LLOQ = lowest)
    wrong, wrong_blq = coverage(world["sim_wrong"], 1)
    below = []
    for source in (world["sim"], world["sim_wrong"]):
        frac = []
        for m in range(4):
            tab = vpc_table(_observed(world, source, m))
            tab = tab[(tab["DVID"] == 1) & (tab["n"] >= 5) & (tab["bin"] >= 7) & tab["sim_p50_mid"].notna()]
            frac.append(np.mean(tab["obs_p50"].fillna(-np.inf) < tab["sim_p50_mid"]))
        below.append(float(np.mean(frac)))
    print(f"k_rej x 3, DVID 1: coverage {wrong:.2f}, BLQ {wrong_blq:.2f}; median below: {below}")
    assert below[1] >= 0.9 and below[1] - below[0] >= 0.2


def test_prediction_correction_follows_bergstrand():
    """pcY = Y·PRED_bin/PRED, PRED_bin the bin's median PRED: two records in one bin with PRED 1 and 4
    (median 2.5) and DV equal to their PRED both become 2.5."""
    from carnk_pkpd.evaluation import vpc_table

    y = np.array([[1.0, 4.0], [2.0, 8.0], [0.5, 2.0]])
    reps = xr.Dataset(
        {"y": (("replicate", "record"), y), "blq": (("replicate", "record"), np.zeros_like(y, bool))},
        coords={
            "ID": ("record", ["a", "b"]),
            "TIME": ("record", [7.0, 7.1]),
            "DVID": ("record", [2, 2]),
            "DV": ("record", [1.0, 4.0]),
            "BLQ": ("record", [0, 0]),
            "LLOQ": ("record", [0.1, 0.1]),
            "PRED": ("record", [1.0, 4.0]),
            "DL": ("record", ["1", "1"]),
        },
        attrs={"log_dvids": [1]},
    )
    plain = vpc_table(reps).iloc[0]
    pc = vpc_table(reps, pc=True).iloc[0]
    assert plain["bin"] == 7.0 and plain["n"] == 2
    assert plain["obs_p50"] == pytest.approx(2.5)  # median of 1 and 4
    assert pc["obs_p05"] == pytest.approx(2.5) and pc["obs_p95"] == pytest.approx(2.5)
    assert pc["sim_p50_mid"] == pytest.approx(2.5)  # replicates: 2.5, 5, 1.25 (all records equal)


def test_blq_records_are_ranked_below_the_lloq_not_dropped():
    """Three of four records BLQ (LLOQ 1) and one at 9: the median falls among the censored values
    (NaN, below LLOQ); the 95th percentile interpolates from the LLOQ: 1 + 0.85·(9 − 1) = 7.8."""
    from carnk_pkpd.evaluation import vpc_table

    y = np.tile([0.05, 0.05, 0.05, 9.0], (2, 1))
    reps = xr.Dataset(
        {"y": (("replicate", "record"), y), "blq": (("replicate", "record"), y < 1.0)},
        coords={
            "ID": ("record", list("abcd")),
            "TIME": ("record", [28.0] * 4),
            "DVID": ("record", [2] * 4),
            "DV": ("record", [1.0, 1.0, 1.0, 9.0]),
            "BLQ": ("record", [1, 1, 1, 0]),
            "LLOQ": ("record", [1.0] * 4),
            "PRED": ("record", [1.0] * 4),
            "DL": ("record", ["1"] * 4),
        },
    )
    row = vpc_table(reps).iloc[0]
    assert np.isnan(row["obs_p50"]) and row["obs_p95"] == pytest.approx(7.8)
    assert row["blq_obs"] == 0.75 and row["blq_sim_mid"] == 0.75


def test_simulate_replicates_uses_the_observed_design(world):
    from carnk_pkpd.evaluation import simulate_replicates

    reps = simulate_replicates(world["spec"], 3, seed=1, cohort=world["cohort"])
    assert reps.sizes["replicate"] == 3
    np.testing.assert_array_equal(reps["DV"].values, world["sim"]["DV"].values)
    np.testing.assert_array_equal(reps["blq"].values, reps["y"].values < reps["LLOQ"].values[None, :])
    assert reps.attrs["log_dvids"] == [1, 3]
    assert np.all(np.isfinite(reps["PRED"].values)) and set(reps["DL"].values) <= set(
        world["cohort"].dose_levels
    )


def test_vpc_command_writes_its_files_and_refuses_a_file_as_folder(small_fit, tmp_path):
    """``carnk-pkpd vpc`` on the short fit (few replicates: a smoke test of the wiring, not of NPDE)."""
    from typer.testing import CliRunner

    from carnk_pkpd.cli import app

    runner = CliRunner()
    out = tmp_path / "vpc"
    res = runner.invoke(app, ["vpc", str(small_fit.path), "--out", str(out), "--replicates", "20", "--pc"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} >= {
        "vpc.csv",
        "vpc.png",
        "npde.csv",
        "npde_tests.csv",
        "npde.png",
    }
    assert "SYNTHETIC" in res.output and "variance" in res.output
    table = pd.read_csv(out / "vpc.csv", comment="#")
    assert {"obs_p50", "sim_p50_lo", "sim_p50_hi", "blq_obs", "blq_sim_hi"} <= set(table.columns)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = runner.invoke(app, ["vpc", str(small_fit.path), "--out", str(blocker), "--replicates", "2"])
    assert res.exit_code == 1 and "not a folder" in res.output


def test_vpc_strata_follow_the_dose_level():
    """--by-dose-level: one set of bins per dose level, each from its own records only."""
    from carnk_pkpd.evaluation import vpc_table

    y = np.array([[1.0, 2.0, 10.0, 20.0]] * 3)
    reps = xr.Dataset(
        {"y": (("replicate", "record"), y), "blq": (("replicate", "record"), np.zeros_like(y, bool))},
        coords={
            "ID": ("record", list("abcd")),
            "TIME": ("record", [14.0, 14.2, 13.9, 14.0]),
            "DVID": ("record", [1] * 4),
            "DV": ("record", [1.0, 2.0, 10.0, 20.0]),
            "BLQ": ("record", [0] * 4),
            "LLOQ": ("record", [0.1] * 4),
            "PRED": ("record", [1.0] * 4),
            "DL": ("record", ["1", "1", "4", "4"]),
        },
    )
    pooled = vpc_table(reps)
    split = vpc_table(reps, by_dose_level=True).set_index("stratum")
    assert len(pooled) == 1 and pooled["n"].iloc[0] == 4 and pooled["stratum"].iloc[0] == "all"
    assert split.loc["1", "obs_p50"] == pytest.approx(1.5) and split.loc["4", "obs_p50"] == pytest.approx(
        15.0
    )
    assert (split["bin"] == 14.0).all() and (split["n"] == 2).all()


def _gaussian_reps(sims: np.ndarray, obs: np.ndarray, n_sub: int, n_rec: int, dvid: int = 2, **extra):
    """Replicates Dataset of ``n_sub`` subjects × ``n_rec`` records (subject-major), one DVID."""
    n = n_sub * n_rec
    coords = {
        "ID": ("record", np.repeat(np.arange(n_sub), n_rec).astype(str)),
        "TIME": ("record", np.tile(np.arange(n_rec, dtype=float), n_sub)),
        "DVID": ("record", np.full(n, dvid)),
        "DV": ("record", obs),
        "BLQ": ("record", np.zeros(n, int)),
        "LLOQ": ("record", np.zeros(n)),
        "PRED": ("record", np.ones(n)),
    }
    coords.update(extra)
    return xr.Dataset(
        {"y": (("replicate", "record"), sims), "blq": (("replicate", "record"), np.zeros_like(sims, bool))},
        coords=coords,
        attrs={"log_dvids": [1]},
    )


def test_ewres_matches_the_exact_inverse_square_root():
    """Gaussian records with a known mean and within-subject covariance: EWRES from 20000 replicates
    equals Σ^{-1/2}(y − μ) computed from the TRUE Σ and μ (scipy sqrtm, an independent route) to
    Monte Carlo accuracy, and is uncorrelated and standard normal over many subjects."""
    from scipy.linalg import inv, sqrtm

    from carnk_pkpd.evaluation import ewres

    rng = np.random.default_rng(7)
    n_rec, k = 4, 20000
    mu = np.array([10.0, 20.0, 15.0, 5.0])
    a = rng.standard_normal((n_rec, n_rec))
    cov = a @ a.T + 0.5 * np.eye(n_rec)
    chol = np.linalg.cholesky(cov)
    exact_w = np.real(inv(sqrtm(cov)))
    n_sub = 3
    sims, obs = _correlated_records(rng, k, n_sub, chol, mu)
    got = ewres(_gaussian_reps(sims, obs, n_sub, n_rec)).reshape(n_sub, n_rec)
    exact = (obs.reshape(n_sub, n_rec) - mu) @ exact_w.T
    np.testing.assert_allclose(got, exact, atol=0.05)

    # many subjects, fewer replicates: decorrelated, mean 0, variance 1
    n_sub, k = 400, 1000
    sims, obs = _correlated_records(rng, k, n_sub, chol, mu)
    z = ewres(_gaussian_reps(sims, obs, n_sub, n_rec)).reshape(n_sub, n_rec)
    assert abs(z.mean()) < 0.1 and 0.85 < z.var() < 1.15
    raw = obs.reshape(n_sub, n_rec)
    assert (
        abs(np.corrcoef(raw[:, 0], raw[:, 1])[0, 1]) > 0.3
        or abs(np.corrcoef(raw[:, 2], raw[:, 3])[0, 1]) > 0.3
    )
    assert np.abs(np.corrcoef(z, rowvar=False) - np.eye(n_rec)).max() < 0.15


def test_ewres_of_log_normal_records_is_taken_on_the_log_scale_and_skips_blq():
    """A log-normal DVID (1): EWRES equals the Gaussian EWRES of log(y); a BLQ record gets NaN and the
    rest of its subject is decorrelated without it."""
    from carnk_pkpd.evaluation import ewres

    rng = np.random.default_rng(8)
    n_sub, n_rec, k = 5, 3, 2000
    cov = 0.3 + 0.2 * np.eye(n_rec)
    chol = np.linalg.cholesky(cov)
    log_sims, log_obs = _correlated_records(rng, k, n_sub, chol, 2.0)
    on_log = ewres(_gaussian_reps(log_sims, log_obs, n_sub, n_rec, dvid=2))
    natural = ewres(_gaussian_reps(np.exp(log_sims), np.exp(log_obs), n_sub, n_rec, dvid=1))
    np.testing.assert_allclose(natural, on_log, rtol=1e-9, atol=1e-9)
    blq = np.zeros(n_sub * n_rec, int)
    blq[0] = 1
    censored = ewres(_gaussian_reps(np.exp(log_sims), np.exp(log_obs), n_sub, n_rec, dvid=1,
                                    BLQ=("record", blq)))  # fmt: skip
    assert np.isnan(censored[0]) and np.isfinite(censored[1:]).all()
    # subject 0 without its first record: the 2x2 block of the remaining records, exact route
    block = np.log(np.exp(log_sims[:, 1:3]))
    d = log_obs[1:3] - block.mean(axis=0)
    lam, vec = np.linalg.eigh(np.cov(block, rowvar=False))
    np.testing.assert_allclose(censored[1:3], (vec / np.sqrt(lam)) @ vec.T @ d, rtol=1e-9)
    np.testing.assert_allclose(censored[3:], natural[3:], rtol=1e-9)
