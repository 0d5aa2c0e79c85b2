"""Compare saved fits of the same data by PSIS-LOO (Vehtari et al. 2017, 2024): leave one record
out (default) or leave one subject out (``unit="subject"``).

Each fit's pointwise log-likelihood (``log_likelihood`` group, :mod:`carnk_pkpd.loglik`) is joined
over its observation types into one ``record`` dim, so a model is judged on every concentration
record (BLQ records by their M3 probability). ArviZ computes the PSIS-LOO elpd of each fit, the
difference to the best one and the standard error of that difference (from the paired pointwise
differences), and the Pareto-k diagnostics: records with k above ArviZ's threshold ``good_k``
(``min(1 − 1/log10(S), 0.7)`` for S draws) make that fit's elpd unreliable (then refit with more
draws, or do K-fold cross-validation for those records).

Leaving a record out asks how well a model predicts a subject's next sample given that subject's
other samples: each subject's η absorbs whatever the population model gets wrong about that subject,
so a dose-level tier or a covariate, which only moves where a subject's η starts, is nearly invisible
to it. Leaving a subject out (``unit="subject"``) asks how well the model predicts a NEW subject of
that design: it uses each subject's likelihood with its η integrated out at every posterior draw
(:func:`carnk_pkpd.loglik.subject_marginal_log_likelihood`, importance sampling, computed on demand,
thinned to ``max_draws`` draws) and is the comparison for population structure.

Fits are comparable only when they were fitted to the same records: the SHA-256 of each fit's
``data.csv`` (in ``manifest.json``) must agree, and so must the records themselves.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from carnk_pkpd.errors import FitError

__all__ = ["compare_fits"]

COLUMNS = [
    "model", "rank", "elpd_loo", "se", "elpd_diff", "dse", "p_loo", "weight", "n_records", "good_k",
    "k_good", "k_bad", "k_very_bad", "warning",
]  # fmt: skip


def _label(fit: Any, k: int) -> str:
    if fit.path is not None:
        return Path(fit.path).name
    return f"{fit.spec.name}_{k + 1}"


def _data_digest(fit: Any) -> str | None:
    return ((fit.manifest or {}).get("files") or {}).get("data.csv")


def _records(fit: Any) -> pd.DataFrame:
    rec = fit.idata["constant_data"].to_dataset()
    return pd.DataFrame({k: rec[k].values for k in ("ID", "TIME", "DVID", "DV", "BLQ")})


def _check_same_data(fits: list[Any], labels: list[str]) -> None:
    digests = [_data_digest(f) for f in fits]
    if all(d is not None for d in digests) and len(set(digests)) > 1:
        lines = [f"  {lab}: data.csv SHA-256 {d[:12]}…" for lab, d in zip(labels, digests, strict=True)]
        raise FitError("the fits were made from different data; LOO compares fits of the same data only:\n"
                       + "\n".join(lines))  # fmt: skip
    first = _records(fits[0])
    for fit, lab in zip(fits[1:], labels[1:], strict=True):
        other = _records(fit)
        if not (first.shape == other.shape and first.equals(other)):
            raise FitError(f"{lab}: its concentration records differ from those of {labels[0]}; "
                           "LOO compares fits of the same records only")  # fmt: skip


def _joint_tree(fit: Any, label: str) -> xr.DataTree:
    from carnk_pkpd.loglik import joint_log_likelihood

    try:
        ll = joint_log_likelihood(fit.idata)
    except ValueError as exc:
        raise FitError(f"{label}: {exc}") from None
    return xr.DataTree.from_dict({"/posterior": fit.posterior, "/log_likelihood": ll.to_dataset(name="DV")})


def _subject_tree(fit: Any, label: str, **kwargs: Any) -> xr.DataTree:
    from carnk_pkpd.loglik import subject_marginal_log_likelihood

    try:
        ll = subject_marginal_log_likelihood(fit, **kwargs)
    except ValueError as exc:
        raise FitError(f"{label}: {exc}") from None
    n_draws = ll.sizes["chain"] * ll.sizes["draw"]
    if n_draws < 25:  # PSIS fits a Pareto tail to at least 5 of the largest weights
        raise FitError(f"{label}: leave-one-subject-out needs at least 25 posterior draws (found {n_draws})")
    post = fit.posterior.sel(draw=ll["draw"].values)
    return xr.DataTree.from_dict({"/posterior": post, "/log_likelihood": ll.to_dataset(name="DV")})


def psis_loo(tree: xr.DataTree) -> Any:
    """``az.loo(tree, pointwise=True)`` that also takes records whose log-likelihood is the same in
    every draw (e.g. a BLQ record with P(Y < LLOQ) = 1 in every draw), on which ArviZ's Pareto fit
    stops with "All tail values are the same". Leaving such a record out reweights nothing: its
    importance weights are uniform, its elpd is that constant exactly and its Pareto k is NaN (no
    tail to fit). The other records get ArviZ's PSIS weights and k unchanged."""
    import arviz as az

    ll = tree["log_likelihood"]["DV"]
    unit = ll.dims[-1]  # record, or subject
    const = (ll.max(("chain", "draw")) == ll.min(("chain", "draw"))).values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Pareto-k warning is reported in the table instead
        if not const.any():
            return az.loo(tree, pointwise=True)
        if const.all():
            raise FitError("every record's log-likelihood is the same in every draw: nothing to compare")
        varying = xr.DataTree.from_dict(
            {
                "/posterior": tree["posterior"].to_dataset(),
                "/log_likelihood": ll.isel({unit: np.flatnonzero(~const)}).to_dataset(name="DV"),
            }
        )
        part = az.loo(varying, pointwise=True)
        n_samples = ll.sizes["chain"] * ll.sizes["draw"]
        log_w = xr.full_like(ll, -np.log(n_samples))
        log_w[{unit: np.flatnonzero(~const)}] = part.log_weights.transpose(*ll.dims).values
        k = xr.DataArray(np.full(ll.sizes[unit], np.nan), dims=(unit,), coords={unit: ll[unit]})
        k[np.flatnonzero(~const)] = np.asarray(part.pareto_k.values, dtype=float)
        return az.loo(
            tree, pointwise=True, log_weights=log_w.to_dataset(name="DV"), pareto_k=k.to_dataset(name="DV")
        )


def compare_fits(
    fits: Sequence[Any | str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    names: Sequence[str] | None = None,
    unit: str = "record",
    n_samples: int = 200,
    max_draws: int = 400,
    seed: int = 0,
) -> pd.DataFrame:
    """PSIS-LOO table of two or more fits of the same data, best first.

    Parameters
    ----------
    fits
        :class:`~carnk_pkpd.fits.Fit` objects or fit folders (``fits/NAME``).
    out
        Optional folder to create, holding ``compare.csv`` (written atomically; an existing
        folder is refused, so nothing is overwritten).
    names
        Labels of the fits (default: folder names).
    unit
        ``"record"`` (leave one concentration record out, from the stored ``log_likelihood``
        group) or ``"subject"`` (leave one subject out, its η integrated out by importance sampling
        with ``n_samples`` proposals per draw at up to ``max_draws`` draws, seeded by ``seed``; see
        the module docstring).

    Returns
    -------
    pandas.DataFrame
        One row per fit: ``model``, ``rank`` (0 = best), ``elpd_loo`` and its ``se``, ``elpd_diff``
        (this fit − best; ≤ 0) and its standard error ``dse``, ``p_loo`` (effective number of
        parameters), stacking ``weight``, ``unit`` (record or subject), ``n_units`` (records or
        subjects left out one at a time), ``n_records``, ``good_k`` (Pareto-k threshold),
        ``k_good``/``k_bad``/``k_very_bad`` (units with k ≤ good_k, in (good_k, 1], > 1; an
        undefined k, from a unit whose log-likelihood is the same in every draw, counts as good),
        ``warning`` (text when any k > good_k), ``elpd_<observation>`` (record unit: the elpd summed
        over each observation type's records), ``is_ess_min``/``is_ess_median`` (subject unit: the
        importance sampler's effective sample size of ``n_samples``), ``data_sha256`` and ``fit``. ``attrs["synthetic"]`` is True
        when any fit is of SYNTHETIC data. elpd in nats (log scale; higher is better).

    Raises
    ------
    FitError
        Fewer than two fits, fits of different data, or a fit without a ``log_likelihood`` group.
    """
    import arviz as az

    from carnk_pkpd.fits import load_fit

    if unit not in ("record", "subject"):
        raise ValueError(f"unit must be 'record' or 'subject' (found {unit!r})")
    if out is not None and Path(out).exists():
        raise FileExistsError(
            f"{out} exists; compare writes only into a folder it creates (choose a new --out)"
        )
    loaded = [load_fit(f) if isinstance(f, (str, os.PathLike)) else f for f in fits]
    if len(loaded) < 2:
        raise FitError(f"compare needs at least two fits (got {len(loaded)})")
    labels = list(names) if names is not None else [_label(f, k) for k, f in enumerate(loaded)]
    if len(labels) != len(loaded):
        raise ValueError(f"{len(labels)} names for {len(loaded)} fits")
    if len(set(labels)) < len(labels):
        labels = [f"{lab}_{k + 1}" for k, lab in enumerate(labels)]
    _check_same_data(loaded, labels)

    results, extra = {}, {}
    for fit, lab in zip(loaded, labels, strict=True):
        if unit == "record":
            tree = _joint_tree(fit, lab)
        else:
            tree = _subject_tree(fit, lab, n_samples=n_samples, max_draws=max_draws, seed=seed)
        res = psis_loo(tree)
        results[lab] = res
        # k is NaN where a record's log-lik is the same in every draw (psis_loo): counted as good
        k = np.nan_to_num(np.asarray(res.pareto_k.values, dtype=float), nan=-np.inf)
        elpd_i = np.asarray(res.elpd_i.values)
        n_bad = int(np.sum(k > res.good_k))
        row = dict(
            unit=unit,
            n_units=int(k.size),
            n_records=int(
                sum(v.shape[-1] for v in fit.idata["log_likelihood"].to_dataset().data_vars.values())
            ),
            good_k=float(res.good_k),
            k_good=int(np.sum(k <= res.good_k)),
            k_bad=int(np.sum((k > res.good_k) & (k <= 1.0))),
            k_very_bad=int(np.sum(k > 1.0)),
            warning=(
                f"{n_bad} of {k.size} {unit}s have Pareto k > {res.good_k:.2f}: PSIS-LOO is unreliable "
                f"for them (more draws, or K-fold for those {unit}s)"
                if n_bad
                else ""
            ),
        )
        if unit == "record":
            dvid = tree["log_likelihood"]["DVID"].values
            for obs in fit.spec.observations.values():
                if np.any(dvid == obs.dvid):
                    row[f"elpd_{obs.name}"] = float(elpd_i[dvid == obs.dvid].sum())
        else:
            ll_attrs = tree["log_likelihood"]["DV"].attrs
            row["is_ess_min"] = float(ll_attrs["is_ess_min"])
            row["is_ess_median"] = float(ll_attrs["is_ess_median"])
        row["data_sha256"] = _data_digest(fit) or ""
        row["fit"] = str(fit.path) if fit.path is not None else ""
        extra[lab] = row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = az.compare(results, round_to="none")
    df = pd.DataFrame(
        {
            "model": table.index,
            "rank": table["rank"].astype(int).values,
            "elpd_loo": table["elpd"].values,
            "se": table["se"].values,
            "elpd_diff": table["elpd_diff"].values,
            "dse": table["dse"].values,
            "p_loo": table["p"].values,
            "weight": table["weight"].values,
        }
    )
    more = pd.DataFrame([extra[m] for m in df["model"]])
    df = pd.concat([df, more], axis=1)
    df.attrs["synthetic"] = any(bool(getattr(f, "synthetic", False)) for f in loaded)
    if out is not None:
        _write(df, Path(out))
    return df


def _write(df: pd.DataFrame, dest: Path) -> Path:
    from carnk_pkpd.atomic import atomic_folder

    with atomic_folder(dest, overwrite=False, kind="compare", command="compare") as tmp:
        with open(tmp / "compare.csv", "w", encoding="utf-8", newline="") as fh:
            if df.attrs.get("synthetic"):
                fh.write("# SYNTHETIC: fits of simulated patients, not trial data\n")
            fh.write(f"# PSIS-LOO (leave one {df['unit'].iloc[0]} out); elpd in nats, higher is better; "
                     "elpd_diff and dse relative to the best fit\n")  # fmt: skip
            df.to_csv(fh, index=False, float_format="%.6g")
    return dest / "compare.csv"
