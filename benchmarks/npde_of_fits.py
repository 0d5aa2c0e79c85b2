"""NPDE, EWRES and CWRES of saved fits: mean and variance per DVID (figures for the closing note, not a test).

For each fit folder: ``--replicates`` replicates of NEW subjects at the fit's own design
(:func:`carnk_pkpd.evaluation.simulate_replicates`), then :func:`~carnk_pkpd.evaluation.npde` with
:func:`~carnk_pkpd.evaluation.npde_tests`, :func:`~carnk_pkpd.evaluation.ewres` and
:func:`~carnk_pkpd.cwres.conditional_weighted_residuals` (same record order as the replicates). A fit of a
cohort simulated from its own model should give NPDE ~ N(0, 1) per DVID (|mean| ≤ 0.15, variance
0.8–1.25 for 20 subjects); a misspecified one (e.g. the Stein structure fitted to a reference-model
cohort) should not. Every cohort used here is SYNTHETIC.

Run:  python benchmarks/npde_of_fits.py FIT [FIT ...] [--replicates 500 --seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fits", nargs="+")
    ap.add_argument("--replicates", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from carnk_pkpd.cwres import conditional_weighted_residuals
    from carnk_pkpd.evaluation import ewres, npde, npde_tests, simulate_replicates
    from carnk_pkpd.fits import load_fit

    pd.set_option("display.width", 200)
    for path in args.fits:
        fit = load_fit(path)
        t0 = time.perf_counter()
        reps = simulate_replicates(fit, args.replicates, args.seed)
        nd = npde(reps, args.seed)
        tests = npde_tests(nd)
        ew = ewres(reps)
        d = fit.diagnostics
        print(f"\n=== {path}: model {fit.spec.name}, {len(fit.cohort.subjects)} subjects"
              f"{' (SYNTHETIC)' if fit.synthetic else ''}; {args.replicates} replicates, "
              f"{time.perf_counter() - t0:.0f} s; fit: {d.n_chains} chains x {d.n_draws} draws, "
              f"max R-hat {d.max_r_hat:.3f}, divergences {d.divergences}")  # fmt: skip
        print(tests.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        t1 = time.perf_counter()
        cw = conditional_weighted_residuals(fit)
        print(f"  CWRES: conditional modes converged {cw.converged} (max |gradient| {cw.max_gradient:.1e}), "
              f"{time.perf_counter() - t1:.0f} s")  # fmt: skip
        for dvid in sorted(set(reps["DVID"].values.tolist())):
            for name, r in (("EWRES", ew), ("CWRES", cw.cwres)):
                e = r[(reps["DVID"].values == dvid) & np.isfinite(r)]
                print(
                    f"  {name} DVID {dvid}: n {e.size}, mean {np.mean(e):+.3f}, variance {np.var(e, ddof=1):.3f}"
                )


if __name__ == "__main__":
    main()
