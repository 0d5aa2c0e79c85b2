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

from carnk_pkpd.errors import DataError, FitError, ModelFileError, Problem  # noqa: E402

__all__ = ["DataError", "FitError", "ModelFileError", "Problem", "__version__"]


def __getattr__(name: str):
    """Import the heavier public functions lazily so ``carnk-pkpd --help`` stays fast."""
    lazy = {
        "read_cohort": "carnk_pkpd.data",
        "write_cohort": "carnk_pkpd.data",
        "Cohort": "carnk_pkpd.data",
        "load_model": "carnk_pkpd.spec",
        "simulate": "carnk_pkpd.structural",
        "derived_metrics": "carnk_pkpd.structural",
        "fit": "carnk_pkpd.inference",
        "Fit": "carnk_pkpd.fits",
        "load_fit": "carnk_pkpd.fits",
        "predict_remission": "carnk_pkpd.remission",
        "simulate_population": "carnk_pkpd.population",
        "PopulationDraws": "carnk_pkpd.population",
        "SubjectDesign": "carnk_pkpd.population",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'carnk_pkpd' has no attribute {name!r}")
