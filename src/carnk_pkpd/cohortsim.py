"""Synthetic cohorts: virtual patients drawn from a model file, written in the cohort data format.

:func:`simulate_cohort` draws each subject's structural parameters through the population layer
(:func:`carnk_pkpd.population.individual_parameters`: log-normal around the typical values with the
model file's between-subject variability, estimated or OMEGA FIX, and its covariate effects; no
clipping to bounds, as in fits), gives it the regimen of its dose level and the trial's
lymphodepletion window (EVID=2 rows on ``simulation.ld_days``),
solves the structural model at science.md's sampling schedule, adds residual error, censors values
below the LLOQ (BLQ=1, DV=LLOQ) and generates DORIS / LLDAS / SLEDAI-2K visits with the clinical
generator of science.md §4 ("Remission link"). Every number it writes is simulated: the cohort carries
a ``# SYNTHETIC`` comment and :attr:`Cohort.synthetic` is True.

Randomness comes from one ``numpy.random.default_rng(seed)``, drawn in a fixed order: the same seed
gives the same file, and the draws do not depend on ``dvids`` or ``follow_up`` (a shorter follow-up
keeps the same values on the days it still covers).

Calibration against science.md §4 targets (reference model, default generator, trial DL mix, 12 months
of follow-up)::

    >>> cohort, truth = simulate_cohort("reference", n_subjects=500, seed=1, follow_up=365)  # doctest: +SKIP
    >>> calibration_summary(cohort, truth)                                                     # doctest: +SKIP
    {'reconstitution_day_median': 71.0, 'reconstitution_day_iqr': (63.3, 83.1), 'never_reconstituted': 0.0,
     'response': 0.694, 'doris_6m': 0.552, 'lldas_6m': 0.704, 'doris_12m': 0.694, 'lldas_12m': 0.708, ...}

Averaged over 12 such cohorts (seeds 9–20, 6000 virtual patients): B ≥ 10/µL at median day 71.6 (IQR
63.3–81.9; target ~72, 62–83); complete response 0.64; DORIS/LLDAS 0.50/0.64 at 6 months (target
~0.50/~0.70) and 0.64/0.65 at 12 months (target ~0.65/~0.67); between-cohort SD ~0.025. LLDAS at 6
months stays below ~0.70 because non-responders keep 40–60% of their clinical SLEDAI and rarely reach
SLEDAI-2K ≤ 4; lowering that floor would push LLDAS at 12 months above its target as well.
(Measured with BSV on k_kmax; since the shipped files dropped it, the 500-patient check of
``tests/test_cohortsim.py`` (seed 10) moved from day 72.3 to 72.1, IQR 63.2–82.2, DORIS/LLDAS unchanged.)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover - imports for type checkers only
    import xarray as xr

    from carnk_pkpd.data import Cohort
    from carnk_pkpd.spec import ModelSpec

__all__ = [
    "DORIS_CRITERIA",
    "LLDAS_CRITERIA",
    "ClinicalGenerator",
    "CohortDesign",
    "allocate_dose_levels",
    "calibration_summary",
    "draw_follow_up_months",
    "months_to_days",
    "parse_dose_levels",
    "score_visits",
    "simulate_cohort",
]

#: DORIS remission 2021 (science.md §3): clinical SLEDAI = 0, PGA < 0.5 (0–3), prednisolone ≤ 5 mg/d.
DORIS_CRITERIA: dict[str, float] = {"clinical_sledai_max": 0.0, "pga_below": 0.5, "prednisolone_max": 5.0}
#: LLDAS (science.md §3): SLEDAI-2K incl. serology ≤ 4, PGA ≤ 1, prednisolone ≤ 7.5 mg/d.
LLDAS_CRITERIA: dict[str, float] = {"sledai_2k_max": 4.0, "pga_max": 1.0, "prednisolone_max": 7.5}
#: SLEDAI-2K points for increased anti-dsDNA binding and for low complement.
_SEROLOGY_POINTS = 2

_OBS_CAR, _OBS_B, _OBS_QPCR = 1, 2, 3
_DORIS, _LLDAS, _SLEDAI = 10, 11, 12
_DAYS_PER_MONTH = 365.0 / 12.0
_TIME_DECIMALS = 6
_DV_SIGNIFICANT = 4


# --------------------------------------------------------------------------------------------------
# Assumed constants, configurable
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClinicalGenerator:
    """Constants of the clinical generator (science.md §4 "Remission link"); all **[assumed]**.

        Responders (CR_i = 1) lose clinical SLEDAI with ``responder_halflife`` (days) towards 0;
        non-responders fall with ``nonresponder_halflife`` to a fraction of baseline drawn uniformly from
        ``nonresponder_residual``. Prednisone (mg/d) tapers with a half-life (days) log-normal around
    ``pred_halflife`` (log-SD ``pred_halflife_log_sd``) from a start dose
        drawn from ``pred_start`` to a target drawn from ``pred_target_responder`` or
        ``pred_target_nonresponder``. Anti-dsDNA / low complement are present at baseline with the given
        probabilities and each clears (at a day drawn from ``serology_clear_days``) with probability
        ``serology_clear_responder`` or ``serology_clear_nonresponder``. The physician global assessment
        (0–3) is ``pga_per_point`` × clinical SLEDAI plus Normal(0, ``pga_sd``) noise per visit.

        Values can be overridden from a model file's ``[remission]`` table with keys of the same names
        (two-element lists for ranges); see :meth:`from_model`.
    """

    sledai0_mean: float = 10.0  # clinical SLEDAI at baseline ~ N(10, 3) (science.md §4)
    sledai0_sd: float = 3.0
    sledai0_min: float = 4.0  # active disease at inclusion
    responder_halflife: float = 21.0  # days
    nonresponder_halflife: float = 21.0  # days
    nonresponder_residual: tuple[float, float] = (0.4, 0.6)  # fraction of baseline kept
    pred_start: tuple[float, float] = (15.0, 30.0)  # mg/d
    pred_halflife: float = 45.0  # days, typical
    pred_halflife_log_sd: float = 0.25  # between-patient log-SD of the taper half-life
    pred_target_responder: tuple[float, float] = (1.5, 4.0)  # mg/d
    pred_target_nonresponder: tuple[float, float] = (5.0, 10.0)  # mg/d
    dsdna_positive: float = 0.8  # probability at baseline
    low_complement: float = 0.6  # probability at baseline
    serology_clear_responder: float = 0.7
    serology_clear_nonresponder: float = 0.15
    serology_clear_days: tuple[float, float] = (30.0, 150.0)  # days
    pga_per_point: float = 0.15  # PGA units per clinical SLEDAI point
    pga_sd: float = 0.15
    basis: str = "assumed"

    @classmethod
    def from_model(cls, spec: ModelSpec) -> ClinicalGenerator:
        """Defaults, overridden by same-named keys of the model file's ``[remission]`` table."""
        table: dict[str, Any] = {}
        raw = spec.raw.get("remission") if isinstance(spec.raw, Mapping) else None
        for source in (spec.remission, raw or {}):
            table.update({k: v for k, v in source.items()})
        return cls.from_mapping(table)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ClinicalGenerator:
        """Defaults overridden by the keys of ``values`` that name fields (other keys are ignored)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in fields or key == "basis":
                continue
            default = getattr(cls, key)
            if isinstance(default, tuple):
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ValueError(f"remission.{key}: expected a [low, high] pair (found {value!r})")
                lo, hi = (float(v) for v in value)
                if hi < lo:
                    raise ValueError(f"remission.{key}: expected low <= high (found {value!r})")
                kwargs[key] = (lo, hi)
            else:
                kwargs[key] = float(value)
        return dataclasses.replace(cls(), **kwargs)


@dataclass(frozen=True)
class CohortDesign:
    """Trial design and population constants of a synthetic cohort; **[assumed]** unless noted.

    Follow-up (months) is log-normal with median ``follow_up_median_months`` and log-SD
    ``follow_up_log_sd``, clipped to ``follow_up_range_months`` (published: median 5, range 1–12,
    ACR 2024 L17). AGE (years) ~ Normal(``age_mean``, ``age_sd``) clipped to the inclusion range
    18–65 (published: median 37.5, Gao 2025); SEX is female (1) with probability ``female``
    (published: 17/18); WT (kg) ~ Normal(``wt_mean``, ``wt_sd``) clipped to ``wt_range``.
    """

    follow_up_median_months: float = 5.0
    follow_up_log_sd: float = 0.7
    follow_up_range_months: tuple[float, float] = (1.0, 12.0)
    age_mean: float = 38.0
    age_sd: float = 9.0
    age_range: tuple[float, float] = (18.0, 65.0)
    female: float = 0.94
    wt_mean: float = 58.0
    wt_sd: float = 10.0
    wt_range: tuple[float, float] = (38.0, 110.0)


# --------------------------------------------------------------------------------------------------
# Dose-level allocation
# --------------------------------------------------------------------------------------------------


def parse_dose_levels(text: str) -> dict[str, int] | list[str]:
    """Read ``"1:1,2:1,3:5,4:13"`` (label:count) or ``"1,2,3,4"`` (labels) from a command line.

    Raises ``ValueError`` with a plain message when the text is malformed.
    """
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(not s for s in items):
        raise ValueError(
            f"dose levels: empty item in {text!r} (expected e.g. '1:1,2:1,3:5,4:13' or '1,2,3,4')"
        )
    with_counts = [":" in s for s in items]
    if any(with_counts) and not all(with_counts):
        raise ValueError(f"dose levels: give a count for every label or for none (found {text!r})")
    if not any(with_counts):
        if len(set(items)) != len(items):
            raise ValueError(f"dose levels: a label is repeated (found {text!r})")
        return items
    out: dict[str, int] = {}
    for s in items:
        label, _, count = (p.strip() for p in s.partition(":"))
        if not label or not count.isdigit():
            raise ValueError(
                f"dose levels: {s!r} is not label:count (expected a label and a whole number >= 0, e.g. '4:13')"
            )
        if label in out:
            raise ValueError(f"dose levels: label {label!r} given twice (found {text!r})")
        out[label] = int(count)
    return out


def _resolve_label(spec: ModelSpec, label: Any) -> str:
    """The model file's dose-level key for a user label (``"4"``, ``4``, ``"DL4"``, ``"dl4"``)."""
    text = str(label).strip()
    if text.endswith(".0") and text[:-2].isdigit():
        text = text[:-2]
    keys = list(spec.dose_levels)
    for candidate in (text, f"DL{text}"):
        if candidate in spec.dose_levels:
            return candidate
    lowered = {k.lower(): k for k in keys}
    for candidate in (text.lower(), f"dl{text.lower()}"):
        if candidate in lowered:
            return lowered[candidate]
    shown = ", ".join(_file_label(k) for k in keys) or "none"
    raise ValueError(f"unknown dose level {label!r} for model {spec.name!r} (known: {shown})")


def _file_label(key: str) -> str:
    """The DL column's label for a model file key: ``DL4`` → ``4``; other keys unchanged."""
    return key[2:] if key[:2].upper() == "DL" and len(key) > 2 else key


def _spread(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split proportionally to ``weights`` (largest remainder, ties to the earlier)."""
    w = np.asarray(weights, float)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def allocate_dose_levels(
    spec: ModelSpec,
    dose_levels: Mapping[Any, int] | Sequence[Any] | str | None = None,
    n_subjects: int | None = None,
) -> dict[str, int]:
    """Subjects per dose level (model file keys, in the order given) for :func:`simulate_cohort`.

    ``dose_levels`` is a mapping label → count, a sequence of labels (``n_subjects`` spread evenly,
    extra subjects to the first labels), a command-line string (:func:`parse_dose_levels`) or None: the
    file's ``n_subjects`` per dose level (1/1/5/13 in the reference model), scaled to ``n_subjects``
    when that is given.
    """
    if isinstance(dose_levels, str):
        dose_levels = parse_dose_levels(dose_levels)
    if n_subjects is not None and (
        isinstance(n_subjects, bool) or int(n_subjects) != n_subjects or n_subjects < 1
    ):
        raise ValueError(f"n_subjects must be a whole number >= 1 (found {n_subjects!r})")
    if dose_levels is None:
        keys = list(spec.dose_levels)
        if not keys:
            from carnk_pkpd.errors import ModelFileError

            raise ModelFileError(
                str(spec.source_file or spec.name),
                "dose_levels",
                "no [dose_levels.<label>] table to simulate",
            )
        file_counts = [spec.dose_levels[k].n_subjects for k in keys]
        if any(c is None for c in file_counts) or sum(c or 0 for c in file_counts) == 0:
            if n_subjects is None:
                raise ValueError(
                    f"model {spec.name!r} gives no n_subjects per dose level; pass dose_levels or n_subjects"
                )
            counts = _spread(int(n_subjects), [1.0] * len(keys))
        elif n_subjects is None:
            counts = [int(c or 0) for c in file_counts]
        else:
            counts = _spread(int(n_subjects), [float(c or 0) for c in file_counts])
        out = dict(zip(keys, counts, strict=True))
    elif isinstance(dose_levels, Mapping):
        out = {}
        for label, count in dose_levels.items():
            key = _resolve_label(spec, label)
            if key in out:
                raise ValueError(f"dose level {label!r} given twice")
            if isinstance(count, bool) or int(count) != count or count < 0:
                raise ValueError(f"dose level {label!r}: count must be a whole number >= 0 (found {count!r})")
            out[key] = int(count)
        total = sum(out.values())
        if n_subjects is not None and total != n_subjects:
            raise ValueError(
                f"dose-level counts add up to {total} subjects but n_subjects is {n_subjects}; give one or "
                "make them agree"
            )
    else:
        keys = [_resolve_label(spec, label) for label in dose_levels]
        if not keys:
            raise ValueError("no dose levels given")
        if len(set(keys)) != len(keys):
            raise ValueError(f"a dose level is repeated in {list(dose_levels)!r}")
        if n_subjects is None:
            raise ValueError("a list of dose levels needs n_subjects (spread evenly over the levels)")
        out = dict(zip(keys, _spread(int(n_subjects), [1.0] * len(keys)), strict=True))
    out = {k: v for k, v in out.items() if v > 0}
    if not out:
        raise ValueError("no subjects to simulate (all dose-level counts are 0)")
    return out


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def _car_schedule(sim: Mapping[str, Any], dose_times: Sequence[float]) -> np.ndarray:
    """CAR-NK sampling days: the listed days, 1 day after each later infusion, and pre-dose troughs.

    A listed day that falls on an infusion is taken just before it (``predose_offset`` days earlier).
    The first infusion has no pre-dose sample: CAR-NK is zero then by construction (and the reader warns
    about CAR-NK samples before the first infusion).
    """
    offset = float(sim.get("predose_offset", 0.041667))
    later = [float(t) for t in dose_times[1:]]
    days = {round(float(d), _TIME_DECIMALS) for d in sim["car_days"] if float(d) > 0}
    days |= {round(t + 1.0, _TIME_DECIMALS) for t in later}
    days -= {round(t, _TIME_DECIMALS) for t in dose_times}
    if sim.get("car_predose", True):
        days |= {round(t - offset, _TIME_DECIMALS) for t in later}
    return np.array(sorted(days), dtype=float)


def _bcell_schedule(sim: Mapping[str, Any]) -> np.ndarray:
    days = [*sim["bcell_days"], *sim.get("bcell_days_extended", [])]
    return np.array(sorted({round(float(d), _TIME_DECIMALS) for d in days}), dtype=float)


def _clinical_schedule(sim: Mapping[str, Any]) -> np.ndarray:
    return np.array(sorted({round(float(d), _TIME_DECIMALS) for d in sim["clinical_days"]}), dtype=float)


# --------------------------------------------------------------------------------------------------
# Clinical scores
# --------------------------------------------------------------------------------------------------


def score_visits(
    clinical_sledai: np.ndarray, serology_points: np.ndarray, pga: np.ndarray, prednisolone: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DORIS (0/1), LLDAS (0/1) and SLEDAI-2K (integer score) per visit, by science.md §3.

    ``clinical_sledai`` (integer points without serology), ``serology_points`` (0, 2 or 4: anti-dsDNA
    and low complement), ``pga`` (0–3), ``prednisolone`` (mg/d); arrays broadcast together. DORIS
    implies LLDAS: clinical SLEDAI 0 leaves at most the 4 serology points, PGA < 0.5 ≤ 1 and
    prednisolone ≤ 5 ≤ 7.5 mg/d.
    """
    clinical = np.asarray(clinical_sledai, dtype=np.int64)
    serology = np.asarray(serology_points, dtype=np.int64)
    if np.any(serology > 2 * _SEROLOGY_POINTS) or np.any(serology < 0):
        raise ValueError("serology points must be within 0..4 (anti-dsDNA 2 + low complement 2)")
    pga = np.asarray(pga, float)
    pred = np.asarray(prednisolone, float)
    sledai_2k = clinical + serology
    doris = (
        (clinical <= DORIS_CRITERIA["clinical_sledai_max"])
        & (pga < DORIS_CRITERIA["pga_below"])
        & (pred <= DORIS_CRITERIA["prednisolone_max"])
    )
    lldas = (
        (sledai_2k <= LLDAS_CRITERIA["sledai_2k_max"])
        & (pga <= LLDAS_CRITERIA["pga_max"])
        & (pred <= LLDAS_CRITERIA["prednisolone_max"])
    )
    return doris.astype(np.int64), lldas.astype(np.int64), sledai_2k


def _clinical_course(
    gen: ClinicalGenerator, latent: Mapping[str, np.ndarray], i: int, days: np.ndarray, pga_noise: np.ndarray
) -> dict[str, np.ndarray]:
    """Clinical SLEDAI, serology points, PGA and prednisolone of subject ``i`` at ``days``."""
    t = np.maximum(days, 0.0)
    responder = bool(latent["response"][i])
    c0 = latent["sledai0"][i]
    if responder:
        clinical = c0 * 0.5 ** (t / gen.responder_halflife)
        target = latent["pred_target_r"][i]
    else:
        floor = latent["residual"][i]
        clinical = c0 * (floor + (1.0 - floor) * 0.5 ** (t / gen.nonresponder_halflife))
        target = latent["pred_target_nr"][i]
    clinical_points = np.floor(clinical + 0.5).astype(np.int64)
    p0 = latent["pred_start"][i]
    pred = target + (p0 - target) * 0.5 ** (t / latent["pred_halflife"][i])
    clears = latent["clears_r"][i] if responder else latent["clears_nr"][i]
    serology = np.zeros(days.shape, dtype=np.int64)
    for k, marker in enumerate(("dsdna", "low_c")):
        positive = bool(latent[marker][i])
        if not positive:
            continue
        cleared = bool(clears[k]) & (days >= latent["clear_day"][i, k])
        serology += np.where(cleared, 0, _SEROLOGY_POINTS)
    pga = np.clip(gen.pga_per_point * clinical_points + gen.pga_sd * pga_noise, 0.0, 3.0)
    return {"clinical": clinical_points, "serology": serology, "pga": pga, "pred": pred}


# --------------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------------


def _load_spec(model: Any) -> ModelSpec:
    from carnk_pkpd.spec import ModelSpec, load_model

    if isinstance(model, ModelSpec):
        return model
    return load_model("reference" if model is None else model)


def _round_sig(x: np.ndarray, digits: int = _DV_SIGNIFICANT) -> np.ndarray:
    """Values rounded to ``digits`` significant figures (0 stays 0)."""
    x = np.asarray(x, float)
    out = np.zeros_like(x)
    nz = x != 0
    mag = np.floor(np.log10(np.abs(x[nz])))
    scale = 10.0 ** (digits - 1 - mag)
    out[nz] = np.round(x[nz] * scale) / scale
    return out


def draw_follow_up_months(rng: np.random.Generator, n: int, design: CohortDesign | None = None) -> np.ndarray:
    """Follow-up in months for ``n`` subjects, drawn like the trial (:class:`CohortDesign`)."""
    design = design if design is not None else CohortDesign()
    z = rng.standard_normal(n)
    months = design.follow_up_median_months * np.exp(design.follow_up_log_sd * z)
    return np.clip(months, *design.follow_up_range_months)


def months_to_days(months: np.ndarray | float) -> np.ndarray:
    """Months to days (365/12 days a month; month 12 is day 365)."""
    return np.asarray(months, float) * _DAYS_PER_MONTH


def _follow_up_days(follow_up: float | Sequence[float] | None, drawn_months: np.ndarray) -> np.ndarray:
    n = drawn_months.size
    if follow_up is None:
        return np.minimum(months_to_days(drawn_months), 365.0)
    if np.ndim(follow_up) == 0:
        days = np.full(n, float(follow_up))  # type: ignore[arg-type]
    else:
        days = np.asarray(follow_up, float).ravel()
        if days.size != n:
            raise ValueError(f"follow_up gives {days.size} values for {n} subjects")
    if not np.all(np.isfinite(days)) or np.any(days <= 0):
        raise ValueError(f"follow_up must be > 0 days (found {follow_up!r})")
    return days


def simulate_cohort(
    model: str | os.PathLike[str] | ModelSpec | None = None,
    dose_levels: Mapping[Any, int] | Sequence[Any] | str | None = None,
    n_subjects: int | None = None,
    seed: int = 0,
    *,
    truth: Mapping[str, float] | None = None,
    dvids: Sequence[int] = (1, 2),
    covariates: bool = True,
    follow_up: float | Sequence[float] | None = None,
    clinical: ClinicalGenerator | None = None,
    design: CohortDesign | None = None,
    bsv: str = "file",
) -> tuple[Cohort, xr.Dataset]:
    """Simulate a SYNTHETIC cohort from a model file.

    Parameters
    ----------
    model
        A :class:`~carnk_pkpd.spec.ModelSpec`, model name or path (default ``"reference"``).
    dose_levels
        Subjects per dose level: mapping label → count, list of labels (``n_subjects`` spread evenly), a
        string ``"1:1,2:1,3:5,4:13"`` / ``"1,2,3,4"``, or None (the file's mix, scaled to ``n_subjects``
        when given). Labels ``4`` and ``"DL4"`` name the same level; the DL column holds ``4``.
    n_subjects
        Number of subjects (see ``dose_levels``).
    seed
        Seed of the one ``numpy.random.default_rng``; the same seed gives the same cohort.
    truth
        Typical values overriding the model file's (same units), e.g. ``{"k_rej": 0.2}``; BSV is drawn
        around them.
    dvids
        Concentration measures to write: 1 CAR-NK flow (cells/µL), 2 B cells (cells/µL), 3 CAR qPCR
        (copies/µg gDNA). Clinical scores (DVID 10, 11, 12) are always written.
    covariates
        Write AGE (years), SEX (0/1, 1 female) and WT (kg) columns.
    follow_up
        Days of follow-up: None draws each subject's like the trial (median 5 months, 1–12), a number
        fixes it for all, a sequence gives one per subject. Only observations up to it are written.
    bsv
        ``"file"``: between-subject variability on every parameter the file gives a ``bsv.sd``;
        ``"estimated"``: only on those a fit estimates (``bsv.estimate = true``), so the cohort comes
        from the same statistical model a fit assumes (a parameter-recovery design). The same seed
        draws the same deviations either way.
    clinical, design
        Generator constants (default :meth:`ClinicalGenerator.from_model`, :class:`CohortDesign`).

    Returns
    -------
    (Cohort, xarray.Dataset)
        The cohort (``synthetic`` True) and the truth per subject on dim ``subject`` (indexed by ID):
        parameters, derived metrics (``DA`` days, ``reconstitution_day`` days, …), ``p_response``,
        ``response`` (0/1), ``follow_up`` (days), covariates and clinical baseline values.

    Raises
    ------
    ValueError
        For unknown dose levels or DVIDs, counts that do not add up, or follow-up ≤ 0.
    """
    from carnk_pkpd import __version__
    from carnk_pkpd.data import Cohort
    from carnk_pkpd.population import individual_parameters
    from carnk_pkpd.structural import derived_metrics, simulate

    spec = _load_spec(model)
    gen = clinical if clinical is not None else ClinicalGenerator.from_model(spec)
    design = design if design is not None else CohortDesign()
    allocation = allocate_dose_levels(spec, dose_levels, n_subjects)
    dvid_set = _check_dvids(spec, dvids)
    keys = [k for k, c in allocation.items() for _ in range(c)]
    n = len(keys)
    rng = np.random.default_rng(seed)

    # 1. structural parameters from the population layer: the file's typical values (or ``truth``) and
    # BSV, with this cohort's own stream of standardised deviations (one per subject and parameter)
    typical = spec.typical()
    for name, value in dict(truth or {}).items():
        if name not in typical:
            raise ValueError(f"truth: unknown parameter {name!r} (known: {', '.join(typical)})")
        if not (isinstance(value, (int, float, np.number)) and math.isfinite(float(value)) and value > 0):
            raise ValueError(f"truth: {name} must be a finite number > 0 (found {value!r})")
        typical[name] = float(value)
    if bsv not in ("file", "estimated"):
        raise ValueError(f"bsv must be 'file' or 'estimated', got {bsv!r}")
    names = list(typical)
    eta = rng.standard_normal((n, len(names)))
    n_transit = int(round(typical["n_transit"]))

    # 2. covariates and follow-up (always drawn, so other draws do not depend on the options)
    age = np.clip(np.rint(rng.normal(design.age_mean, design.age_sd, n)), *design.age_range)
    sex = (rng.random(n) < design.female).astype(float)
    wt = np.round(np.clip(rng.normal(design.wt_mean, design.wt_sd, n), *design.wt_range), 1)
    months = draw_follow_up_months(rng, n, design)
    fu = _follow_up_days(follow_up, months)
    pop, sub_design = _population_and_design(spec, typical, bsv, keys, {"AGE": age, "SEX": sex, "WT": wt})
    z = {name: eta[None, :, j] for j, name in enumerate(names) if name != "n_transit"}
    theta_pd = individual_parameters(pop, sub_design, None, z=z)
    params: dict[str, np.ndarray] = {name: v[0] for name, v in theta_pd.items()}

    # 3. clinical latent values
    u_response = rng.random(n)
    latent: dict[str, np.ndarray] = {
        "sledai0": np.maximum(rng.normal(gen.sledai0_mean, gen.sledai0_sd, n), gen.sledai0_min),
        "residual": rng.uniform(*gen.nonresponder_residual, n),
        "pred_start": rng.uniform(*gen.pred_start, n),
        "pred_halflife": gen.pred_halflife * np.exp(gen.pred_halflife_log_sd * rng.standard_normal(n)),
        "pred_target_r": rng.uniform(*gen.pred_target_responder, n),
        "pred_target_nr": rng.uniform(*gen.pred_target_nonresponder, n),
        "dsdna": rng.random(n) < gen.dsdna_positive,
        "low_c": rng.random(n) < gen.low_complement,
        "clears_r": rng.random((n, 2)) < gen.serology_clear_responder,
        "clears_nr": rng.random((n, 2)) < gen.serology_clear_nonresponder,
        "clear_day": rng.uniform(*gen.serology_clear_days, (n, 2)),
    }

    # 4. regimens and schedules
    sim = spec.simulation
    regimens = {k: spec.dose_levels[k].doses() for k in allocation}
    car_days = {k: _car_schedule(sim, [t for t, _ in regimens[k]]) for k in allocation}
    b_days = _bcell_schedule(sim)
    clin_days = _clinical_schedule(sim)
    doses = [regimens[k] for k in keys]
    all_times = np.unique(np.concatenate([b_days, *car_days.values()]))

    # 5. structural model and derived metrics (the truth), with each subject's LD window
    theta = {**params, "n_transit": np.full(n, n_transit)}
    ld = sub_design.ld(spec)
    paths = simulate(theta, doses, all_times, spec, ld=ld)
    car_path = np.atleast_2d(paths["car"].values)
    b_path = np.atleast_2d(paths["bcell"].values)
    ev = spec.events
    metrics = derived_metrics(
        theta,
        doses,
        spec,
        reappearance_threshold=float(ev["reappearance_threshold"]),
        reconstitution_threshold=float(ev["reconstitution_threshold"]),
        aplasia_threshold=float(ev["aplasia_threshold"]),
        aplasia_window=(float(ev["aplasia_window"][0]), float(ev["aplasia_window"][1])),
        ld=ld,
    )
    from carnk_pkpd.remission import link_values  # the one place "never happens" becomes a number

    rem = spec.remission
    metric = str(rem.get("metric", "DA"))
    x = link_values({k: np.atleast_1d(metrics[k].values) for k in metrics.data_vars}, metric, ev)
    x = np.where(np.isfinite(x), x, float(ev["aplasia_window"][1]))  # DA is always finite; kept as a guard
    logit = float(rem["theta0"]) + float(rem["theta1"]) * (x - float(rem["center"])) / float(rem["scale"])
    p_response = 1.0 / (1.0 + np.exp(-logit))
    latent["response"] = u_response < p_response

    # 6. observations, subject by subject (noise drawn for the full schedule, then cut at follow-up)
    obs_spec = spec.observations
    sig_car = obs_spec[_OBS_CAR].sigma["log"] if _OBS_CAR in obs_spec else 0.0
    sig_b = obs_spec[_OBS_B].sigma if _OBS_B in obs_spec else {"prop": 0.0, "add": 0.0}
    qpcr = obs_spec.get(_OBS_QPCR)
    sig_q = qpcr.sigma["log"] if qpcr is not None else 0.0
    per_copy = qpcr.conversion.typical if qpcr is not None and qpcr.conversion is not None else 0.0
    index = {t: j for j, t in enumerate(all_times)}
    rows: list[tuple[Any, ...]] = []
    ids = [str(i + 1) for i in range(n)]
    for i in range(n):
        k = keys[i]
        cd = car_days[k]
        e_car = rng.standard_normal(cd.size)
        e_bp = rng.standard_normal(b_days.size)
        e_ba = rng.standard_normal(b_days.size)
        e_q = rng.standard_normal(cd.size)
        e_pga = rng.standard_normal(clin_days.size)
        add = _SubjectRows(ids[i], _file_label(k), (age[i], sex[i], wt[i]) if covariates else ())
        for t in sim["ld_days"]:
            add(float(t), 2, 0.0, 0, math.nan, 1, 0, math.nan)
        for t, amt in regimens[k]:
            add(float(t), 1, float(amt), _OBS_CAR, math.nan, 1, 0, math.nan)
        car_true = car_path[i, [index[t] for t in cd]]
        if _OBS_CAR in dvid_set:
            y = _round_sig(car_true * np.exp(sig_car * e_car))
            _censored(add, cd, y, obs_spec[_OBS_CAR].lloq, _OBS_CAR, fu[i])
        if _OBS_QPCR in dvid_set:
            y = _round_sig(car_true * per_copy * np.exp(sig_q * e_q))
            _censored(add, cd, y, obs_spec[_OBS_QPCR].lloq, _OBS_QPCR, fu[i])
        if _OBS_B in dvid_set:
            b_true = b_path[i, [index[t] for t in b_days]]
            y = b_true * (1.0 + sig_b["prop"] * e_bp) + sig_b["add"] * e_ba
            y = _round_sig(np.maximum(y, 0.0))
            _censored(add, b_days, y, obs_spec[_OBS_B].lloq, _OBS_B, fu[i])
        course = _clinical_course(gen, latent, i, clin_days, e_pga)
        doris, lldas, sledai = score_visits(
            course["clinical"], course["serology"], course["pga"], course["pred"]
        )
        for j, t in enumerate(clin_days):
            if t > fu[i]:
                continue
            add(float(t), 0, 0.0, _DORIS, float(doris[j]), 0, 0, math.nan)
            add(float(t), 0, 0.0, _LLDAS, float(lldas[j]), 0, 0, math.nan)
            add(float(t), 0, 0.0, _SLEDAI, float(sledai[j]), 0, 0, math.nan)
        rows.extend(add.records())

    columns = ["ID", "TIME", "EVID", "AMT", "DVID", "DV", "MDV", "BLQ", "LLOQ", "DL"]
    if covariates:
        columns += ["AGE", "SEX", "WT"]
    df = pd.DataFrame(rows, columns=columns)
    mix = ", ".join(f"DL{_file_label(k)} {c}" for k, c in allocation.items())
    regimen_text = "; ".join(
        f"DL{_file_label(k)} {_num(spec.dose_levels[k].dose)}x10^9 cells x{spec.dose_levels[k].n_infusions} "
        f"every {_num(spec.dose_levels[k].interval)} d"
        for k in allocation
    )
    comments = (
        f"SYNTHETIC: simulated by carnk_pkpd {__version__} from model {spec.name}, seed {seed}; not trial data.",
        f"Dose-level mix (subjects): {mix}. Regimens: {regimen_text}.",
        "All numbers (cell counts, B cells, scores, covariates, follow-up) are simulated, none are measured.",
    )
    cohort = Cohort.from_dataframe(df, comments=comments)

    truth_ds = _truth_dataset(
        ids, [_file_label(k) for k in keys], params, metrics, p_response, latent, fu, age, sex, wt, spec, seed
    )
    truth_ds.attrs.update(remission_metric=metric, carnk_pkpd_version=__version__)
    return cohort, truth_ds


def _population_and_design(
    spec: ModelSpec,
    typical: Mapping[str, float],
    bsv: str,
    keys: list[str],
    covariates: Mapping[str, np.ndarray],
) -> tuple[Any, Any]:
    """One population draw at ``typical`` with the file's BSV (``bsv="file"``: every parameter with
    ``bsv.sd > 0``, as a fit with OMEGA FIX models it; ``"estimated"``: only those the fit estimates),
    and the design of the cohort's subjects (their dose level's regimen, the trial's LD, their
    covariates, which also centre covariate effects as a fit of this cohort would)."""
    from carnk_pkpd.population import PopulationDraws, SubjectDesign, concat_designs
    from carnk_pkpd.regimen import Regimen

    parts = []
    for k in keys:
        dl = spec.dose_levels[k]
        parts.append(SubjectDesign.from_regimen(spec, Regimen.from_dose_level(dl), 1, dose_level=k))
    design = concat_designs(parts)
    design = dataclasses.replace(design, covariates={k: np.asarray(v, float) for k, v in covariates.items()})
    pop = PopulationDraws.from_model(spec, 1, reference_design=design)
    typ = {k: np.full(1, float(v)) for k, v in typical.items() if k != "n_transit"}
    omega = dict(pop.omega)
    if bsv == "estimated":
        omega = {k: v for k, v in omega.items() if spec.parameters[k].bsv_estimate}
    return dataclasses.replace(pop, typical=typ, omega=omega), design


class _SubjectRows:
    """Records of one subject; called like ``add(TIME, EVID, AMT, DVID, DV, MDV, BLQ, LLOQ)``."""

    def __init__(self, sid: str, label: str, covariates: tuple[float, ...]) -> None:
        self.sid, self.label, self.covariates = sid, label, covariates
        self._rows: list[tuple[Any, ...]] = []

    def __call__(
        self, time: float, evid: int, amt: float, dvid: int, dv: float, mdv: int, blq: int, lloq: float
    ) -> None:
        self._rows.append((time, evid, amt, dvid, dv, mdv, blq, lloq))

    def records(self) -> list[tuple[Any, ...]]:
        """Rows in time order; at one time observations (by DVID) come before the dose (pre-dose)."""
        ordered = sorted(self._rows, key=lambda r: (r[0], 1 if r[1] == 1 else 0, r[3]))
        return [(self.sid, *r[:8], self.label, *self.covariates) for r in ordered]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _censored(add: Any, days: np.ndarray, y: np.ndarray, lloq: float, dvid: int, follow_up: float) -> None:
    """Write observations up to follow-up; below LLOQ as BLQ=1 with DV = LLOQ."""
    for t, v in zip(days, y, strict=True):
        if t > follow_up:
            continue
        if v < lloq:
            add(float(t), 0, 0.0, dvid, float(lloq), 0, 1, float(lloq))
        else:
            add(float(t), 0, 0.0, dvid, float(v), 0, 0, float(lloq))


def _check_dvids(spec: ModelSpec, dvids: Sequence[int]) -> set[int]:
    out: set[int] = set()
    for d in dvids:
        if isinstance(d, bool) or int(d) != d or int(d) not in (_OBS_CAR, _OBS_B, _OBS_QPCR):
            raise ValueError(f"dvids: {d!r} is not a concentration measure (expected 1, 2 or 3)")
        if int(d) not in spec.observations:
            raise ValueError(f"dvids: model {spec.name!r} has no [observations.{int(d)}] table")
        out.add(int(d))
    if _OBS_QPCR in out and spec.observations[_OBS_QPCR].conversion is None:
        raise ValueError(f"dvids: model {spec.name!r} gives no observations.3.copies_per_cell for qPCR")
    return out


def _truth_dataset(
    ids: list[str],
    labels: list[str],
    params: Mapping[str, np.ndarray],
    metrics: xr.Dataset,
    p_response: np.ndarray,
    latent: Mapping[str, np.ndarray],
    follow_up: np.ndarray,
    age: np.ndarray,
    sex: np.ndarray,
    wt: np.ndarray,
    spec: ModelSpec,
    seed: int,
) -> xr.Dataset:
    import xarray as xr

    dim = "subject"
    data: dict[str, Any] = {"DL": (dim, np.array(labels, dtype=object))}
    for name, value in params.items():
        data[name] = (dim, value, {"units": spec.parameters[name].unit, "long_name": "true individual value"})
    for name in metrics.data_vars:
        data[str(name)] = (dim, np.atleast_1d(metrics[name].values), dict(metrics[name].attrs))
    data["p_response"] = (dim, p_response, {"units": "1", "long_name": "probability of complete response"})
    data["response"] = (dim, latent["response"].astype(np.int64), {"units": "0/1", "long_name": "CR_i"})
    data["follow_up"] = (dim, follow_up, {"units": "days"})
    data["AGE"] = (dim, age, {"units": "years"})
    data["SEX"] = (dim, sex, {"units": "0 male, 1 female"})
    data["WT"] = (dim, wt, {"units": "kg"})
    data["sledai0"] = (dim, latent["sledai0"], {"units": "score", "long_name": "baseline clinical SLEDAI"})
    data["pred_start"] = (dim, latent["pred_start"], {"units": "mg/d", "long_name": "baseline prednisone"})
    units = {name: spec.parameters[name].unit for name in params}
    return xr.Dataset(
        data,
        coords={dim: np.array(ids, dtype=object)},
        attrs={"model": spec.name, "seed": int(seed), "synthetic": 1, "units": str(units)},
    )


# --------------------------------------------------------------------------------------------------
# Calibration check
# --------------------------------------------------------------------------------------------------


def calibration_summary(cohort: Cohort, truth: xr.Dataset) -> dict[str, Any]:
    """Figures to compare with science.md §4 calibration targets.

    Median and IQR of the true reconstitution day (B ≥ 10/µL, days) and the fractions in DORIS / LLDAS
    at the month-6 (day 180) and month-12 (day 365) visits among subjects observed then, and the
    fraction of complete responders.
    """
    df = cohort.to_dataframe()
    recon = np.asarray(truth["reconstitution_day"].values, float)
    finite = recon[np.isfinite(recon)]
    out: dict[str, Any] = {
        "reconstitution_day_median": float(np.median(finite)) if finite.size else math.nan,
        "reconstitution_day_iqr": tuple(float(q) for q in np.percentile(finite, [25, 75]))
        if finite.size
        else (math.nan, math.nan),
        "never_reconstituted": float(np.mean(~np.isfinite(recon))),
        "response": float(np.mean(truth["response"].values)),
    }
    for tag, day in (("6m", 180.0), ("12m", 365.0)):
        for name, dvid in (("doris", _DORIS), ("lldas", _LLDAS)):
            sel = df[(df["DVID"] == dvid) & (df["TIME"] == day) & (df["EVID"] == 0)]
            out[f"{name}_{tag}"] = float(sel["DV"].mean()) if len(sel) else math.nan
            out[f"n_{tag}"] = len(sel)
    return out
