"""carnk_pkpd: population PK/PD of allogeneic CD19 CAR-NK cells in SLE.

Data flows down, one job per module:

``data`` (NONMEM-style cohorts) -> ``spec`` (model files under ``models/``) -> ``structural``
(CAR-NK kinetics and B-lineage ODE) -> ``statistical`` (PyMC model) -> ``inference`` (sampling) ->
``diagnostics`` -> ``population`` (the population model as individual subjects:
``simulate_population``) -> ``remission`` / ``doses`` (predictions and simulation) -> ``export`` -> ``cli``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("carnk_pkpd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

from carnk_pkpd.errors import DataError, FitError, ModelFileError, OutputRefused, Problem  # noqa: E402

#: Public names imported on first use (so ``carnk-pkpd --help`` stays fast): name -> module.
_LAZY = {
    "read_cohort": "carnk_pkpd.data",
    "write_cohort": "carnk_pkpd.data",
    "Cohort": "carnk_pkpd.data",
    "load_model": "carnk_pkpd.spec",
    "simulate": "carnk_pkpd.structural",
    "derived_metrics": "carnk_pkpd.structural",
    "fit": "carnk_pkpd.inference",
    "Fit": "carnk_pkpd.fits",
    "load_fit": "carnk_pkpd.fits",
    "save_fit": "carnk_pkpd.fits",
    "predict_remission": "carnk_pkpd.remission",
    "Regimen": "carnk_pkpd.regimen",
    "simulate_population": "carnk_pkpd.population",
    "PopulationDraws": "carnk_pkpd.population",
    "SubjectDesign": "carnk_pkpd.population",
}

__all__ = ["DataError", "FitError", "ModelFileError", "OutputRefused", "Problem", "__version__", *_LAZY]


def __getattr__(name: str):
    """Import the heavier public functions lazily so ``carnk-pkpd --help`` stays fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'carnk_pkpd' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API, including the names imported on first use."""
    return sorted(set(globals()) | set(__all__))
