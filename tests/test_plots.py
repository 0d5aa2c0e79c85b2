"""The LOWESS smoother of the GOF and ETA plots, against closed forms and weighted least squares."""

from __future__ import annotations

import numpy as np

from carnk_pkpd.plots import lowess


def test_lowess_reproduces_a_straight_line_exactly():
    x = np.linspace(0.0, 10.0, 40)
    np.testing.assert_allclose(lowess(x, 3.0 - 0.5 * x), 3.0 - 0.5 * x, atol=1e-10)


def test_lowess_without_robustness_is_tricube_weighted_least_squares():
    """iterations=0: at each x_i the fitted value is numpy's weighted linear fit on the r nearest
    points with tricube weights (an independent route through np.polyfit)."""
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 5, 30))
    y = np.sin(x) + 0.1 * rng.standard_normal(30)
    got = lowess(x, y, frac=0.4, iterations=0)
    r = int(np.ceil(0.4 * 30))
    for i in (0, 7, 15, 29):
        d = np.abs(x - x[i])
        h = np.sort(d)[r - 1]
        w = (1 - np.clip(d / h, 0, 1) ** 3) ** 3
        keep = w > 0
        coef = np.polyfit(x[keep], y[keep], 1, w=np.sqrt(w[keep]))
        assert abs(np.polyval(coef, x[i]) - got[i]) < 1e-9


def test_lowess_robustness_ignores_an_outlier_and_keeps_nan_in_place():
    x = np.arange(30, dtype=float)
    y = 2.0 * x
    y[12] = 500.0
    x_nan = np.append(x, np.nan)
    out = lowess(x_nan, np.append(y, 1.0))
    assert np.isnan(out[-1])
    clean = np.delete(np.arange(30), 12)
    np.testing.assert_allclose(out[clean], 2.0 * x[clean], atol=1e-6)
    assert abs(out[12] - 24.0) < 1e-6  # the smoother stays on the line at the outlier
    plain = lowess(x, y, iterations=0)
    assert np.abs(plain[clean] - 2.0 * x[clean]).max() > 1.0  # without robustness it is pulled up
