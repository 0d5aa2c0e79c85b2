"""Conditional weighted residuals (CWRES): NONMEM's FOCE linearisation (Hooker et al. 2007).

Hooker AC, Staatz CE, Karlsson MO (2007) Pharm Res 24:2187, "Conditional weighted residuals (CWRES):
a model diagnostic for the FOCE method". Per subject i, at one set of population values (THETA, OMEGA,
SIGMA: the posterior medians of a fit, or a model file's typical values):

1. ``η̂_i`` is the conditional mode, ``argmax p(y_i | η) p(η | Ω)`` (NONMEM's conditional estimates),
   with every BLQ record entering by its M3 term ``log P(Y < LLOQ)`` as in the fit. All subjects are
   solved at once by L-BFGS (scipy) on the JAX gradient of the same solver the fit uses.
2. ``f_i(η)`` are the predictions of the subject's quantified records on the residual scale (log for
   log-normal DVIDs, natural for the combined error of B cells) and ``G_i = ∂f_i/∂η`` at ``η̂_i``
   (JAX forward mode; η on the log scale of each parameter with between-subject variability,
   estimated or OMEGA FIX).
3. ``E[y_i] ≈ f_i(η̂_i) − G_i η̂_i`` and ``Cov[y_i] ≈ G_i Ω G_iᵀ + R_i``, ``R_i`` the diagonal of
   residual variances at ``η̂_i`` (FOCE with interaction).
4. ``CWRES_i = Cov[y_i]^{-1/2} (y_i − E[y_i])`` with the symmetric inverse square root (as EWRES in
   :mod:`carnk_pkpd.evaluation`), all DVIDs of a subject in one block.

A BLQ record has no CWRES (NaN): its value is an interval, not a number. Under a correct model and
a nearly linear η-dependence CWRES are close to N(0, 1); they are an approximation (the linearisation
is exact only for a model linear in η), which the simulation-based NPDE and EWRES do not need. The
population values are point estimates: posterior uncertainty is not propagated (NONMEM's CWRES uses
the final estimates the same way). Dimensionless.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ConditionalModes", "conditional_weighted_residuals", "linearized_residuals"]

#: The mode search is bounded to ±ETA_BOUND·ω per eta (log scale).
ETA_BOUND = 6.0
#: Largest absolute gradient of −log p(y|η)p(η) accepted at a mode (the objective is O(records)).
GRADIENT_TOL = 1e-2


@dataclass(frozen=True)
class ConditionalModes:
    """The result of :func:`conditional_weighted_residuals`.

    ``cwres`` (record,) in the order of :func:`carnk_pkpd.statistical.observation_data` (NaN for BLQ
    records); ``eta`` (subject, eta) the conditional modes (log scale) of the parameters ``eta_names``;
    ``omega`` their SDs (log scale) used; ``converged``: the largest absolute gradient of the
    objective (−log posterior of η) at the mode, ``max_gradient``, is below ``GRADIENT_TOL`` and no η
    sits at its bound (±``ETA_BOUND``·ω); otherwise a RuntimeWarning says so.
    """

    cwres: np.ndarray
    eta: np.ndarray
    eta_names: tuple[str, ...]
    omega: np.ndarray
    converged: bool
    max_gradient: float


def linearized_residuals(
    y: np.ndarray,
    f_hat: np.ndarray,
    jacobian: np.ndarray,
    eta_hat: np.ndarray,
    omega_var: np.ndarray,
    residual_var: np.ndarray,
) -> np.ndarray:
    """CWRES of one subject from its linearisation around ``eta_hat`` (module docstring, steps 3–4).

    ``y``, ``f_hat`` (n,) observations and predictions at ``eta_hat`` on the residual scale;
    ``jacobian`` (n, k) ``∂f/∂η`` at ``eta_hat``; ``omega_var`` (k,) the diagonal of Ω;
    ``residual_var`` (n,) residual variances. Returns (n,) decorrelated residuals.
    """
    from carnk_pkpd.evaluation import symmetric_inverse_sqrt

    g = np.atleast_2d(np.asarray(jacobian, float))
    expected = np.asarray(f_hat, float) - g @ np.asarray(eta_hat, float)
    cov = (g * np.asarray(omega_var, float)[None, :]) @ g.T + np.diag(np.asarray(residual_var, float))
    return symmetric_inverse_sqrt(cov) @ (np.asarray(y, float) - expected)


def _population_point(source: Any, cohort: Any):
    """Typical log parameters per subject (η = 0; tier and covariates included), Ω SDs and residual
    values at the posterior median (a fit) or the file's values (a model)."""
    from carnk_pkpd.population import SubjectDesign, individual_parameters, population_from

    pop = population_from(source)
    design = SubjectDesign.from_cohort(cohort, pop.spec)
    zero = {name: np.zeros((pop.n_draws, design.n_subjects)) for name in pop.names}
    theta = individual_parameters(pop, design, None, z=zero)
    log_pop = {k: np.median(np.log(v), axis=0) for k, v in theta.items()}
    eta_names = tuple(p for p in pop.names if p in pop.omega and float(np.median(pop.omega[p])) > 0)
    omega = np.array([float(np.median(pop.omega[p])) for p in eta_names])
    residual = {k: float(np.median(v)) for k, v in pop.residual.items()}
    return pop, design, log_pop, eta_names, omega, residual


def conditional_weighted_residuals(
    source: Any,
    cohort: Any | None = None,
    *,
    accuracy: str | None = None,
    eta_start: np.ndarray | None = None,
) -> ConditionalModes:
    """CWRES of every concentration record of ``cohort`` (module docstring).

    ``source`` is a fit (posterior medians; ``cohort`` defaults to the fit's) or a model (spec, name
    or path: its typical values, BSV SDs and residual SDs). ``accuracy``: the solver's (default: the
    fit's own, :func:`carnk_pkpd.evaluation.solver_accuracy`). ``eta_start`` (subject, eta) starts
    the mode search (default: a fit's posterior mean of each subject's eta, else 0). Records in :func:`carnk_pkpd.statistical.observation_data` order.
    """
    import jax
    import jax.numpy as jnp
    from scipy.optimize import minimize
    from scipy.special import log_ndtr

    from carnk_pkpd.evaluation import solver_accuracy
    from carnk_pkpd.statistical import CAR_DVIDS, CAR_FLOOR, solver_grid
    from carnk_pkpd.structural.solve import solve

    if cohort is None:
        if not hasattr(source, "cohort"):
            raise ValueError("conditional_weighted_residuals: a model source needs a cohort")
        cohort = source.cohort
    pop, design, log_pop, eta_names, omega, residual = _population_point(source, cohort)
    spec, data = pop.spec, design.records
    n_subj, n_eta = design.n_subjects, len(eta_names)
    grid = solver_grid(spec, data, accuracy or solver_accuracy(source))
    n_out = grid.times.shape[1]
    flat = jnp.asarray(data.subject_index * n_out + data.time_index)
    is_car = jnp.asarray(np.isin(data.dvid, CAR_DVIDS))

    # per record: conversion factor, log scale?, residual SDs (log / prop / add)
    n_rec = data.dvid.size
    scale = np.ones(n_rec)
    is_log = np.zeros(n_rec, bool)
    sig_log, prop, add = np.zeros(n_rec), np.zeros(n_rec), np.zeros(n_rec)
    for d, obs in spec.observations.items():
        sel = data.dvid == d
        if not sel.any():
            continue
        if obs.conversion is not None:
            scale[sel] = residual[obs.conversion.name]
        if obs.error == "lognormal":
            is_log[sel] = True
            sig_log[sel] = residual[f"sigma_{obs.name}"]
        else:
            prop[sel] = residual[f"sigma_{obs.name}_prop"]
            add[sel] = residual[f"sigma_{obs.name}_add"]
    missing = sorted(set(np.unique(data.dvid).tolist()) - set(spec.observations))
    if missing:
        raise ValueError(
            f"the cohort has DVID {missing} records but the model file declares no observation for them"
        )
    blq = data.blq == 1
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(is_log, np.log(np.where(is_log, data.dv, 1.0)), data.dv)
        limit = np.where(is_log, np.log(np.where(is_log, data.lloq, 1.0)), data.lloq)
    quant = ~blq & np.isfinite(y)
    j_log, j_scale = jnp.asarray(is_log), jnp.asarray(scale)
    j_sig, j_prop, j_add = jnp.asarray(sig_log), jnp.asarray(prop), jnp.asarray(add)
    base = {k: jnp.asarray(v) for k, v in log_pop.items()}
    n_transit = pop.n_transit

    def residual_scale(eta):
        """Predictions (record,) on the residual scale and their residual SDs, at eta (subject, k)."""
        theta = {k: jnp.exp(v) for k, v in base.items()}
        for j, p in enumerate(eta_names):
            theta[p] = jnp.exp(base[p] + eta[:, j])
        car, bcell = solve(theta, grid, n_transit=n_transit, structure=spec.structure, compact=True)
        pred = jnp.where(is_car, car.reshape(-1)[flat], bcell.reshape(-1)[flat]) * j_scale
        f = jnp.where(j_log, jnp.log(pred + CAR_FLOOR), pred)
        # the log branch's sqrt argument is kept away from 0: a where() still differentiates both branches
        sd = jnp.where(j_log, j_sig, jnp.sqrt((j_prop * pred) ** 2 + jnp.where(j_log, 1.0, j_add**2)))
        return f, sd

    # f, the residual SDs and their derivatives by each record's own subject's eta_k (subjects are
    # independent, so one tangent per eta_k serves all subjects): forward mode, one compiled program
    # that serves both the mode search (the gradient is assembled from it) and the linearisation
    tangents = jnp.stack([jnp.zeros((n_subj, n_eta)).at[:, j].set(1.0) for j in range(n_eta)])

    def linearize(e):
        def one(t):
            (f, sd), (df, dsd) = jax.jvp(residual_scale, (e,), (t,))
            return f, sd, df, dsd

        f, sd, df, dsd = jax.vmap(one)(tangents)
        return f[0], sd[0], df.T, dsd.T

    compiled = jax.jit(linearize)

    def evaluate(eta: np.ndarray):
        return (np.asarray(a, float) for a in compiled(jnp.asarray(eta)))

    w_omega = 1.0 / omega**2

    def objective(eta: np.ndarray, f, sd, df, dsd) -> tuple[float, np.ndarray]:
        """−log p(y | η) p(η | Ω) (constants dropped) and its gradient, all subjects at once, from
        the values and derivatives :func:`evaluate` gave at ``eta`` (subject, eta)."""
        value = 0.5 * float(np.sum(eta**2 * w_omega))
        grad_rec = np.zeros((n_rec, n_eta))
        q, c = quant, blq
        z = (y[q] - f[q]) / sd[q]
        value += float(np.sum(np.log(sd[q]) + 0.5 * z**2))
        grad_rec[q] = (dsd[q] / sd[q][:, None]) * (1.0 - z**2)[:, None] - (z / sd[q])[:, None] * df[q]
        if c.any():
            w = (limit[c] - f[c]) / sd[c]
            log_cdf = log_ndtr(w)
            value -= float(np.sum(log_cdf))
            mills = np.exp(-0.5 * w**2 - 0.5 * np.log(2 * np.pi) - log_cdf)  # φ(w)/Φ(w)
            dw = -df[c] / sd[c][:, None] - (w / sd[c])[:, None] * dsd[c]
            grad_rec[c] = -mills[:, None] * dw
        grad = np.zeros((n_subj, n_eta))
        np.add.at(grad, data.subject_index, grad_rec)
        grad += eta * w_omega
        return value, grad.reshape(-1)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        eta = x.reshape(n_subj, n_eta)
        return objective(eta, *evaluate(eta))

    if eta_start is None:
        # a fit's posterior mean of each fitted subject's eta starts the search near the mode
        eta_start = np.zeros((n_subj, n_eta))
        if pop.eta_z and tuple(pop.subjects) == tuple(data.ids):
            for j, p in enumerate(eta_names):
                if p in pop.eta_z:
                    eta_start[:, j] = np.mean(pop.omega[p][:, None] * pop.eta_z[p], axis=0)
    # the search stays within ±ETA_BOUND·ω (beyond it the solver can overflow; a mode there is flagged)
    bound = np.tile(ETA_BOUND * omega, n_subj)
    x0 = np.clip(np.asarray(eta_start, float).reshape(-1), -bound, bound)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        res = minimize(
            fun,
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=list(zip(-bound, bound, strict=True)),
            options={"maxiter": 5000, "gtol": 1e-6, "ftol": 1e-15},
        )
        eta_hat = res.x.reshape(n_subj, n_eta)
        f_hat, sd_hat, jac, dsd_hat = evaluate(eta_hat)
        max_grad = float(np.max(np.abs(objective(eta_hat, f_hat, sd_hat, jac, dsd_hat)[1]), initial=0.0))
    at_bound = np.isclose(np.abs(res.x), bound)
    converged = bool(
        np.isfinite(res.fun) and np.isfinite(max_grad) and max_grad < GRADIENT_TOL and not at_bound.any()
    )
    if not converged:
        warnings.warn(
            f"CWRES: the conditional modes of eta did not converge (max |gradient| {max_grad:.2g}, "
            f"{int(at_bound.sum())} eta at ±{ETA_BOUND:g} omega; L-BFGS: {res.message}); "
            "the CWRES are approximate",
            RuntimeWarning,
            stacklevel=2,
        )

    out = np.full(n_rec, np.nan)
    for s in range(n_subj):
        sel = np.flatnonzero((data.subject_index == s) & quant)
        if sel.size == 0:
            continue
        out[sel] = linearized_residuals(y[sel], f_hat[sel], jac[sel], eta_hat[s], omega**2, sd_hat[sel] ** 2)
    return ConditionalModes(
        cwres=out,
        eta=eta_hat,
        eta_names=eta_names,
        omega=omega,
        converged=converged,
        max_gradient=max_grad,
    )
