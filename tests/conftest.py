"""Shared fixtures. ``small_fit`` is one short real fit of the embedded SYNTHETIC example cohort, made
once per test session (about a minute on 2 cores) and shared by the prediction, remission, dose and
export tests. It is far too short to pass diagnostics; tests that need a converged fit are marked slow.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_fit(tmp_path_factory):
    """A saved and reloaded short fit (2 chains x 60 tune + 60 draws) of the example cohort."""
    from carnk_pkpd.data import embedded_cohort_path
    from carnk_pkpd.fits import load_fit, save_fit
    from carnk_pkpd.inference import fit

    f = fit(embedded_cohort_path("example"), draws=60, tune=60, chains=2, seed=11, progress=False)
    path = tmp_path_factory.mktemp("fits") / "small"
    save_fit(f, path)
    return load_fit(path)
