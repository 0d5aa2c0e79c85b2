"""One self-contained HTML report of a fit: tables, diagnostics, manifest and plots (base64 PNG).

Sections (HTML ids): ``parameters``, ``shrinkage``, ``diagnostics``, ``gof``, ``vpc``, ``individual``,
``trace``, ``priors``, ``subjects``, ``manifest``. Written atomically (temporary file, then
``os.replace``).
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SECTIONS = ("parameters", "shrinkage", "diagnostics", "gof", "vpc", "individual", "trace", "priors",
            "subjects", "manifest")  # fmt: skip

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eee}td:first-child,td:nth-child(2){text-align:left}
.banner{background:#b00;color:#fff;font-weight:bold;padding:0.6em;font-size:1.2em}
.bad{color:#b00}.ok{color:#070}img{max-width:100%}pre{background:#f6f6f6;padding:0.5em;font-size:11px}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, (bool, np.bool_)):
            return "FIX" if v else ""
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n{body}\n</section>\n'


def render_report(fit: Any, n_draws: int = 100, seed: int = 0) -> str:
    """The report as an HTML string (see the module docstring for its sections)."""
    from carnk_pkpd import plots
    from carnk_pkpd.evaluation import npde, npde_tests, simulate_replicates, vpc_table
    from carnk_pkpd.export import parameter_table, sdtab, subject_table
    from carnk_pkpd.predictive import individual_curves, posterior_predictive

    syn = fit.synthetic
    ppc = posterior_predictive(fit, n_draws, seed)
    reps = simulate_replicates(fit, 500, seed)  # new subjects at the observed design (VPC, NPDE)
    sd = sdtab(fit, n_draws, seed, ppc=ppc, replicates=reps)
    par = parameter_table(fit, sdtab_df=sd)
    sd = sd[sd["EVID"] == 0]  # the fitted concentration records (the sdtab also lists dosing records)
    nd = npde(reps, seed)
    nd_tests = npde_tests(nd)
    subj = subject_table(fit, min(n_draws, 50), seed)
    curves = individual_curves(fit, min(n_draws, 50), seed)
    name = Path(fit.path).name if fit.path is not None else "fit"
    from carnk_pkpd.provenance import provenance_lines

    prov = provenance_lines(fit, command="report")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        *(f"<!-- {html.escape(line)} -->" for line in prov),
        f'<meta name="generator" content="{html.escape(prov[-1])}">',
        f"<title>{'SYNTHETIC — ' if syn else ''}carnk-pkpd report: {html.escape(name)}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    if syn:
        parts.append(
            '<div class="banner" id="synthetic-banner">SYNTHETIC DATA: every number and plot in this report '
            "describes simulated patients, not trial data.</div>"
        )
    parts.append(f"<h1>Population PK/PD fit: {html.escape(name)}</h1>")
    parts.append(f'<p class="provenance">{html.escape(prov[-1])}</p>')
    parts.append(
        f"<p>Model <b>{html.escape(str(fit.spec.name))}</b>; {len(fit.cohort.subjects)} subjects; "
        f"{sd.shape[0]} concentration records ({int(sd['BLQ'].sum())} BLQ); predictions from {n_draws} "
        "thinned posterior draws.</p>"
    )
    cols = ["label", "name", "unit", "prior", "fixed", "median", "mean", "sd", "q05", "q95", "q025", "q975",
            "rse_pct", "stdev", "cv_pct", "shrinkage_pct", "ess_bulk", "r_hat"]  # fmt: skip
    body = ""
    for kind, text in (("THETA", "THETA: typical values (natural units)"),
                       ("OMEGA", "OMEGA: between-subject variance ω² on the log scale (SD ω in stdev); "
                                 "CV% = 100·sqrt(exp(ω²) − 1); shrinkage: η-shrinkage"),
                       ("SIGMA", "SIGMA: residual variances (log-scale, proportional, additive; SD in stdev); "
                                 "shrinkage: ε-shrinkage = 1 − SD(IWRES)"),
                       ("DL", "Dose-level tier values")):  # fmt: skip
        sub = par[par["kind"] == kind]
        if len(sub):
            body += f"<h3>{html.escape(text)}</h3>" + _table(sub[cols])
    body += "<p>OMEGA is diagonal: no between-subject correlations are estimated.</p>"
    parts.append(_section("parameters", "Parameters (THETA / OMEGA / SIGMA)", body))
    om = par[(par["kind"] == "OMEGA") & par["shrinkage_pct"].notna()]
    parts.append(_section(
        "shrinkage", "η-shrinkage",
        "<p>Shrinkage = 1 − SD<sub>i</sub>(posterior mean of ω·η<sub>i</sub>) / posterior mean of ω "
        "(SD over subjects, ddof = 1). Above about 30%, individual-parameter plots are unreliable.</p>"
        + _table(om[["label", "name", "median", "stdev", "cv_pct", "shrinkage_pct"]])
        + _img(plots.png_bytes(plots.shrinkage_bar(par, syn)), "shrinkage"),
    ))  # fmt: skip
    diag = fit.diagnostics.to_dict() if fit.diagnostics is not None else {}
    status = ('<p class="ok">All sampler checks passed.</p>' if diag.get("ok") else
              '<p class="bad">The fit FAILS its sampler diagnostics: treat estimates as provisional.</p>')  # fmt: skip
    drows = pd.DataFrame([(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)
                          for k, v in diag.items()], columns=["check", "value"])  # fmt: skip
    parts.append(_section("diagnostics", "Sampler diagnostics", status + _table(drows)))
    parts.append(_section(
        "gof", "Goodness of fit",
        "<p>PRED: typical-value prediction (η = 0, posterior-median parameters). IPRED: posterior median of "
        "the individual prediction. PDE_FITTED (not an NPDE): Φ⁻¹ of the posterior-predictive probability of DV "
        "from replicates of the fitted subjects (BLQ records "
        "imputed uniformly below P(y<sub>rep</sub> &lt; LLOQ); no within-subject decorrelation).</p>"
        + _img(plots.png_bytes(plots.gof(sd, syn)), "goodness of fit"),
    ))  # fmt: skip
    parts.append(_section(
        "vpc", "Visual predictive checks and NPDE",
        "<p>500 replicates of NEW subjects (η from Ω, one per posterior draw) at each subject's observed "
        "design, censored at each record's LLOQ. Bins: nominal sampling days; BLQ values ranked below the "
        "LLOQ; pcVPC after Bergstrand et al. (2011). NPDE: decorrelated within subject (Brendel 2006, "
        "Comets 2008; BLQ as randomised ranks on the censored scale).</p>"
        "<h3>VPC</h3>" + _img(plots.png_bytes(plots.vpc_bands(vpc_table(reps), syn)), "VPC")
        + "<h3>Prediction-corrected VPC</h3>"
        + _img(plots.png_bytes(plots.vpc_bands(vpc_table(reps, pc=True), syn)), "pcVPC")
        + "<h3>NPDE</h3>" + _table(nd_tests)
        + _img(plots.png_bytes(plots.npde_panels(nd, nd_tests, syn)), "NPDE"),
    ))  # fmt: skip
    parts.append(_section(
        "individual", "Individual fits",
        "<p>Posterior median and 90% band; open triangles are BLQ records drawn at their LLOQ.</p>"
        + _img(plots.png_bytes(plots.individual_fits(curves, sd, syn)), "individual fits"),
    ))  # fmt: skip
    parts.append(
        _section("trace", "Traces and rank plots", _img(plots.png_bytes(plots.trace_rank(fit)), "traces"))
    )
    parts.append(_section("priors", "Prior vs posterior",
                          _img(plots.png_bytes(plots.prior_posterior(fit)), "prior vs posterior")))  # fmt: skip
    parts.append(_section("subjects", "Per-subject parameters and derived metrics (median, 90% interval)",
                          _table(subj)))  # fmt: skip
    parts.append(_section("manifest", "Manifest",
                          f"<pre>{html.escape(json.dumps(fit.manifest, indent=1, default=str))}</pre>"))  # fmt: skip
    parts.append("</body></html>\n")
    return "\n".join(parts)


def report_path(fit: Any, out: str | os.PathLike | None = None) -> Path:
    """Where the report goes (``out``, default ``<fit>/report.html``), checked against the output rule:
    an existing file is replaced only when it is an earlier report (raises ``OutputRefused``)."""
    from carnk_pkpd.atomic import check_output_files

    if out is None:
        if fit.path is None:
            raise ValueError("the fit has no folder; give an output file")
        out = Path(fit.path) / "report.html"
    dest = Path(out)
    if dest.is_dir():
        raise ValueError(f"{dest} is a folder (expected a file name such as report.html)")
    check_output_files(dest.parent, [dest.name], command="report")
    return dest


def write_report(fit: Any, out: str | os.PathLike | None = None, n_draws: int = 100, seed: int = 0) -> Path:
    """Render the report and write it atomically to ``out`` (default ``<fit>/report.html``); the output
    rule of :mod:`carnk_pkpd.atomic` applies (see :func:`report_path`)."""
    from carnk_pkpd.atomic import output_files

    dest = report_path(fit, out)
    text = render_report(fit, n_draws, seed)
    with output_files(dest.parent, command="report") as tmp:
        (tmp / dest.name).write_text(text, encoding="utf-8")
    return dest
