"""The population layer: the one place where the population model becomes individual subjects.

A population model (a :class:`~carnk_pkpd.fits.Fit`'s posterior, or a model file) is turned into
per-draw population values (:class:`PopulationDraws`: typical values, dose-level values, covariate
coefficients, Ω and Σ). A design (:class:`SubjectDesign`: each subject's infusions, dose level,
covariates and lymphodepletion window, and for an observed cohort its records) says who is simulated.
:func:`individual_parameters` combines the two, the only place where between-subject deviations η are
drawn::

    log p_i = log θ_p[DL_i] + Σ covariate effects(x_i) + ω_p·z_i,p        z ~ N(0, 1)

* ``θ_p[DL]`` is the dose level's typical value where the file sets ``dose_level_tier`` and the
  subject's dose level was fitted; a new dose level draws its value from the tier
  (``log θ_p + ω_DL,p·z_DL``), one per posterior draw;
* covariate effects as declared in ``[[covariates]]`` (power, linear, categorical); a ``DOSE``
  covariate is the subject's dose per infusion (10⁹ cells), so it follows the regimen;
* ``ω_p`` is the posterior's ``omega_p`` where the BSV is estimated, the file's ``bsv.sd`` where it
  is fixed (``estimate = false``, OMEGA FIX); parameters with ``sd = 0`` or no ``bsv`` have none;
* ``z`` is the fitted subjects' own ``eta_p`` (``new_subjects=False``: IPRED) or fresh draws
  (``new_subjects=True``: new patients). Fresh draws come from the caller's generator in a fixed
  order (every parameter, whether it has BSV or not), so the same generator state gives the same
  virtual patients under every regimen (common random numbers).

:func:`simulate_population` is the public entry point built on these pieces.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "CovariateEffect",
    "PopulationDraws",
    "SubjectDesign",
    "covariate_center",
    "covariate_values",
    "individual_parameters",
    "solver_rate_bounds",
]


# --- covariates ----------------------------------------------------------------------------------------
def covariate_values(
    cov: Any, doses: Sequence[np.ndarray], covariates: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Values of the covariate of effect ``cov`` (a :class:`~carnk_pkpd.spec.CovariateSpec`) per subject.

    ``DOSE`` is the dose per infusion (10⁹ cells, the first infusion's amount); other names are looked
    up (upper case) in ``covariates``. Raises ``ValueError`` naming the covariate when it is absent or
    missing for some subjects.
    """
    name = cov.covariate.upper()
    if name == "DOSE":
        x = np.array([float(np.asarray(d).reshape(-1, 2)[0, 1]) if len(d) else np.nan for d in doses])
    elif name in covariates:
        x = np.asarray(covariates[name], float)
    else:
        raise ValueError(
            f"covariate {cov.covariate!r} (model file, effect on {cov.parameter}) is not in the design"
        )
    if np.any(~np.isfinite(x)):
        raise ValueError(f"covariate {cov.covariate!r} is missing for some subjects; impute or drop it")
    return x


def covariate_center(cov: Any, x_reference: np.ndarray) -> float | None:
    """The reference value of a continuous covariate effect: the file's number, or the median / mean
    of ``x_reference`` (the fitted cohort's values); None for categorical effects."""
    if cov.form == "categorical":
        return None
    if cov.center in (None, "median"):
        return float(np.median(x_reference))
    if cov.center == "mean":
        return float(np.mean(x_reference))
    return float(cov.center)


def categorical_levels(cov: Any, x_reference: np.ndarray) -> tuple[float, tuple[float, ...]]:
    """Reference level and the other levels (sorted) of a categorical effect, from the fitted cohort."""
    levels = sorted(set(np.asarray(x_reference, float).tolist()))
    ref = float(cov.reference) if cov.reference is not None else levels[0]
    return ref, tuple(lv for lv in levels if lv != ref)


@dataclass(frozen=True)
class CovariateEffect:
    """One covariate effect with its coefficient per draw.

    ``power``: log θ += β·log(x/center); ``linear``: log θ += log(max(1 + β·(x − center), 1e-6));
    ``categorical``: log θ += β_level (0 at the reference level; ``levels`` lists the others, matching
    ``beta``'s last axis). ``beta`` has shape ``(draw,)`` or ``(draw, n_levels)``.
    """

    parameter: str
    covariate: str
    form: str
    center: float | None
    levels: tuple[float, ...]
    beta: np.ndarray

    @property
    def label(self) -> str:
        return f"beta_{self.parameter}_{self.covariate.upper()}"

    def log_effect(self, x: np.ndarray) -> np.ndarray:
        """Additive effect on log θ, shape ``(draw, subject)``, for covariate values ``x`` (subject,)."""
        x = np.asarray(x, float)[None, :]
        if self.form == "categorical":
            b = np.asarray(self.beta, float).reshape(self.beta.shape[0], -1)
            out = np.zeros((b.shape[0], x.shape[1]))
            for j, lv in enumerate(self.levels):
                out = out + b[:, j : j + 1] * (x == lv)
            return out
        beta = np.asarray(self.beta, float)[:, None]
        if self.form == "power":
            return beta * np.log(x / self.center)
        return np.log(np.maximum(1.0 + beta * (x - self.center), 1e-6))

    def take(self, idx: np.ndarray) -> CovariateEffect:
        return replace(self, beta=np.asarray(self.beta)[idx])


# --- population values per draw ------------------------------------------------------------------------
@dataclass(frozen=True)
class PopulationDraws:
    """Population values per posterior draw, natural units (arrays' first axis is ``draw``).

    ``typical[p]`` (draw,) every structural parameter but ``n_transit`` (fixed ones at the file's
    value); ``typical_dl[p]`` (draw, dose level) for tiered parameters, columns ``dose_levels``;
    ``omega_dl[p]`` (draw,) the tier's SD (log scale); ``omega[p]`` (draw,) the BSV SD (log scale) of
    every parameter with BSV, estimated or fixed; ``covariates`` the effects with their β per draw;
    ``residual[name]`` (draw,) residual SDs and the qPCR factor under their model names
    (``sigma_car_flow``, ``sigma_bcell_flow_prop``, ``sigma_bcell_flow_add``, ``copies_per_cell``,
    ...); ``eta_z[p]`` (draw, fitted subject) the fitted subjects' standardised deviations
    (η = ω·z), subjects ``subjects``; ``draw`` the draws' positions in the source (chain-major).
    """

    spec: Any
    draw: np.ndarray
    typical: dict[str, np.ndarray]
    omega: dict[str, np.ndarray]
    typical_dl: dict[str, np.ndarray] = field(default_factory=dict)
    omega_dl: dict[str, np.ndarray] = field(default_factory=dict)
    dose_levels: tuple[str, ...] = ()
    covariates: tuple[CovariateEffect, ...] = ()
    residual: dict[str, np.ndarray] = field(default_factory=dict)
    eta_z: dict[str, np.ndarray] = field(default_factory=dict)
    subjects: tuple[str, ...] = ()
    synthetic: bool = True
    source: str = "model"

    @property
    def n_draws(self) -> int:
        return int(self.draw.size)

    @property
    def n_transit(self) -> int:
        return int(round(self.spec.parameters["n_transit"].typical))

    @property
    def names(self) -> list[str]:
        """Structural parameters in the file's order, without ``n_transit``."""
        return [p for p in self.spec.parameters if p != "n_transit"]

    def take(self, idx: Sequence[int] | np.ndarray) -> PopulationDraws:
        """The draws at positions ``idx`` (0-based within this object)."""
        idx = np.asarray(idx, int)

        def sub(d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: np.asarray(v)[idx] for k, v in d.items()}

        return replace(
            self,
            draw=self.draw[idx],
            typical=sub(self.typical),
            omega=sub(self.omega),
            typical_dl=sub(self.typical_dl),
            omega_dl=sub(self.omega_dl),
            covariates=tuple(c.take(idx) for c in self.covariates),
            residual=sub(self.residual),
            eta_z=sub(self.eta_z),
        )

    # -- constructors ------------------------------------------------------------------------------------
    @classmethod
    def from_fit(
        cls, fit: Any, n_draws: int | None = None, seed: int | np.random.Generator = 0
    ) -> PopulationDraws:
        """The posterior of ``fit``: all draws (chain-major) or ``n_draws`` of them chosen without
        replacement with ``seed`` (sorted)."""
        from carnk_pkpd.statistical import observation_data

        post = fit.posterior.stack(sample=("chain", "draw")).transpose("sample", ...)
        total = post.sizes["sample"]
        if n_draws is not None and n_draws < 1:
            raise ValueError(f"n_draws must be >= 1 (found {n_draws})")
        if n_draws is None or n_draws >= total:
            take = np.arange(total)
        else:
            take = np.sort(np.random.default_rng(seed).choice(total, size=n_draws, replace=False))
        post = post.isel(sample=take)
        spec = fit.spec
        n = take.size
        typ, om, typ_dl, om_dl, eta = {}, {}, {}, {}, {}
        dl_labels: tuple[str, ...] = ()
        for name, par in spec.parameters.items():
            if name == "n_transit":
                continue
            typ[name] = (
                np.asarray(post[name].values, float) if name in post else np.full(n, float(par.typical))
            )
            if f"omega_{name}" in post:
                om[name] = np.asarray(post[f"omega_{name}"].values, float)
            elif par.bsv_sd > 0:
                om[name] = np.full(n, float(par.bsv_sd))
            if f"eta_{name}" in post:
                eta[name] = np.asarray(post[f"eta_{name}"].transpose("sample", "subject").values, float)
            if f"{name}_DL" in post:
                da = post[f"{name}_DL"].transpose("sample", "dose_level")
                typ_dl[name] = np.asarray(da.values, float)
                dl_labels = tuple(str(v) for v in da["dose_level"].values)
                om_dl[name] = np.asarray(post[f"omega_DL_{name}"].values, float)
        data = observation_data(fit.cohort)
        covs = []
        for cov in spec.covariates:
            x_ref = covariate_values(cov, data.doses, data.covariates)
            label = f"beta_{cov.parameter}_{cov.covariate.upper()}"
            if cov.form == "categorical":
                _, others = categorical_levels(cov, x_ref)
                if not others:
                    continue
                beta = np.asarray(post[label].values, float).reshape(n, -1)
                covs.append(
                    CovariateEffect(cov.parameter, cov.covariate.upper(), cov.form, None, others, beta)
                )
            else:
                center = covariate_center(cov, x_ref)
                beta = np.asarray(post[label].values, float).reshape(n)
                covs.append(CovariateEffect(cov.parameter, cov.covariate.upper(), cov.form, center, (), beta))
        subjects = (
            tuple(str(s) for s in post["subject"].values) if "subject" in post.coords else tuple(data.ids)
        )
        return cls(
            spec=spec,
            draw=take,
            typical=typ,
            omega=om,
            typical_dl=typ_dl,
            omega_dl=om_dl,
            dose_levels=dl_labels,
            covariates=tuple(covs),
            residual=_residuals(spec, post, n),
            eta_z=eta,
            subjects=subjects,
            synthetic=bool(getattr(fit, "synthetic", False)),
            source="fit",
        )

    @classmethod
    def from_model(
        cls,
        spec: Any,
        n_draws: int = 1,
        seed: int | np.random.Generator = 0,
        uncertainty: str = "typical",
        reference_design: SubjectDesign | None = None,
    ) -> PopulationDraws:
        """Population values from a model file.

        ``uncertainty="typical"``: every draw holds the file's typical values, BSV SDs (``bsv.sd``,
        estimated or not), residual SDs and β at their prior mean (0 by default). ``"prior"``: typical
        values, β and estimated residual SDs / conversion factor drawn from their priors (LogNormal,
        Normal truncated at 0, HalfNormal, Beta); ω stays at ``bsv.sd``. Covariate centres given as
        ``"median"``/``"mean"`` are taken over ``reference_design`` (default: the file's dose levels
        with their ``n_subjects``, which serves ``DOSE``).
        """
        if uncertainty not in ("typical", "prior"):
            raise ValueError(f"uncertainty must be 'typical' or 'prior' (found {uncertainty!r})")
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1 (found {n_draws})")
        rng = np.random.default_rng(seed)
        prior = uncertainty == "prior"
        typ, om = {}, {}
        for name, par in spec.parameters.items():
            if name == "n_transit":
                continue
            if prior and not par.fixed:
                typ[name] = _draw_prior(rng, par.prior, float(par.typical), n_draws)
            else:
                typ[name] = np.full(n_draws, float(par.typical))
            if par.bsv_sd > 0:
                om[name] = np.full(n_draws, float(par.bsv_sd))
        residual = {}
        for obs in spec.observations.values():
            comps = {
                "log": f"sigma_{obs.name}",
                "prop": f"sigma_{obs.name}_prop",
                "add": f"sigma_{obs.name}_add",
            }
            for comp, sc in obs.residual.items():
                residual[comps[comp]] = _scalar_draws(rng, sc, n_draws, prior)
            if obs.conversion is not None:
                residual[obs.conversion.name] = _scalar_draws(rng, obs.conversion, n_draws, prior)
        ref = reference_design if reference_design is not None else SubjectDesign.from_dose_levels(spec)
        covs = []
        for cov in spec.covariates:
            pr = cov.prior or {"dist": "Normal", "mu": 0.0, "sigma": 1.0}
            mu, sd = float(pr.get("mu", 0.0)), float(pr.get("sigma", 1.0))
            if cov.form == "categorical":
                x_ref = covariate_values(cov, ref.doses, ref.covariates)
                _, others = categorical_levels(cov, x_ref)
                shape: tuple[int, ...] = (n_draws, len(others))
                center = None
            else:
                others = ()
                shape = (n_draws,)
                if isinstance(cov.center, (int, float)) and not isinstance(cov.center, bool):
                    center = float(cov.center)
                else:
                    center = covariate_center(cov, covariate_values(cov, ref.doses, ref.covariates))
            beta = rng.normal(mu, sd, shape) if prior else np.full(shape, mu)
            covs.append(CovariateEffect(cov.parameter, cov.covariate.upper(), cov.form, center, others, beta))
        return cls(
            spec=spec,
            draw=np.arange(n_draws),
            typical=typ,
            omega=om,
            covariates=tuple(covs),
            residual=residual,
            synthetic=True,
            source=f"model file ({'draws from the priors' if prior else 'typical values'})",
        )


def _draw_prior(rng: np.random.Generator, pr: Mapping[str, Any] | None, typical: float, n: int) -> np.ndarray:
    pr = pr or {}
    dist = pr.get("dist")
    if dist == "LogNormal":
        return np.exp(rng.normal(pr.get("mu", np.log(typical)), pr["sigma"], n))
    if dist == "Normal":
        x = rng.normal(pr.get("mu", typical), pr["sigma"], 4 * n + 16)
        x = x[x > 0]
        return x[:n] if x.size >= n else np.full(n, typical)
    if dist == "HalfNormal":
        return np.abs(rng.normal(0.0, pr["sigma"], n))
    if dist == "Beta":
        return rng.beta(pr["alpha"], pr["beta"], n)
    return np.full(n, typical)


def _scalar_draws(rng: np.random.Generator, sc: Any, n: int, prior: bool) -> np.ndarray:
    if prior and sc.estimate and sc.prior is not None:
        return _draw_prior(rng, sc.prior, float(sc.typical), n)
    return np.full(n, float(sc.typical))


def _residuals(spec: Any, post: Any, n: int) -> dict[str, np.ndarray]:
    """Residual SDs and conversion factors per draw: posterior values or the file's fixed values."""
    out = {}
    for obs in spec.observations.values():
        comps = {"log": f"sigma_{obs.name}", "prop": f"sigma_{obs.name}_prop", "add": f"sigma_{obs.name}_add"}
        scalars = [(comps[c], sc) for c, sc in obs.residual.items()]
        if obs.conversion is not None:
            scalars.append((obs.conversion.name, obs.conversion))
        for name, sc in scalars:
            out[name] = (
                np.asarray(post[name].values, float) if name in post else np.full(n, float(sc.typical))
            )
    return out


# --- who is simulated ----------------------------------------------------------------------------------
def ld_window_from_times(ld_times: Sequence[Sequence[float]], spec: Any) -> dict[str, np.ndarray]:
    """Per-subject LD inputs of the solver from each subject's EVID=2 days: LD from the first to the
    last of them at full intensity; a subject without EVID=2 rows had no LD (intensity 0, its window
    placed on the file's ``simulation.ld_days`` only as a time origin)."""
    from carnk_pkpd.structural.carnk import ld_inputs

    start, end, scale = _ld_arrays(ld_times, spec)
    return ld_inputs(start, end, scale, spec.lymphodepletion)


def _ld_arrays(ld_times: Sequence[Sequence[float]], spec: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nominal = [float(x) for x in spec.simulation["ld_days"]] or [-5.0, -3.0]
    start, end, scale = [], [], []
    for days in ld_times:
        days = [float(t) for t in days]
        start.append(min(days) if days else min(nominal))
        end.append(max(days) if days else max(nominal))
        scale.append(1.0 if days else 0.0)
    return np.asarray(start, float), np.asarray(end, float), np.asarray(scale, float)


@dataclass(frozen=True)
class SubjectDesign:
    """Who is simulated: per subject its infusions, dose level, covariates and LD window.

    ``doses[s]`` is an ``(n_dose, 2)`` array of (day, 10⁹ cells); ``dose_levels[s]`` a label (a label
    the fit does not know is a new dose level); ``covariates[NAME]`` (subject,) values (upper-case
    names; ``DOSE`` is derived from ``doses``); ``ld_start``/``ld_end`` the first and last LD day and
    ``ld_scale`` the LD intensity (1 as in the trial, 0 none), each (subject,). ``records`` holds an
    observed cohort's concentration records (:class:`~carnk_pkpd.statistical.ObservationData`: sample
    times per DVID and LLOQ), None for new patients.
    """

    ids: tuple[str, ...]
    doses: tuple[np.ndarray, ...]
    dose_levels: tuple[str, ...]
    covariates: dict[str, np.ndarray]
    ld_start: np.ndarray
    ld_end: np.ndarray
    ld_scale: np.ndarray
    records: Any = None

    @property
    def n_subjects(self) -> int:
        return len(self.ids)

    def ld(self, spec: Any) -> dict[str, np.ndarray]:
        """Per-subject LD inputs of the solver (``structural.carnk.ld_inputs``) under ``spec``'s
        ``[lymphodepletion]`` declaration."""
        from carnk_pkpd.structural.carnk import ld_inputs

        return ld_inputs(self.ld_start, self.ld_end, self.ld_scale, spec.lymphodepletion)

    @classmethod
    def from_cohort(cls, cohort: Any, spec: Any) -> SubjectDesign:
        """An observed cohort's design: each subject's own infusions, dose level, covariates and LD
        window (its EVID=2 rows: first to last day at full intensity; no EVID=2 row: no LD), and its
        concentration records (DVID 1–3)."""
        from carnk_pkpd.statistical import observation_data

        data = observation_data(cohort)
        start, end, scale = _ld_arrays(data.ld_times, spec)
        return cls(
            ids=tuple(data.ids),
            doses=tuple(np.asarray(d, float).reshape(-1, 2) for d in data.doses),
            dose_levels=tuple(data.dose_levels),
            covariates={k: np.asarray(v, float) for k, v in data.covariates.items()},
            ld_start=start,
            ld_end=end,
            ld_scale=scale,
            records=data,
        )

    @classmethod
    def from_regimen(
        cls,
        spec: Any,
        regimen: Any,
        n_subjects: int,
        *,
        covariates: Mapping[str, Sequence[float] | np.ndarray] | None = None,
        dose_level: str | None = None,
    ) -> SubjectDesign:
        """``n_subjects`` new patients on ``regimen`` (a :class:`~carnk_pkpd.regimen.Regimen`).

        LD on the file's ``simulation.ld_days`` (first to last day) at the regimen's ``ld_scale``.
        ``dose_level``: the label of a fitted dose level whose typical values apply; default the file's
        dose level with the same dose, interval and number of infusions, else a new dose level
        (``"new"``). ``covariates``: values per subject (``DOSE`` comes from the regimen).
        """
        if n_subjects < 1:
            raise ValueError(f"n_subjects must be >= 1 (found {n_subjects})")
        if dose_level is None:
            dose_level = regimen_dose_level(spec, regimen) or "new"
        ld_days = [float(x) for x in spec.simulation["ld_days"]]
        covs = {}
        for k, v in dict(covariates or {}).items():
            arr = np.broadcast_to(np.asarray(v, float), (n_subjects,)).copy()
            covs[k.upper()] = arr
        one = np.asarray(regimen.doses(), float).reshape(-1, 2)
        return cls(
            ids=tuple(str(i) for i in range(n_subjects)),
            doses=tuple(one for _ in range(n_subjects)),
            dose_levels=tuple(str(dose_level) for _ in range(n_subjects)),
            covariates=covs,
            ld_start=np.full(n_subjects, min(ld_days) if ld_days else -5.0),
            ld_end=np.full(n_subjects, max(ld_days) if ld_days else -3.0),
            ld_scale=np.full(n_subjects, float(regimen.ld_scale)),
        )

    @classmethod
    def from_dose_levels(cls, spec: Any, counts: Mapping[str, int] | None = None) -> SubjectDesign:
        """Subjects on the file's dose levels (``counts`` per label, default each level's
        ``n_subjects``, 1 where absent), each on its level's regimen with the trial's LD."""
        from carnk_pkpd.regimen import Regimen

        parts = []
        for label, dl in spec.dose_levels.items():
            n = int(dl.n_subjects or 1) if counts is None else int(counts.get(label, 0))
            if n > 0:
                parts.append(cls.from_regimen(spec, Regimen.from_dose_level(dl), n, dose_level=label))
        if not parts:
            raise ValueError(f"model {spec.name!r}: no subjects on its dose levels")
        return concat_designs(parts)


def concat_designs(parts: Sequence[SubjectDesign]) -> SubjectDesign:
    """Subjects of several designs side by side (ids renumbered 0..n−1 when they repeat)."""
    ids = [i for p in parts for i in p.ids]
    if len(set(ids)) != len(ids):
        ids = [str(i) for i in range(len(ids))]
    keys = set().union(*(p.covariates for p in parts))
    covs = {}
    for k in keys:
        covs[k] = np.concatenate([p.covariates.get(k, np.full(p.n_subjects, np.nan)) for p in parts])
    return SubjectDesign(
        ids=tuple(ids),
        doses=tuple(d for p in parts for d in p.doses),
        dose_levels=tuple(d for p in parts for d in p.dose_levels),
        covariates=covs,
        ld_start=np.concatenate([p.ld_start for p in parts]),
        ld_end=np.concatenate([p.ld_end for p in parts]),
        ld_scale=np.concatenate([p.ld_scale for p in parts]),
    )


def regimen_dose_level(spec: Any, regimen: Any) -> str | None:
    """The file's dose level with the regimen's dose, interval and number of infusions, or None."""
    for label, dl in spec.dose_levels.items():
        if (
            np.isclose(float(dl.dose), float(regimen.dose))
            and np.isclose(float(dl.interval), float(regimen.interval))
            and int(dl.n_infusions) == int(regimen.n_infusions)
        ):
            return str(label)
    return None


# --- the individual parameters -------------------------------------------------------------------------
def individual_parameters(
    pop: PopulationDraws,
    design: SubjectDesign,
    rng: np.random.Generator | None = None,
    *,
    new_subjects: bool = True,
    z: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Each subject's structural parameters per draw, ``{name: (draw, subject)}`` in natural units
    (every parameter but ``n_transit``); see the module docstring for the model.

    ``new_subjects=True`` draws fresh deviations from ``rng`` (required); the order of draws is fixed
    (per parameter in the file's order: one dose-level deviation per draw, then one per draw and
    subject), so equal generator states give equal patients whatever the regimen. ``new_subjects=False``
    uses the fitted subjects' own deviations (``pop.eta_z``, matched by subject ID; needs a fit) and
    draws nothing. ``z`` gives new subjects' standardised deviations explicitly, ``{name: (draw,
    subject)}`` (e.g. a cohort simulator that keeps its own stream); parameters missing from it are
    drawn from ``rng``, or take z = 0 when ``rng`` is None.
    """
    if new_subjects and rng is None and z is None:
        raise ValueError("new_subjects=True needs a random generator (rng)")
    n_d, n_s = pop.n_draws, design.n_subjects
    if not new_subjects:
        missing = [i for i in design.ids if i not in pop.subjects]
        if missing:
            raise ValueError(
                f"new_subjects=False needs fitted subjects; not in the fit: {', '.join(missing[:5])}"
            )
        col = np.array([pop.subjects.index(i) for i in design.ids], dtype=int)
    dl_index = np.array([_dose_level_index(d, pop.dose_levels) for d in design.dose_levels], dtype=int)
    effects: dict[str, list[CovariateEffect]] = {}
    for eff in pop.covariates:
        effects.setdefault(eff.parameter, []).append(eff)
    out = {}
    for name in pop.names:
        if new_subjects:
            if z is not None and (name in z or rng is None):
                z_dl = np.zeros(n_d)
                z_s = np.broadcast_to(np.asarray(z.get(name, 0.0), float), (n_d, n_s))
            else:
                z_dl = rng.standard_normal(n_d)
                z_s = rng.standard_normal((n_d, n_s))
        log_p = np.broadcast_to(np.log(pop.typical[name])[:, None], (n_d, n_s)).copy()
        if name in pop.typical_dl:
            known = dl_index >= 0
            log_p[:, known] = np.log(pop.typical_dl[name][:, dl_index[known]])
            if not np.all(known):
                if not new_subjects:
                    raise ValueError(f"{name}: a fitted subject's dose level is not in the fit")
                log_p[:, ~known] += (pop.omega_dl[name] * z_dl)[:, None]
        for eff in effects.get(name, []):
            x = covariate_values(_EffectSpec(eff.parameter, eff.covariate), design.doses, design.covariates)
            log_p = log_p + eff.log_effect(x)
        if name in pop.omega:
            if new_subjects:
                zz = z_s
            elif name in pop.eta_z:
                zz = pop.eta_z[name][:, col]
            else:
                warnings.warn(
                    f"{name}: the model file gives it BSV (omega {float(np.median(pop.omega[name])):g}) but "
                    f"the fit holds no eta_{name} (a fit made before fixed-omega parameters kept their "
                    "eta); its fitted subjects take eta = 0. Refit to carry it.",
                    stacklevel=2,
                )
                zz = np.zeros((n_d, n_s))
            log_p = log_p + pop.omega[name][:, None] * zz
        out[name] = np.exp(log_p)
    return out


def _dose_level_index(label: str, fitted: Sequence[str]) -> int:
    """Position of a dose level among the fitted ones, matching a model-file key (``DL4``) with the
    cohort's DL label (``4``); −1 for a new dose level."""

    def norm(x: str) -> str:
        x = str(x).strip()
        x = x[2:] if x[:2].upper() == "DL" and len(x) > 2 else x
        return x[:-2] if x.endswith(".0") and x[:-2].isdigit() else x

    keys = [norm(f) for f in fitted]
    n = norm(label)
    return keys.index(n) if n in keys else -1


@dataclass(frozen=True)
class _EffectSpec:
    parameter: str
    covariate: str


# --- the solver grid -----------------------------------------------------------------------------------
def solver_rate_bounds(
    spec: Any, theta: Mapping[str, np.ndarray] | None = None, n_transit: int | None = None
) -> tuple[Any, Any]:
    """The one rule for the solver grid's rate bounds and kill cap; see
    :func:`carnk_pkpd.structural.solve.rate_bounds` (re-exported here for the consumers)."""
    from carnk_pkpd.structural.solve import rate_bounds

    return rate_bounds(spec, theta, n_transit)


# --- observations --------------------------------------------------------------------------------------
def observation_scale(
    spec: Any, dvid: np.ndarray, car: np.ndarray, bcell: np.ndarray, residual: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Predictions in each record's unit, ``(draw, record)``: chosen by DVID (1 and 3 CAR-NK, 2 B cells),
    DVID 3 times the draw's ``copies_per_cell``. ``car``/``bcell`` (draw, record) in cells/µL."""
    from carnk_pkpd.statistical import CAR_DVIDS

    out = np.where(np.isin(dvid, CAR_DVIDS)[None, :], car, bcell).astype(float)
    for d, obs in spec.observations.items():
        sel = dvid == d
        if sel.any() and obs.conversion is not None:
            out[:, sel] = out[:, sel] * residual[obs.conversion.name][:, None]
    return out


def add_residual_error(
    spec: Any,
    dvid: np.ndarray,
    pred: np.ndarray,
    residual: Mapping[str, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """Observations with residual error, ``(draw, record)``, from predictions ``pred`` in record units:
    log-normal ``pred·exp(σ·ε)`` or combined ``pred + sqrt((prop·pred)² + add²)·ε`` as the file
    declares for each DVID. One standard normal per (draw, record), drawn in one block."""
    from carnk_pkpd.statistical import CAR_FLOOR

    eps = rng.standard_normal(pred.shape)
    y = np.full(pred.shape, np.nan)
    for d, obs in spec.observations.items():
        sel = dvid == d
        if not sel.any():
            continue
        mu = pred[:, sel]
        if obs.error == "lognormal":
            sig = residual[f"sigma_{obs.name}"][:, None]
            y[:, sel] = (mu + CAR_FLOOR) * np.exp(sig * eps[:, sel])
        else:
            prop = residual[f"sigma_{obs.name}_prop"][:, None]
            add = residual[f"sigma_{obs.name}_add"][:, None]
            y[:, sel] = mu + np.sqrt((prop * mu) ** 2 + add**2) * eps[:, sel]
    return y


# --- the entry point -----------------------------------------------------------------------------------
MAX_SUBJECTS_PER_CHUNK = 2000  # draws per chunk = max(1, this // n_subjects): fixed, never worker-dependent


def population_from(
    source: Any,
    n_draws: int | None = None,
    seed: int = 0,
    uncertainty: str = "typical",
) -> PopulationDraws:
    """:class:`PopulationDraws` from a Fit (``n_draws`` chosen with ``seed``), a model (spec, name or
    path: ``n_draws`` draws, default 1, with ``uncertainty``) or a PopulationDraws (``n_draws`` of
    them chosen with ``seed``)."""
    if isinstance(source, PopulationDraws):
        if n_draws is None or n_draws >= source.n_draws:
            return source
        idx = np.sort(np.random.default_rng(seed).choice(source.n_draws, size=n_draws, replace=False))
        return source.take(idx)
    if hasattr(source, "posterior") and hasattr(source, "cohort"):
        return PopulationDraws.from_fit(source, n_draws, seed)
    from carnk_pkpd.spec import ModelSpec, load_model

    spec = source if isinstance(source, ModelSpec) else load_model(source)
    return PopulationDraws.from_model(spec, n_draws or 1, seed, uncertainty)


def design_from(
    design: Any,
    spec: Any,
    n_subjects: int | None = None,
    covariates: Mapping[str, Any] | None = None,
) -> SubjectDesign:
    """:class:`SubjectDesign` from a Regimen (``n_subjects`` new patients), a Cohort (its observed
    design) or a SubjectDesign."""
    if isinstance(design, SubjectDesign):
        return design
    if hasattr(design, "subjects"):
        return SubjectDesign.from_cohort(design, spec)
    if hasattr(design, "doses") and hasattr(design, "ld_scale"):
        if n_subjects is None:
            raise ValueError("a Regimen design needs n_subjects (new patients per draw)")
        return SubjectDesign.from_regimen(spec, design, n_subjects, covariates=covariates)
    raise TypeError(f"design must be a Regimen, a Cohort or a SubjectDesign (found {type(design).__name__})")


def _resample_covariates(
    spec: Any, design: SubjectDesign, fit: Any, rng: np.random.Generator
) -> SubjectDesign:
    """New patients take the covariates the model needs from the fitted cohort, resampled with
    replacement (whole subjects, so covariates stay jointly distributed), unless given."""
    needed = sorted({c.covariate.upper() for c in spec.covariates} - {"DOSE"} - set(design.covariates))
    if not needed:
        return design
    if fit is None:
        raise ValueError(
            f"the model has covariate effects on {', '.join(needed)}: give their values for the new "
            "subjects (covariates=...)"
        )
    from carnk_pkpd.statistical import observation_data

    data = observation_data(fit.cohort)
    pick = rng.integers(0, data.n_subjects, design.n_subjects)
    covs = dict(design.covariates)
    for k in needed:
        if k not in data.covariates:
            raise ValueError(f"covariate {k} is not in the fitted cohort")
        covs[k] = np.asarray(data.covariates[k], float)[pick]
    return replace(design, covariates=covs)


def simulate_population(
    source: Any,
    design: Any,
    *,
    n_subjects: int | None = None,
    n_draws: int | None = None,
    seed: int = 0,
    new_subjects: bool = True,
    times: Sequence[float] | np.ndarray | None = None,
    covariates: Mapping[str, Any] | None = None,
    uncertainty: str = "typical",
    accuracy: str = "default",
    observations: bool = True,
    metrics: bool = True,
    metric_options: Mapping[str, Any] | None = None,
) -> Any:
    """Simulate subjects from a population model: parameters, trajectories, observations, metrics.

    Parameters
    ----------
    source
        A :class:`~carnk_pkpd.fits.Fit` (posterior draws), a model (ModelSpec, name or path: its
        typical values, or draws from its priors with ``uncertainty="prior"``) or
        :class:`PopulationDraws`.
    design
        A :class:`~carnk_pkpd.regimen.Regimen` (``n_subjects`` new patients per draw), a
        :class:`~carnk_pkpd.data.Cohort` (each subject's own infusions, LD window, covariates and
        records) or a :class:`SubjectDesign`.
    n_draws, seed
        Population draws (a fit's chosen without replacement with ``seed``; all when None) and the
        seed of every random step. Draws are simulated in chunks of at most
        ``MAX_SUBJECTS_PER_CHUNK`` subjects; chunk ``c`` uses the stream
        ``SeedSequence([seed, c])``, so results never depend on how chunks are distributed, and the
        same seed gives the same virtual patients under every regimen (common random numbers).
    new_subjects
        True: new η drawn from Ω (new patients, VPC, NPDE, dose search). False: the fitted subjects'
        own η (IPRED; needs a Fit and its cohort as design).
    times
        Days for the trajectories (default: the file's CAR-NK and B-cell sampling days and day 0).
    covariates
        Covariate values of new patients (per subject or one for all); without them, covariates the
        model needs are resampled from the fitted cohort. ``DOSE`` always follows the design.
    observations, metrics
        Simulate each record's observation (observed designs) and the derived metrics
        (:func:`carnk_pkpd.structural.derived_metrics`, the file's ``[events]`` thresholds unless
        ``metric_options`` says otherwise).

    Returns
    -------
    xarray.Dataset on ``draw, subject, time`` (and ``record`` for observed designs): one variable per
    structural parameter (natural units), ``car``/``bcell`` (cells/µL), every derived metric
    (``DA``, ``reconstitution_day``, …; NaN = never happens), per draw ``typical_<p>``,
    ``omega_<p>``, ``omega_DL_<p>``, ``beta_…``, residual SDs; for records ``ipred`` (record unit),
    ``y`` (with residual error, uncensored), ``blq`` (``y`` < the record's LLOQ) and the observed
    ``DV``/``BLQ``/``LLOQ``/``DVID``/``TIME``/``ID``.
    """
    import xarray as xr

    from carnk_pkpd.structural import derived_metrics, simulate

    fit = source if hasattr(source, "posterior") and hasattr(source, "cohort") else None
    pop = population_from(source, n_draws, seed, uncertainty)
    spec = pop.spec
    des = design_from(design, spec, n_subjects, covariates)
    if new_subjects:
        des = _resample_covariates(spec, des, fit, np.random.default_rng([seed, 2**31]))
    n_d, n_s = pop.n_draws, des.n_subjects
    t = np.unique(
        np.asarray(
            times
            if times is not None
            else [0.0, *spec.simulation["car_days"], *spec.simulation["bcell_days"]],
            float,
        )
    )
    rec = des.records if observations else None
    t_all = t if rec is None else np.unique(np.concatenate([t, *rec.times]))
    ev = dict(spec.events)
    mopt = dict(
        reappearance_threshold=float(ev["reappearance_threshold"]),
        reconstitution_threshold=float(ev["reconstitution_threshold"]),
        aplasia_threshold=float(ev["aplasia_threshold"]),
        aplasia_window=(float(ev["aplasia_window"][0]), float(ev["aplasia_window"][1])),
    )
    mopt.update(metric_options or {})
    ld = des.ld(spec)
    per_chunk = max(1, MAX_SUBJECTS_PER_CHUNK // n_s)
    n_chunks = -(-n_d // per_chunk)
    parts: list[dict[str, np.ndarray]] = []
    for c in range(n_chunks):
        idx = np.arange(c * per_chunk, min((c + 1) * per_chunk, n_d))
        pc = pop.take(idx)
        rng = np.random.default_rng(np.random.SeedSequence([seed, c]))
        theta = individual_parameters(pc, des, rng, new_subjects=new_subjects)
        m = idx.size
        flat = {k: v.reshape(-1) for k, v in theta.items()}
        flat["n_transit"] = np.full(m * n_s, pop.n_transit)
        doses = list(des.doses) * m
        ld_flat = {k: np.tile(v, m) for k, v in ld.items()}
        part: dict[str, np.ndarray] = {k: v for k, v in theta.items()}
        paths = simulate(flat, doses, t_all, spec, accuracy, ld_flat)
        car = np.asarray(paths["car"].values).reshape(m, n_s, -1)
        bcell = np.asarray(paths["bcell"].values).reshape(m, n_s, -1)
        pos = np.searchsorted(t_all, t)
        part["car"], part["bcell"] = car[:, :, pos], bcell[:, :, pos]
        if metrics:
            met = derived_metrics(flat, doses, spec, accuracy=accuracy, ld=ld_flat, **mopt)
            for k in met.data_vars:
                part[str(k)] = np.asarray(met[k].values).reshape(m, n_s)
        if rec is not None:
            tpos = np.searchsorted(t_all, np.concatenate(rec.times)[_record_time_flat(rec)])
            car_r = car[:, rec.subject_index, tpos]
            b_r = bcell[:, rec.subject_index, tpos]
            res = {k: v for k, v in pc.residual.items()}
            ipred = observation_scale(spec, rec.dvid, car_r, b_r, res)
            part["ipred"] = ipred
            part["y"] = add_residual_error(spec, rec.dvid, ipred, res, rng)
        parts.append(part)
    data = {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
    return _assemble(pop, des, t, data, rec, seed, new_subjects, accuracy, xr)


def _record_time_flat(rec: Any) -> np.ndarray:
    """Index into the concatenated per-subject times for each record."""
    offsets = np.cumsum([0, *[len(t) for t in rec.times[:-1]]])
    return offsets[rec.subject_index] + rec.time_index


def _assemble(pop, des, t, data, rec, seed, new_subjects, accuracy, xr):
    from carnk_pkpd.structural.metrics import UNITS

    spec = pop.spec
    dims2, dims3 = ("draw", "subject"), ("draw", "subject", "time")
    out: dict[str, Any] = {}
    for name in pop.names:
        out[name] = (
            dims2,
            data[name],
            {"units": spec.parameters[name].unit, "long_name": "individual value"},
        )
    out["car"] = (dims3, data["car"], {"units": "cells/µL", "long_name": "CAR-NK cells in blood"})
    out["bcell"] = (dims3, data["bcell"], {"units": "cells/µL", "long_name": "CD19+ B cells in blood"})
    for k, u in UNITS.items():
        if k in data:
            out[k] = (dims2, data[k], {"units": u})
    for name, v in pop.typical.items():
        out[f"typical_{name}"] = ("draw", v, {"units": spec.parameters[name].unit})
    for name, v in pop.omega.items():
        est = spec.parameters[name].bsv_estimate
        out[f"omega_{name}"] = ("draw", v, {"units": "log-scale SD", "estimated": int(bool(est))})
    for name, v in pop.omega_dl.items():
        out[f"omega_DL_{name}"] = ("draw", v, {"units": "log-scale SD"})
    for name, v in pop.typical_dl.items():
        out[f"typical_DL_{name}"] = (("draw", "dose_level_fitted"), v, {"units": spec.parameters[name].unit})
    for eff in pop.covariates:
        b = np.asarray(eff.beta)
        if b.ndim == 1:
            out[eff.label] = ("draw", b, {"units": "1"})
        else:
            out[eff.label] = (("draw", f"{eff.label}_level"), b, {"units": "1"})
    for name, v in pop.residual.items():
        out[name] = ("draw", v)
    coords: dict[str, Any] = {
        "draw": pop.draw,
        "subject": list(des.ids),
        "time": ("time", t, {"units": "days", "long_name": "days since the first infusion"}),
        "dose_level": ("subject", list(des.dose_levels)),
        "ld_scale": ("subject", des.ld_scale),
    }
    if pop.typical_dl:
        coords["dose_level_fitted"] = list(pop.dose_levels)
    if rec is not None:
        dr = ("draw", "record")
        out["ipred"] = (dr, data["ipred"], {"long_name": "individual prediction, record's unit"})
        out["y"] = (dr, data["y"], {"long_name": "simulated observation with residual error (uncensored)"})
        out["blq"] = (
            dr,
            data["y"] < rec.lloq[None, :],
            {"long_name": "simulated value below the record's LLOQ"},
        )
        coords.update(
            record=np.arange(rec.dv.size),
            ID=("record", np.asarray(rec.ids, dtype=object)[rec.subject_index]),
            TIME=("record", np.concatenate(rec.times)[_record_time_flat(rec)], {"units": "days"}),
            DVID=("record", rec.dvid),
            DV=("record", rec.dv),
            BLQ=("record", rec.blq),
            LLOQ=("record", rec.lloq),
        )
    ds = xr.Dataset(out, coords=coords)
    ds.attrs.update(
        model=spec.name,
        source=pop.source,
        synthetic=int(bool(pop.synthetic)),
        seed=int(seed),
        new_subjects=int(bool(new_subjects)),
        accuracy=accuracy,
        n_transit=pop.n_transit,
    )
    return ds
