"""Model files: load, check and write the TOML files under ``models/``.

A model file declares every parameter of the structural model (science.md §4) with its unit, typical
value, bounds, prior, between-subject variability (BSV) and the basis of its value, plus the residual
error of each observation type (DVID), covariate effects, dose levels, the remission link, the sampling
schedule and the event thresholds. ``models/README.md`` documents the format key by key.

Example::

    spec = load_model("reference")                 # models/reference.toml
    spec.typical()["k_rej"]                        # 0.15 /d
    faster = spec.replace_typical(k_rej=0.2)       # prior mu follows: log(0.2)
    save_model(faster, "models/faster_rejection.toml")

Every problem in a file is collected and reported at once in one :class:`ModelFileProblems` (a
:class:`~carnk_pkpd.errors.ModelFileError`), one line per problem, each naming the file and the dotted key.
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carnk_pkpd.errors import ModelFileError

__all__ = [
    "BASES",
    "PARAMETER_INFO",
    "STRUCTURES",
    "STRUCTURE_PARAMETERS",
    "CovariateSpec",
    "DoseLevelSpec",
    "ModelFileProblems",
    "ModelSpec",
    "ObservationSpec",
    "ParameterSpec",
    "ScalarSpec",
    "available_models",
    "dump_toml",
    "load_model",
    "model_dirs",
    "resolve_model",
    "save_model",
]

# --------------------------------------------------------------------------------------------------
# What a model file may contain
# --------------------------------------------------------------------------------------------------

STRUCTURES: tuple[str, ...] = ("reference", "stein")
BASES: tuple[str, ...] = ("assumed", "published", "tuned")


@dataclass(frozen=True)
class _ParamInfo:
    unit: str  # canonical unit, as written in the shipped files
    kind: str  # "rate" | "positive" | "fraction" | "nonnegative" | "integer"
    label: str  # plain words


PARAMETER_INFO: dict[str, _ParamInfo] = {
    "f_bl": _ParamInfo("1", "fraction", "fraction of infused cells seen in blood"),
    "rho": _ParamInfo("/d", "rate", "surge-driven expansion rate"),
    "k_h": _ParamInfo("/d", "rate", "decay rate of the lymphodepletion (IL-15) surge"),
    "alpha": _ParamInfo("/d", "rate", "intrinsic loss rate of CAR-NK cells"),
    "k_rej": _ParamInfo("/d", "rate", "maximal allogeneic rejection rate"),
    "k_rec": _ParamInfo("/d", "rate", "rate of host lymphocyte recovery driving rejection"),
    "B0": _ParamInfo("cells/µL", "positive", "baseline CD19+ B cells in blood"),
    "k_B": _ParamInfo("/d", "rate", "loss rate of blood B cells"),
    "MTT": _ParamInfo("d", "positive", "mean transit time of the B-lineage precursor chain"),
    "n_transit": _ParamInfo("1", "integer", "number of transit compartments"),
    "F_max": _ParamInfo("1", "nonnegative", "maximal homeostatic boost of B-cell production"),
    "k_kmax": _ParamInfo("/d", "rate", "maximal CAR-NK killing rate of CD19+ cells"),
    "EC50": _ParamInfo("cells/µL", "positive", "CAR-NK count giving half-maximal killing"),
    "f_BM": _ParamInfo("1", "nonnegative", "relative CAR-NK killing of CD19+ precursors (P2..Pn)"),
    "k_LD0": _ParamInfo("/d", "rate", "lymphodepletion kill rate during days -5..-3"),
    "k_LDd": _ParamInfo("/d", "rate", "decay rate of the lymphodepletion kill after day -3"),
    "V_bl": _ParamInfo("µL", "positive", "blood volume"),
    "T_exp": _ParamInfo("d", "positive", "days of expansion after each infusion"),
    "beta": _ParamInfo("/d", "rate", "loss rate of persisting CAR-NK cells"),
    "F_mem": _ParamInfo("1", "fraction", "fraction of cells that persist"),
}

_B_LINEAGE_PARAMETERS = (
    "B0",
    "k_B",
    "MTT",
    "n_transit",
    "F_max",
    "k_kmax",
    "EC50",
    "f_BM",
    "k_LD0",
    "k_LDd",
    "V_bl",
)
STRUCTURE_PARAMETERS: dict[str, tuple[str, ...]] = {
    # science.md §4: surge-driven expansion, intrinsic loss and allogeneic rejection
    "reference": ("f_bl", "rho", "k_h", "alpha", "k_rej", "k_rec", *_B_LINEAGE_PARAMETERS),
    # Stein et al. 2019: expansion for T_exp days after each infusion, then effectors and persisting cells
    "stein": ("f_bl", "rho", "T_exp", "alpha", "beta", "F_mem", *_B_LINEAGE_PARAMETERS),
}

# DVID -> (name, unit, residual error model, residual components)
_DVIDS: dict[int, tuple[str, str, str]] = {
    1: ("car_flow", "cells/µL", "lognormal"),
    2: ("bcell_flow", "cells/µL", "combined"),
    3: ("car_qpcr", "copies/µg", "lognormal"),
}
_ERROR_COMPONENTS = {"lognormal": ("log",), "combined": ("prop", "add")}

_PARAMETER_DISTS = ("LogNormal", "Normal", "HalfNormal", "Beta", "Fixed")
_SIGMA_DISTS = ("HalfNormal", "LogNormal")
# dist -> (required arguments, optional arguments)
_PRIOR_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "LogNormal": (("sigma",), ("mu",)),
    "Normal": (("sigma",), ("mu",)),
    "HalfNormal": (("sigma",), ()),
    "Beta": (("alpha", "beta"), ()),
    "Fixed": ((), ()),
}

_TOP_KEYS = (
    "model",
    "lymphodepletion",
    "parameters",
    "observations",
    "covariates",
    "dose_levels",
    "remission",
    "simulation",
    "events",
)
_MODEL_KEYS = ("name", "structure", "description", "source")
_PARAM_KEYS = (
    "unit",
    "typical",
    "bounds",
    "prior",
    "bsv",
    "dose_level_tier",
    "fixed",
    "basis",
    "source",
    "description",
)
_BSV_KEYS = ("sd", "estimate", "prior", "note")
_OMEGA_DISTS = ("HalfNormal", "LogNormal")
_OBS_KEYS = ("name", "unit", "error", "lloq", "sigma", "copies_per_cell", "description")
_SCALAR_KEYS = ("typical", "unit", "prior", "estimate", "basis", "source")
_COVARIATE_KEYS = ("parameter", "covariate", "form", "center", "reference", "prior")
_COVARIATE_FORMS = ("power", "linear", "categorical")
_DOSE_LEVEL_KEYS = ("dose", "interval", "n_infusions", "n_subjects", "basis", "source")
_REMISSION_METRICS = (
    "DA",
    "b_nadir",
    "car_auc_0_28",
    "car_cmax",
    "reappearance_day",
    "reconstitution_day",
)

# Defaults for the optional tables, all from science.md §4 ([assumed] unless stated).
_REMISSION_DEFAULTS: dict[str, Any] = {
    "metric": "DA",
    "theta0": 0.5,
    "theta1": 1.0,
    "center": 55.0,
    "scale": 15.0,
    "basis": "assumed",
    "source": "science.md §4 remission link",
}
_SIMULATION_DEFAULTS: dict[str, Any] = {
    "screening_day": -14.0,
    "ld_days": [-5.0, -4.0, -3.0],
    "car_days": [1.0, 2.0, 4.0, 7.0, 10.0, 14.0, 21.0, 28.0, 35.0, 42.0, 56.0, 90.0],
    "car_predose": True,
    "predose_offset": 0.041667,
    "bcell_days": [-14.0, -2.0, 0.0, 3.0, 7.0, 14.0, 21.0, 28.0, 42.0, 56.0, 70.0, 84.0, 120.0, 150.0, 180.0]
    + [270.0, 365.0],
    "bcell_days_extended": [455.0, 545.0],
    "clinical_days": [-14.0, 28.0, 60.0, 90.0, 120.0, 150.0, 180.0, 270.0, 365.0],
    "basis": "assumed",
    "source": "science.md §4 observations (schedule)",
}
_SIMULATION_LISTS = ("ld_days", "car_days", "bcell_days", "bcell_days_extended", "clinical_days")
_EVENTS_DEFAULTS: dict[str, Any] = {
    "reappearance_threshold": 1.0,
    "reconstitution_threshold": 10.0,
    "aplasia_threshold": 1.0,
    "aplasia_window": [0.0, 180.0],
    "basis": "assumed",
    "source": "science.md §4 derived events",
}

#: How lymphodepletion (LD) shapes the CAR-NK kinetics (reference structure). ``surge``: the IL-15
#: surge ρ·e^(−k_h (t − t_s)) is multiplied by the regimen's LD intensity (``"scaled"``: no LD, no
#: surge) or not (``"independent"``); its time origin t_s is the last LD day + ``surge_delay`` days
#: (3 in the trial: LD ends on day −3, first infusion on day 0). ``rejection_onset``: rejection grows
#: as k_rej·(1 − d·e^(−k_rec (t − t_LD_end))) with d = min(LD intensity, 1), the fraction of host
#: lymphocytes depleted (``"scaled"``: without LD rejection acts in full from the first infusion), or
#: with d = 1 whatever the LD (``"independent"``). The LD kill k_LD0 always scales with the intensity.
_LD_MODES = ("scaled", "independent")
_LYMPHODEPLETION_DEFAULTS: dict[str, Any] = {
    "surge": "scaled",
    "rejection_onset": "scaled",
    "surge_delay": 3.0,
    "basis": "assumed",
    "source": "Kochenderfer et al. 2017 (Cy/Flu raises IL-15, which drives early expansion of infused "
    "cells); host lymphocyte recovery after LD drives allogeneic rejection (science.md §2, §4)",
}

#: ``models/`` of a source checkout (``src/carnk_pkpd/spec.py`` -> ``models/``): the canonical files.
_REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
#: The same files shipped inside the package (``carnk_pkpd/models/``; pyproject maps
#: ``carnk_pkpd.models`` to the top-level ``models/``, so there is one copy in the repository).
_PACKAGE_MODELS = Path(__file__).resolve().parent / "models"
_MU_TOLERANCE = 1e-6  # |mu - log(typical)| below which a LogNormal mu counts as derived from typical


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class ModelFileProblems(ModelFileError):
    """All problems found in one model file; ``.problems`` lists each as a :class:`ModelFileError`.

    The message has one line per problem: ``FILE: dotted.key: what is wrong (found …, expected …)``.
    """

    def __init__(self, file: str, problems: list[ModelFileError]):
        self.problems = list(problems)
        self.file = file
        self.key = self.problems[0].key if len(self.problems) == 1 else None
        ValueError.__init__(self, "\n".join(str(p) for p in self.problems))


class _Collector:
    """Collects problems of one file; raises them together."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[ModelFileError] = []

    def add(self, key: str | None, message: str) -> None:
        self.problems.append(ModelFileError(self.file, key, message))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ModelFileProblems(self.file, self.problems)


def _hint(word: str, choices: Any) -> str:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_keys(col: _Collector, prefix: str, table: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            col.add(
                f"{prefix}.{key}" if prefix else key,
                f"unknown key{_hint(key, allowed)} (expected one of {', '.join(allowed)})",
            )


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fmt(x: Any) -> str:
    return repr(x) if isinstance(x, str) else str(x)


# --------------------------------------------------------------------------------------------------
# The parsed objects
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterSpec:
    """One structural parameter.

    ``typical`` is in ``unit`` (e.g. /d, cells/µL, d); ``bsv_sd`` is the log-scale SD of
    between-subject variability (0 = none); ``prior`` is a dict with ``dist`` and its arguments, with
    ``mu`` filled in (``log(typical)`` for LogNormal unless the file says otherwise).
    """

    name: str
    unit: str
    typical: float
    bounds: tuple[float, float]
    prior: dict[str, Any]
    bsv_sd: float
    bsv_estimate: bool
    dose_level_tier: bool
    fixed: bool
    basis: str
    source: str
    description: str
    #: prior of an estimated BSV SD (omega): the file's ``bsv.prior`` (LogNormal ``mu`` defaults to
    #: ``log(sd)``), else ``HalfNormal(sigma = max(sd, 0.1))``; None when omega is not estimated
    bsv_prior: dict[str, Any] | None = None


@dataclass(frozen=True)
class ScalarSpec:
    """A scalar that is not a structural parameter: a residual SD or the qPCR conversion factor."""

    name: str
    unit: str
    typical: float
    prior: dict[str, Any] | None
    estimate: bool
    basis: str
    source: str


@dataclass(frozen=True)
class ObservationSpec:
    """One observation type (DVID) with its residual error and lower limit of quantification.

    ``error`` is ``"lognormal"`` (``residual["log"]``: SD of log DV) or ``"combined"``
    (``residual["prop"]``: proportional SD, ``residual["add"]``: additive SD in ``unit``). ``lloq`` is in
    ``unit``; values below it are censored (M3). ``conversion`` (DVID 3 only) is copies/µg gDNA per
    CAR-NK cell/µL.
    """

    dvid: int
    name: str
    unit: str
    error: str
    lloq: float
    residual: dict[str, ScalarSpec]
    conversion: ScalarSpec | None = None
    description: str = ""

    @property
    def sigma(self) -> dict[str, float]:
        """Typical residual SDs by component (``log``, or ``prop`` and ``add``)."""
        return {k: v.typical for k, v in self.residual.items()}

    @property
    def sigma_prior(self) -> dict[str, dict[str, Any] | None]:
        """Prior of each residual SD component."""
        return {k: v.prior for k, v in self.residual.items()}

    @property
    def estimate(self) -> bool:
        """True when any residual component is estimated."""
        return any(v.estimate for v in self.residual.values())


@dataclass(frozen=True)
class CovariateSpec:
    """A covariate effect on a parameter's typical value.

    ``power``: θ·(cov/center)^β; ``linear``: θ·(1 + β·(cov − center)); ``categorical``: θ·exp(β_level)
    with β = 0 at ``reference``. ``center`` is ``"median"``, ``"mean"`` (over the cohort) or a number.
    ``prior`` is the prior of β (default Normal(0, 1)).
    """

    parameter: str
    covariate: str
    form: str
    center: str | float | None
    reference: str | float | None
    prior: dict[str, Any]


@dataclass(frozen=True)
class DoseLevelSpec:
    """A dose level: ``dose`` 10⁹ CAR-NK cells per infusion, ``interval`` days, ``n_infusions``."""

    label: str
    dose: float
    interval: float
    n_infusions: int
    n_subjects: int | None
    basis: str
    source: str

    def doses(self, start: float = 0.0) -> list[tuple[float, float]]:
        """Infusions as ``(time in days, amount in 10⁹ cells)``, the first at ``start``."""
        return [(start + i * self.interval, self.dose) for i in range(self.n_infusions)]


@dataclass(frozen=True)
class ModelSpec:
    """A checked model file. Treat its mappings as read-only; use :meth:`replace_typical` for changes.

    ``raw`` is the parsed TOML and ``text`` the file contents (or the TOML written for a spec made in
    memory); ``source_file`` is ``None`` for a spec made by :meth:`replace_typical`.
    """

    name: str
    structure: str
    description: str
    source_file: Path | None
    parameters: dict[str, ParameterSpec]
    observations: dict[int, ObservationSpec]
    covariates: list[CovariateSpec]
    dose_levels: dict[str, DoseLevelSpec]
    remission: dict[str, Any]
    simulation: dict[str, Any]
    events: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)
    text: str = field(repr=False)
    lymphodepletion: dict[str, Any] = field(default_factory=lambda: dict(_LYMPHODEPLETION_DEFAULTS))

    def __repr__(self) -> str:
        return (
            f"ModelSpec(name={self.name!r}, structure={self.structure!r}, source_file={self.source_file!r}, "
            f"{len(self.parameters)} parameters, DVIDs {sorted(self.observations)})"
        )

    def __hash__(self) -> int:
        return hash((self.name, self.structure, self.text))

    def typical(self) -> dict[str, float]:
        """Typical value of every parameter, in its unit (n_transit as an int)."""
        return {name: p.typical for name, p in self.parameters.items()}

    def bsv_sd(self) -> dict[str, float]:
        """Log-scale BSV SD of every parameter as in the file (0 where none); used when simulating."""
        return {name: p.bsv_sd for name, p in self.parameters.items()}

    def estimated_bsv(self) -> list[str]:
        """Parameters whose BSV is estimated in fits."""
        return [name for name, p in self.parameters.items() if p.bsv_estimate]

    def free_parameters(self) -> list[str]:
        """Parameters that are not fixed (their typical value has a prior in fits)."""
        return [name for name, p in self.parameters.items() if not p.fixed]

    def fixed_parameters(self) -> list[str]:
        """Parameters fixed at their typical value in fits."""
        return [name for name, p in self.parameters.items() if p.fixed]

    def replace_typical(self, **values: float) -> ModelSpec:
        """A new spec with other typical values (same units as the file).

        A LogNormal or Normal prior whose ``mu`` was derived from the typical value (absent, or equal
        to ``log(typical)`` / ``typical``) follows the new value; an explicit different ``mu`` is kept.

        Raises
        ------
        ValueError
            For an unknown parameter name.
        ModelFileError
            When a new value breaks the file's rules (outside bounds, zero rate, non-integer n_transit).
        """
        raw = copy.deepcopy(self.raw)
        params = raw.get("parameters", {})
        for name, value in values.items():
            if name not in params:
                raise ValueError(f"unknown parameter {name!r}{_hint(name, params)} in model {self.name!r}")
            table = params[name]
            old = table.get("typical")
            if PARAMETER_INFO[name].kind == "integer" and _is_number(value) and float(value).is_integer():
                new: float | int = int(value)
            elif _is_number(value):
                new = float(value)
            else:
                raise ValueError(f"typical value of {name!r} must be a number (found {value!r})")
            table["typical"] = new
            prior = table.get("prior")
            if isinstance(prior, dict) and "mu" in prior and _is_number(old):
                if (
                    prior.get("dist") == "LogNormal"
                    and old > 0
                    and abs(prior["mu"] - math.log(old)) <= _MU_TOLERANCE
                ):
                    prior["mu"] = math.log(new) if new > 0 else prior["mu"]
                elif prior.get("dist") == "Normal" and abs(prior["mu"] - old) <= _MU_TOLERANCE * max(
                    1.0, abs(old)
                ):
                    prior["mu"] = float(new)
        origin = str(self.source_file) if self.source_file else self.name
        text = dump_toml(raw)
        return _build_spec(raw, text, f"<{origin} with new typical values>", None)


# --------------------------------------------------------------------------------------------------
# Finding and reading files
# --------------------------------------------------------------------------------------------------


def _packaged_models() -> Path | None:
    """``carnk_pkpd/models`` inside an installed package (found with ``importlib.resources``)."""
    from importlib import resources

    try:
        folder = resources.files("carnk_pkpd").joinpath("models")
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - carnk_pkpd is always importable here
        return None
    return Path(str(folder)) if isinstance(folder, os.PathLike) else None


def model_dirs() -> list[Path]:
    """Folders searched for a model name: ``$CARNK_PKPD_MODELS`` (os.pathsep-separated), then the
    source checkout's ``models/`` when running from one (``src/`` layout, editable installs), then the
    model files shipped in the package (``carnk_pkpd/models``, via ``importlib.resources``), so that
    ``load_model("reference")`` works from any folder after ``pip install``."""
    dirs: list[Path] = []
    env = os.environ.get("CARNK_PKPD_MODELS", "")
    dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    if Path(__file__).resolve().parent.parent.name == "src" and _REPO_MODELS.is_dir():
        dirs.append(_REPO_MODELS)
    packaged = _packaged_models()
    dirs.append(packaged if packaged is not None else _PACKAGE_MODELS)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def available_models() -> list[str]:
    """Names of the model files (TOML files with a ``[model]`` table) found in :func:`model_dirs`."""
    names: set[str] = set()
    for d in model_dirs():
        if d.is_dir():
            for p in d.glob("*.toml"):
                try:
                    head = p.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if any(line.strip() == "[model]" for line in head.splitlines()):
                    names.add(p.stem)
    return sorted(names)


def resolve_model(path_or_name: str | os.PathLike[str] = "reference") -> Path:
    """The file for a model name (``models/<name>.toml``) or a path.

    A ``Path``, or a string ending in ``.toml`` or containing a path separator, is a path; anything
    else is a name looked up in :func:`model_dirs`.

    Raises
    ------
    ModelFileError
        When the name is not found; the message lists the models available.
    """
    if isinstance(path_or_name, os.PathLike):
        return Path(path_or_name)
    text = str(path_or_name)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        return Path(text)
    for d in model_dirs():
        candidate = d / f"{text}.toml"
        if candidate.is_file():
            return candidate
    names = available_models()
    raise ModelFileError(
        text,
        None,
        f"no model named {text!r}{_hint(text, names)} (available: {', '.join(names) or 'none'}; "
        f"searched {', '.join(str(d) for d in model_dirs())})",
    )


def _display(path: Path) -> str:
    """Path as shown in messages: relative to the repository or the working folder when inside them."""
    resolved = path.resolve()
    for base in (_REPO_MODELS.parent, Path.cwd()):
        try:
            return resolved.relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


def load_model(path_or_name: str | os.PathLike[str] = "reference") -> ModelSpec:
    """Read and check a model file.

    Parameters
    ----------
    path_or_name
        A model name (``"reference"`` resolves to ``models/reference.toml``; see :func:`model_dirs`)
        or the path of a TOML model file.

    Returns
    -------
    ModelSpec

    Raises
    ------
    ModelFileError
        Naming the file and the dotted key of each problem (a :class:`ModelFileProblems` with
        ``.problems`` when the file was read; invalid TOML gives its line and column).
    """
    path = resolve_model(path_or_name)
    shown = _display(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ModelFileError(shown, None, "file not found") from None
    except UnicodeDecodeError as exc:
        raise ModelFileError(shown, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ModelFileError(shown, None, f"cannot read the file ({exc.strerror})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = int(match.group(1)) if match else getattr(exc, "lineno", None)
        detail = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        where = f"line {line}" + (f", column {match.group(2)}" if match else "") if line else "unknown line"
        err = ModelFileProblems(shown, [ModelFileError(shown, None, f"invalid TOML at {where}: {detail}")])
        err.line = line  # type: ignore[attr-defined]
        raise err from None
    return _build_spec(raw, text, shown, path.resolve())


# --------------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------------


def _norm_unit(unit: str) -> str:
    u = unit.strip().replace("µ", "u").replace("μ", "u").replace(" ", "").lower()
    aliases = {
        "1/d": "/d",
        "d^-1": "/d",
        "d-1": "/d",
        "1/day": "/d",
        "/day": "/d",
        "perday": "/d",
        "day": "d",
        "days": "d",
        "": "1",
        "dimensionless": "1",
        "/ul": "cells/ul",
        "copies/ugdna": "copies/ug",
        "copies/uggdna": "copies/ug",
    }
    return aliases.get(u, u)


def _check_number(
    col: _Collector, key: str, value: Any, *, positive: bool = False, nonneg: bool = False
) -> bool:
    if not _is_number(value):
        col.add(key, f"expected a number (found {_fmt(value)})")
        return False
    if not math.isfinite(value):
        col.add(key, f"expected a finite number (found {value})")
        return False
    if positive and value <= 0:
        col.add(key, f"must be positive (found {value}, expected > 0)")
        return False
    if nonneg and value < 0:
        col.add(key, f"must not be negative (found {value}, expected >= 0)")
        return False
    return True


def _check_bool(col: _Collector, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        col.add(key, f"expected true or false (found {_fmt(value)})")
        return False
    return True


def _check_str(col: _Collector, key: str, value: Any) -> bool:
    if not isinstance(value, str):
        col.add(key, f"expected a string (found {_fmt(value)})")
        return False
    return True


def _check_basis(col: _Collector, key: str, table: Mapping[str, Any], required: bool) -> str:
    basis = table.get("basis")
    if basis is None:
        if required:
            col.add(key + ".basis", f"missing (expected one of {', '.join(BASES)})")
        return "assumed"
    if basis not in BASES:
        col.add(
            key + ".basis",
            f"unknown basis{_hint(basis, BASES)} (found {_fmt(basis)}, expected one of {', '.join(BASES)})",
        )
        return "assumed"
    return basis


def _parse_prior(
    col: _Collector, key: str, prior: Any, typical: float | None, dists: tuple[str, ...]
) -> dict[str, Any] | None:
    """Check a prior table and return it with ``mu`` filled in."""
    if not isinstance(prior, dict):
        col.add(
            key,
            f'expected an inline table such as {{ dist = "LogNormal", sigma = 0.2 }} (found {_fmt(prior)})',
        )
        return None
    dist = prior.get("dist")
    if dist is None:
        col.add(key + ".dist", f"missing (expected one of {', '.join(dists)})")
        return None
    if dist not in dists:
        col.add(
            key + ".dist",
            f"unknown prior dist{_hint(dist, dists)} (found {_fmt(dist)}, expected one of {', '.join(dists)})",
        )
        return None
    required, optional = _PRIOR_ARGS[dist]
    _check_keys(col, key, prior, ("dist", *required, *optional))
    out: dict[str, Any] = {"dist": dist}
    ok = True
    if "mu" in optional:
        if "mu" in prior:
            ok &= _check_number(col, key + ".mu", prior["mu"])
            out["mu"] = float(prior["mu"]) if _is_number(prior["mu"]) else None
        elif typical is None:
            ok = False
        elif dist == "LogNormal":
            if typical > 0:
                out["mu"] = math.log(typical)
            else:
                col.add(
                    key + ".mu",
                    f"cannot derive mu = log(typical) from typical {typical} (expected typical > 0)",
                )
                ok = False
        else:
            out["mu"] = float(typical)
    for arg in required:
        if arg not in prior:
            col.add(f"{key}.{arg}", f"missing (a {dist} prior needs {', '.join(required)})")
            ok = False
        elif _check_number(col, f"{key}.{arg}", prior[arg], positive=True):
            out[arg] = float(prior[arg])
        else:
            ok = False
    if dist == "Beta" and typical is not None and not 0 < typical < 1:
        col.add(key + ".dist", f"a Beta prior needs a typical value in (0, 1) (found {typical})")
        ok = False
    return out if ok else None


def _parse_parameter(col: _Collector, name: str, table: Any) -> ParameterSpec | None:
    key = f"parameters.{name}"
    if not isinstance(table, dict):
        col.add(key, f"expected a table [parameters.{name}] (found {_fmt(table)})")
        return None
    _check_keys(col, key, table, _PARAM_KEYS)
    info = PARAMETER_INFO[name]
    n_before = len(col.problems)

    unit = table.get("unit")
    if unit is None:
        col.add(key + ".unit", f"missing (expected {info.unit!r})")
    elif not isinstance(unit, str) or _norm_unit(unit) != _norm_unit(info.unit):
        col.add(key + ".unit", f"unit not supported (found {_fmt(unit)}, expected {info.unit!r})")

    typical = table.get("typical")
    typical_ok = False
    if typical is None:
        col.add(key + ".typical", "missing typical value")
    elif _check_number(col, key + ".typical", typical):
        typical_ok = True
        what = "rate" if info.kind == "rate" else "value"
        if info.kind == "integer":
            if not isinstance(typical, int):
                col.add(
                    key + ".typical", f"non-integer {name} (found {typical}, expected an integer such as 6)"
                )
                typical_ok = False
            elif typical < 1:
                col.add(key + ".typical", f"must be at least 1 (found {typical}, expected an integer >= 1)")
                typical_ok = False
        elif info.kind in ("rate", "positive") and typical <= 0:
            sign = "negative" if typical < 0 else "zero"
            col.add(key + ".typical", f"{sign} {what} (found {typical}, expected > 0)")
            typical_ok = False
        elif info.kind == "fraction" and not 0 < typical <= 1:
            col.add(key + ".typical", f"fraction outside (0, 1] (found {typical}, expected 0 < {name} <= 1)")
            typical_ok = False
        elif info.kind == "nonnegative" and typical < 0:
            col.add(key + ".typical", f"negative value (found {typical}, expected >= 0)")
            typical_ok = False

    bounds = table.get("bounds")
    lo = hi = None
    if bounds is None:
        col.add(key + ".bounds", "missing (expected bounds = [lower, upper])")
    elif (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(_is_number(b) and math.isfinite(b) for b in bounds)
    ):
        col.add(key + ".bounds", f"expected two finite numbers [lower, upper] (found {_fmt(bounds)})")
    elif not bounds[0] < bounds[1]:
        col.add(key + ".bounds", f"lower bound not below upper bound (found {bounds})")
    else:
        lo, hi = float(bounds[0]), float(bounds[1])
        if info.kind in ("rate", "positive", "fraction", "nonnegative", "integer") and lo < 0:
            col.add(key + ".bounds", f"lower bound allows negative values (found {lo}, expected >= 0)")
        if typical_ok and not lo <= typical <= hi:
            col.add(
                key + ".typical", f"typical outside bounds (found {typical}, expected within [{lo}, {hi}])"
            )

    fixed = table.get("fixed")
    if fixed is not None and not _check_bool(col, key + ".fixed", fixed):
        fixed = None

    prior = table.get("prior")
    parsed_prior: dict[str, Any] | None = None
    if prior is None:
        if fixed is not True:
            col.add(
                key + ".prior",
                'missing prior for a non-fixed parameter (expected e.g. prior = { dist = "LogNormal", sigma = 0.2 }, '
                "or fixed = true)",
            )
        parsed_prior = {"dist": "Fixed"}
    else:
        parsed_prior = _parse_prior(
            col, key + ".prior", prior, typical if typical_ok else None, _PARAMETER_DISTS
        )
        if parsed_prior is not None and parsed_prior["dist"] == "Fixed":
            if fixed is False:
                col.add(key + ".fixed", 'fixed = false contradicts prior dist = "Fixed"')
            fixed = True
        elif parsed_prior is not None and fixed is True:
            col.add(
                key + ".prior",
                f'a fixed parameter takes no prior (found dist {parsed_prior["dist"]!r}, expected "Fixed" or none)',
            )
    fixed = bool(fixed)

    bsv = table.get("bsv", {})
    sd, estimate, omega_prior = 0.0, False, None
    if not isinstance(bsv, dict):
        col.add(key + ".bsv", f"expected an inline table {{ sd = 0.5, estimate = true }} (found {_fmt(bsv)})")
    else:
        _check_keys(col, key + ".bsv", bsv, _BSV_KEYS)
        if "sd" in bsv and _check_number(col, key + ".bsv.sd", bsv["sd"], nonneg=True):
            sd = float(bsv["sd"])
        if "estimate" in bsv and _check_bool(col, key + ".bsv.estimate", bsv["estimate"]):
            estimate = bsv["estimate"]
        if "note" in bsv:
            _check_str(col, key + ".bsv.note", bsv["note"])
        if estimate and sd <= 0:
            col.add(key + ".bsv.estimate", "BSV is estimated but sd is 0 (expected sd > 0, the prior scale)")
        if estimate and fixed:
            col.add(
                key + ".bsv.estimate",
                "a fixed parameter cannot have estimated BSV (expected estimate = false)",
            )
        if "prior" in bsv:
            if not estimate:
                col.add(key + ".bsv.prior", "a prior on omega needs estimate = true (omega is fixed at sd)")
            else:
                omega_prior = _parse_prior(
                    col, key + ".bsv.prior", bsv["prior"], sd if sd > 0 else None, _OMEGA_DISTS
                )
        elif estimate and sd > 0:
            omega_prior = {"dist": "HalfNormal", "sigma": max(sd, 0.1)}

    tier = table.get("dose_level_tier", False)
    if not _check_bool(col, key + ".dose_level_tier", tier):
        tier = False
    elif tier and fixed:
        col.add(key + ".dose_level_tier", "a fixed parameter cannot have a dose-level tier")

    basis = _check_basis(col, key, table, required=True)
    source = table.get("source", "")
    if not _check_str(col, key + ".source", source):
        source = ""
    description = table.get("description", info.label)
    if not _check_str(col, key + ".description", description):
        description = info.label

    if len(col.problems) > n_before or parsed_prior is None or lo is None or hi is None:
        return None
    return ParameterSpec(
        name=name,
        unit=unit,
        typical=int(typical) if info.kind == "integer" else float(typical),
        bounds=(lo, hi),
        prior=parsed_prior,
        bsv_sd=sd,
        bsv_estimate=estimate,
        bsv_prior=omega_prior,
        dose_level_tier=tier,
        fixed=fixed,
        basis=basis,
        source=source,
        description=description,
    )


def _parse_scalar(
    col: _Collector, key: str, name: str, table: Any, unit: str | None, dists: tuple[str, ...]
) -> ScalarSpec | None:
    if not isinstance(table, dict):
        col.add(key, f"expected a table with typical, prior, estimate (found {_fmt(table)})")
        return None
    _check_keys(col, key, table, _SCALAR_KEYS)
    n_before = len(col.problems)
    typical = table.get("typical")
    if typical is None:
        col.add(key + ".typical", "missing typical value")
    else:
        _check_number(col, key + ".typical", typical, positive=True)
    estimate = table.get("estimate", False)
    if not _check_bool(col, key + ".estimate", estimate):
        estimate = False
    prior = table.get("prior")
    parsed = None
    if prior is None:
        if estimate:
            col.add(
                key + ".prior", f"missing prior for an estimated value (expected one of {', '.join(dists)})"
            )
    else:
        parsed = _parse_prior(
            col, key + ".prior", prior, typical if _is_number(typical) and typical > 0 else None, dists
        )
    given_unit = table.get("unit", unit or "1")
    if not _check_str(col, key + ".unit", given_unit):
        given_unit = unit or "1"
    basis = _check_basis(col, key, table, required=False)
    source = table.get("source", "")
    if not _check_str(col, key + ".source", source):
        source = ""
    if len(col.problems) > n_before:
        return None
    return ScalarSpec(name, given_unit, float(typical), parsed, estimate, basis, source)


def _parse_observation(col: _Collector, dvid_key: str, table: Any) -> ObservationSpec | None:
    key = f"observations.{dvid_key}"
    try:
        dvid = int(dvid_key)
    except ValueError:
        dvid = -1
    if dvid not in _DVIDS or str(dvid) != dvid_key:
        col.add(
            key, f"unknown DVID (found {dvid_key!r}, expected 1 (car_flow), 2 (bcell_flow) or 3 (car_qpcr))"
        )
        return None
    if not isinstance(table, dict):
        col.add(key, f"expected a table [observations.{dvid_key}] (found {_fmt(table)})")
        return None
    _check_keys(col, key, table, _OBS_KEYS)
    n_before = len(col.problems)
    name, unit, error = _DVIDS[dvid]
    if table.get("name", name) != name:
        col.add(key + ".name", f"DVID {dvid} is {name!r} (found {_fmt(table.get('name'))})")
    given_unit = table.get("unit")
    if given_unit is None:
        col.add(key + ".unit", f"missing (expected {unit!r})")
    elif not isinstance(given_unit, str) or _norm_unit(given_unit) != _norm_unit(unit):
        col.add(key + ".unit", f"unit not supported (found {_fmt(given_unit)}, expected {unit!r})")
    given_error = table.get("error", error)
    if given_error not in _ERROR_COMPONENTS:
        col.add(
            key + ".error",
            f"unknown error model{_hint(given_error, _ERROR_COMPONENTS)} (found {_fmt(given_error)}, expected lognormal or combined)",
        )
        given_error = error
    lloq = table.get("lloq")
    if lloq is None:
        col.add(key + ".lloq", f"missing (expected the LLOQ in {unit})")
    else:
        _check_number(col, key + ".lloq", lloq, positive=True)
    sigma = table.get("sigma")
    residual: dict[str, ScalarSpec] = {}
    components = _ERROR_COMPONENTS[given_error]
    if not isinstance(sigma, dict):
        col.add(
            key + ".sigma",
            f"missing table [{key}.sigma.<component>] (expected components {', '.join(components)})",
        )
    else:
        for comp in sigma:
            if comp not in components:
                col.add(
                    f"{key}.sigma.{comp}",
                    f"unknown residual component{_hint(comp, components)} for {given_error} error (expected {', '.join(components)})",
                )
        for comp in components:
            if comp not in sigma:
                col.add(f"{key}.sigma.{comp}", f"missing residual component for {given_error} error")
                continue
            comp_unit = unit if comp == "add" else "1"
            parsed = _parse_scalar(col, f"{key}.sigma.{comp}", comp, sigma[comp], comp_unit, _SIGMA_DISTS)
            if parsed is not None:
                residual[comp] = parsed
    conversion = None
    if dvid == 3:
        if "copies_per_cell" not in table:
            col.add(key + ".copies_per_cell", "missing conversion factor (copies/µg gDNA per CAR-NK cell/µL)")
        else:
            conversion = _parse_scalar(
                col,
                key + ".copies_per_cell",
                "copies_per_cell",
                table["copies_per_cell"],
                "copies/µg per cells/µL",
                _PARAMETER_DISTS,
            )
    elif "copies_per_cell" in table:
        col.add(key + ".copies_per_cell", "applies to DVID 3 (car_qpcr) only")
    description = table.get("description", "")
    if not _check_str(col, key + ".description", description):
        description = ""
    if len(col.problems) > n_before:
        return None
    return ObservationSpec(
        dvid, name, given_unit, given_error, float(lloq), residual, conversion, description
    )


def _parse_covariate(
    col: _Collector, i: int, table: Any, parameters: tuple[str, ...], fixed: set[str]
) -> CovariateSpec | None:
    key = f"covariates[{i}]"
    if not isinstance(table, dict):
        col.add(key, f"expected a table [[covariates]] (found {_fmt(table)})")
        return None
    _check_keys(col, key, table, _COVARIATE_KEYS)
    n_before = len(col.problems)
    param = table.get("parameter")
    if param is None:
        col.add(key + ".parameter", "missing")
    elif param not in parameters:
        col.add(key + ".parameter", f"unknown parameter{_hint(param, parameters)} (found {_fmt(param)})")
    elif param in fixed:
        col.add(key + ".parameter", f"{param} is fixed; a covariate effect needs a free parameter")
    cov = table.get("covariate")
    if cov is None:
        col.add(key + ".covariate", 'missing (expected a covariate column name such as "DOSE")')
    elif not isinstance(cov, str) or not cov:
        col.add(key + ".covariate", f"expected a column name (found {_fmt(cov)})")
    form = table.get("form")
    if form not in _COVARIATE_FORMS:
        col.add(
            key + ".form",
            f"unknown form{_hint(form, _COVARIATE_FORMS)} (found {_fmt(form)}, expected one of {', '.join(_COVARIATE_FORMS)})",
        )
    center = table.get("center", None if form == "categorical" else "median")
    if form == "categorical" and "center" in table:
        col.add(key + ".center", "a categorical covariate has no center (use reference)")
    elif (
        center is not None
        and center not in ("median", "mean")
        and not (_is_number(center) and math.isfinite(center))
    ):
        col.add(key + ".center", f'expected "median", "mean" or a number (found {_fmt(center)})')
    elif form == "power" and _is_number(center) and center <= 0:
        col.add(key + ".center", f"a power effect needs a positive center (found {center})")
    reference = table.get("reference")
    if reference is not None and form != "categorical":
        col.add(key + ".reference", "applies to categorical covariates only")
    prior = table.get("prior", {"dist": "Normal", "mu": 0.0, "sigma": 1.0})
    parsed = _parse_prior(col, key + ".prior", prior, 0.0, ("Normal",))
    if len(col.problems) > n_before or parsed is None:
        return None
    return CovariateSpec(param, cov, form, center, reference, parsed)


def _parse_dose_level(col: _Collector, label: str, table: Any) -> DoseLevelSpec | None:
    key = f"dose_levels.{label}"
    if not isinstance(table, dict):
        col.add(key, f"expected {{ dose = ..., interval = ..., n_infusions = ... }} (found {_fmt(table)})")
        return None
    _check_keys(col, key, table, _DOSE_LEVEL_KEYS)
    n_before = len(col.problems)
    for arg, unit in (("dose", "10^9 cells per infusion"), ("interval", "days")):
        if arg not in table:
            col.add(f"{key}.{arg}", f"missing ({unit})")
        else:
            _check_number(col, f"{key}.{arg}", table[arg], positive=True)
    n_inf = table.get("n_infusions")
    if n_inf is None:
        col.add(key + ".n_infusions", "missing")
    elif not isinstance(n_inf, int) or isinstance(n_inf, bool) or n_inf < 1:
        col.add(key + ".n_infusions", f"expected an integer >= 1 (found {_fmt(n_inf)})")
    n_sub = table.get("n_subjects")
    if n_sub is not None and (not isinstance(n_sub, int) or isinstance(n_sub, bool) or n_sub < 0):
        col.add(key + ".n_subjects", f"expected an integer >= 0 (found {_fmt(n_sub)})")
    basis = _check_basis(col, key, table, required=False)
    source = table.get("source", "")
    if not _check_str(col, key + ".source", source):
        source = ""
    if len(col.problems) > n_before:
        return None
    return DoseLevelSpec(label, float(table["dose"]), float(table["interval"]), n_inf, n_sub, basis, source)


def _parse_mapping(col: _Collector, name: str, table: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    if table is None:
        return copy.deepcopy(defaults)
    if not isinstance(table, dict):
        col.add(name, f"expected a table [{name}] (found {_fmt(table)})")
        return copy.deepcopy(defaults)
    _check_keys(col, name, table, tuple(defaults))
    return {**copy.deepcopy(defaults), **{k: v for k, v in table.items() if k in defaults}}


def _check_remission(col: _Collector, rem: dict[str, Any]) -> None:
    if rem["metric"] not in _REMISSION_METRICS:
        col.add(
            "remission.metric",
            f"unknown metric{_hint(rem['metric'], _REMISSION_METRICS)} (found {_fmt(rem['metric'])}, expected one of {', '.join(_REMISSION_METRICS)})",
        )
    for k in ("theta0", "theta1", "center"):
        _check_number(col, f"remission.{k}", rem[k])
    _check_number(col, "remission.scale", rem["scale"], positive=True)
    if rem["basis"] not in BASES:
        col.add(
            "remission.basis",
            f"unknown basis (found {_fmt(rem['basis'])}, expected one of {', '.join(BASES)})",
        )


def _check_days(col: _Collector, key: str, days: Any) -> None:
    if not isinstance(days, list) or not all(_is_number(d) and math.isfinite(d) for d in days):
        col.add(key, f"expected a list of days (found {_fmt(days)})")
    elif any(b <= a for a, b in zip(days, days[1:], strict=False)):
        col.add(key, f"days must increase strictly (found {days})")


def _check_simulation(col: _Collector, sim: dict[str, Any]) -> None:
    for k in _SIMULATION_LISTS:
        _check_days(col, f"simulation.{k}", sim[k])
    ld = sim["ld_days"]
    if isinstance(ld, list) and ld and all(_is_number(d) for d in ld) and max(ld) >= 0:
        col.add(
            "simulation.ld_days",
            f"lymphodepletion must precede the first infusion (found {ld}, expected days < 0)",
        )
    _check_number(col, "simulation.screening_day", sim["screening_day"])
    _check_bool(col, "simulation.car_predose", sim["car_predose"])
    _check_number(col, "simulation.predose_offset", sim["predose_offset"], positive=True)


def _check_events(col: _Collector, ev: dict[str, Any]) -> None:
    for k in ("reappearance_threshold", "reconstitution_threshold", "aplasia_threshold"):
        _check_number(col, f"events.{k}", ev[k], positive=True)
    win = ev["aplasia_window"]
    if not (isinstance(win, list) and len(win) == 2 and all(_is_number(w) for w in win) and win[0] < win[1]):
        col.add(
            "events.aplasia_window", f"expected [start_day, end_day] with start < end (found {_fmt(win)})"
        )


def _check_lymphodepletion(col: _Collector, ld: dict[str, Any], structure: str) -> None:
    for k in ("surge", "rejection_onset"):
        if ld[k] not in _LD_MODES:
            col.add(
                f"lymphodepletion.{k}",
                f"unknown mode{_hint(str(ld[k]), _LD_MODES)} (found {_fmt(ld[k])}, expected one of {', '.join(_LD_MODES)})",
            )
        elif structure == "stein" and ld[k] != "independent":
            col.add(
                f"lymphodepletion.{k}",
                f"the stein structure has no LD-driven surge or rejection term (found {_fmt(ld[k])}, "
                'expected "independent")',
            )
    _check_number(col, "lymphodepletion.surge_delay", ld["surge_delay"])
    if ld["basis"] not in BASES:
        col.add(
            "lymphodepletion.basis",
            f"unknown basis (found {_fmt(ld['basis'])}, expected one of {', '.join(BASES)})",
        )


def _as_float_lists(mapping: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = dict(mapping)
    for k in keys:
        if isinstance(out.get(k), list):
            out[k] = [float(x) if _is_number(x) else x for x in out[k]]
    return out


def _build_spec(raw: dict[str, Any], text: str, shown: str, source_file: Path | None) -> ModelSpec:
    """Check a parsed model file and build its ModelSpec (raises ModelFileProblems)."""
    col = _Collector(shown)
    _check_keys(col, "", raw, _TOP_KEYS)

    model = raw.get("model")
    name, structure, description = "", "reference", ""
    if not isinstance(model, dict):
        col.add("model", "missing table [model] with name, structure, description")
        model = {}
    _check_keys(col, "model", model, _MODEL_KEYS)
    if "name" not in model:
        col.add("model.name", "missing")
    elif _check_str(col, "model.name", model["name"]):
        name = model["name"]
    struct = model.get("structure")
    if struct is None:
        col.add("model.structure", f"missing (expected one of {', '.join(STRUCTURES)})")
    elif struct not in STRUCTURES:
        col.add(
            "model.structure",
            f"unknown structure{_hint(struct, STRUCTURES)} (found {_fmt(struct)}, expected one of {', '.join(STRUCTURES)})",
        )
    else:
        structure = struct
    if "description" in model and _check_str(col, "model.description", model["description"]):
        description = model["description"]
    if "source" in model:
        _check_str(col, "model.source", model["source"])
    structure_ok = struct in STRUCTURES
    wanted = STRUCTURE_PARAMETERS[structure]

    parameters: dict[str, ParameterSpec] = {}
    ptables = raw.get("parameters")
    if not isinstance(ptables, dict):
        col.add("parameters", "missing [parameters.<name>] tables")
        ptables = {}
    for pname, table in ptables.items():
        if pname not in wanted:
            if pname in PARAMETER_INFO:
                others = [s for s, names in STRUCTURE_PARAMETERS.items() if pname in names]
                col.add(
                    f"parameters.{pname}",
                    f"unknown parameter for structure {structure!r} (it belongs to {', '.join(others)})",
                )
            else:
                col.add(
                    f"parameters.{pname}",
                    f"unknown parameter for structure {structure!r}{_hint(pname, wanted)}",
                )
            continue
        parsed = _parse_parameter(col, pname, table)
        if parsed is not None:
            parameters[pname] = parsed
    if structure_ok:
        for pname in wanted:
            if pname not in ptables:
                col.add(
                    f"parameters.{pname}",
                    f"missing required parameter for structure {structure!r} ({PARAMETER_INFO[pname].label})",
                )
    parameters = {p: parameters[p] for p in wanted if p in parameters}

    observations: dict[int, ObservationSpec] = {}
    otables = raw.get("observations")
    if not isinstance(otables, dict) or not otables:
        col.add(
            "observations", "missing [observations.<DVID>] tables (DVID 1 car_flow, 2 bcell_flow, 3 car_qpcr)"
        )
        otables = {}
    for dvid_key, table in otables.items():
        parsed_obs = _parse_observation(col, str(dvid_key), table)
        if parsed_obs is not None:
            observations[parsed_obs.dvid] = parsed_obs
    observations = dict(sorted(observations.items()))

    covariates: list[CovariateSpec] = []
    ctables = raw.get("covariates", [])
    if not isinstance(ctables, list):
        col.add("covariates", "expected [[covariates]] tables")
        ctables = []
    fixed_names = {p for p, spec in parameters.items() if spec.fixed}
    for i, table in enumerate(ctables):
        parsed_cov = _parse_covariate(col, i, table, wanted, fixed_names)
        if parsed_cov is not None:
            covariates.append(parsed_cov)

    dose_levels: dict[str, DoseLevelSpec] = {}
    dtables = raw.get("dose_levels", {})
    if not isinstance(dtables, dict):
        col.add("dose_levels", "expected a table [dose_levels]")
        dtables = {}
    for label, table in dtables.items():
        parsed_dl = _parse_dose_level(col, label, table)
        if parsed_dl is not None:
            dose_levels[label] = parsed_dl

    remission = _parse_mapping(col, "remission", raw.get("remission"), _REMISSION_DEFAULTS)
    _check_remission(col, remission)
    simulation = _parse_mapping(col, "simulation", raw.get("simulation"), _SIMULATION_DEFAULTS)
    _check_simulation(col, simulation)
    events = _parse_mapping(col, "events", raw.get("events"), _EVENTS_DEFAULTS)
    _check_events(col, events)
    ld_defaults = dict(_LYMPHODEPLETION_DEFAULTS)
    if structure == "stein":  # Stein kinetics have no LD-driven term
        ld_defaults.update(surge="independent", rejection_onset="independent")
    lymphodepletion = _parse_mapping(col, "lymphodepletion", raw.get("lymphodepletion"), ld_defaults)
    _check_lymphodepletion(col, lymphodepletion, structure)

    col.raise_if_any()
    return ModelSpec(
        name=name,
        structure=structure,
        description=description,
        source_file=source_file,
        parameters=parameters,
        observations=observations,
        covariates=covariates,
        dose_levels=dose_levels,
        remission=_as_float_lists(remission, ()),
        simulation=_as_float_lists(simulation, _SIMULATION_LISTS),
        events=_as_float_lists(events, ("aplasia_window",)),
        raw=raw,
        text=text,
        lymphodepletion=lymphodepletion,
    )


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(s: str, multiline: bool = False) -> str:
    """A basic TOML string; with ``multiline`` and a newline in ``s``, a triple-quoted one."""
    multiline = multiline and "\n" in s
    out = []
    for ch in s:
        if multiline and ch == "\n":
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    if multiline:
        return '"""\n' + "".join(out) + '"""'
    return '"' + "".join(out) + '"'


def _toml_key(k: Any) -> str:
    k = str(k)
    return k if _BARE_KEY.match(k) else _toml_string(k)


def _toml_value(v: Any, top: bool = False) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        x = float(v)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return repr(x)
    if isinstance(v, str):
        return _toml_string(v, multiline=top)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _inline(v: Any, depth: int) -> bool:
    """Write a mapping inline when it is deep (a prior, a bsv) and flat."""
    return depth >= 3 and all(not isinstance(x, Mapping) and not _is_table_array(x) for x in v.values())


def _emit(
    lines: list[str], path: list[str], table: Mapping[str, Any], depth: int, array_item: bool = False
) -> None:
    direct, subtables, arrays = [], [], []
    for k, v in table.items():
        if isinstance(v, Mapping) and not _inline(v, depth + 1):
            subtables.append((k, v))
        elif _is_table_array(v):
            arrays.append((k, v))
        else:
            direct.append((k, v))
    dotted = ".".join(_toml_key(p) for p in path)
    if array_item:
        lines += ["", f"[[{dotted}]]"]
    elif path and (direct or not (subtables or arrays)):
        lines += ["", f"[{dotted}]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v, top=True)}" for k, v in direct]
    for k, v in subtables:
        _emit(lines, [*path, str(k)], v, depth + 1)
    for k, items in arrays:
        for item in items:
            _emit(lines, [*path, str(k)], item, depth + 1, array_item=True)


def dump_toml(spec: ModelSpec | Mapping[str, Any], header: str | None = None) -> str:
    """TOML text of a model (its ``raw`` tables) or of any mapping of TOML-able values.

    ``header`` lines are written first as ``#`` comments. ``tomllib.loads(dump_toml(x)) == x`` for a
    mapping of str, int, float, bool, lists and mappings.
    """
    raw = spec.raw if isinstance(spec, ModelSpec) else spec
    lines: list[str] = [f"# {line}".rstrip() for line in (header.splitlines() if header else [])]
    _emit(lines, [], raw, 0)
    while lines and lines[0] == "":
        lines.pop(0)
    return "\n".join(lines) + "\n"


def save_model(spec: ModelSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``spec`` as a model file at ``path`` (atomic: temp file in the same folder, then rename).

    Comments of the original file are not kept; a header names where the spec came from.
    """
    path = Path(path)
    origin = str(spec.source_file) if spec.source_file else "a spec made in memory"
    text = dump_toml(spec, header=f"carnk_pkpd model file written by save_model (from {origin}).")
    from carnk_pkpd.atomic import write_text_atomic

    return write_text_atomic(path, text)
