"""Benchmark of the dose search: regimens × posterior draws × patients virtual-patient trajectories.

    .venv/bin/python benchmarks/bench_doses.py [--fit fits/NAME] [--regimens 50 --draws 500 --patients 40]
        [--workers 2] [--threads]

Without ``--fit`` the population draws come from the model file's priors
(``PopulationDraws.from_model(..., uncertainty="prior")``, SYNTHETIC) and the remission link is the
file's ASSUMED link; with ``--fit`` the fitted link (fitted and cached in the fit folder when missing). Prints the wall time (compilation included, and a second warm run when ``--warm``) and
trajectories per second. Workers are what ``carnk-pkpd doses --workers N`` starts: processes, each
pinned to its own CPU (``carnk_pkpd.xla.local_cluster``); ``--threads`` runs threads of one process.

Measured (2-core machine, otherwise idle, 2026-12-02, defaults: 50 regimens x 500 draws x 40 patients
= 1,000,000 trajectories, compilation included): 137.2 s on 2 threads (7,287 trajectories/s) and
197.7 s on 2 processes, after the link was taken out of its Dataset once per call and patients were
solved 64 at a time; 200,000 trajectories had taken 107.5 s before those two changes. Target 30 s:
missed by 4.6x; what is left is the solver's forward pass (about 150 µs per 365-day trajectory).

Measured 2026-12-07 (defaults, 1,000,000 trajectories, compilation included):
  * threads do not help: XLA already spreads one computation over both cores (two tf_XLAEigen
    threads), so 1 and 2 worker threads gave 9.1k and 9.6k trajectories/s (200,000 trajectories);
  * worker processes, as they were: 152.0 s (6,579/s). Timing the same task loop in and out of a
    Dask worker found why: Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which
    turns off glibc's dynamic mmap threshold; one pinned process ran the loop at 6.6k/s without it
    and 4.0k/s with it;
  * worker processes without that variable, each pinned to its own CPU (xla.local_cluster, what
    ``doses --workers 2`` now starts): 91.2 s and 92.2 s (10,970 and 10,846/s). Target 30 s: missed
    by 3.0x. Two independent pinned processes run the task loop at 6.3k/s each; the solver's
    forward pass is ~78% of a task (cProfile), the link and metrics the rest;
  * not kept: running a task's batches of 64 patients in one compiled loop (jax.lax.map) instead
    of one call per batch: +2-6% on one pinned core, nothing at 1,000,000 (92.2 vs 91.2 s).

Measured 2026-12-07 (night, a slower machine than in the evening), defaults, one run each, one
after the other: before / after the solver's fitted weights stopped using XLA's dot for their 3x3
products and the CAR-NK closed form took one exponential per time and per dose: 128.9 / 94.7 s
(7,758 / 10,554 trajectories/s, -27%), the same ranking (3x1.32e9 q7d most often best, P 0.39).
Target 30 s: missed by 3.2x on this machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def regimens(n: int):
    """``n`` regimens: doses 0.25–5×10⁹ at q3d/q7d, 1–3 infusions, LD on/half/off."""
    from carnk_pkpd.regimen import Regimen

    out = []
    doses = np.round(np.geomspace(0.25, 5.0, 10), 3)
    for ld in (1.0, 0.5, 0.0):
        for n_inf, iv in ((3, 3.0), (3, 7.0), (2, 7.0), (1, 3.0)):
            for d in doses:
                out.append(Regimen(float(d), iv, n_inf, ld))
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fit", default=None)
    ap.add_argument("--regimens", type=int, default=50)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--threads",
        action="store_true",
        help="worker threads of one process (before 2026-12-07) instead of processes",
    )
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    from dask.distributed import Client, LocalCluster

    from carnk_pkpd.doses import rank_regimens
    from carnk_pkpd.population import PopulationDraws
    from carnk_pkpd.remission import assumed_link, remission_source
    from carnk_pkpd.spec import load_model

    if a.fit:
        from carnk_pkpd.fits import load_fit

        fit = load_fit(a.fit)
        link = remission_source(fit, seed=a.seed)
    else:
        spec = load_model("reference")
        fit = PopulationDraws.from_model(spec, a.draws, a.seed, uncertainty="prior")
        link = assumed_link(spec)
    regs = regimens(a.regimens)
    n_traj = len(regs) * a.draws * a.patients
    if not a.threads:  # what the doses command runs: worker processes, one CPU each
        from carnk_pkpd import xla

        cluster, client = xla.local_cluster(a.workers)
    else:
        cluster = LocalCluster(
            n_workers=a.workers, threads_per_worker=1, processes=False, dashboard_address=None
        )
        client = Client(cluster)
    with cluster, client:
        t0 = time.perf_counter()
        ds = rank_regimens(
            fit, regs, n_draws=a.draws, n_patients=a.patients, seed=a.seed, client=client, remission=link
        )
        dt = time.perf_counter() - t0
    kind = "threads" if a.threads else "processes"
    print(
        f"{len(regs)} regimens x {ds.sizes['draw']} draws x {a.patients} patients = {n_traj:,} trajectories "
        f"on {a.workers} {kind}: {dt:.1f} s, {n_traj / dt:,.0f} trajectories/s (compilation included)"
    )
    best = int(np.argmax(ds["p_best"].values))
    print(
        f"most often best: {ds['label'].values[best]} (P(best) {float(ds['p_best'][best]):.2f}) — SYNTHETIC"
    )


if __name__ == "__main__":
    main()
