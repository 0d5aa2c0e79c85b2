"""Sampling: build the PyMC model, compile it for nutpie (JAX backend), sample, diagnose.

Chains run in spawned worker processes (one single-threaded XLA each), because nutpie's JAX backend
calls the log density from Python and its chain threads serialise on the GIL. nutpie calls the
JAX-compiled log density with ``jax.grad`` gradients (the structural solver enters as a JAX op, so
one reverse pass covers the solver and the likelihood; PyTensor's own gradient of a JAX op would run
the solver a second time inside a separate VJP op). The likelihood avoids ``pm.Censored``, whose unused branch gives NaN
gradients under ``jax.grad`` (see ``statistical.normal_lcdf``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from carnk_pkpd import xla
from carnk_pkpd.fits import Fit, sha256

#: Default NUTS target acceptance (see ``fit``): 0.9, because at 0.8 the reference cohort gave 4
#: divergences in 4 x 1000 draws and at 0.9 none (benchmarks/bench_fit.py, seed 1).
TARGET_ACCEPT = 0.9


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("carnk_pkpd", "pymc", "pytensor", "nutpie", "arviz", "xarray", "numpy", "scipy", "jax"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "unknown"
    return out


def records_dataset(data: Any) -> xr.Dataset:
    """The concentration records as a Dataset on dim ``record`` (ID, TIME, DVID, DV, BLQ, LLOQ)."""
    t = np.array([data.times[s][k] for s, k in zip(data.subject_index, data.time_index, strict=True)])
    return xr.Dataset(
        {
            "ID": ("record", np.array(data.ids, dtype=object)[data.subject_index].astype(str)),
            "TIME": ("record", t, {"units": "days"}),
            "DVID": ("record", data.dvid),
            "DV": ("record", data.dv),
            "BLQ": ("record", data.blq),
            "LLOQ": ("record", data.lloq),
            "subject_index": ("record", data.subject_index),
        },
        coords={"record": np.arange(len(data.dv))},
    )


def _compile_now(compiled: Any) -> None:
    """Run the log density, its gradient and the draw expansion once, so that XLA compiles them here
    and the compile time is reported apart from sampling (JAX compiles on the first call). Uses
    nutpie's model hooks; if a nutpie release renames them, compilation simply happens in sampling."""
    try:
        x0 = np.zeros(compiled.n_dim)
        shared = dict(compiled._shared_data)  # noqa: SLF001
        compiled._make_logp_func()(x0, **shared)  # noqa: SLF001
        compiled._make_expand_func(0, 0, 0)(x0, **shared)  # noqa: SLF001
    except (AttributeError, TypeError):
        pass


#: nutpie's early warm-up window (fraction of ``tune``; nutpie's ``early_window`` default): the draws
#: before the first full mass-matrix update, reported apart by :func:`fit`'s gradient accounting.
EARLY_WINDOW = 0.3

_COMPILED: dict[str, tuple[Any, Any, float, dict]] = {}  # per process: key -> (model, data, compile s, start)


def chain_seeds(seed: int, chains: int) -> list[int]:
    """One independent sampler seed per chain, derived from ``seed`` (numpy SeedSequence): chain ``c``
    gets the same seed whatever the number of worker processes."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(chains, dtype=np.uint32)]


def _model_key(spec: Any, cohort: Any, accuracy: str, warm_start: bool = True) -> str:
    return hashlib.sha256(pickle.dumps((spec, cohort, accuracy, warm_start))).hexdigest()


#: Jitter of the starting η's (U(−ETA_JITTER, ETA_JITTER) on the unit-normal scale); population
#: parameters get PyMC's U(−1, 1) on their unconstrained scale around the prior's support point.
ETA_JITTER = 0.1


def _initial_point_fn(pm_model: Any) -> Callable[[int], np.ndarray]:
    """Starting points near the prior's centre: typical values at their prior medians (non-centred
    ``z = 0``) and residual/BSV SDs at PyMC's support point, each with U(−1, 1) jitter on the
    unconstrained scale; every η within ±ETA_JITTER of 0. PyMC's default jitters the 60-odd η's by
    U(−1, 1) too, which starts a chain far from any posterior (maximum-depth trees in early warm-up).
    The flat layout is nutpie's (:func:`carnk_pkpd.warmstart.flat_layout`)."""
    from pymc.initial_point import make_initial_point_fn

    from carnk_pkpd.warmstart import flat_layout

    point_fn = make_initial_point_fn(
        model=pm_model, jitter_rvs=set(pm_model.free_RVs), return_transformed=True
    )
    layout = flat_layout(pm_model)

    def initial_point(seed: Any) -> np.ndarray:
        point = point_fn(seed)
        return np.concatenate(
            [np.ravel(point[n]) * (ETA_JITTER if n.startswith("eta_") else 1.0) for n, _, _ in layout]
        ).astype("float64")

    return initial_point


def _compiled_model(
    spec: Any, cohort: Any, accuracy: str, key: str, warm_start: bool = True
) -> tuple[Any, Any, float, dict]:
    """Build and compile the model once per process (a worker samples several chains of one fit),
    with the starting points of :func:`_initial_point_fn`."""
    import dataclasses

    import nutpie

    from carnk_pkpd.statistical import build_model, observation_data

    if key not in _COMPILED:
        t0 = time.perf_counter()
        data = observation_data(cohort)
        pm_model = build_model(spec, data, accuracy=accuracy)
        compiled = nutpie.compile_pymc_model(pm_model, backend="jax", gradient_backend="jax")
        compiled = dataclasses.replace(compiled, _make_initial_points=_initial_point_fn(pm_model))
        _compile_now(compiled)
        compile_s = time.perf_counter() - t0
        compiled, start = _warm_start(compiled, pm_model) if warm_start else (compiled, dict(whitened=False))
        _COMPILED.clear()
        _COMPILED[key] = (compiled, data, compile_s, start)
    return _COMPILED[key]


def _warm_start(compiled: Any, pm_model: Any) -> tuple[Any, dict[str, Any]]:
    """The compiled model whitened at the posterior mode (:mod:`carnk_pkpd.warmstart`), and what that
    cost; the model unchanged (chains started near the prior's centre) if no finite mode is found."""
    from pymc.initial_point import make_initial_point_fn

    from carnk_pkpd.warmstart import flat_layout, flatten, laplace_whitening, subject_blocks, whitened_model

    centre = make_initial_point_fn(model=pm_model, jitter_rvs=set(), return_transformed=True)(0)
    x0 = flatten(centre, flat_layout(pm_model))
    logp = compiled._make_logp_func()  # noqa: SLF001
    shared = dict(compiled._shared_data)  # noqa: SLF001
    w = laplace_whitening(lambda x: logp(x, **shared), x0, subject_blocks(pm_model))
    if w is None:
        return compiled, dict(whitened=False)
    info = dict(
        whitened=True,
        gradients=w.n_gradients,
        seconds=round(w.seconds, 2),
        mode_converged=w.converged,
        logp_mode=round(w.logp_mode, 3),
    )
    return whitened_model(compiled, w), info


#: Fields of nutpie's ``ChainProgress`` that progress reports carry across processes.
_PROGRESS_FIELDS = ("started", "finished_draws", "total_draws", "divergences", "tuning")
_PROGRESS_QUEUE: Any = None  # in a worker process: where its chains' progress goes (set by _worker_init)


def _progress_record(chain_progress: Any) -> dict[str, Any]:
    return {f: getattr(chain_progress, f, None) for f in _PROGRESS_FIELDS}


def _sample_chain(task: dict[str, Any], report: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Sample one chain (in this process or a worker): its draws, sample stats, warm-up tree sizes,
    and the CPU and wall seconds it took. Progress goes to ``report(chain, record)`` (in this process)
    or to the worker's progress queue; Ctrl-C cancels nutpie's sampler (see ``progress.wait_for_sampler``)."""
    import nutpie

    from carnk_pkpd.progress import wait_for_sampler

    compiled, _, compile_s, start = _compiled_model(
        task["spec"], task["cohort"], task["accuracy"], task["key"], task.get("warm_start", True)
    )
    chain = task["chain"]
    if report is None and _PROGRESS_QUEUE is not None:

        def report(c: int, record: dict) -> None:
            _PROGRESS_QUEUE.put((c, record))

    def on_progress(chains: list) -> None:
        if report is not None and chains:
            report(chain, _progress_record(chains[0]))

    c0, w0 = time.process_time(), time.perf_counter()
    sampler = nutpie.sample(
        compiled,
        draws=task["draws"],
        tune=task["tune"],
        chains=1,
        seed=task["seed"],
        cores=1,
        progress_bar=task["progress"],
        save_warmup=True,
        adaptation=task["adaptation"],
        target_accept=task["target_accept"],
        blocking=False,
        progress_callback=on_progress,
        progress_rate=500,
    )
    trace = wait_for_sampler(sampler)  # Ctrl-C cancels the sampler (nutpie's own wait keeps partial draws)
    out = {
        name: trace[name].to_dataset().assign_coords(chain=[chain])
        for name in ("posterior", "sample_stats")
        if name in trace
    }
    warm = trace["warmup_sample_stats"].to_dataset() if "warmup_sample_stats" in trace else None
    out["warmup_n_steps"] = (
        np.asarray(warm["n_steps"]).ravel() if warm is not None and "n_steps" in warm else np.zeros(0)
    )
    out["cpu_seconds"] = time.process_time() - c0
    out["wall_seconds"] = time.perf_counter() - w0
    out["compile_seconds"] = compile_s
    out["warm_start"] = start
    out["pid"] = os.getpid()
    return out


def _worker_init(queue: Any = None, slot: Any = None) -> None:
    """A worker process (:func:`carnk_pkpd.xla.setup_worker`: no Ctrl-C of its own, single-threaded
    XLA), progress to ``queue``. ``slot``: a shared counter that gives each worker its own CPU."""
    global _PROGRESS_QUEUE
    index = None
    if slot is not None:
        with slot.get_lock():
            index = slot.value
            slot.value += 1
    xla.setup_worker(index)
    _PROGRESS_QUEUE = queue


class _ProgressBoard:
    """The latest progress of every chain, handed to ``on_progress`` as a list (chain order)."""

    def __init__(self, tasks: list[dict[str, Any]], on_progress: Callable[[list], None] | None) -> None:
        from types import SimpleNamespace

        self.on_progress = on_progress
        total = lambda t: t["draws"] + t["tune"]  # noqa: E731
        self.chains = [
            SimpleNamespace(started=False, finished_draws=0, total_draws=total(t), divergences=0, tuning=True)
            for t in tasks
        ]

    def update(self, chain: int, record: dict) -> None:
        for k, v in record.items():
            if v is not None:
                setattr(self.chains[chain], k, v)
        self.chains[chain].started = True

    def finish(self, chain: int) -> None:
        c = self.chains[chain]
        c.started, c.finished_draws, c.tuning = True, c.total_draws, False

    def show(self) -> None:
        if self.on_progress is not None:
            self.on_progress(list(self.chains))


def _run_chains(
    tasks: list[dict[str, Any]], workers: int, on_progress: Callable[[list], None] | None = None
) -> list[dict[str, Any]]:
    """Sample the chains in this process (``workers`` 1) or in ``workers`` spawned processes.

    nutpie's JAX backend calls the log density from Python, so its chain threads serialise on the
    GIL (measured: 2 threads kept 0.6 cores busy); separate processes run truly in parallel. Each
    worker compiles the model once and samples its chains one after another. ``on_progress`` gets
    every chain's latest progress about twice a second. Ctrl-C (KeyboardInterrupt) terminates the
    workers at once and is re-raised."""
    board = _ProgressBoard(tasks, on_progress)
    if workers <= 1 or len(tasks) <= 1:

        def report(chain: int, record: dict) -> None:
            board.update(chain, record)
            board.show()

        results = []
        for t in tasks:
            results.append(_sample_chain(t, report))
            board.finish(t["chain"])
            board.show()
        return results
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # JAX is not fork-safe
    progress_queue = ctx.Queue()
    slot = ctx.Value("i", 0) if xla.one_cpu_each(workers) else None  # next CPU for each worker
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(progress_queue, slot)
    )
    try:
        futures = {pool.submit(_sample_chain, t): t["chain"] for t in tasks}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            while True:
                try:
                    chain, record = progress_queue.get_nowait()
                except queue_mod.Empty:
                    break
                board.update(chain, record)
            for f in done:
                board.finish(futures[f])
            board.show()
        results = [f.result() for f in futures]  # chain order; re-raises a worker's error
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):  # stop at once, not after the chains
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return sorted(results, key=lambda r: int(r["posterior"]["chain"].values[0]))


def gradient_accounting(results: list[dict[str, Any]], tune: int, wall: float) -> dict[str, Any]:
    """Where sampling time went: gradient evaluations per phase (the warm start of
    :mod:`carnk_pkpd.warmstart`, once per process; early warm-up = the first ``EARLY_WINDOW`` of
    ``tune``; late warm-up; sampling), summed over chains; CPU seconds per sampling gradient; and
    cores busy (CPU seconds of all chains / wall seconds of sampling)."""
    n_early = int(round(EARLY_WINDOW * tune))
    early = sum(int(r["warmup_n_steps"][:n_early].sum()) for r in results)
    late = sum(int(r["warmup_n_steps"][n_early:].sum()) for r in results)
    sampling = sum(int(np.asarray(r["sample_stats"]["n_steps"]).sum()) for r in results)
    cpu = sum(r["cpu_seconds"] for r in results)
    total = early + late + sampling
    starts = {r["pid"]: r.get("warm_start") or {} for r in results}  # computed once per process
    return dict(
        gradients_warm_start=sum(int(v.get("gradients", 0)) for v in starts.values()),
        warm_start_seconds=round(
            max((float(v.get("seconds", 0.0)) for v in starts.values()), default=0.0), 2
        ),
        whitened=all(v.get("whitened", False) for v in starts.values()),
        gradients_early_warmup=early,
        gradients_late_warmup=late,
        gradients_sampling=sampling,
        gradients_total=total,
        cpu_ms_per_gradient=round(1e3 * cpu / total, 3) if total else None,
        cpu_seconds=round(cpu, 2),
        cores_busy=round(cpu / wall, 2) if wall > 0 else None,
        worker_processes=len({r["pid"] for r in results}),
    )


def fit(
    cohort: Any,
    model: Any = "reference",
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    seed: int = 1,
    *,
    cores: int | None = None,
    progress: bool = True,
    accuracy: str = "default",
    adaptation: str = "diag",
    target_accept: float = TARGET_ACCEPT,
    warm_start: bool = True,
    on_stage: Callable[[str], None] | None = None,
    on_progress: Callable[[list], None] | None = None,
) -> Fit:
    """Fit the hierarchical model of ``model`` to ``cohort`` with nutpie's NUTS.

    Parameters
    ----------
    cohort
        A :class:`~carnk_pkpd.data.Cohort` or a path to a cohort CSV.
    model
        A :class:`~carnk_pkpd.spec.ModelSpec`, a model name (``models/<name>.toml``) or a path.
    draws, tune, chains
        Posterior draws and warm-up iterations per chain, number of chains.
    seed
        Seed of the sampler; chain ``c`` samples with ``chain_seeds(seed, chains)[c]``, so the same
        seed gives the same draws on the same machine whatever ``cores`` is.
    cores
        Worker processes sampling chains in parallel (default: ``min(chains, CPUs)``); 1 samples the
        chains one after another in this process. Each worker compiles the model once (single-
        threaded XLA). Workers are spawned, so a script that calls ``fit`` at top level needs an
        ``if __name__ == "__main__":`` guard (or ``cores=1``); notebooks and the CLI need nothing.
    adaptation
        nutpie's mass-matrix adaptation: ``"diag"`` (default) or ``"low_rank"``. The warm start
        already whitens the correlations of typical values, BSV SDs and η's (a dense Laplace
        scale), so a diagonal adaptation on top is enough; measured with ``bench_fit.py`` (one
        chain, 200 + 200): reference cohort 87 vs 277 leapfrog steps per draw, trial365 69 vs 100,
        with the same or higher ESS (``"low_rank"`` was the default before the warm start).
    target_accept
        NUTS's target acceptance rate during warm-up (step-size adaptation). Higher values take
        smaller steps: fewer divergences, more gradient evaluations per draw.
    warm_start
        Start the chains at the posterior mode's Laplace scale and sample on the whitened scale
        (:mod:`carnk_pkpd.warmstart`; the posterior is unchanged); False starts them near the
        prior's centre on the model's own scale.
    on_progress
        Called from a background thread about twice a second with nutpie's ``ChainProgress`` list
        (see :func:`carnk_pkpd.progress.sampler_status`). Ctrl-C (KeyboardInterrupt) while sampling
        cancels the sampler and is re-raised; nothing of the interrupted fit is kept.

    Warns (``IdentifiabilityWarning``) when there are fewer than 5 subjects per estimated BSV SD.
    """
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept must lie in (0, 1), got {target_accept}")

    from carnk_pkpd.data import Cohort, read_cohort
    from carnk_pkpd.diagnostics import diagnose
    from carnk_pkpd.loglik import add_log_likelihood
    from carnk_pkpd.spec import ModelSpec, load_model
    from carnk_pkpd.statistical import observation_data

    stage = on_stage or (lambda s: None)
    data_path = None
    if not isinstance(cohort, Cohort):
        data_path = Path(cohort)
        cohort = read_cohort(data_path)
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    data = observation_data(cohort)
    if len(data.dv) == 0:
        raise ValueError(f"{cohort.source or 'cohort'}: no CAR-NK or B-cell records (DVID 1-3) to fit")
    from carnk_pkpd.errors import warn_bsv_identifiability

    warn_bsv_identifiability(len(spec.estimated_bsv()), data.n_subjects, cohort.source)
    workers = max(1, min(chains, cores or (os.cpu_count() or 1)))
    key = _model_key(spec, cohort, accuracy, warm_start)
    tasks = [
        dict(
            key=key,
            spec=spec,
            cohort=cohort,
            accuracy=accuracy,
            chain=c,
            seed=s,
            draws=draws,
            tune=tune,
            progress=progress and workers == 1,
            adaptation=adaptation,
            target_accept=target_accept,
            warm_start=warm_start,
        )
        for c, s in enumerate(chain_seeds(seed, chains))
    ]
    t0 = time.perf_counter()
    if workers == 1:
        stage("building the PyMC model and compiling (JAX)")
        _compiled_model(spec, cohort, accuracy, key, warm_start)
        t_compile = time.perf_counter() - t0
        stage(f"sampling {chains} chains x ({tune} tune + {draws} draws)")
    else:
        stage(f"sampling {chains} chains x ({tune} tune + {draws} draws) in {workers} processes")
    t1 = time.perf_counter()
    results = _run_chains(tasks, workers, on_progress)
    t_run = time.perf_counter() - t1
    if workers > 1:
        # the workers start (import, build, compile) in parallel, then sample their chains in turn:
        # sampling wall = the busiest worker's chain time; compile = the slowest worker's compile
        busy: dict[int, float] = {}
        for r in results:
            busy[r["pid"]] = busy.get(r["pid"], 0.0) + r["wall_seconds"]
        t_sample = max(busy.values())
        t_compile = max(r["compile_seconds"] for r in results)
    else:
        t_sample = t_run
    trace = {
        name: xr.concat([r[name] for r in results], dim="chain")
        for name in ("posterior", "sample_stats")
        if all(name in r for r in results)
    }
    accounting = gradient_accounting(results, tune, t_sample)
    groups = dict(trace)
    groups["constant_data"] = records_dataset(data)
    groups["observed_data"] = xr.Dataset(
        {"DV": ("record", data.dv)}, coords={"record": np.arange(len(data.dv))}
    )
    idata = xr.DataTree.from_dict({f"/{k}": v for k, v in groups.items()})
    idata = add_log_likelihood(idata, spec, data, accuracy=accuracy)  # after sampling: loglik.py
    diag = diagnose(groups["posterior"], groups.get("sample_stats"))
    ess = diag.min_ess_bulk
    manifest = dict(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        data_file=str(data_path or cohort.source or ""),
        data_sha256=sha256(data_path) if data_path else (sha256(cohort.source) if cohort.source else None),
        model_file=str(spec.source_file or ""),
        model_sha256=sha256(spec.source_file) if spec.source_file else None,
        model_name=spec.name,
        versions=_versions(),
        seed=seed,
        sampler=dict(
            name="nutpie NUTS",
            backend="jax",
            workers=workers,
            chain_seeds=[t["seed"] for t in tasks],
            draws=draws,
            tune=tune,
            chains=chains,
            accuracy=accuracy,
            adaptation=adaptation,
            target_accept=target_accept,
            start="posterior mode, Laplace-whitened scale" if warm_start else "prior centre",
        ),
        timings=dict(
            wall_seconds=round(time.perf_counter() - t0, 2),
            compile_seconds=round(t_compile, 2),
            sampling_seconds=round(t_sample, 2),
            min_ess_bulk_per_second=round(ess / t_sample, 3) if np.isfinite(ess) else None,
            **accounting,
        ),
        n_subjects=data.n_subjects,
        n_records=int(len(data.dv)),
        n_blq=int(data.blq.sum()),
    )
    return Fit(spec=spec, cohort=cohort, idata=idata, diagnostics=diag, manifest=manifest)
