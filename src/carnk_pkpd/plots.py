"""Diagnostic plots of a fit (matplotlib, Agg backend): GOF, VPC/pcVPC, individual fits, traces,
prior vs posterior, shrinkage. Each function returns a Figure; :func:`png_bytes` renders it.

Concentrations are in each DVID's unit (cells/µL for DVIDs 1–2, copies/µg for DVID 3), time in days
since the first infusion. Titles carry "SYNTHETIC" when the data were simulated.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DVID_LABEL = {1: "CAR-NK flow (cells/µL)", 2: "B cells (cells/µL)", 3: "CAR qPCR (copies/µg)"}
DVID_COLOR = {1: "tab:red", 2: "tab:blue", 3: "tab:purple"}


def _title(text: str, synthetic: bool) -> str:
    return f"SYNTHETIC — {text}" if synthetic else text


def png_bytes(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (the figure is closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def gof(sd: pd.DataFrame, synthetic: bool = False) -> Figure:
    """DV vs PRED and vs IPRED (log axes, BLQ records left out) and PDE_FITTED vs time (BLQ hollow)."""
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.5))
    obs = sd[(sd["BLQ"] == 0) & (sd["DV"] > 0)]
    for k, col in enumerate(("PRED", "IPRED")):
        a = ax[k]
        for dvid, g in obs.groupby("DVID"):
            ok = g[col] > 0
            a.scatter(g[col][ok], g["DV"][ok], s=14, alpha=0.7, color=DVID_COLOR.get(dvid, "k"),
                      label=DVID_LABEL.get(dvid, f"DVID {dvid}"))  # fmt: skip
        vals = np.concatenate([obs["DV"].to_numpy(), obs[col].to_numpy()])
        vals = vals[vals > 0]
        if vals.size:
            lo, hi = vals.min() / 2, vals.max() * 2
            a.plot([lo, hi], [lo, hi], "k--", lw=1)
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(f"{col} (record unit)")
        a.set_ylabel("DV (record unit)")
        a.set_title(_title(f"DV vs {col}", synthetic))
    ax[0].legend(fontsize=7)
    a = ax[2]
    for dvid, g in sd.groupby("DVID"):
        c = DVID_COLOR.get(dvid, "k")
        b = g["BLQ"] == 1
        a.scatter(g["TIME"][~b], g["PDE_FITTED"][~b], s=14, color=c, alpha=0.7, label=DVID_LABEL.get(dvid))
        a.scatter(g["TIME"][b], g["PDE_FITTED"][b], s=18, facecolors="none", edgecolors=c)
    for y in (-1.96, 0, 1.96):
        a.axhline(y, color="grey", ls="--" if y else "-", lw=1)
    a.set_xlabel("time (days)")
    a.set_ylabel("PDE_FITTED (fitted subjects' replicates; not NPDE)")
    a.set_title(_title("PDE_FITTED vs time (hollow: BLQ)", synthetic))
    fig.tight_layout()
    return fig


def _bins(t: np.ndarray, n_bins: int = 8) -> np.ndarray:
    """Bin index per time: quantile bins on the distinct times (at most ``n_bins``)."""
    u = np.unique(t)
    if u.size <= n_bins:
        return np.searchsorted(u, t)
    edges = np.unique(np.quantile(u, np.linspace(0, 1, n_bins + 1)))
    return np.clip(np.searchsorted(edges, t, side="right") - 1, 0, edges.size - 2)


def _cens_pct(y: np.ndarray, cens: np.ndarray, q: float, axis: int = -1) -> np.ndarray:
    """Percentile with censored values placed below everything; NaN where it falls among them."""
    z = np.where(cens, -np.inf, y)
    with np.errstate(invalid="ignore"):
        p = np.percentile(z, q, axis=axis)
    return np.where(np.isfinite(p), p, np.nan)


def vpc(ppc: xr.Dataset, pred: np.ndarray | None = None, synthetic: bool = False, n_bins: int = 8) -> Figure:
    """VPC (or prediction-corrected VPC when ``pred`` is given), one row per DVID.

    Left: observed 5th/50th/95th percentiles (BLQ counted below the LLOQ; percentiles that fall
    below it are not drawn) against 90% bands of the same percentiles over posterior replicates.
    Right: observed fraction BLQ against the 90% band of the replicated fraction.
    pcVPC multiplies DV and ``y_rep`` by ``median(PRED in bin) / PRED``.
    """
    dvids = sorted(set(ppc["DVID"].values.tolist()))
    fig, axes = plt.subplots(len(dvids), 2, figsize=(13, 3.8 * len(dvids)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.3]})  # fmt: skip
    kind = "pcVPC" if pred is not None else "VPC"
    for row, dvid in enumerate(dvids):
        sel = np.flatnonzero(ppc["DVID"].values == dvid)
        t = ppc["TIME"].values[sel]
        dv = ppc["DV"].values[sel].astype(float)
        blq = ppc["BLQ"].values[sel] == 1
        y = ppc["y_rep"].values[:, sel]
        yb = ppc["blq_rep"].values[:, sel]
        lloq = float(np.median(ppc["LLOQ"].values[sel]))
        b = _bins(t, n_bins)
        nb = int(b.max()) + 1
        if pred is not None:
            p = np.asarray(pred)[sel]
            med = np.array([np.median(p[b == k]) for k in range(nb)])
            f = med[b] / np.where(p > 0, p, np.nan)
            f = np.where(np.isfinite(f), f, 1.0)
            dv, y = dv * f, y * f
        tmid = np.array([np.median(t[b == k]) for k in range(nb)])
        a, a2 = axes[row]
        a.scatter(t[~blq], dv[~blq], s=8, color="grey", alpha=0.5, zorder=1)
        for q, style in ((5, "--"), (50, "-"), (95, "--")):
            obs_q = np.array([_cens_pct(dv[b == k], blq[b == k], q) for k in range(nb)])
            sim_q = np.stack([_cens_pct(y[:, b == k], yb[:, b == k], q, axis=1) for k in range(nb)], axis=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = np.nanpercentile(sim_q, [5, 95], axis=0)
            color = "tab:red" if q == 50 else "tab:blue"
            a.fill_between(tmid, lo, hi, color=color, alpha=0.2, lw=0)
            a.plot(tmid, obs_q, style, color="k", lw=1.5, marker="o", ms=3)
        a.axhline(lloq, color="tab:green", ls=":", lw=1)
        a.set_yscale("log")
        a.set_xlabel("time (days)")
        a.set_ylabel(("pred.-corrected " if pred is not None else "") + DVID_LABEL.get(dvid, f"DVID {dvid}"))
        a.set_title(_title(f"{kind} DVID {dvid}: observed 5/50/95% (black) vs simulated 90% bands", synthetic),
                    fontsize=9)  # fmt: skip
        obs_f = np.array([blq[b == k].mean() for k in range(nb)])
        sim_f = np.stack([yb[:, b == k].mean(axis=1) for k in range(nb)], axis=1)
        lo, hi = np.percentile(sim_f, [5, 95], axis=0)
        a2.fill_between(tmid, lo, hi, color="tab:green", alpha=0.3, lw=0)
        a2.plot(tmid, obs_f, "k-o", ms=3)
        a2.set_ylim(-0.02, 1.02)
        a2.set_xlabel("time (days)")
        a2.set_ylabel("fraction BLQ")
        a2.set_title(_title(f"BLQ fraction DVID {dvid}", synthetic), fontsize=9)
    fig.tight_layout()
    return fig


def individual_fits(
    curves: xr.Dataset, sd: pd.DataFrame, synthetic: bool = False, max_subjects: int = 12
) -> Figure:
    """Per subject: CAR-NK (DVID 1) and B cells (DVID 2), posterior median and 90% band, data, BLQ.

    BLQ records are drawn as open triangles at their LLOQ.
    """
    ids = [str(s) for s in curves["subject"].values][:max_subjects]
    fig, axes = plt.subplots(len(ids), 2, figsize=(11, 2.6 * len(ids)), squeeze=False)
    for i, sid in enumerate(ids):
        t = curves["time"].values[i]
        for j, (var, dvid) in enumerate((("car", 1), ("bcell", 2))):
            a = axes[i, j]
            v = curves[var].values[:, i, :]
            lo, med, hi = np.nanpercentile(v, [5, 50, 95], axis=0)
            c = DVID_COLOR[dvid]
            a.fill_between(t, np.maximum(lo, 1e-3), np.maximum(hi, 1e-3), color=c, alpha=0.25, lw=0)
            a.plot(t, np.maximum(med, 1e-3), color=c, lw=1.5)
            g = sd[(sd["ID"].astype(str) == sid) & (sd["DVID"] == dvid)]
            ob = g[g["BLQ"] == 0]
            bl = g[g["BLQ"] == 1]
            a.scatter(ob["TIME"], ob["DV"], s=14, color="k", zorder=3)
            a.scatter(bl["TIME"], bl["LLOQ"], s=22, marker="v", facecolors="none", edgecolors="k", zorder=3)
            a.set_yscale("log")
            a.set_ylim(bottom=1e-2)
            a.set_title(_title(f"subject {sid}: {DVID_LABEL[dvid]}", synthetic), fontsize=9)
            a.set_xlabel("time (days)")
    fig.tight_layout()
    return fig


def _typical_names(fit: Any) -> list[str]:
    post = fit.posterior
    return [p for p in fit.spec.parameters if p in post and set(post[p].dims) == {"chain", "draw"}]


def trace_rank(fit: Any) -> Figure:
    """Trace (left) and rank histograms per chain (right) of the estimated typical values."""
    post = fit.posterior
    names = _typical_names(fit) + [v for v in post.data_vars if v.startswith(("omega_", "sigma_"))
                                   and set(post[v].dims) == {"chain", "draw"}]  # fmt: skip
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 1.6 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        x = post[name].transpose("chain", "draw").values
        ranks = np.argsort(np.argsort(x.ravel())).reshape(x.shape)
        bins = np.linspace(0, x.size, 11)
        for c in range(x.shape[0]):
            axes[i, 0].plot(x[c], lw=0.7)
            axes[i, 1].hist(ranks[c], bins=bins, histtype="step", lw=1.2)
        axes[i, 0].set_ylabel(name, fontsize=8)
        axes[i, 1].set_yticks([])
    axes[0, 0].set_title(_title("traces (one colour per chain)", fit.synthetic), fontsize=9)
    axes[0, 1].set_title(_title("rank histograms (flat = mixed)", fit.synthetic), fontsize=9)
    fig.tight_layout()
    return fig


def _prior_pdf(prior: dict[str, Any], x: np.ndarray) -> np.ndarray | None:
    from scipy import stats

    d = prior.get("dist")
    if d == "LogNormal":
        return stats.lognorm.pdf(x, s=prior["sigma"], scale=np.exp(prior["mu"]))
    if d == "Normal":
        a = -prior["mu"] / prior["sigma"]
        return stats.truncnorm.pdf(x, a, np.inf, loc=prior["mu"], scale=prior["sigma"])
    if d == "HalfNormal":
        return stats.halfnorm.pdf(x, scale=prior["sigma"])
    if d == "Beta":
        return stats.beta.pdf(x, prior["alpha"], prior["beta"])
    return None


def prior_posterior(fit: Any) -> Figure:
    """Prior density (line) and posterior histogram of each estimated typical value."""
    names = _typical_names(fit)
    ncol = 4
    nrow = max(1, int(np.ceil(len(names) / ncol)))
    fig, axes = plt.subplots(nrow, ncol, figsize=(13, 2.6 * nrow), squeeze=False)
    for ax in axes.ravel()[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        par = fit.spec.parameters[name]
        x = fit.posterior[name].values.ravel()
        ax.hist(x, bins=30, density=True, color="tab:blue", alpha=0.5, label="posterior")
        lo, hi = np.quantile(x, [0.001, 0.999])
        span = hi - lo if hi > lo else max(abs(hi), 1.0)
        grid = np.linspace(max(lo - span, 1e-12), hi + span, 300)
        pdf = _prior_pdf(par.prior or {}, grid)
        if pdf is not None:
            ax.plot(grid, pdf, "k-", lw=1.2, label="prior")
        ax.set_title(f"{name} ({par.unit})", fontsize=9)
        ax.set_yticks([])
    if names:
        axes[0, 0].legend(fontsize=7)
    fig.suptitle(_title("prior vs posterior of the typical values", fit.synthetic))
    fig.tight_layout()
    return fig


def shrinkage_bar(table: pd.DataFrame, synthetic: bool = False) -> Figure:
    """η-shrinkage (%) per BSV parameter from :func:`carnk_pkpd.export.parameter_table`."""
    om = table[(table["kind"] == "OMEGA") & table["shrinkage_pct"].notna()]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(om["name"].str.removeprefix("omega_"), om["shrinkage_pct"], color="tab:orange")
    ax.axhline(30, color="grey", ls="--", lw=1)
    ax.set_ylabel("η-shrinkage (%)")
    ax.set_title(_title("η-shrinkage per BSV parameter (dashed: 30%)", synthetic), fontsize=9)
    fig.tight_layout()
    return fig


# --- simulation-based evaluation (carnk_pkpd.evaluation) ---------------------------------------------
def vpc_bands(table: pd.DataFrame, synthetic: bool = False) -> Figure:
    """VPC / pcVPC from :func:`carnk_pkpd.evaluation.vpc_table`: one row per DVID and stratum.

    Left: observed 5th/50th/95th percentiles (points and lines) against the replicates' 90% interval
    of each percentile (shaded), log y axis, LLOQ dashed; a percentile below the LLOQ is not drawn.
    Right: observed fraction BLQ against the replicates' 90% interval. Bins = nominal sampling days.
    """
    pc = bool(table.attrs.get("pc", False))
    kind = "pcVPC (prediction-corrected)" if pc else "VPC"
    keys = list(table[["DVID", "stratum"]].drop_duplicates().itertuples(index=False, name=None))
    fig, axes = plt.subplots(len(keys), 2, figsize=(13, 3.8 * len(keys)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.3]})  # fmt: skip
    styles = {
        "p05": ("tab:blue", "--", "5th"),
        "p50": ("tab:red", "-", "50th"),
        "p95": ("tab:blue", ":", "95th"),
    }
    for row, (dvid, stratum) in enumerate(keys):
        g = table[(table["DVID"] == dvid) & (table["stratum"] == stratum)].sort_values("bin")
        t = g["TIME"].to_numpy()
        a = axes[row, 0]
        for tag, (color, ls, label) in styles.items():
            lo, hi = g[f"sim_{tag}_lo"].to_numpy(), g[f"sim_{tag}_hi"].to_numpy()
            lo_draw = np.where(np.isnan(lo), g["LLOQ"].to_numpy(), lo)
            a.fill_between(t, lo_draw, hi, color=color, alpha=0.18 if tag != "p50" else 0.25, lw=0,
                           label=f"simulated {label} pct, 90% interval")  # fmt: skip
            a.plot(
                t, g[f"obs_{tag}"], color=color, ls=ls, marker="o", ms=3, label=f"observed {label} percentile"
            )
        a.plot(t, g["LLOQ"], color="grey", ls="--", lw=1, label="LLOQ")
        a.set_yscale("log")
        a.set_xlabel("time (days since first infusion)")
        unit = DVID_LABEL.get(int(dvid), f"DVID {dvid}")
        a.set_ylabel(("prediction-corrected " if pc else "") + unit)
        strat = "" if stratum == "all" else f", dose level {stratum}"
        a.set_title(_title(f"{kind}: {unit}{strat}", synthetic), fontsize=9)
        a.legend(fontsize=6, ncol=2, loc="best")
        b = axes[row, 1]
        b.fill_between(t, g["blq_sim_lo"], g["blq_sim_hi"], color="grey", alpha=0.3, lw=0,
                       label="simulated 90% interval")  # fmt: skip
        b.plot(t, g["blq_obs"], "ko-", ms=3, label="observed")
        b.set_ylim(-0.02, 1.02)
        b.set_xlabel("time (days since first infusion)")
        b.set_ylabel("fraction below LLOQ")
        b.set_title("BLQ fraction", fontsize=9)
        b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def npde_panels(df: pd.DataFrame, tests: pd.DataFrame | None = None, synthetic: bool = False) -> Figure:
    """NPDE diagnostics from :func:`carnk_pkpd.evaluation.npde`, one row per DVID: QQ plot against
    N(0, 1), NPDE vs time and NPDE vs PRED (BLQ records hollow), with mean/variance in the title."""
    dvids = sorted(df["DVID"].unique().tolist())
    fig, axes = plt.subplots(len(dvids), 3, figsize=(14, 3.8 * len(dvids)), squeeze=False)
    from scipy.stats import norm

    for row, dvid in enumerate(dvids):
        g = df[df["DVID"] == dvid]
        z = g["npde"].to_numpy(float)
        c = DVID_COLOR.get(int(dvid), "k")
        label = DVID_LABEL.get(int(dvid), f"DVID {dvid}")
        stats = ""
        if tests is not None and (tests["DVID"] == dvid).any():
            r = tests[tests["DVID"] == dvid].iloc[0]
            stats = f" mean {r['mean']:.2f}, var {r['variance']:.2f}, global p {r['global_p']:.2g}"
        a = axes[row, 0]
        q = norm.ppf((np.arange(1, z.size + 1) - 0.5) / max(z.size, 1))
        a.scatter(q, np.sort(z), s=8, color=c, label="NPDE")
        a.plot([-3.5, 3.5], [-3.5, 3.5], "k--", lw=1, label="N(0, 1)")
        a.set_xlabel("theoretical N(0, 1) quantile")
        a.set_ylabel("NPDE quantile")
        a.set_title(_title(f"{label}: QQ{stats}", synthetic), fontsize=9)
        a.legend(fontsize=7)
        blq = g["BLQ"].to_numpy() == 1
        for k, (col, xlabel, log) in enumerate(
            (
                ("TIME", "time (days since first infusion)", False),
                ("PRED", f"PRED ({label}; < 1e-3 shown at 1e-3)", True),
            )
        ):
            a = axes[row, k + 1]
            x = g[col].to_numpy(float)
            if log:  # PRED is 0 before the first infusion and tiny after rejection: shown at 1e-3
                x = np.maximum(x, 1e-3)
            a.scatter(x[~blq], z[~blq], s=10, color=c, alpha=0.7, label="measured")
            a.scatter(x[blq], z[blq], s=12, facecolors="none", edgecolors=c, label="BLQ (randomised rank)")
            for yv in (-1.96, 0, 1.96):
                a.axhline(yv, color="grey", ls="--" if yv else "-", lw=1)
            if log:
                a.set_xscale("log")
            a.set_xlabel(xlabel)
            a.set_ylabel("NPDE")
            a.set_title(f"NPDE vs {col}", fontsize=9)
            a.legend(fontsize=7)
    fig.tight_layout()
    return fig
