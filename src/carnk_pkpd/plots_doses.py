"""Plots of the dose search (matplotlib, Agg): remission against dose, and median trajectories.

Bands are 90% intervals across posterior draws of the population quantity (parameter uncertainty).
Titles say SYNTHETIC when the fit is synthetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(ds: xr.Dataset, text: str) -> str:
    return ("SYNTHETIC — " if ds.attrs.get("synthetic") else "") + text


def _q(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.quantile(x, [0.05, 0.5, 0.95], axis=axis)


def plot_remission(ds: xr.Dataset, path: str | Path) -> Path:
    """P(DORIS) and P(LLDAS) at 12 months against dose per infusion, one line per schedule
    (interval × number of infusions × lymphodepletion), with 90% bands."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    sched = sorted(
        {
            (float(i), int(n), float(ld))
            for i, n, ld in zip(
                ds["interval"].values, ds["n_infusions"].values, ds["ld_scale"].values, strict=True
            )
        }
    )
    colors = plt.get_cmap("tab10")
    for ax, var, name in zip(axes, ("p_doris_12m", "p_lldas_12m"), ("DORIS", "LLDAS"), strict=True):
        for k, (iv, n, ld) in enumerate(sched):
            m = (
                (ds["interval"].values == iv)
                & (ds["n_infusions"].values == n)
                & (ds["ld_scale"].values == ld)
            )
            idx = np.flatnonzero(m)
            idx = idx[np.argsort(ds["dose"].values[idx])]
            dose = ds["dose"].values[idx]
            q = _q(ds[var].values[idx], axis=1)
            lab = f"{n}× q{iv:g}d" + ("" if ld == 1 else (" no LD" if ld == 0 else f" LD×{ld:g}"))
            c = colors(k % 10)
            ax.plot(dose, q[1], "o-", color=c, label=lab)
            ax.fill_between(dose, q[0], q[2], color=c, alpha=0.15)
        ax.set_xlabel("dose per infusion (10⁹ CAR-NK cells)")
        ax.set_title(f"P({name} at 12 months)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probability (median, 90% band over posterior draws)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(_title(ds, "Remission against dose"), fontweight="bold")
    fig.text(0.01, 0.01, f"remission: {ds.attrs.get('remission_source', '')}", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(ds: xr.Dataset, path: str | Path, max_regimens: int = 8) -> Path:
    """Median B-cell and CAR-NK trajectories with 90% bands for the top regimens by utility."""
    plt = _plt()
    order = np.argsort(-ds["utility"].mean("draw").values, kind="stable")[:max_regimens]
    fig, (ax_c, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10")
    for k, r in enumerate(order):
        c = colors(k % 10)
        lab = str(ds["label"].values[r])
        qb = _q(ds["b_traj"].values[r], axis=0)
        ax_b.plot(ds["time_b"], qb[1], color=c, label=lab)
        ax_b.fill_between(ds["time_b"], qb[0], qb[2], color=c, alpha=0.12)
        qc = _q(ds["car_traj"].values[r], axis=0)
        ax_c.plot(ds["time_car"], qc[1], color=c, label=lab)
        ax_c.fill_between(ds["time_car"], qc[0], qc[2], color=c, alpha=0.12)
    ax_b.set_yscale("symlog", linthresh=1.0)
    ax_b.axhline(1.0, color="k", ls=":", lw=1)
    ax_b.axhline(10.0, color="grey", ls=":", lw=1)
    ax_b.set_xlabel("days since the first infusion")
    ax_b.set_ylabel("CD19+ B cells (cells/µL), median patient")
    ax_b.set_title("B cells (dotted: 1 and 10 /µL)")
    ax_c.set_yscale("symlog", linthresh=0.1)
    ax_c.set_xlabel("days since the first infusion")
    ax_c.set_ylabel("CAR-NK cells (cells/µL), median patient")
    ax_c.set_title("CAR-NK cells")
    for ax in (ax_b, ax_c):
        ax.grid(alpha=0.3)
    ax_b.legend(fontsize=8)
    fig.suptitle(
        _title(ds, "Median trajectories, top regimens (90% band over posterior draws)"), fontweight="bold"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(ds: xr.Dataset, folder: str | Path) -> list[Path]:
    """Write ``remission_vs_dose.png`` and ``trajectories.png`` into ``folder``."""
    folder = Path(folder)
    return [
        plot_remission(ds, folder / "remission_vs_dose.png"),
        plot_trajectories(ds, folder / "trajectories.png"),
    ]
