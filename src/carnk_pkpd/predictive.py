"""Posterior predictions at the observed records of the fitted subjects: IPRED, PRED, replicated data.

Every prediction goes through the population layer (:mod:`carnk_pkpd.population`): IPRED and the
posterior predictive use the fitted subjects' own η, PRED η = 0 at the posterior median. Predictions
for NEW subjects (EPRED, VPC, NPDE, EWRES) are in :mod:`carnk_pkpd.evaluation`. Predictions are chosen by DVID (1 and 3 CAR-NK, 2 B
cells), each subject has its own doses, LD window and covariates.

Observation units follow the model file: DVID 1 CAR-NK cells/µL (flow), DVID 2 B cells/µL,
DVID 3 CAR copies/µg gDNA (qPCR, CAR-NK × ``copies_per_cell``). Times are days since the first
infusion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from carnk_pkpd.statistical import ObservationData, observation_data

__all__ = [
    "draw_indices",
    "individual_curves",
    "population_predictions",
    "posterior_predictive",
    "record_predictions",
]


def _stack(ds: xr.Dataset) -> xr.Dataset:
    return ds.stack(sample=("chain", "draw")).transpose("sample", ...)


def draw_indices(fit: Any, n_draws: int | None, seed: int | np.random.Generator) -> np.ndarray:
    """Sorted positions of ``n_draws`` posterior draws (all when None or too many), without replacement."""
    post = fit.posterior
    total = post.sizes["chain"] * post.sizes["draw"]
    if n_draws is None or n_draws >= total:
        return np.arange(total)
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1 (found {n_draws})")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n_draws, replace=False))


def _accuracy(fit: Any) -> str:
    return str((fit.manifest or {}).get("sampler", {}).get("accuracy", "default"))


def _records(fit: Any, data: ObservationData) -> xr.Dataset:
    from carnk_pkpd.inference import records_dataset

    return records_dataset(data).drop_vars("subject_index")


def _simulate_records(fit: Any, n_draws: int | None, seed: int, new_subjects: bool) -> xr.Dataset:
    """The population simulator on the fitted cohort's own design (doses, LD windows, covariates,
    records); ``new_subjects=False``: the fitted subjects' η (IPRED); True: new η from Ω."""
    from carnk_pkpd.population import simulate_population

    return simulate_population(
        fit,
        fit.cohort,
        n_draws=n_draws,
        seed=seed,
        new_subjects=new_subjects,
        times=[0.0],
        accuracy=_accuracy(fit),
        metrics=False,
    )


def record_predictions(fit: Any, n_draws: int | None = 200, seed: int = 0) -> xr.DataArray:
    """Individual predictions (IPRED, observation units) for every concentration record.

    Returns an xarray DataArray ``IPRED`` on ``(sample, record)``; ``sample`` holds the position of
    each of ``n_draws`` thinned posterior draws (chain-major), ``record`` matches ``constant_data``.
    """
    sim = _simulate_records(fit, n_draws, seed, new_subjects=False)
    rec = _records(fit, observation_data(fit.cohort))
    return xr.DataArray(
        sim["ipred"].values,
        dims=("sample", "record"),
        coords={"sample": sim["draw"].values, **{k: rec[k] for k in ("record", "ID", "TIME", "DVID")}},
        name="IPRED",
        attrs={"long_name": "individual prediction in the unit of each record's DVID"},
    )


def posterior_predictive(fit: Any, n_draws: int | None = 200, seed: int = 0) -> xr.Dataset:
    """Replicated data ``y_rep`` with residual error, and its BLQ flag, on ``(sample, record)``.

    The fitted subjects (their own η) simulated by :func:`carnk_pkpd.population.simulate_population`:
    log-normal or combined residual error as the file declares per DVID. ``blq_rep`` is
    ``y_rep < LLOQ`` (the record's LLOQ), i.e. the censoring the assay would apply. Also returns
    ``IPRED`` and the records.
    """
    sim = _simulate_records(fit, n_draws, seed, new_subjects=False)
    rec = _records(fit, observation_data(fit.cohort))
    dims = ("sample", "record")
    ds = xr.Dataset(
        {
            "y_rep": (
                dims,
                sim["y"].values,
                {"long_name": "replicated observation (uncensored), record's unit"},
            ),
            "blq_rep": (dims, sim["blq"].values, {"long_name": "replicate below the record's LLOQ"}),
            "IPRED": (dims, sim["ipred"].values, {"long_name": "individual prediction, record's unit"}),
        },
        coords={"sample": sim["draw"].values, "record": rec["record"]},
    )
    return ds.merge(rec)


def population_predictions(fit: Any) -> xr.DataArray:
    """PRED per record: the typical-value prediction (η = 0) at the posterior median.

    Each parameter is the posterior median of the subject's typical value with its dose-level tier
    and covariates but no between-subject deviation (the population layer with η = 0).
    """
    from carnk_pkpd.evaluation import population_prediction  # the one PRED computation

    pred = population_prediction(fit, fit.cohort)
    return xr.DataArray(pred, dims="record", coords={"record": np.arange(len(pred))}, name="PRED")


def individual_curves(fit: Any, n_draws: int | None = 50, seed: int = 0, n_times: int = 120) -> xr.Dataset:
    """Posterior CAR-NK and B-cell curves (cells/µL) per subject on a dense grid of days.

    Each subject's grid runs from day −5 to its last record (``n_times`` points, shared index
    ``k``; the days are in ``time`` on ``(subject, k)``). Returns ``car``/``bcell`` on
    ``(sample, subject, k)``. Parameters and LD windows from the population layer (fitted η).
    """
    from carnk_pkpd.population import PopulationDraws, SubjectDesign, individual_parameters
    from carnk_pkpd.structural import simulate

    pop = PopulationDraws.from_fit(fit, n_draws, seed)
    design = SubjectDesign.from_cohort(fit.cohort, fit.spec)
    data = design.records
    theta = individual_parameters(pop, design, new_subjects=False)
    times = [np.linspace(-5.0, max(float(t.max()) if t.size else 28.0, 1.0), n_times) for t in data.times]
    n_d, n_s = pop.n_draws, design.n_subjects
    car = np.empty((n_d, n_s, n_times))
    bcell = np.empty((n_d, n_s, n_times))
    ld = design.ld(fit.spec)
    for s_i in range(n_s):  # one subject's draws share its time grid
        th = {k: v[:, s_i] for k, v in theta.items()}
        th["n_transit"] = np.full(n_d, pop.n_transit)
        paths = simulate(
            th,
            [design.doses[s_i]] * n_d,
            times[s_i],
            fit.spec,
            _accuracy(fit),
            {k: np.full(n_d, v[s_i]) for k, v in ld.items()},
        )
        car[:, s_i], bcell[:, s_i] = np.atleast_2d(paths["car"].values), np.atleast_2d(paths["bcell"].values)
    dims = ("sample", "subject", "k")
    return xr.Dataset(
        {
            "car": (dims, car, {"units": "cells/µL"}),
            "bcell": (dims, bcell, {"units": "cells/µL"}),
            "time": (("subject", "k"), np.stack(times), {"units": "days"}),
        },
        coords={"sample": pop.draw, "subject": list(design.ids)},
    )
