"""Pointwise log-likelihood of a fit: the ArviZ ``log_likelihood`` group, computed after sampling.

The fitted likelihood is the sum of the potentials ``ll_<observation>_obs`` (log density of each
quantified record) and ``ll_<observation>_blq`` (log P(Y < LLOQ) of each BLQ record, Beal's M3) that
:func:`carnk_pkpd.statistical.build_model` adds to the PyMC model. This module rebuilds that model
for the fit's cohort, replaces every free random variable by an input fed from the posterior
(constrained values, as stored), compiles the potentials to one JAX function and maps it over the
draws (``jax.vmap`` over batches of draws). The saved numbers are therefore by construction the
terms that were sampled from; nothing about the sampling changes.

Layout (ArviZ schema): one variable per observation type, named as the model file names it
(``car_flow``, ``bcell_flow``, ``car_qpcr``), on ``(chain, draw, <name>_record)``; the values of
``<name>_record`` are the record numbers of ``constant_data``/``observed_data`` (dim ``record``), so
``constant_data.sel(record=ll["car_flow_record"].values)`` gives each column's record. Each BLQ record
carries its M3 term, each quantified record its density (nat log; the density of DV in the record's
unit). ``observed_data`` gets the same variables (the DV of those records; the LLOQ for BLQ records).

With more than one observation type ArviZ 1.x asks which one to use (``az.loo(idata,
var_name="bcell_flow")``); :func:`joint_log_likelihood` concatenates them on one ``record`` dim for
a leave-one-record-out over all records (what :mod:`carnk_pkpd.compare` uses).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr

__all__ = [
    "add_log_likelihood",
    "joint_log_likelihood",
    "log_likelihood_terms",
    "pointwise_log_likelihood",
]

#: Draws evaluated per call of the vectorised function (bounds memory; the last batch is padded).
BATCH = 128


def _record_dim(name: str) -> str:
    return f"{name}_record"


def log_likelihood_terms(spec: Any, data: Any, *, accuracy: str = "default"):
    """The model's likelihood potentials as a JAX function of the posterior's free variables.

    Returns ``(fn, names, terms)``: ``fn(*values)`` gives one array per potential in ``terms``
    (``ll_<observation>_obs|_blq``, in model order) from the constrained values of the free random
    variables ``names`` (as stored in the posterior group), for one draw.
    """
    import pytensor.tensor as pt
    from pymc.sampling.jax import get_jaxified_graph
    from pytensor.graph.replace import clone_replace

    from carnk_pkpd.statistical import build_model

    model = build_model(spec, data, accuracy=accuracy)
    terms = [t for t in model.potentials if t.name and t.name.startswith("ll_")]
    inputs = [pt.tensor(name=rv.name, dtype=rv.dtype, shape=rv.type.shape) for rv in model.free_RVs]
    graphs = clone_replace(terms, replace=dict(zip(model.free_RVs, inputs, strict=True)))
    fn = get_jaxified_graph(inputs=inputs, outputs=graphs)
    return fn, [rv.name for rv in model.free_RVs], [t.name for t in terms]


def pointwise_log_likelihood(
    spec: Any, data: Any, posterior: xr.Dataset, *, accuracy: str = "default", batch: int = BATCH
) -> xr.Dataset:
    """Log-likelihood of every concentration record at every posterior draw (see module docstring).

    Parameters
    ----------
    spec, data
        The fit's :class:`~carnk_pkpd.spec.ModelSpec` and
        :class:`~carnk_pkpd.statistical.ObservationData` (records in ``constant_data`` order).
    posterior
        The posterior group (free variables on ``chain, draw[, subject|dose_level]``).
    accuracy
        The solver accuracy of the fit (its manifest's ``sampler.accuracy``).

    Returns
    -------
    xarray.Dataset
        One variable per observation type on ``(chain, draw, <name>_record)`` (nat log).
    """
    import jax
    import jax.numpy as jnp

    fn, names, term_names = log_likelihood_terms(spec, data, accuracy=accuracy)
    missing = [n for n in names if n not in posterior]
    if missing:
        raise ValueError(
            f"the posterior lacks the model's free variables {missing}; was it fitted with this model?"
        )
    n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
    flat = [
        np.ascontiguousarray(posterior[n].transpose("chain", "draw", ...).values, dtype=float).reshape(
            n_chain * n_draw, *posterior[n].shape[2:]
        )
        for n in names
    ]
    vfn = jax.jit(jax.vmap(lambda *xs: fn(*xs)))
    total = n_chain * n_draw
    size = max(1, min(batch, total))
    chunks: list[list[np.ndarray]] = []
    for start in range(0, total, size):
        stop = min(start + size, total)
        args = []
        for x in flat:
            part = x[start:stop]
            if stop - start < size:  # pad with the last draw: one compiled shape
                part = np.concatenate([part, np.repeat(part[-1:], size - (stop - start), axis=0)])
            args.append(jnp.asarray(part))
        out = vfn(*args)
        chunks.append([np.asarray(o)[: stop - start] for o in out])
    values = {t: np.concatenate([c[k] for c in chunks], axis=0) for k, t in enumerate(term_names)}
    bad = [t for t, v in values.items() if not np.all(np.isfinite(v))]
    if bad:  # kept as they are (a fit is not thrown away for it), but said: PSIS-LOO cannot use them
        warnings.warn(
            f"non-finite pointwise log-likelihood in {bad}; LOO will fail on this fit", stacklevel=2
        )

    ds = {}
    coords = {"chain": posterior["chain"].values, "draw": posterior["draw"].values}
    for dvid in sorted(set(data.dvid.tolist())):
        name = spec.observations[dvid].name
        sel = np.flatnonzero(data.dvid == dvid)
        blq = data.blq[sel] == 1
        ll = np.empty((total, sel.size))
        ll[:, ~blq] = values[f"ll_{name}_obs"].reshape(total, int((~blq).sum()))
        ll[:, blq] = values[f"ll_{name}_blq"].reshape(total, int(blq.sum()))
        dim = _record_dim(name)
        ds[name] = xr.DataArray(
            ll.reshape(n_chain, n_draw, sel.size),
            dims=("chain", "draw", dim),
            coords={**coords, dim: sel},
            attrs={
                "long_name": f"log-likelihood of each {name} record (M3 for BLQ records)",
                "units": "nat",
                "dvid": int(dvid),
            },
        )
    return xr.Dataset(ds)


def add_log_likelihood(idata: xr.DataTree, spec: Any, data: Any, *, accuracy: str = "default") -> xr.DataTree:
    """A copy of ``idata`` with the ``log_likelihood`` group (and matching ``observed_data`` variables)."""
    ll = pointwise_log_likelihood(spec, data, idata["posterior"].to_dataset(), accuracy=accuracy)
    obs = idata["observed_data"].to_dataset() if "observed_data" in idata.children else xr.Dataset()
    for name, da in ll.data_vars.items():
        dim = da.dims[-1]
        rec = da[dim].values
        obs[name] = xr.DataArray(
            data.dv[rec], dims=dim, coords={dim: rec}, attrs={"long_name": f"{name} DV (LLOQ where BLQ)"}
        )
    ll.attrs["note"] = "pointwise log-likelihood of the fitted model at each posterior draw (M3 for BLQ)"
    out = idata.copy()
    out["observed_data"] = xr.DataTree(obs)
    out["log_likelihood"] = xr.DataTree(ll)
    return out


def joint_log_likelihood(idata: xr.DataTree) -> xr.DataArray:
    """All records' log-likelihood on ``(chain, draw, record)``, in record order (``DVID`` coordinate).

    Raises ``ValueError`` when the fit has no ``log_likelihood`` group (fits made before it existed).
    """
    if "log_likelihood" not in idata.children:
        raise ValueError("the fit has no log_likelihood group; refit with this version of carnk_pkpd")
    ll = idata["log_likelihood"].to_dataset()
    parts = []
    for da in ll.data_vars.values():
        dim = da.dims[-1]
        part = da.rename({dim: "record"}).transpose("chain", "draw", "record")
        part = part.assign_coords(
            DVID=("record", np.full(part.sizes["record"], int(da.attrs.get("dvid", -1))))
        )
        parts.append(part.drop_attrs())
    joint = xr.concat(parts, dim="record").sortby("record")
    joint.name = "log_likelihood"
    return joint
