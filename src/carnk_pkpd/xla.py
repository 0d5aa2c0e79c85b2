"""XLA settings for the CPU backend, applied before JAX starts its backend.

JAX reads ``XLA_FLAGS`` once, when the first computation runs. Worker processes (fit chains, the
Dask SBC cluster) call :func:`configure` with ``single_thread=True`` before they import JAX: one
XLA thread each, so that W workers use W cores without oversubscribing them (measured: XLA's
intra-op threads do not pay off for this model's small arrays). The user's own flags come first
and win.

Not adopted: ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK library fusions). Measured with
``benchmarks/bench_solver.py --sections e``, both variants at once on the two cores and then with
the cores swapped: 5.84 / 6.94 ms without and 6.14 / 6.98 ms with it (20 subjects), 51.0 / 54.9 vs
52.0 / 58.3 ms (60 subjects). An earlier 23-26% gain, taken one variant after the other on a loaded
machine, was load noise.
"""

from __future__ import annotations

import os

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
