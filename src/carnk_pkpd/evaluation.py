"""Simulation-based model evaluation: replicates of new subjects, VPC / pcVPC and NPDE.

Every replicate is a set of NEW subjects (η drawn from Ω) at each observed subject's own design — its
infusions, lymphodepletion window (EVID=2 rows), sampling times and covariates — simulated by
:func:`carnk_pkpd.population.simulate_population`, one replicate per posterior draw (a model file:
its typical values), with residual error and censored at each record's LLOQ exactly as the assay
censors observed values (``blq`` = simulated value < the record's LLOQ).

* :func:`vpc_table` — VPC and prediction-corrected VPC (Bergstrand et al. 2011, AAPS J 13:143):
  observed 5th/50th/95th percentiles per bin against the 90% interval of the same percentiles over
  replicates, per DVID and optionally per dose level, plus the BLQ fraction. **Binning rule**: the
  bins are the nominal days of the sampling schedule — each record goes to the whole day nearest its
  time (the schedule samples on whole days; samples taken hours around an infusion join that day).
  **BLQ**: censored values are kept, set to the LLOQ and so ranked lowest (not dropped); a
  percentile that falls among them is reported as NaN ("below LLOQ"), one between a censored and a
  measured value interpolates from the LLOQ. **Prediction correction**: ``pcY = Y·PRED_bin/PRED``
  with ``PRED`` the typical-value prediction (η = 0) of the record and ``PRED_bin`` its median in the
  bin; for the log-normal CAR-NK data this is Bergstrand's additive correction on the log scale
  (``log pcY = log Y + log PRED_bin − log PRED``, PRED + 1e-9 cells/µL before and at the first
  infusion, where the prediction is 0); B cells (combined error) are corrected on the natural scale.
* :func:`npde` — normalised prediction distribution errors (Brendel et al. 2006, Pharm Res 23:2036;
  Comets et al. 2008, CMPB 90:154) from K replicates (≥ 500 recommended): per subject and DVID,
  observations and replicates are decorrelated with the Cholesky factor of the replicates'
  covariance (mean and covariance over replicates), ``pde`` = fraction of decorrelated replicates
  below the decorrelated observation, kept in ``[1/(2K), 1 − 1/(2K)]`` (Comets' correction), and
  ``npde = Φ⁻¹(pde)``. Log-normal DVIDs (CAR-NK) are decorrelated on the log scale. **BLQ**
  (after Nguyen et al. 2012, CPT:PSP 1:e7): a BLQ observation's ``pd`` is uniform on
  ``(0, P(Y < LLOQ))`` (``P`` = fraction of the record's replicates below its LLOQ), i.e. a
  randomised rank on the censored scale. For the decorrelation, observation AND replicates are put
  on that censored scale, ``max(Y, LLOQ)``, and ties (censored values) get randomised ranks, so the
  observation stays exchangeable with the replicates and its decorrelated ``pde`` is uniform. This
  departs from npde 2.0, which imputes a BLQ observation from its record's marginal distribution
  before decorrelating: the imputed value ignores the subject's other records, and here (CAR-NK
  disappears after rejection and its log values are strongly correlated within subject) that
  imputation inflated the NPDE variance of a well-specified model to 1.8. The mean and covariance
  are estimated over the K replicates AND the observation (negligible change for large K): the
  estimate is then symmetric in all K + 1 vectors, so the observation's rank stays exactly
  uniform; with the replicates alone, the estimation error of nearly singular (mostly censored)
  directions inflated the B-cell NPDE variance to 1.2 at K = 300 (6 subjects × 20 cohorts). A block
  that is BLQ throughout gives npde of pure randomised ranks (uniform, as it should under the model).
* :func:`ewres` — Monte Carlo population weighted residuals, NONMEM's ``EWRES`` (the ``$TABLE``
  items ``EPRED``/``EWRES`` of NONMEM 7, Introduction to NONMEM 7 guide): per subject, over its
  quantified (non-BLQ) records, ``EWRES = Cov^{-1/2}(y − E[y])`` with ``E[y]`` and ``Cov`` the
  mean and covariance of the same replicates (all DVIDs of the subject in one block, CAR-NK on the
  log scale, B cells on the natural scale) and ``Cov^{-1/2}`` the symmetric inverse square root, so
  the subject's residuals are decorrelated. Unlike NPDE it is a moment-based (not rank-based)
  residual and is undefined for BLQ records (NaN). It is not ``CWRES``, the FOCE linearisation
  around the conditional η (Hooker et al. 2007), which :mod:`carnk_pkpd.cwres` computes.
* :func:`npde_tests` — mean 0 (t-test), variance 1 (Fisher's χ² variance test), normality
  (Shapiro–Wilk) per DVID and a Bonferroni global p, as the R package npde reports.

Units: TIME in days since the first infusion; DV, PRED and percentiles in each DVID's unit
(cells/µL for DVIDs 1–2, copies/µg gDNA for DVID 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

__all__ = [
    "EVALUATION_FILES",
    "evaluation_folder",
    "ewres",
    "write_evaluation",
    "nominal_day",
    "npde",
    "npde_tests",
    "population_prediction",
    "replicates_dataset",
    "simulate_replicates",
    "solver_accuracy",
    "symmetric_inverse_sqrt",
    "vpc_table",
]

PRED_FLOOR = 1e-9  # cells/µL added to a CAR-NK PRED before and at the first infusion (it is 0 there)


def _is_fit(source: Any) -> bool:
    return hasattr(source, "posterior") and hasattr(source, "cohort")


def solver_accuracy(source: Any) -> str:
    """The solver accuracy a fit sampled with (its manifest's ``sampler.accuracy``); ``"default"`` for
    a model or a fit without one. Predictions for a fit use it so they solve as its likelihood did."""
    if _is_fit(source):
        return str((source.manifest or {}).get("sampler", {}).get("accuracy", "default"))
    return "default"


def _log_dvids(spec: Any) -> list[int]:
    return sorted(int(d) for d, obs in spec.observations.items() if obs.error == "lognormal")


def population_prediction(source: Any, cohort: Any, *, accuracy: str | None = None) -> np.ndarray:
    """PRED per record of ``cohort``: the typical-value prediction (η = 0), record's unit.

    Each parameter is the (posterior-median, for a fit) typical value with the subject's dose-level
    tier and covariates, without between-subject deviation; solved on the subject's own doses and
    LD window.
    """
    from carnk_pkpd.population import (
        SubjectDesign,
        individual_parameters,
        observation_scale,
        population_from,
    )
    from carnk_pkpd.structural import simulate

    acc = accuracy or solver_accuracy(source)
    pop = population_from(source)
    design = SubjectDesign.from_cohort(cohort, pop.spec)
    zero = {name: np.zeros((pop.n_draws, design.n_subjects)) for name in pop.names}
    theta = individual_parameters(pop, design, None, z=zero)
    theta = {k: np.exp(np.median(np.log(v), axis=0)) for k, v in theta.items()}
    data = design.records
    t_all = np.unique(np.concatenate(data.times))
    paths = simulate(
        {**theta, "n_transit": np.full(design.n_subjects, pop.n_transit)},
        list(design.doses),
        t_all,
        pop.spec,
        acc,
        design.ld(pop.spec),
    )
    t_rec = np.array([data.times[s][k] for s, k in zip(data.subject_index, data.time_index, strict=True)])
    pos = np.searchsorted(t_all, t_rec)
    car = np.asarray(paths["car"].values).reshape(design.n_subjects, -1)[data.subject_index, pos][None, :]
    bcell = np.asarray(paths["bcell"].values).reshape(design.n_subjects, -1)[data.subject_index, pos][None, :]
    med = {k: np.median(v)[None] for k, v in pop.residual.items()}
    return observation_scale(pop.spec, data.dvid, car, bcell, med)[0]


def replicates_dataset(
    sim: xr.Dataset,
    pred: np.ndarray,
    *,
    log_dvids: list[int] | tuple[int, ...] = (1, 3),
    dv: np.ndarray | None = None,
    blq: np.ndarray | None = None,
    y: np.ndarray | None = None,
) -> xr.Dataset:
    """Replicates on ``(replicate, record)`` from a :func:`simulate_population` result on an observed
    design: ``y`` (uncensored simulated value), ``blq`` (``y`` < the record's LLOQ), and per record
    ``ID TIME DVID DV BLQ LLOQ PRED DL``. ``y`` replaces the simulated values (replicates
    gathered from several calls); ``dv``/``blq`` replace the observed values (tests use a
    held-out simulated cohort as "observed"; a BLQ value's DV is its LLOQ, as in the data files).
    """
    subj = {s: i for i, s in enumerate(sim["subject"].values.tolist())}
    s_idx = np.array([subj[s] for s in sim["ID"].values.tolist()])
    lloq = sim["LLOQ"].values.astype(float)
    obs_blq = sim["BLQ"].values.astype(int) if blq is None else np.asarray(blq).astype(int)
    obs_dv = sim["DV"].values.astype(float) if dv is None else np.asarray(dv, float)
    y = sim["y"].values.astype(float) if y is None else np.asarray(y, float)
    dims = ("replicate", "record")
    return xr.Dataset(
        {
            "y": (
                dims,
                y,
                {"long_name": "simulated observation of a new subject (uncensored), record's unit"},
            ),
            "blq": (dims, y < lloq[None, :], {"long_name": "simulated value below the record's LLOQ"}),
        },
        coords={
            "replicate": np.arange(y.shape[0]),
            "record": np.arange(y.shape[1]),
            "ID": ("record", sim["ID"].values.astype(str)),
            "TIME": ("record", sim["TIME"].values.astype(float), {"units": "days"}),
            "DVID": ("record", sim["DVID"].values.astype(int)),
            "DV": ("record", obs_dv),
            "BLQ": ("record", obs_blq),
            "LLOQ": ("record", lloq),
            "PRED": ("record", np.asarray(pred, float)),
            "DL": ("record", sim["dose_level"].values.astype(str)[s_idx]),
        },
        attrs={
            "synthetic": int(sim.attrs.get("synthetic", 0)),
            "model": str(sim.attrs.get("model", "")),
            "log_dvids": list(int(d) for d in log_dvids),
        },
    )


def simulate_replicates(
    source: Any,
    n_replicates: int = 500,
    seed: int = 0,
    *,
    cohort: Any = None,
    accuracy: str | None = None,
) -> xr.Dataset:
    """``n_replicates`` replicates of new subjects at the observed design, one per posterior draw.

    ``source`` is a :class:`~carnk_pkpd.fits.Fit` (its cohort is the design unless ``cohort`` is
    given) or a model (spec, name, path or PopulationDraws, then ``cohort`` is required). A fit with
    fewer posterior draws than ``n_replicates`` is used again with further seeds (new subjects each
    time). Returns :func:`replicates_dataset`'s Dataset (observed DV/BLQ from the cohort).
    """
    from carnk_pkpd.population import population_from, simulate_population

    if n_replicates < 1:
        raise ValueError(f"n_replicates must be >= 1 (found {n_replicates})")
    if cohort is None:
        if not _is_fit(source):
            raise ValueError("a model source needs the observed cohort (cohort=...)")
        cohort = source.cohort
    acc = accuracy or solver_accuracy(source)
    parts: list[xr.Dataset] = []
    got, k = 0, 0
    while got < n_replicates:
        sim = simulate_population(
            source,
            cohort,
            n_draws=n_replicates - got,
            seed=seed + 7919 * k,
            new_subjects=True,
            times=[0.0],
            accuracy=acc,
            metrics=False,
        )
        parts.append(sim)
        got += sim.sizes["draw"]
        k += 1
    y = np.concatenate([p["y"].values for p in parts], axis=0)[:n_replicates]
    spec = population_from(source, 1).spec
    pred = population_prediction(source, cohort, accuracy=acc)
    return replicates_dataset(parts[0], pred, log_dvids=_log_dvids(spec), y=y)


# --- VPC -----------------------------------------------------------------------------------------------
def nominal_day(time: np.ndarray) -> np.ndarray:
    """The VPC bin of each record: the whole day nearest its time (days)."""
    return np.round(np.asarray(time, float)).astype(float) + 0.0


def _censored_quantile(values: np.ndarray, censored: np.ndarray, q: float, floor: float) -> np.ndarray:
    """Quantile over the last axis with censored values set to ``floor`` (the bin's LLOQ, so they rank
    lowest and a percentile between a censored and a measured value interpolates from the LLOQ, as
    PsN and the R package vpc do); NaN where it falls among the censored values (≤ ``floor``)."""
    z = np.where(censored, floor, values)
    p = np.quantile(z, q, axis=-1)
    return np.where(p > floor, p, np.nan)


def vpc_table(
    reps: xr.Dataset,
    *,
    pc: bool = False,
    by_dose_level: bool = False,
    quantiles: tuple[float, ...] = (0.05, 0.5, 0.95),
    interval: float = 0.90,
) -> pd.DataFrame:
    """VPC (``pc=False``) or pcVPC table: one row per DVID, stratum (dose level or "all") and bin.

    Columns: ``DVID``, ``stratum``, ``bin`` (nominal day), ``TIME`` (median time of its records,
    days), ``n`` (records), ``LLOQ`` (median, prediction-corrected for a pcVPC), ``obs_pXX`` (observed
    percentile, NaN below the LLOQ), ``sim_pXX_lo/mid/hi`` (``interval`` limits and median of the
    replicates' percentile), ``blq_obs`` and ``blq_sim_lo/mid/hi`` (fraction BLQ). See the module
    docstring for binning, BLQ handling and prediction correction.
    """
    lo_q, hi_q = (1 - interval) / 2, 1 - (1 - interval) / 2
    dvid_all = reps["DVID"].values
    strata = reps["DL"].values if by_dose_level else np.full(dvid_all.size, "all")
    bins = nominal_day(reps["TIME"].values)
    dv = reps["DV"].values.astype(float)
    blq = reps["BLQ"].values == 1
    y = reps["y"].values
    yb = reps["blq"].values
    lloq = reps["LLOQ"].values.astype(float)
    pred = reps["PRED"].values.astype(float)
    log_dvids = set(int(d) for d in np.atleast_1d(reps.attrs.get("log_dvids", [1, 3])))
    rows = []
    for dvid in sorted(set(dvid_all.tolist())):
        for stratum in sorted(set(strata[dvid_all == dvid].tolist())):
            sel_s = (dvid_all == dvid) & (strata == stratum)
            for b in sorted(set(bins[sel_s].tolist())):
                sel = np.flatnonzero(sel_s & (bins == b))
                f = np.ones(sel.size)
                if pc:
                    p = pred[sel] + (PRED_FLOOR if dvid in log_dvids else 0.0)
                    p_bin = np.median(p)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        f = np.where(p > 0, p_bin / p, 1.0)
                floor = float(np.median(lloq[sel] * f))
                row: dict[str, Any] = {
                    "DVID": int(dvid),
                    "stratum": str(stratum),
                    "bin": float(b),
                    "TIME": float(np.median(reps["TIME"].values[sel])),
                    "n": int(sel.size),
                    "LLOQ": floor,
                }
                obs_v = dv[sel] * f
                sim_v = y[:, sel] * f[None, :]
                for q in quantiles:
                    tag = f"p{round(100 * q):02d}"
                    row[f"obs_{tag}"] = float(_censored_quantile(obs_v, blq[sel], q, floor))
                    s = _censored_quantile(sim_v, yb[:, sel], q, floor)
                    ok = np.isfinite(s)
                    # a replicate whose percentile is below the LLOQ counts as lowest
                    s_rank = np.where(ok, s, floor)
                    lo, mid, hi = np.quantile(s_rank, [lo_q, 0.5, hi_q])
                    row[f"sim_{tag}_lo"] = float(lo) if lo > floor else np.nan
                    row[f"sim_{tag}_mid"] = float(mid) if mid > floor else np.nan
                    row[f"sim_{tag}_hi"] = float(hi) if hi > floor else np.nan
                frac = yb[:, sel].mean(axis=1)
                row["blq_obs"] = float(blq[sel].mean())
                lo, mid, hi = np.quantile(frac, [lo_q, 0.5, hi_q])
                row.update(blq_sim_lo=float(lo), blq_sim_mid=float(mid), blq_sim_hi=float(hi))
                rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs.update(pc=bool(pc), by_dose_level=bool(by_dose_level), interval=interval)
    return df


# --- NPDE ----------------------------------------------------------------------------------------------
def _decorrelator(ysim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and lower Cholesky factor of the replicates' covariance (a tiny ridge when singular)."""
    mean = ysim.mean(axis=0)
    n = ysim.shape[1]
    cov = np.atleast_2d(np.cov(ysim, rowvar=False)) if ysim.shape[0] > 1 else np.eye(n)
    ridge = 0.0
    scale = float(np.trace(cov)) / max(n, 1) or 1.0
    for _ in range(8):
        try:
            return mean, np.linalg.cholesky(cov + ridge * scale * np.eye(n))
        except np.linalg.LinAlgError:
            ridge = 1e-10 if ridge == 0 else ridge * 100
    raise np.linalg.LinAlgError("covariance of the replicates is not positive definite")


def _randomized_rank(sims: np.ndarray, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fraction of ``sims`` (replicate, record) below ``obs`` (record,), ties counted with a uniform
    weight (randomised PIT: exactly uniform for an observation exchangeable with the replicates)."""
    tol = 1e-9 * (1.0 + np.abs(obs))[None, :]
    below = (sims < obs[None, :] - tol).sum(axis=0)
    ties = (np.abs(sims - obs[None, :]) <= tol).sum(axis=0)
    return (below + rng.uniform(0.0, 1.0, obs.size) * ties) / sims.shape[0]


def npde(reps: xr.Dataset, seed: int = 0) -> pd.DataFrame:
    """NPDE per record (record order): ``ID TIME DVID DV BLQ PRED EPRED pd npde``.

    ``pd`` is the prediction discrepancy before decorrelation (fraction of replicates below DV; a
    BLQ record's is uniform on (0, P(Y < LLOQ))), ``npde`` the decorrelated one (Brendel 2006 / Comets 2008; BLQ per
    Nguyen 2012; see the module docstring). ``EPRED`` is the replicates' mean (record's unit).
    ``seed`` drives the randomised ranks of ties (BLQ) only.
    """
    from scipy.linalg import solve_triangular
    from scipy.stats import norm

    rng = np.random.default_rng([seed, 16])
    y = reps["y"].values.astype(float)
    k = y.shape[0]
    if k < 2:
        raise ValueError("NPDE needs at least 2 replicates (500 or more recommended)")
    dv = reps["DV"].values.astype(float)
    blq = reps["BLQ"].values == 1
    lloq = reps["LLOQ"].values.astype(float)
    dvid = reps["DVID"].values.astype(int)
    ids = reps["ID"].values.astype(str)
    log_dvids = set(int(d) for d in np.atleast_1d(reps.attrs.get("log_dvids", [1, 3])))
    lo, hi = 1.0 / (2 * k), 1.0 - 1.0 / (2 * k)
    pd_ = np.full(dv.size, np.nan)
    out = np.full(dv.size, np.nan)
    for key in sorted(set(zip(ids.tolist(), dvid.tolist(), strict=True))):
        sel = np.flatnonzero((ids == key[0]) & (dvid == key[1]))
        floor = lloq[sel][None, :]
        # both sides on the censored scale max(Y, LLOQ): the observation stays exchangeable with the
        # replicates, so its decorrelated rank is uniform whatever the within-subject correlation
        ysim = np.maximum(y[:, sel], floor)
        obs = np.where(blq[sel], lloq[sel], np.maximum(dv[sel], lloq[sel]))
        pd_[sel] = _randomized_rank(ysim, obs, rng)
        if key[1] in log_dvids:
            ysim, obs = np.log(ysim), np.log(obs)
        mean, chol = _decorrelator(np.vstack([ysim, obs[None, :]]))
        o_dec = solve_triangular(chol, obs - mean, lower=True)
        s_dec = solve_triangular(chol, (ysim - mean).T, lower=True).T
        out[sel] = _randomized_rank(s_dec, o_dec, rng)
    pd_ = np.clip(pd_, lo, hi)
    out = norm.ppf(np.clip(out, lo, hi))
    return pd.DataFrame(
        {
            "ID": ids,
            "TIME": reps["TIME"].values.astype(float),
            "DVID": dvid,
            "DV": dv,
            "BLQ": blq.astype(int),
            "LLOQ": lloq,
            "PRED": reps["PRED"].values.astype(float),
            "EPRED": y.mean(axis=0),
            "pd": pd_,
            "npde": out,
        }
    )


def symmetric_inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric inverse square root of a covariance matrix; eigenvalues below 1e-10 of the largest
    (directions the replicates do not vary in) are left out (their residual component is set to 0)."""
    lam, vec = np.linalg.eigh(cov)
    tol = 1e-10 * max(float(lam.max(initial=0.0)), 1e-300)
    inv = np.where(lam > tol, 1.0 / np.sqrt(np.where(lam > tol, lam, 1.0)), 0.0)
    return (vec * inv[None, :]) @ vec.T


def ewres(reps: xr.Dataset) -> np.ndarray:
    """EWRES per record (record order): ``Cov^{-1/2}(y − E[y])`` over each subject's quantified records.

    ``E[y]`` and ``Cov`` are the mean and covariance (ddof = 1) of the replicates ``reps["y"]``
    (new subjects, :func:`simulate_replicates`) at the subject's records; log-normal DVIDs
    (``reps.attrs["log_dvids"]``) enter on the log scale, others on the natural scale; all DVIDs of a
    subject form one block (NONMEM's Monte Carlo weighted residual, decorrelated within subject by
    the symmetric inverse square root). NaN for BLQ records and for log-scale records with DV ≤ 0.
    Dimensionless.
    """
    y = reps["y"].values.astype(float)
    if y.shape[0] < 2:
        raise ValueError("EWRES needs at least 2 replicates (500 or more recommended)")
    dv = reps["DV"].values.astype(float)
    blq = reps["BLQ"].values == 1
    dvid = reps["DVID"].values.astype(int)
    ids = reps["ID"].values.astype(str)
    log_dvids = set(int(d) for d in np.atleast_1d(reps.attrs.get("log_dvids", [1, 3])))
    is_log = np.isin(dvid, sorted(log_dvids))
    usable = ~blq & np.isfinite(dv) & (~is_log | (dv > 0))
    out = np.full(dv.size, np.nan)
    tiny = np.finfo(float).tiny
    for sid in dict.fromkeys(ids.tolist()):
        sel = np.flatnonzero((ids == sid) & usable)
        if sel.size == 0:
            continue
        lg = is_log[sel]
        ysim = np.where(lg[None, :], np.log(np.maximum(y[:, sel], tiny)), y[:, sel])
        obs = np.where(lg, np.log(np.where(lg, dv[sel], 1.0)), dv[sel])
        mean = ysim.mean(axis=0)
        cov = np.atleast_2d(np.cov(ysim, rowvar=False))
        out[sel] = symmetric_inverse_sqrt(cov) @ (obs - mean)
    return out


def npde_tests(df: pd.DataFrame) -> pd.DataFrame:
    """Per DVID: ``n``, ``mean``, ``variance`` of the NPDE, p-values of the t-test (mean 0), Fisher's
    variance test (variance 1, two-sided χ²), Shapiro–Wilk (normality) and the Bonferroni global test
    (3 × smallest p, capped at 1), as the R package npde reports."""
    from scipy import stats

    rows = []
    for dvid, g in df.groupby("DVID"):
        x = g["npde"].to_numpy(float)
        x = x[np.isfinite(x)]
        n = x.size
        var = float(np.var(x, ddof=1)) if n > 1 else np.nan
        t_p = float(stats.ttest_1samp(x, 0.0).pvalue) if n > 1 else np.nan
        chi = (n - 1) * var
        f_p = (
            float(min(1.0, 2 * min(stats.chi2.cdf(chi, n - 1), stats.chi2.sf(chi, n - 1))))
            if n > 1
            else np.nan
        )
        sw_p = float(stats.shapiro(x[:5000]).pvalue) if n >= 3 else np.nan
        rows.append(
            {
                "DVID": int(dvid),
                "n": int(n),
                "mean": float(np.mean(x)) if n else np.nan,
                "variance": var,
                "t_test_p": t_p,
                "fisher_variance_p": f_p,
                "shapiro_wilk_p": sw_p,
                "global_p": float(min(1.0, 3 * np.nanmin([t_p, f_p, sw_p]))) if n > 2 else np.nan,
            }
        )
    return pd.DataFrame(rows)


# --- files ---------------------------------------------------------------------------------------------
EVALUATION_FILES = ("vpc.csv", "vpc.png", "npde.csv", "npde_tests.csv", "npde.png")


def evaluation_folder(fit: Any, out: str | Path | None = None) -> Path:
    """The folder ``carnk-pkpd vpc`` writes to: ``out``, or ``<fit>/vpc/`` by default."""
    from carnk_pkpd.fits import output_path

    return output_path(fit, out, "vpc")


def write_evaluation(
    fit: Any,
    out: str | Path | None = None,
    *,
    n_replicates: int = 500,
    seed: int = 0,
    pc: bool = False,
    by_dose_level: bool = False,
) -> tuple[list[Path], pd.DataFrame]:
    """Simulate ``n_replicates`` replicates of new subjects at the fit's design and write the VPC
    (``pc``: pcVPC; ``by_dose_level``: one panel per dose level) and NPDE tables and figures
    (``npde.csv`` also holds each record's EPRED and EWRES from the same replicates).

    The output rule of :mod:`carnk_pkpd.atomic` applies (a new folder is created whole; in an existing
    one only new names or this command's own earlier files are replaced), files go through a
    temporary folder. Returns the written paths and the NPDE tests per DVID.
    """
    from carnk_pkpd import plots
    from carnk_pkpd.atomic import check_output_files, output_files
    from carnk_pkpd.provenance import provenance_lines, write_csv

    dest = evaluation_folder(fit, out)
    check_output_files(dest, EVALUATION_FILES, command="vpc")
    reps = simulate_replicates(fit, n_replicates, seed)
    table = vpc_table(reps, pc=pc, by_dose_level=by_dose_level)
    nd = npde(reps, seed)
    nd["EWRES"] = ewres(reps)
    tests = npde_tests(nd)
    synthetic = bool(getattr(fit, "synthetic", False))
    opts = f" --replicates {n_replicates} --seed {seed}" + (" --pc" if pc else "")
    opts += " --by-dose-level" if by_dose_level else ""
    lines = provenance_lines(fit, command="vpc" + opts)
    with output_files(dest, command="vpc", kind="vpc") as tmp:
        write_csv(table, tmp / "vpc.csv", lines)
        write_csv(nd, tmp / "npde.csv", lines)
        write_csv(tests, tmp / "npde_tests.csv", lines)
        (tmp / "vpc.png").write_bytes(plots.png_bytes(plots.vpc_bands(table, synthetic)))
        (tmp / "npde.png").write_bytes(plots.png_bytes(plots.npde_panels(nd, tests, synthetic)))
        names = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
    return [dest / n for n in names], tests
