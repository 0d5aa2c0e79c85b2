"""XLA flags: the user's come first, a worker gets one thread, the YNNPACK flag only on known jaxlib."""

import os
import subprocess
import sys

from carnk_pkpd import xla


def test_user_flags_win_and_workers_get_one_thread(monkeypatch):
    monkeypatch.setattr(xla, "_jaxlib_series", lambda: xla.YNN_FLAG_SERIES[0])
    merged = xla.merged_flags("--xla_cpu_experimental_ynn_fusion_type=dot --foo=1", single_thread=True)
    parts = merged.split()
    assert parts[:2] == ["--xla_cpu_experimental_ynn_fusion_type=dot", "--foo=1"]  # user's value kept
    assert sum(p.startswith("--xla_cpu_experimental_ynn_fusion_type") for p in parts) == 1
    assert "intra_op_parallelism_threads=1" in parts and "--xla_cpu_multi_thread_eigen=false" in parts
    # applied twice (parent, then worker): nothing doubled
    assert xla.merged_flags(merged, single_thread=True) == merged


def test_ynn_flag_only_for_measured_jaxlib_and_opt_out(monkeypatch):
    monkeypatch.setattr(xla, "_jaxlib_series", lambda: (99, 0))
    assert xla.YNN_FLAG not in xla.package_flags()
    monkeypatch.setattr(xla, "_jaxlib_series", lambda: xla.YNN_FLAG_SERIES[0])
    assert xla.package_flags() == [xla.YNN_FLAG]
    monkeypatch.setenv("CARNK_PKPD_XLA_DEFAULTS", "0")
    assert xla.package_flags() == []
    assert xla.package_flags(single_thread=True) == xla.SINGLE_THREAD.split()


def test_installed_jaxlib_accepts_the_flags():
    """A flag unknown to the installed jaxlib would abort JAX's first computation: run one."""
    env = dict(os.environ, XLA_FLAGS="")
    code = (
        "from carnk_pkpd import xla; xla.configure(single_thread=True); import jax.numpy as j; "
        "import os; print(float(j.ones(3).sum())); print(os.environ['XLA_FLAGS'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "3.0"
