"""Benchmark of the JAX B-lineage solver (carnk_pkpd.structural.solve) on ONE core.

Run:  .venv/bin/python benchmarks/bench_solver.py [--subjects 10000 --chunk 64 --core 0 --sections abcde|e]

Prints, then summarises in a table with targets:

(a) subject-trajectories per second, days −5 to 365 at default accuracy, 10,000 subjects drawn from
    models/reference.toml (typical values and BSV) with DL4 (3×10⁹ cells on days 0, 3, 6), outputs at
    the trial's sampling days (science.md §4; also daily outputs, for information); target ≥ 10,000/s;
(b) the same trajectories with scipy's Radau (tests/reference_ode.py at rtol 1e-6) on 20 of them, and
    the speed ratio;
(c) value and full reverse-mode gradient (all parameters of all subjects) of a log-likelihood of a
    20-subject cohort with ~600 observations, jax.jit(jax.value_and_grad); median of 50 runs, compile
    time apart; target ≤ 5 ms;
(d) the largest error against the Radau reference (rtol 1e-10) on 10 stress sets, as a fraction of
    the accuracy contract (default 1e-3·|B| + 1e-3, tight 1e-6·|B| + 1e-8 cells/µL), and the
    integration nodes per trajectory;
(e) the fit's own log density and gradient (nutpie's compiled JAX function, what every leapfrog step
    calls) for SYNTHETIC cohorts of 20 subjects of the trial design (follow-up like the trial, longest
    365 d), 20 subjects with 365 d each, and 60 subjects (15 per dose level, 365 d each); CPU ms per
    call, integration steps, and the 60/20 ratio; targets <= 1.5 ms (20 subjects), ratio <= 3.5.

One core: XLA's intra-op threads are switched off before JAX is imported and the process is pinned to
one CPU (sched_setaffinity, what ``taskset -c`` does). CPU time of this process is what is timed, so
other load on the machine slows the figures less than wall time would (shared caches still do).

Why 60 subjects cost more than 3x 20 (measured 2026-12-07, one core, AMD EPYC, 2 MiB L2 per core,
32 MiB L3; cohorts of 365 d each, 5/10/15 subjects per dose level, seed 365, 227 grid nodes):
the FORWARD solve is linear (2.3 / 4.9 / 7.3 ms for 20 / 40 / 60 subjects), and so was the value
and gradient up to 40 subjects (5.4 / 11.1 ms), but at 60 it jumped to 35-36 ms (reverse mode of
the scan; the fit's nutpie function cost the same, so it was not PyTensor's separate VJP op).
Ruled out, each measured: the gather of records (value and gradient without it: 36-38 ms), the
length grouping (one padded group: 35.6 ms), glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_ 32 MiB:
no change), groups capped at 15-30 subjects (30-36 ms), and per-group rematerialisation with
jax.checkpoint (41-54 ms, worse). What fixed it: rematerialising each scan STEP
(``jax.checkpoint(step)`` in ``solve_nodes``), so reverse mode keeps only the carry per step
instead of every intermediate of every step (estimated from the array shapes, ~0.35 MiB per
subject, ~21 MiB at 60: more than the cache holds next to everything else). Side by side, section
(e): 60 subjects 32.0 -> 14.5 ms, 20 subjects (365 d) 4.8 -> 3.6 ms, 20 subjects (trial
follow-up) 2.6 -> 1.95 ms; ratio 6.7x -> 4.1x (on the 5/15-per-level cohorts of the first sentence,
the fit function: 15.9 / 4.8 ms = 3.3x, was 36.2 / 6.1 ms). Repeated runs
of one configuration differ by up to 2x on this shared machine, so compare figures taken side by
side.

Where a solve's time goes (measured 2026-12-07, night, one core, 20 subjects of the trial design):
the step coefficients computed in bulk before the scan, not the scan. Forward, the whole solve took
about as long as those coefficients alone; within them the Gauss weights' 3x3 products with XLA's
dot were the largest part. Written out as sums of scaled rows, section (a) went from 6.7-7.2k to
10.3-11.0k trajectories/s (sampling days) and from 2.3-2.5k to 3.6-3.8k (daily outputs), two runs
each. In the gradient the same rewrite was slower, so the derivative keeps the dot. The CAR-NK
closed form with one exponential per time and per dose (not per pair) cut its value and gradient
from 1.27 to 0.49 ms; section (e) side by side in one process: 20 subjects with 365 d 7.05 -> 5.72
ms, 60 subjects 19.9 -> 17.7 ms (the machine ran ~2x slower that night than in the figures above).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the independent reference solver


def pin_to_one_core(core: int | None) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity); XLA single-threaded"
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1] if core is None or core not in allowed else core
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu} of {allowed}; XLA single-threaded"


def cpu_seconds(fn, repeat: int) -> list[float]:
    """CPU seconds of this process per call of ``fn`` (which blocks until its result is ready)."""
    out = []
    for _ in range(repeat):
        c0 = time.process_time()
        fn()
        out.append(time.process_time() - c0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=64, help="subjects per solver call (cache-sized batches)")
    ap.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the last allowed)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sections", default="abcde", help="abcde: all; e: the fit-gradient section (e) only")
    args = ap.parse_args()
    pinned = pin_to_one_core(args.core)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from reference_ode import draw_parameter_sets, reference_solution, sample_times

    from carnk_pkpd.spec import load_model
    from carnk_pkpd.structural.solve import Grid, make_grid, solve

    print(f"carnk_pkpd solver benchmark — jax {jax.__version__}, {pinned}")
    spec = load_model("reference")
    rng = np.random.default_rng(args.seed)
    n_transit = int(spec.typical()["n_transit"])
    names = [k for k in spec.typical() if k != "n_transit"]
    bsv = spec.bsv_sd()

    def draw_subjects(n: int) -> dict[str, np.ndarray]:
        return {k: spec.typical()[k] * np.exp(bsv.get(k, 0.0) * rng.standard_normal(n)) for k in names}

    @partial(jax.jit, static_argnames=("sweeps",))
    def trajectories(theta, nodes, out_index, times, mask, dose_times, dose_amounts, sweeps):
        grid = Grid(nodes, out_index, times, mask, dose_times, dose_amounts, sweeps)
        return solve(theta, grid, n_transit=n_transit)

    def grid_args(grid: Grid, rows: slice) -> tuple:
        fields = (grid.nodes, grid.out_index, grid.times, grid.mask, grid.dose_times, grid.dose_amounts)
        return tuple(jnp.asarray(f[rows]) for f in fields)

    dl4 = spec.dose_levels["DL4"].doses()
    schedule = np.unique(np.r_[spec.simulation["car_days"], spec.simulation["bcell_days"], -5.0, 365.0])
    schedule = schedule[(schedule >= -5.0) & (schedule <= 365.0)]
    daily = np.arange(-5.0, 365.5, 1.0)
    rows: list[tuple[str, str, str, str]] = []

    theta_all = draw_subjects(args.subjects)
    if "e" in args.sections:
        rows += fit_gradient_scaling(spec)
    if "a" not in args.sections:
        print_rows(rows)
        return
    # ---------------------------------------------------------------- (a) throughput, one core
    k_tr_fastest = n_transit / theta_all["MTT"].min()
    print(f"\n(a) {args.subjects} subjects, DL4, days -5..365, default accuracy, chunks of {args.chunk}")
    rates = {}
    for label, times in (("sampling days", schedule), ("daily outputs", daily)):
        c0 = time.process_time()
        grid = make_grid([dl4], [times], "default", k_tr=k_tr_fastest)  # one grid serves every subject
        grid_s = time.process_time() - c0
        nodes = int(np.sum(np.diff(grid.nodes[0]) > 0) + 1)
        chunk_grid = Grid(
            *(np.repeat(f, args.chunk, axis=0) for f in (grid.nodes, grid.out_index, grid.times, grid.mask)),
            np.repeat(grid.dose_times, args.chunk, axis=0),
            np.repeat(grid.dose_amounts, args.chunk, axis=0),
            grid.sweeps,
        )
        g_args = grid_args(chunk_grid, slice(None))
        n_chunks = args.subjects // args.chunk
        chunks = [
            {k: jnp.asarray(v[i * args.chunk : (i + 1) * args.chunk]) for k, v in theta_all.items()}
            for i in range(n_chunks)
        ]
        c0 = time.process_time()
        jax.block_until_ready(trajectories(chunks[0], *g_args, sweeps=grid.sweeps))
        compile_s = time.process_time() - c0

        def run_all(chunks=chunks, g_args=g_args, sweeps=grid.sweeps) -> None:
            for th in chunks:
                out = trajectories(th, *g_args, sweeps=sweeps)
            jax.block_until_ready(out)

        per_run = cpu_seconds(run_all, 3)
        rate = n_chunks * args.chunk / float(np.median(per_run))
        rates[label] = rate
        print(
            f"    {label:14s}: {times.size:4d} outputs, {nodes} nodes; {rate:9,.0f} trajectories/s "
            f"(CPU {np.median(per_run):.2f} s per {n_chunks * args.chunk}; compile {compile_s:.1f} s; "
            f"grid {grid_s * 1e3:.1f} ms)"
        )
    met = "yes" if rates["sampling days"] >= 10_000 else "NO"
    rows.append(
        ("(a) trajectories/s, 1 core, sampling days", f"{rates['sampling days']:,.0f}", ">= 10,000", met)
    )
    rows.append(("    same, daily outputs (371 times)", f"{rates['daily outputs']:,.0f}", "-", "-"))

    # ---------------------------------------------------------------- (b) scipy Radau
    print("\n(b) scipy solve_ivp Radau (tests/reference_ode.py, rtol 1e-6, atol 1e-8) on 20 subjects")
    radau_s = []
    for i in range(20):
        params = {k: float(theta_all[k][i]) for k in names} | {"n_transit": n_transit}
        c0 = time.process_time()
        reference_solution(params, dl4, schedule, rtol=1e-6, atol=1e-8, atol_car=1e-12)
        radau_s.append(time.process_time() - c0)
    radau_rate = 1.0 / float(np.mean(radau_s))
    ratio = rates["sampling days"] / radau_rate
    print(
        f"    {np.mean(radau_s) * 1e3:.0f} ms per trajectory: {radau_rate:.1f} trajectories/s; JAX is {ratio:,.0f}x faster"
    )
    rows.append(("(b) scipy Radau rtol 1e-6 trajectories/s", f"{radau_rate:.1f}", "-", "-"))
    rows.append(("    ratio JAX / scipy", f"{ratio:,.0f}x", "-", "-"))

    # ---------------------------------------------------------------- (c) value and gradient
    print("\n(c) log-likelihood value + reverse-mode gradient, 20 subjects (DL1/DL2/DL3x5/DL4x13)")
    levels = ["DL1", "DL2"] + ["DL3"] * 5 + ["DL4"] * 13
    doses = [spec.dose_levels[lv].doses() for lv in levels]
    car_days, b_days = np.asarray(spec.simulation["car_days"]), np.asarray(spec.simulation["bcell_days"])
    obs_times, is_car = [], []
    for d in doses:
        predose = [t - spec.simulation["predose_offset"] for t, _ in d[1:]]
        t_car = np.r_[car_days, predose]
        t_b = b_days[b_days >= -5.0]
        obs_times.append(np.r_[t_car, t_b])
        is_car.append(np.r_[np.ones(t_car.size, bool), np.zeros(t_b.size, bool)])
    n_obs = sum(t.size for t in obs_times)
    theta20 = draw_subjects(20)
    # the grid as a fit builds it: subjects solved in groups of similar length (compact)
    grid = make_grid(
        doses, obs_times, "default", k_tr=n_transit / theta20["MTT"], k_kill=theta20["k_kmax"], bucket=1
    )
    width = grid.times.shape[1]
    car_mask = np.zeros((20, width), bool)
    for s, flags in enumerate(is_car):
        car_mask[s, : flags.size] = flags
    b_mask = grid.mask & ~car_mask
    car_true, b_true = (np.asarray(x) for x in solve(theta20, grid, n_transit=n_transit))
    dv_car = car_true * np.exp(0.35 * rng.standard_normal(car_true.shape))
    dv_b = b_true * (1 + 0.2 * rng.standard_normal(b_true.shape)) + 0.5 * rng.standard_normal(b_true.shape)
    lloq_car, lloq_b = 0.1, 1.0
    cens_car, cens_b = dv_car < lloq_car, dv_b < lloq_b
    const = {
        "car_mask": jnp.asarray(car_mask),
        "b_mask": jnp.asarray(b_mask),
        "dv_car": jnp.asarray(np.maximum(dv_car, lloq_car)),
        "dv_b": jnp.asarray(np.maximum(dv_b, lloq_b)),
        "cens_car": jnp.asarray(cens_car),
        "cens_b": jnp.asarray(cens_b),
    }
    norm = jax.scipy.stats.norm

    def log_likelihood(log_theta, c):
        theta = {k: jnp.exp(v) for k, v in log_theta.items()}
        car, bcell = solve(theta, grid, n_transit=n_transit, compact=True)
        mu = jnp.log(car + 1e-6)  # lognormal CAR-NK, sigma 0.35, M3 below LLOQ 0.1/µL
        z_car = (jnp.log(c["dv_car"]) - mu) / 0.35
        ll_car = jnp.where(c["cens_car"], norm.logcdf(z_car), norm.logpdf(z_car) - jnp.log(0.35))
        sd_b = jnp.sqrt((0.2 * bcell) ** 2 + 0.5**2)  # combined B-cell error, M3 below LLOQ 1/µL
        z_b = (c["dv_b"] - bcell) / sd_b
        ll_b = jnp.where(c["cens_b"], norm.logcdf(z_b), norm.logpdf(z_b) - jnp.log(sd_b))
        return jnp.sum(jnp.where(c["car_mask"], ll_car, 0.0)) + jnp.sum(jnp.where(c["b_mask"], ll_b, 0.0))

    value_and_grad = jax.jit(jax.value_and_grad(log_likelihood))
    log_theta = {k: jnp.log(jnp.asarray(v)) for k, v in theta20.items()}
    c0, w0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(value_and_grad(log_theta, const))
    compile_cpu, compile_wall = time.process_time() - c0, time.perf_counter() - w0
    value, grad = value_and_grad(log_theta, const)
    n_grad = sum(int(np.size(g)) for g in grad.values())
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(np.asarray(g))) for g in grad.values())
    walls = []
    for _ in range(50):
        w0 = time.perf_counter()
        jax.block_until_ready(value_and_grad(log_theta, const))
        walls.append(time.perf_counter() - w0)
    vg_ms = float(np.median(walls)) * 1e3
    print(
        f"    {n_obs} observations ({int(cens_car[car_mask].sum() + cens_b[b_mask].sum())} censored), "
        f"{n_grad} gradient entries, {grid.nodes.shape[1]} nodes per subject (padded); "
        f"median {vg_ms:.2f} ms (min {min(walls) * 1e3:.2f}, max {max(walls) * 1e3:.2f}) over 50 runs; "
        f"compile {compile_wall:.1f} s wall ({compile_cpu:.1f} s CPU)"
    )
    rows.append(
        (
            f"(c) value+gradient, 20 subjects, {n_obs} obs",
            f"{vg_ms:.2f} ms",
            "<= 5 ms",
            "yes" if vg_ms <= 5 else "NO",
        )
    )
    rows.append(("    its compile time", f"{compile_wall:.1f} s", "-", "-"))

    # ---------------------------------------------------------------- (d) accuracy and nodes
    print("\n(d) error against the Radau reference (rtol 1e-10) on 10 stress sets")
    sets = draw_parameter_sets(10, seed=args.seed)
    refs = []
    for params, d in sets:
        t = sample_times(d)
        refs.append((t, *reference_solution(params, d, t)))
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (params, _) in enumerate(sets):
        groups[int(params["n_transit"])].append(i)
    tolerance = {"default": (1e-3, 1e-3), "tight": (1e-6, 1e-8)}
    for acc, (rel, abs_) in tolerance.items():
        worst, checked_nodes, schedule_nodes = 0.0, [], []
        for ntr, idx in groups.items():
            times = [refs[i][0] for i in idx]
            th = {k: jnp.asarray([sets[i][0][k] for i in idx]) for k in names}
            regimens = [sets[i][1] for i in idx]
            k_tr = ntr / np.asarray(th["MTT"])
            grid = make_grid(regimens, times, acc, k_tr=k_tr)
            checked_nodes += [int(np.sum(np.diff(row) > 0) + 1) for row in grid.nodes]
            trial = make_grid(regimens, [schedule] * len(idx), acc, k_tr=k_tr)
            schedule_nodes += [int(np.sum(np.diff(row) > 0) + 1) for row in trial.nodes]
            _, bcell = solve(th, grid, n_transit=ntr)
            for row, i in enumerate(idx):
                b_ref = refs[i][2]
                b_pkg = np.asarray(bcell)[row, : b_ref.size]
                worst = max(worst, float(np.max(np.abs(b_pkg - b_ref) / (rel * np.abs(b_ref) + abs_))))
        print(
            f"    {acc:7s}: max |error| / tolerance {worst:.3f} over every half day and infusion; nodes per "
            f"trajectory median {int(np.median(checked_nodes))} (range {min(checked_nodes)}-{max(checked_nodes)}) "
            f"with those outputs, {int(np.median(schedule_nodes))} ({min(schedule_nodes)}-{max(schedule_nodes)}) "
            "with outputs at the sampling days only"
        )
        met = "yes" if worst <= 1 else "NO"
        rows.append((f"(d) max |error|/tolerance, {acc}, 10 sets", f"{worst:.3f}", "<= 1", met))
        rows.append(
            (
                f"    nodes per trajectory, {acc}",
                f"{int(np.median(schedule_nodes))} / {int(np.median(checked_nodes))}",
                "-",
                "-",
            )
        )
    rows.append(("    (nodes: sampling days / half-day outputs)", "", "", ""))

    print_rows(rows)


def print_rows(rows: list[tuple[str, str, str, str]]) -> None:
    print()
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':{width}s}  {'value':>18s}  {'target':>10s}  met")
    print("-" * (width + 38))
    for name, value, target, met in rows:
        print(f"{name:{width}s}  {value:>18s}  {target:>10s}  {met}")


def fit_gradient_scaling(spec) -> list[tuple[str, str, str, str]]:
    """Section (e): CPU ms per call of the fit's compiled log density + gradient, three cohorts."""
    import numpy as np
    import nutpie
    from bench_fit import scenario_cohort

    from carnk_pkpd.cohortsim import simulate_cohort
    from carnk_pkpd.statistical import build_model, observation_data

    print("\n(e) the fit's log density + gradient (nutpie JAX function), SYNTHETIC cohorts, one core")
    cohorts = {
        "20 subjects, trial follow-up (max 365 d)": scenario_cohort(spec, "trial365"),
        "20 subjects, 365 d each": simulate_cohort(spec, "1:1,2:1,3:5,4:13", seed=365, follow_up=365.0)[0],
        "60 subjects, 365 d each": scenario_cohort(spec, "n60"),
    }
    ms = {}
    for label, cohort in cohorts.items():
        data = observation_data(cohort)
        model = build_model(spec, data)
        nodes = model._carnk_grid.nodes  # noqa: SLF001 - benchmark reads the grid the fit built
        real = int((np.diff(nodes, axis=1) > 0).sum())
        compiled = nutpie.compile_pymc_model(model, backend="jax", gradient_backend="jax")
        logp = compiled._make_logp_func()  # noqa: SLF001
        shared = dict(compiled._shared_data)  # noqa: SLF001
        x = np.zeros(compiled.n_dim)
        for _ in range(3):
            logp(x, **shared)
        per = cpu_seconds(lambda logp=logp, x=x, shared=shared: logp(x, **shared), 100)
        ms[label] = float(np.median(per)) * 1e3
        print(
            f"    {label:42s}: {len(data.dv):5d} records, {real:6d} integration steps "
            f"(scan length {nodes.shape[1] - 1}); {ms[label]:.2f} ms CPU per call"
        )
    labels = list(cohorts)
    ratio = ms[labels[2]] / ms[labels[1]]
    return [
        (
            "(e) fit gradient, 20 subjects, trial follow-up",
            f"{ms[labels[0]]:.2f} ms",
            "<= 1.5 ms",
            "yes" if ms[labels[0]] <= 1.5 else "NO",
        ),
        ("    20 subjects, 365 d each", f"{ms[labels[1]]:.2f} ms", "-", "-"),
        ("    60 subjects, 365 d each", f"{ms[labels[2]]:.2f} ms", "-", "-"),
        (
            "    ratio 60 / 20 subjects (365 d each)",
            f"{ratio:.2f}x",
            "<= 3.5x",
            "yes" if ratio <= 3.5 else "NO",
        ),
    ]


if __name__ == "__main__":
    main()
