"""Diagnostic plots of a fit (matplotlib, Agg backend): GOF, VPC/pcVPC, individual fits, traces,
prior vs posterior, shrinkage. Each function returns a Figure; :func:`png_bytes` renders it.

Concentrations are in each DVID's unit (cells/µL for DVIDs 1–2, copies/µg for DVID 3), time in days
since the first infusion. Titles carry "SYNTHETIC" when the data were simulated.
"""

from __future__ import annotations

import io
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


def lowess(x: np.ndarray, y: np.ndarray, frac: float = 2 / 3, iterations: int = 2) -> np.ndarray:
    """LOWESS smoother (Cleveland 1979): the fitted value at each ``x`` (returned in the input order).

    Locally weighted linear regression on the ``ceil(frac·n)`` nearest points with tricube weights,
    then ``iterations`` robustness passes with bisquare weights on the residuals (6 × their median
    absolute value), as in Cleveland's algorithm and ``statsmodels.nonparametric.lowess`` (without
    its ``delta`` interpolation shortcut). Non-finite pairs get NaN. Units: those of ``y``.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    out = np.full(x.shape, np.nan)
    ok = np.isfinite(x) & np.isfinite(y)
    xs, ys = x[ok], y[ok]
    n = xs.size
    if n < 3:
        out[ok] = ys
        return out
    r = min(n, max(3, int(np.ceil(frac * n))))
    robust = np.ones(n)
    fit = ys.copy()
    for _ in range(iterations + 1):
        for i in range(n):
            d = np.abs(xs - xs[i])
            h = np.partition(d, r - 1)[r - 1]
            w = np.clip(d / h, 0.0, 1.0) if h > 0 else (d > 0).astype(float)
            w = (1.0 - w**3) ** 3 * robust
            sw = w.sum()
            if sw <= 0:
                fit[i] = ys[i]
                continue
            mx, my = (w @ xs) / sw, (w @ ys) / sw
            sxx = w @ (xs - mx) ** 2
            slope = (w @ ((xs - mx) * (ys - my))) / sxx if sxx > 1e-12 * max(1.0, mx**2) else 0.0
            fit[i] = my + slope * (xs[i] - mx)
        res = ys - fit
        s = np.median(np.abs(res))
        if s <= 0:
            break
        u = np.clip(res / (6.0 * s), -1.0, 1.0)
        robust = (1.0 - u**2) ** 2
    out[ok] = fit
    return out


def _smooth_line(ax: Any, x: np.ndarray, y: np.ndarray, log_x: bool, log_y: bool, **kw: Any) -> bool:
    """Draw the LOWESS of y on x (on the log scale of a log axis); False when too few points (< 5)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if log_x:
        ok &= x > 0
    if log_y:
        ok &= y > 0
    if ok.sum() < 5:
        return False
    tx = np.log(x[ok]) if log_x else x[ok]
    ty = np.log(y[ok]) if log_y else y[ok]
    order = np.argsort(tx)
    sm = lowess(tx[order], ty[order])
    ax.plot(np.exp(tx[order]) if log_x else tx[order], np.exp(sm) if log_y else sm, **kw)
    return True


def gof(sd: pd.DataFrame, synthetic: bool = False) -> Figure:
    """Goodness of fit, one row per DVID (its own axes and unit): DV vs PRED, DV vs IPRED (log axes,
    identity dashed), EWRES and CWRES vs time and IWRES vs IPRED, each with a LOWESS smoother (red).

    ``sd``: the observation rows of :func:`carnk_pkpd.export.sdtab`. BLQ records are left out of the
    DV panels and have no residuals.
    """
    dvids = sorted(int(d) for d in sd["DVID"].unique())
    fig, axes = plt.subplots(len(dvids), 5, figsize=(20, 3.9 * len(dvids)), squeeze=False)
    smooth = dict(color="tab:red", lw=1.8, label="LOWESS")
    for row, dvid in enumerate(dvids):
        g = sd[(sd["DVID"] == dvid) & (sd["BLQ"] == 0)]
        unit = DVID_LABEL.get(dvid, f"DVID {dvid}")
        c = DVID_COLOR.get(dvid, "k")
        for k, col in enumerate(("PRED", "IPRED")):
            a = axes[row, k]
            ok = (g[col] > 0) & (g["DV"] > 0)
            x, y = g[col][ok].to_numpy(float), g["DV"][ok].to_numpy(float)
            a.scatter(x, y, s=12, alpha=0.6, color=c, label="records")
            if x.size:
                lo, hi = min(x.min(), y.min()) / 2, max(x.max(), y.max()) * 2
                a.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
            _smooth_line(a, x, y, True, True, **smooth)
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel(f"{col}, {unit}")
            a.set_ylabel(f"DV, {unit}")
            a.set_title(_title(f"DVID {dvid}: DV vs {col}", synthetic), fontsize=9)
            a.legend(fontsize=7)
        for k, (xcol, ycol, log_x) in enumerate(
            (("TIME", "EWRES", False), ("TIME", "CWRES", False), ("IPRED", "IWRES", True)), start=2
        ):
            a = axes[row, k]
            if ycol not in g or not np.isfinite(g[ycol].to_numpy(float)).any():
                a.set_visible(False)
                continue
            x, y = g[xcol].to_numpy(float), g[ycol].to_numpy(float)
            ok = np.isfinite(y) & (x > 0 if log_x else np.isfinite(x))
            a.scatter(x[ok], y[ok], s=12, alpha=0.6, color=c, label="records")
            _smooth_line(a, x[ok], y[ok], log_x, False, **smooth)
            for yv in (-1.96, 0.0, 1.96):
                a.axhline(yv, color="grey", ls="-" if yv == 0 else "--", lw=1)
            if log_x:
                a.set_xscale("log")
            a.set_xlabel("time (days since first infusion)" if xcol == "TIME" else f"IPRED, {unit}")
            a.set_ylabel(ycol)
            a.set_title(_title(f"DVID {dvid}: {ycol} vs {xcol}", synthetic), fontsize=9)
            a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def individual_fits(
    curves: xr.Dataset,
    sd: pd.DataFrame,
    synthetic: bool = False,
    subjects: list[str] | None = None,
    page: tuple[int, int] | None = None,
) -> Figure:
    """Per subject: CAR-NK (DVID 1) and B cells (DVID 2), posterior median and 90% band, data, BLQ.

    ``subjects``: the IDs to draw (default all in ``curves``), two subjects per row (CAR-NK and B
    cells side by side); ``page = (k, n)`` adds "page k of n" to the title. BLQ records are drawn as
    open triangles at their LLOQ. Cells/µL on a log axis, days since the first infusion.
    """
    all_ids = [str(s) for s in curves["subject"].values]
    ids = all_ids if subjects is None else [str(s) for s in subjects]
    n_rows = int(np.ceil(len(ids) / 2))
    fig, axes = plt.subplots(n_rows, 4, figsize=(15, 2.5 * n_rows), squeeze=False)
    for ax in axes.ravel()[2 * len(ids) :]:
        ax.set_visible(False)
    for i, sid in enumerate(ids):
        s_i = all_ids.index(sid)
        t = curves["time"].values[s_i]
        for j, (var, dvid) in enumerate((("car", 1), ("bcell", 2))):
            a = axes[i // 2, 2 * (i % 2) + j]
            v = curves[var].values[:, s_i, :]
            lo, med, hi = np.nanpercentile(v, [5, 50, 95], axis=0)
            c = DVID_COLOR[dvid]
            a.fill_between(t, np.maximum(lo, 1e-3), np.maximum(hi, 1e-3), color=c, alpha=0.25, lw=0)
            a.plot(t, np.maximum(med, 1e-3), color=c, lw=1.5)
            g = sd[(sd["ID"].astype(str) == sid) & (sd["DVID"] == dvid)]
            ob = g[g["BLQ"] == 0]
            bl = g[g["BLQ"] == 1]
            a.scatter(ob["TIME"], ob["DV"], s=12, color="k", zorder=3)
            a.scatter(bl["TIME"], bl["LLOQ"], s=20, marker="v", facecolors="none", edgecolors="k", zorder=3)
            a.set_yscale("log")
            a.set_ylim(bottom=1e-2)
            a.set_title(f"ID {sid}: {DVID_LABEL[dvid]}", fontsize=8)
            a.tick_params(labelsize=7)
            if i // 2 == n_rows - 1 or i >= len(ids) - 2:
                a.set_xlabel("time (days)", fontsize=8)
    title = "individual fits: posterior median, 90% band; open triangles = BLQ at the LLOQ"
    if page is not None:
        title += f" (page {page[0]} of {page[1]})"
    fig.suptitle(_title(title, synthetic), fontsize=10)
    fig.tight_layout()
    return fig


def eta_panels(etas: pd.DataFrame, eta_names: dict[str, str], synthetic: bool = False) -> Figure:
    """ETA diagnostics, one column per ETA: histogram (top) and ETA vs dose (bottom, by subject).

    ``etas``: one row per subject with ``ETA1``… (log-scale deviations, posterior means) and, when
    known, ``DOSE`` (10⁹ cells per infusion); ``eta_names`` maps ``ETAj`` to its parameter.
    """
    cols = [c for c in etas.columns if c.startswith("ETA")]
    n = max(len(cols), 1)
    fig, axes = plt.subplots(2, n, figsize=(min(3.4 * n, 15), 5.6), squeeze=False)
    for j, col in enumerate(cols):
        x = etas[col].to_numpy(float)
        name = eta_names.get(col, col)
        a = axes[0, j]
        a.hist(x[np.isfinite(x)], bins=min(12, max(3, x.size // 2)), color="tab:orange", alpha=0.7)
        a.axvline(0.0, color="k", lw=1)
        a.set_xlabel(f"{col} ({name}), log scale")
        a.set_title(_title(f"{col} = {name}: mean {np.nanmean(x):+.2f}", synthetic), fontsize=8)
        b = axes[1, j]
        if "DOSE" in etas:
            d = etas["DOSE"].to_numpy(float)
            b.scatter(d, x, s=14, color="tab:orange")
            ok = np.isfinite(d) & np.isfinite(x)
            if np.unique(d[ok]).size >= 3 and _smooth_line(
                b, d[ok], x[ok], False, False, color="tab:red", lw=1.5, label="LOWESS"
            ):
                b.legend(fontsize=7)
            b.set_xlabel("dose per infusion (10⁹ cells)")
        b.axhline(0.0, color="grey", lw=1)
        b.set_ylabel(col)
    if not cols:
        axes[0, 0].text(0.5, 0.5, "no between-subject deviation estimated", ha="center")
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
