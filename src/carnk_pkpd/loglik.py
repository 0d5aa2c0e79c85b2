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

Leave one SUBJECT out needs another likelihood: :func:`subject_marginal_log_likelihood` gives, per
posterior draw, each subject's likelihood with its η integrated out by importance sampling
(computed on demand, not stored), which :mod:`carnk_pkpd.compare` uses with ``unit="subject"``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr

__all__ = [
    "add_log_likelihood",
    "conditional_eta_proposal",
    "integrate_eta",
    "joint_log_likelihood",
    "log_likelihood_terms",
    "pointwise_log_likelihood",
    "subject_marginal_log_likelihood",
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


# --------------------------------------------------------------------------------------------------
# Leave one SUBJECT out: each subject's likelihood with its η integrated out
# --------------------------------------------------------------------------------------------------


def _student_t(cov: np.ndarray, df: float):
    """Draws and log density of multivariate Student-t's with scale ``cov`` (subject, d, d) and
    ``df`` degrees of freedom, located where the caller says: the importance proposals of each
    subject's η (heavier tails than the conditional posteriors they stand for)."""
    from scipy.special import gammaln

    d = cov.shape[-1]
    chol = np.linalg.cholesky(cov)
    log_det = 2.0 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)  # (subject,)
    const = gammaln((df + d) / 2) - gammaln(df / 2) - d / 2 * np.log(df * np.pi) - log_det / 2

    def draw(rng: np.random.Generator, loc: np.ndarray, k: int) -> np.ndarray:
        """``k`` draws around ``loc`` (b, subject, d): shape (b, k, subject, d)."""
        b, n_subj, _ = loc.shape
        z = rng.standard_normal((b, k, n_subj, d))
        u = rng.chisquare(df, size=(b, k, n_subj, 1))
        return loc[:, None] + np.einsum("sij,bksj->bksi", chol, z) / np.sqrt(u / df)

    def logpdf(x: np.ndarray, loc: np.ndarray) -> np.ndarray:
        r = np.linalg.solve(chol, (x - loc[:, None])[..., None])[..., 0]
        return const - (df + d) / 2 * np.log1p((r**2).sum(-1) / df)

    return draw, logpdf


def integrate_eta(
    loglik: Any,
    eta_loc: np.ndarray,
    eta_cov: np.ndarray,
    *,
    n_samples: int = 200,
    df: float = 10.0,
    seed: int = 0,
    draws_per_call: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """log p(y_i | θ_s) = log ∫ p(y_i | θ_s, η) N(η; 0, I) dη for every subject i and draw s, by
    importance sampling (η standard normal, as the non-centred model samples it).

    ``loglik(draw_index, eta)`` returns log p(y_i | θ_s, η_i) with shape (len(draw_index), K,
    subject) for ``eta`` of shape (len(draw_index), K, subject, d). The proposal for subject i at
    draw s is a Student-t (``df``) located at ``eta_loc[s, i]`` with scale ``eta_cov[i]``: an
    approximation of the conditional posterior p(η_i | y_i, θ_s) (see
    :func:`subject_marginal_log_likelihood`); ``n_samples`` fresh draws per (draw, subject).
    Returns ``(log_marginal, is_ess)``, both (draw, subject): the estimate and the importance
    sampler's effective sample size (of ``n_samples``), which says how well the proposal covered
    each conditional posterior.
    """
    draw, log_q = _student_t(eta_cov, df)
    rng = np.random.default_rng(seed)
    n_draws, n_subj, d = eta_loc.shape
    out = np.empty((n_draws, n_subj))
    ess = np.empty((n_draws, n_subj))
    for start in range(0, n_draws, draws_per_call):
        idx = np.arange(start, min(start + draws_per_call, n_draws))
        loc = eta_loc[idx]
        eta = draw(rng, loc, n_samples)  # (b, K, subject, d)
        log_prior = -0.5 * (eta**2).sum(-1) - d / 2 * np.log(2 * np.pi)
        log_w = np.asarray(loglik(idx, eta), dtype=float) + log_prior - log_q(eta, loc)
        log_w = np.where(np.isnan(log_w), -np.inf, log_w)
        top = log_w.max(axis=1, keepdims=True)
        w = np.exp(log_w - top)
        out[idx] = np.log(w.mean(axis=1)) + top[:, 0]
        ess[idx] = w.sum(axis=1) ** 2 / np.maximum((w**2).sum(axis=1), 1e-300)
    return out, ess


def conditional_eta_proposal(eta: np.ndarray, theta: np.ndarray, ridge: float = 1e-6):
    """Location (draw, subject, d) and scale (subject, d, d) of the proposals for η_i given θ_s, from
    the joint posterior draws: the Gaussian conditional of η_i on the population variables θ
    (linear regression of each subject's η on θ over the draws; the residual covariance is the
    conditional covariance). ``eta`` (draw, subject, d), ``theta`` (draw, p) on an unbounded scale.
    Exact when the joint posterior is Gaussian; the Student-t tails and the reported importance
    ESS cover the rest."""
    n, n_subj, d = eta.shape
    x = theta - theta.mean(axis=0)
    scale = x.std(axis=0)
    x = x[:, scale > 0] / scale[scale > 0]
    p = x.shape[1]
    y = eta.reshape(n, n_subj * d)
    y_mean = y.mean(axis=0)
    beta = np.linalg.solve(x.T @ x + ridge * n * np.eye(p), x.T @ (y - y_mean))
    loc = (y_mean + x @ beta).reshape(n, n_subj, d)
    resid = eta - loc
    cov = np.einsum("nsi,nsj->sij", resid, resid) / max(n - p - 1, 1)
    return loc, cov + 1e-6 * np.eye(d)


def _thinned_draws(n_chain: int, n_draw: int, max_draws: int) -> np.ndarray:
    per_chain = max(1, min(n_draw, -(-max_draws // n_chain)))
    return np.unique(np.linspace(0, n_draw - 1, per_chain).round().astype(int))


def _per_subject_loglik(fit: Any, post: xr.Dataset):
    """``(loglik, eta_draws, theta_draws, ids)`` for the draws of ``post`` (flattened chain x draw):
    ``loglik(draw_index, eta)`` is log p(y_i | θ_s, η_i) per subject for η of shape (b, K, subject,
    d), the other free variables taken at the draws ``draw_index``; ``eta_draws`` (draw, subject, d)
    are the posterior's own η (d = the model's η variables in model order), ``theta_draws`` (draw,
    p) the other free variables, flattened, positive ones on the log scale."""
    import jax
    import jax.numpy as jnp

    from carnk_pkpd.evaluation import solver_accuracy
    from carnk_pkpd.statistical import observation_data

    data = observation_data(fit.cohort)
    fn, names, term_names = log_likelihood_terms(fit.spec, data, accuracy=solver_accuracy(fit))
    total = post.sizes["chain"] * post.sizes["draw"]
    etas = [n for n in names if n.startswith("eta_") and post[n].dims[-1] == "subject"]
    if not etas:
        raise ValueError("the model has no between-subject η: leave-one-subject-out needs them")
    values = {
        n: np.asarray(post[n].transpose("chain", "draw", ...).values, dtype=float).reshape(
            total, *post[n].shape[2:]
        )
        for n in names
    }
    # records -> subject: each potential's records in model order (statistical._likelihood)
    owners = []
    for t in term_names:
        label, kind = t[3:].rsplit("_", 1)
        dvid = next(d for d, o in fit.spec.observations.items() if o.name == label)
        sel = np.flatnonzero(data.dvid == dvid)
        blq = data.blq[sel] == 1
        owners.append(data.subject_index[sel[blq] if kind == "blq" else sel[~blq]])
    n_subj = len(data.ids)
    onehot = [jnp.asarray(np.eye(n_subj)[o]) for o in owners]

    def per_subject(*xs):
        terms = fn(*xs)
        return sum(jnp.asarray(t) @ m for t, m in zip(terms, onehot, strict=True))

    vfn = jax.jit(jax.vmap(per_subject))

    def loglik(idx: np.ndarray, eta: np.ndarray) -> np.ndarray:
        b, k = eta.shape[:2]
        rows = []
        for n in names:
            if n in etas:
                rows.append(eta[..., etas.index(n)].reshape(b * k, n_subj))
            else:
                rows.append(np.repeat(values[n][idx], k, axis=0))
        out = []
        for start in range(0, b * k, BATCH):  # BATCH evaluations per call: one compiled shape
            part = [r[start : start + BATCH] for r in rows]
            n_real = part[0].shape[0]
            if n_real < BATCH:
                part = [np.concatenate([x, np.repeat(x[-1:], BATCH - n_real, axis=0)]) for x in part]
            out.append(np.asarray(vfn(*[jnp.asarray(x) for x in part]))[:n_real])
        return np.concatenate(out).reshape(b, k, n_subj)

    others = []
    for n in names:
        if n in etas:
            continue
        v = values[n].reshape(total, -1)
        others.append(np.log(v) if np.all(v > 0) else v)  # positive variables on the log scale
    theta = np.concatenate(others, axis=1) if others else np.zeros((total, 0))
    return loglik, np.stack([values[n] for n in etas], axis=-1), theta, data.ids


def subject_marginal_log_likelihood(
    fit: Any,
    *,
    n_samples: int = 200,
    max_draws: int = 400,
    seed: int = 0,
    df: float = 10.0,
) -> xr.DataArray:
    """log p(y_i | θ_s) of every subject's concentration records with all of its η integrated out
    (:func:`integrate_eta`), at up to ``max_draws`` posterior draws (evenly thinned within each chain).
    The proposal for η_i at draw s is the Gaussian conditional of η_i on the population variables
    θ_s fitted to all posterior draws (:func:`conditional_eta_proposal`), with Student-t tails.

    This is the likelihood of a NEW subject with subject i's design and data, given the population
    parameters θ_s (THETA, OMEGA, SIGMA, dose-level tier, covariates). PSIS-LOO over it leaves one
    subject out (Merkle, Furr & Rabe-Hesketh 2019, "marginal" likelihood; Vehtari et al. 2016): it
    judges the population model, e.g. a dose-level tier or a covariate, which the record-level LOO
    cannot see because each subject's own η absorbs a shift of its level. Returns a DataArray on
    ``(chain, draw, subject)`` (nat log), with the importance sampler's effective sample sizes in
    ``attrs`` (``is_ess_min``, ``is_ess_median``, of ``n_samples``).
    """
    post = fit.posterior
    n_chain, n_all = post.sizes["chain"], post.sizes["draw"]
    keep = _thinned_draws(n_chain, n_all, max_draws)
    n_draw = keep.size
    flat_keep = (np.arange(n_chain)[:, None] * n_all + keep[None, :]).ravel()
    loglik, eta_all, theta_all, ids = _per_subject_loglik(fit, post)
    n_subj = eta_all.shape[1]
    loc, cov = conditional_eta_proposal(eta_all, theta_all)  # from every draw, used at the kept ones
    log_m, ess = integrate_eta(
        lambda idx, eta: loglik(flat_keep[idx], eta),
        loc[flat_keep],
        cov,
        n_samples=n_samples,
        df=df,
        seed=seed,
    )
    return xr.DataArray(
        log_m.reshape(n_chain, n_draw, n_subj),
        dims=("chain", "draw", "subject"),
        coords={"chain": post["chain"].values, "draw": post["draw"].values[keep], "subject": ids},
        name="log_likelihood",
        attrs={
            "long_name": "log-likelihood of each subject's records, its η integrated out",
            "units": "nat",
            "n_samples": int(n_samples),
            "is_ess_min": float(ess.min()),
            "is_ess_median": float(np.median(ess)),
        },
    )
