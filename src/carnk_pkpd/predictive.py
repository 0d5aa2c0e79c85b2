"""Posterior predictions at the observed records: IPRED, PRED, replicated data, NPDE-like residuals.

All draws of all subjects go through one call of the JAX solver: the parameter arrays have length
``n_draws·n_subjects`` (draw-major: row ``d·n_subjects + s``) and the grid repeats each subject's
record times once per draw, so JAX compiles once per shape.

Observation units follow the model file: DVID 1 CAR-NK cells/µL (flow), DVID 2 B cells/µL,
DVID 3 CAR copies/µg gDNA (qPCR, CAR-NK × ``copies_per_cell``). Times are days since the first
infusion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from carnk_pkpd.statistical import CAR_FLOOR, ObservationData, observation_data

__all__ = [
    "draw_indices",
    "individual_curves",
    "npde",
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


def _solve_flat(
    fit: Any, theta_sub: dict[str, np.ndarray], times: list[np.ndarray], data: ObservationData
) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``theta_sub[name]`` of shape (sample, subject) at per-subject ``times``.

    Returns CAR-NK and B cells (cells/µL), each (sample, subject, max_times) padded with NaN.
    """
    from carnk_pkpd.structural.solve import make_grid, solve

    n_samp, n_sub = next(iter(theta_sub.values())).shape
    flat = {k: np.ascontiguousarray(v, dtype=float).reshape(-1) for k, v in theta_sub.items()}
    n_tr = fit.n_transit
    grid = make_grid(
        list(data.doses) * n_samp,
        list(times) * n_samp,
        _accuracy(fit),
        k_tr=n_tr / flat["MTT"],
        k_kill=flat["k_kmax"],
    )
    car, bcell = solve(flat, grid, n_transit=n_tr, structure=fit.spec.structure)
    car = np.where(grid.mask, np.asarray(car), np.nan).reshape(n_samp, n_sub, -1)
    bcell = np.where(grid.mask, np.asarray(bcell), np.nan).reshape(n_samp, n_sub, -1)
    return car, bcell


def _scalar(fit: Any, post: xr.Dataset, name: str, fixed: float, n: int) -> np.ndarray:
    """A residual or conversion scalar per sample: posterior values, or the file's fixed value."""
    return post[name].values if name in post else np.full(n, float(fixed))


def _to_observation_scale(
    fit: Any, data: ObservationData, car: np.ndarray, bcell: np.ndarray, post: xr.Dataset
) -> np.ndarray:
    """Map (sample, subject, time) CAR-NK/B-cell values to each record's measure: (sample, record)."""
    car_r = car[:, data.subject_index, data.time_index]
    b_r = bcell[:, data.subject_index, data.time_index]
    out = np.empty_like(car_r)
    n = car_r.shape[0]
    for dvid, obs in fit.spec.observations.items():
        sel = data.dvid == dvid
        if not sel.any():
            continue
        if obs.error == "lognormal":
            pred = car_r[:, sel] + CAR_FLOOR
            if obs.conversion is not None:
                conv = _scalar(fit, post, obs.conversion.name, obs.conversion.typical, n)
                pred = pred * conv[:, None]
            out[:, sel] = pred
        else:
            out[:, sel] = b_r[:, sel]
    return out


def _records(fit: Any, data: ObservationData) -> xr.Dataset:
    from carnk_pkpd.inference import records_dataset

    return records_dataset(data).drop_vars("subject_index")


def _ipred(
    fit: Any, n_draws: int | None, seed: int
) -> tuple[np.ndarray, xr.Dataset, ObservationData, np.ndarray]:
    data = observation_data(fit.cohort)
    take = draw_indices(fit, n_draws, seed)
    ind = _stack(fit.individual_parameters()).isel(sample=take)
    post = _stack(fit.posterior).isel(sample=take)
    theta = {k: ind[k].values for k in ind.data_vars}
    car, bcell = _solve_flat(fit, theta, data.times, data)
    return _to_observation_scale(fit, data, car, bcell, post), post, data, take


def record_predictions(fit: Any, n_draws: int | None = 200, seed: int = 0) -> xr.DataArray:
    """Individual predictions (IPRED, observation units) for every concentration record.

    Returns an xarray DataArray ``IPRED`` on ``(sample, record)``; ``sample`` holds the position of
    each of ``n_draws`` thinned posterior draws (chain-major), ``record`` matches ``constant_data``.
    """
    ipred, _, data, take = _ipred(fit, n_draws, seed)
    rec = _records(fit, data)
    return xr.DataArray(
        ipred,
        dims=("sample", "record"),
        coords={"sample": take, **{k: rec[k] for k in ("record", "ID", "TIME", "DVID")}},
        name="IPRED",
        attrs={"long_name": "individual prediction in the unit of each record's DVID"},
    )


def posterior_predictive(fit: Any, n_draws: int | None = 200, seed: int = 0) -> xr.Dataset:
    """Replicated data ``y_rep`` with residual error, and its BLQ flag, on ``(sample, record)``.

    Log-normal residual (SD ``sigma_<obs>`` on the log scale) for DVID 1 and 3; combined
    ``N(pred, sqrt((prop·pred)² + add²))`` for DVID 2. ``blq_rep`` is ``y_rep < LLOQ`` (the record's
    LLOQ), i.e. the censoring the assay would apply. Also returns ``IPRED`` and the records.
    """
    rng = np.random.default_rng([seed, 1])
    ipred, post, data, take = _ipred(fit, n_draws, seed)
    n = ipred.shape[0]
    y = np.empty_like(ipred)
    for dvid, obs in fit.spec.observations.items():
        sel = data.dvid == dvid
        if not sel.any():
            continue
        mu = ipred[:, sel]
        if obs.error == "lognormal":
            sig = _scalar(fit, post, f"sigma_{obs.name}", obs.residual["log"].typical, n)[:, None]
            y[:, sel] = mu * np.exp(sig * rng.standard_normal(mu.shape))
        else:
            prop = _scalar(fit, post, f"sigma_{obs.name}_prop", obs.residual["prop"].typical, n)[:, None]
            add = _scalar(fit, post, f"sigma_{obs.name}_add", obs.residual["add"].typical, n)[:, None]
            sd = np.sqrt((prop * mu) ** 2 + add**2)
            y[:, sel] = mu + sd * rng.standard_normal(mu.shape)
    rec = _records(fit, data)
    dims = ("sample", "record")
    ds = xr.Dataset(
        {
            "y_rep": (dims, y, {"long_name": "replicated observation (uncensored), record's unit"}),
            "blq_rep": (dims, y < data.lloq[None, :], {"long_name": "replicate below the record's LLOQ"}),
            "IPRED": (dims, ipred, {"long_name": "individual prediction, record's unit"}),
        },
        coords={"sample": take, "record": rec["record"]},
    )
    return ds.merge(rec)


def population_predictions(fit: Any) -> xr.DataArray:
    """PRED per record: the typical-value prediction (eta = 0) at the posterior median.

    Each parameter is the posterior median of ``p_i·exp(−omega_p·eta_p,i)``, i.e. the population
    typical value with the subject's dose-level tier and covariates but no between-subject deviation.
    """
    data = observation_data(fit.cohort)
    ind = _stack(fit.individual_parameters())
    post = _stack(fit.posterior)
    theta = {}
    for name in ind.data_vars:
        v = np.log(ind[name].values)
        if f"omega_{name}" in post and f"eta_{name}" in post:
            v = (
                v
                - post[f"omega_{name}"].values[:, None]
                * post[f"eta_{name}"].transpose("sample", "subject").values
            )
        theta[name] = np.exp(np.median(v, axis=0))[None, :]
    med = post.median("sample").expand_dims(sample=[0])
    car, bcell = _solve_flat(fit, theta, data.times, data)
    pred = _to_observation_scale(fit, data, car, bcell, med)[0]
    return xr.DataArray(pred, dims="record", coords={"record": np.arange(len(pred))}, name="PRED")


def npde(ppc: xr.Dataset, seed: int = 0) -> xr.DataArray:
    """NPDE-like residual per record from the posterior predictive (no within-subject decorrelation).

    ``pd`` = fraction of ``y_rep`` below DV (ties count one half) for observed records; for BLQ records
    ``pd ~ Uniform(0, P(y_rep < LLOQ))`` (imputation below the LLOQ probability). ``pd`` is kept in
    ``[1/(2n), 1 − 1/(2n)]`` and ``NPDE = Φ⁻¹(pd)``.
    """
    from scipy.stats import norm

    y = ppc["y_rep"].values
    n = y.shape[0]
    dv = ppc["DV"].values
    lloq = ppc["LLOQ"].values
    blq = ppc["BLQ"].values == 1
    pd_obs = (np.sum(y < dv, axis=0) + 0.5 * np.sum(y == dv, axis=0)) / n
    p_lloq = np.sum(y < lloq, axis=0) / n
    rng = np.random.default_rng([seed, 2])
    pd_blq = rng.uniform(0.0, 1.0, size=dv.shape) * np.maximum(p_lloq, 1.0 / (2 * n))
    pdv = np.clip(np.where(blq, pd_blq, pd_obs), 1.0 / (2 * n), 1.0 - 1.0 / (2 * n))
    return xr.DataArray(norm.ppf(pdv), dims="record", coords={"record": ppc["record"].values}, name="NPDE")


def individual_curves(fit: Any, n_draws: int | None = 50, seed: int = 0, n_times: int = 120) -> xr.Dataset:
    """Posterior CAR-NK and B-cell curves (cells/µL) per subject on a dense grid of days.

    Each subject's grid runs from day −5 to its last record (``n_times`` points, shared index
    ``k``; the days are in ``time`` on ``(subject, k)``). Returns ``car``/``bcell`` on
    ``(sample, subject, k)``.
    """
    data = observation_data(fit.cohort)
    take = draw_indices(fit, n_draws, seed)
    ind = _stack(fit.individual_parameters()).isel(sample=take)
    times = [np.linspace(-5.0, max(float(t.max()) if t.size else 28.0, 1.0), n_times) for t in data.times]
    theta = {k: ind[k].values for k in ind.data_vars}
    car, bcell = _solve_flat(fit, theta, times, data)
    dims = ("sample", "subject", "k")
    return xr.Dataset(
        {
            "car": (dims, car, {"units": "cells/µL"}),
            "bcell": (dims, bcell, {"units": "cells/µL"}),
            "time": (("subject", "k"), np.stack(times), {"units": "days"}),
        },
        coords={"sample": take, "subject": data.ids},
    )
