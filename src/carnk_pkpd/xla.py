"""XLA settings for the CPU backend, applied before JAX starts its backend.

JAX reads ``XLA_FLAGS`` once, when the first computation runs. Worker processes (fit chains, and
the local Dask workers of the dose search and the SBC: :func:`local_cluster`) run
:func:`setup_worker` before it: single-threaded XLA flags and a CPU each (:func:`pin`), so that W
workers use W cores without oversubscribing them (measured: XLA's
intra-op threads do not pay off for this model's small arrays). The user's own flags come first
and win.

Pinning is what makes it one thread: with jax 0.12 the flags alone leave two ``tf_XLAEigen``
threads in a process on this 2-core machine, and a process limited to one CPU gets one (checked by
listing ``/proc/self/task``). Measured (``benchmarks/bench_fit.py --scenario trial365 --draws 200
--tune 200``, 4 chains in 2 workers, identical draws): 3.43 CPU ms per gradient and 283 s wall
unpinned, 2.46 ms and 210 s pinned.

Not adopted: ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK library fusions). Measured with
``benchmarks/bench_solver.py --sections e``, both variants at once on the two cores and then with
the cores swapped: 5.84 / 6.94 ms without and 6.14 / 6.98 ms with it (20 subjects), 51.0 / 54.9 vs
52.0 / 58.3 ms (60 subjects). An earlier 23-26% gain, taken one variant after the other on a loaded
machine, was load noise.
"""

from __future__ import annotations

import os
from typing import Any

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def merged_flags(user: str, single_thread: bool = False) -> str:
    """``user``'s XLA_FLAGS plus this package's, skipping any flag name the user already set."""
    have = {f.split("=", 1)[0] for f in user.split()}
    ours = SINGLE_THREAD.split() if single_thread else []
    return " ".join([*user.split(), *(f for f in ours if f.split("=", 1)[0] not in have)])


def configure(single_thread: bool = False) -> None:
    """Add this package's flags to ``os.environ['XLA_FLAGS']`` (no effect after JAX's first computation
    in this process)."""
    os.environ["XLA_FLAGS"] = merged_flags(os.environ.get("XLA_FLAGS", ""), single_thread)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def one_cpu_each(n_workers: int) -> bool:
    """Whether ``n_workers`` worker processes get a CPU each (:func:`pin`): only when there are
    enough CPUs; more workers than CPUs run unpinned and the OS shares the cores."""
    return n_workers <= len(usable_cpus())


def pin(index: int) -> bool:
    """Keep this process on one CPU, the ``index``-th usable one (round robin); True when pinned.

    Call it before JAX's first computation: XLA sizes its CPU thread pool from the CPUs the process
    may use, so a pinned worker runs one XLA thread. The flags of :data:`SINGLE_THREAD` alone no longer
    do that (jax 0.12: two ``tf_XLAEigen`` threads per process kept working through them).
    """
    if os.environ.get("CARNK_PIN", "1") == "0":
        return False
    cpus = usable_cpus()
    if len(cpus) < 2 or not hasattr(os, "sched_setaffinity"):
        return False
    os.sched_setaffinity(0, {cpus[index % len(cpus)]})
    return True


def setup_worker(index: int | None = None) -> None:
    """Prepare a worker process (fit chains, local Dask workers) before JAX's first computation:
    ignore Ctrl-C, :func:`pin` it to the ``index``-th CPU (None: not pinned), single-threaded XLA
    flags and ``OMP_NUM_THREADS=1`` unless the user set them. A terminal's Ctrl-C reaches every
    process of the group; the parent stops its workers itself, so a worker that stopped on its own
    would only print a traceback or leave a pool half-stopped."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if index is not None:
        pin(index)
    configure(single_thread=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def setup_dask_worker(dask_worker: Any, pinned: bool = True) -> None:
    """:func:`setup_worker` for a worker process of a ``LocalCluster``, pinned by its name (0, 1, …)
    when ``pinned``; for ``client.run``, which passes the worker. Run it before the first task."""
    try:
        index = int(dask_worker.name) if pinned else None
    except (TypeError, ValueError):
        index = None
    setup_worker(index)


def local_cluster(n_workers: int) -> tuple[Any, Any]:
    """A Dask ``LocalCluster`` of ``n_workers`` single-threaded worker processes, each pinned to its
    own CPU when there are enough (:func:`one_cpu_each`, :func:`setup_dask_worker`), and its
    ``Client``: ``(cluster, client)``; close both.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker by default. Setting it turns off
    glibc's dynamic mmap threshold, so each of the solver's large temporary arrays is mapped and
    unmapped again: measured, the dose search's tasks ran at 4.0k trajectories/s per core with it and
    6.6k without (one pinned process, ``benchmarks/bench_doses.py``'s task). The workers here start
    without it (a value the user exported stays; the other thread limits Dask sets are kept).
    """
    import dask
    from dask.distributed import Client, LocalCluster

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
    client = Client(cluster)
    client.run(setup_dask_worker, pinned=one_cpu_each(n_workers))
    return cluster, client
