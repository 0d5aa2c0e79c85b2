"""Sampling: build the PyMC model, compile it for nutpie (JAX backend), sample, diagnose.

nutpie runs the chains in parallel native threads and calls the JAX-compiled log density with
``jax.grad`` gradients (the structural solver enters as a JAX op, so one reverse pass covers the
solver and the likelihood; PyTensor's own gradient of a JAX op would run the solver a second time
inside a separate VJP op). The likelihood avoids ``pm.Censored``, whose unused branch gives NaN
gradients under ``jax.grad`` (see ``statistical.normal_lcdf``).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

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
    adaptation: str = "low_rank",
    target_accept: float = TARGET_ACCEPT,
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
        Seed of the sampler; the same seed gives the same draws on the same machine.
    adaptation
        nutpie's mass-matrix adaptation: ``"low_rank"`` (default: on the reference cohort it needs
        ~19 leapfrog steps per draw against ~58 for ``"diag"``, because typical values, BSV SDs and
        the individual deviations are correlated) or ``"diag"``.
    target_accept
        NUTS's target acceptance rate during warm-up (step-size adaptation). Higher values take
        smaller steps: fewer divergences, more gradient evaluations per draw.
    on_progress
        Called from a background thread about twice a second with nutpie's ``ChainProgress`` list
        (see :func:`carnk_pkpd.progress.sampler_status`). Ctrl-C (KeyboardInterrupt) while sampling
        cancels the sampler and is re-raised; nothing of the interrupted fit is kept.

    Warns (``IdentifiabilityWarning``) when there are fewer than 5 subjects per estimated BSV SD.
    """
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept must lie in (0, 1), got {target_accept}")
    import nutpie

    from carnk_pkpd.data import Cohort, read_cohort
    from carnk_pkpd.diagnostics import diagnose
    from carnk_pkpd.loglik import add_log_likelihood
    from carnk_pkpd.spec import ModelSpec, load_model
    from carnk_pkpd.statistical import build_model, observation_data

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
    stage("building the PyMC model")
    pm_model = build_model(spec, data, accuracy=accuracy)
    stage("compiling (JAX)")
    t0 = time.perf_counter()
    compiled = nutpie.compile_pymc_model(pm_model, backend="jax", gradient_backend="jax")
    _compile_now(compiled)
    t_compile = time.perf_counter() - t0
    stage(f"sampling {chains} chains x ({tune} tune + {draws} draws)")
    t1 = time.perf_counter()
    from carnk_pkpd.progress import wait_for_sampler

    sampler = nutpie.sample(
        compiled,
        draws=draws,
        tune=tune,
        chains=chains,
        seed=seed,
        cores=cores or min(chains, os.cpu_count() or 1),
        progress_bar=progress,
        save_warmup=False,
        adaptation=adaptation,
        target_accept=target_accept,
        blocking=False,
        progress_callback=on_progress,
        progress_rate=500,
    )
    trace = wait_for_sampler(sampler)  # Ctrl-C cancels the sampler (nutpie's own wait keeps partial draws)
    t_sample = time.perf_counter() - t1
    groups = {name: trace[name].to_dataset() for name in ("posterior", "sample_stats") if name in trace}
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
            draws=draws,
            tune=tune,
            chains=chains,
            accuracy=accuracy,
            adaptation=adaptation,
            target_accept=target_accept,
        ),
        timings=dict(
            compile_seconds=round(t_compile, 2),
            sampling_seconds=round(t_sample, 2),
            min_ess_bulk_per_second=round(ess / t_sample, 3) if np.isfinite(ess) else None,
        ),
        n_subjects=data.n_subjects,
        n_records=int(len(data.dv)),
        n_blq=int(data.blq.sum()),
    )
    return Fit(spec=spec, cohort=cohort, idata=idata, diagnostics=diag, manifest=manifest)
