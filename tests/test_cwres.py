"""CWRES (Hooker et al. 2007): the FOCE linearisation, checked against closed forms and against an
independent linearisation by finite differences of the numpy-facing solver."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import norm

from carnk_pkpd.cwres import conditional_weighted_residuals, linearized_residuals


def _reference_whitening(cov: np.ndarray) -> np.ndarray:
    """C^-1/2 by scipy's matrix square root of the inverse (not the eigen-decomposition used in the package)."""
    return np.real(scipy.linalg.sqrtm(np.linalg.inv(cov)))


def test_linear_model_cwres_are_the_exact_whitened_residuals():
    """For a model linear in η, y = a + Gη + ε, the linearisation is exact whatever η̂ is: CWRES is
    Cov[y]^-1/2 (y − a) with Cov[y] = GΩGᵀ + R, so over many subjects they are N(0, I)."""
    rng = np.random.default_rng(11)
    n, k, n_subj = 6, 2, 4000
    a = rng.normal(0.0, 1.0, n)
    g = rng.normal(0.0, 1.0, (n, k))
    omega_var = np.array([0.25, 0.64])
    r_var = np.full(n, 0.09)
    cov = (g * omega_var) @ g.T + np.diag(r_var)
    whiten = _reference_whitening(cov)
    res = np.empty((n_subj, n))
    for i in range(n_subj):
        eta = rng.normal(0.0, np.sqrt(omega_var))
        y = a + g @ eta + rng.normal(0.0, np.sqrt(r_var))
        eta_hat = rng.normal(0.0, 1.0, k)  # any expansion point: the model is linear
        f_hat = a + g @ eta_hat
        res[i] = linearized_residuals(y, f_hat, g, eta_hat, omega_var, r_var)
        if i < 5:
            np.testing.assert_allclose(res[i], whiten @ (y - a), rtol=1e-9, atol=1e-9)
    # N(0, I): mean within 4 standard errors, covariance within 4 SE of the identity (SE ~ 1/sqrt(n))
    assert np.all(np.abs(res.mean(axis=0)) < 4 / np.sqrt(n_subj))
    np.testing.assert_allclose(np.cov(res, rowvar=False), np.eye(n), atol=4 * np.sqrt(2 / n_subj))


@pytest.fixture(scope="module")
def small_cohort():
    from carnk_pkpd.cohortsim import simulate_cohort

    cohort, _ = simulate_cohort("reference", n_subjects=4, seed=3, follow_up=120.0)
    return cohort


def _independent_predictions(spec, data, log_theta: dict[str, np.ndarray]):
    """(car, bcell) at every record, cells/µL, from structural.simulate at tight accuracy."""
    from carnk_pkpd.population import ld_window_from_times
    from carnk_pkpd.structural import simulate

    t_all = np.unique(np.concatenate(data.times))
    paths = simulate(
        {p: np.exp(v) for p, v in log_theta.items()},
        [list(map(tuple, d)) for d in data.doses],
        t_all,
        spec,
        "tight",
        ld_window_from_times(data.ld_times, spec),
    )
    t_rec = np.array([data.times[s][j] for s, j in zip(data.subject_index, data.time_index, strict=True)])
    pos = np.searchsorted(t_all, t_rec)
    car = np.asarray(paths["car"].values)[data.subject_index, pos]
    bcell = np.asarray(paths["bcell"].values)[data.subject_index, pos]
    return car, bcell


def test_cwres_match_an_independent_linearisation(small_cohort):
    """At the model file's values: η̂ is a minimum of −log p(y|η)p(η) written out here with scipy's
    M3 term, and CWRES equal those of a finite-difference Jacobian of structural.simulate (tight
    accuracy) whitened with scipy's matrix square root."""
    from carnk_pkpd.spec import load_model
    from carnk_pkpd.statistical import CAR_FLOOR, observation_data

    spec = load_model("reference")
    data = observation_data(small_cohort)
    r = conditional_weighted_residuals(spec, small_cohort, accuracy="tight")
    assert r.converged and r.max_gradient < 1e-3
    names = list(r.eta_names)
    assert set(names) == {p for p, par in spec.parameters.items() if par.bsv_sd > 0}
    np.testing.assert_allclose(r.omega, [spec.parameters[p].bsv_sd for p in names])

    car_sig = spec.observations[1].residual["log"].typical
    prop = spec.observations[2].residual["prop"].typical
    add = spec.observations[2].residual["add"].typical
    is_car = data.dvid == 1
    blq = data.blq == 1
    y = np.where(is_car, np.log(np.where(is_car, data.dv, 1.0)), data.dv)

    def scale_and_sd(eta: np.ndarray):
        log_theta = {p: np.full(data.n_subjects, np.log(spec.parameters[p].typical)) for p in names}
        for j, p in enumerate(names):
            log_theta[p] = log_theta[p] + eta[:, j]
        car, bcell = _independent_predictions(spec, data, log_theta)
        f = np.where(is_car, np.log(car + CAR_FLOOR), bcell)
        sd = np.where(is_car, car_sig, np.sqrt((prop * bcell) ** 2 + add**2))
        return f, sd

    def neg_log_post(eta: np.ndarray) -> float:
        f, sd = scale_and_sd(eta)
        lim = np.where(is_car, np.log(data.lloq), data.lloq)
        ll = np.where(blq, norm.logcdf(lim, f, sd), norm.logpdf(y, f, sd))
        return -float(ll.sum()) + 0.5 * float(np.sum((eta / r.omega) ** 2))

    # η̂ is a local minimum: no coordinate step of 0.02 lowers the objective (solver agreement ~1e-6)
    base = neg_log_post(r.eta)
    for s in range(data.n_subjects):
        for j in range(len(names)):
            for step in (-0.02, 0.02):
                e = r.eta.copy()
                e[s, j] += step
                assert neg_log_post(e) > base - 1e-4, (s, names[j], step)

    # independent linearisation: central differences, E = f − Gη̂, C = GΩGᵀ + R, scipy's C^-1/2
    f_hat, sd_hat = scale_and_sd(r.eta)
    h = 1e-5
    jac = np.zeros((data.dv.size, len(names)))
    for j in range(len(names)):
        e_hi, e_lo = r.eta.copy(), r.eta.copy()
        e_hi[:, j] += h
        e_lo[:, j] -= h
        jac[:, j] = (scale_and_sd(e_hi)[0] - scale_and_sd(e_lo)[0]) / (2 * h)
    expected = np.full(data.dv.size, np.nan)
    for s in range(data.n_subjects):
        sel = np.flatnonzero((data.subject_index == s) & ~blq)
        g = jac[sel]
        cov = (g * r.omega**2) @ g.T + np.diag(sd_hat[sel] ** 2)
        expected[sel] = _reference_whitening(cov) @ (y[sel] - (f_hat[sel] - g @ r.eta[s]))
    assert np.isnan(r.cwres[blq]).all()
    np.testing.assert_allclose(r.cwres[~blq], expected[~blq], rtol=1e-3, atol=1e-3)
