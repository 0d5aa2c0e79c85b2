"""Simulation-based calibration (SBC, Talts et al. 2018) of a model file's fit, on Dask.

For cohort ``k = 1..N``: draw the population parameters from the fit's own prior (the PyMC model
that :func:`carnk_pkpd.inference.fit` samples, so the prior is exactly the fitted one), simulate a
SYNTHETIC cohort of the trial design from them (:func:`carnk_pkpd.cohortsim.simulate_cohort`, BSV
only where the fit estimates it), fit it with short chains, and record per population parameter the
rank of the true value among ``L`` thinned posterior draws (0..L). If the fit is calibrated, every
parameter's ranks are uniform on 0..L; the report gives rank histograms and a chi-square test of
uniformity per parameter.

Cohorts are independent tasks on a Dask cluster (a ``LocalCluster`` by default, or a scheduler
address), each fit single-process (``cores=1``) so that one Dask worker process runs one fit.
Every random step takes its seed from ``numpy.random.SeedSequence(seed)``: cohort ``k`` gets the same
prior draw, data and sampler seed wherever it runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carnk_pkpd import xla

#: Trial design: subjects per dose level (ACR 2024 abstract L17: 1/1/5/13).
TRIAL_DESIGN = "1:1,2:1,3:5,4:13"


@dataclass(frozen=True)
class SBCSettings:
    """Settings of one SBC run (per cohort: design, follow-up, sampler)."""

    n_cohorts: int
    seed: int = 0
    design: str = TRIAL_DESIGN
    follow_up: float | None = None  # days for all subjects; None draws each like the trial
    draws: int = 200
    tune: int = 200
    chains: int = 2
    n_ranks: int = 99  # L: thinned posterior draws per parameter (ranks 0..L)
    bins: int = 10  # histogram bins for the chi-square test
    dvids: tuple[int, ...] = (1, 2)  # concentration measures simulated (1 CAR flow, 2 B cells, 3 qPCR)


def _seeds(seed: int, n: int) -> list[tuple[int, int, int]]:
    """Per cohort: (prior-draw seed, cohort seed, sampler seed)."""
    out = []
    for child in np.random.SeedSequence(seed).spawn(n):
        a, b, c = (int(x) for x in child.generate_state(3, dtype=np.uint32))
        out.append((a, b, c))
    return out


def population_names(spec: Any, dvids: Sequence[int] = (1, 2)) -> list[str]:
    """Population parameters checked by SBC: typical values of free parameters, BSV SDs
    (``omega_<p>``) where estimated, and estimated residual SDs / conversion factors of the
    observations ``dvids`` that the simulated cohorts hold."""
    names = [p for p in spec.free_parameters() if p != "n_transit"]
    names += [f"omega_{p}" for p in spec.estimated_bsv()]
    for dvid, obs in spec.observations.items():
        if dvid not in dvids:
            continue
        if obs.error == "lognormal":
            labels = {"log": f"sigma_{obs.name}"}
        else:
            labels = {"prop": f"sigma_{obs.name}_prop", "add": f"sigma_{obs.name}_add"}
        for comp, label in labels.items():
            if obs.residual[comp].estimate and obs.residual[comp].prior is not None:
                names.append(label)
        if obs.conversion is not None and obs.conversion.estimate:
            names.append(obs.conversion.name)
    return names


def draw_prior(spec: Any, cohort: Any, seed: int, names: Sequence[str]) -> dict[str, float]:
    """One draw of the population parameters ``names`` from the prior of the fitted PyMC model."""
    import pymc as pm

    from carnk_pkpd.statistical import build_model, observation_data

    model = build_model(spec, observation_data(cohort))
    present = [n for n in names if n in model.named_vars]
    values = pm.draw([model[n] for n in present], random_seed=seed)
    return {n: float(np.asarray(v)) for n, v in zip(present, values, strict=True)}


def simulation_spec(spec: Any, truth: Mapping[str, float]) -> Any:
    """``spec`` with BSV SDs and residual SDs / conversion factors set to ``truth`` (typical values are
    passed to ``simulate_cohort`` separately). Used to SIMULATE only; fits use the original spec."""
    from dataclasses import replace

    params = {
        name: replace(p, bsv_sd=float(truth[f"omega_{name}"])) if f"omega_{name}" in truth else p
        for name, p in spec.parameters.items()
    }
    observations = {}
    for dvid, obs in spec.observations.items():
        residual = {}
        for comp, sc in obs.residual.items():
            label = f"sigma_{obs.name}" if comp == "log" else f"sigma_{obs.name}_{comp}"
            residual[comp] = replace(sc, typical=float(truth[label])) if label in truth else sc
        conv = obs.conversion
        if conv is not None and conv.name in truth:
            conv = replace(conv, typical=float(truth[conv.name]))
        observations[dvid] = replace(obs, residual=residual, conversion=conv)
    return replace(spec, parameters=params, observations=observations)


def simulate_from_prior(spec: Any, settings: SBCSettings, k: int) -> tuple[Any, dict[str, float]]:
    """Cohort ``k`` of an SBC run: the prior draw (truth) and a SYNTHETIC cohort simulated from it."""
    from carnk_pkpd.cohortsim import simulate_cohort

    prior_seed, cohort_seed, _ = _seeds(settings.seed, settings.n_cohorts)[k]
    names = population_names(spec, settings.dvids)
    # the prior does not depend on the data; a cohort of the design only gives the model its shape
    shape_cohort, _ = simulate_cohort(
        spec,
        settings.design,
        seed=cohort_seed,
        follow_up=settings.follow_up,
        bsv="estimated",
        dvids=settings.dvids,
    )
    truth = draw_prior(spec, shape_cohort, prior_seed, names)
    typical = {p: truth[p] for p in spec.free_parameters() if p in truth}
    cohort, _ = simulate_cohort(
        simulation_spec(spec, truth),
        settings.design,
        seed=cohort_seed,
        truth=typical,
        follow_up=settings.follow_up,
        bsv="estimated",
        dvids=settings.dvids,
    )
    return cohort, truth


def rank_of(truth: float, draws: np.ndarray, n_ranks: int) -> int:
    """Rank of ``truth`` among ``n_ranks`` draws thinned evenly from ``draws`` (0..n_ranks)."""
    flat = np.asarray(draws, float).ravel()
    idx = np.linspace(0, flat.size - 1, n_ranks).round().astype(int)
    return int(np.sum(flat[idx] < truth))


def run_cohort(spec: Any, settings: SBCSettings, k: int) -> list[dict[str, Any]]:
    """Simulate cohort ``k``, fit it (one process), and return one row per population parameter."""
    from carnk_pkpd.inference import fit

    cohort, truth = simulate_from_prior(spec, settings, k)
    sampler_seed = _seeds(settings.seed, settings.n_cohorts)[k][2]
    result = fit(
        cohort,
        spec,
        draws=settings.draws,
        tune=settings.tune,
        chains=settings.chains,
        seed=sampler_seed,
        cores=1,
        progress=False,
    )
    post = result.idata["posterior"]
    d = result.diagnostics
    rows = []
    for name, value in truth.items():
        if name not in post:
            continue
        rows.append(
            dict(
                cohort=k,
                parameter=name,
                truth=value,
                rank=rank_of(value, post[name].values, settings.n_ranks),
                n_ranks=settings.n_ranks,
                divergences=int(d.divergences),
                max_r_hat=float(d.max_r_hat),
                min_ess_bulk=float(d.min_ess_bulk),
            )
        )
    return rows


def uniformity(ranks: pd.DataFrame, n_ranks: int, bins: int) -> pd.DataFrame:
    """Per parameter: chi-square test that the ranks (0..n_ranks) are uniform, over ``bins`` equal
    bins of the L + 1 rank values (``bins`` must divide L + 1). Columns parameter, n, chi2, df,
    p_value, and the bin counts."""
    from scipy import stats

    if (n_ranks + 1) % bins:
        raise ValueError(f"bins ({bins}) must divide n_ranks + 1 ({n_ranks + 1})")
    out = []
    for name, grp in ranks.groupby("parameter", sort=False):
        counts = np.bincount(grp["rank"].to_numpy(int) * bins // (n_ranks + 1), minlength=bins)
        expected = np.full(bins, counts.sum() / bins)
        chi2, p = stats.chisquare(counts, expected)
        row = dict(parameter=name, n=int(counts.sum()), chi2=float(chi2), df=bins - 1, p_value=float(p))
        row.update({f"bin{b}": int(c) for b, c in enumerate(counts)})
        out.append(row)
    return pd.DataFrame(out)


def _plot(ranks: pd.DataFrame, summary: pd.DataFrame, n_ranks: int, bins: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["parameter"])
    ncol = min(4, max(1, len(names)))
    nrow = int(np.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    for ax, (_, row) in zip(axes.ravel(), summary.iterrows(), strict=False):
        counts = [row[f"bin{b}"] for b in range(bins)]
        ax.bar(np.arange(bins), counts, width=0.9, color="0.5")
        ax.axhline(row["n"] / bins, color="k", lw=1)
        ax.set_title(f"{row['parameter']} (p = {row['p_value']:.2f})", fontsize=9)
        ax.set_xticks([])
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"SBC rank histograms (SYNTHETIC cohorts; ranks 0..{n_ranks} in {bins} bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sbc(
    model: Any,
    settings: SBCSettings,
    out: str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run SBC and write ``ranks.csv``, ``uniformity.csv`` and ``rank_histograms.png`` to ``out``.

    ``scheduler``: None starts a Dask ``LocalCluster`` (one single-threaded worker process per CPU),
    ``"sync"`` runs the cohorts one after another in this process (tests, debugging), anything else
    is a Dask scheduler address (``tcp://host:8786``). The folder is written to a temporary sibling
    and renamed, so ``out`` is either complete or absent. Returns ``{"ranks", "uniformity", "out",
    "fits_failing"}`` (cohorts whose fit had divergences or R-hat > 1.01: their ranks are suspect).
    """
    from carnk_pkpd.spec import ModelSpec, load_model

    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if settings.n_cohorts < 1:
        raise ValueError(f"n_cohorts must be >= 1, got {settings.n_cohorts}")
    if (settings.n_ranks + 1) % settings.bins:
        raise ValueError(f"bins ({settings.bins}) must divide n_ranks + 1 ({settings.n_ranks + 1})")
    if settings.draws * settings.chains < settings.n_ranks:
        raise ValueError(
            f"draws x chains ({settings.draws * settings.chains}) must be >= n_ranks ({settings.n_ranks})"
        )
    if any(spec.parameters[p].dose_level_tier for p in spec.free_parameters()) or spec.covariates:
        raise ValueError(
            f"{spec.source_file or spec.name}: SBC simulates with cohortsim, which has no dose-level tier "
            "or covariate effects; remove them from the model file for SBC"
        )
    from carnk_pkpd.atomic import atomic_folder, check_folder_output

    dest = Path(out)
    # the output rule, checked before hours of fits: a new folder, or this command's own earlier output
    check_folder_output(dest, "sbc", command="sbc", overwrite=overwrite, needs_overwrite=True)
    ks = list(range(settings.n_cohorts))
    if scheduler == "sync":
        per_cohort = [run_cohort(spec, settings, k) for k in ks]
    else:
        per_cohort = _run_dask(spec, settings, ks, scheduler)
    ranks = pd.DataFrame([row for rows in per_cohort for row in rows])
    summary = uniformity(ranks, settings.n_ranks, settings.bins)
    with atomic_folder(dest, overwrite=overwrite, kind="sbc", command="sbc") as tmp:
        ranks.to_csv(tmp / "ranks.csv", index=False)
        summary.to_csv(tmp / "uniformity.csv", index=False)
        _plot(ranks, summary, settings.n_ranks, settings.bins, tmp / "rank_histograms.png")
    per_fit = ranks.groupby("cohort").first()
    failing = int(((per_fit.divergences > 0) | ~(per_fit.max_r_hat <= 1.01)).sum())
    return {"ranks": ranks, "uniformity": summary, "out": dest, "fits_failing": failing}


def _run_dask(spec: Any, settings: SBCSettings, ks: list[int], scheduler: str | None) -> list[Any]:
    from dask.distributed import Client

    cluster = None
    if scheduler is None:
        cluster, client = xla.local_cluster(len(xla.usable_cpus()))  # single-threaded, one CPU each
    else:
        client = Client(scheduler)
    try:
        futures = [client.submit(run_cohort, spec, settings, k, pure=False) for k in ks]
        return client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
