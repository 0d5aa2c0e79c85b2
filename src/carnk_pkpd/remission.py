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

Exposure uncertainty: multiple imputation over aligned stage-1 draws
--------------------------------------------------------------------
The metrics are not known, they have a stage-1 posterior, and that posterior is shared between
subjects (typical values, Ω and the residual model move every subject's DA together). Stage 2 is
therefore fitted by multiple imputation: ``M`` stage-1 posterior draws are chosen
(:func:`imputation_draws`, default ``M = 12``); imputation ``m`` gives EVERY subject its metric from
the SAME draw ``m`` (so the between-subject correlation of the exposure errors is kept), stage 2 is
sampled on each imputation (short chains: 2 × (300 + 200) by default) and the ``M`` posteriors are
pooled as an equal-weight mixture. That mixture is the standard Bayesian MI estimate of the cut
posterior ``∫ p(link | y, x(φ)) p(φ | kinetic data) dφ``: exposure uncertainty widens the link's
posterior by the between-imputation spread, and the outcomes never reweight the exposure draws (no
feedback into stage 1, the point of the cut). The earlier scheme — a per-subject log-sum-exp over
``K`` stage-1 draws — treated each subject's draws as independent of every other subject's and let
the outcomes pick the exposure draws that fit them; it is gone.

Predictions keep the pairing: a new patient simulated from stage-1 draw ``m`` is combined with link
draws of imputation ``m`` (``predict`` simulates its new patients on the imputation draws by
default; the dose search pairs wherever its kinetic draw is one of them), and observed subjects use
their metrics of the imputation each link draw came from.

Cost (measured on a 2-core machine shared with other jobs, load average 10-15, so slow and noisy):
the model is compiled once (JAX, data swapped per imputation), then each imputation samples 2
chains of 500 iterations: 42 s in all for M = 12 on the 3-subject example fit (seconds per
imputation once compiled); 127 s for a SYNTHETIC 20-subject trial-design cohort (98 scored visits,
``benchmarks/remission_calibration.py`` seed 100, load average ~20), where the short kinetic fit
itself took 2574 s. M = 12 keeps the Monte Carlo error of the pooled mixture small next to the
between-imputation spread it adds (the diagnostics' ``between_share``, 0.2–1.4% of the posterior
variance on the example fit, so more imputations would change little there).
The pooled diagnostics (:func:`remission_diagnostics`) report R-hat and ESS within each imputation,
pooled ESS, divergences and the share of the posterior variance that lies between imputations.

Link (ordinal, cumulative logit)
--------------------------------
Per visit, none < LLDAS only < DORIS::

    eta_ij = theta1·(x_i − center)/scale + u_i + v(t_ij)
    P(LLDAS_ij) = σ(theta0_lldas + eta_ij),   P(DORIS_ij) = σ(theta0_lldas − delta(t_ij) + eta_ij)
    delta(t) = delta·(t/180)^gamma_delta,  delta > 0        ⇒ P(DORIS) ≤ P(LLDAS) always
    theta0_doris = theta0_lldas − delta                      (the day-180 DORIS intercept, reported)

The DORIS/LLDAS gap changes with time. DORIS needs prednisone ≤ 5 mg/d and no activity, LLDAS
allows ≤ 7.5 mg/d, so after CAR-NK a patient reaches LLDAS first and DORIS months later, as the
steroid taper ends; then the two converge. In the package's generator (science.md §4) the
population log-odds gap logit P(LLDAS) − logit P(DORIS) falls from 2.8 at day 90 to 0.63 at day
180 and 0.06 at day 365. A single offset (link format ≤ 4) fitted mostly on visits before day 180
overstated the gap later: over 20 SYNTHETIC cohorts P(DORIS) at days 180/365 came out 0.12–0.16 too
low and the DORIS 90% intervals covered 0.65 (``benchmarks/remission_calibration.py``). The
power law in days (straight in log-gap against log-day, one parameter, ``gamma_delta ~ N(0, 2)``)
keeps the gap positive at every visit and extrapolates smoothly beyond the last visits; outside the
visit grid the day is clamped to the grid, like ``v``.

``u_i ~ N(0, sigma_u)`` is the patient effect (shared by a patient's visits); ``v(t)`` the visit effect,
a Brownian path in log-days over the visit grid anchored at v(180) = 0 (so the intercepts are the
day-180 log-odds for a patient at the centre of the metric). A visit with only one of DORIS / LLDAS
recorded contributes the probability of the categories it allows. Prediction days between grid days
are interpolated in log-day; outside the grid the nearest grid value is used.

Persistence. A patient's DORIS / LLDAS states are strongly persistent across 4–9 visits (a responder
reaches remission and stays; a non-responder never does). A random intercept can only express that
with a large ``sigma_u``: a patient whose state stays the same at 5 visits needs a per-visit
probability near 0.95 or 0.05, i.e. |u| ≈ 3 log-odds beyond the typical patient's, so ``sigma_u``
must be allowed to reach 3–5. ``sigma_u ~ HalfNormal(3)`` does (its 95th percentile is 5.9, and it
still shrinks away absurd values); the former HalfNormal(1) (95th percentile 2) forced the visits to
look nearly independent, which made theta1 overconfident. Likewise the visit path must be able to
fall from near-certain "none" at day 28 to ~50% DORIS at day 180 (4–6 log-odds over 1.9 log-days):
``tau_visit ~ HalfNormal(2)`` per sqrt(log-day) (was 0.5, which pulled the day-180 intercepts down).
:func:`concordance_check` is the posterior predictive check of this: the observed share of patients
whose state never changes, and of those whose state ever falls back, against replicated visits.

The patient effect is not sampled. Each patient's visits are integrated over u ~ N(0, sigma_u) on a
161-point grid (:func:`normal_quadrature`, within 1e-5 in log-likelihood of adaptive quadrature for sigma_u up to 9), so the sampler sees only the population parameters and the visit path. Sampled as 20 extra
non-centred coordinates, u made a funnel with sigma_u: within one imputation sigma_u had a bulk ESS of
29-37 from 2 x 200 draws and R-hat up to 1.064 (measured on the embedded cohort's fit), and the
stage-2 check failed. Observed patients' effects, which their own predictions and the concordance
check need, are drawn afterwards from p(u | draw, visits) on the same grid, so each (draw, u) pair is
a draw from the joint posterior.

Published aggregate counts (optional)
-------------------------------------
``models/published_counts.toml`` holds one ``[[source]]`` per report: counts over none / LLDAS only /
DORIS (DORIS ⊂ LLDAS in the same patients, so one multinomial per report, not two binomials), the
follow-up window the status was taken in (status at a day uniform over the window, averaged over 5
days; ">6 months" of a report whose longest follow-up was 12 months = days 180..365), and the
dose-level mix of the patients with that follow-up (the earliest enrolled: low dose levels first).
Only sources with ``use = true`` enter; by default Gao 2025 (>12 months, 3/0/6 of 9) alone, because
the ACR 2024 patients (>6 months, 2/2/4 of 8) are almost certainly among them (the file says why).
The category probabilities integrate the patient effect (:func:`normal_quadrature`) over
``n_published_patients`` virtual patients per dose level simulated from each imputation's own
stage-1 draw. These patients are very likely also in the individual data (same trial): using both
**double-counts** them. It is off by default and meant for sensitivity analysis or when the
individual visits are not available.

The stage-2 posterior is stored as ``fits/NAME/remission.nc`` (atomically) with its diagnostics
(``diag_*``) and the concordance check (``ppc_*``), and reused when its inputs (every setting of
``STAGE2_DEFAULTS`` including M, the seed, the metric, hashes of the data, posterior and model file,
published file, link format) match. :func:`remission_source` is the one place every prediction gets its link from: this fitted link
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
from scipy.special import expit

from carnk_pkpd.regimen import Regimen
from carnk_pkpd.structural.metrics import UNITS

__all__ = [
    "ENDPOINTS",
    "FITTED_SOURCE",
    "PublishedSource",
    "Regimen",
    "assumed_link",
    "exposure_metrics",
    "imputation_draws",
    "concordance_check",
    "concordance_line",
    "fit_remission",
    "link_probabilities",
    "link_values",
    "load_published",
    "marginal_probabilities",
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
    "patient_effects",
    "remission_diagnostics",
    "diagnostics_line",
    "concordance_table",
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
    fit: Any,
    thin: int | None = None,
    *,
    horizon: float = 365.0,
    resolution: float = 0.25,
    positions: Sequence[int] | None = None,
) -> xr.Dataset:
    """Each observed subject's exposure and B-cell metrics on ``chain, draw, subject``.

    ``car_cmax`` (cells/µL), ``car_tmax`` (days), ``car_auc_0_28`` (cells/µL·day), ``b_nadir``
    (cells/µL), ``b_nadir_day``, ``reappearance_day``, ``reconstitution_day`` (days; NaN if not reached
    by ``horizon``), ``DA`` (days). ``thin`` keeps every ``thin``-th draw; ``positions`` instead keeps
    the draws at these chain-major positions of the posterior (one ``chain``, ``draw`` = the positions;
    :func:`imputation_draws`). Each subject's own parameters (:meth:`Fit.individual_parameters`, the
    population layer with the fitted η), infusions and LD window (its EVID=2 rows,
    :class:`~carnk_pkpd.population.SubjectDesign`).
    """
    from carnk_pkpd.population import SubjectDesign
    from carnk_pkpd.structural import derived_metrics

    ind = fit.individual_parameters()
    if positions is not None:
        pos = np.asarray(positions, int)
        flat = ind.stack(s=("chain", "draw")).transpose("s", "subject")
        ind = xr.Dataset(
            {k: (("chain", "draw", "subject"), flat[k].values[pos][None]) for k in ind.data_vars},
            coords={"chain": [0], "draw": pos, "subject": ind["subject"].values},
            attrs=dict(ind.attrs),
        )
    elif thin and thin > 1:
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
    :func:`carnk_pkpd.structural.derived_metrics` (NaN = never happens). The coordinate
    ``stage1_draw`` gives each sample's chain-major position in the kinetic posterior.
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
        coords={
            "sample": np.arange(ns),
            "patient": np.arange(npat),
            "stage1_draw": ("sample", np.asarray(sim["draw"].values, int)),
        },
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


CATEGORIES: tuple[str, ...] = ("none", "lldas_only", "doris")


@dataclass(frozen=True)
class PublishedSource:
    """One report's patients counted over the ordinal categories none / LLDAS only / DORIS.

    ``counts`` (none, LLDAS only, DORIS) of ``n`` patients; each patient's status is taken at a
    follow-up day uniform over ``window`` (days, e.g. ">6 months" of a report whose longest follow-up
    was 12 months: 180..365); the patients come from the dose-level ``mix`` (label → weight,
    normalised). ``use`` False keeps a report in the file without fitting it.
    """

    name: str
    counts: tuple[int, int, int]
    window: tuple[float, float]
    mix: dict[str, float]
    use: bool = True
    source: str = ""

    @property
    def n(self) -> int:
        return int(sum(self.counts))

    def days(self, k: int = 5) -> np.ndarray:
        """``k`` equally spaced days over the window (the quadrature of the uniform follow-up day)."""
        lo, hi = self.window
        return np.linspace(lo, hi, k) if hi > lo else np.array([lo])


def load_published(path: str | os.PathLike, *, include_unused: bool = False) -> list[PublishedSource]:
    """Read ``models/published_counts.toml`` (``[[source]]`` tables; see the file's header).

    Returns the sources with ``use = true`` (every source with ``include_unused``). Raises
    ``ValueError`` naming the file and the table on a missing or bad key.
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read published counts ({e})") from None
    if "count" in raw:
        raise ValueError(
            f"{p}: [[count]] tables (one binomial per endpoint) are no longer read; give one [[source]] "
            "per report with none / lldas_only / doris counts, window and mix"
        )
    out = []
    for i, c in enumerate(raw.get("source", [])):
        where = f"{p}: source[{i}]"
        try:
            mix = {str(k): float(v) for k, v in dict(c["mix"]).items()}
            counts = tuple(int(c[k]) for k in CATEGORIES)
            window = tuple(float(v) for v in c["window"])
            name = str(c.get("name", f"source{i}"))
            use = c.get("use", True)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{where}: bad or missing key ({e}); needs none, lldas_only, doris, window, mix"
            ) from None
        if not isinstance(use, bool):
            raise ValueError(f"{where}.use: expected true or false (found {use!r})")
        if min(counts) < 0 or sum(counts) < 1:
            raise ValueError(f"{where}: counts must be >= 0 with at least one patient (found {counts})")
        if len(window) != 2 or not (0 < window[0] <= window[1]):
            raise ValueError(
                f"{where}.window: expected [first, last] days, 0 < first <= last (found {window})"
            )
        tot = sum(mix.values())
        if not mix or tot <= 0 or min(mix.values()) < 0:
            raise ValueError(f"{where}.mix: expected dose-level weights >= 0 with a positive sum")
        out.append(
            PublishedSource(
                name, counts, (window[0], window[1]), {k: v / tot for k, v in mix.items()}, use,
                str(c.get("source", "")),
            )
        )  # fmt: skip
    if not out:
        raise ValueError(f"{p}: no [[source]] tables")
    used = out if include_unused else [c for c in out if c.use]
    if not used:
        raise ValueError(f"{p}: every [[source]] has use = false")
    return used


# ---------------------------------------------------------------------------------------------------
# Stage 2: the ordinal link in PyMC
# ---------------------------------------------------------------------------------------------------
def _visit_grid(days: Sequence[float], extra: Sequence[float] = ()) -> np.ndarray:
    g = np.unique(
        np.round(np.concatenate([np.asarray(days, float), np.asarray(extra, float), [REFERENCE_DAY]]), 6)
    )
    return g[g > 0]


#: Parameters whose sampler diagnostics are checked (population-level quantities of the link).
DIAG_PARAMS: tuple[str, ...] = ("theta0_lldas", "delta", "gamma_delta", "theta1", "sigma_u", "tau_visit")
#: Thresholds of :func:`remission_diagnostics`: per imputation (short chains) and pooled.
RHAT_MAX_IMPUTATION = 1.05
ESS_MIN_POOLED = 400
#: Prior scales (half-normal) of the patient-effect SD and of the visit path's SD per sqrt(log-day).
SIGMA_U_PRIOR = 3.0
TAU_VISIT_PRIOR = 2.0
#: Prior SD of ``gamma_delta``, the power of day in the DORIS/LLDAS gap (module doc): the generator's
#: gap falls about as (t/180)^-2.7 between days 90 and 365, 1.4 prior SDs from a constant gap.
GAMMA_DELTA_PRIOR = 2.0
#: The patient effect is integrated out on this grid of N(0, 1) (x in [-8, 8], 161 points, weights
#: proportional to the density, summing to 1). Gauss–Hermite with 21 nodes was 0.02 off for
#: E[sigmoid(0.3 + 9x)] (a near-deterministic patient, sigma_u = 9); this grid's spacing (0.1) is far
#: below the width of a visit's sigmoid in x (1 / sigma_u) for any sigma_u the prior allows, and a
#: patient's whole visit sequence is integrated to 1e-5 in log-likelihood (tests/test_remission.py, against scipy).
#: A single visit's probability (one sigmoid in x: new patients, published counts) needs fewer
#: points: 81 (spacing 0.2) are within 2e-5 of the exact value for sigma_u <= 9.
QUADRATURE_POINTS = 161
SINGLE_VISIT_POINTS = 81
QUADRATURE_RANGE = 8.0


def normal_quadrature(points: int = QUADRATURE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E[f(x)], x ~ N(0, 1): ``sum(w * f(x))`` (module constants above). The one
    quadrature of the patient effect: stage 2's marginal likelihood and the conditional draws of
    observed patients' effects (``points`` = 161), the published counts and new patients'
    probabilities (``SINGLE_VISIT_POINTS``)."""
    x = np.linspace(-QUADRATURE_RANGE, QUADRATURE_RANGE, int(points))
    w = np.exp(-0.5 * x**2)
    return x, w / w.sum()


def _case_loglik(case: str, xl: Any, xd: Any, delta: Any, log1pexp: Any, log1mexp: Any) -> Any:
    """Log-likelihood of a visit of category ``case`` from its LLDAS and DORIS log-odds ``xl``, ``xd``:
    none / LLDAS only / DORIS, or the two partial cases of a visit with one endpoint missing.
    ``log1pexp``, ``log1mexp`` come from numpy or PyTensor, so the sampled model and the draws of ``u``
    use this one formula."""
    if case == "none":
        return -log1pexp(xl)
    if case == "lldas_only":
        return -log1pexp(-xl) - log1pexp(xd) + log1mexp(-delta)
    if case == "doris":
        return -log1pexp(-xd)
    if case == "lldas":
        return -log1pexp(-xl)
    if case == "not_doris":
        return -log1pexp(xd)
    raise ValueError(f"unknown visit category {case!r}")


def _subject_node_loglik(
    xl: Any,
    xd: Any,
    delta: Any,
    sidx: np.ndarray,
    case: Mapping[str, np.ndarray],
    n_subjects: int,
    tensor: bool,
) -> Any:
    """Sum over each patient's visits of the visit log-likelihood at every grid node: ``xl``, ``xd`` are
    ``(..., visit, node)`` (``delta``, the visit's DORIS/LLDAS gap, as ``(..., visit, 1)``), the result
    ``(..., subject, node)``.
    Each category's formula is evaluated on its own visits only and added into its patients' rows
    (a scatter-add; a dense one-hot product cost subjects x visits x nodes per gradient). ``tensor``:
    PyTensor (in the sampled model) or numpy (the draws of ``u``)."""
    if tensor:
        import pymc as pm
        import pytensor.tensor as pt

        out = pt.zeros((n_subjects, xl.shape[-1]))
        for k, mask in case.items():
            idx = np.flatnonzero(np.asarray(mask) > 0)
            if idx.size:
                term = _case_loglik(k, xl[idx], xd[idx], delta[idx], pm.math.log1pexp, pt.log1mexp)
                out = pt.inc_subtensor(out[sidx[idx]], term)
        return out
    out = np.zeros((*xl.shape[:-2], n_subjects, xl.shape[-1]))
    for k, mask in case.items():
        idx = np.flatnonzero(np.asarray(mask) > 0)
        if idx.size:
            term = _case_loglik(
                k, xl[..., idx, :], xd[..., idx, :], delta[..., idx, :], _np_log1pexp, _np_log1mexp
            )
            np.add.at(out, (Ellipsis, sidx[idx], slice(None)), term)
    return out


def _np_log1pexp(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _np_log1mexp(x: np.ndarray) -> np.ndarray:
    return np.log(-np.expm1(x))


def _int_seed(seed: int, m: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(m)]).generate_state(1)[0])


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
    published: Sequence[PublishedSource] | None = None,
    published_metrics: Mapping[str, np.ndarray] | None = None,
    stage1_draws: Sequence[int] | None = None,
    draws: int = 200,
    tune: int = 300,
    chains: int = 2,
    seed: int = 0,
    sigma_u_prior: float = SIGMA_U_PRIOR,
    tau_visit_prior: float = TAU_VISIT_PRIOR,
    gamma_delta_prior: float = GAMMA_DELTA_PRIOR,
    target_accept: float = 0.9,
    sampler: str = "nutpie",
    backend: str = "jax",
) -> xr.Dataset:
    """Fit the ordinal link once per imputation and pool the posteriors (multiple imputation).

    ``metric_draws`` is ``(subject, M)``: column ``m`` holds every subject's metric at the same
    stage-1 posterior draw ``m`` (``stage1_draws[m]``, its chain-major position, stored). Stage 2 is
    sampled on each column with ``chains`` chains of ``tune`` + ``draws``; the pooled posterior is the
    concatenation over imputations (``chain`` = imputation × chain, coordinates ``imputation`` and
    ``stage1_draw`` on ``chain``): the equal-weight mixture of the M conditional posteriors. The model
    is compiled once; each imputation only swaps the data. ``published_metrics`` maps a dose-level
    label to virtual patients' metrics ``(M, n)``, row ``m`` simulated from stage-1 draw ``m``.

    Priors (on the model file's scale): ``theta0_lldas ~ N(theta0, 2)``, ``delta ~ HalfNormal(2)``,
    ``gamma_delta ~ N(0, gamma_delta_prior)``, ``theta1 ~ N(theta1, 2)``, ``sigma_u ~
    HalfNormal(sigma_u_prior)``, ``tau_visit ~ HalfNormal(tau_visit_prior)`` per sqrt(log-day)
    (module doc: why these widths); NUTS at ``target_accept``. ``sampler``:
    "nutpie" (``backend`` "jax" or "numba") or "pymc". Returns the pooled Dataset on ``chain, draw``
    (``u`` on ``subject``, ``v`` on ``visit_day``) with the per-imputation diagnostics
    (``diag_*`` on ``imp``; :func:`remission_diagnostics`).
    """
    import pymc as pm
    import pytensor.tensor as pt

    ids = [str(i) for i in subject_ids]
    x = link_values({metric: metric_draws}, metric)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise ValueError(f"metric_draws must be (subject, M) with {len(ids)} subjects (found {x.shape})")
    if not np.all(np.isfinite(x)):
        raise ValueError("metric_draws contain non-finite values")
    n_s, n_imp = x.shape
    s1 = np.arange(n_imp) if stage1_draws is None else np.asarray(stage1_draws, int)
    if s1.size != n_imp:
        raise ValueError(f"stage1_draws gives {s1.size} positions for {n_imp} imputations")
    z = (x - center) / scale
    oc = outcomes.copy()
    oc["ID"] = oc["ID"].astype(str)
    lo, hi = _category_bounds(oc["DORIS"].to_numpy(float), oc["LLDAS"].to_numpy(float))
    keep = ~((lo == 0) & (hi == 2)) & oc["ID"].isin(ids).to_numpy()
    oc, lo, hi = oc[keep], lo[keep], hi[keep]
    pub_days = [d for c in published or () for d in c.days()]
    grid = _visit_grid(np.concatenate([oc["day"].to_numpy(float), visit_days]), pub_days)
    ref = int(np.argmin(np.abs(np.log(grid / REFERENCE_DAY))))
    gaps = np.sqrt(np.abs(np.diff(np.log(grid))))
    sidx = np.array([ids.index(i) for i in oc["ID"]], int)
    didx = np.searchsorted(grid, np.round(oc["day"].to_numpy(float), 6))
    case = {
        "none": (lo == 0) & (hi == 0),
        "lldas_only": (lo == 1) & (hi == 1),
        "doris": lo == 2,
        "lldas": (lo == 1) & (hi == 2),
        "not_doris": (lo == 0) & (hi == 1),
    }
    labels = sorted({lab for c in published or () for lab in c.mix})
    zpub: dict[str, np.ndarray] = {}
    for lab in labels:
        if published_metrics is None or lab not in published_metrics:
            raise ValueError(f"published counts: no virtual-patient metrics for dose level {lab}")
        arr = np.atleast_2d(link_values({metric: published_metrics[lab]}, metric))
        if arr.shape[0] != n_imp:
            raise ValueError(
                f"published counts: dose level {lab}: {arr.shape[0]} rows for {n_imp} imputations"
            )
        zpub[lab] = (arr - center) / scale

    qx, qw = normal_quadrature()
    coords = {"subject": ids, "visit_day": grid, "step": np.arange(max(grid.size - 1, 0))}
    with pm.Model(coords=coords) as model:
        z_d = pm.Data("z_metric", z[:, 0])
        pub_d = {lab: pm.Data(f"z_pub_{i}", zpub[lab][0]) for i, lab in enumerate(labels)}
        a_l = pm.Normal("theta0_lldas", theta0, 2.0)
        delta = pm.HalfNormal("delta", 2.0)
        gamma = pm.Normal("gamma_delta", 0.0, gamma_delta_prior)
        pm.Deterministic("theta0_doris", a_l - delta)
        gap = _gap(delta, gamma, np.log(grid / REFERENCE_DAY), pt.exp)  # delta(t) on the visit grid
        b = pm.Normal("theta1", theta1, 2.0)
        sigma_u = pm.HalfNormal("sigma_u", sigma_u_prior)
        if grid.size > 1:
            tau = pm.HalfNormal("tau_visit", tau_visit_prior)
            e_v = pm.Normal("e_v", 0.0, 1.0, dims="step")
            path = pt.concatenate([pt.zeros(1), pt.cumsum(tau * gaps * e_v)])
            v = pm.Deterministic("v", path - path[ref], dims="visit_day")
        else:
            v = pm.Deterministic("v", pt.zeros(1), dims="visit_day")
        if len(oc):
            # each patient's visits share u ~ N(0, sigma_u): integrated out per patient on the grid,
            # log p(y_i) = log sum_q w_q prod_visits p(y_iv | u = sigma_u x_q) (no u in the sampler)
            eta = b * z_d[sidx] + v[didx]  # (visit,)
            at = (sigma_u * qx)[None, :]  # (1, node)
            gv = gap[didx][:, None]  # (visit, 1)
            per_subject = _subject_node_loglik(
                a_l + eta[:, None] + at, a_l - gv + eta[:, None] + at, gv, sidx, case, n_s, tensor=True
            )  # (subject, node)
            pm.Potential("visits", pt.sum(pm.math.logsumexp(per_subject + np.log(qw)[None, :], axis=1)))
        if published:
            qx1, qw1 = normal_quadrature(SINGLE_VISIT_POINTS)
            for j, c in enumerate(published):
                p_l = p_d = 0.0
                dj = np.array([int(np.argmin(np.abs(grid - day))) for day in c.days()])
                for lab, w in c.mix.items():
                    # (patient, follow-up day, GH node): averaged over all three with weights
                    lin = b * pub_d[lab][:, None, None] + v[dj][None, :, None] + sigma_u * qx1[None, None, :]
                    wk = w * qw1[None, None, :] / (dj.size * zpub[lab].shape[1])
                    p_l = p_l + pt.sum(pm.math.sigmoid(a_l + lin) * wk)
                    p_d = p_d + pt.sum(pm.math.sigmoid(a_l - gap[dj][None, :, None] + lin) * wk)
                probs = pt.clip(pt.stack([1.0 - p_l, p_l - p_d, p_d]), 1e-12, 1.0)
                pm.Multinomial(
                    f"published_{j}", n=c.n, p=probs / pt.sum(probs), observed=np.asarray(c.counts)
                )
        compiled = None
        if sampler == "nutpie":
            import nutpie

            compiled = nutpie.compile_pymc_model(model, backend=backend, freeze_model=False)
        posts, divs = [], []
        for m in range(n_imp):
            data = {"z_metric": z[:, m], **{f"z_pub_{i}": zpub[lab][m] for i, lab in enumerate(labels)}}
            if compiled is not None:
                idata = nutpie.sample(
                    compiled.with_data(**data),
                    draws=draws,
                    tune=tune,
                    chains=chains,
                    seed=_int_seed(seed, m),
                    progress_bar=False,
                    cores=chains,
                    target_accept=target_accept,
                )
            else:
                pm.set_data(data)
                idata = pm.sample(
                    draws=draws,
                    tune=tune,
                    chains=chains,
                    random_seed=_int_seed(seed, m),
                    target_accept=target_accept,
                    progressbar=False,
                    cores=1,
                    compute_convergence_checks=False,
                )
            post = _group(idata, "posterior")
            keepv = ["theta0_lldas", "theta0_doris", "delta", "gamma_delta", "theta1", "sigma_u", "v"] + (
                ["tau_visit"] if grid.size > 1 else []
            )
            post = post[keepv].load()
            post = post.assign_coords(chain=np.arange(chains) + m * chains, draw=np.arange(draws))
            u = _conditional_patient_effects(
                post, z[:, m], sidx, didx, case, n_s, np.random.default_rng([int(seed), int(m), 11])
            )
            post["u"] = (("chain", "draw", "subject"), u)
            posts.append(post)
            stats = _group(idata, "sample_stats")
            divs.append(int(np.asarray(stats["diverging"].values).sum()) if "diverging" in stats else 0)
    pooled = xr.concat(posts, dim="chain")
    pooled = pooled.assign_coords(
        subject=np.array(ids, dtype=str),
        visit_day=grid,
        imputation=("chain", np.repeat(np.arange(n_imp), chains)),
        stage1_draw=("chain", np.repeat(s1, chains)),
    )
    pooled = _attach_diagnostics(pooled, n_imp, chains, divs)
    pooled.attrs.update(
        metric=metric,
        center=float(center),
        scale=float(scale),
        n_imputations=int(n_imp),
        seed=int(seed),
        draws=int(draws),
        tune=int(tune),
        chains_per_imputation=int(chains),
        n_visits=int(len(oc)),
        published=int(bool(published)),
        published_sources=", ".join(c.name for c in published or ()),
        sigma_u_prior=float(sigma_u_prior),
        tau_visit_prior=float(tau_visit_prior),
        gamma_delta_prior=float(gamma_delta_prior),
        target_accept=float(target_accept),
        pooling=(
            "multiple imputation: one stage-2 fit per stage-1 posterior draw (the same draw for every "
            "subject), posteriors pooled as an equal-weight mixture"
        ),
    )
    for name, desc in (
        ("theta0_lldas", "log-odds of LLDAS at day 180 at the metric's centre"),
        ("theta0_doris", "log-odds of DORIS at day 180 at the metric's centre"),
        ("delta", "DORIS/LLDAS log-odds gap at day 180"),
        ("gamma_delta", "power of day in the DORIS/LLDAS gap: delta(t) = delta*(t/180)^gamma_delta"),
        ("theta1", "log-odds per `scale` units of the metric"),
        ("sigma_u", "SD of the patient effect (log-odds)"),
        ("v", "visit effect (log-odds, 0 at day 180)"),
    ):
        pooled[name].attrs["long_name"] = desc
    return pooled


def _conditional_patient_effects(
    post: xr.Dataset,
    z: np.ndarray,
    sidx: np.ndarray,
    didx: np.ndarray,
    case: Mapping[str, np.ndarray],
    n_subjects: int,
    rng: np.random.Generator,
    chunk: int = 64,
) -> np.ndarray:
    """Each observed patient's effect ``u`` for every posterior draw of one imputation, drawn from its
    conditional posterior given that draw and the patient's visits: p(u | θ, y_i) ∝ N(u; 0, sigma_u)
    prod_v p(y_iv | u), on the grid of :func:`normal_quadrature` (a node by its posterior weight, then
    uniform within the node's cell). With u integrated out of the sampled model, this restores the
    joint draw (θ, u) exactly up to the grid. Returns ``(chain, draw, subject)``."""
    qx, qw = normal_quadrature()
    h = qx[1] - qx[0]
    nc, nd = post.sizes["chain"], post.sizes["draw"]
    flat = lambda k: np.asarray(post[k].transpose("chain", "draw", ...).values, float).reshape(nc * nd, -1)  # noqa: E731
    a_l, b, sig = (flat(k)[:, 0] for k in ("theta0_lldas", "theta1", "sigma_u"))
    v = flat("v")
    grid = np.asarray(post["visit_day"].values, float)
    # delta(t) at every grid day, (draw, visit_day): the grid needs no clamping
    gap = _gap(flat("delta"), flat("gamma_delta"), np.log(grid / REFERENCE_DAY)[None, :])
    out = np.empty((nc * nd, n_subjects))
    for s0 in range(0, nc * nd, chunk):
        sl = slice(s0, min(s0 + chunk, nc * nd))
        eta = b[sl, None] * z[sidx][None, :] + v[sl][:, didx]  # (draw, visit)
        at = sig[sl, None, None] * qx[None, None, :]
        gv = gap[sl][:, didx, None]  # (draw, visit, 1)
        lp = _subject_node_loglik(
            a_l[sl, None, None] + eta[..., None] + at,
            a_l[sl, None, None] - gv + eta[..., None] + at,
            gv,
            sidx,
            case,
            n_subjects,
            tensor=False,
        )  # (draw, subject, node)
        lp += np.log(qw)[None, None, :]
        node = np.argmax(lp + rng.gumbel(size=lp.shape), axis=-1)  # a draw from softmax(lp)
        out[sl] = sig[sl, None] * (qx[node] + h * (rng.uniform(size=node.shape) - 0.5))
    return out.reshape(nc, nd, n_subjects)


def _group(idata: Any, name: str) -> xr.Dataset:
    g = idata[name]
    return g.to_dataset() if hasattr(g, "to_dataset") else g


def _attach_diagnostics(post: xr.Dataset, n_imp: int, chains: int, divs: Sequence[int]) -> xr.Dataset:
    """R-hat, bulk and tail ESS per imputation and parameter (within that imputation's chains), and
    its divergences, as ``diag_*`` variables on ``imp`` (imputation 0..M−1) and ``diag_parameter``."""
    import arviz_stats as azs

    names = [n for n in DIAG_PARAMS if n in post]
    r = np.full((n_imp, len(names)), np.nan)
    eb, et = r.copy(), r.copy()
    for m in range(n_imp):
        sub = post.isel(chain=slice(m * chains, (m + 1) * chains))
        for k, name in enumerate(names):
            a = np.asarray(sub[name].transpose("chain", "draw").values, float)
            st = azs.base.array_stats
            r[m, k] = float(st.rhat(a, chain_axis=0, draw_axis=1))
            eb[m, k] = float(st.ess(a, chain_axis=0, draw_axis=1, method="bulk"))
            et[m, k] = float(st.ess(a, chain_axis=0, draw_axis=1, method="tail", prob=0.05))
    dims = ("imp", "diag_parameter")
    return post.assign(
        diag_r_hat=(dims, r),
        diag_ess_bulk=(dims, eb),
        diag_ess_tail=(dims, et),
        diag_divergences=(("imp",), np.asarray(divs, int)),
    ).assign_coords(diag_parameter=names, imp=np.arange(n_imp))


def _stored_link(post: xr.Dataset | str | os.PathLike) -> xr.Dataset | None:
    """``post`` itself, or the ``remission.nc`` of a fit folder (None when it has none; never fits)."""
    if isinstance(post, xr.Dataset):
        return post
    p = Path(post)
    p = p / "remission.nc" if p.is_dir() else p
    if not p.is_file():
        return None
    with xr.open_dataset(p, engine="netcdf4") as f:
        return f.load()


def remission_diagnostics(post: xr.Dataset | str | os.PathLike) -> pd.DataFrame:
    """Sampler diagnostics of the stage-2 posterior as a table (for ``predict``, ``doses``, reports).

    ``post``: a stage-2 posterior, or a fit folder (its cached ``remission.nc`` is read; nothing is
    fitted; an empty table when there is none).

    One row per imputation and parameter (``imputation`` 0..M−1: R-hat, bulk and tail ESS within that
    imputation's chains, its divergences) and one ``pooled`` row per parameter: the worst R-hat over
    imputations, ESS summed over imputations (independent runs), all divergences, and
    ``between_share``, the share of the pooled posterior variance that lies between imputations (the
    part due to stage-1 exposure uncertainty). ``ok``: per imputation R-hat ≤ ``RHAT_MAX_IMPUTATION``
    (short chains) and no divergence; pooled, also ESS ≥ ``ESS_MIN_POOLED``. An empty table for a
    link without diagnostics (the ASSUMED link).
    """
    cols = ["imputation", "parameter", "r_hat", "ess_bulk", "ess_tail", "divergences", "between_share", "ok"]
    post = _stored_link(post)
    if post is None or "diag_r_hat" not in post:
        return pd.DataFrame(columns=cols)
    names = [str(n) for n in post["diag_parameter"].values]
    r, eb, et = (post[k].values for k in ("diag_r_hat", "diag_ess_bulk", "diag_ess_tail"))
    dv = post["diag_divergences"].values
    imp = post["imputation"].values if "imputation" in post.coords else None
    rows = []
    for m in range(r.shape[0]):
        for k, name in enumerate(names):
            ok = bool(r[m, k] <= RHAT_MAX_IMPUTATION and dv[m] == 0)
            rows.append([str(m), name, r[m, k], eb[m, k], et[m, k], int(dv[m]), np.nan, ok])
    for k, name in enumerate(names):
        share = np.nan
        if imp is not None and name in post:
            flat = post[name].transpose("chain", "draw").values
            means = np.array([flat[imp == m].mean() for m in range(r.shape[0])])
            tot = flat.var()
            share = float(means.var() / tot) if tot > 0 else np.nan
        row_r, row_b, row_t = np.nanmax(r[:, k]), np.sum(eb[:, k]), np.sum(et[:, k])
        ok = bool(row_r <= RHAT_MAX_IMPUTATION and dv.sum() == 0 and min(row_b, row_t) >= ESS_MIN_POOLED)
        rows.append(["pooled", name, row_r, row_b, row_t, int(dv.sum()), share, ok])
    return pd.DataFrame(rows, columns=cols)


def diagnostics_line(post: xr.Dataset) -> str:
    """One plain line: ``remission stage 2: ok (...)`` or ``remission stage 2: FAIL (...)``."""
    tab = remission_diagnostics(post)
    if tab.empty:
        return "remission stage 2: no sampler diagnostics (ASSUMED link, not fitted)"
    pooled = tab[tab["imputation"] == "pooled"]
    n_imp = int(post.attrs.get("n_imputations", post.sizes.get("imp", 0)))
    facts = (
        f"{n_imp} imputations; worst R-hat within an imputation {pooled['r_hat'].max():.3f} "
        f"(<= {RHAT_MAX_IMPUTATION}); pooled ESS bulk/tail >= {pooled['ess_bulk'].min():.0f}/"
        f"{pooled['ess_tail'].min():.0f} (>= {ESS_MIN_POOLED}); divergences {int(pooled['divergences'].max())}"
    )
    return f"remission stage 2: {'ok' if bool(pooled['ok'].all()) else 'FAIL'} ({facts})"


def _interpolated_visit_effect(visit_days: np.ndarray, v: np.ndarray, day: float) -> np.ndarray:
    """``v(day)`` from ``v`` of shape (draws, visit_day), interpolated in log-day (flat outside)."""
    grid = np.asarray(visit_days, float)
    if grid.size == 1:
        return v[:, 0]
    lg, ld = np.log(grid), np.log(max(day, 1e-9))
    j = int(np.clip(np.searchsorted(lg, ld), 1, grid.size - 1))
    w = float(np.clip((ld - lg[j - 1]) / (lg[j] - lg[j - 1]), 0.0, 1.0))
    return (1 - w) * v[:, j - 1] + w * v[:, j]


def _flat(post: xr.Dataset, name: str) -> np.ndarray:
    return post[name].stack(s=("chain", "draw")).transpose("s", ...).values


def link_arrays(post: xr.Dataset) -> dict[str, Any]:
    """The link's draws as plain arrays on one draw axis (chain-major), taken out of ``post`` once,
    so that evaluating the link many times (the dose search) does not restack the Dataset."""
    out: dict[str, Any] = {k: _flat(post, k) for k in ("theta0_lldas", "theta1", "v")}
    out["sigma_u"] = _flat(post, "sigma_u") if "sigma_u" in post else None
    # the DORIS/LLDAS gap delta(t) = delta*(t/180)^gamma_delta; a link without the power (format <= 4,
    # the ASSUMED link) has a constant gap, theta0_lldas - theta0_doris
    out["delta"] = (
        _flat(post, "delta") if "delta" in post else out["theta0_lldas"] - _flat(post, "theta0_doris")
    )
    out["gamma_delta"] = _flat(post, "gamma_delta") if "gamma_delta" in post else np.zeros_like(out["delta"])
    out["visit_day"] = np.asarray(post["visit_day"].values, float)
    out.update(
        center=float(post.attrs["center"]), scale=float(post.attrs["scale"]), metric=str(post.attrs["metric"])
    )
    return out


def _gap(delta: Any, gamma_delta: Any, log_day_ratio: Any, exp: Any = np.exp) -> Any:
    """The DORIS/LLDAS log-odds gap ``delta·(t/180)^gamma_delta`` from ``log(t/180)``: the one formula
    of the gap, in the sampled model (``exp`` from PyTensor) and outside it (numpy)."""
    return delta * exp(gamma_delta * log_day_ratio)


def _gap_at(delta: np.ndarray, gamma_delta: np.ndarray, visit_days: np.ndarray, day: float) -> np.ndarray:
    """:func:`_gap` per draw at ``day``, clamped to the visit grid (as ``v`` is flat outside it)."""
    d = float(np.clip(day, np.min(visit_days), np.max(visit_days)))
    return _gap(delta, gamma_delta, np.log(d / REFERENCE_DAY))


def _probabilities(
    arr: dict[str, Any], metric: np.ndarray, day: float, u: Any = None
) -> dict[str, np.ndarray]:
    """The link itself, on :func:`link_arrays`: ``σ(theta0_lldas + η)`` and ``σ(theta0_lldas −
    delta(day) + η)`` with ``η = theta1·(x − center)/scale + u + v(day)``, per draw (leading axis)."""
    name = arr["metric"]
    z = (link_values({name: metric}, name) - arr["center"]) / arr["scale"]
    nd = arr["theta1"].size
    extra = (1,) * max(np.ndim(z) - 1, np.ndim(u) - 1 if u is not None else 0, 0)
    b = arr["theta1"].reshape((nd, *extra))
    v = _interpolated_visit_effect(arr["visit_day"], arr["v"], day).reshape((nd, *extra))
    eta = arr["theta0_lldas"].reshape((nd, *extra)) + b * z + v + (0.0 if u is None else u)
    gap = _gap_at(arr["delta"], arr["gamma_delta"], arr["visit_day"], day).reshape((nd, *extra))
    # expit: no overflow warning where the gap is large (early days with a steeply falling gap)
    return {"DORIS": expit(eta - gap), "LLDAS": expit(eta)}


def link_probabilities(
    post: xr.Dataset, metric: np.ndarray, day: float, u: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """P(DORIS), P(LLDAS) per link draw (leading axis) for ``metric`` values broadcast against it.

    The one implementation of the link (module doc): ``σ(theta0_lldas + η)`` for LLDAS and
    ``σ(theta0_lldas − delta(day) + η)`` for DORIS, ``η = theta1·(x − center)/scale + u + v(day)``.
    ``post`` is a stage-2 posterior or :func:`assumed_link`; ``metric``: the link's covariate
    (:func:`link_values`), shape ``(draws, ...)`` or broadcastable; ``u``: patient effect (log-odds)
    of the same shape, 0 when None (the typical patient); ``day`` in days.
    """
    return _probabilities(link_arrays(post), metric, day, u)


def marginal_probabilities(
    post: xr.Dataset | dict[str, Any], metric: np.ndarray, day: float
) -> dict[str, np.ndarray]:
    """P(DORIS), P(LLDAS) of a new patient with link covariate ``metric`` (shape as for
    :func:`link_probabilities`) with the patient effect integrated out: ``E_u σ(theta0 + η + u)``,
    ``u ~ N(0, sigma_u)`` of each link draw, on the grid of :func:`normal_quadrature`. ``post``: the
    link, or its arrays taken out once (:func:`link_arrays`) when it is evaluated many times."""
    qx1, qw1 = normal_quadrature(SINGLE_VISIT_POINTS)
    arr = post if isinstance(post, dict) else link_arrays(post)
    sig = arr["sigma_u"]
    x = np.asarray(metric, float)
    extra = (1,) * max(np.ndim(x) - 1, 0)
    out: dict[str, np.ndarray] = {}
    for node, w in zip(qx1, qw1, strict=True):
        pr = _probabilities(arr, x, day, (sig * node).reshape((sig.size, *extra)))
        for ep in ENDPOINTS:
            out[ep] = out.get(ep, 0.0) + w * pr[ep]
    return out


def select_draws(
    post: xr.Dataset, n: int, rng: np.random.Generator, stage1: Sequence[int] | None = None
) -> xr.Dataset:
    """``n`` link draws picked at random (with replacement when ``n`` exceeds the draws), on
    ``chain = [0], draw = 0..n−1``, with the link's attrs: one per kinetic draw it is paired with.

    ``stage1`` (optional, ``n`` chain-major positions in the kinetic posterior): the link draw paired
    with kinetic draw ``stage1[i]`` is picked from the imputation fitted on that same draw when the
    link has one (``stage1_draw`` coordinate, :func:`sample_remission`), so exposure and link come
    from one joint draw; kinetic draws no imputation used get a link draw from the whole pool.
    """
    keep = [
        v
        for v in ("theta0_lldas", "theta0_doris", "delta", "gamma_delta", "theta1", "sigma_u", "v")
        if v in post
    ]
    flat = post[keep].stack(s=("chain", "draw"))
    nd = flat.sizes["s"]
    pos = (
        np.repeat(np.asarray(post["stage1_draw"].values, int), post.sizes["draw"])
        if "stage1_draw" in post.coords
        else None
    )
    if stage1 is not None and pos is not None and np.isin(np.asarray(stage1, int), pos).any():
        take = np.empty(n, int)
        for i, s1 in enumerate(np.asarray(stage1, int)):
            cand = np.flatnonzero(pos == s1)
            take[i] = rng.choice(cand) if cand.size else rng.integers(nd)
    else:
        take = rng.choice(nd, size=n, replace=n > nd)
    sub = flat.isel(s=take)
    out = {}
    for k in keep:
        da = sub[k].transpose("s", ...)
        out[k] = (("chain", "draw", *da.dims[1:]), np.array(da.values)[None])
    # plain in-memory arrays only: the result travels to Dask workers and must hold no file handle
    coords: dict[str, Any] = {"chain": [0], "draw": np.arange(n)}
    if "visit_day" in post.coords:
        coords["visit_day"] = np.array(post["visit_day"].values)
    return xr.Dataset(out, coords=coords, attrs=dict(post.attrs))


def patient_effects(link: xr.Dataset, n_patients: int, rng: np.random.Generator) -> np.ndarray:
    """New patients' effects ``u`` (log-odds), ``(link draw, patient)``: ``sigma_u`` of each draw
    times a standard normal. The one place a new patient's remission effect is drawn (``predict``
    and the dose search)."""
    sig = _flat(link, "sigma_u")
    return sig[:, None] * rng.standard_normal((sig.size, int(n_patients)))


def predict_from_metric(
    post: xr.Dataset,
    metric: np.ndarray,
    days: Sequence[float] = (180.0, 365.0),
    seed: int = 0,
    *,
    stage1: Sequence[int] | None = None,
    links_per_sample: int = 1,
) -> xr.Dataset:
    """Predicted probabilities for new patients with given link covariates ``(sample, patient)``.

    Each sample row (one kinetic draw's virtual patients; ``stage1`` its posterior position) is paired
    with ``links_per_sample`` link draws (:func:`select_draws`: from the imputation of that kinetic
    draw when there is one). ``p_population``: per link draw, the mean over its patients of the
    probability with the patient effect integrated out (:func:`marginal_probabilities`, no Monte Carlo
    noise from ``u``); quantiles = parameter uncertainty. ``p_individual``: quantiles over samples ×
    patients, each patient with a drawn effect (:func:`patient_effects`); both on ``endpoint, day,
    quantile``. ``p_mean`` (fully integrated predictive probability) on ``endpoint, day``.
    """
    rng = np.random.default_rng(seed)
    x = np.atleast_2d(np.asarray(metric, float))
    reps = max(int(links_per_sample), 1)
    x = np.repeat(x, reps, axis=0)
    s1 = None if stage1 is None else np.repeat(np.asarray(stage1, int), reps)
    n_s, n_p = x.shape
    sub = select_draws(post, n_s, rng, s1)
    u = patient_effects(sub, n_p, rng)
    pop = np.zeros((2, len(days), len(QUANTILES)))
    ind = np.zeros_like(pop)
    mean = np.zeros((2, len(days)))
    for j, d in enumerate(days):
        pr = link_probabilities(sub, x, float(d), u)
        pm_ = marginal_probabilities(sub, x, float(d))
        for e, ep in enumerate(ENDPOINTS):
            pop[e, j] = np.quantile(pm_[ep].mean(axis=1), QUANTILES)
            ind[e, j] = np.quantile(pr[ep], QUANTILES)
            mean[e, j] = pm_[ep].mean()
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
            "gamma_delta": var(0.0),
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
def imputation_draws(fit: Any, n_imputations: int, seed: int) -> np.ndarray:
    """Chain-major positions of the stage-1 draws the imputations use: chosen exactly as the population
    layer chooses ``n_imputations`` draws with ``seed`` (:func:`carnk_pkpd.population.population_from`),
    so new patients simulated with the same number of draws and seed come from the same draws."""
    from carnk_pkpd.population import population_from

    return np.asarray(population_from(fit, int(n_imputations), int(seed)).draw, int)


def _new_patient_link_values(
    fit: Any, regimen: Regimen, n_patients: int, seed: int, n_draws: int | None, resolution: float
) -> tuple[np.ndarray, np.ndarray]:
    """Link covariates ``(sample, patient)`` of new virtual patients given ``regimen``, and each
    sample's chain-major position in the kinetic posterior."""
    metric = str(fit.spec.remission.get("metric", "DA"))
    hz = _horizon_for(fit.spec, metric)
    m = regimen_metrics(fit, regimen, n_patients, seed, n_draws, resolution=resolution, horizon=hz)
    return link_values(m, metric, _events(fit.spec), hz), np.asarray(m["stage1_draw"].values, int)


def _published_metrics(
    fit: Any,
    counts: Sequence[PublishedSource],
    n_patients: int,
    n_imputations: int,
    seed: int,
    resolution: float,
) -> dict[str, np.ndarray]:
    """Virtual patients' link covariates per dose level of the published mix, ``(imputation,
    patient)``: row ``m`` from the imputation's own stage-1 draw (same draws, same seed)."""
    labels = sorted({lab for c in counts for lab in c.mix})
    out = {}
    for lab in labels:
        key = lab if lab in fit.spec.dose_levels else f"DL{lab}"
        if key not in fit.spec.dose_levels:
            raise ValueError(f"published counts: dose level {lab!r} not in the model file's [dose_levels]")
        reg = Regimen.from_dose_level(fit.spec.dose_levels[key])
        out[lab], _ = _new_patient_link_values(fit, reg, n_patients, seed, n_imputations, resolution)
    return out


def _fingerprint(fit: Any, settings: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(repr(sorted(settings.items())).encode())
    files = (fit.manifest or {}).get("files") or {}
    for name in ("data.csv", "posterior.nc", "model.toml"):
        h.update(str(files.get(name, "")).encode())
    return h.hexdigest()[:16]


#: Bumped when what the stored stage-2 posterior means changes (2: day metrics that never happen
#: mapped by :func:`link_values`; 3: multiple imputation, wider priors, multinomial published
#: counts; 4: the patient effect integrated out of the sampled model, u drawn afterwards; 5: the
#: DORIS/LLDAS gap varies with the day, delta*(t/180)^gamma_delta), so an older ``remission.nc`` is
#: refitted, not reused.
LINK_FORMAT = 5

#: Defaults of :func:`fit_remission` (all part of the cache fingerprint). M = 12 imputations of
#: 2 chains x (300 tune + 200 draws): 4800 pooled draws; see the module doc for the cost.
#: ``target_accept`` 0.9: at nutpie's 0.8, 2 of 20 SYNTHETIC calibration cohorts had one divergence
#: in one imputation (the gap's power against its day-180 value); at 0.9 none, for ~25% more time.
STAGE2_DEFAULTS: dict[str, Any] = dict(
    n_imputations=12,
    resolution=0.5,
    draws=200,
    tune=300,
    chains=2,
    n_published_patients=50,
    sigma_u_prior=SIGMA_U_PRIOR,
    tau_visit_prior=TAU_VISIT_PRIOR,
    gamma_delta_prior=GAMMA_DELTA_PRIOR,
    target_accept=0.9,
)


def fit_remission(
    fit: Any,
    *,
    published: str | os.PathLike | None = None,
    seed: int = 0,
    **settings: Any,
) -> xr.Dataset:
    """Stage 2 on a kinetic fit by multiple imputation (module doc); settings of ``STAGE2_DEFAULTS``.

    ``n_imputations`` stage-1 draws (:func:`imputation_draws`) give every subject's metric
    (``resolution``: the B-cell grid in days, 0.5 d is ample for DA); :func:`sample_remission` fits
    each with ``chains`` x (``tune`` + ``draws``) and pools them. Published counts use
    ``n_published_patients`` virtual patients per dose level and imputation. The result also holds
    ``metric_draws`` (subject, imp: imputation) and the within-patient concordance check
    (:func:`concordance_table`).
    """
    unknown = sorted(set(settings) - set(STAGE2_DEFAULTS))
    if unknown:
        raise TypeError(f"fit_remission: unknown setting(s) {unknown}; known: {sorted(STAGE2_DEFAULTS)}")
    st = {**STAGE2_DEFAULTS, **settings}
    rem = fit.spec.remission
    metric = str(rem.get("metric", "DA"))
    pos = imputation_draws(fit, st["n_imputations"], seed)
    em = exposure_metrics(
        fit, resolution=st["resolution"], horizon=_horizon_for(fit.spec, metric), positions=pos
    )
    if metric not in em:
        raise ValueError(f"unknown exposure metric {metric!r}; known: {sorted(em.data_vars)}")
    flat = {k: em[k].isel(chain=0).transpose("subject", "draw").values for k in {metric, "b_nadir"} & set(em)}
    x = link_values(flat, metric, _events(fit.spec), float(em.attrs.get("horizon", 365.0)))
    counts = load_published(published) if published else None
    pm_ = (
        _published_metrics(fit, counts, st["n_published_patients"], pos.size, seed, st["resolution"])
        if counts
        else None
    )
    days = [float(d) for d in fit.spec.simulation.get("clinical_days", []) if float(d) > 0]
    outcomes = outcomes_from_cohort(fit.cohort)
    out = sample_remission(
        x,
        outcomes,
        [str(s) for s in em["subject"].values],
        metric=metric,
        center=float(rem.get("center", 55.0)),
        scale=float(rem.get("scale", 15.0)),
        theta0=float(rem.get("theta0", 0.5)),
        theta1=float(rem.get("theta1", 1.0)),
        visit_days=days or (180.0, 365.0),
        published=counts,
        published_metrics=pm_,
        stage1_draws=pos,
        draws=st["draws"],
        tune=st["tune"],
        chains=st["chains"],
        seed=seed,
        sigma_u_prior=st["sigma_u_prior"],
        tau_visit_prior=st["tau_visit_prior"],
        gamma_delta_prior=st["gamma_delta_prior"],
        target_accept=st["target_accept"],
    )
    # keep the stage-1 metrics used, so observed-subject predictions need no re-solve
    out["metric_draws"] = (("subject", "imp"), x, {"units": UNITS.get(metric, "")})
    out = out.merge(concordance_check(out, outcomes, seed=seed))
    out.attrs.update(synthetic=int(bool(fit.synthetic)), source=FITTED_SOURCE)
    return out


# ---------------------------------------------------------------------------------------------------
# Posterior predictive check of within-patient concordance across visits
# ---------------------------------------------------------------------------------------------------
CONCORDANCE_STATS = ("never_changes", "reverses")


def _concordance_stats(ids: np.ndarray, cat: np.ndarray) -> np.ndarray:
    """(never_changes, reverses) for categories ``cat`` (..., visit) of visits sorted by subject and
    day: the share of patients with ≥ 2 visits whose category is the same at every visit, and the
    share with a fall from one visit to the next (DORIS → lower or LLDAS → none)."""
    cat = np.asarray(cat)
    _, start, counts = np.unique(ids, return_index=True, return_counts=True)
    multi = counts >= 2
    same, rev = [], []
    for s0, n in zip(start[multi], counts[multi], strict=True):
        c = cat[..., s0 : s0 + n]
        same.append(np.all(c == c[..., :1], axis=-1))
        rev.append(np.any(np.diff(c, axis=-1) < 0, axis=-1))
    if not same:
        return np.full((2, *cat.shape[:-1]), np.nan)
    return np.stack([np.mean(same, axis=0), np.mean(rev, axis=0)])


def concordance_check(
    post: xr.Dataset, outcomes: pd.DataFrame, *, n_rep: int = 400, seed: int = 0
) -> xr.Dataset:
    """Posterior predictive check of persistence: the observed share of patients whose state (none /
    LLDAS only / DORIS) never changes across their visits, and the share whose state ever falls back,
    against ``n_rep`` replicates of the same visits drawn from the fitted link (each replicate: one
    pooled draw, its imputation's metrics, the observed patients' own ``u``). Only visits with both
    endpoints recorded count. Returns ``ppc_observed`` (ppc_stat) and ``ppc_replicated``
    (ppc_stat, replicate); :func:`concordance_table` summarises them."""
    oc = outcomes.copy()
    oc["ID"] = oc["ID"].astype(str)
    ids = [str(s) for s in post["subject"].values]
    lo, hi = _category_bounds(oc["DORIS"].to_numpy(float), oc["LLDAS"].to_numpy(float))
    sel = (lo == hi) & oc["ID"].isin(ids).to_numpy()
    oc = oc[sel].assign(cat=lo[sel]).sort_values(["ID", "day"], kind="stable")
    obs = _concordance_stats(oc["ID"].to_numpy(), oc["cat"].to_numpy())
    rng = np.random.default_rng([int(seed), 7])
    n_tot = post.sizes["chain"] * post.sizes["draw"]
    pick = rng.choice(n_tot, size=min(n_rep, n_tot), replace=False)
    sidx = np.array([ids.index(i) for i in oc["ID"]], int)
    imp = np.repeat(np.asarray(post["imputation"].values, int), post.sizes["draw"])[pick]
    x = post["metric_draws"].values[:, imp].T[:, sidx]  # (rep, visit)
    u = _flat(post, "u")[pick][:, sidx]
    arr = link_arrays(post)
    arr.update({k: arr[k][pick] for k in ("theta0_lldas", "theta1", "v", "delta", "gamma_delta")})
    p_l, p_d = np.empty(x.shape), np.empty(x.shape)
    for j, d in enumerate(oc["day"].to_numpy(float)):  # the link of predictions, visit by visit
        pr = _probabilities(arr, x[:, j], d, u[:, j])
        p_l[:, j], p_d[:, j] = pr["LLDAS"], pr["DORIS"]
    r = rng.uniform(size=p_l.shape)
    cat = (r < p_l).astype(int) + (r < p_d).astype(int)
    rep = _concordance_stats(oc["ID"].to_numpy(), cat)
    return xr.Dataset(
        {
            "ppc_observed": (("ppc_stat",), obs),
            "ppc_replicated": (("ppc_stat", "replicate"), rep),
        },
        coords={"ppc_stat": list(CONCORDANCE_STATS)},
    )


def concordance_table(post: xr.Dataset | str | os.PathLike) -> pd.DataFrame:
    """The concordance check as a table: ``statistic, observed, replicated_median, replicated_q05,
    replicated_q95, p_value`` (posterior predictive p-value, two-sided: twice the smaller tail, with
    ties split). ``post``: a stage-2 posterior or a fit folder (its cached ``remission.nc``). Empty
    when the link holds no check (the ASSUMED link, or no cached link)."""
    cols = ["statistic", "observed", "replicated_median", "replicated_q05", "replicated_q95", "p_value"]
    post = _stored_link(post)
    if post is None or "ppc_observed" not in post:
        return pd.DataFrame(columns=cols)
    rows = []
    for s in post["ppc_stat"].values:
        o = float(post["ppc_observed"].sel(ppc_stat=s))
        r = post["ppc_replicated"].sel(ppc_stat=s).values
        q = np.quantile(r, [0.5, 0.05, 0.95])
        tail = min(np.mean(r > o) + 0.5 * np.mean(r == o), np.mean(r < o) + 0.5 * np.mean(r == o))
        rows.append([str(s), o, q[0], q[1], q[2], float(min(1.0, 2 * tail))])
    return pd.DataFrame(rows, columns=cols)


def concordance_line(post: xr.Dataset) -> str:
    """One plain line on the concordance check (ok when every p-value ≥ 0.05, else FAIL)."""
    tab = concordance_table(post)
    if tab.empty:
        return ""
    if not np.all(np.isfinite(tab["observed"].to_numpy(float))):
        return (
            "remission visits, within-patient concordance (PPC): not available (no patient with two or "
            "more fully scored visits)"
        )
    parts = [
        f"{r.statistic.replace('_', ' ')} observed {r.observed:.2f} vs replicated {r.replicated_median:.2f} "
        f"[{r.replicated_q05:.2f}, {r.replicated_q95:.2f}]"
        for r in tab.itertuples()
    ]
    verdict = "ok" if bool((tab["p_value"] >= 0.05).all()) else "FAIL"
    return f"remission visits, within-patient concordance (PPC): {verdict} (" + "; ".join(parts) + ")"


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
    else fit it (:func:`fit_remission`) and store it there atomically. The fingerprint holds every
    setting of ``STAGE2_DEFAULTS`` (given or default: M, chain lengths, priors, ...), the seed, the
    metric, the link format and the hashes of the fit's files (and of the published file)."""
    unknown = sorted(set(kwargs) - set(STAGE2_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown remission setting(s) {unknown}; known: {sorted(STAGE2_DEFAULTS)}")
    settings = dict(
        {**STAGE2_DEFAULTS, **kwargs},
        seed=seed,
        metric=str(fit.spec.remission.get("metric", "DA")),
        link_format=LINK_FORMAT,
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
    """``(subject, endpoint, day, quantile)`` for observed subjects: each pooled link draw with the
    metrics of its own imputation's stage-1 draw and the subject's own ``u``."""
    x = post["metric_draws"].values  # (subject, imputation)
    imp = np.repeat(np.asarray(post["imputation"].values, int), post.sizes["draw"])
    u = _flat(post, "u")  # (draws, subject)
    xm = x[:, imp].T  # (draws, subject)
    out = np.zeros((x.shape[0], 2, len(days), len(QUANTILES)))
    for j, d in enumerate(days):
        pr = link_probabilities(post, xm, float(d), u)
        for e, ep in enumerate(ENDPOINTS):
            out[:, e, j] = np.quantile(pr[ep], QUANTILES, axis=0).T
    return out


#: Link draws per kinetic draw when predictions pair them by imputation (``predict``): the
#: population probability's quantiles then rest on M x this many values.
LINKS_PER_IMPUTATION = 50


def _new_patient_prediction(
    fit: Any,
    post: xr.Dataset,
    regimen: Regimen,
    days: Sequence[float],
    n_patients: int,
    seed: int,
    n_draws: int | None,
) -> xr.Dataset:
    """New patients on ``regimen``: with a fitted (imputed) link and ``n_draws`` None, the kinetic
    draws are the imputations' own stage-1 draws, each paired with ``LINKS_PER_IMPUTATION`` link draws
    of its imputation (the joint posterior of exposure and link); otherwise ``n_draws`` (40 by
    default) kinetic draws, each with one link draw (from its imputation when it has one)."""
    paired = n_draws is None and "stage1_draw" in post.coords
    if paired:
        n_draws, reps = int(post.attrs.get("n_imputations", post.sizes["chain"])), LINKS_PER_IMPUTATION
    else:
        n_draws, reps = int(n_draws or 40), 1
    x, s1 = _new_patient_link_values(fit, regimen, n_patients, seed, n_draws, 0.5)
    return predict_from_metric(post, x, days, seed, stage1=s1, links_per_sample=reps)


def predict_remission(
    fit: Any,
    regimen: Regimen | tuple | Mapping | None = None,
    visits: Sequence[float] = (180.0, 365.0),
    n_patients: int = 100,
    seed: int = 0,
    *,
    n_draws: int | None = None,
    published: str | os.PathLike | None = None,
    posterior: xr.Dataset | None = None,
    assumed: bool = False,
    **fit_kwargs: Any,
) -> xr.Dataset:
    """Posterior predictive P(DORIS), P(LLDAS) at ``visits`` (days).

    Returns ``p_subject`` on ``subject, endpoint, day, quantile`` (observed subjects; fitted link only)
    and, when ``regimen`` is given, ``p_population`` / ``p_individual`` (``endpoint, day, quantile``)
    and ``p_mean`` for a new patient (``n_patients`` virtual patients per kinetic draw: by default the
    imputations' own stage-1 draws, each paired with link draws of its imputation; or ``n_draws``
    kinetic draws, :func:`_new_patient_prediction`). Quantiles 0.05, 0.5, 0.95. The link is :func:`remission_source` (fitted and
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
        ds = ds.merge(_new_patient_prediction(fit, post, regimen, days, n_patients, seed, n_draws))
        ds.attrs.update(regimen.as_dict())
    ds["day"].attrs["units"] = "days"
    ds.attrs.update(
        metric=metric,
        synthetic=int(bool(fit.synthetic)),
        seed=int(seed),
        published=int(bool(published)),
        source=str(post.attrs.get("source", FITTED_SOURCE)),
        diagnostics=diagnostics_line(post),
        concordance=concordance_line(post),
    )
    return ds


def predict_by_dose_level(
    fit: Any,
    visits: Sequence[float] = (180.0, 365.0),
    n_patients: int = 100,
    seed: int = 0,
    *,
    n_draws: int | None = None,
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
        p = _new_patient_prediction(fit, post, reg, visits, n_patients, seed, n_draws)
        for k, v in reg.as_dict().items():
            p[k] = v
        parts.append(p)
    ds = xr.concat(parts, dim=pd.Index(labels, name="dose_level"))
    ds.attrs.update(
        metric=str(post.attrs["metric"]),
        synthetic=int(bool(fit.synthetic)),
        seed=int(seed),
        source=str(post.attrs.get("source", FITTED_SOURCE)),
        diagnostics=diagnostics_line(post),
        concordance=concordance_line(post),
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
    n_patients: int = 100,
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
