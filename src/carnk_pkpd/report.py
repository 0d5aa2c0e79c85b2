"""One self-contained HTML report of a fit, rendered from the jinja2 template ``templates/report.html.j2``.

Sections (HTML ids, in order): ``diagnostics`` (sampler checks, each ok/FAIL), ``parameters``
(THETA/OMEGA/SIGMA), ``shrinkage``, ``gof`` (per analyte, LOWESS), ``npde`` (NPDE tests and panels),
``eta`` (ETA panels), ``vpc`` (VPC and pcVPC), ``individual`` (every subject, paged),
``loo``/``remission``/``doses`` (only when the fit folder holds ``compare.csv``, ``remission.csv``
or ``ranking.csv``, in the folder itself or one level down), ``trace``, ``priors``, ``subjects``,
``manifest``. Tables are pandas Stylers, figures base64 PNG. The page is laid out for a 1280-px
window: the parameter table shows a selection of columns (all of them are in ``parameters.csv`` of
``carnk-pkpd export``), wide tables from other commands are cut to their main columns.
Written atomically (temporary file, then ``os.replace``) under the output rule of :mod:`carnk_pkpd.atomic`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "SECTIONS",
    "diagnostics_table",
    "individual_pages",
    "render_report",
    "report_path",
    "write_report",
]

SECTIONS = ("diagnostics", "parameters", "shrinkage", "gof", "npde", "eta", "vpc", "individual", "loo",
            "remission", "doses", "trace", "priors", "subjects", "manifest")  # fmt: skip
#: Subjects per individual-fit figure (two subjects per row, CAR-NK and B cells side by side).
SUBJECTS_PER_PAGE = 12
#: Most columns a table from another command's CSV shows (the CSV keeps them all).
MAX_COLUMNS = 12


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (int, np.integer)):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def _html_table(df: pd.DataFrame, classes: pd.DataFrame | None = None) -> str:
    """A pandas Styler table (no index, 4 significant digits, empty for NaN); ``classes``: a frame of
    CSS class names per cell (e.g. ok/FAIL)."""
    sty = df.style.hide(axis="index").format(_fmt).set_table_attributes('class="data"')
    text_cols = [c for c in df.columns if df[c].dtype == object]
    if text_cols:
        sty = sty.set_properties(subset=text_cols, **{"text-align": "left"})
    if classes is not None:
        sty = sty.set_td_classes(classes)
    return sty.to_html()


def _png(fig: Any) -> str:
    from carnk_pkpd import plots

    return base64.b64encode(plots.png_bytes(fig)).decode()


def diagnostics_table(diag: Any) -> pd.DataFrame:
    """Sampler checks, one row each: ``check``, ``value``, ``threshold``, ``worst`` (the quantity that
    set the value) and ``status`` ("ok" or "FAIL"): max R-hat ≤ 1.01, min bulk/tail ESS ≥ 400,
    0 divergent transitions, min E-BFMI ≥ 0.3, < 1% of draws at the maximum tree depth.
    ``diag`` is a :class:`carnk_pkpd.diagnostics.Diagnostics`."""
    from carnk_pkpd.diagnostics import EBFMI_MIN, ESS_MIN, RHAT_MAX

    w = diag.worst or {}
    rows = [
        ("max R-hat", diag.max_r_hat, f"≤ {RHAT_MAX}", w.get("r_hat", ""), diag.max_r_hat <= RHAT_MAX),
        ("min bulk ESS", diag.min_ess_bulk, f"≥ {ESS_MIN}", w.get("ess_bulk", ""), diag.min_ess_bulk >= ESS_MIN),
        ("min tail ESS", diag.min_ess_tail, f"≥ {ESS_MIN}", w.get("ess_tail", ""), diag.min_ess_tail >= ESS_MIN),
        ("divergent transitions", diag.divergences, "0", "", diag.divergences == 0),
        ("min E-BFMI", diag.min_ebfmi, f"≥ {EBFMI_MIN}", "", not diag.min_ebfmi < EBFMI_MIN),
        ("draws at max tree depth (%)", 100.0 * diag.tree_depth_saturated, "< 1", f"max depth {diag.max_tree_depth}",
         diag.tree_depth_saturated <= 0.01),
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=["check", "value", "threshold", "worst", "passed"])
    df["status"] = np.where(df.pop("passed").astype(bool), "ok", "FAIL")
    return df


def _parameter_view(par: pd.DataFrame) -> pd.DataFrame:
    """The parameter table's columns that fit a 1280-px page: the 90% interval in one column."""
    lo, hi = par["q05"].map(_fmt), par["q95"].map(_fmt)
    return pd.DataFrame(
        {
            "label": par["label"],
            "name": par["name"],
            "unit": par["unit"],
            "median": par["median"],
            "90% interval": np.where(par["fixed"].astype(bool), "FIX", "[" + lo + ", " + hi + "]"),
            "RSE%": par["rse_pct"],
            "SD": par["stdev"],
            "CV%": par["cv_pct"],
            "shrink.%": par["shrinkage_pct"],
            "ESS": par["ess_bulk"],
            "R-hat": par["r_hat"],
            "prior": par["prior"],
        }
    )


def individual_pages(
    curves: Any, sd: pd.DataFrame, synthetic: bool, per_page: int = SUBJECTS_PER_PAGE
) -> list[tuple[str, str]]:
    """Every subject's individual fit, ``per_page`` subjects per figure: (caption, base64 PNG) per page,
    the caption saying "page k of n" and which IDs it shows."""
    from carnk_pkpd import plots

    ids = [str(s) for s in curves["subject"].values]
    pages = [ids[i : i + per_page] for i in range(0, len(ids), per_page)] or [[]]
    out = []
    for k, chunk in enumerate(pages, start=1):
        fig = plots.individual_fits(curves, sd, synthetic, subjects=chunk, page=(k, len(pages)))
        out.append((f"Page {k} of {len(pages)}: subjects {', '.join(chunk)}", _png(fig)))
    return out


def _found(folder: Path | None, name: str) -> list[Path]:
    """``name`` in the fit folder or one level below it."""
    if folder is None:
        return []
    return sorted(p for p in [folder / name, *folder.glob(f"*/{name}")] if p.is_file())


def _csv_blocks(paths: list[Path], folder: Path, keep: Callable[[pd.DataFrame], list[str]]) -> list[dict]:
    blocks = []
    for p in paths:
        try:
            df = pd.read_csv(p, comment="#")
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            blocks.append(dict(kind="text", body=f"{p.relative_to(folder)} could not be read: {exc}"))
            continue
        cols = keep(df)
        note = f"From {p.relative_to(folder)} ({len(df)} rows"
        note += (
            f"; {len(df.columns) - len(cols)} more columns in the file)"
            if len(cols) < len(df.columns)
            else ")"
        )
        blocks += [dict(kind="text", body=note), dict(kind="table", caption="", body=_html_table(df[cols]))]
    return blocks


def _main_columns(df: pd.DataFrame) -> list[str]:
    """Columns without interval/MCSE suffixes, at most :data:`MAX_COLUMNS`."""
    skip = ("_q05", "_q95", "_mcse", "_q025", "_q975")
    cols = [c for c in df.columns if not str(c).endswith(skip)]
    return cols[:MAX_COLUMNS]


def _loo_columns(df: pd.DataFrame) -> list[str]:
    want = ["model", "unit", "rank", "elpd_loo", "se", "elpd_diff", "dse", "p_loo", "weight", "k_bad",
            "k_very_bad", "warning"]  # fmt: skip
    return [c for c in want if c in df.columns]


def render_report(
    fit: Any,
    n_draws: int = 100,
    seed: int = 0,
    n_replicates: int = 500,
    subjects_per_page: int = SUBJECTS_PER_PAGE,
    cwres: bool = True,
) -> str:
    """The report as an HTML string (see the module docstring for its sections).

    ``n_draws`` thinned posterior draws for the fitted-subject predictions (IPRED, individual fits),
    ``n_replicates`` replicates of new subjects for VPC, NPDE, EPRED and EWRES.
    """
    import jinja2

    from carnk_pkpd import plots
    from carnk_pkpd.evaluation import npde, npde_tests, simulate_replicates, vpc_table
    from carnk_pkpd.export import cotab, parameter_table, patab, sdtab, subject_table
    from carnk_pkpd.predictive import individual_curves, posterior_predictive
    from carnk_pkpd.provenance import provenance_lines

    syn = bool(fit.synthetic)
    folder = Path(fit.path) if fit.path is not None else None
    ppc = posterior_predictive(fit, n_draws, seed)
    reps = simulate_replicates(fit, n_replicates, seed)
    sd_all = sdtab(fit, n_draws, seed, ppc=ppc, replicates=reps, cwres=cwres)
    par = parameter_table(fit, sdtab_df=sd_all)
    sd = sd_all[sd_all["EVID"] == 0]
    nd = npde(reps, seed)
    nd_tests = npde_tests(nd)
    curves = individual_curves(fit, min(n_draws, 50), seed)
    sections: list[dict[str, Any]] = []

    def add(sid: str, title: str, *blocks: dict) -> None:
        sections.append(dict(id=sid, title=title, blocks=list(blocks)))

    def text(body: str) -> dict:
        return dict(kind="text", body=body)

    def table(df: pd.DataFrame, caption: str = "", classes: pd.DataFrame | None = None) -> dict:
        return dict(kind="table", caption=caption, body=_html_table(df, classes))

    def image(fig: Any, alt: str, caption: str = "") -> dict:
        return dict(kind="image", alt=alt, caption=caption, body=_png(fig))

    # diagnostics
    if fit.diagnostics is not None:
        dt = diagnostics_table(fit.diagnostics)
        classes = pd.DataFrame("", index=dt.index, columns=dt.columns)
        classes["status"] = dt["status"]
        ok = bool((dt["status"] == "ok").all())
        status = dict(kind="status", cls="ok" if ok else "bad",
                      body="ok: every sampler check passed." if ok else
                      "FAIL: the fit fails its sampler diagnostics; treat every estimate below as provisional.")  # fmt: skip
        add("diagnostics", "Sampler diagnostics", status, table(dt, classes=classes),
            text(f"{fit.diagnostics.n_chains} chains × {fit.diagnostics.n_draws} draws; checks over the "
                 "population-level quantities."))  # fmt: skip
    else:
        add("diagnostics", "Sampler diagnostics", text("The fit holds no sampler diagnostics."))
    # parameters
    view = _parameter_view(par)
    blocks = []
    for kind, caption in (("THETA", "THETA: typical values (natural units)"),
                          ("OMEGA", "OMEGA: between-subject VARIANCE ω² on the log scale (SD ω, CV% = "
                                    "100·sqrt(exp(ω²) − 1), η-shrinkage)"),
                          ("SIGMA", "SIGMA: residual VARIANCES (SD, CV%, ε-shrinkage = 1 − SD(IWRES))"),
                          ("DL", "Dose-level tier values")):  # fmt: skip
        sub = view[par["kind"].to_numpy() == kind]
        if len(sub):
            blocks.append(table(sub, caption))
    blocks.append(text("Posterior median and 90% interval; RSE% = 100·posterior SD/|mean|; FIX = fixed, not "
                       "estimated. OMEGA is diagonal (no between-subject correlations are estimated). All "
                       "columns (95% intervals, posterior SD) are in parameters.csv of carnk-pkpd export."))  # fmt: skip
    add("parameters", "Parameters (THETA / OMEGA / SIGMA)", *blocks)
    om = par[(par["kind"] == "OMEGA") & par["shrinkage_pct"].notna()]
    add("shrinkage", "η-shrinkage",
        text("Shrinkage = 1 − SD_i(posterior mean of ω·η_i) / posterior mean of ω (SD over subjects, ddof = 1). "
             "Above about 30%, ETA and individual-parameter plots are unreliable."),
        table(om[["label", "name", "median", "stdev", "cv_pct", "shrinkage_pct"]]),
        image(plots.shrinkage_bar(par, syn), "shrinkage"))  # fmt: skip
    add("gof", "Goodness of fit (per analyte)",
        text("One row per observation type, each on its own axes and unit. PRED: typical-value prediction "
             "(η = 0, posterior-median parameters); IPRED: posterior median of the individual prediction; "
             "EWRES: Monte Carlo population weighted residual Cov^-1/2(y − E[y]) per subject from the "
             "replicates of new subjects (NONMEM's EWRES); CWRES: NONMEM's conditional weighted residual, the FOCE "
             "linearisation around each subject's conditional mode of η at the posterior-median THETA/OMEGA/SIGMA "
             "(Hooker et al. 2007; an approximation where the model is far from linear in η); "
             "IWRES: individual weighted residual. Red: LOWESS smoother. BLQ records are left out."),
        image(plots.gof(sd, syn), "goodness of fit"))  # fmt: skip
    add("npde", "NPDE",
        text(f"{n_replicates} replicates of NEW subjects (η from Ω, one per posterior draw) at each subject's "
             "observed design; decorrelated within subject (Brendel 2006, Comets 2008; BLQ as randomised "
             "ranks on the censored scale). Tests: mean 0 (t-test), variance 1 (Fisher), normality "
             "(Shapiro–Wilk), Bonferroni global p."),
        table(nd_tests), image(plots.npde_panels(nd, nd_tests, syn), "NPDE"))  # fmt: skip
    pa, co = patab(fit), cotab(fit)
    etas = pa[["ID"] + [c for c in pa.columns if c.startswith("ETA")]].merge(co[["ID", "DOSE"]], on="ID")
    eta_names = dict(sd_all.attrs.get("eta_names", {}))
    add("eta", "ETA panels",
        text("ETA_j: posterior mean of subject i's log-scale deviation ω·η_i (the patab's ETA columns); "
             "histograms should centre on 0; a trend against dose suggests a dose effect the model lacks."),
        image(plots.eta_panels(etas, eta_names, syn), "ETA panels"))  # fmt: skip
    add("vpc", "Visual predictive checks (VPC and pcVPC)",
        text("The same replicates, censored at each record's LLOQ. Bins: nominal sampling days; BLQ values "
             "ranked below the LLOQ; prediction correction after Bergstrand et al. (2011)."),
        dict(kind="heading", body="VPC"), image(plots.vpc_bands(vpc_table(reps), syn), "VPC"),
        dict(kind="heading", body="Prediction-corrected VPC"),
        image(plots.vpc_bands(vpc_table(reps, pc=True), syn), "pcVPC"))  # fmt: skip
    pages = individual_pages(curves, sd, syn, subjects_per_page)
    add("individual", "Individual fits",
        text(f"All {curves.sizes['subject']} subjects on {len(pages)} page(s) of up to {subjects_per_page}: "
             "posterior median and 90% band; open triangles are BLQ records drawn at their LLOQ."),
        *[dict(kind="image", alt=cap, caption=cap, body=png) for cap, png in pages])  # fmt: skip
    if folder is not None:
        found = _found(folder, "compare.csv")
        if found:
            add("loo", "Model comparison (PSIS-LOO)",
                text("elpd in nats (higher is better); elpd_diff and dse against the best model; unit: "
                     "what was left out (a record, or a subject with its η integrated out); k_bad/"
                     "k_very_bad: units whose Pareto k makes that fit's elpd unreliable."),
                *_csv_blocks(found, folder, _loo_columns))  # fmt: skip
        found = _found(folder, "remission.csv")
        if found:
            add("remission", "Remission predictions",
                text("P(DORIS) and P(LLDAS) of new patients (carnk-pkpd predict): median and 90% interval."),
                *_csv_blocks(found, folder, _main_columns))  # fmt: skip
        found = _found(folder, "ranking.csv")
        if found:
            add("doses", "Dose ranking",
                text("Regimens ranked by utility (carnk-pkpd doses): medians shown; 90% intervals and Monte "
                     "Carlo errors are in the file."),
                *_csv_blocks(found, folder, _main_columns))  # fmt: skip
    add("trace", "Traces and rank plots", image(plots.trace_rank(fit), "traces"))
    add("priors", "Prior vs posterior", image(plots.prior_posterior(fit), "prior vs posterior"))
    subj = subject_table(fit, min(n_draws, 50), seed)
    add("subjects", "Per-subject parameters and derived metrics (median, 90% interval)",
        table(subj.pivot(index="ID", columns="quantity", values="median").reset_index()
              .rename_axis(columns=None), "Posterior medians (intervals in subjects.csv of carnk-pkpd export)"))  # fmt: skip
    add("manifest", "Manifest", dict(kind="pre", body=json.dumps(fit.manifest, indent=1, default=str)))

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("carnk_pkpd") / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2").render(
        synthetic=syn,
        name=folder.name if folder is not None else "fit",
        provenance=provenance_lines(fit, command="report"),
        model=str(fit.spec.name),
        n_subjects=len(fit.cohort.subjects),
        n_records=int(sd.shape[0]),
        n_blq=int(sd["BLQ"].sum()),
        n_draws=n_draws,
        n_replicates=n_replicates,
        sections=sections,
    )


def report_path(fit: Any, out: str | os.PathLike | None = None) -> Path:
    """Where the report goes (``out``, default ``<fit>/report.html``), checked against the output rule:
    an existing file is replaced only when it is an earlier report (raises ``OutputRefused``)."""
    from carnk_pkpd.atomic import check_output_files
    from carnk_pkpd.fits import output_path

    dest = output_path(fit, out, "report.html", what="file")
    if dest.is_dir():
        raise ValueError(f"{dest} is a folder (expected a file name such as report.html)")
    check_output_files(dest.parent, [dest.name], command="report")
    return dest


def write_report(
    fit: Any,
    out: str | os.PathLike | None = None,
    n_draws: int = 100,
    seed: int = 0,
    n_replicates: int = 500,
    cwres: bool = True,
) -> Path:
    """Render the report and write it atomically to ``out`` (default ``<fit>/report.html``); the output
    rule of :mod:`carnk_pkpd.atomic` applies (see :func:`report_path`)."""
    from carnk_pkpd.atomic import output_files

    dest = report_path(fit, out)
    text = render_report(fit, n_draws, seed, n_replicates, cwres=cwres)
    with output_files(dest.parent, command="report") as tmp:
        (tmp / dest.name).write_text(text, encoding="utf-8")
    return dest
