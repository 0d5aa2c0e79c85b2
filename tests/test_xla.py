"""XLA flags of worker processes: one thread each, the user's own flags first and never doubled."""

import os
import subprocess
import sys

from carnk_pkpd import xla


def test_user_flags_win_and_workers_get_one_thread():
    merged = xla.merged_flags("--xla_cpu_multi_thread_eigen=true --foo=1", single_thread=True)
    parts = merged.split()
    assert parts[:2] == ["--xla_cpu_multi_thread_eigen=true", "--foo=1"]  # the user's value is kept
    assert sum(p.startswith("--xla_cpu_multi_thread_eigen") for p in parts) == 1
    assert "intra_op_parallelism_threads=1" in parts
    assert xla.merged_flags(merged, single_thread=True) == merged  # parent, then worker: nothing doubled
    assert xla.merged_flags("", single_thread=False) == ""


def test_installed_jaxlib_accepts_the_flags():
    """A flag unknown to the installed jaxlib would abort JAX's first computation: run one."""
    env = dict(os.environ, XLA_FLAGS="")
    code = (
        "from carnk_pkpd import xla; xla.configure(single_thread=True); import jax.numpy as j; "
        "print(float(j.ones(3).sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "3.0"
