"""The hierarchical PyMC model, declared by the model file: a pure function of (spec, cohort).

Per structural parameter ``p`` (natural units as in ``models/*.toml``):

* fixed parameters take the file's typical value;
* free parameters get the file's prior on the typical value, non-centred on the log scale
  (``log p = mu + sigma·z``); the typical value itself is the deterministic ``p``;
* ``dose_level_tier = true`` adds a dose-level tier: ``log p_DL = log p + omega_DL_p·z_DL``, so a dose
  level with one patient borrows from the others (partial pooling);
* covariate effects from the file's ``[[covariates]]`` (power on dose or a continuous covariate
  normalised to its cohort median, linear, or categorical factors);
* between-subject variability where ``bsv.sd > 0``: ``log p_i = log p_DL + covariates +
  omega_p·eta_i`` with ``eta_i ~ N(0, 1)`` (non-centred); where ``bsv.estimate = true``,
  ``omega_p`` has the file's ``bsv.prior`` (LogNormal, non-centred like the typical values, or
  HalfNormal; default ``HalfNormal(bsv.sd)``); where it is false ``omega_p = bsv.sd`` (OMEGA FIX, as
  in NONMEM: the η stay in the model, only ω is not estimated). ``sd = 0`` or no ``bsv``: no BSV.
* each subject's lymphodepletion window from its EVID=2 rows (first to last day, full intensity; no
  EVID=2 row: no LD), with the surge and rejection onset the file's ``[lymphodepletion]`` declares.

The prediction of a record is chosen by its DVID (1 and 3: CAR-NK, DVID 3 times the copies-per-cell
factor; 2: B cells), and its residual error by the file's error model for that DVID (log-normal or
combined proportional + additive). Records with BLQ = 1 contribute log P(Y < LLOQ) (Beal's M3,
left-censoring at the LLOQ); they are never dropped or imputed. Clinical records (DVID 10–12) belong
to the remission model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pymc as pm
import pytensor.tensor as pt

from carnk_pkpd.spec import ModelSpec

PK_DVIDS = (1, 2, 3)
CAR_DVIDS = (1, 3)  # records predicted by CAR-NK (flow cells/µL; qPCR copies/µg via copies_per_cell)
B_DVIDS = (2,)  # records predicted by B cells
CAR_FLOOR = 1e-9  # cells/µL added to a prediction before taking logs (N is exactly 0 pre-dose)


@dataclass(frozen=True)
class ObservationData:
    """Concentration records of a cohort, arranged for the solver.

    ``times[s]`` are subject ``s``'s distinct sample times (days); each record points at
    ``(subject_index, time_index)``; ``lower`` is the LLOQ for BLQ records and −inf otherwise
    (BLQ records are left-censored: they say Y < LLOQ).
    """

    ids: list[str]
    dose_levels: list[str]
    doses: list[np.ndarray]
    times: list[np.ndarray]
    subject_index: np.ndarray
    time_index: np.ndarray
    dvid: np.ndarray
    dv: np.ndarray
    blq: np.ndarray
    lloq: np.ndarray
    covariates: dict[str, np.ndarray] = field(default_factory=dict)
    ld_times: list[np.ndarray] = field(default_factory=list)

    @property
    def n_subjects(self) -> int:
        return len(self.ids)

    @property
    def lower(self) -> np.ndarray:
        return np.where(self.blq == 1, self.lloq, -np.inf)


def observation_data(cohort: Any, dvids: tuple[int, ...] = PK_DVIDS) -> ObservationData:
    """Collect the concentration records (DVID 1–3) of a :class:`~carnk_pkpd.data.Cohort`."""
    ids, dls, doses, times, ld_times = [], [], [], [], []
    rec = {k: [] for k in ("subject_index", "time_index", "dvid", "dv", "blq", "lloq")}
    cov_names = sorted({k for s in cohort.subjects for k in s.covariates})
    covs = {k: [] for k in cov_names}
    for si, subj in enumerate(cohort.subjects):
        obs = subj.observations
        obs = obs[obs["DVID"].isin(dvids)]
        t = np.unique(obs["TIME"].to_numpy(float))
        ids.append(str(subj.id))
        dls.append(str(subj.dl))
        doses.append(np.asarray(subj.doses, float).reshape(-1, 2))
        ld_times.append(np.asarray(subj.ld_times, float))
        times.append(t)
        rec["subject_index"].append(np.full(len(obs), si))
        rec["time_index"].append(np.searchsorted(t, obs["TIME"].to_numpy(float)))
        rec["dvid"].append(obs["DVID"].to_numpy(int))
        blq = obs["BLQ"].fillna(0).to_numpy(int)
        lloq = obs["LLOQ"].to_numpy(float)
        dv = obs["DV"].to_numpy(float)
        dv = np.where((blq == 1) & ~np.isfinite(dv), lloq, dv)
        rec["dv"].append(dv)
        rec["blq"].append(blq)
        rec["lloq"].append(lloq)
        for k in cov_names:
            covs[k].append(float(subj.covariates.get(k, np.nan)))
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rec.items()}
    return ObservationData(
        ids=ids,
        dose_levels=dls,
        doses=doses,
        times=times,
        subject_index=cat["subject_index"].astype(int),
        time_index=cat["time_index"].astype(int),
        dvid=cat["dvid"].astype(int),
        dv=cat["dv"].astype(float),
        blq=cat["blq"].astype(int),
        lloq=cat["lloq"].astype(float),
        covariates={k: np.asarray(v, float) for k, v in covs.items()},
        ld_times=ld_times,
    )


def _typical_rv(name: str, prior: dict[str, Any]):
    """The typical value of a free parameter and its log, from the file's prior."""
    dist = prior["dist"]
    if dist == "LogNormal":
        z = pm.Normal(f"z_{name}", 0.0, 1.0)
        log_p = prior["mu"] + prior["sigma"] * z
        return pm.Deterministic(name, pt.exp(log_p)), log_p
    if dist == "Normal":
        p = pm.TruncatedNormal(name, mu=prior["mu"], sigma=prior["sigma"], lower=0.0)
    elif dist == "HalfNormal":
        p = pm.HalfNormal(name, sigma=prior["sigma"])
    elif dist == "Beta":
        p = pm.Beta(name, alpha=prior["alpha"], beta=prior["beta"])
    else:  # pragma: no cover - spec.py rejects other distributions
        raise ValueError(f"prior distribution {dist!r} is not supported for {name}")
    return p, pt.log(p)


def _positive_rv(name: str, prior: dict[str, Any]):
    """A positive scalar ``name`` with the file's prior: LogNormal non-centred (``name = exp(mu +
    sigma·z_name)``, like the typical values), HalfNormal, or Normal truncated at 0. Serves the
    estimated BSV SDs (``omega_<p>``), residual SDs and conversion factors."""
    if prior["dist"] == "HalfNormal":
        return pm.HalfNormal(name, sigma=prior["sigma"])
    if prior["dist"] == "LogNormal":
        z = pm.Normal(f"z_{name}", 0.0, 1.0)
        return pm.Deterministic(name, pt.exp(prior["mu"] + prior["sigma"] * z))
    if prior["dist"] == "Normal":
        return pm.TruncatedNormal(name, mu=prior["mu"], sigma=prior["sigma"], lower=0.0)
    raise ValueError(f"prior distribution {prior['dist']!r} is not supported for {name}")  # pragma: no cover


def _scalar_rv(name: str, scalar: Any):
    """A residual SD or conversion factor: estimated with its prior, or fixed at its typical value."""
    if not scalar.estimate or scalar.prior is None:
        return pt.as_tensor_variable(float(scalar.typical))
    prior = scalar.prior
    if prior["dist"] == "LogNormal" and "mu" not in prior:
        prior = {**prior, "mu": float(np.log(scalar.typical))}
    return _positive_rv(name, prior)


def _covariate_terms(spec: ModelSpec, data: ObservationData, name: str):
    """Sum of covariate effects on log p_i for parameter ``name`` (a tensor of shape (subject,)).

    Covariate values and reference values come from :mod:`carnk_pkpd.population` (the same rules serve
    simulation: a continuous covariate is centred on the fitted cohort's median or mean, or the file's
    number; ``DOSE`` is each subject's dose per infusion)."""
    from carnk_pkpd.population import categorical_levels, covariate_center, covariate_values

    total = pt.zeros(data.n_subjects)
    for cov in spec.covariates:
        if cov.parameter != name:
            continue
        x = covariate_values(cov, data.doses, data.covariates)
        label = f"beta_{name}_{cov.covariate.upper()}"
        pr = cov.prior or {"dist": "Normal", "mu": 0.0, "sigma": 1.0}
        if cov.form == "categorical":
            _, others = categorical_levels(cov, x)
            if not others:
                continue
            beta = pm.Normal(label, pr.get("mu", 0.0), pr.get("sigma", 1.0), shape=len(others))
            for j, lv in enumerate(others):
                total = total + beta[j] * (x == lv).astype(float)
            continue
        center = covariate_center(cov, x)
        beta = pm.Normal(label, pr.get("mu", 0.0), pr.get("sigma", 1.0))
        if cov.form == "power":
            total = total + beta * np.log(x / center)
        else:  # linear
            total = total + pt.log(pt.maximum(1.0 + beta * (x - center), 1e-6))
    return total


def ld_window(data: ObservationData, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Per-subject lymphodepletion inputs of the solver: each subject's EVID=2 days (first to last,
    full intensity); a subject without EVID=2 rows had no LD (intensity 0)."""
    from carnk_pkpd.population import ld_window_from_times

    return ld_window_from_times(data.ld_times, spec)


def solver_grid(spec: ModelSpec, data: ObservationData, accuracy: str = "default") -> Any:
    """The solver grid of a fit of ``data``: each subject's doses, sample times and LD window, sized
    for the fastest plausible transit and kill rates (1/day) so that one grid serves every draw.
    The likelihood (:func:`build_model`) and CWRES (:mod:`carnk_pkpd.cwres`) solve on it."""
    from carnk_pkpd.population import solver_rate_bounds
    from carnk_pkpd.structural.solve import make_grid

    k_tr_max, k_kill_max = solver_rate_bounds(spec)
    return make_grid(
        data.doses,
        data.times,
        accuracy,
        k_tr=k_tr_max,
        k_kill=k_kill_max,
        bucket=1,
        ld=ld_window(data, spec),
    )


def build_model(spec: ModelSpec, data: ObservationData, *, accuracy: str = "default") -> pm.Model:
    """The PyMC model of ``spec`` for the records in ``data`` (see the module docstring)."""
    from pytensor.link.jax.ops import wrap_jax

    from carnk_pkpd.structural.solve import solve

    n_transit = int(round(spec.parameters["n_transit"].typical))
    grid = solver_grid(spec, data, accuracy)
    n_out = grid.times.shape[1]
    flat = data.subject_index * n_out + data.time_index
    names = [p for p in spec.parameters if p != "n_transit"]

    @wrap_jax
    def predict(theta):
        car, bcell = solve(theta, grid, n_transit=n_transit, structure=spec.structure, compact=True)
        return car.reshape(-1)[flat], bcell.reshape(-1)[flat]

    dl_labels = sorted(set(data.dose_levels), key=_natural)
    dl_index = np.array([dl_labels.index(d) for d in data.dose_levels])
    coords = {"subject": data.ids, "dose_level": dl_labels, "obs": np.arange(len(data.dv))}
    with pm.Model(coords=coords) as model:
        pm.Data("dl_index", dl_index, dims="subject")
        theta = {}
        for name in names:
            par = spec.parameters[name]
            if par.fixed and par.bsv_sd <= 0:
                theta[name] = pt.as_tensor_variable(np.full(data.n_subjects, float(par.typical)))
                continue
            if par.fixed:
                log_p = pt.as_tensor_variable(np.log(float(par.typical)))
            else:
                _, log_p = _typical_rv(name, par.prior)
            log_i = pt.zeros(data.n_subjects) + log_p
            if not par.fixed and par.dose_level_tier and len(dl_labels) > 1:
                om_dl = pm.HalfNormal(f"omega_DL_{name}", sigma=0.3)
                z_dl = pm.Normal(f"z_DL_{name}", 0.0, 1.0, dims="dose_level")
                log_p_dl = log_p + om_dl * z_dl
                pm.Deterministic(f"{name}_DL", pt.exp(log_p_dl), dims="dose_level")
                log_i = log_p_dl[dl_index]
            has_cov = any(c.parameter == name for c in spec.covariates)
            log_i = log_i + _covariate_terms(spec, data, name)
            if par.bsv_sd > 0:
                # estimated omega, or OMEGA FIX at the file's sd: the eta stay in the model either way
                if par.bsv_estimate:
                    omega = _positive_rv(f"omega_{name}", par.bsv_prior)
                else:
                    omega = pt.as_tensor_variable(float(par.bsv_sd))
                eta = pm.Normal(f"eta_{name}", 0.0, 1.0, dims="subject")
                log_i = log_i + omega * eta
            if par.bsv_sd > 0 or has_cov:
                theta[name] = pm.Deterministic(f"{name}_i", pt.exp(log_i), dims="subject")
            else:
                theta[name] = pt.exp(log_i)
        car_pred, b_pred = predict(theta)
        _likelihood(spec, data, car_pred, b_pred)
    model._carnk_grid = grid  # noqa: SLF001 - kept for predictions built on the same cohort
    return model


def normal_lcdf(z):
    """log Φ(z), accurate in both tails and with finite gradients everywhere (no NaN from the
    branch that is not taken: each branch only ever sees arguments of its own range)."""
    lo = z < -1.0
    z_lo = pt.switch(lo, z, -1.0)
    z_hi = pt.switch(lo, -1.0, z)
    left = pt.log(pt.erfcx(-z_lo / np.sqrt(2.0)) / 2.0) - z_lo**2 / 2.0
    right = pt.log1p(-pt.erfc(z_hi / np.sqrt(2.0)) / 2.0)
    return pt.switch(lo, left, right)


def _likelihood(spec: ModelSpec, data: ObservationData, car_pred, b_pred) -> None:
    """Log-likelihood terms per DVID: densities of quantified records and, for BLQ records,
    log P(Y < LLOQ) (M3). The prediction follows the DVID (CAR-NK for 1 and 3, B cells for 2), the
    density the file's error model. Written out rather than through ``pm.Censored`` so that the whole
    density differentiates cleanly in JAX; each term is a named potential ``ll_<observation>_obs|_blq``."""
    for dvid in sorted(set(data.dvid.tolist())):
        if dvid not in spec.observations:
            raise ValueError(
                f"the cohort has DVID {dvid} records but the model file declares no observation for it"
            )
        obs_spec = spec.observations[dvid]
        label = obs_spec.name
        sel = np.flatnonzero(data.dvid == dvid)
        blq = data.blq[sel] == 1
        quant, cens = sel[~blq], sel[blq]
        pred = car_pred if dvid in CAR_DVIDS else b_pred
        scale = 1.0
        if obs_spec.conversion is not None:
            scale = _scalar_rv(obs_spec.conversion.name, obs_spec.conversion)
        m_q, m_c = pred[quant] * scale, pred[cens] * scale
        y = data.dv[quant]
        if obs_spec.error == "lognormal":
            sigma = _scalar_rv(f"sigma_{label}", obs_spec.residual["log"])
            if np.any(y <= 0):
                raise ValueError(
                    f"DVID {dvid} has quantified values <= 0; a log-normal error needs them > 0 or BLQ"
                )
            mu_q, mu_c = pt.log(m_q + CAR_FLOOR), pt.log(m_c + CAR_FLOOR)
            ll_q = (
                -np.log(y) - pt.log(sigma) - 0.5 * np.log(2 * np.pi) - 0.5 * ((np.log(y) - mu_q) / sigma) ** 2
            )
            ll_c = normal_lcdf((np.log(data.lloq[cens]) - mu_c) / sigma)
        else:
            prop = _scalar_rv(f"sigma_{label}_prop", obs_spec.residual["prop"])
            add = _scalar_rv(f"sigma_{label}_add", obs_spec.residual["add"])
            sd_q = pt.sqrt((prop * m_q) ** 2 + add**2)
            sd_c = pt.sqrt((prop * m_c) ** 2 + add**2)
            ll_q = -pt.log(sd_q) - 0.5 * np.log(2 * np.pi) - 0.5 * ((y - m_q) / sd_q) ** 2
            ll_c = normal_lcdf((data.lloq[cens] - m_c) / sd_c)
        pm.Potential(f"ll_{label}_obs", ll_q)
        pm.Potential(f"ll_{label}_blq", ll_c)


def _natural(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)
