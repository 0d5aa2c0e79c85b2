"""XLA settings for the CPU backend, applied before JAX starts its backend.

JAX reads ``XLA_FLAGS`` once, when the first computation runs. :func:`configure` adds this package's
flags to whatever the user set (theirs come first and win) and must run before that first
computation: :mod:`carnk_pkpd.structural.solve` calls it on import, and every worker process calls
:func:`configure` with ``single_thread=True`` before it imports JAX.

Flags:

- ``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK library fusions). This model's
  solver is ~100 tiny array operations per step; XLA's library fusions for them were slower than
  its own loops in reverse mode. Measured with ``benchmarks/bench_solver.py --sections e``: value
  and gradient 23-26% cheaper (20 to 60 subjects). Only set for the jaxlib series it was measured on
  (:data:`YNN_FLAG_SERIES`), because an XLA flag unknown to a jaxlib aborts the process.
- ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` in worker processes: one
  thread each, so that W workers use W cores without oversubscribing them.

Set ``CARNK_PKPD_XLA_DEFAULTS=0`` to leave out the YNNPACK flag (worker processes still get one
thread each).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

#: (major, minor) jaxlib series on which the YNNPACK flag was measured and is known to parse.
YNN_FLAG_SERIES = ((0, 12),)
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _jaxlib_series() -> tuple[int, int] | None:
    try:
        parts = version("jaxlib").split(".")
        return int(parts[0]), int(parts[1])
    except (PackageNotFoundError, ValueError, IndexError):
        return None


def package_flags(single_thread: bool = False) -> list[str]:
    """The flags this package adds for the installed jaxlib (see the module doc)."""
    flags = []
    if os.environ.get("CARNK_PKPD_XLA_DEFAULTS", "1") != "0" and _jaxlib_series() in YNN_FLAG_SERIES:
        flags.append(YNN_FLAG)
    if single_thread:
        flags.extend(SINGLE_THREAD.split())
    return flags


def merged_flags(user: str, single_thread: bool = False) -> str:
    """``user``'s XLA_FLAGS plus this package's, skipping any flag name the user already set."""
    have = {f.split("=", 1)[0] for f in user.split()}
    extra = [f for f in package_flags(single_thread) if f.split("=", 1)[0] not in have]
    return " ".join([*user.split(), *extra])


def configure(single_thread: bool = False) -> None:
    """Add this package's flags to ``os.environ['XLA_FLAGS']`` (no effect after JAX's first computation
    in this process)."""
    os.environ["XLA_FLAGS"] = merged_flags(os.environ.get("XLA_FLAGS", ""), single_thread)
