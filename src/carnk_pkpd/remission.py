"""Exposure metrics with uncertainty, and the remission (DORIS / LLDAS) model on them.

Two stages ("cut" model)
------------------------
Stage 1 is the kinetic fit (:mod:`carnk_pkpd.inference`): its posterior gives each subject's exposure
metric (aplasia duration DA by default; the model file's ``[remission] metric``) as posterior draws,
:func:`exposure_metrics`. Stage 2 (:func:`fit_remission`) is a separate PyMC model of the clinical
visits given those draws. The cut is deliberate:

* clinical outcomes must not pull the kinetic parameters (a few DORIS / LLDAS scores would otherwise
  bend CAR-NK and B-cell curves towards whatever fits the link, and a misspecified link would bias
  the kinetics);
* DA, reappearance and reconstitution days are step functions of the kinetic parameters (thresholds
  crossed on a grid), so they have no useful gradient for NUTS in a joint model.

The metric's posterior uncertainty is carried exactly, not by plugging in a mean: each subject's
likelihood is averaged over ``K`` of its stage-1 draws (a mixture, marginalising the metric over its
stage-1 posterior, ``log p(y_i) = logsumexp_k log p(y_i | x_ik) − log K``). This keeps skewed or
two-peaked DA posteriors (a point mass at the window's end) as they are, and adds no latent parameters.
Predictions for observed subjects pair stage-2 draws with random stage-1 draws (cut: exposure comes
from stage 1 only).

Link (ordinal, cumulative logit)
--------------------------------
Per visit, none < LLDAS only < DORIS::

    eta_ij = theta1·(x_i − center)/scale + u_i + v(t_ij)
    P(LLDAS_ij) = σ(theta0_lldas + eta_ij),   P(DORIS_ij) = σ(theta0_doris + eta_ij)
    theta0_doris = theta0_lldas − delta,  delta > 0        ⇒ P(DORIS) ≤ P(LLDAS) always

``u_i ~ N(0, sigma_u)`` is the patient effect (shared by a patient's visits); ``v(t)`` the visit effect,
a Brownian path in log-days over the visit grid anchored at v(180) = 0 (so the intercepts are the
day-180 log-odds for a patient at the centre of the metric). A visit with only one of DORIS / LLDAS
recorded contributes the probability of the categories it allows. Prediction days between grid days
are interpolated in log-day; outside the grid the nearest grid value is used.

Published aggregate counts (optional)
-------------------------------------
``models/published_counts.toml`` (ACR 2024: 4/8 DORIS and 6/8 LLDAS at 6 months; Gao 2025: 6/9 at
12 months) can be added as binomial likelihoods on the marginal predicted probability for the dose-level
mix they came from (virtual patients' metrics from the kinetic posterior, patient effect integrated by
Gauss–Hermite). These patients are very likely also in the individual data (same trial): using both
**double-counts** them. It is off by default and meant for sensitivity analysis or when the individual
visits are not available.

The stage-2 posterior is stored as ``fits/NAME/remission.nc`` (atomically) and reused when its inputs
(metric, thinning, K, seed, hashes of the data, posterior and model file, published file, link format)
match. :func:`remission_source` is the one place every prediction gets its link from: this fitted link
(``predict`` and ``doses`` alike, so neither depends on whether the other ran first), or the model
file's link only when asked for (:func:`assumed_link`, labelled ASSUMED).

Stage-1 metrics follow :mod:`carnk_pkpd.structural.metrics` (an event that never happens is NaN);
:func:`link_values` is the one place NaN becomes a number for the link, and
:func:`link_probabilities` the one implementation of the link for predictions.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from carnk_pkpd.regimen import Regimen
from carnk_pkpd.structural.metrics import UNITS

__all__ = [
    "ENDPOINTS",
    "FITTED_SOURCE",
    "PublishedCount",
    "Regimen",
    "assumed_link",
    "exposure_metrics",
    "fit_remission",
    "link_probabilities",
    "link_values",
    "load_published",
    "outcomes_from_cohort",
    "predict_by_dose_level",
    "predict_from_metric",
    "predict_remission",
    "prediction_table",
    "regimen_metrics",
    "remission_posterior",
    "remission_source",
    "run_predict",
    "sample_remission",
    "select_draws",
]

ENDPOINTS: tuple[str, ...] = ("DORIS", "LLDAS")
DVID_DORIS, DVID_LLDAS = 10, 11
REFERENCE_DAY = 180.0
QUANTILES = (0.05, 0.5, 0.95)
_DAY_METRICS = ("reappearance_day", "reconstitution_day")


# ---------------------------------------------------------------------------------------------------
# Stage 1: exposure metrics from the kinetic posterior
# ---------------------------------------------------------------------------------------------------
def _metric_kwargs(spec: Any, horizon: float, resolution: float) -> dict[str, Any]:
    ev = dict(getattr(spec, "events", {}) or {})
    kw: dict[str, Any] = dict(horizon=horizon, resolution=resolution)
    for k in ("reappearance_threshold", "reconstitution_threshold", "aplasia_threshold"):
        if k in ev:
            kw[k] = float(ev[k])
    if "aplasia_window" in ev:
        kw["aplasia_window"] = tuple(float(v) for v in ev["aplasia_window"])
    return kw


def exposure_metrics(
    fit: Any, thin: int | None = None, *, horizon: float = 365.0, resolution: float = 0.25
) -> xr.Dataset:
    """Each observed subject's exposure and B-cell metrics on ``chain, draw, subject``.

    ``car_cmax`` (cells/µL), ``car_tmax`` (days), ``car_auc_0_28`` (cells/µL·day), ``b_nadir``
    (cells/µL), ``b_nadir_day``, ``reappearance_day``, ``reconstitution_day`` (days; NaN if not reached
    by ``horizon``), ``DA`` (days). ``thin`` keeps every ``thin``-th draw. Each subject's own
    parameters (:meth:`Fit.individual_parameters`, the population layer with the fitted η), infusions
    and LD window (its EVID=2 rows, :class:`~carnk_pkpd.population.SubjectDesign`).
    """
    from carnk_pkpd.population import SubjectDesign
    from carnk_pkpd.structural import derived_metrics

    ind = fit.individual_parameters()
    if thin and thin > 1:
        ind = ind.isel(draw=slice(None, None, int(thin)))
    nc, nd, ns = ind.sizes["chain"], ind.sizes["draw"], ind.sizes["subject"]
    params = {k: ind[k].values.reshape(-1) for k in ind.data_vars}
    params["n_transit"] = int(ind.attrs["n_transit"])
    design = SubjectDesign.from_cohort(fit.cohort, fit.spec)
    if design.ids != tuple(str(i) for i in ind["subject"].values):
        raise ValueError("internal: the fit's subjects and its cohort's subjects are in different orders")
    ld = {k: np.tile(v, nc * nd) for k, v in design.ld(fit.spec).items()}
    doses = list(design.doses) * (nc * nd)
    m = derived_metrics(params, doses, fit.spec, ld=ld, **_metric_kwargs(fit.spec, horizon, resolution))
    out = {
        k: (("chain", "draw", "subject"), m[k].values.reshape(nc, nd, ns), dict(m[k].attrs))
        for k in m.data_vars
    }
    return xr.Dataset(
        out,
        coords={"chain": ind["chain"].values, "draw": ind["draw"].values, "subject": ind["subject"].values},
        attrs={"thin": int(thin or 1), "horizon": horizon, "synthetic": int(bool(fit.synthetic))},
    )


def regimen_metrics(
    fit: Any,
    regimen: Regimen,
    n_patients: int = 20,
    seed: int = 0,
    n_draws: int | None = 100,
    *,
    horizon: float = 365.0,
    resolution: float = 0.25,
) -> xr.Dataset:
    """Metrics of new virtual patients given ``regimen``, on ``sample, patient``.

    Simulated by the population layer (:func:`carnk_pkpd.population.simulate_population`: parameter
    uncertainty over ``n_draws`` posterior draws, new η, dose-level tier, covariate effects with DOSE
    following the regimen, the regimen's LD window and intensity), metrics of
    :func:`carnk_pkpd.structural.derived_metrics` (NaN = never happens).
    """
    from carnk_pkpd.population import simulate_population

    sim = simulate_population(
        fit,
        regimen,
        n_subjects=n_patients,
        n_draws=n_draws,
        seed=seed,
        times=[0.0],
        observations=False,
        metric_options=dict(horizon=horizon, resolution=resolution),
    )
    ns, npat = sim.sizes["draw"], sim.sizes["subject"]
    out = {k: (("sample", "patient"), sim[k].values, {"units": u}) for k, u in UNITS.items()}
    return xr.Dataset(
        out,
        coords={"sample": np.arange(ns), "patient": np.arange(npat)},
        attrs={**regimen.as_dict(), "seed": int(seed), "synthetic": int(bool(fit.synthetic))},
    )


def _horizon_for(spec: Any, metric: str) -> float:
    """Days of B-cell solution a metric needs: the aplasia window for DA and depth, else 365."""
    if metric in ("DA", "b_nadir", "b_nadir_day") or metric.startswith("car_"):
        win = (getattr(spec, "events", {}) or {}).get("aplasia_window", (0.0, 180.0))
        return float(max(win[1], 28.0))
    return 365.0


_THRESHOLD_OF = {
    "reappearance_day": "reappearance_threshold",
    "reconstitution_day": "reconstitution_threshold",
}
_THRESHOLD_DEFAULT = {"reappearance_threshold": 1.0, "reconstitution_threshold": 10.0}


def link_values(
    metrics: Mapping[str, Any],
    metric: str,
    events: Mapping[str, Any] | None = None,
    horizon: float = 365.0,
) -> np.ndarray:
    """The remission link's covariate from per-patient metrics (the one place "never happens" is mapped).

    ``metrics`` maps metric names (those of :mod:`carnk_pkpd.structural.metrics`, where an event that
    never happens is NaN) to arrays. A day metric (``reappearance_day``, ``reconstitution_day``) that is
    NaN counts as 0 when B never fell below its threshold (``b_nadir`` given and ≥ the threshold of
    ``events``, the model file's ``[events]``: no aplasia, nothing to recover from) and as ``horizon``
    days otherwise (not back by the horizon). Other metrics are returned as they are.

    Raises ``ValueError`` naming the metric when ``metrics`` does not hold it.
    """
    if metric not in metrics:
        raise ValueError(f"unknown exposure metric {metric!r}; known: {sorted(metrics)}")
    x = np.asarray(metrics[metric], float)
    if metric in _DAY_METRICS:
        late = np.full(x.shape, float(horizon))
        if "b_nadir" in metrics:
            key = _THRESHOLD_OF[metric]
            thr = float((events or {}).get(key, _THRESHOLD_DEFAULT[key]))
            never_below = np.asarray(metrics["b_nadir"], float) >= thr
            late = np.where(never_below, 0.0, late)
        x = np.where(np.isfinite(x), x, late)
    return x


def _events(spec: Any) -> dict[str, Any]:
    return dict(getattr(spec, "events", {}) or {})


# ---------------------------------------------------------------------------------------------------
# Outcomes and published counts
# ---------------------------------------------------------------------------------------------------
def outcomes_from_cohort(cohort: Any) -> pd.DataFrame:
    """One row per subject and visit day: ``ID, day, DORIS, LLDAS`` (0/1, NaN where not recorded)."""
    rows = []
    for s in cohort.subjects:
        obs = s.observations
        obs = obs[obs["DVID"].isin([DVID_DORIS, DVID_LLDAS]) & (obs["TIME"] > 0)]
        for t, g in obs.groupby("TIME"):
            rec = {"ID": str(s.id), "day": float(t), "DORIS": np.nan, "LLDAS": np.nan}
            for dvid, name in ((DVID_DORIS, "DORIS"), (DVID_LLDAS, "LLDAS")):
                v = g.loc[g["DVID"] == dvid, "DV"]
                if len(v):
                    rec[name] = float(v.iloc[-1] > 0.5)
            rows.append(rec)
    return pd.DataFrame(rows, columns=["ID", "day", "DORIS", "LLDAS"])


def _category_bounds(doris: np.ndarray, lldas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Allowed ordinal categories [lo, hi] (0 none, 1 LLDAS only, 2 DORIS) per visit.

    DORIS = 1 with LLDAS = 0 (possible only through serology-free definitions) is scored as DORIS.
    """
    lo = np.zeros(doris.size, int)
    hi = np.full(doris.size, 2)
    d_ok, l_ok = np.isfinite(doris), np.isfinite(lldas)
    lo[d_ok & (doris == 1)] = 2
    hi[d_ok & (doris == 0)] = 1
    lo[l_ok & (lldas == 1)] = np.maximum(lo[l_ok & (lldas == 1)], 1)
    sel = l_ok & (lldas == 0) & ~(d_ok & (doris == 1))
    hi[sel] = 0
    return lo, hi


@dataclass(frozen=True)
class PublishedCount:
    """``responders`` of ``n`` patients in ``endpoint`` (DORIS/LLDAS) at ``day``, from a dose-level
    ``mix`` (label → weight, normalised)."""

    endpoint: str
    day: float
    responders: int
    n: int
    mix: dict[str, float]
    source: str = ""


def load_published(path: str | os.PathLike) -> list[PublishedCount]:
    """Read ``models/published_counts.toml`` (``[[count]]`` tables)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read published counts ({e})") from None
    default_mix = raw.get("mix", {})
    out = []
    for i, c in enumerate(raw.get("count", [])):
        try:
            mix = {str(k): float(v) for k, v in dict(c.get("mix", default_mix)).items()}
            tot = sum(mix.values())
            ep = str(c["endpoint"]).upper()
            r, n = int(c["responders"]), int(c["n"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{p}: count[{i}]: bad or missing key ({e})") from None
        if ep not in ENDPOINTS or not (0 <= r <= n) or n < 1 or tot <= 0:
            raise ValueError(f"{p}: count[{i}]: expected endpoint DORIS/LLDAS, 0 <= responders <= n, a mix")
        out.append(
            PublishedCount(
                ep, float(c["day"]), r, n, {k: v / tot for k, v in mix.items()}, str(c.get("source", ""))
            )
        )
    if not out:
        raise ValueError(f"{p}: no [[count]] tables")
    return out


# ---------------------------------------------------------------------------------------------------
# Stage 2: the ordinal link in PyMC
# ---------------------------------------------------------------------------------------------------
def _visit_grid(days: Sequence[float], extra: Sequence[float] = ()) -> np.ndarray:
    g = np.unique(
        np.round(np.concatenate([np.asarray(days, float), np.asarray(extra, float), [REFERENCE_DAY]]), 6)
    )
    return g[g > 0]


def sample_remission(
    metric_draws: np.ndarray,
    outcomes: pd.DataFrame,
    subject_ids: Sequence[str],
    *,
    metric: str = "DA",
    center: float = 55.0,
    scale: float = 15.0,
    theta0: float = 0.5,
    theta1: float = 1.0,
    visit_days: Sequence[float] = (28.0, 60.0, 90.0, 120.0, 150.0, 180.0, 270.0, 365.0),
    published: Sequence[PublishedCount] | None = None,
    published_metrics: Mapping[str, np.ndarray] | None = None,
    draws: int = 500,
    tune: int = 500,
    chains: int = 2,
    seed: int = 0,
    sampler: str = "nutpie",
    backend: str = "jax",
) -> xr.Dataset:
    """Fit the ordinal link given per-subject metric draws ``(subject, K)``; returns the posterior.

    ``outcomes``: ``ID, day, DORIS, LLDAS`` (see :func:`outcomes_from_cohort`). Priors (weakly
    informative, on the model file's scale): ``theta0_lldas ~ N(theta0, 2)``, ``delta ~ HalfNormal(2)``,
    ``theta1 ~ N(theta1, 2)``, ``sigma_u ~ HalfNormal(1)``, ``tau_visit ~ HalfNormal(0.5)`` per unit
    log-day. ``sampler``: "nutpie" (``backend`` "jax" or "numba") or "pymc".
    ``published_metrics`` maps a dose-level label to virtual patients' metric values.
    Returns a Dataset on ``chain, draw`` (``u`` on ``subject``, ``v`` on ``visit_day``).
    """
    import pymc as pm
    import pytensor.tensor as pt

    ids = [str(i) for i in subject_ids]
    x = link_values({metric: metric_draws}, metric)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise ValueError(f"metric_draws must be (subject, K) with {len(ids)} subjects (found {x.shape})")
    if not np.all(np.isfinite(x)):
        raise ValueError("metric_draws contain non-finite values")
    z = (x - center) / scale
    oc = outcomes.copy()
    oc["ID"] = oc["ID"].astype(str)
    lo, hi = _category_bounds(oc["DORIS"].to_numpy(float), oc["LLDAS"].to_numpy(float))
    keep = ~((lo == 0) & (hi == 2)) & oc["ID"].isin(ids).to_numpy()
    oc, lo, hi = oc[keep], lo[keep], hi[keep]
    grid = _visit_grid(
        np.concatenate([oc["day"].to_numpy(float), visit_days]), [p.day for p in published or ()]
    )
    ref = int(np.argmin(np.abs(np.log(grid / REFERENCE_DAY))))
    gaps = np.sqrt(np.abs(np.diff(np.log(grid))))
    sidx = np.array([ids.index(i) for i in oc["ID"]], int)
    didx = np.searchsorted(grid, np.round(oc["day"].to_numpy(float), 6))
    n_s, k = z.shape
    # per-visit indicators of the likelihood term
    case = {
        "none": (lo == 0) & (hi == 0),
        "lldas_only": (lo == 1) & (hi == 1),
        "doris": lo == 2,
        "lldas": (lo == 1) & (hi == 2),
        "not_doris": (lo == 0) & (hi == 1),
    }
    member = np.zeros((n_s, len(oc)))
    member[sidx, np.arange(len(oc))] = 1.0

    coords = {"subject": ids, "visit_day": grid, "step": np.arange(max(grid.size - 1, 0))}
    with pm.Model(coords=coords) as model:
        a_l = pm.Normal("theta0_lldas", theta0, 2.0)
        delta = pm.HalfNormal("delta", 2.0)
        a_d = pm.Deterministic("theta0_doris", a_l - delta)
        b = pm.Normal("theta1", theta1, 2.0)
        sigma_u = pm.HalfNormal("sigma_u", 1.0)
        e_u = pm.Normal("e_u", 0.0, 1.0, dims="subject")
        u = pm.Deterministic("u", sigma_u * e_u, dims="subject")
        if grid.size > 1:
            tau = pm.HalfNormal("tau_visit", 0.5)
            e_v = pm.Normal("e_v", 0.0, 1.0, dims="step")
            path = pt.concatenate([pt.zeros(1), pt.cumsum(tau * gaps * e_v)])
            v = pm.Deterministic("v", path - path[ref], dims="visit_day")
        else:
            v = pm.Deterministic("v", pt.zeros(1), dims="visit_day")
        if len(oc):
            eta = b * z[sidx] + (u[sidx] + v[didx])[:, None]  # (obs, K)
            xl, xd = a_l + eta, a_d + eta
            ll = (
                case["none"][:, None] * pm.math.log1pexp(xl) * -1.0
                + case["lldas_only"][:, None]
                * (-pm.math.log1pexp(-xl) - pm.math.log1pexp(xd) + pt.log1mexp(-delta))
                + case["doris"][:, None] * -pm.math.log1pexp(-xd)
                + case["lldas"][:, None] * -pm.math.log1pexp(-xl)
                + case["not_doris"][:, None] * -pm.math.log1pexp(xd)
            )
            ll_sk = pt.dot(member, ll)  # (subject, K)
            pm.Potential("visits", pt.sum(pm.math.logsumexp(ll_sk, axis=1)) - n_s * np.log(k))
        if published:
            gh_x, gh_w = np.polynomial.hermite_e.hermegauss(9)
            gh_w = gh_w / gh_w.sum()
            for j, c in enumerate(published):
                a = a_d if c.endpoint == "DORIS" else a_l
                dj = int(np.argmin(np.abs(grid - c.day)))
                p = 0.0
                for lab, w in c.mix.items():
                    if published_metrics is None or lab not in published_metrics:
                        raise ValueError(f"published counts: no virtual-patient metrics for dose level {lab}")
                    zm = (link_values({metric: published_metrics[lab]}, metric).ravel() - center) / scale
                    lin = a + b * zm[:, None] + sigma_u * gh_x[None, :] + v[dj]
                    p = p + w * pt.sum(pm.math.sigmoid(lin) * gh_w[None, :]) / zm.size
                p = pt.clip(p, 1e-9, 1 - 1e-9)
                pm.Binomial(f"published_{j}", n=c.n, p=p, observed=c.responders)
        if sampler == "nutpie":
            import nutpie

            compiled = nutpie.compile_pymc_model(model, backend=backend)
            idata = nutpie.sample(
                compiled, draws=draws, tune=tune, chains=chains, seed=seed, progress_bar=False, cores=chains
            )
        else:
            idata = pm.sample(
                draws=draws,
                tune=tune,
                chains=chains,
                random_seed=seed,
                progressbar=False,
                cores=1,
                compute_convergence_checks=False,
            )
    post = idata["posterior"]
    post = post.to_dataset() if hasattr(post, "to_dataset") else post
    keepv = ["theta0_lldas", "theta0_doris", "delta", "theta1", "sigma_u", "u", "v"] + (
        ["tau_visit"] if grid.size > 1 else []
    )
    post = post[keepv].load()
    post = post.assign_coords(subject=np.array(ids, dtype=str), visit_day=grid)
    post.attrs.update(
        metric=metric,
        center=float(center),
        scale=float(scale),
        n_metric_draws=int(k),
        seed=int(seed),
        draws=int(draws),
        tune=int(tune),
        chains=int(chains),
        n_visits=int(len(oc)),
        published=int(bool(published)),
    )
    for name, desc in (
        ("theta0_lldas", "log-odds of LLDAS at day 180 at the metric's centre"),
        ("theta0_doris", "log-odds of DORIS at day 180 at the metric's centre"),
        ("theta1", "log-odds per `scale` units of the metric"),
        ("sigma_u", "SD of the patient effect (log-odds)"),
        ("v", "visit effect (log-odds, 0 at day 180)"),
    ):
        post[name].attrs["long_name"] = desc
    return post


def _visit_effect(post: xr.Dataset, day: float) -> np.ndarray:
    """``v(day)`` per draw, interpolated in log-day over the grid (flat outside); shape (draws,)."""
    grid = post["visit_day"].values.astype(float)
    v = post["v"].stack(s=("chain", "draw")).transpose("s", "visit_day").values
    if grid.size == 1:
        return v[:, 0]
    lg, ld = np.log(grid), np.log(max(day, 1e-9))
    j = int(np.clip(np.searchsorted(lg, ld), 1, grid.size - 1))
    w = float(np.clip((ld - lg[j - 1]) / (lg[j] - lg[j - 1]), 0.0, 1.0))
    return (1 - w) * v[:, j - 1] + w * v[:, j]


def _flat(post: xr.Dataset, name: str) -> np.ndarray:
    return post[name].stack(s=("chain", "draw")).transpose("s", ...).values


def link_probabilities(
    post: xr.Dataset, metric: np.ndarray, day: float, u: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """P(DORIS), P(LLDAS) per link draw (leading axis) for ``metric`` values broadcast against it.

    The one implementation of the link (module doc): ``σ(theta0_endpoint + theta1·(x − center)/scale
    + u + v(day))``. ``post`` is a stage-2 posterior or :func:`assumed_link`; ``metric``: the link's
    covariate (:func:`link_values`), shape ``(draws, ...)`` or broadcastable; ``u``: patient effect
    (log-odds) of the same shape, 0 when None (the typical patient); ``day`` in days.
    """
    center, scale = float(post.attrs["center"]), float(post.attrs["scale"])
    name = str(post.attrs["metric"])
    z = (link_values({name: metric}, name) - center) / scale
    nd = _flat(post, "theta1").size
    extra = (1,) * max(np.ndim(z) - 1, np.ndim(u) - 1 if u is not None else 0, 0)
    b = _flat(post, "theta1").reshape((nd, *extra))
    v = _visit_effect(post, day).reshape((nd, *extra))
    eta = b * z + v + (0.0 if u is None else u)
    out = {}
    for ep, var in (("DORIS", "theta0_doris"), ("LLDAS", "theta0_lldas")):
        a = _flat(post, var).reshape((nd, *extra))
        out[ep] = 1.0 / (1.0 + np.exp(-(a + eta)))
    return out


def select_draws(post: xr.Dataset, n: int, rng: np.random.Generator) -> xr.Dataset:
    """``n`` link draws picked at random (with replacement when ``n`` exceeds the draws), on
    ``chain = [0], draw = 0..n−1``, with the link's attrs: one per kinetic draw it is paired with."""
    keep = [v for v in ("theta0_lldas", "theta0_doris", "theta1", "sigma_u", "v") if v in post]
    flat = post[keep].stack(s=("chain", "draw"))
    nd = flat.sizes["s"]
    take = rng.choice(nd, size=n, replace=n > nd)
    sub = flat.isel(s=take).drop_vars(["s", "chain", "draw"]).rename({"s": "draw"})
    sub = sub.expand_dims(chain=[0]).assign_coords(draw=np.arange(n)).transpose("chain", "draw", ...)
    # plain in-memory arrays only: the result travels to Dask workers and must hold no file handle
    return xr.Dataset(
        {k: (sub[k].dims, np.array(sub[k].values)) for k in keep},
        coords={k: np.array(v.values) for k, v in sub.coords.items() if k in sub.dims},
        attrs=dict(post.attrs),
    )


def predict_from_metric(
    post: xr.Dataset, metric: np.ndarray, days: Sequence[float] = (180.0, 365.0), seed: int = 0
) -> xr.Dataset:
    """Predicted probabilities for new patients with given link covariates ``(sample, patient)``.

    Each sample row is paired with a random link draw (:func:`select_draws`); each patient gets a fresh
    patient effect. Returns ``p_population`` (mean over patients; quantiles = parameter uncertainty),
    ``p_individual`` (quantiles over samples × patients) on ``endpoint, day, quantile``, and ``p_mean``
    (fully integrated predictive probability) on ``endpoint, day``.
    """
    rng = np.random.default_rng(seed)
    x = np.atleast_2d(np.asarray(metric, float))
    n_s, n_p = x.shape
    sub = select_draws(post, n_s, rng)
    u = _flat(sub, "sigma_u")[:, None] * rng.standard_normal((n_s, n_p))
    pop = np.zeros((2, len(days), len(QUANTILES)))
    ind = np.zeros_like(pop)
    mean = np.zeros((2, len(days)))
    for j, d in enumerate(days):
        pr = link_probabilities(sub, x, float(d), u)
        for e, ep in enumerate(ENDPOINTS):
            pop[e, j] = np.quantile(pr[ep].mean(axis=1), QUANTILES)
            ind[e, j] = np.quantile(pr[ep], QUANTILES)
            mean[e, j] = pr[ep].mean()
    coords = {"endpoint": list(ENDPOINTS), "day": np.asarray(days, float), "quantile": list(QUANTILES)}
    return xr.Dataset(
        {
            "p_population": (("endpoint", "day", "quantile"), pop, {"units": "1"}),
            "p_individual": (("endpoint", "day", "quantile"), ind, {"units": "1"}),
            "p_mean": (("endpoint", "day"), mean, {"units": "1"}),
        },
        coords=coords,
    )


FITTED_SOURCE = "fitted remission model (ordinal DORIS/LLDAS link, stage-2 posterior)"


def assumed_link(spec: Any) -> xr.Dataset:
    """The model file's ``[remission]`` link as a one-draw link "posterior" (ASSUMED values).

    ``theta0`` is the intercept of both DORIS and LLDAS (one P(CR) stands for both, at every visit),
    ``theta1`` the slope, no patient or visit effect. Usable wherever a stage-2 posterior is
    (:func:`link_probabilities`, :func:`predict_from_metric`, the dose search); ``attrs["source"]``
    says ASSUMED.
    """
    rem = dict(spec.remission)
    th0 = float(rem.get("theta0", 0.5))
    one = (("chain", "draw"), np.ones((1, 1)))

    def var(x: float) -> tuple:
        return (one[0], one[1] * x)

    ds = xr.Dataset(
        {
            "theta0_lldas": var(th0),
            "theta0_doris": var(th0),
            "delta": var(0.0),
            "theta1": var(float(rem.get("theta1", 1.0))),
            "sigma_u": var(0.0),
            "v": (("chain", "draw", "visit_day"), np.zeros((1, 1, 1))),
        },
        coords={"chain": [0], "draw": [0], "visit_day": [REFERENCE_DAY]},
    )
    ds.attrs.update(
        metric=str(rem.get("metric", "DA")),
        center=float(rem.get("center", 55.0)),
        scale=float(rem.get("scale", 15.0)),
        assumed=1,
        source=(
            "model file [remission] link, ASSUMED values (not fitted); one P(CR) stands for DORIS "
            "and LLDAS at every visit"
        ),
    )
    return ds


# ---------------------------------------------------------------------------------------------------
# Fit-level API: stage 2 from a kinetic fit, stored next to it
# ---------------------------------------------------------------------------------------------------
def _metric_draws(em: xr.Dataset, metric: str, k: int, seed: int, events: Mapping[str, Any]) -> np.ndarray:
    """``(subject, K)`` link covariates (:func:`link_values`) from ``exposure_metrics`` output."""
    if metric not in em:
        raise ValueError(f"unknown exposure metric {metric!r}; known: {sorted(em.data_vars)}")
    flat = {
        name: em[name].stack(s=("chain", "draw")).transpose("subject", "s").values
        for name in {metric, "b_nadir"} & set(em.data_vars)
    }
    n = flat[metric].shape[1]
    if n > k:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
        flat = {name: v[:, pick] for name, v in flat.items()}
    return link_values(flat, metric, events, float(em.attrs.get("horizon", 365.0)))


def _new_patient_link_values(
    fit: Any, regimen: Regimen, n_patients: int, seed: int, n_draws: int | None, resolution: float
) -> np.ndarray:
    """Link covariates ``(sample, patient)`` of new virtual patients given ``regimen``."""
    metric = str(fit.spec.remission.get("metric", "DA"))
    hz = _horizon_for(fit.spec, metric)
    m = regimen_metrics(fit, regimen, n_patients, seed, n_draws, resolution=resolution, horizon=hz)
    return link_values(m, metric, _events(fit.spec), hz)


def _published_metrics(
    fit: Any, counts: Sequence[PublishedCount], n_patients: int, seed: int, resolution: float
) -> dict[str, np.ndarray]:
    labels = sorted({lab for c in counts for lab in c.mix})
    out = {}
    for lab in labels:
        key = lab if lab in fit.spec.dose_levels else f"DL{lab}"
        if key not in fit.spec.dose_levels:
            raise ValueError(f"published counts: dose level {lab!r} not in the model file's [dose_levels]")
        reg = Regimen.from_dose_level(fit.spec.dose_levels[key])
        out[lab] = _new_patient_link_values(fit, reg, n_patients, seed, 20, resolution).ravel()
    return out


def _fingerprint(fit: Any, settings: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(repr(sorted(settings.items())).encode())
    files = (fit.manifest or {}).get("files") or {}
    for name in ("data.csv", "posterior.nc", "model.toml"):
        h.update(str(files.get(name, "")).encode())
    return h.hexdigest()[:16]


#: Bumped when what the stored stage-2 posterior means changes (2: day metrics that never happen
#: mapped by :func:`link_values`), so an older ``remission.nc`` is refitted, not reused.
LINK_FORMAT = 2


def fit_remission(
    fit: Any,
    *,
    published: str | os.PathLike | None = None,
    thin: int | None = None,
    n_metric_draws: int = 40,
    resolution: float = 0.5,
    draws: int = 500,
    tune: int = 500,
    chains: int = 2,
    seed: int = 0,
) -> xr.Dataset:
    """Stage 2 on a kinetic fit: the link posterior given the subjects' metric draws (see module doc).

    ``thin`` defaults to keeping about ``n_metric_draws`` draws per chain; ``resolution`` (days) is
    the B-cell grid of the metrics (0.5 d is ample for DA).
    """
    rem = fit.spec.remission
    metric = str(rem.get("metric", "DA"))
    post = fit.posterior
    if thin is None:
        thin = max(1, int(post.sizes["draw"] * post.sizes["chain"] // max(n_metric_draws, 1)))
    em = exposure_metrics(fit, thin, resolution=resolution, horizon=_horizon_for(fit.spec, metric))
    x = _metric_draws(em, metric, n_metric_draws, seed, _events(fit.spec))
    counts = load_published(published) if published else None
    pm_ = _published_metrics(fit, counts, 20, seed, resolution) if counts else None
    days = [float(d) for d in fit.spec.simulation.get("clinical_days", []) if float(d) > 0]
    out = sample_remission(
        x,
        outcomes_from_cohort(fit.cohort),
        [str(s) for s in em["subject"].values],
        metric=metric,
        center=float(rem.get("center", 55.0)),
        scale=float(rem.get("scale", 15.0)),
        theta0=float(rem.get("theta0", 0.5)),
        theta1=float(rem.get("theta1", 1.0)),
        visit_days=days or (180.0, 365.0),
        published=counts,
        published_metrics=pm_,
        draws=draws,
        tune=tune,
        chains=chains,
        seed=seed,
    )
    # keep the stage-1 draws used, so observed-subject predictions need no re-solve
    out["metric_draws"] = (("subject", "metric_draw"), x, {"units": UNITS.get(metric, "")})
    out.attrs.update(synthetic=int(bool(fit.synthetic)), source=FITTED_SOURCE)
    return out


def _save_atomic(ds: xr.Dataset, path: Path) -> None:
    from carnk_pkpd.atomic import write_file_atomic

    write_file_atomic(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))


def remission_posterior(
    fit: Any,
    *,
    published: str | os.PathLike | None = None,
    refit: bool = False,
    seed: int = 0,
    **kwargs: Any,
) -> xr.Dataset:
    """The stage-2 posterior: read ``remission.nc`` from the fit folder when its settings match,
    else fit it (:func:`fit_remission`) and store it there atomically."""
    settings = dict(
        kwargs, seed=seed, metric=str(fit.spec.remission.get("metric", "DA")), link_format=LINK_FORMAT
    )
    if published:
        settings["published"] = hashlib.sha256(Path(published).read_bytes()).hexdigest()
    key = _fingerprint(fit, settings)
    target = (
        Path(fit.path) / ("remission.nc" if not published else "remission_published.nc") if fit.path else None
    )
    if target is not None and target.exists() and not refit:
        try:
            with xr.open_dataset(target, engine="netcdf4") as f:
                ds = f.load()
            if ds.attrs.get("fingerprint") == key:
                ds.attrs["source"] = FITTED_SOURCE
                return ds
        except (OSError, ValueError) as exc:
            import warnings

            warnings.warn(
                f"{target}: the cached remission link cannot be read ({exc}); it is fitted again and replaced",
                stacklevel=2,
            )
    ds = fit_remission(fit, published=published, seed=seed, **kwargs)
    ds.attrs["fingerprint"] = key
    if target is not None:
        _save_atomic(ds, target)
    return ds


def remission_source(
    fit: Any,
    *,
    assumed: bool = False,
    published: str | os.PathLike | None = None,
    seed: int = 0,
    **fit_kwargs: Any,
) -> xr.Dataset:
    """The remission link every prediction uses (``predict`` and ``doses`` alike).

    By default the fitted stage-2 link (:func:`remission_posterior`: fitted on demand and cached in
    the fit folder under a fingerprint of the fit, the settings and ``seed``), so the same fit and seed
    give the same link whichever command ran first. ``assumed=True`` gives the model file's link
    (:func:`assumed_link`, labelled ASSUMED); it is never used unless asked for.
    ``attrs["source"]`` says which.
    """
    if assumed:
        if published:
            raise ValueError(
                "published counts need the fitted link; they cannot be used with the assumed link"
            )
        return assumed_link(fit.spec)
    return remission_posterior(fit, published=published, seed=seed, **fit_kwargs)


def _subject_predictions(post: xr.Dataset, days: Sequence[float], seed: int) -> np.ndarray:
    """``(subject, endpoint, day, quantile)`` for observed subjects (stage-1 metric × stage-2 draws)."""
    rng = np.random.default_rng(seed)
    x = post["metric_draws"].values  # (subject, K)
    nd = _flat(post, "theta1").size
    u = _flat(post, "u")  # (draws, subject)
    pick = rng.integers(0, x.shape[1], size=(nd, x.shape[0]))
    xm = x[np.arange(x.shape[0])[None, :], pick]  # (draws, subject)
    out = np.zeros((x.shape[0], 2, len(days), len(QUANTILES)))
    for j, d in enumerate(days):
        pr = link_probabilities(post, xm, float(d), u)
        for e, ep in enumerate(ENDPOINTS):
            out[:, e, j] = np.quantile(pr[ep], QUANTILES, axis=0).T
    return out


def predict_remission(
    fit: Any,
    regimen: Regimen | tuple | Mapping | None = None,
    visits: Sequence[float] = (180.0, 365.0),
    n_patients: int = 20,
    seed: int = 0,
    *,
    n_draws: int = 40,
    published: str | os.PathLike | None = None,
    posterior: xr.Dataset | None = None,
    assumed: bool = False,
    **fit_kwargs: Any,
) -> xr.Dataset:
    """Posterior predictive P(DORIS), P(LLDAS) at ``visits`` (days).

    Returns ``p_subject`` on ``subject, endpoint, day, quantile`` (observed subjects; fitted link only)
    and, when ``regimen`` is given, ``p_population`` / ``p_individual`` (``endpoint, day, quantile``)
    and ``p_mean`` for a new patient (``n_patients`` virtual patients per each of ``n_draws`` kinetic
    posterior draws). Quantiles 0.05, 0.5, 0.95. The link is :func:`remission_source` (fitted and
    cached in the fit folder, or the ASSUMED file link with ``assumed=True``) unless ``posterior``
    is given; ``attrs["source"]`` says which.
    """
    regimen = Regimen.coerce(regimen) if regimen is not None else None  # a tuple or mapping works too
    post = (
        posterior
        if posterior is not None
        else remission_source(fit, assumed=assumed, published=published, seed=seed, **fit_kwargs)
    )
    days = [float(d) for d in visits]
    coords = {"endpoint": list(ENDPOINTS), "day": np.asarray(days, float), "quantile": list(QUANTILES)}
    ds = xr.Dataset(coords=coords)
    if "metric_draws" in post:
        ps = _subject_predictions(post, days, seed)
        ds["p_subject"] = xr.DataArray(
            ps,
            dims=("subject", "endpoint", "day", "quantile"),
            coords={"subject": post["subject"].values},
            attrs={"units": "1"},
        )
    metric = str(post.attrs["metric"])
    if regimen is not None:
        x = _new_patient_link_values(fit, regimen, n_patients, seed, n_draws, 0.5)
        ds = ds.merge(predict_from_metric(post, x, days, seed))
        ds.attrs.update(regimen.as_dict())
    ds["day"].attrs["units"] = "days"
    ds.attrs.update(
        metric=metric,
        synthetic=int(bool(fit.synthetic)),
        seed=int(seed),
        published=int(bool(published)),
        source=str(post.attrs.get("source", FITTED_SOURCE)),
    )
    return ds


def predict_by_dose_level(
    fit: Any,
    visits: Sequence[float] = (180.0, 365.0),
    n_patients: int = 20,
    seed: int = 0,
    *,
    n_draws: int = 40,
    published: str | os.PathLike | None = None,
    assumed: bool = False,
    **fit_kwargs: Any,
) -> xr.Dataset:
    """New-patient predictions for each of the model file's dose levels, on a ``dose_level`` dim."""
    post = remission_source(fit, assumed=assumed, published=published, seed=seed, **fit_kwargs)
    parts = []
    labels = list(fit.spec.dose_levels)
    for lab in labels:
        reg = Regimen.from_dose_level(fit.spec.dose_levels[lab])
        x = _new_patient_link_values(fit, reg, n_patients, seed, n_draws, 0.5)
        p = predict_from_metric(post, x, visits, seed)
        for k, v in reg.as_dict().items():
            p[k] = v
        parts.append(p)
    ds = xr.concat(parts, dim=pd.Index(labels, name="dose_level"))
    ds.attrs.update(
        metric=str(post.attrs["metric"]),
        synthetic=int(bool(fit.synthetic)),
        seed=int(seed),
        source=str(post.attrs.get("source", FITTED_SOURCE)),
    )
    return ds


#: Columns of ``remission.csv`` (``dose_level`` first when predicting by dose level).
TABLE_COLUMNS = (
    "endpoint",
    "day",
    "median",
    "q05",
    "q95",
    "dose",
    "interval",
    "n_infusions",
    "ld_scale",
    "mean",
)


def run_predict(
    fit: Any,
    regimen: Regimen | None = None,
    visits: Sequence[float] = (180.0, 365.0),
    n_patients: int = 20,
    seed: int = 0,
    *,
    published: str | os.PathLike | None = None,
    assumed: bool = False,
) -> tuple[pd.DataFrame, xr.Dataset]:
    """The ``predict`` command: the ``remission.csv`` table and the prediction Dataset.

    With ``regimen`` one new-patient prediction; without, one per dose level of the model file
    (``dose_level`` column first). Columns: ``[dose_level,] endpoint, day, median, q05, q95, dose,
    interval, n_infusions, ld_scale, mean`` (probabilities; day in days). ``ds.attrs["source"]`` names
    the remission link used.
    """
    if regimen is not None:
        ds = predict_remission(fit, regimen, visits, n_patients, seed, published=published, assumed=assumed)
        table = prediction_table(ds, regimen)
        cols = list(TABLE_COLUMNS)
    else:
        ds = predict_by_dose_level(fit, visits, n_patients, seed, published=published, assumed=assumed)
        parts = []
        for lab in ds["dose_level"].values:
            sub = ds.sel(dose_level=lab)
            reg = Regimen(float(sub["dose"]), float(sub["interval"]), int(sub["n_infusions"]), 1.0)
            parts.append(prediction_table(sub, reg).assign(dose_level=str(lab)))
        table = pd.concat(parts, ignore_index=True)
        cols = ["dose_level", *TABLE_COLUMNS]
    return table[cols], ds


def prediction_table(ds: xr.Dataset, regimen: Regimen | None = None) -> pd.DataFrame:
    """Rows ``endpoint, day, median, q05, q95, mean`` (+ regimen columns) from a new-patient prediction."""
    rows = []
    reg = regimen.as_dict() if regimen is not None else {}
    for ep in ds["endpoint"].values:
        for d in ds["day"].values:
            q = ds["p_population"].sel(endpoint=ep, day=d).values
            rows.append(
                dict(
                    endpoint=str(ep),
                    day=float(d),
                    median=q[1],
                    q05=q[0],
                    q95=q[2],
                    mean=float(ds["p_mean"].sel(endpoint=ep, day=d)),
                    **reg,
                )
            )
    return pd.DataFrame(rows)
