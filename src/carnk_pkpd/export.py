"""Tables of a saved fit (parameters, per-subject, sdtab) and their export as csv/json/md/tex/nc.

Conventions (NONMEM-style labels beside the plain names):

* ``THETA(k)``: typical values of the structural parameters in model-file order (fixed ones marked
  ``FIX``), then the conversion factor ``copies_per_cell`` (only when the data hold qPCR records) and
  covariate effects ``beta_*``;
* ``OMEGA(k,k)``: the VARIANCE ω² of the between-subject deviation on the log scale, as in NONMEM
  (then dose-level tier variances ``omega_DL_p``²); the SD ω is in column ``stdev`` and
  ``CV% = 100·sqrt(exp(ω²) − 1)`` in ``cv_pct``. OMEGA is diagonal (no correlations are estimated);
  parameters whose BSV the fit does not estimate have no ETA and no OMEGA row;
* ``SIGMA(k,k)``: the VARIANCE of each residual-error component (log-scale SD², proportional
  fraction², additive SD² in the record unit²), SD in ``stdev``, CV% for the log-normal
  (``100·sqrt(exp(σ²) − 1)``) and proportional (``100·σ``) parts; components the model file fixes
  are marked ``FIX``; observation types without records in the data are left out;
* posterior quantiles of a variance are the squared quantiles of its SD (exact for a monotone
  transform), so ``OMEGA(1,1)``'s median is the square of ``omega_<p>``'s median;
* η-shrinkage ``= 1 − SD_i(E[omega·eta_i]) / E[omega]``: the SD (ddof = 1) over subjects of the
  posterior mean individual deviation on the log scale, divided by the posterior mean of omega;
* ε-shrinkage per observation type ``= 1 − SD(IWRES)`` over its quantified (non-BLQ) records
  (ddof = 1), with ``IWRES = (log DV − log IPRED)/σ`` for log-normal error and
  ``(DV − IPRED)/sqrt((prop·IPRED)² + add²)`` for the combined error, ``IPRED`` the posterior median
  of the individual prediction and σ, prop, add at their posterior medians. It is reported on the
  SIGMA rows of that observation type (η-shrinkage on the OMEGA rows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

__all__ = [
    "FORMATS",
    "cotab",
    "cv_percent",
    "epsilon_shrinkage",
    "eta_shrinkage",
    "ext_table",
    "parameter_table",
    "patab",
    "sdtab",
    "subject_table",
    "write_export",
]

FORMATS = ("csv", "json", "md", "tex", "nc")
PARAMETER_COLUMNS = [
    "label", "name", "kind", "unit", "prior", "fixed", "median", "mean", "sd", "q05", "q95", "q025",
    "q975", "rse_pct", "stdev", "cv_pct", "shrinkage_pct", "ess_bulk", "r_hat",
]  # fmt: skip
#: Significant digits of the numbers written to csv/json files.
DIGITS = 6


def cv_percent(omega: float | np.ndarray) -> float | np.ndarray:
    """CV% of a log-normal deviation with log-scale SD ``omega``: ``100·sqrt(exp(ω²) − 1)``."""
    return 100.0 * np.sqrt(np.expm1(np.asarray(omega, float) ** 2))


def eta_shrinkage(posterior: xr.Dataset) -> pd.Series:
    """η-shrinkage (fraction) per BSV parameter: ``1 − SD_i(E[omega_p·eta_p,i]) / E[omega_p]``.

    ``posterior`` needs ``omega_<p>`` on ``(chain, draw)`` and ``eta_<p>`` on ``(chain, draw, subject)``;
    the SD over subjects uses ddof = 1.
    """
    out = {}
    for name in posterior.data_vars:
        if not name.startswith("eta_"):
            continue
        p = name[4:]
        if f"omega_{p}" not in posterior:
            continue
        dev = (posterior[f"omega_{p}"] * posterior[name]).mean(("chain", "draw"))
        n = dev.size
        sd = float(np.std(dev.values, ddof=1)) if n > 1 else np.nan
        out[p] = 1.0 - sd / float(posterior[f"omega_{p}"].mean())
    return pd.Series(out, name="shrinkage", dtype=float)


def _prior_text(prior: dict[str, Any] | None) -> str:
    if not prior:
        return ""
    args = ", ".join(
        f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in prior.items() if k != "dist"
    )
    return f"{prior.get('dist', '?')}({args})"


def _stats(x: np.ndarray) -> dict[str, float]:
    """Posterior summary of a (chain, draw) array."""
    import arviz_stats as azs

    flat = x.reshape(-1)
    mean = float(np.mean(flat))
    sd = float(np.std(flat, ddof=1)) if flat.size > 1 else 0.0
    q = np.quantile(flat, [0.025, 0.05, 0.5, 0.95, 0.975])
    try:
        ess = float(azs.base.array_stats.ess(x, chain_axis=0, draw_axis=1, method="bulk"))
        rhat = float(azs.base.array_stats.rhat(x, chain_axis=0, draw_axis=1))
    except Exception:  # noqa: BLE001 - too few draws for the estimators
        ess, rhat = np.nan, np.nan
    return dict(
        median=float(q[2]), mean=mean, sd=sd, q05=float(q[1]), q95=float(q[3]), q025=float(q[0]),
        q975=float(q[4]), rse_pct=100.0 * sd / abs(mean) if mean else np.nan, ess_bulk=ess, r_hat=rhat,
    )  # fmt: skip


def _fixed_row(label: str, name: str, kind: str, unit: str, value: float) -> dict[str, Any]:
    return dict(
        label=label, name=name, kind=kind, unit=unit, prior="FIX", fixed=True, median=value, mean=value,
        sd=0.0, q05=value, q95=value, q025=value, q975=value, rse_pct=np.nan, ess_bulk=np.nan, r_hat=np.nan,
    )  # fmt: skip


def _cd(da: xr.DataArray) -> np.ndarray:
    return da.transpose("chain", "draw", ...).values


def _variance_stats(x: np.ndarray) -> dict[str, float]:
    """Posterior summary of the variance x² from draws of the SD x (chain, draw): quantiles are the
    squared quantiles of x (exact for a monotone transform), mean/SD/RSE those of x²; ESS and R-hat
    (rank-based) those of x. ``stdev`` is the posterior median of x."""
    st = _stats(x)
    v = x.reshape(-1) ** 2
    mean = float(np.mean(v))
    sd = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    out = {k: st[k] ** 2 for k in ("median", "q05", "q95", "q025", "q975")}
    out.update(mean=mean, sd=sd, rse_pct=100.0 * sd / mean if mean else np.nan, ess_bulk=st["ess_bulk"],
               r_hat=st["r_hat"], stdev=st["median"])  # fmt: skip
    return out


def _fixed_variance_row(label: str, name: str, kind: str, unit: str, sd_value: float) -> dict[str, Any]:
    row = _fixed_row(label, name, kind, unit, sd_value**2)
    row["stdev"] = sd_value
    return row


def _observed_dvids(fit: Any) -> set[int]:
    rec = fit.idata["constant_data"].to_dataset() if "constant_data" in fit.idata.children else None
    if rec is not None and "DVID" in rec:
        return {int(d) for d in np.unique(rec["DVID"].values)}
    from carnk_pkpd.statistical import observation_data

    return {int(d) for d in np.unique(observation_data(fit.cohort).dvid)}


def parameter_table(fit: Any, sdtab_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per population parameter: THETA, OMEGA, SIGMA (see the module docstring).

    Columns: ``label`` (``THETA(1)``…), ``name``, ``kind``, ``unit``, ``prior``, ``fixed``, posterior
    ``median``, ``mean``, ``sd`` (posterior SD: the uncertainty), 90% (``q05``, ``q95``) and 95%
    (``q025``, ``q975``) intervals, ``rse_pct`` (100·SD/|mean|), ``stdev`` (OMEGA/SIGMA: the SD of the
    random effect, √ of the variance, at the posterior median), ``cv_pct`` (OMEGA, log-normal and
    proportional SIGMA; at the posterior median), ``shrinkage_pct`` (η-shrinkage on OMEGA rows of BSV,
    ε-shrinkage on SIGMA rows), ``ess_bulk``, ``r_hat``. OMEGA and SIGMA rows summarise VARIANCES.
    Dose-level values ``<p>_DL`` appear with kind ``DL`` and no NONMEM label.

    ``sdtab_df``: the fit's :func:`sdtab` (its ``IWRES`` gives the ε-shrinkage); computed with
    200 draws and seed 0 when not given.
    """
    spec, post = fit.spec, fit.posterior
    dvids = _observed_dvids(fit)
    observations = [obs for dv, obs in spec.observations.items() if dv in dvids]
    rows: list[dict[str, Any]] = []
    k = 0
    for name, par in spec.parameters.items():
        if name == "n_transit":
            k += 1
            rows.append(_fixed_row(f"THETA({k})", name, "THETA", par.unit, float(par.typical)))
            continue
        k += 1
        if name in post:
            rows.append(dict(label=f"THETA({k})", name=name, kind="THETA", unit=par.unit,
                             prior=_prior_text(par.prior), fixed=False, **_stats(_cd(post[name]))))  # fmt: skip
        else:
            rows.append(_fixed_row(f"THETA({k})", name, "THETA", par.unit, float(par.typical)))
    for obs in observations:
        conv = obs.conversion
        if conv is None:
            continue
        k += 1
        if conv.name in post:
            rows.append(dict(label=f"THETA({k})", name=conv.name, kind="THETA", unit=conv.unit,
                             prior=_prior_text(conv.prior), fixed=False, **_stats(_cd(post[conv.name]))))  # fmt: skip
        else:
            rows.append(_fixed_row(f"THETA({k})", conv.name, "THETA", conv.unit, float(conv.typical)))
    for name in post.data_vars:
        if not name.startswith("beta_"):
            continue
        x = _cd(post[name])
        x = x.reshape(x.shape[0], x.shape[1], -1)
        for j in range(x.shape[2]):
            k += 1
            label = name if x.shape[2] == 1 else f"{name}[{j}]"
            rows.append(dict(label=f"THETA({k})", name=label, kind="THETA", unit="1", prior="Normal",
                             fixed=False, **_stats(x[:, :, j])))  # fmt: skip
    shrink = eta_shrinkage(post)
    m = 0
    for name, par in spec.parameters.items():
        om = f"omega_{name}"
        if om not in post:
            if par.bsv_sd > 0 and not par.bsv_estimate:  # OMEGA FIX: eta sampled, omega held at the file's sd
                m += 1
                row = _fixed_row(f"OMEGA({m},{m})", om, "OMEGA", "log-scale variance", float(par.bsv_sd) ** 2)
                shr = np.nan
                if f"eta_{name}" in post and post.sizes.get("subject", 0) > 1:
                    dev = (par.bsv_sd * post[f"eta_{name}"]).mean(("chain", "draw")).values
                    shr = 1.0 - float(np.std(dev, ddof=1)) / par.bsv_sd
                rows.append(dict(row, stdev=float(par.bsv_sd), cv_pct=float(cv_percent(par.bsv_sd)),
                                 shrinkage_pct=100.0 * shr))  # fmt: skip
            continue
        m += 1
        st = _variance_stats(_cd(post[om]))
        rows.append(dict(label=f"OMEGA({m},{m})", name=om, kind="OMEGA", unit="log-scale variance",
                         prior=_prior_text(par.bsv_prior) + " on the SD", fixed=False, **st,
                         cv_pct=float(cv_percent(st["stdev"])),
                         shrinkage_pct=100.0 * float(shrink.get(name, np.nan))))  # fmt: skip
    for name in spec.parameters:
        om = f"omega_DL_{name}"
        if om not in post:
            continue
        m += 1
        st = _variance_stats(_cd(post[om]))
        rows.append(dict(label=f"OMEGA({m},{m})", name=om, kind="OMEGA",
                         unit="log-scale variance (dose level)", prior="HalfNormal(sigma=0.3) on the SD",
                         fixed=False, **st, cv_pct=float(cv_percent(st["stdev"]))))  # fmt: skip
        da = post[f"{name}_DL"].transpose("chain", "draw", "dose_level")
        for dl in da["dose_level"].values:
            rows.append(dict(label="", name=f"{name}_DL[{dl}]", kind="DL", unit=spec.parameters[name].unit,
                             prior="", fixed=False, **_stats(da.sel(dose_level=dl).values)))  # fmt: skip
    if sdtab_df is None:
        sdtab_df = sdtab(fit)
    eps = epsilon_shrinkage(sdtab_df, fit.spec)
    s = 0
    for obs in observations:
        parts = [("log", f"sigma_{obs.name}", "log-scale variance")] if obs.error == "lognormal" else [
            ("prop", f"sigma_{obs.name}_prop", "fraction²"), ("add", f"sigma_{obs.name}_add", f"({obs.unit})²")]  # fmt: skip
        for key, name, unit in parts:
            sc = obs.residual.get(key)
            if sc is None:
                continue
            s += 1
            if name in post:
                row = dict(label=f"SIGMA({s},{s})", name=name, kind="SIGMA", unit=unit,
                           prior=_prior_text(sc.prior) + " on the SD", fixed=False,
                           **_variance_stats(_cd(post[name])))  # fmt: skip
            else:
                row = _fixed_variance_row(f"SIGMA({s},{s})", name, "SIGMA", unit, float(sc.typical))
            if key == "log":
                row["cv_pct"] = float(cv_percent(row["stdev"]))
            elif key == "prop":
                row["cv_pct"] = 100.0 * row["stdev"]
            row["shrinkage_pct"] = 100.0 * float(eps.get(obs.name, np.nan))
            rows.append(row)
    df = pd.DataFrame(rows)
    for col in PARAMETER_COLUMNS:
        if col not in df:
            df[col] = np.nan
    return df[PARAMETER_COLUMNS]


def epsilon_shrinkage(sdtab_df: pd.DataFrame, spec: Any) -> pd.Series:
    """ε-shrinkage (fraction) per observation type: ``1 − SD(IWRES)`` over the quantified records of
    that type (``BLQ = 0``, ``EVID = 0``; ddof = 1), from :func:`sdtab`'s ``IWRES``."""
    out = {}
    obs = sdtab_df[(sdtab_df.get("EVID", 0) == 0) & (sdtab_df["BLQ"] == 0)]
    for dvid, spec_obs in spec.observations.items():
        iw = obs.loc[obs["DVID"] == dvid, "IWRES"].to_numpy(float)
        iw = iw[np.isfinite(iw)]
        if iw.size > 1:
            out[spec_obs.name] = 1.0 - float(np.std(iw, ddof=1))
    return pd.Series(out, name="epsilon_shrinkage", dtype=float)


def ext_table(fit: Any) -> pd.DataFrame:
    """NONMEM ``.ext``-like table: one row per posterior draw of THETA, SIGMA and OMEGA.

    Columns ``ITERATION`` (draw number within its chain, from 1), ``CHAIN`` (from 1), ``THETA1``…,
    ``SIGMA(1,1)``…, ``OMEGA(1,1)``… (VARIANCES, as in :func:`parameter_table`; fixed components hold
    their fixed value in every draw) and ``OBJ`` (−2·log-likelihood of all records at that draw, from
    the fit's ``log_likelihood`` group; NaN without it). Then NONMEM's summary rows: ``ITERATION``
    −1000000000 (posterior medians), −1000000001 (posterior SDs) and −1000000006 (1 = fixed, 0 =
    estimated); their ``CHAIN`` is 0. Dose-level values (kind ``DL``) are not included.
    """
    table = parameter_table(fit, sdtab_df=_NO_SDTAB)
    post = fit.posterior
    n_chain, n_draw = post.sizes["chain"], post.sizes["draw"]
    cols: dict[str, np.ndarray] = {
        "ITERATION": np.tile(np.arange(1, n_draw + 1), n_chain),
        "CHAIN": np.repeat(np.arange(1, n_chain + 1), n_draw),
    }
    fixed, med, sd = {}, {}, {}
    ordered = [r for kind in ("THETA", "SIGMA", "OMEGA") for r in table[table["kind"] == kind].itertuples()]
    for r in ordered:
        col = r.label.replace("THETA(", "THETA").rstrip(")") if r.kind == "THETA" else r.label
        base = r.name.split("[")[0]
        if r.fixed:
            values = np.full(n_chain * n_draw, r.median)
        else:
            x = _cd(post[base]).reshape(n_chain * n_draw, -1)
            x = x[:, int(r.name.split("[")[1].rstrip("]"))] if "[" in r.name else x[:, 0]
            values = x**2 if r.kind in ("OMEGA", "SIGMA") else x
        cols[col] = values
        fixed[col], med[col], sd[col] = float(r.fixed), r.median, r.sd
    if "log_likelihood" in fit.idata.children:
        from carnk_pkpd.loglik import joint_log_likelihood

        ll = joint_log_likelihood(fit.idata).transpose("chain", "draw", "record").values
        cols["OBJ"] = -2.0 * ll.reshape(n_chain * n_draw, -1).sum(axis=1)
    else:
        cols["OBJ"] = np.full(n_chain * n_draw, np.nan)
    df = pd.DataFrame(cols)
    obj = cols["OBJ"]
    summary = []
    for it, values in ((-1000000000, med), (-1000000001, sd), (-1000000006, fixed)):
        row = {"ITERATION": it, "CHAIN": 0, **values}
        row["OBJ"] = float(np.median(obj)) if it == -1000000000 else (
            float(np.std(obj, ddof=1)) if it == -1000000001 and obj.size > 1 else 0.0)  # fmt: skip
        summary.append(row)
    return pd.concat([df, pd.DataFrame(summary)], ignore_index=True)


#: Tells :func:`parameter_table` to skip the ε-shrinkage (used by :func:`ext_table`, which needs no IWRES).
_NO_SDTAB = pd.DataFrame({"DVID": [], "BLQ": [], "IWRES": []})


# -- per-subject -----------------------------------------------------------------------------------------
def subject_table(fit: Any, n_draws: int = 50, seed: int = 0) -> pd.DataFrame:
    """Posterior median and 90% interval per subject of each individual parameter and derived metric.

    Individual parameters are those that differ between subjects (BSV, estimated or OMEGA FIX,
    dose-level tier or covariates). Metrics use each subject's own doses and LD window (its EVID=2 rows).

    Long format: ``ID``, ``quantity``, ``unit``, ``median``, ``q05``, ``q95``. Derived metrics (DA days,
    B-cell nadir, reconstitution day, CAR-NK Cmax and AUC 0–28 d, …) come from
    :func:`carnk_pkpd.structural.derived_metrics` on ``n_draws`` thinned draws; NaN days (never
    reached) are left out of the quantiles, and ``fraction_nan`` says how often that happened.
    """
    from carnk_pkpd.population import ld_window_from_times
    from carnk_pkpd.predictive import draw_indices
    from carnk_pkpd.statistical import observation_data
    from carnk_pkpd.structural import derived_metrics

    ind = fit.individual_parameters().stack(sample=("chain", "draw")).transpose("sample", "subject")
    ids = [str(s) for s in ind["subject"].values]
    rows = []
    varying = [p for p in ind.data_vars if np.ptp(ind[p].values, axis=1).max(initial=0.0) > 0.0]
    for p in varying:
        v = ind[p].values
        for j, sid in enumerate(ids):
            q = np.quantile(v[:, j], [0.5, 0.05, 0.95])
            rows.append(dict(ID=sid, quantity=p, unit=ind[p].attrs.get("units", ""), median=q[0], q05=q[1],
                             q95=q[2], fraction_nan=0.0))  # fmt: skip
    take = draw_indices(fit, n_draws, seed)
    sub = ind.isel(sample=take)
    n_s, n_sub = sub.sizes["sample"], sub.sizes["subject"]
    params = {p: sub[p].values.reshape(-1) for p in sub.data_vars}
    params["n_transit"] = fit.n_transit
    data = observation_data(fit.cohort)
    ld = {k: np.tile(v, n_s) for k, v in ld_window_from_times(data.ld_times, fit.spec).items()}
    met = derived_metrics(params, list(data.doses) * n_s, fit.spec, accuracy="default", ld=ld)
    for name in met.data_vars:
        v = met[name].values.reshape(n_s, n_sub)
        for j, sid in enumerate(ids):
            col = v[:, j]
            ok = col[np.isfinite(col)]
            q = np.quantile(ok, [0.5, 0.05, 0.95]) if ok.size else [np.nan] * 3
            rows.append(dict(ID=sid, quantity=name, unit=met[name].attrs.get("units", ""), median=q[0],
                             q05=q[1], q95=q[2], fraction_nan=1.0 - ok.size / col.size))  # fmt: skip
    return pd.DataFrame(rows)


def patab(fit: Any) -> pd.DataFrame:
    """NONMEM/xpose ``patab``: one row per subject, ``ID``, its individual parameters and ``ETA1``….

    Each parameter column is the posterior median of the subject's natural-scale individual
    parameter (typical value × dose-level tier × covariate effects × exp(η)), for the parameters
    that differ between subjects (as in :func:`subject_table`); units in ``attrs["units"]`` and a
    header comment. ``ETAj`` as in :func:`sdtab` (posterior mean of ω·η, log scale).
    """
    ind = fit.individual_parameters().stack(sample=("chain", "draw")).transpose("sample", "subject")
    ids = [str(s) for s in ind["subject"].values]
    cols: dict[str, Any] = {"ID": ids}
    units = {}
    for p in ind.data_vars:
        v = ind[p].values
        if v.size and np.ptp(v, axis=1).max(initial=0.0) > 0.0:
            cols[p] = np.median(v, axis=0)
            units[p] = str(ind[p].attrs.get("units", ""))
    df = pd.DataFrame(cols)
    etas, eta_names = _etas(fit)
    df = df.merge(etas, on="ID", how="left")
    df.attrs["units"] = units
    df.attrs["comments"] = [
        "individual parameters: posterior median per subject (natural scale); units: "
        + (", ".join(f"{k} {u or '1'}" for k, u in units.items()) or "none"),
        "ETA columns (posterior mean of omega_p*eta_p,i, log scale): "
        + (", ".join(f"ETA{j}={p}" for j, p in enumerate(eta_names, start=1)) or "none"),
    ]
    return df


def cotab(fit: Any) -> pd.DataFrame:
    """NONMEM/xpose ``cotab``: one row per subject with its covariates.

    Columns ``ID``, ``DL`` (dose-level label), ``DOSE`` (10⁹ CAR-NK cells at the first infusion),
    ``NINF`` (number of infusions), ``TOTDOSE`` (10⁹ cells over all infusions), ``TAU`` (days between
    the first two infusions; NaN with one infusion), then the cohort's per-subject covariates (AGE,
    SEX, WT, … in file order; NaN where a subject has none). Units in a header comment.
    """
    from carnk_pkpd.data import KNOWN_COVARIATES

    cohort = fit.cohort
    rows = []
    for sub in cohort.subjects:
        amts = [a for _, a in sub.doses]
        times = sorted(t for t, _ in sub.doses)
        row: dict[str, Any] = {
            "ID": str(sub.id),
            "DL": str(sub.dl),
            "DOSE": float(amts[0]) if amts else np.nan,
            "NINF": len(amts),
            "TOTDOSE": float(np.sum(amts)) if amts else 0.0,
            "TAU": float(times[1] - times[0]) if len(times) > 1 else np.nan,
        }
        for name in cohort.covariate_names:
            row[name] = float(sub.covariates.get(name, np.nan))
        rows.append(row)
    df = pd.DataFrame(rows)
    units = {"DL": "label", "DOSE": "10^9 cells", "NINF": "count", "TOTDOSE": "10^9 cells", "TAU": "days"}
    units.update({n: KNOWN_COVARIATES.get(n, "") for n in cohort.covariate_names})
    df.attrs["units"] = units
    df.attrs["comments"] = ["covariate units: " + ", ".join(f"{k} {u or '?'}" for k, u in units.items())]
    return df


SDTAB_COLUMNS = ["ID", "TIME", "EVID", "MDV", "AMT", "DVID", "DV", "BLQ", "LLOQ", "PRED", "IPRED", "EPRED",
                 "CWRES", "IWRES", "EWRES", "NPDE"]  # fmt: skip


def _residual_sd_median(fit: Any, post: xr.Dataset, name: str, fixed: float) -> float:
    return float(post[name].median()) if name in post else float(fixed)


def individual_weighted_residuals(fit: Any, records: pd.DataFrame) -> np.ndarray:
    """IWRES per record (see the module docstring); NaN for BLQ records and DVIDs the model lacks.

    ``records`` needs ``DVID``, ``DV``, ``BLQ`` and ``IPRED`` (posterior median individual prediction).
    """
    post = fit.posterior
    out = np.full(len(records), np.nan)
    dv = records["DV"].to_numpy(float)
    ipred = records["IPRED"].to_numpy(float)
    quant = records["BLQ"].to_numpy() == 0
    for dvid, obs in fit.spec.observations.items():
        sel = (records["DVID"].to_numpy() == dvid) & quant
        if not sel.any():
            continue
        if obs.error == "lognormal":
            sig = _residual_sd_median(fit, post, f"sigma_{obs.name}", obs.residual["log"].typical)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[sel] = (np.log(dv[sel]) - np.log(ipred[sel])) / sig
        else:
            prop = _residual_sd_median(fit, post, f"sigma_{obs.name}_prop", obs.residual["prop"].typical)
            add = _residual_sd_median(fit, post, f"sigma_{obs.name}_add", obs.residual["add"].typical)
            out[sel] = (dv[sel] - ipred[sel]) / np.sqrt((prop * ipred[sel]) ** 2 + add**2)
    return out


def _etas(fit: Any) -> tuple[pd.DataFrame, list[str]]:
    """ETA1..n per subject: posterior mean of ``omega_p·eta_p,i`` (log scale), in OMEGA order."""
    post = fit.posterior
    names = [p for p in fit.spec.parameters if f"omega_{p}" in post and f"eta_{p}" in post]
    ids = [str(s) for s in (post["subject"].values if "subject" in post.coords else fit.cohort.ids)]
    cols = {"ID": ids}
    for j, p in enumerate(names, start=1):
        cols[f"ETA{j}"] = (post[f"omega_{p}"] * post[f"eta_{p}"]).mean(("chain", "draw")).values
    return pd.DataFrame(cols), names


def sdtab(
    fit: Any,
    n_draws: int = 200,
    seed: int = 0,
    ppc: xr.Dataset | None = None,
    npde_replicates: int = 500,
    replicates: xr.Dataset | None = None,
    cwres: bool = True,
) -> pd.DataFrame:
    """NONMEM sdtab-like table in the cohort's record order: the fitted concentration records (EVID 0)
    and the dosing and lymphodepletion records (EVID 1, 2; MDV 1, no predictions).

    Columns ``ID, TIME`` (days), ``EVID, MDV, AMT`` (10^9 cells), ``DVID, DV, BLQ, LLOQ`` (record
    units), ``PRED`` (typical-value prediction, eta = 0, posterior-median parameters), ``IPRED``
    (posterior median of the individual prediction), ``EPRED``, ``CWRES``, ``IWRES`` (individual
    weighted residual, see the module docstring; empty for BLQ records), ``EWRES``, ``NPDE`` and
    ``ETA1``… ``ETAn``.

    ``CWRES`` are NONMEM's conditional weighted residuals (Hooker et al. 2007): the FOCE
    linearisation around each subject's conditional mode of η at the posterior-median THETA, OMEGA
    and SIGMA (:func:`carnk_pkpd.cwres.conditional_weighted_residuals`; empty for BLQ records;
    ``cwres=False`` leaves the column empty and skips its ~30 s of compilation).

    ``EPRED``, ``EWRES`` and ``NPDE`` come from one set of ``npde_replicates`` replicates of NEW
    subjects at the observed design (:func:`carnk_pkpd.evaluation.simulate_replicates`, or the given
    ``replicates``): ``EPRED`` is the replicates' mean at the record (record unit, residual error
    included, uncensored); ``EWRES`` NONMEM's Monte Carlo weighted residual
    ``Cov^{-1/2}(y − E[y])`` over each subject's quantified records
    (:func:`carnk_pkpd.evaluation.ewres`; CAR-NK on the log scale; empty for BLQ records);
    ``NPDE`` the decorrelated NPDE (:func:`carnk_pkpd.evaluation.npde`). ``ETAj`` is the posterior
    mean of subject i's log-scale deviation ``omega_p·eta_p,i`` of the j-th BSV parameter (the OMEGA(j,j) order); which parameter each ETA is
    is in ``attrs["comments"]`` (written as a header comment) and ``attrs["eta_names"]``.
    Clinical records (DVID 10–12) and observations without a DV are not part of the fit and are left out.
    """
    from carnk_pkpd.evaluation import ewres, npde, simulate_replicates
    from carnk_pkpd.predictive import population_predictions, posterior_predictive

    ppc = posterior_predictive(fit, n_draws, seed) if ppc is None else ppc
    obs = pd.DataFrame({k: ppc[k].values for k in ("ID", "TIME", "DVID", "DV", "BLQ", "LLOQ")})
    obs["ID"] = obs["ID"].astype(str)
    obs["PRED"] = population_predictions(fit).values
    obs["IPRED"] = np.median(ppc["IPRED"].values, axis=0)
    obs["IWRES"] = individual_weighted_residuals(fit, obs)
    reps = simulate_replicates(fit, npde_replicates, seed) if replicates is None else replicates
    if reps.sizes["record"] != len(obs):
        raise ValueError(f"sdtab: {reps.sizes['record']} replicated records for {len(obs)} fitted records")
    obs["EPRED"] = reps["y"].values.mean(axis=0)
    obs["EWRES"] = ewres(reps)
    obs["NPDE"] = npde(reps, seed)["npde"].to_numpy()
    obs["CWRES"] = np.nan
    if cwres:
        from carnk_pkpd.cwres import conditional_weighted_residuals

        modes = conditional_weighted_residuals(fit)
        obs["CWRES"] = modes.cwres
    obs["EVID"], obs["MDV"], obs["AMT"] = 0, 0, 0.0

    full = fit.cohort.to_dataframe()
    full["ID"] = full["ID"].astype(str)
    is_obs = (full["EVID"] == 0) & (full["MDV"] == 0) & full["DVID"].isin(obs["DVID"].unique())
    keep = full[is_obs | full["EVID"].isin([1, 2])].reset_index(drop=True)
    keep["_row"] = np.arange(len(keep))
    merged = keep[["ID", "TIME", "EVID", "DVID", "AMT", "_row"]].merge(
        obs.drop(columns=["EVID", "AMT"]), on=["ID", "TIME", "DVID"], how="left", suffixes=("", "_obs")
    )
    dose = merged["EVID"] != 0
    merged.loc[dose, obs.columns.difference(["ID", "TIME", "DVID", "EVID", "AMT"])] = np.nan
    merged.loc[dose, "MDV"] = 1
    merged.loc[dose, "BLQ"] = 0
    merged.loc[~dose, "AMT"] = 0.0
    merged["AMT"] = merged["AMT"].fillna(0.0)
    merged = merged.sort_values("_row").drop(columns="_row").reset_index(drop=True)
    if int((~dose).sum()) != len(obs):
        raise ValueError(f"sdtab: {len(obs)} fitted records but {int((~dose).sum())} matched in the cohort")
    etas, eta_names = _etas(fit)
    merged = merged.merge(etas, on="ID", how="left")
    merged = merged[SDTAB_COLUMNS + [c for c in etas.columns if c != "ID"]]
    for col in ("EVID", "MDV", "DVID", "BLQ"):
        merged[col] = merged[col].astype(int)
    merged.attrs["eta_names"] = {f"ETA{j}": p for j, p in enumerate(eta_names, start=1)}
    merged.attrs["comments"] = [
        "ETA columns (posterior mean of omega_p*eta_p,i, log scale): "
        + (", ".join(f"ETA{j}={p}" for j, p in enumerate(eta_names, start=1)) or "none"),
        f"EPRED, EWRES, NPDE: {int(reps.sizes['replicate'])} replicates of new subjects at the observed "
        "design; EWRES = Cov^-1/2 (y - E[y]) per subject (Monte Carlo weighted residual)",
        "CWRES: FOCE linearisation around the conditional mode of eta at the posterior-median "
        "THETA/OMEGA/SIGMA (Hooker et al. 2007)" + ("" if cwres else "; not computed (cwres=False)"),
    ]
    return merged


# -- writing ----------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("µ", r"$\mu$"), ("·", r"$\cdot$"),
                 ("⁹", r"$^9$"), ("–", "--"), ("−", "-")):  # fmt: skip
        s = s.replace(a, b)
    return s


def to_latex(df: pd.DataFrame, caption: str) -> str:
    """A plain ``tabular`` in a ``table`` environment (booktabs rules)."""
    cols = "l" * len(df.columns)
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{_tex_escape(caption)}}}",
             rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(_tex_escape(str(c)) for c in df.columns) + r" \\", r"\midrule"]  # fmt: skip
    for row in df.itertuples(index=False):
        lines.append(" & ".join(_tex_escape(_fmt(v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _json_safe(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records", double_precision=DIGITS))


#: The files each format writes (checked against the output rule before any work).
EXPORT_FILES = {
    "csv": ("parameters.csv", "subjects.csv", "sdtab.csv", "ext.csv", "patab.csv", "cotab.csv"),
    "json": ("export.json",),
    "md": ("export.md",),
    "tex": ("parameters.tex", "subjects.tex", "sdtab.tex"),
    "nc": ("posterior.nc", "posterior_predictive.nc"),
}


def export_folder(fit: Any, out: str | os.PathLike | None = None) -> Path:
    """The folder an export goes to: ``out``, or ``<fit>/export/`` by default."""
    from carnk_pkpd.fits import output_path

    return output_path(fit, out, "export")


def write_export(
    fit: Any,
    fmt: str,
    out: str | os.PathLike | None = None,
    *,
    n_draws: int = 200,
    seed: int = 0,
    cwres: bool = True,
) -> list[Path]:
    """Write the fit's tables (or, for ``nc``, posterior and posterior predictive) in format ``fmt``.

    Default folder ``<fit>/export/``. The output rule of :mod:`carnk_pkpd.atomic` applies: a new
    folder is created whole; in an existing folder only new names or this command's own earlier
    export files are replaced (never a fit's own files), else :class:`~carnk_pkpd.errors.OutputRefused`
    is raised before any work. Files are written to a temporary folder, then moved into place with
    ``os.replace``. Every file carries provenance (SYNTHETIC marker, package version, fit hash).
    ``cwres=False`` leaves the sdtab's CWRES column empty (see :func:`sdtab`). Returns the written paths.
    """
    from carnk_pkpd.atomic import check_output_files, output_files
    from carnk_pkpd.provenance import provenance, provenance_lines, write_csv

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    dest = export_folder(fit, out)
    check_output_files(dest, EXPORT_FILES[fmt], command="export")
    note = "SYNTHETIC data: simulated patients, not trial data. " if fit.synthetic else ""
    prov = provenance(fit, command=f"export --format {fmt}")
    lines = provenance_lines(fit, command=f"export --format {fmt}")
    from carnk_pkpd.predictive import posterior_predictive

    ppc = posterior_predictive(fit, n_draws, seed)
    if fmt != "nc":
        sd = sdtab(fit, n_draws, seed, ppc=ppc, cwres=cwres)
        tables = {
            "parameters": parameter_table(fit, sdtab_df=sd),
            "subjects": subject_table(fit, min(n_draws, 50), seed),
            "sdtab": sd,
        }
    with output_files(dest, command="export", kind="export") as tmp:
        if fmt == "nc":
            idata = fit.idata.copy()
            idata.attrs = {**dict(fit.idata.attrs), **prov}
            idata.to_netcdf(tmp / "posterior.nc", engine="netcdf4")
            pp = ppc.copy()
            for k in ("ID",):
                pp[k] = pp[k].astype(str)
            pp.attrs.update(prov)
            pp.attrs.update(synthetic=int(fit.synthetic), seed=seed, n_draws=int(ppc.sizes["sample"]))
            pp.to_netcdf(tmp / "posterior_predictive.nc", engine="netcdf4")
        elif fmt == "csv":
            tables["ext"] = ext_table(fit)
            tables["patab"] = patab(fit)
            tables["cotab"] = cotab(fit)
            for name, df in tables.items():
                write_csv(
                    df,
                    tmp / f"{name}.csv",
                    [*lines, *df.attrs.get("comments", [])],
                    float_format=f"%.{DIGITS}g",
                )
        elif fmt == "json":
            doc = {
                "synthetic": fit.synthetic,
                "note": note + "OMEGA and SIGMA as variances (SD in 'stdev', CV% in 'cv_pct'); "
                "η-shrinkage = 1 − SD(E[ω·η_i])/E[ω]; ε-shrinkage = 1 − SD(IWRES); "
                "EWRES = Monte Carlo weighted residual Cov^-1/2 (y − E[y]) per subject; CWRES = FOCE conditional weighted residuals (Hooker et al. 2007).",
                "provenance": prov,
                "diagnostics": fit.diagnostics.to_dict() if fit.diagnostics is not None else None,
                "manifest": fit.manifest,
                **{k: _json_safe(v) for k, v in tables.items()},
            }
            (tmp / "export.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
        elif fmt == "md":
            parts = [f"# Fit export{' (SYNTHETIC)' if fit.synthetic else ''}\n", note]
            parts += ["\n", *(f"<!-- {line} -->\n" for line in lines)]
            for name, df in tables.items():
                parts += [f"\n## {name}\n\n", to_markdown(df)]
            (tmp / "export.md").write_text("".join(parts), encoding="utf-8")
        else:  # tex
            head = "".join(f"% {line}\n" for line in lines)
            for name, df in tables.items():
                (tmp / f"{name}.tex").write_text(head + to_latex(df, f"{note}{name}"), encoding="utf-8")
        names = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
    return [dest / n for n in names]
