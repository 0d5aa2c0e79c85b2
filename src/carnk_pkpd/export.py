"""Tables of a saved fit (parameters, per-subject, sdtab) and their export as csv/json/md/tex/nc.

Conventions (NONMEM-style labels beside the plain names):

* ``THETA(k)``: typical values of the structural parameters in model-file order (fixed ones marked
  ``FIX``), then the conversion factor ``copies_per_cell`` and covariate effects ``beta_*``;
* ``OMEGA(k,k)``: between-subject SD ``omega_p`` on the log scale (then dose-level tier SDs
  ``omega_DL_p``), with ``CV% = 100·sqrt(exp(ω²) − 1)``; the model has a diagonal OMEGA, so no
  correlations are estimated;
* ``SIGMA(k,k)``: residual SDs (log-scale SD for log-normal error, proportional fraction and additive
  SD for the combined error), reported as SDs, not variances;
* η-shrinkage ``= 1 − SD_i(E[omega·eta_i]) / E[omega]``: the SD (ddof = 1) over subjects of the
  posterior mean individual deviation on the log scale, divided by the posterior mean of omega.
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
    "cv_percent",
    "eta_shrinkage",
    "parameter_table",
    "sdtab",
    "subject_table",
    "write_export",
]

FORMATS = ("csv", "json", "md", "tex", "nc")
PARAMETER_COLUMNS = [
    "label", "name", "kind", "unit", "prior", "fixed", "median", "mean", "sd", "q05", "q95", "q025",
    "q975", "rse_pct", "cv_pct", "shrinkage_pct", "ess_bulk", "r_hat",
]  # fmt: skip


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


def parameter_table(fit: Any) -> pd.DataFrame:
    """One row per population parameter: THETA, OMEGA, SIGMA (see the module docstring).

    Columns: ``label`` (``THETA(1)``…), ``name``, ``kind``, ``unit``, ``prior``, ``fixed``, posterior
    ``median``, ``mean``, ``sd``, 90% (``q05``, ``q95``) and 95% (``q025``, ``q975``) intervals,
    ``rse_pct`` (100·SD/|mean|), ``cv_pct`` (OMEGA, at the posterior median; exact for monotone
    transforms), ``shrinkage_pct`` (OMEGA of BSV), ``ess_bulk``, ``r_hat``. Dose-level values
    ``<p>_DL`` appear with kind ``DL`` and no NONMEM label.
    """
    spec, post = fit.spec, fit.posterior
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
    for obs in spec.observations.values():
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
            continue
        m += 1
        st = _stats(_cd(post[om]))
        rows.append(dict(label=f"OMEGA({m},{m})", name=om, kind="OMEGA", unit="log-scale SD",
                         prior=f"HalfNormal(sigma={max(par.bsv_sd, 0.1):g})", fixed=False, **st,
                         cv_pct=float(cv_percent(st["median"])),
                         shrinkage_pct=100.0 * float(shrink.get(name, np.nan))))  # fmt: skip
    for name in spec.parameters:
        om = f"omega_DL_{name}"
        if om not in post:
            continue
        m += 1
        st = _stats(_cd(post[om]))
        rows.append(dict(label=f"OMEGA({m},{m})", name=om, kind="OMEGA", unit="log-scale SD (dose level)",
                         prior="HalfNormal(sigma=0.3)", fixed=False, **st,
                         cv_pct=float(cv_percent(st["median"]))))  # fmt: skip
        da = post[f"{name}_DL"].transpose("chain", "draw", "dose_level")
        for dl in da["dose_level"].values:
            rows.append(dict(label="", name=f"{name}_DL[{dl}]", kind="DL", unit=spec.parameters[name].unit,
                             prior="", fixed=False, **_stats(da.sel(dose_level=dl).values)))  # fmt: skip
    s = 0
    for obs in spec.observations.values():
        parts = [("log", f"sigma_{obs.name}", "log-scale SD")] if obs.error == "lognormal" else [
            ("prop", f"sigma_{obs.name}_prop", "fraction"), ("add", f"sigma_{obs.name}_add", obs.unit)]  # fmt: skip
        for key, name, unit in parts:
            sc = obs.residual.get(key)
            if sc is None:
                continue
            s += 1
            if name in post:
                rows.append(dict(label=f"SIGMA({s},{s})", name=name, kind="SIGMA", unit=unit,
                                 prior=_prior_text(sc.prior), fixed=False, **_stats(_cd(post[name]))))  # fmt: skip
            else:
                rows.append(_fixed_row(f"SIGMA({s},{s})", name, "SIGMA", unit, float(sc.typical)))
    df = pd.DataFrame(rows)
    for col in PARAMETER_COLUMNS:
        if col not in df:
            df[col] = np.nan
    return df[PARAMETER_COLUMNS]


# -- per-subject -----------------------------------------------------------------------------------------
def subject_table(fit: Any, n_draws: int = 50, seed: int = 0) -> pd.DataFrame:
    """Posterior median and 90% interval per subject of each individual parameter and derived metric.

    Individual parameters are those that differ between subjects (BSV or dose-level tier).

    Long format: ``ID``, ``quantity``, ``unit``, ``median``, ``q05``, ``q95``. Derived metrics (DA days,
    B-cell nadir, reconstitution day, CAR-NK Cmax and AUC 0–28 d, …) come from
    :func:`carnk_pkpd.structural.derived_metrics` on ``n_draws`` thinned draws; NaN days (never
    reached) are left out of the quantiles, and ``fraction_nan`` says how often that happened.
    """
    from carnk_pkpd.predictive import draw_indices
    from carnk_pkpd.statistical import observation_data
    from carnk_pkpd.structural import derived_metrics

    ind = fit.individual_parameters().stack(sample=("chain", "draw")).transpose("sample", "subject")
    ids = [str(s) for s in ind["subject"].values]
    rows = []
    post = fit.posterior
    varying = [p for p in ind.data_vars if f"{p}_i" in post or f"{p}_DL" in post]
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
    met = derived_metrics(params, list(data.doses) * n_s, fit.spec, accuracy="default")
    for name in met.data_vars:
        v = met[name].values.reshape(n_s, n_sub)
        for j, sid in enumerate(ids):
            col = v[:, j]
            ok = col[np.isfinite(col)]
            q = np.quantile(ok, [0.5, 0.05, 0.95]) if ok.size else [np.nan] * 3
            rows.append(dict(ID=sid, quantity=name, unit=met[name].attrs.get("units", ""), median=q[0],
                             q05=q[1], q95=q[2], fraction_nan=1.0 - ok.size / col.size))  # fmt: skip
    return pd.DataFrame(rows)


def sdtab(
    fit: Any,
    n_draws: int = 200,
    seed: int = 0,
    ppc: xr.Dataset | None = None,
    npde_replicates: int = 500,
    replicates: xr.Dataset | None = None,
) -> pd.DataFrame:
    """NONMEM sdtab-like table, one row per concentration record.

    ``ID, TIME (days), DVID, DV, BLQ, LLOQ`` (record units), ``PRED`` (typical-value prediction, eta = 0,
    posterior-median parameters), ``IPRED`` (posterior median of the individual prediction), ``NPDE``
    (NPDE-like from the posterior predictive; see :func:`carnk_pkpd.predictive.npde`).
    """
    from carnk_pkpd.predictive import npde, population_predictions, posterior_predictive

    ppc = posterior_predictive(fit, n_draws, seed) if ppc is None else ppc
    df = pd.DataFrame({k: ppc[k].values for k in ("ID", "TIME", "DVID", "DV", "BLQ", "LLOQ")})
    df["PRED"] = population_predictions(fit).values
    df["IPRED"] = np.median(ppc["IPRED"].values, axis=0)
    df["NPDE"] = npde(ppc, seed).values
    # real NPDE: new subjects at the observed design, decorrelated (carnk_pkpd.evaluation.npde)
    from carnk_pkpd.evaluation import npde as real_npde
    from carnk_pkpd.evaluation import simulate_replicates

    reps = simulate_replicates(fit, npde_replicates, seed) if replicates is None else replicates
    df["NPDE"] = real_npde(reps, seed)["npde"].to_numpy()
    return df


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
    return json.loads(df.to_json(orient="records", double_precision=10))


#: The files each format writes (checked against the output rule before any work).
EXPORT_FILES = {
    "csv": ("parameters.csv", "subjects.csv", "sdtab.csv"),
    "json": ("export.json",),
    "md": ("export.md",),
    "tex": ("parameters.tex", "subjects.tex", "sdtab.tex"),
    "nc": ("posterior.nc", "posterior_predictive.nc"),
}


def export_folder(fit: Any, out: str | os.PathLike | None = None) -> Path:
    """The folder an export goes to: ``out``, or ``<fit>/export/`` by default."""
    if out is None:
        if fit.path is None:
            raise ValueError("the fit has no folder; give an output folder")
        return Path(fit.path) / "export"
    return Path(out)


def write_export(
    fit: Any, fmt: str, out: str | os.PathLike | None = None, *, n_draws: int = 200, seed: int = 0
) -> list[Path]:
    """Write the fit's tables (or, for ``nc``, posterior and posterior predictive) in format ``fmt``.

    Default folder ``<fit>/export/``. The output rule of :mod:`carnk_pkpd.atomic` applies: a new
    folder is created whole; in an existing folder only new names or this command's own earlier
    export files are replaced (never a fit's own files), else :class:`~carnk_pkpd.errors.OutputRefused`
    is raised before any work. Files are written to a temporary folder, then moved into place with
    ``os.replace``. Every file carries provenance (SYNTHETIC marker, package version, fit hash).
    Returns the written paths.
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
        tables = {
            "parameters": parameter_table(fit),
            "subjects": subject_table(fit, min(n_draws, 50), seed),
            "sdtab": sdtab(fit, n_draws, seed, ppc=ppc),
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
            for name, df in tables.items():
                write_csv(df, tmp / f"{name}.csv", lines)
        elif fmt == "json":
            doc = {
                "synthetic": fit.synthetic,
                "note": note + "OMEGA as log-scale SD; SIGMA as SD; shrinkage = 1 − SD(E[ω·η_i])/E[ω].",
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
