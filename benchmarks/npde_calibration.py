"""NPDE calibration on the embedded SYNTHETIC reference cohort's design (20 subjects), no fit.

Replicates: K = 500 draws of new subjects from the reference model (typical values). "Observed":
M further independent cohorts from (a) the same model and (b) the same model with k_rej × 3 and
(c) B0 (baseline B cells) × 0.5, censored at the LLOQ. Prints the pooled npde_tests per DVID.

    PYTHONPATH=src python benchmarks/npde_calibration.py [K] [M] [SEED]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd

from carnk_pkpd.data import embedded_cohort_path, read_cohort
from carnk_pkpd.evaluation import npde, npde_tests, population_prediction, replicates_dataset
from carnk_pkpd.population import PopulationDraws, simulate_population
from carnk_pkpd.spec import load_model


def main(k: int = 500, m: int = 10, seed: int = 5) -> None:
    t0 = time.time()
    cohort = read_cohort(embedded_cohort_path("reference"))
    spec = load_model("reference")
    pop = PopulationDraws.from_model(spec, k + m, seed=0)
    sim = simulate_population(pop, cohort, seed=seed, times=[0.0], metrics=False)
    pred = population_prediction(spec, cohort)
    lloq = sim["LLOQ"].values
    base = sim.isel(draw=slice(m, None))
    cases = {"same model": sim}
    for label, name, factor in (("k_rej x 3", "k_rej", 3.0), ("B0 x 0.5", "B0", 0.5)):
        if name not in pop.typical:
            print(f"(no parameter {name} in the model; skipped)")
            continue
        wrong = pop.take(np.arange(m))
        wrong = replace(wrong, typical={**wrong.typical, name: wrong.typical[name] * factor})
        cases[label] = simulate_population(wrong, cohort, seed=seed + 1, times=[0.0], metrics=False)
    for label, src in cases.items():
        dfs = []
        for j in range(m):
            y = src["y"].values[j]
            blq = y < lloq
            reps = replicates_dataset(base, pred, log_dvids=[1], dv=np.where(blq, lloq, y), blq=blq)
            dfs.append(npde(reps, seed=j))
        print(f"== observed from: {label} (K = {k}, {m} cohorts of {len(cohort.ids)} subjects)")
        print(npde_tests(pd.concat(dfs)).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        for dvid in (1, 2):
            per = [float(d.loc[d["DVID"] == dvid, "npde"].var()) for d in dfs]
            print(f"   DVID {dvid}: NPDE variance per cohort {np.round(per, 2).tolist()}")
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
