"""Chains in worker processes (carnk_pkpd.inference): the same draws whatever the number of workers,
and the gradient accounting adds up to nutpie's own tree sizes."""

from __future__ import annotations

import numpy as np
from test_fit import tiny_cohort


def test_same_draws_in_one_process_and_in_two_workers_and_accounting_adds_up():
    from carnk_pkpd.inference import EARLY_WINDOW, chain_seeds, fit

    cohort = tiny_cohort()
    one = fit(cohort, draws=10, tune=10, chains=2, seed=4, cores=1, progress=False)
    two = fit(cohort, draws=10, tune=10, chains=2, seed=4, cores=2, progress=False)
    for name in ("B0", "f_bl", "eta_MTT"):
        np.testing.assert_array_equal(one.posterior[name].values, two.posterior[name].values)
    assert list(two.posterior.chain.values) == [0, 1]
    assert two.manifest["sampler"]["chain_seeds"] == chain_seeds(4, 2)
    assert len(set(chain_seeds(4, 2))) == 2
    tm = two.manifest["timings"]
    assert tm["worker_processes"] == 2 and one.manifest["timings"]["worker_processes"] == 1
    n_steps = int(two.idata["sample_stats"]["n_steps"].values.sum())
    assert tm["gradients_sampling"] == n_steps
    assert tm["gradients_total"] == tm["gradients_early_warmup"] + tm["gradients_late_warmup"] + n_steps
    assert tm["gradients_early_warmup"] >= round(EARLY_WINDOW * 10) * 2  # >= 1 gradient per draw
