"""Derived exposure and B-cell events from sampled trajectories (NumPy, vectorised over subjects)."""

from __future__ import annotations

import numpy as np

UNITS = {
    "car_cmax": "cells/µL",
    "car_tmax": "days",
    "car_auc_0_28": "cells/µL·day",
    "b_nadir": "cells/µL",
    "b_nadir_day": "days",
    "reappearance_day": "days",
    "reconstitution_day": "days",
    "DA": "days",
}


def _crossing(t0, t1, b0, b1, thr):
    """Time where B crosses ``thr`` between two samples, interpolating log B linearly."""
    lb0, lb1, lt = np.log(np.maximum(b0, 1e-300)), np.log(np.maximum(b1, 1e-300)), np.log(thr)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(lb1 != lb0, (lt - lb0) / (lb1 - lb0), 0.5)
    return t0 + np.clip(frac, 0.0, 1.0) * (t1 - t0)


def return_day(t: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """First t > 0 with B ≥ threshold after B was below it at some t ≥ 0; NaN if never.

    ``t`` (days, shape (n_t,), starting at or after 0) and ``b`` (cells/µL, shape (S, n_t)).
    Vectorised over subjects.
    """
    b = np.asarray(b, float)
    t = np.asarray(t, float)
    below = b < threshold
    any_below = below.any(axis=1)
    first = np.argmax(below, axis=1)
    after = ~below & (np.arange(b.shape[1])[None, :] > first[:, None])
    back = any_below & after.any(axis=1)
    j = np.where(back, np.argmax(after, axis=1), 1)
    rows = np.arange(b.shape[0])
    if b.shape[1] < 2:
        return np.full(b.shape[0], np.nan)
    tc = _crossing(t[j - 1], t[j], b[rows, j - 1], b[rows, j], threshold)
    return np.where(back, tc, np.nan)


def time_below(t: np.ndarray, b: np.ndarray, threshold: float, window: tuple[float, float]) -> np.ndarray:
    """Days with B < threshold within ``window`` (crossings interpolated log-linearly)."""
    sel = (t >= window[0]) & (t <= window[1])
    t, b = t[sel], b[:, sel]
    below = b < threshold
    dt = np.diff(t)
    both = below[:, :-1] & below[:, 1:]
    total = np.sum(np.where(both, dt, 0.0), axis=1)
    down = below[:, 1:] & ~below[:, :-1]  # crosses below inside the interval
    up = below[:, :-1] & ~below[:, 1:]
    tc = _crossing(t[:-1], t[1:], b[:, :-1], b[:, 1:], threshold)
    total += np.sum(np.where(down, t[1:] - tc, 0.0), axis=1)
    total += np.sum(np.where(up, tc - t[:-1], 0.0), axis=1)
    return total


def metrics_from_paths(
    t_b: np.ndarray,
    b: np.ndarray,
    t_c: np.ndarray,
    car: np.ndarray,
    *,
    reappearance_threshold: float = 1.0,
    reconstitution_threshold: float = 10.0,
    aplasia_threshold: float = 1.0,
    aplasia_window: tuple[float, float] = (0.0, 180.0),
) -> dict[str, tuple[np.ndarray, str]]:
    """All derived metrics from B (``t_b``, ``b`` of shape (S, n)) and CAR-NK (``t_c``, ``car``)."""
    imax = np.argmax(car, axis=1)
    inad = np.argmin(b, axis=1)
    auc = np.trapezoid(car, t_c, axis=1)
    vals = {
        "car_cmax": car[np.arange(car.shape[0]), imax],
        "car_tmax": t_c[imax],
        "car_auc_0_28": auc,
        "b_nadir": b[np.arange(b.shape[0]), inad],
        "b_nadir_day": t_b[inad],
        "reappearance_day": return_day(t_b, b, reappearance_threshold),
        "reconstitution_day": return_day(t_b, b, reconstitution_threshold),
        "DA": time_below(t_b, b, aplasia_threshold, aplasia_window),
    }
    return {k: (v, UNITS[k]) for k, v in vals.items()}
