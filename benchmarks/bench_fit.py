"""Benchmark: full-size fit of the embedded SYNTHETIC reference cohort (issue: fit performance).

Run:  .venv/bin/python benchmarks/bench_fit.py [--draws 1000 --tune 1000 --chains 4 --seed 1]

Prints wall time (compilation separately), divergences, max R-hat, min bulk/tail ESS over
population parameters, ESS per second, and whether the 90% intervals cover the simulation truth
(the reference cohort was simulated from the model file's typical values). Targets: <= 10 min total
on 2 cores, 0 divergences, R-hat <= 1.01, min bulk ESS >= 400.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--tune", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", default=None, help="cohort CSV (default: embedded reference cohort)")
    ap.add_argument("--out", default=None, help="save the fit folder here")
    args = ap.parse_args()

    from carnk_pkpd.data import embedded_cohort_path, read_cohort
    from carnk_pkpd.fits import save_fit
    from carnk_pkpd.inference import fit
    from carnk_pkpd.spec import load_model

    path = args.data or embedded_cohort_path("reference")
    cohort = read_cohort(path)
    spec = load_model("reference")
    t0 = time.perf_counter()
    result = fit(
        cohort, spec, draws=args.draws, tune=args.tune, chains=args.chains, seed=args.seed, progress=False
    )
    wall = time.perf_counter() - t0
    d = result.diagnostics
    tm = result.manifest["timings"]
    s = result.summary().set_index("name")
    n = result.manifest
    print(
        f"cohort: {path} ({n['n_subjects']} subjects, {n['n_records']} records, {n['n_blq']} BLQ) - SYNTHETIC"
    )
    print(f"sampler: {args.chains} chains x ({args.tune} tune + {args.draws} draws), nutpie JAX backend")
    rows = [
        ("wall time total (s)", f"{wall:.1f}", "<= 600", wall <= 600),
        ("  of which compile (s)", f"{tm['compile_seconds']:.1f}", "", True),
        ("  of which sampling (s)", f"{tm['sampling_seconds']:.1f}", "", True),
        ("divergences", f"{d.divergences}", "0", d.divergences == 0),
        ("max R-hat", f"{d.max_r_hat:.4f}", "<= 1.01", d.max_r_hat <= 1.01),
        ("min bulk ESS", f"{d.min_ess_bulk:.0f}", ">= 400", d.min_ess_bulk >= 400),
        ("min tail ESS", f"{d.min_ess_tail:.0f}", ">= 400", d.min_ess_tail >= 400),
        ("min bulk ESS / s", f"{d.min_ess_bulk / tm['sampling_seconds']:.2f}", "", True),
    ]
    print(f"{'figure':28s} {'value':>10s} {'target':>10s}  met")
    for name, value, target, ok in rows:
        print(f"{name:28s} {value:>10s} {target:>10s}  {'yes' if ok else 'NO'}")
    typ = spec.typical()
    print("\ncoverage of the simulation truth (typical values of the BSV parameters):")
    for p in spec.estimated_bsv():
        lo, hi = s.loc[p, "q05"], s.loc[p, "q95"]
        print(
            f"  {p:6s} truth {typ[p]:<10.4g} 90% interval [{lo:.4g}, {hi:.4g}]  {'covered' if lo <= typ[p] <= hi else 'NOT covered'}"
        )
    if args.out:
        save_fit(result, args.out, overwrite=True)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
