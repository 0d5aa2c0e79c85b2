"""Structural models: CAR-NK kinetics (closed form) and the B-lineage ODE, solved in JAX.

Public entry points: :func:`simulate` (trajectories) and :func:`derived_metrics` (Cmax, nadir,
reappearance, reconstitution, aplasia duration). The fit and the dose search use the JAX core in
:mod:`carnk_pkpd.structural.solve` directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from carnk_pkpd.structural.metrics import metrics_from_paths

Doses = Sequence[tuple[float, float]]

__all__ = ["derived_metrics", "resolve_ld", "resolve_parameters", "simulate"]


def _spec(model: Any):
    from carnk_pkpd.spec import ModelSpec, load_model

    if isinstance(model, ModelSpec):
        return model
    return load_model("reference" if model is None else model)


def resolve_parameters(
    params: Mapping[str, Any] | None, model: Any = None
) -> tuple[dict[str, np.ndarray], int, int | None]:
    """Fill missing parameters with the model file's typical values.

    Returns ``(theta, n_transit, n_subjects)`` where ``theta`` maps every structural parameter (except
    ``n_transit``) to a float array of shape ``(n_subjects,)`` (``(1,)`` when all inputs are scalars,
    then ``n_subjects`` is ``None``).
    """
    spec = _spec(model)
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.parameters))
    if unknown:
        raise KeyError(
            f"unknown parameter(s) {unknown} for model {spec.name!r}; known: {sorted(spec.parameters)}"
        )
    values = {
        name: np.asarray(params.get(name, p.typical), dtype=float) for name, p in spec.parameters.items()
    }
    n_tr = values.pop("n_transit")
    if n_tr.ndim and not np.all(n_tr == n_tr.ravel()[0]):
        raise ValueError("n_transit must be the same for all subjects of one call (it sets the ODE's size)")
    n_transit = int(round(float(n_tr.ravel()[0])))
    if n_transit < 1:
        raise ValueError(f"n_transit must be >= 1 (found {n_transit})")
    sizes = {v.size for v in values.values() if v.ndim >= 1}
    if any(v.ndim > 1 for v in values.values()):
        raise ValueError("parameter values must be scalars or 1-D arrays (one value per subject)")
    if len(sizes - {1}) > 1:
        raise ValueError(f"1-D parameter arrays must share one length (found lengths {sorted(sizes)})")
    vector = any(v.ndim == 1 for v in values.values())
    n = max(sizes) if sizes else 1
    theta = {
        k: np.broadcast_to(v.reshape(-1) if v.ndim else v, (n,)).astype(float) for k, v in values.items()
    }
    for k, v in theta.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"parameter {k} has non-finite values")
    return theta, n_transit, (n if vector else None)


def _doses_per_subject(doses: Any, n: int) -> list[np.ndarray]:
    """One ``(n_dose, 2)`` array of (days, 10⁹ cells) per subject, from one regimen or one per subject."""
    if len(doses) == 0:
        return [np.zeros((0, 2))] * n
    first = doses[0]
    per_subject = len(first) > 0 and np.ndim(first[0]) == 1 if np.ndim(first) >= 1 else False
    if np.ndim(first) == 2:
        per_subject = True
    if not per_subject:
        one = np.asarray(doses, float).reshape(-1, 2)
        return [one] * n
    per = [np.asarray(d, float).reshape(-1, 2) for d in doses]
    if len(per) != n:
        raise ValueError(f"doses given for {len(per)} subjects but parameters for {n}")
    return per


def resolve_ld(ld: Any, spec: Any, n: int) -> dict[str, np.ndarray]:
    """Per-subject LD inputs of the solver: ``ld`` None (the file's ``simulation.ld_days`` at full
    intensity), a number (that intensity, 0 = no LD), or a mapping of per-subject inputs
    (``carnk.LD_KEYS``, as made by :func:`carnk.ld_inputs`)."""
    from carnk_pkpd.structural.carnk import LD_KEYS, ld_inputs

    if ld is None or np.ndim(ld) == 0 and not isinstance(ld, Mapping):
        days = [float(x) for x in spec.simulation["ld_days"]] or [-5.0, -3.0]
        scale = 1.0 if ld is None else float(ld)
        return ld_inputs(
            np.full(n, min(days)), np.full(n, max(days)), np.full(n, scale), spec.lymphodepletion
        )
    out = {k: np.broadcast_to(np.asarray(ld[k], float).reshape(-1), (n,)).copy() for k in LD_KEYS}
    return out


def simulate(
    params: Mapping[str, Any] | None,
    doses: Doses | Sequence[Doses],
    times: Sequence[float] | np.ndarray | Sequence[Sequence[float]],
    model: Any = None,
    accuracy: str = "default",
    ld: Any = None,
) -> xr.Dataset:
    """CAR-NK and B cells over time.

    Parameters
    ----------
    params
        Parameter values by name (``f_bl``, ``rho``, …); missing ones take the model file's typical
        values. 1-D arrays give one trajectory per entry (a leading ``subject`` dim).
    doses
        ``(time_day, amount_1e9_cells)`` infusions, or one such sequence per subject.
    times
        Output times in days since the first infusion (one vector for all subjects).
    model
        A :class:`~carnk_pkpd.spec.ModelSpec`, a model name or path; default ``"reference"``.
    accuracy
        ``"default"`` (|error| ≤ 1e-3·|B| + 1e-3 cells/µL) or ``"tight"`` (1e-6·|B| + 1e-8).
    ld
        Lymphodepletion: None (the file's LD days at full intensity), an intensity (0 = none) or
        per-subject LD inputs (:func:`resolve_ld`).

    Returns
    -------
    xarray.Dataset with ``car`` and ``bcell`` (cells/µL) on ``time`` (days).
    """
    from carnk_pkpd.structural.solve import make_grid, rate_bounds, solve

    spec = _spec(model)
    theta, n_transit, n_sub = resolve_parameters(params, spec)
    n = 1 if n_sub is None else n_sub
    t = np.asarray(times, float).ravel()
    per = _doses_per_subject(doses, n)
    k_tr, k_kill = rate_bounds(spec, theta, n_transit)
    grid = make_grid(per, [t] * n, accuracy, k_tr=k_tr, k_kill=k_kill, ld=resolve_ld(ld, spec, n))
    car, bcell = solve(theta, grid, n_transit=n_transit, structure=spec.structure, batched=True)
    car, bcell = np.asarray(car)[:, : t.size], np.asarray(bcell)[:, : t.size]
    dims = ("subject", "time")
    ds = xr.Dataset(
        {
            "car": (dims, car, {"units": "cells/µL", "long_name": "CAR-NK cells in blood"}),
            "bcell": (dims, bcell, {"units": "cells/µL", "long_name": "CD19+ B cells in blood"}),
        },
        coords={"time": ("time", t, {"units": "days", "long_name": "days since the first infusion"})},
        attrs={"model": spec.name, "structure": spec.structure, "accuracy": accuracy},
    )
    if n_sub is None:
        ds = ds.isel(subject=0, drop=True)
    else:
        ds = ds.assign_coords(subject=np.arange(n))
    return ds


def derived_metrics(
    params: Mapping[str, Any] | None,
    doses: Doses | Sequence[Doses],
    model: Any = None,
    *,
    reappearance_threshold: float = 1.0,
    reconstitution_threshold: float = 10.0,
    aplasia_threshold: float = 1.0,
    aplasia_window: tuple[float, float] = (0.0, 180.0),
    car_window: tuple[float, float] = (0.0, 28.0),
    horizon: float = 365.0,
    resolution: float = 0.25,
    accuracy: str = "default",
    ld: Any = None,
    car_resolution: float = 0.01,
) -> xr.Dataset:
    """Exposure and B-cell metrics per subject.

    ``car_cmax`` (cells/µL), ``car_tmax`` (days) and ``car_auc_0_28`` (cells/µL·day) over
    ``car_window``; ``b_nadir`` (cells/µL) and ``b_nadir_day`` over ``[0, horizon]``;
    ``reappearance_day`` / ``reconstitution_day``: first t > 0 with B ≥ threshold after B was below it
    at some t ≥ 0 (NaN if never); ``DA``: days with B < ``aplasia_threshold`` in ``aplasia_window``.
    B is solved on nodes every ``resolution`` days and crossings are interpolated log-linearly;
    CAR-NK uses its closed form on a ``car_resolution``-day grid (0.01). ``ld`` as in :func:`simulate`.
    "Never happens" is NaN. This is the one implementation of the metrics: the population simulator
    (:func:`carnk_pkpd.simulate_population`) calls it.
    """
    from carnk_pkpd.structural.carnk import car_closed_form

    spec = _spec(model)
    theta, n_transit, n_sub = resolve_parameters(params, spec)
    n = 1 if n_sub is None else n_sub
    per = _doses_per_subject(doses, n)
    ld_in = resolve_ld(ld, spec, n)
    t_b = np.arange(0.0, horizon + 0.5 * resolution, resolution)
    ds = simulate(
        {**{k: v for k, v in theta.items()}, "n_transit": np.full(n, n_transit)},
        per,
        t_b,
        spec,
        accuracy,
        ld_in,
    )
    b = np.atleast_2d(ds["bcell"].values)
    t_c = np.arange(car_window[0], car_window[1] + 0.5 * car_resolution, car_resolution)
    dmax = max(len(d) for d in per)
    dt_ = np.zeros((n, max(dmax, 1)))
    da_ = np.zeros((n, max(dmax, 1)))
    for i, d in enumerate(per):
        dt_[i, : len(d)], da_[i, : len(d)] = d[:, 0], d[:, 1]
    car = np.asarray(
        car_closed_form(theta, dt_, da_, np.broadcast_to(t_c, (n, t_c.size)), spec.structure, ld=ld_in)
    )
    out = metrics_from_paths(
        t_b,
        b,
        t_c,
        car,
        reappearance_threshold=reappearance_threshold,
        reconstitution_threshold=reconstitution_threshold,
        aplasia_threshold=aplasia_threshold,
        aplasia_window=aplasia_window,
    )
    res = xr.Dataset({k: ("subject", v, {"units": u}) for k, (v, u) in out.items()})
    res.attrs.update(model=spec.name, car_window=list(car_window), aplasia_window=list(aplasia_window))
    if n_sub is None:
        return res.isel(subject=0, drop=True)
    return res.assign_coords(subject=np.arange(n))
